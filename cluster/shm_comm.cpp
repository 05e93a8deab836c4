// shm_comm.cpp: the shared-memory communicator (see communicator.h) for the processes of one machine.
//
// Segment: one file in /dev/shm (else $TMPDIR or /tmp; NX_SHM_DIR overrides), mapped by every rank:
//
//   Header   magic, world, slot size, the abort word and message, the futex word, and per rank: pid,
//            "left" flag, barrier counter, and two call descriptors (kind, dtype, shape, root/dim, seq)
//   data     world x 2 staging slots of slot_bytes each (slot(rank, parity))
//
// Joining: rank 0 writes the header into "<name>.init.<pid>" and link()s it to "<name>" (so a name that
// is in use fails instead of being replaced, and nobody sees a half-written header); the others poll for
// "<name>", check magic and world size, and claim their rank's pid slot. After the join barrier rank 0
// unlinks the file: the mappings outlive it, so a crash never leaves a segment behind.
//
// Barriers: rank r stores "I reached barrier k" into its own counter; it is complete when every
// counter is >= k (counters only grow, so nothing is reset). Waiting spins briefly, yields, then sleeps
// on a futex word that the rank completing a barrier (or aborting) bumps and wakes. Every 20 ms of
// sleep a waiter checks the ranks that are behind: one whose process is gone (kill(pid, 0), or a zombie
// in /proc) or that closed its communicator fails the wait with COMM; none after timeout_ms: TIMEOUT.
// Any failure inside a collective also aborts the group (the abort word + message), so the peers fail
// at once with COMM naming the first cause instead of waiting for the timeout.
//
// Collectives go in rounds of at most slot_bytes per rank; round i uses slot parity i % 2, so a rank may
// fill its next slot while slow peers still read the previous one (the barrier of round i+1 proves they
// finished reading round i-1). Per round:
//   all_reduce  write my piece | barrier | sum chunk r of every rank's piece (f32 accumulation, rank
//               order: every rank gets bit-identical results) into my slot | barrier | copy every chunk
//   all_gather  write my piece | barrier | copy every rank's piece into its place in the output
//   broadcast   root writes | barrier | the others copy
//   barrier     barrier
// The first round of each call also publishes the call's descriptor (double-buffered like the data); after
// its barrier every rank compares all descriptors, so a disagreement fails all ranks with the same error.
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#endif

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include "../native/src/core/executor.h"
#include "../native/src/core/ops.h"
#include "communicator.h"

namespace nx {
namespace cluster {

namespace {

constexpr uint64_t kMagic = 0x3150544d4853584eULL;  // "NXSHMTP1"
constexpr uint32_t kVersion = 1;
constexpr int kMaxWorld = 64;

struct Desc {
  uint32_t kind;
  int32_t dtype;
  int32_t ndim;
  int32_t arg;  // all_gather: dim; broadcast: root
  uint64_t seq;
  int64_t shape[kMaxDims];
};

struct alignas(64) RankState {
  std::atomic<int32_t> pid;       // 0 until the rank joined
  std::atomic<int32_t> left;      // 1 once the rank closed its communicator
  std::atomic<uint64_t> arrived;  // barriers this rank reached
  Desc desc[2];                   // the current call's descriptor, by slot parity
};

struct alignas(64) Header {
  uint64_t magic;
  uint32_t version;
  uint32_t world;
  uint64_t slot_bytes;
  uint64_t data_offset;
  uint64_t total_bytes;
  std::atomic<uint32_t> wake;       // futex word: bumped when a barrier completes or the group aborts
  std::atomic<uint32_t> sleepers;   // waiters inside futex_wait (the completer skips the syscall at 0)
  std::atomic<int32_t> abort_claim; // 1 once some rank started writing the abort message
  std::atomic<int32_t> aborted_by;  // rank + 1 of the rank that aborted (set after the message)
  char abort_msg[512];
  RankState ranks[kMaxWorld];
};

static_assert(std::atomic<uint32_t>::is_always_lock_free && std::atomic<uint64_t>::is_always_lock_free,
              "the shared-memory communicator needs address-free (lock-free) atomics");

void futex_wait(std::atomic<uint32_t>* word, uint32_t expect, int ms) {
#if defined(__linux__)
  timespec ts{ms / 1000, static_cast<long>(ms % 1000) * 1000000L};
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, expect, &ts, nullptr, 0);
#else
  (void)word;
  (void)expect;
  std::this_thread::sleep_for(std::chrono::milliseconds(1));
  (void)ms;
#endif
}

void futex_wake_all(std::atomic<uint32_t>* word) {
#if defined(__linux__)
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
#else
  (void)word;
#endif
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Whether process pid still runs (a zombie, dead but not yet reaped by its parent, counts as gone).
bool pid_alive(int32_t pid) {
  if (pid <= 0) return false;
  if (kill(pid, 0) != 0 && errno == ESRCH) return false;
#if defined(__linux__)
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  std::string s;
  if (f && std::getline(f, s)) {
    size_t p = s.rfind(')');
    if (p != std::string::npos && p + 2 < s.size()) {
      char state = s[p + 2];
      if (state == 'Z' || state == 'X') return false;
    }
  }
#endif
  return true;
}

std::string shm_dir() {
  if (const char* d = std::getenv("NX_SHM_DIR"); d && *d) return d;
  struct stat st;
  if (stat("/dev/shm", &st) == 0 && S_ISDIR(st.st_mode) && access("/dev/shm", W_OK) == 0) return "/dev/shm";
  if (const char* t = std::getenv("TMPDIR"); t && *t) return t;
  return "/tmp";
}

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::string desc_str(const Desc& d) {
  std::ostringstream os;
  os << collective_name(static_cast<int>(d.kind));
  if (d.kind == kBarrier) return os.str();
  os << " " << dtype_name(static_cast<DType>(d.dtype)) << " [";
  for (int i = 0; i < d.ndim; i++) os << (i ? ", " : "") << d.shape[i];
  os << "]";
  if (d.kind == kAllGather) os << " dim " << d.arg;
  if (d.kind == kBroadcast) os << " root " << d.arg;
  return os.str();
}

class ShmCommunicator final : public Communicator {
 public:
  ShmCommunicator(const std::string& name, int rank, int world, const CommOptions& opts)
      : Communicator(rank, world), name_(name), opts_(opts) {
    join();
  }
  ~ShmCommunicator() override {
    if (h_) {
      leave();
      munmap(h_, map_bytes_);
    }
  }

  const char* backend() const override { return "shm"; }
  int device() const override { return -1; }

  void all_reduce_sum_(const Tensor& t) override {
    check_collective_input(t, -1, "all_reduce", true);
    NX_CHECK(dtype_is_float(t.dtype) || t.dtype == DType::I32 || t.dtype == DType::I64, "DTYPE",
             "all_reduce sums float32, float16, bfloat16, int32 or int64 tensors, not " << dtype_name(t.dtype));
    throw_if_broken();
    const uint64_t seq = ++seq_;
    auto self = std::static_pointer_cast<ShmCommunicator>(shared_from_this());
    Tensor x = t;
    enqueue([self, x, seq] { self->run_all_reduce(x, seq); }, x.storage);
  }

  Tensor all_gather(const Tensor& t, int dim) override {
    check_collective_input(t, -1, "all_gather", false);
    throw_if_broken();
    Shape out_shape = gathered_shape(t, world_, &dim);
    Tensor x = t.is_contiguous() ? t : run_op(Op::CAST, {&t}, {static_cast<double>(static_cast<int>(t.dtype))})[0];
    Tensor out = Tensor::empty(out_shape, t.dtype);
    const uint64_t seq = ++seq_;
    auto self = std::static_pointer_cast<ShmCommunicator>(shared_from_this());
    enqueue([self, x, out, dim, seq] { self->run_all_gather(x, out, dim, seq); }, out.storage, x.storage);
    return out;
  }

  void broadcast_(const Tensor& t, int root) override {
    check_collective_input(t, -1, "broadcast", true);
    NX_CHECK(root >= 0 && root < world_, "BAD_INPUT", "broadcast: root " << root << " is not a rank of this group of " << world_);
    throw_if_broken();
    const uint64_t seq = ++seq_;
    auto self = std::static_pointer_cast<ShmCommunicator>(shared_from_this());
    Tensor x = t;
    enqueue([self, x, root, seq] { self->run_broadcast(x, root, seq); }, x.storage);
  }

  Tensor barrier() override {
    throw_if_broken();
    Tensor token = Tensor::empty({1}, DType::F32, /*real=*/true);
    const uint64_t seq = ++seq_;
    auto self = std::static_pointer_cast<ShmCommunicator>(shared_from_this());
    enqueue([self, token, seq] { self->run_barrier(token, seq); }, token.storage);
    return token;
  }

  void abort(const std::string& why) override {
    fail(Error("COMM", "rank " + std::to_string(rank_) + " aborted the group: " + why));
    abort_group(why);
  }

  void close() override {
    auto self = std::static_pointer_cast<ShmCommunicator>(shared_from_this());
    executor().after([self] { self->leave(); });
  }

 private:
  // ---- queueing ----
  // The task always runs (an input error must not leave the peers waiting for this rank): it checks the
  // input itself and aborts the group when it carries an error.
  void enqueue(std::function<void()> fn, std::shared_ptr<Storage> out, std::shared_ptr<Storage> in = nullptr) {
    auto self = std::static_pointer_cast<ShmCommunicator>(shared_from_this());
    std::shared_ptr<Storage> probe = in ? in : out;
    executor().submit(
        [self, fn = std::move(fn), probe] {
          if (auto e = probe->get_error()) {
            self->fail(*e);
            self->abort_group("the input of its collective failed earlier: " + std::string(e->what()));
            throw Error(e->code, e->what());
          }
          try {
            self->throw_if_broken();
            fn();
          } catch (const Error& e) {
            const Error& first = self->fail(e);
            self->abort_group(first.what());
            throw;
          }
        },
        {}, {out});
  }

  // ---- joining and leaving ----
  void join() {
    NX_CHECK(world_ >= 1 && world_ <= kMaxWorld, "BAD_INPUT", "world size " << world_ << " must be between 1 and " << kMaxWorld);
    NX_CHECK(rank_ >= 0 && rank_ < world_, "BAD_INPUT", "rank " << rank_ << " is not in [0, " << world_ << ")");
    NX_CHECK(!name_.empty() && name_.size() <= 200 && name_.find_first_not_of(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") == std::string::npos && name_[0] != '.',
             "BAD_INPUT", "group name \"" << name_ << "\" must be 1-200 characters of [A-Za-z0-9._-], not starting with '.'");
    const std::string path = shm_dir() + "/" + name_;
    const int64_t deadline = now_ms() + opts_.timeout_ms;
    int fd = -1;
    if (rank_ == 0) {
      size_t slot = (std::max<size_t>(opts_.slot_bytes, 64) + 63) / 64 * 64;
      size_t data_off = (sizeof(Header) + 4095) / 4096 * 4096;
      size_t total = data_off + static_cast<size_t>(world_) * 2 * slot;
      const std::string tmp = path + ".init." + std::to_string(getpid());
      fd = open(tmp.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
      NX_CHECK(fd >= 0, "IO", "cannot create the shared-memory segment " << tmp << ": " << std::strerror(errno));
      if (ftruncate(fd, static_cast<off_t>(total)) != 0) {
        int err = errno;
        ::close(fd);
        unlink(tmp.c_str());
        NX_FAIL("IO", "cannot size the shared-memory segment " << tmp << " to " << total << " bytes: " << std::strerror(err));
      }
      void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
      if (p == MAP_FAILED) {
        int err = errno;
        ::close(fd);
        unlink(tmp.c_str());
        NX_FAIL("IO", "cannot map the shared-memory segment " << tmp << ": " << std::strerror(err));
      }
      h_ = static_cast<Header*>(p);
      map_bytes_ = total;
      h_->version = kVersion;
      h_->world = static_cast<uint32_t>(world_);
      h_->slot_bytes = slot;
      h_->data_offset = data_off;
      h_->total_bytes = total;
      h_->ranks[0].pid.store(static_cast<int32_t>(getpid()));
      std::atomic_thread_fence(std::memory_order_seq_cst);
      h_->magic = kMagic;
      const int linked = link(tmp.c_str(), path.c_str());
      const int link_err = errno;
      unlink(tmp.c_str());
      ::close(fd);
      if (linked != 0) {
        munmap(h_, map_bytes_);
        h_ = nullptr;
        if (link_err == EEXIST) NX_FAIL("BAD_INPUT", "a communicator group named \"" << name_ << "\" already exists (" << path << "); every group needs a fresh name");
        NX_FAIL("IO", "cannot publish the shared-memory segment " << path << ": " << std::strerror(link_err));
      }
    } else {
      for (;;) {
        fd = open(path.c_str(), O_RDWR);
        if (fd >= 0) break;
        NX_CHECK(errno == ENOENT, "IO", "cannot open the shared-memory segment " << path << ": " << std::strerror(errno));
        NX_CHECK(now_ms() < deadline, "TIMEOUT",
                 "rank " << rank_ << ": rank 0 did not create the group \"" << name_ << "\" within " << opts_.timeout_ms << " ms");
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
      }
      struct stat st;
      if (fstat(fd, &st) != 0 || static_cast<size_t>(st.st_size) < sizeof(Header)) {
        ::close(fd);
        NX_FAIL("BAD_INPUT", "\"" << path << "\" is not a communicator segment (too small)");
      }
      void* p = mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
      ::close(fd);
      NX_CHECK(p != MAP_FAILED, "IO", "cannot map the shared-memory segment " << path << ": " << std::strerror(errno));
      h_ = static_cast<Header*>(p);
      map_bytes_ = static_cast<size_t>(st.st_size);
      std::atomic_thread_fence(std::memory_order_seq_cst);
      if (h_->magic != kMagic || h_->version != kVersion || h_->total_bytes != map_bytes_) {
        munmap(h_, map_bytes_);
        h_ = nullptr;
        NX_FAIL("BAD_INPUT", "\"" << path << "\" is not a communicator segment of this version");
      }
      if (static_cast<int>(h_->world) != world_) {
        const int w = static_cast<int>(h_->world);
        munmap(h_, map_bytes_);
        h_ = nullptr;
        NX_FAIL("BAD_INPUT", "world size mismatch: rank 0 created group \"" << name_ << "\" for " << w << " ranks, rank " << rank_
                                                                         << " was started with a world of " << world_);
      }
      int32_t expect = 0;
      if (!h_->ranks[rank_].pid.compare_exchange_strong(expect, static_cast<int32_t>(getpid()))) {
        munmap(h_, map_bytes_);
        h_ = nullptr;
        NX_FAIL("BAD_INPUT", "rank " << rank_ << " joined group \"" << name_ << "\" twice (pid " << expect << " holds it)");
      }
    }
    try {
      wait_barrier("joining", 0, true);
    } catch (...) {
      if (rank_ == 0) unlink(path.c_str());
      leave();
      munmap(h_, map_bytes_);
      h_ = nullptr;
      throw;
    }
    if (rank_ == 0) unlink(path.c_str());
  }

  void leave() {
    if (!h_ || left_) return;
    left_ = true;
    h_->ranks[rank_].left.store(1);
    h_->wake.fetch_add(1);
    futex_wake_all(&h_->wake);
  }

  void abort_group(const std::string& why) {
    if (!h_) return;
    int32_t expect = 0;
    if (h_->abort_claim.compare_exchange_strong(expect, 1)) {
      std::snprintf(h_->abort_msg, sizeof h_->abort_msg, "%s", why.c_str());
      h_->aborted_by.store(rank_ + 1);
    }
    h_->wake.fetch_add(1);
    futex_wake_all(&h_->wake);
  }

  // ---- barriers ----
  bool all_arrived(uint64_t target) const {
    for (int q = 0; q < world_; q++)
      if (h_->ranks[q].arrived.load() < target) return false;
    return true;
  }

  void check_abort() const {
    const int32_t by = h_->aborted_by.load();
    if (by == 0) return;
    char msg[sizeof h_->abort_msg];
    std::memcpy(msg, h_->abort_msg, sizeof msg);
    msg[sizeof msg - 1] = 0;
    if (by - 1 == rank_) throw Error("COMM", std::string("this rank aborted the group earlier: ") + msg);
    throw Error("COMM", "rank " + std::to_string(by - 1) + " aborted the group: " + msg);
  }

  void check_peers(uint64_t target, const char* what, uint64_t seq, bool joining) const {
    for (int q = 0; q < world_; q++) {
      const RankState& s = h_->ranks[q];
      if (q == rank_ || s.arrived.load() >= target) continue;
      if (s.left.load()) {
        NX_FAIL("COMM", "rank " << q << " left the group (closed its communicator) while rank " << rank_ << " waited in " << what
                                << (joining ? "" : " #") << (joining ? "" : std::to_string(seq)));
      }
      const int32_t pid = s.pid.load();
      if (pid == 0) continue;  // not joined yet
      if (!pid_alive(pid)) {
        NX_FAIL("COMM", "rank " << q << " (pid " << pid << ") exited while rank " << rank_ << " waited in " << what
                                << (joining ? "" : " #") << (joining ? "" : std::to_string(seq)));
      }
    }
  }

  // Arrive at the next barrier and wait for every rank (see the file comment).
  void wait_barrier(const char* what, uint64_t seq, bool joining = false) {
    const uint64_t target = ++barriers_;
    const int64_t start = now_ms();
    check_abort();
    h_->ranks[rank_].arrived.store(target);
    if (all_arrived(target)) {
      h_->wake.fetch_add(1);
      if (h_->sleepers.load() > 0) futex_wake_all(&h_->wake);
      return;
    }
    for (int spin = 0;; spin++) {
      if (all_arrived(target)) return;
      check_abort();
      if (spin < 256) {
        cpu_relax();
        continue;
      }
      if (spin < 320) {
        sched_yield();
        continue;
      }
      check_peers(target, what, seq, joining);
      if (now_ms() - start > opts_.timeout_ms) {
        std::ostringstream late;
        int n = 0;
        for (int q = 0; q < world_; q++)
          if (h_->ranks[q].arrived.load() < target) late << (n++ ? ", " : "") << q;
        if (joining)
          NX_FAIL("TIMEOUT", "rank(s) " << late.str() << " did not join group \"" << name_ << "\" within " << opts_.timeout_ms << " ms");
        NX_FAIL("TIMEOUT", "rank(s) " << late.str() << " did not reach " << what << " #" << seq << " within " << opts_.timeout_ms
                                      << " ms (rank " << rank_ << " waited)");
      }
      h_->sleepers.fetch_add(1);
      const uint32_t w = h_->wake.load();
      if (!all_arrived(target) && h_->aborted_by.load() == 0) futex_wait(&h_->wake, w, 20);
      h_->sleepers.fetch_sub(1);
    }
  }

  // ---- slots and descriptors ----
  char* slot(int q, int parity) const {
    return reinterpret_cast<char*>(h_) + h_->data_offset + (static_cast<size_t>(q) * 2 + static_cast<size_t>(parity)) * h_->slot_bytes;
  }
  // The slot parity of the next round.
  int next_round() { return static_cast<int>(rounds_++ % 2); }

  void publish(int parity, uint32_t kind, const Tensor* t, int arg, uint64_t seq) {
    Desc& d = h_->ranks[rank_].desc[parity];
    std::memset(&d, 0, sizeof d);
    d.kind = kind;
    d.arg = arg;
    d.seq = seq;
    if (t) {
      d.dtype = static_cast<int32_t>(t->dtype);
      d.ndim = t->ndim();
      for (int i = 0; i < t->ndim() && i < kMaxDims; i++) d.shape[i] = t->shape[i];
    }
  }

  // After the first barrier of a call: every rank must have published the same call as rank 0. Every
  // rank reads the same descriptors, so all of them fail, with the same message, or none does.
  void compare(int parity) const {
    const Desc& d0 = h_->ranks[0].desc[parity];
    for (int q = 1; q < world_; q++) {
      const Desc& dq = h_->ranks[q].desc[parity];
      if (std::memcmp(&dq, &d0, sizeof d0) == 0) continue;
      std::ostringstream os;
      os << "the ranks disagree on a collective: rank 0 called " << desc_str(d0) << " (call #" << d0.seq << "), rank " << q
         << " called " << desc_str(dq) << " (call #" << dq.seq << ")";
      if (d0.kind != dq.kind || d0.arg != dq.arg || d0.seq != dq.seq)
        throw Error("BAD_INPUT", os.str() + "; every rank must issue the same collectives in the same order");
      if (d0.dtype != dq.dtype) throw Error("DTYPE", os.str());
      throw Error("SHAPE", os.str());
    }
  }

  // ---- the collectives (executor thread) ----
  void run_all_reduce(const Tensor& t, uint64_t seq) {
    const size_t esz = dtype_size(t.dtype);
    const int64_t n = t.numel();
    char* data = static_cast<char*>(t.data());
    const int64_t per_round = std::max<int64_t>(1, static_cast<int64_t>(h_->slot_bytes / esz));
    bool first = true;
    int64_t e0 = 0;
    do {
      const int64_t m = std::min(per_round, n - e0);
      const int b = next_round();
      std::memcpy(slot(rank_, b), data + e0 * static_cast<int64_t>(esz), static_cast<size_t>(m) * esz);
      if (first) publish(b, kAllReduce, &t, 0, seq);
      wait_barrier("all_reduce", seq);
      if (first) compare(b);
      first = false;
      const int64_t c0 = m * rank_ / world_, c1 = m * (rank_ + 1) / world_;
      reduce_chunk(b, t.dtype, c0, c1);
      wait_barrier("all_reduce", seq);
      for (int q = 0; q < world_; q++) {
        const int64_t q0 = m * q / world_, q1 = m * (q + 1) / world_;
        if (q1 > q0)
          std::memcpy(data + (e0 + q0) * static_cast<int64_t>(esz), slot(q, b) + q0 * static_cast<int64_t>(esz), static_cast<size_t>(q1 - q0) * esz);
      }
      e0 += m;
    } while (e0 < n);
  }

  // Elements [c0, c1) of this round: the sum over ranks (in rank order) written into my slot.
  void reduce_chunk(int b, DType dt, int64_t c0, int64_t c1) {
    if (c1 <= c0) return;
    char* out = slot(rank_, b);
    if (dt == DType::F32) {
      float* o = reinterpret_cast<float*>(out);
      const float* s0 = reinterpret_cast<const float*>(slot(0, b));
      for (int64_t i = c0; i < c1; i++) {
        float acc = s0[i];
        for (int q = 1; q < world_; q++) acc += reinterpret_cast<const float*>(slot(q, b))[i];
        o[i] = acc;
      }
    } else if (dt == DType::F16 || dt == DType::BF16) {
      for (int64_t i = c0; i < c1; i++) {
        float acc = load_f32(slot(0, b), dt, i);
        for (int q = 1; q < world_; q++) acc += load_f32(slot(q, b), dt, i);
        store_f32(out, dt, i, acc);
      }
    } else {
      for (int64_t i = c0; i < c1; i++) {
        int64_t acc = load_i64(slot(0, b), dt, i);
        for (int q = 1; q < world_; q++) acc += load_i64(slot(q, b), dt, i);
        store_i64(out, dt, i, acc);
      }
    }
  }

  void run_all_gather(const Tensor& x, const Tensor& out, int dim, uint64_t seq) {
    const size_t esz = dtype_size(x.dtype);
    int64_t outer = 1, inner = 1;
    for (int i = 0; i < dim; i++) outer *= x.shape[i];
    for (int i = dim; i < x.ndim(); i++) inner *= x.shape[i];
    const size_t row = static_cast<size_t>(inner) * esz;  // bytes of one rank's block per outer index
    const size_t total = static_cast<size_t>(outer) * row;
    const char* src = static_cast<const char*>(x.data());
    char* dst = static_cast<char*>(out.data());
    bool first = true;
    size_t p0 = 0;
    do {
      const size_t pb = std::min(static_cast<size_t>(h_->slot_bytes), total - p0);
      const int b = next_round();
      std::memcpy(slot(rank_, b), src + p0, pb);
      if (first) publish(b, kAllGather, &x, dim, seq);
      wait_barrier("all_gather", seq);
      if (first) compare(b);
      first = false;
      for (int q = 0; q < world_; q++) {
        const char* s = slot(q, b);
        for (size_t off = p0; off < p0 + pb;) {
          const size_t r = off / row, within = off % row;
          const size_t span = std::min(p0 + pb - off, row - within);
          std::memcpy(dst + (r * static_cast<size_t>(world_) + static_cast<size_t>(q)) * row + within, s + (off - p0), span);
          off += span;
        }
      }
      p0 += pb;
    } while (p0 < total);
  }

  void run_broadcast(const Tensor& t, int root, uint64_t seq) {
    const size_t total = static_cast<size_t>(t.numel()) * dtype_size(t.dtype);
    char* data = static_cast<char*>(t.data());
    bool first = true;
    size_t p0 = 0;
    do {
      const size_t pb = std::min(static_cast<size_t>(h_->slot_bytes), total - p0);
      const int b = next_round();
      if (rank_ == root) std::memcpy(slot(root, b), data + p0, pb);
      if (first) publish(b, kBroadcast, &t, root, seq);
      wait_barrier("broadcast", seq);
      if (first) compare(b);
      first = false;
      if (rank_ != root) std::memcpy(data + p0, slot(root, b), pb);
      p0 += pb;
    } while (p0 < total);
  }

  void run_barrier(const Tensor& token, uint64_t seq) {
    const int b = next_round();
    publish(b, kBarrier, nullptr, 0, seq);
    wait_barrier("barrier", seq);
    compare(b);
    *static_cast<float*>(token.data()) = 1.0f;
  }

  std::string name_;
  CommOptions opts_;
  Header* h_ = nullptr;
  size_t map_bytes_ = 0;
  uint64_t barriers_ = 0;  // barriers this rank passed (executor thread, after joining)
  uint64_t rounds_ = 0;    // rounds this rank ran (slot parity)
  bool left_ = false;
};

}  // namespace

std::shared_ptr<Communicator> shm_join(const std::string& name, int rank, int world, const CommOptions& opts) {
  NX_CHECK(opts.timeout_ms > 0, "BAD_INPUT", "timeout must be positive, got " << opts.timeout_ms << " ms");
  return std::make_shared<ShmCommunicator>(name, rank, world, opts);
}

}  // namespace cluster
}  // namespace nx
