// A minimal parallel-for over [0, n). Native code does not link libtorch or OpenMP, so the
// caller passes torch.get_num_threads().
//
// The range is cut into a few chunks per thread that the calling thread and num_threads - 1
// helper threads claim from a shared counter; the call returns once every chunk is done, without
// waiting for a helper that has not started yet. On a busy machine (torch's OpenMP workers spin
// on the other cores for a while after each torch op) a fresh helper can take a scheduler slice
// to start: the caller then claims the chunks itself instead of idling at a join, and a late
// helper finds none left and exits (helpers are detached and share only the counter state).
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>

namespace qk {

// Below this much work per call, threads cost more than they save.
constexpr int64_t kMinItemsPerThread = 1 << 15;
// Chunks per thread: a helper that starts late still finds work to share.
constexpr int64_t kChunksPerThread = 4;

namespace detail {
struct ParallelState {
    std::atomic<int64_t> next{0};
    int64_t done = 0;  // under mutex
    std::exception_ptr error;
    std::mutex mutex;
    std::condition_variable all_done;
};
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
    auto state = std::make_shared<detail::ParallelState>();
    // A claimed chunk always finishes before parallel_for returns (the caller waits for `done`),
    // so `fn` and what it references outlive every call of it; a helper that claims nothing
    // touches only `state`, which it co-owns.
    auto run = [state, &fn, chunk, count, n]() {
        for (;;) {
            const int64_t c = state->next.fetch_add(1, std::memory_order_relaxed);
            if (c >= count) return;
            std::exception_ptr error;
            try {
                fn(c * chunk, std::min(n, (c + 1) * chunk));
            } catch (...) {
                error = std::current_exception();
            }
            std::lock_guard<std::mutex> lock(state->mutex);
            if (error && !state->error) state->error = error;
            if (++state->done == count) state->all_done.notify_all();
        }
    };
    for (int64_t t = 1; t < threads; ++t) std::thread(run).detach();
    run();
    std::unique_lock<std::mutex> lock(state->mutex);
    state->all_done.wait(lock, [&] { return state->done == count; });
    if (state->error) std::rethrow_exception(state->error);
}

}  // namespace qk
