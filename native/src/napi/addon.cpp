// addon.cpp: the N-API boundary. The only file that includes napi.h.
//
// Exposes one ObjectWrap, `Tensor` (a handle holding an nx::Tensor), and free functions that create
// tensors, run ops (queued on the executor; see core/executor.h), read results back (sync or as a
// Promise from an AsyncWorker), map files, and report memory. Communicators (cluster/communicator.h) are
// handles too: joining a group is an AsyncWorker (it waits for the peers), collectives are queued like ops. nx::Error becomes a JS Error whose
// `code` is the stable error code; TS wraps it into NNsightError.
//
// Handles carry their metadata (dtype, shape, strides, offset, device) in a shared Float64Array so TS
// reads them without further calls into native code. Tensors on a CUDA device are read back by a copy
// to the host (read / readSync); toDevice moves them (see core/ops_cuda.h).
#include <napi.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>

#include "../../../cluster/communicator.h"
#include "../../../kernels/cpu/elementwise.h"
#include "../../../kernels/cpu/probe.h"
#include "../core/executor.h"
#include "../core/mmap_file.h"
#include "../core/ops.h"
#include "../core/ops_cuda.h"

namespace {

std::atomic<int64_t> g_live_handles{0};

Napi::Error coded_error(Napi::Env env, const std::string& code, const std::string& msg) {
  Napi::Error e = Napi::Error::New(env, msg);
  e.Set("code", Napi::String::New(env, code));
  return e;
}

// Completions posted by the executor thread straight to the JS thread (see Sync): the thread-safe
// function and whether the env still exists, shared with tasks still queued on the executor (they may
// outlive the env: the executor is process-wide).
struct Completions {
  std::mutex mu;
  napi_threadsafe_function tsfn = nullptr;  // null once the env is gone
  int waiting = 0;                          // promises not yet settled (JS thread only)
};

struct AddonData {
  int64_t reported_bytes = 0;
  Napi::ObjectReference meta_ref;  // keeps the metadata Float64Array alive
  double* meta = nullptr;
  std::shared_ptr<Completions> completions;
};

// Tell V8 about native memory so GC pressure reflects it (called on every allocating entry point).
void report_memory(Napi::Env env) {
  AddonData* d = env.GetInstanceData<AddonData>();
  // host bytes, plus CUDA bytes held by tensors (0 without CUDA), so GC pressure reflects GPU memory too
  int64_t now = nx::memory_stats().host_bytes.load() + nx::memory_stats().device_bytes.load();
  int64_t delta = now - d->reported_bytes;
  if (delta > (1 << 16) || delta < -(1 << 16)) {
    Napi::MemoryManagement::AdjustExternalMemory(env, delta);
    d->reported_bytes = now;
  }
}

// A tensor handle is a Napi::External around a TensorHandle: creating one costs one allocation and
// no property writes. Its metadata (dtype, shape, strides, offset) is written into a Float64Array that
// TS registered once (setMetaBuffer), which TS reads right after the call: no per-call object building.
struct TensorHandle {
  std::unique_ptr<nx::Tensor> tensor;
};

constexpr int kMetaStride = 4 + 2 * nx::kMaxDims;  // dtype, ndim, offset, shape[8], strides[8], device
constexpr int kMetaDevice = 3 + 2 * nx::kMaxDims;  // -1 = host, >= 0 = CUDA ordinal
constexpr int kMetaMax = 4;                          // outputs per call

class AddonTensor {
 public:
  static void write_meta(Napi::Env env, const nx::Tensor& t, int slot) {
    AddonData* d = env.GetInstanceData<AddonData>();
    if (d->meta == nullptr || slot >= kMetaMax) return;
    double* m = d->meta + slot * kMetaStride;
    m[0] = static_cast<double>(static_cast<int>(t.dtype));
    m[1] = static_cast<double>(t.shape.size());
    m[2] = static_cast<double>(t.offset);
    for (size_t i = 0; i < t.shape.size(); i++) {
      m[3 + i] = static_cast<double>(t.shape[i]);
      m[3 + nx::kMaxDims + i] = static_cast<double>(t.strides[i]);
    }
    m[kMetaDevice] = static_cast<double>(t.device());
  }
  static Napi::Value Wrap(Napi::Env env, nx::Tensor t, int slot = 0) {
    write_meta(env, t, slot);
    auto* h = new TensorHandle{std::make_unique<nx::Tensor>(std::move(t))};
    g_live_handles++;
    return Napi::External<TensorHandle>::New(env, h, [](Napi::Env, TensorHandle* p) {
      if (p->tensor) g_live_handles--;
      delete p;
    });
  }
  static TensorHandle* Handle(Napi::Env env, const Napi::Value& v, const char* what) {
    if (!v.IsExternal()) throw coded_error(env, "BAD_INPUT", std::string(what) + " is not a tensor");
    return v.As<Napi::External<TensorHandle>>().Data();
  }
  static const nx::Tensor& Get(Napi::Env env, const Napi::Value& v, const char* what) {
    TensorHandle* h = Handle(env, v, what);
    if (!h->tensor) throw coded_error(env, "DISPOSED", std::string(what) + " was disposed");
    return *h->tensor;
  }
};

// dispose(t): free now (queued kernels keep their own storage references)
Napi::Value Dispose(const Napi::CallbackInfo& info) {
  TensorHandle* h = AddonTensor::Handle(info.Env(), info[0], "tensor");
  if (h->tensor) {
    h->tensor.reset();
    g_live_handles--;
  }
  return info.Env().Undefined();
}
Napi::Value IsDisposed(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), !AddonTensor::Handle(info.Env(), info[0], "tensor")->tensor);
}
Napi::Value SameStorage(const Napi::CallbackInfo& info) {
  const nx::Tensor& a = AddonTensor::Get(info.Env(), info[0], "tensor");
  const nx::Tensor& b = AddonTensor::Get(info.Env(), info[1], "other");
  return Napi::Boolean::New(info.Env(), a.storage == b.storage);
}
// Whether pack_weight(t, release) can replace t's memory rather than add to it: a 2-D f32 host tensor
// viewing a read-only file mapping (its pages are dropped once packed), outside meta mode (scan: no
// kernels run, so a packed copy made then would hold no values). NX_PACK_WEIGHTS=0 turns packing off
// (models then multiply by the mapped weights as they are: A/B comparisons, debugging).
const bool g_pack_weights = [] {
  const char* e = std::getenv("NX_PACK_WEIGHTS");
  return e == nullptr || e[0] != '0';
}();
Napi::Value CanPackWeight(const Napi::CallbackInfo& info) {
  const nx::Tensor& t = AddonTensor::Get(info.Env(), info[0], "tensor");
  const bool ok = g_pack_weights && !nx::meta_mode() && t.storage && !t.storage->meta && t.storage->mapped &&
                  t.device() < 0 && t.dtype == nx::DType::F32 && t.ndim() == 2;
  return Napi::Boolean::New(info.Env(), ok);
}
// Whether t views a read-only file mapping (a weight loaded in place from safetensors).
Napi::Value IsMapped(const Napi::CallbackInfo& info) {
  const nx::Tensor& t = AddonTensor::Get(info.Env(), info[0], "tensor");
  return Napi::Boolean::New(info.Env(), t.storage && t.storage->mapped);
}
Napi::Value SetMetaBuffer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array ||
      info[0].As<Napi::Float64Array>().ElementLength() < static_cast<size_t>(kMetaStride * kMetaMax)) {
    throw coded_error(env, "BAD_INPUT", "setMetaBuffer needs a Float64Array of at least " + std::to_string(kMetaStride * kMetaMax));
  }
  AddonData* d = env.GetInstanceData<AddonData>();
  d->meta_ref = Napi::Persistent(info[0].As<Napi::Object>());
  d->meta = info[0].As<Napi::Float64Array>().Data();
  return env.Undefined();
}

nx::Shape to_shape(Napi::Env env, const Napi::Value& v, const char* what) {
  if (!v.IsArray()) throw coded_error(env, "BAD_INPUT", std::string(what) + " must be an array of integers");
  Napi::Array a = v.As<Napi::Array>();
  nx::Shape s(a.Length());
  for (uint32_t i = 0; i < a.Length(); i++) {
    Napi::Value e = a.Get(i);
    if (!e.IsNumber()) throw coded_error(env, "BAD_INPUT", std::string(what) + " must be an array of integers");
    double d = e.As<Napi::Number>().DoubleValue();
    if (d != static_cast<double>(static_cast<int64_t>(d))) throw coded_error(env, "BAD_INPUT", std::string(what) + " must hold integers");
    s[i] = static_cast<int64_t>(d);
  }
  return s;
}

nx::DType to_dtype(Napi::Env env, const Napi::Value& v) {
  if (!v.IsNumber()) throw coded_error(env, "DTYPE", "dtype must be a dtype id");
  int i = v.As<Napi::Number>().Int32Value();
  if (i < 0 || i >= nx::kNumDTypes) throw coded_error(env, "DTYPE", "unknown dtype id " + std::to_string(i));
  return static_cast<nx::DType>(i);
}

// Run fn, converting nx::Error / std::exception into coded JS errors.
template <typename Fn>
Napi::Value guarded(Napi::Env env, Fn&& fn) {
  try {
    return fn();
  } catch (const nx::Error& e) {
    throw coded_error(env, e.code, e.what());
  } catch (const Napi::Error&) {
    throw;
  } catch (const std::bad_alloc&) {
    throw coded_error(env, "OOM", "out of memory");
  } catch (const std::exception& e) {
    throw coded_error(env, "INTERNAL", e.what());
  }
}

// An optional device argument: -1 / undefined = host, >= 0 = CUDA ordinal.
int to_device_index(Napi::Env env, const Napi::Value& v) {
  if (v.IsUndefined() || v.IsNull()) return -1;
  if (!v.IsNumber()) throw coded_error(env, "BAD_INPUT", "device must be a device index (-1 = cpu)");
  double d = v.As<Napi::Number>().DoubleValue();
  if (d != static_cast<double>(static_cast<int>(d)) || d < -1) throw coded_error(env, "DEVICE", "bad device index " + std::to_string(d));
  return static_cast<int>(d);
}

// empty(shape, dtype, device?)
Napi::Value Empty(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    const int dev = to_device_index(env, info[2]);
    auto t = dev < 0 ? nx::Tensor::empty(to_shape(env, info[0], "shape"), to_dtype(env, info[1]))
                     : nx::Tensor::empty_on(to_shape(env, info[0], "shape"), to_dtype(env, info[1]), dev);
    report_memory(env);
    return (AddonTensor::Wrap(env, std::move(t)));
  });
}

// fromBuffer(typedArrayOrBuffer, dtype, shape, device?): copies the bytes into a new tensor (on a CUDA
// device: into host memory, then a queued copy to the device).
Napi::Value FromBuffer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    if (!info[0].IsTypedArray() && !info[0].IsBuffer()) throw coded_error(env, "BAD_INPUT", "fromBuffer expects a typed array");
    Napi::TypedArray ta = info[0].As<Napi::TypedArray>();
    nx::DType dt = to_dtype(env, info[1]);
    nx::Shape shape = to_shape(env, info[2], "shape");
    auto t = nx::Tensor::empty(shape, dt, /*real=*/true);
    size_t need = static_cast<size_t>(t.numel()) * nx::dtype_size(dt);
    if (ta.ByteLength() != need)
      throw coded_error(env, "SHAPE", "buffer holds " + std::to_string(ta.ByteLength()) + " bytes, shape " + nx::shape_str(shape) +
                                          " of " + nx::dtype_name(dt) + " needs " + std::to_string(need));
    std::memcpy(t.storage->data, static_cast<char*>(ta.ArrayBuffer().Data()) + ta.ByteOffset(), need);
    const int dev = to_device_index(env, info[3]);
    if (dev >= 0) t = nx::to_device(t, dev);
    report_memory(env);
    return (AddonTensor::Wrap(env, std::move(t)));
  });
}

// view(t, shape, strides, offset): a new handle over the same storage.
Napi::Value View(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    const nx::Tensor& t = AddonTensor::Get(env, info[0], "tensor");
    nx::Tensor v = t.view(to_shape(env, info[1], "shape"), to_shape(env, info[2], "strides"),
                          static_cast<int64_t>(info[3].As<Napi::Number>().DoubleValue()));
    return (AddonTensor::Wrap(env, std::move(v)));
  });
}

// viewBytes(t, byteOffset, dtype, shape): reinterpret a byte range of t's storage (mapped files).
// Copies when the offset is not aligned to the dtype.
Napi::Value ViewBytes(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    const nx::Tensor& t = AddonTensor::Get(env, info[0], "tensor");
    NX_CHECK(t.device() < 0, "DEVICE", "viewBytes needs a tensor in host memory, not on " << nx::device_str(t.device()));
    int64_t off = static_cast<int64_t>(info[1].As<Napi::Number>().DoubleValue());
    nx::DType dt = to_dtype(env, info[2]);
    nx::Shape shape = to_shape(env, info[3], "shape");
    int64_t n = 1;
    for (auto d : shape) n *= d;
    int64_t esz = static_cast<int64_t>(nx::dtype_size(dt));
    NX_CHECK(off >= 0 && off + n * esz <= static_cast<int64_t>(t.storage->nbytes), "IO",
             "byte range [" << off << ", " << off + n * esz << ") lies outside the " << t.storage->nbytes << "-byte file");
    if (off % esz == 0) {
      nx::Tensor v;
      v.storage = t.storage;
      v.dtype = dt;
      v.shape = shape;
      v.strides = nx::Tensor::contiguous_strides(shape);
      v.offset = off / esz;
      return (AddonTensor::Wrap(env, std::move(v)));
    }
    auto c = nx::Tensor::empty(shape, dt, /*real=*/true);
    std::memcpy(c.storage->data, static_cast<char*>(t.storage->data) + off, static_cast<size_t>(n * esz));
    report_memory(env);
    return (AddonTensor::Wrap(env, std::move(c)));
  });
}

Napi::Value MapFile(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    std::string path = info[0].As<Napi::String>().Utf8Value();
    auto s = nx::map_file(path);
    nx::Tensor t;
    t.dtype = nx::DType::BOOL;  // a byte view of the whole file; callers use viewBytes
    t.shape = {static_cast<int64_t>(s->nbytes)};
    t.strides = {1};
    t.storage = std::move(s);
    return (AddonTensor::Wrap(env, std::move(t)));
  });
}

// op(opId, inputs[], attrs[]) -> handle | handle[]
Napi::Value Op(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    int opid = info[0].As<Napi::Number>().Int32Value();
    if (opid < 0 || opid >= static_cast<int>(nx::Op::COUNT)) throw coded_error(env, "INVALID_GRAPH", "unknown op id " + std::to_string(opid));
    Napi::Array ins = info[1].As<Napi::Array>();
    std::vector<const nx::Tensor*> inputs(ins.Length());
    for (uint32_t i = 0; i < ins.Length(); i++) {
      Napi::Value v = ins.Get(i);
      inputs[i] = (v.IsNull() || v.IsUndefined()) ? nullptr : &AddonTensor::Get(env, v, "op input");
    }
    std::vector<double> attrs;
    if (info.Length() > 2 && info[2].IsArray()) {
      Napi::Array a = info[2].As<Napi::Array>();
      attrs.resize(a.Length());
      for (uint32_t i = 0; i < a.Length(); i++) attrs[i] = a.Get(i).As<Napi::Number>().DoubleValue();
    }
    std::vector<nx::Tensor> outs = nx::run_op(static_cast<nx::Op>(opid), inputs, attrs);
    report_memory(env);
    std::string name = nx::op_info(static_cast<nx::Op>(opid)).name;
    if (!name.empty() && name.back() == '_') {  // in place: the first input, metadata unchanged
      AddonTensor::write_meta(env, outs[0], 0);
      return Napi::Value(info[1].As<Napi::Array>().Get(0u));
    }
    if (outs.size() == 1) return (AddonTensor::Wrap(env, std::move(outs[0])));
    Napi::Array r = Napi::Array::New(env, outs.size());
    for (size_t i = 0; i < outs.size(); i++) r.Set(static_cast<uint32_t>(i), AddonTensor::Wrap(env, std::move(outs[i]), static_cast<int>(i)));
    return Napi::Value(r);
  });
}

// Prepare a dense copy of t in the dtype that read() returns (f16/bf16 widen to f32 when asked).
nx::Tensor dense_for_read(const nx::Tensor& t, bool widen) {
  nx::DType target = (widen && (t.dtype == nx::DType::F16 || t.dtype == nx::DType::BF16)) ? nx::DType::F32 : t.dtype;
  if (target == t.dtype && t.is_contiguous()) return t;
  return nx::run_op(nx::Op::CAST, {&t}, {static_cast<double>(static_cast<int>(target))})[0];
}

void throw_if_poisoned(Napi::Env env, const nx::Tensor& t) {
  if (t.storage->meta) throw coded_error(env, "BAD_INPUT", "this tensor comes from scan(): it has a shape and dtype but no values");
  if (auto e = t.storage->get_error()) throw coded_error(env, e->code, e->what());
}

Napi::Value ReadSync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    const nx::Tensor& t = AddonTensor::Get(env, info[0], "tensor");
    bool widen = info.Length() > 1 && info[1].ToBoolean().Value();
    throw_if_poisoned(env, t);
    nx::Tensor d = dense_for_read(t, widen);
    nx::executor().sync();
    throw_if_poisoned(env, d);
    size_t n = static_cast<size_t>(d.numel()) * nx::dtype_size(d.dtype);
    Napi::ArrayBuffer buf = Napi::ArrayBuffer::New(env, n);
    if (n) nx::read_bytes(d, buf.Data(), n);  // memcpy, or a copy from the device
    return Napi::Value(buf);
  });
}

// The ArrayBuffer is allocated here on the JS thread and filled by Execute on a worker thread (JS cannot
// see it before the promise resolves), so a read holds the tensor and one copy, not an extra staging copy.
class ReadWorker : public Napi::AsyncWorker {
 public:
  ReadWorker(Napi::Env env, nx::Tensor t)
      : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)), t_(std::move(t)) {
    n_ = static_cast<size_t>(t_.numel()) * nx::dtype_size(t_.dtype);
    Napi::ArrayBuffer buf = Napi::ArrayBuffer::New(env, n_);
    dst_ = buf.Data();
    buf_ = Napi::Persistent(buf);
  }
  Napi::Promise Promise() { return deferred_.Promise(); }
  void Execute() override {
    nx::executor().sync();
    if (auto e = t_.storage->get_error()) {
      code_ = e->code;
      SetError(e->what());
      return;
    }
    try {
      if (n_) nx::read_bytes(t_, dst_, n_);  // memcpy, or a copy from the device
    } catch (const nx::Error& e) {
      code_ = e.code;
      SetError(e.what());
    }
  }
  void OnOK() override {
    t_ = nx::Tensor{};
    Napi::ArrayBuffer buf = buf_.Value();
    buf_.Reset();
    deferred_.Resolve(buf);
  }
  void OnError(const Napi::Error& e) override {
    t_ = nx::Tensor{};
    buf_.Reset();
    deferred_.Reject(coded_error(Env(), code_.empty() ? "INTERNAL" : code_, e.Message()).Value());
  }

 private:
  Napi::Promise::Deferred deferred_;
  nx::Tensor t_;
  std::string code_;
  Napi::Reference<Napi::ArrayBuffer> buf_;
  void* dst_ = nullptr;
  size_t n_ = 0;
};

// Settling a promise when queued work is done, without a libuv worker thread. An AsyncWorker costs
// three thread hand-offs (JS wakes a libuv thread, which sleeps in executor().sync(), which the executor
// wakes, which wakes the JS thread), and the libuv thread's wake-up lands while the kernels run, taking
// a core from the pool; measured 20-45 us a round trip. Here the executor runs a task queued after the
// work (on the executor thread, in order) that posts the result to the JS thread through one
// thread-safe function (one eventfd write). Used on the host; with CUDA memory in use the workers stay
// (they also wait for the device).
struct Completion {
  std::function<void(Napi::Env)> settle;  // on the JS thread
};

void settle_completion(napi_env env, napi_value, void* context, void* data) {
  std::unique_ptr<Completion> c(static_cast<Completion*>(data));
  if (env == nullptr) return;  // the env is being torn down: drop it
  auto* comp = static_cast<Completions*>(context);
  {
    Napi::HandleScope scope(env);
    c->settle(Napi::Env(env));
  }
  if (--comp->waiting == 0) napi_unref_threadsafe_function(env, comp->tsfn);
}

bool executor_completions_usable() {
  return !nx::executor().inline_mode() && nx::memory_stats().device_bytes.load() == 0;
}

// Queue `work` (run on the executor thread after everything queued so far, then the sync epoch), then
// `settle` on the JS thread. A pending completion keeps the event loop alive, as a pending worker does.
void complete_after_queued(Napi::Env env, std::function<void()> work, std::function<void(Napi::Env)> settle) {
  AddonData* d = env.GetInstanceData<AddonData>();
  std::shared_ptr<Completions> comp = d->completions;
  if (comp->waiting++ == 0) napi_ref_threadsafe_function(env, comp->tsfn);
  auto* c = new Completion{std::move(settle)};
  nx::executor().after([comp, c, work = std::move(work)] {
    if (work) work();
    nx::executor().sync_point();
    std::lock_guard<std::mutex> lk(comp->mu);
    if (comp->tsfn == nullptr || napi_call_threadsafe_function(comp->tsfn, c, napi_tsfn_nonblocking) != napi_ok)
      delete c;  // the env is gone: nobody to tell
  });
}

Napi::Value Read(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    const nx::Tensor& t = AddonTensor::Get(env, info[0], "tensor");
    bool widen = info.Length() > 1 && info[1].ToBoolean().Value();
    throw_if_poisoned(env, t);
    if (executor_completions_usable()) {
      // the buffer is allocated here and filled on the executor thread (JS cannot see it before the
      // promise settles); the reference keeps it alive until then
      auto src = std::make_shared<nx::Tensor>(dense_for_read(t, widen));
      const size_t n = static_cast<size_t>(src->numel()) * nx::dtype_size(src->dtype);
      Napi::ArrayBuffer buf = Napi::ArrayBuffer::New(env, n);
      void* dst = buf.Data();
      auto ref = std::make_shared<Napi::Reference<Napi::ArrayBuffer>>(Napi::Persistent(buf));
      auto err = std::make_shared<std::pair<std::string, std::string>>();  // code, message
      auto deferred = std::make_shared<Napi::Promise::Deferred>(Napi::Promise::Deferred::New(env));
      complete_after_queued(
          env,
          [src, dst, n, err] {
            if (auto e = src->storage->get_error()) {
              *err = {e->code, e->what()};
            } else {
              try {
                if (n) nx::read_bytes(*src, dst, n);
              } catch (const nx::Error& e) {
                *err = {e.code, e.what()};
              }
            }
            *src = nx::Tensor{};  // drop the storage on the executor thread, as a finished op does
          },
          [ref, err, deferred](Napi::Env env) {
            if (!err->first.empty()) deferred->Reject(coded_error(env, err->first, err->second).Value());
            else deferred->Resolve(ref->Value());
            ref->Reset();
          });
      return Napi::Value(deferred->Promise());
    }
    auto* w = new ReadWorker(env, dense_for_read(t, widen));
    Napi::Promise p = w->Promise();
    w->Queue();
    return Napi::Value(p);
  });
}

class SyncWorker : public Napi::AsyncWorker {
 public:
  explicit SyncWorker(Napi::Env env) : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)) {}
  Napi::Promise Promise() { return deferred_.Promise(); }
  std::string code_;
  void Execute() override {
    nx::executor().sync();
    try {
      nx::device_sync();  // CUDA kernels were only launched: wait for them too
    } catch (const nx::Error& e) {
      code_ = e.code;
      SetError(e.what());
    }
  }
  void OnOK() override { deferred_.Resolve(Env().Undefined()); }
  void OnError(const Napi::Error& e) override {
    deferred_.Reject(code_.empty() ? e.Value() : coded_error(Env(), code_, e.Message()).Value());
  }

 private:
  Napi::Promise::Deferred deferred_;
};

Napi::Value Sync(const Napi::CallbackInfo& info) {
  // Nothing queued and no device memory (so no device work in flight): already synchronized; a resolved
  // promise saves the worker round trip (25-50 us through the event loop).
  if (nx::executor().pending() == 0 && nx::memory_stats().device_bytes.load() == 0) {
    auto d = Napi::Promise::Deferred::New(info.Env());
    d.Resolve(info.Env().Undefined());
    return d.Promise();
  }
  if (executor_completions_usable()) {
    auto deferred = std::make_shared<Napi::Promise::Deferred>(Napi::Promise::Deferred::New(info.Env()));
    complete_after_queued(info.Env(), nullptr, [deferred](Napi::Env env) { deferred->Resolve(env.Undefined()); });
    return deferred->Promise();
  }
  auto* w = new SyncWorker(info.Env());
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}
Napi::Value SyncBlocking(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&] {
    nx::executor().sync();
    nx::device_sync();
    return info.Env().Undefined();
  });
}

// toDevice(t, device): a contiguous copy on device (-1 = cpu, >= 0 = CUDA ordinal), or t's own storage
// when it is already there (a new handle). DEVICE errors carry the reason CUDA is unavailable.
Napi::Value ToDevice(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    const nx::Tensor& t = AddonTensor::Get(env, info[0], "tensor");
    const int dev = to_device_index(env, info[1]);
    nx::Tensor r = nx::to_device(t, dev);
    report_memory(env);
    return AddonTensor::Wrap(env, std::move(r));
  });
}

// cudaInfo(): { compiled, available, devices, reason, runtime, driver, names[] }
Napi::Value CudaInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    Napi::Object o = Napi::Object::New(env);
    std::string why;
    const bool ok = nx::cuda_available(&why);
    o.Set("compiled", Napi::Boolean::New(env, nx::cuda_compiled()));
    o.Set("available", Napi::Boolean::New(env, ok));
    o.Set("devices", Napi::Number::New(env, ok ? nx::cuda_device_count() : 0));
    o.Set("reason", ok ? env.Null() : Napi::String::New(env, why));
    return Napi::Value(o);
  });
}

// errorOf(t): after a sync, the error of the kernel that produced t, or null.
Napi::Value ErrorOf(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    const nx::Tensor& t = AddonTensor::Get(env, info[0], "tensor");
    auto e = t.storage->get_error();
    if (!e) return env.Null();
    return Napi::Value(coded_error(env, e->code, e->what()).Value());
  });
}

Napi::Value Memory(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  auto& m = nx::memory_stats();
  o.Set("handles", Napi::Number::New(env, static_cast<double>(g_live_handles.load())));
  o.Set("storages", Napi::Number::New(env, static_cast<double>(m.storages.load())));
  o.Set("hostBytes", Napi::Number::New(env, static_cast<double>(m.host_bytes.load())));
  o.Set("mappedBytes", Napi::Number::New(env, static_cast<double>(m.mapped_bytes.load())));
  o.Set("cachedBytes", Napi::Number::New(env, static_cast<double>(nx::cached_host_bytes())));
  o.Set("pendingKernels", Napi::Number::New(env, static_cast<double>(nx::executor().pending())));
  o.Set("deviceBytes", Napi::Number::New(env, static_cast<double>(m.device_bytes.load())));
  o.Set("cachedDeviceBytes", Napi::Number::New(env, static_cast<double>(nx::cuda_bytes_cached())));
  return o;
}

Napi::Value SetThreads(const Napi::CallbackInfo& info) {
  nx::executor().sync();
  nx::set_num_threads(info[0].As<Napi::Number>().Int32Value());
  return info.Env().Undefined();
}
Napi::Value GetThreads(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), nx::num_threads()); }
Napi::Value SetReferenceKernels(const Napi::CallbackInfo& info) {
  nx::executor().sync();
  nx::set_use_reference_kernels(info[0].ToBoolean().Value());
  return info.Env().Undefined();
}

Napi::Value SetMaxAllocation(const Napi::CallbackInfo& info) {
  nx::set_max_allocation(static_cast<size_t>(info[0].As<Napi::Number>().DoubleValue()));
  return info.Env().Undefined();
}

Napi::Value ReleaseCachedMemory(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&] {
    nx::executor().sync();
    nx::release_cached_host_memory();
    nx::release_cached_device_memory();
    return info.Env().Undefined();
  });
}

Napi::Value SetMetaMode(const Napi::CallbackInfo& info) {
  nx::set_meta_mode(info[0].ToBoolean().Value());
  return info.Env().Undefined();
}

// Per-op profile of the executor (NX_PROFILE=1 or setProfiling(true); see core/executor.h).
Napi::Value SetProfiling(const Napi::CallbackInfo& info) {
  nx::executor().set_profiling(info[0].ToBoolean().Value());
  return info.Env().Undefined();
}

// profile(reset?): [{label, calls, ms, maxMs}] since the last reset, heaviest first; waits for the
// queued work first. With reset = true the table is cleared after it was read.
Napi::Value Profile(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto rows = nx::executor().profile_snapshot();
  if (info.Length() > 0 && info[0].ToBoolean().Value()) nx::executor().profile_reset();
  std::sort(rows.begin(), rows.end(), [](const nx::ProfileRow& a, const nx::ProfileRow& b) { return a.total_ms > b.total_ms; });
  Napi::Array out = Napi::Array::New(env, rows.size());
  for (size_t i = 0; i < rows.size(); i++) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("label", Napi::String::New(env, rows[i].label));
    o.Set("calls", Napi::Number::New(env, static_cast<double>(rows[i].calls)));
    o.Set("ms", Napi::Number::New(env, rows[i].total_ms));
    o.Set("maxMs", Napi::Number::New(env, rows[i].max_ms));
    out[i] = o;
  }
  return out;
}

Napi::Value ProbeFma(const Napi::CallbackInfo& info) {
  nx::executor().sync();
  return Napi::Number::New(info.Env(), nx::probe_fma_peak_gflops(info[0].As<Napi::Number>().Int32Value(),
                                                                   info[1].As<Napi::Number>().Int32Value()));
}
Napi::Value ProbeTriad(const Napi::CallbackInfo& info) {
  nx::executor().sync();
  return Napi::Number::New(info.Env(), nx::probe_triad_gbps(info[0].As<Napi::Number>().Int32Value(),
                                                              static_cast<size_t>(info[1].As<Napi::Number>().DoubleValue())));
}

// ------------------------------------------------------------------ communicators (cluster/)
// A communicator handle is a Napi::External around a CommHandle; commClose (or the GC) drops it. Queued
// collectives keep their own reference, so closing never pulls memory from under a pending call.
struct CommHandle {
  std::shared_ptr<nx::cluster::Communicator> comm;
};

nx::cluster::Communicator& get_comm(Napi::Env env, const Napi::Value& v) {
  if (!v.IsExternal()) throw coded_error(env, "BAD_INPUT", "not a communicator");
  CommHandle* h = v.As<Napi::External<CommHandle>>().Data();
  if (!h->comm) throw coded_error(env, "DISPOSED", "the communicator was closed");
  return *h->comm;
}

Napi::Value wrap_comm(Napi::Env env, std::shared_ptr<nx::cluster::Communicator> c) {
  return Napi::External<CommHandle>::New(env, new CommHandle{std::move(c)}, [](Napi::Env, CommHandle* p) { delete p; });
}

nx::cluster::CommOptions comm_options(const Napi::Value& timeout, const Napi::Value& slot) {
  nx::cluster::CommOptions o;
  if (timeout.IsNumber()) o.timeout_ms = static_cast<int64_t>(timeout.As<Napi::Number>().DoubleValue());
  if (slot.IsNumber()) o.slot_bytes = static_cast<size_t>(slot.As<Napi::Number>().DoubleValue());
  return o;
}

// Joins a group off the JS thread (joining waits for every rank) and resolves to the handle.
class CommJoinWorker : public Napi::AsyncWorker {
 public:
  CommJoinWorker(Napi::Env env, std::function<std::shared_ptr<nx::cluster::Communicator>()> join)
      : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)), join_(std::move(join)) {}
  Napi::Promise Promise() { return deferred_.Promise(); }
  void Execute() override {
    try {
      comm_ = join_();
    } catch (const nx::Error& e) {
      code_ = e.code;
      SetError(e.what());
    } catch (const std::exception& e) {
      SetError(e.what());
    }
  }
  void OnOK() override { deferred_.Resolve(wrap_comm(Env(), std::move(comm_))); }
  void OnError(const Napi::Error& e) override {
    deferred_.Reject(coded_error(Env(), code_.empty() ? "INTERNAL" : code_, e.Message()).Value());
  }

 private:
  Napi::Promise::Deferred deferred_;
  std::function<std::shared_ptr<nx::cluster::Communicator>()> join_;
  std::shared_ptr<nx::cluster::Communicator> comm_;
  std::string code_;
};

// commJoinShm(name, rank, world, timeoutMs?, slotBytes?) -> Promise<handle>
Napi::Value CommJoinShm(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    if (!info[0].IsString() || !info[1].IsNumber() || !info[2].IsNumber())
      throw coded_error(env, "BAD_INPUT", "commJoinShm(name, rank, world, timeoutMs?, slotBytes?)");
    std::string name = info[0].As<Napi::String>().Utf8Value();
    int rank = info[1].As<Napi::Number>().Int32Value(), world = info[2].As<Napi::Number>().Int32Value();
    nx::cluster::CommOptions o = comm_options(info[3], info[4]);
    auto* w = new CommJoinWorker(env, [name, rank, world, o] { return nx::cluster::shm_join(name, rank, world, o); });
    Napi::Promise p = w->Promise();
    w->Queue();
    return Napi::Value(p);
  });
}

// commJoinNccl(uniqueIdHex, rank, world, device, timeoutMs?) -> Promise<handle>
Napi::Value CommJoinNccl(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    if (!info[0].IsString() || !info[1].IsNumber() || !info[2].IsNumber() || !info[3].IsNumber())
      throw coded_error(env, "BAD_INPUT", "commJoinNccl(uniqueId, rank, world, device, timeoutMs?)");
    std::string id = info[0].As<Napi::String>().Utf8Value();
    int rank = info[1].As<Napi::Number>().Int32Value(), world = info[2].As<Napi::Number>().Int32Value();
    int device = info[3].As<Napi::Number>().Int32Value();
    nx::cluster::CommOptions o = comm_options(info[4], Napi::Value());
    auto* w = new CommJoinWorker(env, [id, rank, world, device, o] { return nx::cluster::nccl_join(id, rank, world, device, o); });
    Napi::Promise p = w->Promise();
    w->Queue();
    return Napi::Value(p);
  });
}

Napi::Value NcclUniqueId(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&] { return Napi::Value(Napi::String::New(info.Env(), nx::cluster::nccl_unique_id())); });
}

// ncclInfo(): { available, reason }
Napi::Value NcclInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    std::string why;
    const bool ok = nx::cluster::nccl_available(&why);
    Napi::Object o = Napi::Object::New(env);
    o.Set("available", Napi::Boolean::New(env, ok));
    o.Set("reason", ok ? env.Null() : Napi::String::New(env, why));
    return Napi::Value(o);
  });
}

// commInfo(h): { rank, world, backend, device, calls }
Napi::Value CommInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    nx::cluster::Communicator& c = get_comm(env, info[0]);
    Napi::Object o = Napi::Object::New(env);
    o.Set("rank", Napi::Number::New(env, c.rank()));
    o.Set("world", Napi::Number::New(env, c.world()));
    o.Set("backend", Napi::String::New(env, c.backend()));
    o.Set("device", Napi::Number::New(env, c.device()));
    o.Set("calls", Napi::Number::New(env, static_cast<double>(c.calls())));
    return Napi::Value(o);
  });
}

// commAllReduce(h, t): t += the other ranks' t (queued, in place)
Napi::Value CommAllReduce(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    get_comm(env, info[0]).all_reduce_sum_(AddonTensor::Get(env, info[1], "tensor"));
    return env.Undefined();
  });
}

// commAllGather(h, t, dim) -> handle
Napi::Value CommAllGather(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    nx::Tensor out = get_comm(env, info[0]).all_gather(AddonTensor::Get(env, info[1], "tensor"), info[2].As<Napi::Number>().Int32Value());
    report_memory(env);
    return AddonTensor::Wrap(env, std::move(out));
  });
}

// commBroadcast(h, t, root): t = root's t (queued, in place)
Napi::Value CommBroadcast(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    get_comm(env, info[0]).broadcast_(AddonTensor::Get(env, info[1], "tensor"), info[2].As<Napi::Number>().Int32Value());
    return env.Undefined();
  });
}

// commBarrier(h) -> a 1-element tensor handle whose read completes once every rank arrived
Napi::Value CommBarrier(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] { return AddonTensor::Wrap(env, get_comm(env, info[0]).barrier()); });
}

// commAbort(h, reason): fail every rank's pending and later collectives (not queued)
Napi::Value CommAbort(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    get_comm(env, info[0]).abort(info[1].IsString() ? info[1].As<Napi::String>().Utf8Value() : std::string("aborted"));
    return env.Undefined();
  });
}

// commClose(h): leave the group after this rank's queued collectives; the handle is dead afterwards
Napi::Value CommClose(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    if (!info[0].IsExternal()) throw coded_error(env, "BAD_INPUT", "not a communicator");
    CommHandle* h = info[0].As<Napi::External<CommHandle>>().Data();
    if (h->comm) {
      h->comm->close();
      h->comm.reset();
    }
    return env.Undefined();
  });
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  auto* data = new AddonData();
  env.SetInstanceData<AddonData>(data);
  data->completions = std::make_shared<Completions>();
  {
    Completions* comp = data->completions.get();
    napi_value name = Napi::String::New(env, "nnsight.executor");
    NAPI_THROW_IF_FAILED(env, napi_create_threadsafe_function(env, nullptr, nullptr, name, 0, 1, nullptr, nullptr, comp,
                                                              settle_completion, &comp->tsfn),
                         exports);
    napi_unref_threadsafe_function(env, comp->tsfn);  // referenced only while a completion is pending
    // On env teardown, before node destroys the thread-safe function: executor tasks still queued must
    // not post to it (cleanup hooks run in reverse order of registration, node's own for the function first
    // registered, so this one runs before it)
    auto keep = new std::shared_ptr<Completions>(data->completions);
    napi_add_env_cleanup_hook(
        env,
        [](void* arg) {
          auto* p = static_cast<std::shared_ptr<Completions>*>(arg);
          {
            std::lock_guard<std::mutex> lk((*p)->mu);
            (*p)->tsfn = nullptr;
          }
          delete p;
        },
        keep);
  }
  exports.Set("dispose", Napi::Function::New(env, Dispose));
  exports.Set("isDisposed", Napi::Function::New(env, IsDisposed));
  exports.Set("sameStorage", Napi::Function::New(env, SameStorage));
  exports.Set("canPackWeight", Napi::Function::New(env, CanPackWeight));
  exports.Set("isMapped", Napi::Function::New(env, IsMapped));
  exports.Set("setMetaBuffer", Napi::Function::New(env, SetMetaBuffer));
  exports.Set("metaStride", Napi::Number::New(env, kMetaStride));
  exports.Set("maxDims", Napi::Number::New(env, nx::kMaxDims));
  exports.Set("metaDeviceSlot", Napi::Number::New(env, kMetaDevice));
  Napi::Array names = Napi::Array::New(env, static_cast<size_t>(nx::Op::COUNT));
  for (int i = 0; i < static_cast<int>(nx::Op::COUNT); i++)
    names.Set(static_cast<uint32_t>(i), Napi::String::New(env, nx::op_info(static_cast<nx::Op>(i)).name));
  exports.Set("opNames", names);
  Napi::Object dt = Napi::Object::New(env);
  for (int i = 0; i < nx::kNumDTypes; i++) dt.Set(nx::dtype_name(static_cast<nx::DType>(i)), Napi::Number::New(env, i));
  exports.Set("dtypes", dt);
#if defined(NX_WITH_CUDA)
  exports.Set("cudaCompiled", Napi::Boolean::New(env, true));
#else
  exports.Set("cudaCompiled", Napi::Boolean::New(env, false));
#endif
  exports.Set("empty", Napi::Function::New(env, Empty));
  exports.Set("fromBuffer", Napi::Function::New(env, FromBuffer));
  exports.Set("view", Napi::Function::New(env, View));
  exports.Set("viewBytes", Napi::Function::New(env, ViewBytes));
  exports.Set("mapFile", Napi::Function::New(env, MapFile));
  exports.Set("toDevice", Napi::Function::New(env, ToDevice));
  exports.Set("cudaInfo", Napi::Function::New(env, CudaInfo));
  exports.Set("op", Napi::Function::New(env, Op));
  exports.Set("readSync", Napi::Function::New(env, ReadSync));
  exports.Set("read", Napi::Function::New(env, Read));
  exports.Set("sync", Napi::Function::New(env, Sync));
  exports.Set("syncBlocking", Napi::Function::New(env, SyncBlocking));
  exports.Set("errorOf", Napi::Function::New(env, ErrorOf));
  exports.Set("memory", Napi::Function::New(env, Memory));
  exports.Set("setThreads", Napi::Function::New(env, SetThreads));
  exports.Set("getThreads", Napi::Function::New(env, GetThreads));
  exports.Set("setReferenceKernels", Napi::Function::New(env, SetReferenceKernels));
  exports.Set("setMetaMode", Napi::Function::New(env, SetMetaMode));
  exports.Set("releaseCachedMemory", Napi::Function::New(env, ReleaseCachedMemory));
  exports.Set("setMaxAllocation", Napi::Function::New(env, SetMaxAllocation));
  exports.Set("probeFmaPeak", Napi::Function::New(env, ProbeFma));
  exports.Set("setProfiling", Napi::Function::New(env, SetProfiling));
  exports.Set("profile", Napi::Function::New(env, Profile));
  exports.Set("probeTriad", Napi::Function::New(env, ProbeTriad));
  exports.Set("commJoinShm", Napi::Function::New(env, CommJoinShm));
  exports.Set("commJoinNccl", Napi::Function::New(env, CommJoinNccl));
  exports.Set("ncclUniqueId", Napi::Function::New(env, NcclUniqueId));
  exports.Set("ncclInfo", Napi::Function::New(env, NcclInfo));
  exports.Set("commInfo", Napi::Function::New(env, CommInfo));
  exports.Set("commAllReduce", Napi::Function::New(env, CommAllReduce));
  exports.Set("commAllGather", Napi::Function::New(env, CommAllGather));
  exports.Set("commBroadcast", Napi::Function::New(env, CommBroadcast));
  exports.Set("commBarrier", Napi::Function::New(env, CommBarrier));
  exports.Set("commAbort", Napi::Function::New(env, CommAbort));
  exports.Set("commClose", Napi::Function::New(env, CommClose));
  return exports;
}

}  // namespace

NODE_API_MODULE(nnsight_native, Init)
