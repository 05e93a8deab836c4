// threadpool.cpp: the one pool every CPU kernel shares (declared in kernels/common.h).
//
// Workers spin briefly, then sleep on a condition variable, so back-to-back kernels (a forward pass
// issues hundreds) do not pay a futex wake-up each, while an idle process burns no CPU. The caller
// of parallel_for takes part as worker 0. A parallel_for issued from inside a task runs serially.
#include <atomic>
#include <exception>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "../../../kernels/common.h"

namespace nx {
namespace {

class Pool {
 public:
  Pool() {
    unsigned hw = std::thread::hardware_concurrency();
    resize(hw == 0 ? 1 : static_cast<int>(hw));
  }
  ~Pool() { stop_workers(); }

  int size() const { return nthreads_; }

  void resize(int n) {
    if (n < 1) n = 1;
    std::lock_guard<std::mutex> run_lock(run_mu_);
    stop_workers();
    nthreads_ = n;
    stop_ = false;
    for (int i = 1; i < n; i++) workers_.emplace_back([this, i] { worker_loop(i); });
  }

  void run(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    int64_t n = end - begin;
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    int64_t max_chunks = (n + grain - 1) / grain;
    if (nthreads_ == 1 || max_chunks == 1 || in_task_) {
      fn(begin, end);
      return;
    }
    std::lock_guard<std::mutex> run_lock(run_mu_);  // one parallel region at a time
    int nchunks = static_cast<int>(std::min<int64_t>(max_chunks, nthreads_));
    fn_ = &fn;
    begin_ = begin;
    end_ = end;
    nchunks_ = nchunks;
    next_chunk_.store(0);
    pending_.store(nchunks);
    {
      std::lock_guard<std::mutex> lk(mu_);
      generation_.fetch_add(1, std::memory_order_acq_rel);
    }
    cv_.notify_all();
    work_until_done();
    // the other chunks finish within microseconds: pause-spin (a sched_yield syscall per check cost ~4%
    // of decode time), yielding only if a worker was descheduled
    for (int spin = 0; pending_.load(std::memory_order_acquire) != 0; spin++) {
      if (spin < 100000) {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
    fn_ = nullptr;
    std::exception_ptr err;
    {
      std::lock_guard<std::mutex> lk(err_mu_);
      std::swap(err, error_);
    }
    if (err) std::rethrow_exception(err);
  }

 private:
  void run_chunk(int c) {
    int64_t n = end_ - begin_;
    int64_t lo = begin_ + n * c / nchunks_;
    int64_t hi = begin_ + n * (c + 1) / nchunks_;
    in_task_ = true;
    try {
      if (lo < hi) (*fn_)(lo, hi);
    } catch (...) {
      // a kernel error inside a task is rethrown on the calling thread (never std::terminate)
      std::lock_guard<std::mutex> lk(err_mu_);
      if (!error_) error_ = std::current_exception();
    }
    in_task_ = false;
    pending_.fetch_sub(1, std::memory_order_acq_rel);
  }
  void work_until_done() {
    for (;;) {
      int c = next_chunk_.fetch_add(1);
      if (c >= nchunks_) break;
      run_chunk(c);
    }
  }
  void worker_loop(int) {
    uint64_t seen = 0;
    for (;;) {
      // spin a little before sleeping: kernels come in bursts
      bool got = false;
      for (int spin = 0; spin < 2000; spin++) {
        if (generation_seen() != seen || stop_) { got = true; break; }
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
      }
      if (!got) {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return generation_.load() != seen || stop_; });
      }
      if (stop_) return;
      seen = generation_seen();
      work_until_done();
    }
  }
  uint64_t generation_seen() { return generation_.load(std::memory_order_acquire); }
  void stop_workers() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  int nthreads_ = 1;
  std::vector<std::thread> workers_;
  std::mutex run_mu_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stop_{false};
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t begin_ = 0, end_ = 0;
  int nchunks_ = 0;
  std::atomic<int> next_chunk_{0};
  std::atomic<int> pending_{0};
  std::mutex err_mu_;
  std::exception_ptr error_;
  static thread_local bool in_task_;
};

thread_local bool Pool::in_task_ = false;

Pool& pool() {
  static Pool p;
  return p;
}

}  // namespace

void parallel_for(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  pool().run(begin, end, grain, fn);
}
int num_threads() { return pool().size(); }
void set_num_threads(int n) { pool().resize(n); }

}  // namespace nx
