// ops_cuda.cpp: the CUDA dispatcher and host <-> device copies (see ops_cuda.h). Compiled in every
// build; the bodies that call into kernels/cuda exist only with NX_WITH_CUDA.
#include "ops_cuda.h"

#include <cmath>
#include <cstring>
#include <functional>
#include <random>

#include "../../../kernels/cpu/elementwise.h"
#include "../../../kernels/cuda/cuda.h"
#include "executor.h"
#include "ops.h"

namespace nx {

std::string device_str(int device) { return device < 0 ? std::string("cpu") : "cuda:" + std::to_string(device); }

int op_device_mixed(Op op, const std::vector<const Tensor*>& in) {
  int dev = -2;
  for (const Tensor* t : in) {
    if (t == nullptr) continue;
    const int d = t->device();
    if (dev == -2) {
      dev = d;
    } else if (d != dev) {
      NX_FAIL("DEVICE", op_info(op).name << ": inputs are on different devices (" << device_str(dev) << " and " << device_str(d)
                                         << "); move them to one device first (tensor.to(\"" << device_str(d < 0 ? dev : d)
                                         << "\"))");
    }
  }
  return dev < 0 ? -1 : dev;
}

bool cuda_compiled() {
#if NX_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool cuda_available(std::string* why) {
#if NX_WITH_CUDA
  return cuda::available(why);
#else
  if (why) *why = "this build has no CUDA (the addon was built without a CUDA toolkit)";
  return false;
#endif
}

int cuda_device_count() {
#if NX_WITH_CUDA
  return cuda::device_count();
#else
  return 0;
#endif
}

void device_sync() {
#if NX_WITH_CUDA
  if (cuda::used()) cuda::synchronize_all();
#endif
}

size_t cuda_bytes_in_use() {
#if NX_WITH_CUDA
  return cuda::used() ? cuda::device_bytes_in_use() : 0;
#else
  return 0;
#endif
}
size_t cuda_bytes_cached() {
#if NX_WITH_CUDA
  return cuda::used() ? cuda::device_bytes_cached() : 0;
#else
  return 0;
#endif
}
void release_cached_device_memory() {
#if NX_WITH_CUDA
  if (cuda::used()) cuda::release_cached_device_memory();
#endif
}

namespace {

#if NX_WITH_CUDA
// Throws DEVICE unless `device` names a usable CUDA device.
void require_cuda(int device, const char* what) {
  std::string why;
  NX_CHECK(cuda_available(&why), "DEVICE", what << " needs " << device_str(device) << ", but CUDA is not available: " << why);
  NX_CHECK(device < cuda_device_count(), "DEVICE",
           what << ": " << device_str(device) << " does not exist (" << cuda_device_count() << " CUDA device(s))");
}

// Device memory for the duration of a task (returned to the cache on scope exit; stream order makes
// reusing it safe even while kernels that read it are still queued).
struct DeviceBuffer {
  int dev;
  size_t n;
  void* p;
  DeviceBuffer(int d, size_t bytes) : dev(d), n(bytes), p(cuda::device_alloc(d, bytes)) {}
  ~DeviceBuffer() { cuda::device_free(dev, p, n); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

// A shape-only stand-in for t: same dtype, shape, strides, offset and storage size, no memory.
Tensor shadow_of(const Tensor& t) {
  auto st = std::make_shared<Storage>();
  st->nbytes = t.storage->nbytes;
  st->meta = true;
  st->mapped = t.storage->mapped;
  memory_stats().storages++;  // ~Storage counts down
  Tensor s = t;
  s.storage = std::move(st);
  return s;
}

// Pick batch index bi (row-major over `batch`) of v's leading dims, broadcasting size-1 / missing dims
// (the same as ops.cpp's MATMUL).
KView batch_sub(const KView& v, const Shape& batch, int64_t bi) {
  KView r;
  r.data = v.data;
  r.dtype = v.dtype;
  r.ndim = 2;
  r.shape[0] = v.shape[v.ndim - 2];
  r.shape[1] = v.shape[v.ndim - 1];
  r.strides[0] = v.strides[v.ndim - 2];
  r.strides[1] = v.strides[v.ndim - 1];
  const int vb = v.ndim - 2, nbd = static_cast<int>(batch.size());
  int64_t rem = bi, off = 0;
  for (int i = nbd - 1; i >= 0; i--) {
    const int64_t idx = rem % batch[i];
    rem /= batch[i];
    const int vi = i - (nbd - vb);
    if (vi >= 0 && v.shape[vi] != 1) off += idx * v.strides[vi];
  }
  r.data = static_cast<char*>(v.data) + off * static_cast<int64_t>(dtype_size(v.dtype));
  return r;
}
#endif

}  // namespace

std::vector<Tensor> run_op_cuda(Op op, const std::vector<const Tensor*>& in, const std::vector<double>& at, int dev) {
  const char* name = op_info(op).name;
#if !NX_WITH_CUDA
  (void)in;
  (void)at;
  NX_FAIL("DEVICE", name << ": the inputs are on " << device_str(dev) << ", but this build has no CUDA");
  return {};
#else
  require_cuda(dev, name);
  // 1. The CPU dispatcher's checks and output layouts, on shape-only stand-ins (nothing is queued:
  //    the executor skips tasks over shape-only storages).
  std::vector<Tensor> shadows(in.size());
  std::vector<const Tensor*> sp(in.size(), nullptr);
  for (size_t i = 0; i < in.size(); i++)
    if (in[i]) {
      shadows[i] = shadow_of(*in[i]);
      sp[i] = &shadows[i];
    }
  std::vector<Tensor> vouts;
  {
    ShapeOnlyScope shape_only;
    vouts = run_op(op, sp, at);
  }
  // 2. Real outputs: an in-place op's output is its input; others get device memory of the same size.
  std::vector<Tensor> outs;
  for (size_t j = 0; j < vouts.size(); j++) {
    Tensor r = vouts[j];
    std::shared_ptr<Storage> real;
    for (size_t i = 0; i < in.size() && !real; i++)
      if (in[i] && vouts[j].storage == shadows[i].storage) real = in[i]->storage;
    for (size_t k = 0; k < j && !real; k++)
      if (vouts[k].storage == vouts[j].storage) real = outs[k].storage;
    if (!real) real = Tensor::empty_on({static_cast<int64_t>(vouts[j].storage->nbytes)}, DType::BOOL, dev).storage;
    r.storage = std::move(real);
    outs.push_back(std::move(r));
  }
  // 3. Queue the kernel.
  std::vector<std::shared_ptr<Storage>> ins_st, outs_st;
  for (const Tensor* t : in)
    if (t) ins_st.push_back(t->storage);
  for (const Tensor& o : outs) outs_st.push_back(o.storage);
  auto queue = [&](std::function<void()> fn) {
    executor().submit(
        [dev, fn = std::move(fn)] {
          cuda::set_device(dev);
          fn();
        },
        ins_st, outs_st);
  };
  const int n = static_cast<int>(in.size());
  auto kv = [&](int i) { return in[i]->kview(); };
  auto has = [&](int i) { return n > i && in[i] != nullptr; };

  switch (op) {
    case Op::ADD: case Op::SUB: case Op::MUL: case Op::DIV: case Op::POW: case Op::MAXIMUM: case Op::MINIMUM:
    case Op::EQ: case Op::NE: case Op::LT: case Op::LE: case Op::GT: case Op::GE: {
      const BinaryOp bop = static_cast<BinaryOp>(static_cast<int>(op) - static_cast<int>(Op::ADD));
      KView a = kv(0), b = kv(1), o = outs[0].kview();
      queue([=] { cuda::binary(bop, a, b, o); });
      break;
    }
    case Op::NEG: case Op::ABS: case Op::EXP: case Op::LOG: case Op::SQRT: case Op::RSQRT: case Op::RELU:
    case Op::GELU_TANH: case Op::GELU: case Op::SILU: case Op::TANH: case Op::SIGMOID: case Op::SIN: case Op::COS:
    case Op::SQUARE: case Op::RECIPROCAL: {
      const UnaryOp uop = static_cast<UnaryOp>(static_cast<int>(op) - static_cast<int>(Op::NEG));
      KView x = kv(0), o = outs[0].kview();
      queue([=] { cuda::unary(uop, x, o); });
      break;
    }
    case Op::CAST: {
      KView x = kv(0), o = outs[0].kview();
      queue([=] { cuda::cast(x, o); });
      break;
    }
    case Op::COPY_: {
      KView d = kv(0), s = kv(1);
      queue([=] { cuda::cast(s, d); });
      break;
    }
    case Op::FILL_: {
      KView d = kv(0);
      const double v = at[0];
      queue([=] { cuda::fill(d, v); });
      break;
    }
    case Op::RANDN_: {
      KView dv = kv(0);
      const uint64_t seed = static_cast<uint64_t>(at[0]);
      const double mean = at.size() > 1 ? at[1] : 0.0, stdv = at.size() > 2 ? at[2] : 1.0;
      queue([=] {
        // The CPU op's generator (ops.cpp RANDN_: mt19937_64 + Box-Muller, row-major order of the view)
        // on the host, so both devices draw the same values; then one copy and a cast into the view.
        const int64_t count = dv.numel();
        if (count == 0) return;
        std::vector<float> host(static_cast<size_t>(count));
        NormalStream normal(seed);
        for (int64_t lin = 0; lin < count; lin++) {
          const double z = normal.next();
          host[static_cast<size_t>(lin)] = static_cast<float>(mean + stdv * z);
        }
        DeviceBuffer buf(dev, host.size() * sizeof(float));
        cuda::copy_h2d(buf.p, host.data(), host.size() * sizeof(float));
        KView src = cuda::dense_view(buf.p, DType::F32, dv.ndim, dv.shape);
        cuda::cast(src, dv);
      });
      break;
    }
    case Op::WHERE: {
      KView c = kv(0), a = kv(1), b = kv(2), o = outs[0].kview();
      queue([=] { cuda::where(c, a, b, o); });
      break;
    }
    case Op::SUM: case Op::MEAN: case Op::MAX: case Op::MIN: case Op::PROD: case Op::ARGMAX: case Op::ARGMIN: {
      const ReduceOp rop = static_cast<ReduceOp>(static_cast<int>(op) - static_cast<int>(Op::SUM));
      const int dim = normalize_dim(static_cast<int64_t>(at[0]), in[0]->ndim(), name);
      KView x = kv(0), o = outs[0].kview();
      queue([=] { cuda::reduce(rop, x, dim, o); });
      break;
    }
    case Op::CUMSUM: case Op::SOFTMAX: case Op::LOG_SOFTMAX: {
      const int dim = normalize_dim(static_cast<int64_t>(at[0]), in[0]->ndim(), name);
      KView x = kv(0), o = outs[0].kview();
      if (op == Op::CUMSUM) {
        queue([=] { cuda::cumsum(x, dim, o); });
      } else {
        const bool lg = op == Op::LOG_SOFTMAX;
        queue([=] { cuda::softmax(x, dim, lg, o); });
      }
      break;
    }
    case Op::RMSNORM: case Op::LAYERNORM: {
      const float eps = static_cast<float>(at[0]);
      const bool hw = has(1), hb = has(2);
      KView x = kv(0), o = outs[0].kview(), w = hw ? kv(1) : KView{}, b = hb ? kv(2) : KView{};
      if (op == Op::RMSNORM)
        queue([=] { cuda::rmsnorm(x, hw ? &w : nullptr, eps, o); });
      else
        queue([=] { cuda::layernorm(x, hw ? &w : nullptr, hb ? &b : nullptr, eps, o); });
      break;
    }
    case Op::MATMUL: {
      const Tensor &a0 = *in[0], &b0 = *in[1];
      const Tensor a = a0.ndim() == 1 ? a0.view({1, a0.shape[0]}, {0, a0.strides[0]}, a0.offset) : a0;
      const Tensor b = b0.ndim() == 1 ? b0.view({b0.shape[0], 1}, {b0.strides[0], 0}, b0.offset) : b0;
      const int64_t M = a.shape[a.ndim() - 2], N = b.shape[b.ndim() - 1];
      const int abd = a.ndim() - 2, bbd = b.ndim() - 2, nb = std::max(abd, bbd);
      Shape batch(nb);
      for (int i = 0; i < nb; i++) {
        const int64_t da = i - (nb - abd) >= 0 ? a.shape[i - (nb - abd)] : 1;
        const int64_t db = i - (nb - bbd) >= 0 ? b.shape[i - (nb - bbd)] : 1;
        batch[i] = std::max(da, db);
      }
      Shape ofull = batch;
      ofull.push_back(M);
      ofull.push_back(N);
      const Tensor o2 = outs[0].view(ofull, Tensor::contiguous_strides(ofull), outs[0].offset);
      int64_t nbatch = 1;
      for (auto d : batch) nbatch *= d;
      const bool hb = has(2);
      KView av = a.kview(), bv = b.kview(), ov = o2.kview(), biasv = hb ? kv(2) : KView{};
      queue([=] {
        for (int64_t bi = 0; bi < nbatch; bi++)
          cuda::gemm(batch_sub(av, batch, bi), batch_sub(bv, batch, bi), hb ? &biasv : nullptr, batch_sub(ov, batch, bi));
      });
      break;
    }
    case Op::ROPE: {
      const bool inter = at[0] != 0;
      KView x = kv(0), p = kv(1), f = kv(2), o = outs[0].kview();
      queue([=] { cuda::rope(x, p, f, inter, o); });
      break;
    }
    case Op::ATTENTION: {
      NX_CHECK(in[0]->shape[3] <= cuda::kAttentionMaxHeadDim, "UNSUPPORTED",
               name << " on CUDA supports head_dim up to " << cuda::kAttentionMaxHeadDim << ", got " << in[0]->shape[3]);
      const float scale = static_cast<float>(at[0]);
      const bool hm = has(3);
      KView q = kv(0), k = kv(1), v = kv(2), m = hm ? kv(3) : KView{}, o = outs[0].kview();
      queue([=] { cuda::attention(q, k, v, hm ? &m : nullptr, scale, o); });
      break;
    }
    case Op::EMBEDDING: {
      KView w = kv(0), ids = kv(1), o = outs[0].kview();
      queue([=] { cuda::embedding(w, ids, o); });
      break;
    }
    case Op::GATHER: case Op::INDEX_SELECT: {
      const int dim = normalize_dim(static_cast<int64_t>(at[0]), in[0]->ndim(), name);
      KView x = kv(0), idx = kv(1), o = outs[0].kview();
      if (op == Op::GATHER)
        queue([=] { cuda::gather(x, dim, idx, o); });
      else
        queue([=] { cuda::index_select(x, dim, idx, o); });
      break;
    }
    case Op::SCATTER_: {
      const int dim = normalize_dim(static_cast<int64_t>(at[0]), in[0]->ndim(), name);
      KView d = kv(0), idx = kv(1), s = kv(2);
      queue([=] { cuda::scatter(d, dim, idx, s); });
      break;
    }
    case Op::TOPK: {
      const int64_t k = static_cast<int64_t>(at[0]);
      KView x = kv(0), v = outs[0].kview(), i = outs[1].kview();
      queue([=] { cuda::topk(x, k, v, i); });
      break;
    }
    default:
      NX_FAIL("UNSUPPORTED", name << " has no CUDA kernel yet; run it on the CPU (tensor.cpu())");
  }
  return outs;
#endif
}

Tensor to_device(const Tensor& t, int dev) {
  const int src = t.device();
  if (src == dev) return t;
  NX_CHECK(dev >= -1, "DEVICE", "bad device index " << dev);
#if !NX_WITH_CUDA
  NX_FAIL("DEVICE", "cannot move a tensor to " << device_str(dev)
                                               << ": this build has no CUDA (the addon was built without a CUDA toolkit)");
  return t;
#else
  if (dev >= 0) require_cuda(dev, "moving a tensor");
  if (src >= 0) require_cuda(src, "moving a tensor");
  Tensor out = Tensor::empty_on(t.shape, t.dtype, dev);
  const KView sv = t.kview(), ov = out.kview();
  const size_t nbytes = static_cast<size_t>(t.numel()) * dtype_size(t.dtype);
  const bool contig = t.is_contiguous();
  executor().submit(
      [=] {
        if (nbytes == 0) return;
        // host bytes of the source in row-major order (a dense copy first when the view is strided)
        auto to_host = [&](void* dst) {
          cuda::set_device(src);
          if (contig) {
            cuda::copy_d2h(dst, sv.data, nbytes);
          } else {
            DeviceBuffer tmp(src, nbytes);
            cuda::cast(sv, cuda::dense_view(tmp.p, sv.dtype, sv.ndim, sv.shape));
            cuda::copy_d2h(dst, tmp.p, nbytes);
          }
        };
        if (src < 0) {  // host -> device
          cuda::set_device(dev);
          if (contig) {
            cuda::copy_h2d(ov.data, sv.data, nbytes);
          } else {
            std::vector<unsigned char> tmp(nbytes);
            fast::cast(sv, cuda::dense_view(tmp.data(), sv.dtype, sv.ndim, sv.shape));
            cuda::copy_h2d(ov.data, tmp.data(), nbytes);
          }
        } else if (dev < 0) {  // device -> host
          to_host(ov.data);
        } else {  // device -> another device, through the host
          std::vector<unsigned char> tmp(nbytes);
          to_host(tmp.data());
          cuda::set_device(dev);
          cuda::copy_h2d(ov.data, tmp.data(), nbytes);
        }
      },
      {t.storage}, {out.storage});
  return out;
#endif
}

void read_bytes(const Tensor& d, void* dst, size_t nbytes) {
  if (nbytes == 0) return;
  if (d.device() < 0) {
    std::memcpy(dst, d.data(), nbytes);
    return;
  }
#if NX_WITH_CUDA
  cuda::set_device(d.device());
  cuda::copy_d2h(dst, d.data(), nbytes);
#else
  NX_FAIL("DEVICE", "a tensor on " << device_str(d.device()) << " in a build without CUDA");
#endif
}

}  // namespace nx
