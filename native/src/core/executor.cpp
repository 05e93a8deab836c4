// executor.cpp: see executor.h.
#include "executor.h"

#include <chrono>
#include <cstdlib>

#include "pool.h"

namespace nx {

std::atomic<bool> Executor::profiling_{[] {
  const char* p = std::getenv("NX_PROFILE");
  return p != nullptr && p[0] != '\0' && p[0] != '0';
}()};

namespace {
using Clock = std::chrono::steady_clock;
double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}
}  // namespace

Executor::Executor() {
  const char* s = std::getenv("NX_SYNC");
  inline_ = s != nullptr && s[0] == '1';
  const char* m = std::getenv("NX_INFLIGHT_MB");
  inflight_limit_ = static_cast<size_t>(m ? std::atoll(m) : 16) << 20;
  if (!inline_) thread_ = std::thread([this] { loop(); });
}

Executor::~Executor() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Executor::run_task(Task& t) {
  std::shared_ptr<const Error> err;
  for (auto& s : t.inputs)
    if (s && (err = s->get_error())) break;
  if (!err) {
    try {
      if (t.fn) t.fn();
    } catch (const Error& e) {
      err = std::make_shared<Error>(e);
    } catch (const std::exception& e) {
      err = std::make_shared<Error>("INTERNAL", e.what());
    }
  }
  if (err)
    for (auto& s : t.outputs)
      if (s) s->set_error(err);
}

namespace {
thread_local size_t t_allocated = 0;  // host bytes allocated on this thread since its last submit()
}  // namespace

void note_host_allocation(size_t bytes) { t_allocated += bytes; }

void Executor::profile_add(const std::string& label, double ms) {
  std::lock_guard<std::mutex> lk(prof_mu_);
  auto it = prof_index_.find(label);
  size_t i;
  if (it == prof_index_.end()) {
    i = prof_rows_.size();
    prof_index_.emplace(label, i);
    prof_rows_.push_back(ProfileRow{label.empty() ? std::string("(unlabelled)") : label, 0, 0.0, 0.0});
  } else {
    i = it->second;
  }
  ProfileRow& r = prof_rows_[i];
  r.calls++;
  r.total_ms += ms;
  if (ms > r.max_ms) r.max_ms = ms;
}

void Executor::run_timed(Task& t) {
  const auto t0 = Clock::now();
  run_task(t);
  profile_add(t.label, ms_between(t0, Clock::now()));
}

void Executor::set_profiling(bool on) {
  sync();
  profiling_.store(on, std::memory_order_relaxed);
}

std::vector<ProfileRow> Executor::profile_snapshot() {
  sync();
  std::lock_guard<std::mutex> lk(prof_mu_);
  return prof_rows_;
}

void Executor::profile_reset() {
  sync();
  std::lock_guard<std::mutex> lk(prof_mu_);
  prof_rows_.clear();
  prof_index_.clear();
}

void Executor::submit(std::function<void()> fn, std::vector<std::shared_ptr<Storage>> inputs,
                      std::vector<std::shared_ptr<Storage>> outputs, std::string label) {
  const size_t bytes = t_allocated;
  t_allocated = 0;
  for (auto& s : outputs)
    if (s && s->meta) return;  // shape-only tensors: nothing to compute
  for (auto& s : inputs)
    if (s && s->meta) return;
  Task t{std::move(fn), std::move(inputs), std::move(outputs), 0, std::move(label)};
  if (inline_) {
    if (profiling()) run_timed(t);
    else run_task(t);
    inline_ran_++;
    return;
  }
  t.bytes = bytes;
  bool wake, over;
  {
    std::lock_guard<std::mutex> lk(mu_);
    inflight_ += t.bytes;
    queue_.push_back(std::move(t));
    submitted_++;
    queued_.store(submitted_, std::memory_order_release);
    wake = sleeping_;
    over = inflight_limit_ != 0 && inflight_ > inflight_limit_;
  }
  if (wake) cv_.notify_one();  // no futex call while the executor is awake (bursts of ops)
  if (over && std::this_thread::get_id() != thread_.get_id()) {
    std::unique_lock<std::mutex> lk(mu_);
    throttled_++;
    throttle_cv_.wait(lk, [&] { return inflight_ <= inflight_limit_ / 2 || submitted_ - completed_ <= 1; });
    throttled_--;
  }
}

void Executor::after(std::function<void()> fn) { submit(std::move(fn), {}, {}, profiling() ? "(after)" : ""); }

void Executor::sync() {
  bool epoch;
  if (inline_) {
    epoch = inline_ran_.exchange(0) != 0;
  } else {
    std::unique_lock<std::mutex> lk(mu_);
    uint64_t target = submitted_;
    done_cv_.wait(lk, [&] { return completed_ >= target; });
    epoch = completed_ != epoch_mark_;  // some work ran since the last epoch
    epoch_mark_ = completed_;
  }
  if (epoch) host_cache_epoch();
}

void Executor::sync_point() {
  bool epoch;
  {
    std::lock_guard<std::mutex> lk(mu_);
    epoch = completed_ != epoch_mark_;  // completed_ counts every task before the caller's
    epoch_mark_ = completed_;
  }
  if (epoch) host_cache_epoch();
}

size_t Executor::pending() {
  std::lock_guard<std::mutex> lk(mu_);
  return static_cast<size_t>(submitted_ - completed_);
}

void Executor::loop() {
  for (;;) {
    Task t;
    const bool prof = profiling();
    Clock::time_point idle0;
    if (prof) idle0 = Clock::now();
    // Wait for the next op: spin for the learned budget (JS records ops microseconds apart, and the next
    // burst often follows within a millisecond), then sleep; see spin.h.
    const int64_t wait0 = spin_now_ns();
    const bool waited = queued_.load(std::memory_order_acquire) == taken_;
    if (waited) {
      const int64_t deadline = wait0 + budget_.ns();
      const SpinEnd end = spin_wait([&] { return queued_.load(std::memory_order_acquire) != taken_; },
                                    [&] { return deadline; }, [] { return false; });
      if (end == SpinEnd::kPreempted) budget_.preempted();
    }
    bool slept = false;
    {
      std::unique_lock<std::mutex> lk(mu_);
      if (queue_.empty() && !stop_) {
        sleeping_ = true;
        pool_executor_idle();  // nothing is coming: the pool's workers stop spinning too
        cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
        sleeping_ = false;
        slept = true;
      }
      if (queue_.empty()) return;  // stop requested and drained
      t = std::move(queue_.front());
      queue_.pop_front();
      taken_++;
    }
    if (slept) pool_executor_awake();  // the workers' wake-up now overlaps this task's start
    if (waited) budget_.learn(spin_now_ns() - wait0, slept);
    if (prof) profile_add("(idle)", ms_between(idle0, Clock::now()));  // waited with nothing queued
    if (profiling()) {  // re-read: set_profiling may have switched it on while this thread waited
      run_timed(t);
    } else {
      run_task(t);
    }
    const size_t bytes = t.bytes;
    t = Task{};  // drop storage references before reporting completion
    bool resume;
    {
      std::lock_guard<std::mutex> lk(mu_);
      completed_++;
      inflight_ -= bytes;
      resume = throttled_ > 0 && (inflight_ <= inflight_limit_ / 2 || submitted_ - completed_ <= 1);
    }
    done_cv_.notify_all();
    if (resume) throttle_cv_.notify_all();
  }
}

Executor& executor() {
  static Executor* e = new Executor();  // leaked on purpose: outlives static destructors of callers
  return *e;
}

}  // namespace nx
