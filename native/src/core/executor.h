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
#pragma once
#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "tensor.h"

namespace nx {

class Executor {
 public:
  Executor();
  ~Executor();
  // Queue fn. Storages in `inputs` are checked for errors before fn runs; `outputs` receive errors.
  void submit(std::function<void()> fn, std::vector<std::shared_ptr<Storage>> inputs,
              std::vector<std::shared_ptr<Storage>> outputs);
  // Queue a callback that runs on the executor thread once all earlier work finished.
  void after(std::function<void()> fn);
  // Block the caller until all work queued so far has run.
  void sync();
  // Inline mode (NX_SYNC=1): run every task on the caller's thread at submit time (debugging).
  bool inline_mode() const { return inline_; }
  size_t pending();

 private:
  struct Task {
    std::function<void()> fn;
    std::vector<std::shared_ptr<Storage>> inputs, outputs;
  };
  void loop();
  static void run_task(Task& t);

  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::deque<Task> queue_;
  uint64_t submitted_ = 0, completed_ = 0;
  std::atomic<uint64_t> queued_{0};  // == submitted_, readable without the lock
  uint64_t taken_ = 0;               // tasks the executor has dequeued (executor thread only)
  bool sleeping_ = false;
  bool stop_ = false;
  bool inline_ = false;
  std::thread thread_;
};

Executor& executor();

}  // namespace nx
