// threadpool.cpp: the one pool every CPU kernel shares (declared in kernels/common.h).
//
// Workers spin while kernels are coming and sleep on a condition variable once they stop, so back-to-back
// kernels (a forward pass issues hundreds) do not pay a futex wake-up each, while an idle process burns no
// CPU. How long they spin is learned from the gaps between parallel regions and bounded (spin.h); the
// executor cuts the spin short when it goes to sleep itself, and wakes the workers as soon as it wakes
// (pool.h). The caller of parallel_for takes part as worker 0. A parallel_for
// issued from inside a task runs serially.
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "../../../kernels/common.h"
#include "pool.h"
#include "spin.h"

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
    // pending_ before next_chunk_: a worker still leaving the previous region may claim a chunk of this
    // one as soon as next_chunk_ is reset, and its completion must count against this region's total
    pending_.store(nchunks);
    next_chunk_.store(0);
    region_start_ns_.store(spin_now_ns(), std::memory_order_relaxed);  // published by the generation bump
    // seq_cst on both sides (here: bump, then read sleepers_; a worker: count itself in sleepers_, then
    // read the generation) means at least one of the two sees the other, so no wake-up is lost; the
    // futex call is made only when some worker is really asleep
    generation_.fetch_add(1, std::memory_order_seq_cst);
    // waking_: a worker already notified but not yet running (tens of microseconds on a loaded machine)
    // needs no second futex call from the regions issued meanwhile; it clears the flag once awake, before
    // it reads the generation, so it cannot miss the region whose wake-up was skipped
    if (sleepers_.load(std::memory_order_seq_cst) > 0 && !waking_.exchange(true, std::memory_order_seq_cst)) {
      { std::lock_guard<std::mutex> lk(mu_); }  // a worker between its check and its wait holds mu_
      cv_.notify_all();
    }
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
    uint64_t seen = generation_seen();
    int64_t quiet_since = spin_now_ns();  // when this worker last had (or was told of) work
    for (;;) {
      bool slept = false;
      if (generation_seen() == seen && !stop_) {
        const int64_t budget = budget_.ns();
        const SpinEnd end = spin_wait(
            [&] { return generation_seen() != seen || stop_; },
            [&] { return quiet_since + budget; },
            [&] { return executor_idle_.load(std::memory_order_relaxed); });
        if (end == SpinEnd::kPreempted) budget_.preempted();
        if (end != SpinEnd::kReady) {
          std::unique_lock<std::mutex> lk(mu_);
          const uint64_t prewake = prewake_;
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          cv_.wait(lk, [&] { return generation_.load(std::memory_order_seq_cst) != seen || stop_ || prewake_ != prewake; });
          sleepers_.fetch_sub(1, std::memory_order_seq_cst);
          waking_.store(false, std::memory_order_seq_cst);
          slept = true;
        }
      }
      if (stop_) return;
      const uint64_t g = generation_seen();
      if (g == seen) {  // woken ahead of work (pool_executor_awake): spin again from now
        quiet_since = spin_now_ns();
        continue;
      }
      budget_.learn(region_start_ns_.load(std::memory_order_relaxed) - quiet_since, slept);
      seen = g;
      work_until_done();
      quiet_since = spin_now_ns();
    }
  }
  uint64_t generation_seen() { return generation_.load(std::memory_order_acquire); }

 public:
  void executor_idle() { executor_idle_.store(true, std::memory_order_relaxed); }
  void executor_awake() {
    executor_idle_.store(false, std::memory_order_relaxed);
    // only a process that ran parallel regions lately (kProbablyParallelNs) gets its workers woken ahead:
    // one whose ops are all single-threaded (a server running a tiny model) would pay a futex call and a
    // worker's useless spin per burst
    constexpr int64_t kProbablyParallelNs = 100'000'000;
    if (spin_now_ns() - region_start_ns_.load(std::memory_order_relaxed) > kProbablyParallelNs) return;
    if (sleepers_.load(std::memory_order_seq_cst) == 0 || waking_.exchange(true, std::memory_order_seq_cst)) return;
    {
      std::lock_guard<std::mutex> lk(mu_);
      prewake_++;
    }
    cv_.notify_all();
  }

 private:
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
  std::atomic<int> sleepers_{0};            // workers waiting on cv_
  std::atomic<bool> waking_{false};         // sleepers were notified and have not all woken yet
  uint64_t prewake_ = 0;                    // bumped (under mu_) by executor_awake
  std::atomic<int64_t> region_start_ns_{0};  // when the current region was issued
  std::atomic<bool> executor_idle_{false};   // the executor is asleep: nothing is coming
  SpinBudget budget_;                        // shared by the workers: they all see the same gaps
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

// cpu_contended (spin.h): one sampler per process; a thread that finds another one sampling uses the
// last answer.
class Contention {
 public:
  Contention() {
    fd_ = ::open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
    unsigned hw = std::thread::hardware_concurrency();
    ncpu_ = hw == 0 ? 1 : static_cast<int>(hw);
  }
  bool get() {
    const int64_t now = spin_now_ns();
    if (fd_ < 0 || now - checked_ns_.load(std::memory_order_relaxed) < kEveryNs) return contended_.load(std::memory_order_relaxed);
    std::unique_lock<std::mutex> lk(mu_, std::try_to_lock);
    if (!lk.owns_lock()) return contended_.load(std::memory_order_relaxed);
    checked_ns_.store(now, std::memory_order_relaxed);
    const bool c = read_runnable() > ncpu_;
    contended_.store(c, std::memory_order_relaxed);
    return c;
  }

 private:
  static constexpr int64_t kEveryNs = 250'000;
  int read_runnable() {  // "0.52 0.58 0.59 3/123 4567": runnable/total tasks, the caller included
    char buf[128];
    ssize_t n = ::pread(fd_, buf, sizeof buf - 1, 0);
    if (n <= 0) return 0;
    buf[n] = '\0';
    const char* p = buf;
    for (int field = 0; field < 3 && p; field++) p = std::strchr(p + 1, ' ');
    return p ? std::atoi(p + 1) : 0;
  }
  int fd_ = -1;
  int ncpu_ = 1;
  std::mutex mu_;
  std::atomic<int64_t> checked_ns_{0};
  std::atomic<bool> contended_{false};
};

}  // namespace

bool cpu_contended() {
  static Contention c;
  return c.get();
}

void parallel_for(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  pool().run(begin, end, grain, fn);
}
int num_threads() { return pool().size(); }
void pool_executor_idle() { pool().executor_idle(); }
void pool_executor_awake() { pool().executor_awake(); }
void set_num_threads(int n) { pool().resize(n); }

}  // namespace nx
