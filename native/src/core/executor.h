// executor.h: the in-order stream that runs kernels off the JS thread.
//
// Ops are validated and their outputs allocated synchronously on the caller's thread (so shape and
// dtype errors throw at once), then the computation is queued here and run in FIFO order on one
// executor thread, which fans each kernel out over the thread pool. This is the CPU counterpart of a
// CUDA stream: JS keeps recording while kernels run, and only reads (`data()`) wait.
//
//   nx::executor().submit([=] { kernel(...); }, outputs);
//   nx::executor().sync();                         // block until everything queued so far ran
//   nx::executor().after([] { /* on executor thread */ });
//
// A task that throws marks its outputs' storages with the error; a task whose inputs carry an error
// passes it on instead of running. Readers see the error when they read. Nothing else stops.
//
// Recording is bounded in bytes: outputs are allocated when an op is recorded, and a long pass (a
// 128-token prefill) records in a few milliseconds what takes the kernels a second, so without a bound
// every intermediate of the whole pass would be allocated at once (hundreds of MB for a 1B model). Each
// task counts the host bytes Storage::allocate handed out on the submitting thread since its previous
// submit (its fresh outputs; an in-place write into an existing tensor, such as a KV-cache append,
// counts nothing). Once the tasks queued and not yet run hold more than NX_INFLIGHT_MB (default 16;
// 0 = no bound), submit() waits until the executor has run them down to half of that, or down to the one
// task it is running (outputs of several MB, as in a batched prefill, pass the bound one op at a time:
// waiting for an empty queue left the executor idle while JS recorded the next op, ~1% of an 8x128
// GPT-2 prefill). Waiting costs no throughput: the queue still holds work while recording refills it.
// The executor thread itself is never made to wait.
//
// Waiting: with nothing queued the executor thread spins for a learned budget (at most NX_SPIN_US, default
// 2 ms; none while other threads wait for a CPU), then sleeps; it tells the thread pool when it sleeps and
// wakes, so the pool's workers sleep and wake with it (spin.h, pool.h).
//
// Profiling (NX_PROFILE=1, or set_profiling(true)): the executor times every task it runs and adds the
// wall time to a table keyed by the label the submitter gave (op name and shape class, see ops.cpp),
// plus "(idle)": time the executor waited for work with nothing queued (JS recording slower than the
// kernels, or nothing to do). Off, it costs one branch per task; labels are built only when on.
// profile_snapshot() returns the table; profile_reset() clears it.
#pragma once
#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "spin.h"
#include "tensor.h"

namespace nx {

// One row of the profile: a label, how many tasks had it, their total and longest wall time.
struct ProfileRow {
  std::string label;
  uint64_t calls = 0;
  double total_ms = 0, max_ms = 0;
};

class Executor {
 public:
  Executor();
  ~Executor();
  // Queue fn. Storages in `inputs` are checked for errors before fn runs; `outputs` receive errors.
  // `label` names the task in the profile (only read while profiling is on; may be empty).
  void submit(std::function<void()> fn, std::vector<std::shared_ptr<Storage>> inputs,
              std::vector<std::shared_ptr<Storage>> outputs, std::string label = {});
  // Queue a callback that runs on the executor thread once all earlier work finished.
  void after(std::function<void()> fn);
  // Block the caller until all work queued so far has run.
  void sync();
  // What sync() does once the work is done (the host allocation cache's epoch), for a task queued with
  // after() that stands in for a sync: call it from that task, on the executor thread.
  void sync_point();
  // Inline mode (NX_SYNC=1): run every task on the caller's thread at submit time (debugging).
  bool inline_mode() const { return inline_; }
  size_t pending();

  // Profiling (see the header comment). Reading and resetting sync() first, so the table is complete.
  static bool profiling() { return profiling_.load(std::memory_order_relaxed); }
  void set_profiling(bool on);
  std::vector<ProfileRow> profile_snapshot();
  void profile_reset();

 private:
  struct Task {
    std::function<void()> fn;
    std::vector<std::shared_ptr<Storage>> inputs, outputs;
    size_t bytes = 0;  // host bytes allocated for this task (in inflight_ until it completed)
    std::string label;  // profile label (empty unless profiling)
  };
  void loop();
  static void run_task(Task& t);
  void run_timed(Task& t);
  void profile_add(const std::string& label, double ms);

  static std::atomic<bool> profiling_;
  std::mutex prof_mu_;
  std::vector<ProfileRow> prof_rows_;
  std::unordered_map<std::string, size_t> prof_index_;

  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::deque<Task> queue_;
  uint64_t submitted_ = 0, completed_ = 0;
  std::atomic<uint64_t> queued_{0};  // == submitted_, readable without the lock
  uint64_t epoch_mark_ = 0;          // completed_ at the last host-cache epoch (sync)
  std::atomic<uint64_t> inline_ran_{0};  // NX_SYNC=1: tasks run since the last sync
  uint64_t taken_ = 0;               // tasks the executor has dequeued (executor thread only)
  size_t inflight_ = 0;              // sum of Task::bytes of tasks not yet completed
  size_t inflight_limit_ = 0;        // 0 = unbounded
  int throttled_ = 0;                // submitters waiting on throttle_cv_ for inflight_ <= limit / 2
  std::condition_variable throttle_cv_;
  bool sleeping_ = false;
  SpinBudget budget_;  // how long loop() spins for the next op before sleeping (spin.h)
  bool stop_ = false;
  bool inline_ = false;
  std::thread thread_;
};

Executor& executor();

// Called by Storage::allocate: host bytes handed out on this thread, counted by its next submit().
void note_host_allocation(size_t bytes);

}  // namespace nx
