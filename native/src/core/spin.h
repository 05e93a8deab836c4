// spin.h: adaptive spin-then-sleep for the threads that wait for work arriving in bursts: the executor
// waiting for the next op (executor.cpp) and the pool's workers waiting for the next parallel region
// (threadpool.cpp).
//
// Why: waking a sleeping thread on this kind of machine (a 2-vCPU KVM guest) costs the waker a 5-15 us
// futex syscall, and the sleeper runs 3-50 us later on a quiet machine, 100-200 us later on a loaded one,
// so a multi-threaded kernel that starts after a pause runs on one thread until the other arrives. A fixed
// short spin (the old 1000 and 2000 `pause`s, ~25-80 us depending on load) missed gaps a little longer
// than itself (a bench loop's round trip through the event loop, the JS work between two decode steps); a
// fixed long spin would burn CPU in an idle process and take cores from the other processes of a machine
// that shares them.
//
// So every waiter spins for a learned budget after its last work, then sleeps:
//   - a wait that slept and was woken within the maximum (spin_max_ns) was a gap worth spinning through:
//     the budget grows to cover it (at least doubled, and 1.25x the gap);
//   - a wait longer than the maximum (the process went idle) halves the budget, down to kMinNs;
//   - a spin that lost its core (the clock jumped by more than kPreemptedNs between two checks: another
//     runnable thread, of this process or another, needed the core) stops at once, sleeps, and halves the
//     budget;
//   - while more threads are runnable than the machine has CPUs (cpu_contended()), waiters do not spin at
//     all and the budget does not grow: spinning then only delays a thread with real work. The check
//     above is not enough, because the scheduler does not preempt a spinner at once when a thread wakes,
//     so a spinner rarely notices that it is in the way: with it alone, three processes sharing the 2
//     cores (bench/remote-load.mjs) served 15% fewer requests than with the old fixed spins, their model
//     worker using 40% more CPU; with this one too, as many as with the old spins, or with none.
// An idle process therefore spins at most NX_SPIN_US per thread after its last op, then burns nothing.
#pragma once
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>

namespace nx {

inline int64_t spin_now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

inline void cpu_pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();  // not sched_yield: a syscall per check, and it gives the core away for nothing
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// The most a waiter spins after the last activity: NX_SPIN_US (microseconds; default 2000; 0 = never
// spin, every wait sleeps at once). Read once.
inline int64_t spin_max_ns() {
  static const int64_t v = [] {
    const char* s = std::getenv("NX_SPIN_US");
    int64_t us = s && *s ? std::atoll(s) : 2000;
    return std::max<int64_t>(0, us) * 1000;
  }();
  return v;
}

// Whether threads are waiting for a CPU right now: the kernel's count of runnable tasks on the machine
// (/proc/loadavg, the caller included) above the number of CPUs. Sampled at most every 250 us (a read of
// /proc costs a few microseconds), so the answer may be that old. (The CPU pressure in /proc/pressure/cpu
// would say the same over time, but its running total is only brought up to date every ~2 s.) False where
// /proc is unreadable. Implemented in threadpool.cpp.
bool cpu_contended();

class SpinBudget {
 public:
  static constexpr int64_t kMinNs = 20000;        // covers JS recording back-to-back ops (a few us apart)
  static constexpr int64_t kPreemptedNs = 50000;  // a clock jump this large means the thread lost its core

  int64_t ns() const {
    const int64_t b = std::min(budget_.load(std::memory_order_relaxed), spin_max_ns());
    return cpu_contended() ? 0 : b;
  }

  // A wait ended after `gap_ns` of quiet; `slept`: the spin had given up before work arrived.
  void learn(int64_t gap_ns, bool slept) {
    const int64_t mx = spin_max_ns();
    if (!slept || mx == 0) return;  // the spin caught it: the budget is right
    if (gap_ns <= mx && cpu_contended()) return;  // a longer spin would only take a core someone waits for
    int64_t b = budget_.load(std::memory_order_relaxed);
    if (gap_ns <= mx)
      b = std::min(mx, std::max(b * 2, gap_ns + gap_ns / 4));
    else
      b = std::max(kMinNs, b / 2);
    budget_.store(b, std::memory_order_relaxed);
  }
  void preempted() {
    budget_.store(std::max(kMinNs, budget_.load(std::memory_order_relaxed) / 2), std::memory_order_relaxed);
  }

 private:
  std::atomic<int64_t> budget_{kMinNs * 2};
};

enum class SpinEnd { kReady, kTimeout, kPreempted };

// Spin until ready() holds (kReady), `deadline()` (re-read, so others may extend it) passes or stop()
// holds (kTimeout), or the thread was descheduled mid-spin (kPreempted).
template <class Ready, class Deadline, class Stop>
SpinEnd spin_wait(Ready ready, Deadline deadline, Stop stop) {
  int64_t last = spin_now_ns();
  for (;;) {
    for (int i = 0; i < 16; i++) {  // ~0.5 us of pauses between clock reads
      if (ready()) return SpinEnd::kReady;
      cpu_pause();
    }
    const int64_t now = spin_now_ns();
    if (now - last > SpinBudget::kPreemptedNs) return ready() ? SpinEnd::kReady : SpinEnd::kPreempted;
    last = now;
    if (now >= deadline() || stop()) return ready() ? SpinEnd::kReady : SpinEnd::kTimeout;
  }
}

}  // namespace nx
