// A parallel-for over [0, n) on one process-wide pool of worker threads (parallel.cpp). Native
// code does not link libtorch or OpenMP, so the caller passes torch.get_num_threads().
//
// The range is cut into a few chunks per thread that the calling thread and up to
// num_threads - 1 pool workers claim from a shared counter. Workers are created on first need
// (and when a call asks for more) and sleep between calls; the caller works from the start, so
// a worker that wakes late (torch's OpenMP workers spin on the other cores for a while after
// each torch op) finds fewer chunks or none, and the call never waits for one to start.
//
// Guarantees: when parallel_for returns or throws, no call of fn is running or will start; an
// exception thrown by fn stops the unclaimed chunks and is rethrown to the caller; if worker
// threads cannot be created (a PID limit), the call runs on those that exist, or inline. A call
// made while the pool is busy (from inside fn, or from a second thread meanwhile) runs inline on
// its own thread.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace qk {

// Below this much work per call, threads cost more than they save.
constexpr int64_t kMinItemsPerThread = 1 << 15;
// Chunks per thread: a worker that starts late still finds work to share.
constexpr int64_t kChunksPerThread = 4;

namespace detail {
// Calls chunk(context, c) once for every c in [0, count) on the calling thread and up to
// threads - 1 pool workers; returns when every claimed chunk has finished, rethrowing the first
// exception of a chunk.
void run_chunks(int64_t count, int threads, void (*chunk)(void* context, int64_t c), void* context);
}  // namespace detail

template <typename Fn>
void parallel_for(int64_t n, int64_t items_per_unit, int num_threads, Fn&& fn) {
    if (n <= 0) return;
    const int64_t by_work = std::max<int64_t>(1, (n * items_per_unit) / kMinItemsPerThread);
    const int64_t threads = std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(num_threads), by_work, n}));
    if (threads == 1) {
        fn(int64_t{0}, n);
        return;
    }
    const int64_t chunks = std::min(n, threads * kChunksPerThread);
    const int64_t chunk = (n + chunks - 1) / chunks;
    const int64_t count = (n + chunk - 1) / chunk;
    auto run_chunk = [&fn, chunk, n](int64_t c) { fn(c * chunk, std::min(n, (c + 1) * chunk)); };
    using RunChunk = std::remove_reference_t<decltype(run_chunk)>;
    detail::run_chunks(
        count, static_cast<int>(threads), [](void* context, int64_t c) { (*static_cast<RunChunk*>(context))(c); },
        &run_chunk);
}

}  // namespace qk
