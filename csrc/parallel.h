// A minimal parallel-for over [0, n): contiguous chunks, one std::thread each. Native code
// does not link libtorch or OpenMP, so the caller passes torch.get_num_threads().
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace qk {

// Below this much work per call, threads cost more than they save.
constexpr int64_t kMinItemsPerThread = 1 << 15;

template <typename Fn>
void parallel_for(int64_t n, int64_t items_per_unit, int num_threads, Fn&& fn) {
    if (n <= 0) return;
    const int64_t by_work = std::max<int64_t>(1, (n * items_per_unit) / kMinItemsPerThread);
    const int64_t threads = std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(num_threads), by_work, n}));
    if (threads == 1) {
        fn(int64_t{0}, n);
        return;
    }
    const int64_t chunk = (n + threads - 1) / threads;
    std::vector<std::thread> pool;
    std::vector<std::exception_ptr> errors(threads);
    for (int64_t t = 1; t < threads; ++t) {
        const int64_t begin = t * chunk, end = std::min(n, begin + chunk);
        if (begin >= end) break;
        pool.emplace_back([&, t, begin, end] {
            try {
                fn(begin, end);
            } catch (...) {
                errors[t] = std::current_exception();
            }
        });
    }
    try {
        fn(int64_t{0}, std::min(n, chunk));
    } catch (...) {
        errors[0] = std::current_exception();
    }
    for (auto& th : pool) th.join();
    for (auto& e : errors)
        if (e) std::rethrow_exception(e);
}

}  // namespace qk
