// The worker pool behind qk::parallel_for (parallel.h).
#include "parallel.h"

#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>

namespace qk::detail {
namespace {

// One parallel_for call: its chunks, claimed from `next` by the caller and the workers that join.
struct Job {
    Job(void (*chunk_)(void*, int64_t), void* context_, int64_t count_)
        : chunk(chunk_), context(context_), count(count_) {}

    void (*const chunk)(void*, int64_t);
    void* const context;
    const int64_t count;
    std::atomic<int64_t> next{0};
    std::atomic<bool> failed{false};
    std::exception_ptr error;  // written once, by the thread that set `failed`

    void run() {
        for (;;) {
            const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
            if (c >= count) return;
            try {
                chunk(context, c);
            } catch (...) {
                if (!failed.exchange(true)) error = std::current_exception();
                next.store(count, std::memory_order_relaxed);  // the other threads stop claiming
            }
        }
    }
};

class Pool {
   public:
    // False, without running anything, when another job holds the pool.
    bool try_run(Job& job, int helpers) {
        if (busy_.exchange(true, std::memory_order_acquire)) return false;
        int woken;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            grow(helpers);
            job_ = &job;
            ++generation_;
            woken = wanted_ = std::min(helpers, workers_);
        }
        if (woken == workers_) {
            work_.notify_all();
        } else {
            for (int i = 0; i < woken; ++i) work_.notify_one();
        }
        job.run();
        {
            // Withdrawn, the job takes no new worker; the ones inside it finish their claimed
            // chunks (the counter is spent) and leave before `job` and fn go out of scope.
            std::unique_lock<std::mutex> lock(mutex_);
            job_ = nullptr;
            wanted_ = 0;
            idle_.wait(lock, [&] { return active_ == 0; });
        }
        busy_.store(false, std::memory_order_release);
        return true;
    }

   private:
    // Under mutex_. A thread that cannot be created (std::system_error under a PID or thread
    // limit) leaves the job to the workers that exist and the caller.
    void grow(int helpers) {
        while (workers_ < helpers) {
            try {
                std::thread([this] { work(); }).detach();
            } catch (const std::exception&) {
                return;
            }
            ++workers_;
        }
    }

    void work() {
        uint64_t joined = 0;  // the generation of the last job this worker took part in
        std::unique_lock<std::mutex> lock(mutex_);
        for (;;) {
            work_.wait(lock, [&] { return job_ != nullptr && generation_ != joined && wanted_ > 0; });
            joined = generation_;
            --wanted_;
            ++active_;
            Job* job = job_;
            lock.unlock();
            job->run();
            lock.lock();
            if (--active_ == 0) idle_.notify_one();
        }
    }

    std::atomic<bool> busy_{false};
    std::mutex mutex_;
    std::condition_variable work_;  // workers wait here for a job
    std::condition_variable idle_;  // the caller waits here for the workers inside its job
    Job* job_ = nullptr;
    uint64_t generation_ = 0;
    int wanted_ = 0;  // workers the posted job still takes
    int active_ = 0;  // workers inside a job
    int workers_ = 0;
};

// The pool is never destroyed: its workers sleep in it until the process exits (joining them
// from a static destructor could wait on a worker of a job still running in another thread).
// A forked child has none of the parent's threads, and the parent's mutex may be held by one of
// them: the child drops (leaks) the parent's pool and starts a fresh one on first use.
std::atomic<Pool*> g_pool{nullptr};

void drop_pool_in_child() { g_pool.store(nullptr, std::memory_order_relaxed); }

Pool& pool() {
    static const int registered = pthread_atfork(nullptr, nullptr, drop_pool_in_child);
    (void)registered;
    Pool* p = g_pool.load(std::memory_order_acquire);
    if (p != nullptr) return *p;
    Pool* fresh = new Pool;
    if (g_pool.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) return *fresh;
    delete fresh;  // another thread installed its pool first; ours has no threads yet
    return *p;
}

}  // namespace

void run_chunks(int64_t count, int threads, void (*chunk)(void*, int64_t), void* context) {
    Job job(chunk, context, count);
    if (!pool().try_run(job, threads - 1)) {
        for (int64_t c = 0; c < count; ++c) chunk(context, c);
        return;
    }
    if (job.error) std::rethrow_exception(job.error);
}

}  // namespace qk::detail
