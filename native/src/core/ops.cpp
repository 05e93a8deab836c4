// ops.cpp: the op dispatcher (see ops.h). One switch over the op table's families; each case checks
// its arguments, allocates outputs, and queues a closure that calls the fast (or reference) kernel.
//
// Attributes by family:
//   CAST [dtype]; FILL_ [value]; RANDN_ [seed, mean, std]; REDUCE and SCAN [dim];
//   RMSNORM / LAYERNORM [eps]; ROPE [interleaved 0/1]; ATTENTION [scale]; PACK_WEIGHT [release 0/1];
//   LINEAR_PACKED [N, act 0 none / 1 gelu_tanh / 2 gelu]; EMBEDDING [] or [V] (packed weight); GATHER / SCATTER_ /
//   INDEX_SELECT [dim]; TOPK [k].
#include "ops.h"

#include <cmath>
#include <cstdlib>
#include <random>

#include "../../../kernels/cpu/attention.h"
#include "../../../kernels/cpu/elementwise.h"
#include "../../../kernels/cpu/gemm.h"
#include "../../../kernels/cpu/index.h"
#include "../../../kernels/cpu/norm.h"
#include "../../../kernels/cpu/reduce.h"
#include "executor.h"
#include "mmap_file.h"
#include "ops_cuda.h"

namespace nx {

namespace {

const OpInfo kOpInfo[] = {
#define NX_OP_INFO(e, name, lo, hi, fam) {name, lo, hi, #fam},
    NX_OP_TABLE(NX_OP_INFO)
#undef NX_OP_INFO
};

bool g_use_ref = [] {
  const char* s = std::getenv("NX_KERNELS");
  return s != nullptr && std::string(s) == "ref";
}();

using Storages = std::vector<std::shared_ptr<Storage>>;

Storages storages_of(const std::vector<const Tensor*>& ts) {
  Storages s;
  for (auto* t : ts)
    if (t) s.push_back(t->storage);
  return s;
}

void check_same_shape(const Tensor& a, const Tensor& b, const char* op) {
  NX_CHECK(a.shape == b.shape, "SHAPE", op << ": shapes " << shape_str(a.shape) << " and " << shape_str(b.shape) << " differ");
}
void check_float(const Tensor& t, const char* op, const char* what) {
  NX_CHECK(dtype_is_float(t.dtype), "DTYPE", op << ": " << what << " must be a float tensor, got " << dtype_name(t.dtype));
}
void check_int(const Tensor& t, const char* op, const char* what) {
  NX_CHECK(t.dtype == DType::I32 || t.dtype == DType::I64, "DTYPE",
           op << ": " << what << " must be int32 or int64, got " << dtype_name(t.dtype));
}
void check_writable(const Tensor& t, const char* op) {
  NX_CHECK(!t.storage->mapped, "BAD_INPUT", op << ": cannot write into a read-only (memory-mapped) tensor; clone it first");
}
double attr(const std::vector<double>& a, size_t i, const char* op, const char* name) {
  NX_CHECK(i < a.size(), "BAD_INPUT", op << ": missing attribute '" << name << "'");
  return a[i];
}
DType dtype_from(double v, const char* op) {
  int i = static_cast<int>(v);
  NX_CHECK(i >= 0 && i < kNumDTypes && i == v, "DTYPE", op << ": unknown dtype id " << v);
  return static_cast<DType>(i);
}
// The profile label of an op call (executor.h; built only while profiling): the op name and a shape
// class. matmul: "matmul MxKxN" per 2-D product (batch dims as "B*"), the weight's dtype when not f32,
// "bT" for a transposed b (nn.Linear weights), "+bias"; linear_packed: "MxKxN", "+bias", the fused
// activation; other ops: the first input's shape and dtype when not f32.
std::string profile_label(Op op, const char* name, const std::vector<const Tensor*>& in, const std::vector<double>& at) {
  std::string s = name;
  if (in.empty() || in[0] == nullptr) return s;
  const Tensor& a = *in[0];
  s += ' ';
  if (op == Op::MATMUL && in.size() > 1 && in[1] != nullptr && a.ndim() >= 1) {
    const Tensor& b = *in[1];
    int64_t nb = 1;
    for (int i = 0; i + 2 < a.ndim(); i++) nb *= a.shape[i];
    const int64_t M = a.ndim() >= 2 ? a.shape[a.ndim() - 2] : 1, K = a.shape.back();
    const int64_t N = b.ndim() >= 2 ? b.shape.back() : 1;
    if (nb > 1) s += std::to_string(nb) + "*";
    s += std::to_string(M) + "x" + std::to_string(K) + "x" + std::to_string(N);
    if (b.dtype != DType::F32) s += std::string(" ") + dtype_name(b.dtype);
    if (b.ndim() >= 2 && b.strides[b.ndim() - 2] == 1 && b.shape.back() > 1) s += " bT";
    if (in.size() > 2 && in[2] != nullptr) s += " +bias";
    return s;
  }
  if (op == Op::LINEAR_PACKED && a.ndim() == 2 && !at.empty()) {
    s += std::to_string(a.shape[0]) + "x" + std::to_string(a.shape[1]) + "x" + std::to_string(static_cast<int64_t>(at[0]));
    if (in.size() > 2 && in[2] != nullptr) s += " +bias";
    if (at.size() > 1 && at[1] != 0) s += at[1] == 1 ? " +gelu_tanh" : " +gelu";
    if (in.size() > 3 && in[3] != nullptr) s += " +residual";
    return s;
  }
  s += shape_str(a.shape);
  if (a.dtype != DType::F32) s += std::string(" ") + dtype_name(a.dtype);
  return s;
}

Shape keepdim_shape(const Shape& s, int dim) {
  Shape r = s;
  if (!r.empty()) r[dim] = 1;
  return r;
}

}  // namespace

const OpInfo& op_info(Op op) { return kOpInfo[static_cast<int>(op)]; }
void set_use_reference_kernels(bool ref) { g_use_ref = ref; }
bool use_reference_kernels() { return g_use_ref; }

double NormalStream::next() {
  if (has_spare_) {
    has_spare_ = false;
    return spare_;
  }
  const double two_pi = 6.283185307179586;
  double u1 = (static_cast<double>(g_() >> 11) + 1.0) * (1.0 / 9007199254740993.0);
  double u2 = static_cast<double>(g_() >> 11) * (1.0 / 9007199254740992.0);
  double r = std::sqrt(-2.0 * std::log(u1));
  spare_ = r * std::sin(two_pi * u2);
  has_spare_ = true;
  return r * std::cos(two_pi * u2);
}

DType promote_types(DType a, DType b) {
  if (a == b) return a;
  bool fa = dtype_is_float(a), fb = dtype_is_float(b);
  if (fa && fb) return DType::F32;  // mixed float widths compute and store in f32
  if (fa) return a;
  if (fb) return b;
  if (a == DType::BOOL) return b;
  if (b == DType::BOOL) return a;
  return DType::I64;
}

std::vector<Tensor> run_op(Op op, const std::vector<const Tensor*>& in, const std::vector<double>& at) {
  NX_CHECK(static_cast<int>(op) >= 0 && op < Op::COUNT, "INVALID_GRAPH", "unknown op id " << static_cast<int>(op));
  const OpInfo& info = op_info(op);
  const char* name = info.name;
  int n = static_cast<int>(in.size());
  NX_CHECK(n >= info.min_inputs && n <= info.max_inputs, "BAD_INPUT",
           name << ": expects " << info.min_inputs << (info.max_inputs != info.min_inputs ? "+" : "") << " inputs, got " << n);
  for (int i = 0; i < info.min_inputs; i++) NX_CHECK(in[i] != nullptr, "BAD_INPUT", name << ": input " << i << " is missing");
  // Inputs on a CUDA device run there (ops_cuda.cpp); a mix of devices is a DEVICE error.
  if (const int dev = op_device(op, in); dev >= 0) return run_op_cuda(op, in, at, dev);
  const bool ref = g_use_ref;
  Storages ins = storages_of(in);
  auto queue = [&](std::function<void()> fn, const std::vector<Tensor>& outs) {
    Storages os;
    for (auto& o : outs) os.push_back(o.storage);
    executor().submit(std::move(fn), ins, os, Executor::profiling() ? profile_label(op, name, in, at) : std::string());
  };

  switch (op) {
    // ---------------- binary ----------------
    case Op::ADD: case Op::SUB: case Op::MUL: case Op::DIV: case Op::POW: case Op::MAXIMUM: case Op::MINIMUM:
    case Op::EQ: case Op::NE: case Op::LT: case Op::LE: case Op::GT: case Op::GE: {
      const Tensor &a = *in[0], &b = *in[1];
      check_same_shape(a, b, name);
      BinaryOp bop = static_cast<BinaryOp>(static_cast<int>(op) - static_cast<int>(Op::ADD));
      DType odt = promote_types(a.dtype, b.dtype);
      if (op >= Op::EQ) odt = DType::BOOL;
      else if ((op == Op::DIV || op == Op::POW) && !dtype_is_float(odt)) odt = DType::F32;
      else if (odt == DType::BOOL) odt = DType::I64;
      Tensor out = Tensor::empty(a.shape, odt);
      KView av = a.kview(), bv = b.kview(), ov = out.kview();
      queue([=] { ref ? ref::binary(bop, av, bv, ov) : fast::binary(bop, av, bv, ov); }, {out});
      return {out};
    }
    // ---------------- unary ----------------
    case Op::NEG: case Op::ABS: case Op::EXP: case Op::LOG: case Op::SQRT: case Op::RSQRT: case Op::RELU:
    case Op::GELU_TANH: case Op::GELU: case Op::SILU: case Op::TANH: case Op::SIGMOID: case Op::SIN: case Op::COS:
    case Op::SQUARE: case Op::RECIPROCAL: {
      const Tensor& x = *in[0];
      UnaryOp uop = static_cast<UnaryOp>(static_cast<int>(op) - static_cast<int>(Op::NEG));
      bool keeps_int = op == Op::NEG || op == Op::ABS || op == Op::RELU || op == Op::SQUARE;
      DType odt = dtype_is_float(x.dtype) ? x.dtype : (keeps_int && x.dtype != DType::BOOL ? x.dtype : DType::F32);
      Tensor out = Tensor::empty(x.shape, odt);
      KView xv = x.kview(), ov = out.kview();
      queue([=] { ref ? ref::unary(uop, xv, ov) : fast::unary(uop, xv, ov); }, {out});
      return {out};
    }
    // ---------------- data movement ----------------
    case Op::CAST: {
      const Tensor& x = *in[0];
      DType odt = dtype_from(attr(at, 0, name, "dtype"), name);
      Tensor out = Tensor::empty(x.shape, odt);
      KView xv = x.kview(), ov = out.kview();
      queue([=] { ref ? ref::cast(xv, ov) : fast::cast(xv, ov); }, {out});
      return {out};
    }
    case Op::COPY_: {
      const Tensor &dst = *in[0], &src = *in[1];
      check_same_shape(dst, src, name);
      check_writable(dst, name);
      KView dv = dst.kview(), sv = src.kview();
      queue([=] { ref ? ref::cast(sv, dv) : fast::cast(sv, dv); }, {dst});
      return {dst};
    }
    case Op::FILL_: {
      const Tensor& dst = *in[0];
      check_writable(dst, name);
      double v = attr(at, 0, name, "value");
      KView dv = dst.kview();
      queue([=] { ref ? ref::fill(dv, v) : fast::fill(dv, v); }, {dst});
      return {dst};
    }
    case Op::RANDN_: {
      const Tensor& dst = *in[0];
      check_writable(dst, name);
      check_float(dst, name, "target");
      uint64_t seed = static_cast<uint64_t>(attr(at, 0, name, "seed"));
      double mean = at.size() > 1 ? at[1] : 0.0, stdv = at.size() > 2 ? at[2] : 1.0;
      KView dv = dst.kview();
      queue([=] {
        // in row-major order of the view
        NormalStream normal(seed);
        for_each_index(dv.ndim, dv.shape, [&](int64_t, const int64_t* idx) {
          const double z = normal.next();
          store_f32(dv.data, dv.dtype, dv.offset_of(idx), static_cast<float>(mean + stdv * z));
        });
      }, {dst});
      return {dst};
    }
    case Op::WHERE: {
      const Tensor &c = *in[0], &a = *in[1], &b = *in[2];
      check_same_shape(c, a, name);
      check_same_shape(a, b, name);
      DType odt = promote_types(a.dtype, b.dtype);
      Tensor out = Tensor::empty(a.shape, odt);
      KView cv = c.kview(), av = a.kview(), bv = b.kview(), ov = out.kview();
      queue([=] { ref ? ref::where(cv, av, bv, ov) : fast::where(cv, av, bv, ov); }, {out});
      return {out};
    }
    // ---------------- reductions ----------------
    case Op::SUM: case Op::MEAN: case Op::MAX: case Op::MIN: case Op::PROD: case Op::ARGMAX: case Op::ARGMIN: {
      const Tensor& x = *in[0];
      int dim = normalize_dim(static_cast<int64_t>(attr(at, 0, name, "dim")), x.ndim(), name);
      NX_CHECK(x.ndim() > 0, "SHAPE", name << ": needs at least one dim");
      NX_CHECK(x.shape[dim] > 0 || op == Op::SUM || op == Op::PROD, "SHAPE", name << ": cannot reduce an empty dim");
      ReduceOp rop = static_cast<ReduceOp>(static_cast<int>(op) - static_cast<int>(Op::SUM));
      DType odt = x.dtype;
      if (op == Op::ARGMAX || op == Op::ARGMIN) odt = DType::I64;
      else if (op == Op::MEAN && !dtype_is_float(x.dtype)) odt = DType::F32;
      else if ((op == Op::SUM || op == Op::PROD) && !dtype_is_float(x.dtype)) odt = DType::I64;
      Tensor out = Tensor::empty(keepdim_shape(x.shape, dim), odt);
      KView xv = x.kview(), ov = out.kview();
      queue([=] { ref ? ref::reduce(rop, xv, dim, ov) : fast::reduce(rop, xv, dim, ov); }, {out});
      return {out};
    }
    case Op::CUMSUM: case Op::SOFTMAX: case Op::LOG_SOFTMAX: {
      const Tensor& x = *in[0];
      int dim = normalize_dim(static_cast<int64_t>(attr(at, 0, name, "dim")), x.ndim(), name);
      NX_CHECK(x.ndim() > 0, "SHAPE", name << ": needs at least one dim");
      DType odt = x.dtype;
      if (op == Op::CUMSUM) {
        if (!dtype_is_float(x.dtype)) odt = DType::I64;
      } else {
        check_float(x, name, "input");
      }
      Tensor out = Tensor::empty(x.shape, odt);
      KView xv = x.kview(), ov = out.kview();
      if (op == Op::CUMSUM)
        queue([=] { ref ? ref::cumsum(xv, dim, ov) : fast::cumsum(xv, dim, ov); }, {out});
      else {
        bool lg = op == Op::LOG_SOFTMAX;
        queue([=] { ref ? ref::softmax(xv, dim, lg, ov) : fast::softmax(xv, dim, lg, ov); }, {out});
      }
      return {out};
    }
    // ---------------- norms ----------------
    case Op::RMSNORM: case Op::LAYERNORM: {
      const Tensor& x = *in[0];
      check_float(x, name, "input");
      NX_CHECK(x.ndim() >= 1, "SHAPE", name << ": needs at least one dim");
      int64_t d = x.shape.back();
      for (int i = 1; i < n; i++) {
        if (!in[i]) continue;
        check_float(*in[i], name, i == 1 ? "weight" : "bias");
        NX_CHECK(in[i]->ndim() == 1 && in[i]->shape[0] == d, "SHAPE",
                 name << ": " << (i == 1 ? "weight" : "bias") << " must be [" << d << "], got " << shape_str(in[i]->shape));
      }
      float eps = static_cast<float>(attr(at, 0, name, "eps"));
      Tensor out = Tensor::empty(x.shape, x.dtype);
      KView xv = x.kview(), ov = out.kview();
      bool hw = n > 1 && in[1], hb = n > 2 && in[2];
      KView wv = hw ? in[1]->kview() : KView{}, bv = hb ? in[2]->kview() : KView{};
      if (op == Op::RMSNORM)
        queue([=] { ref ? ref::rmsnorm(xv, hw ? &wv : nullptr, eps, ov) : fast::rmsnorm(xv, hw ? &wv : nullptr, eps, ov); }, {out});
      else
        queue([=] {
          ref ? ref::layernorm(xv, hw ? &wv : nullptr, hb ? &bv : nullptr, eps, ov)
              : fast::layernorm(xv, hw ? &wv : nullptr, hb ? &bv : nullptr, eps, ov);
        }, {out});
      return {out};
    }
    // ---------------- linear algebra ----------------
    case Op::MATMUL: {
      const Tensor &a0 = *in[0], &b0 = *in[1];
      check_float(a0, name, "a");
      check_float(b0, name, "b");
      NX_CHECK(a0.ndim() >= 1 && b0.ndim() >= 1, "SHAPE", name << ": inputs must have at least one dim");
      // 1-D operands follow torch.matmul: a [K] -> [1, K] (dropped after), b [K] -> [K, 1].
      Tensor a = a0.ndim() == 1 ? a0.view({1, a0.shape[0]}, {0, a0.strides[0]}, a0.offset) : a0;
      Tensor b = b0.ndim() == 1 ? b0.view({b0.shape[0], 1}, {b0.strides[0], 0}, b0.offset) : b0;
      int64_t M = a.shape[a.ndim() - 2], K = a.shape[a.ndim() - 1];
      int64_t K2 = b.shape[b.ndim() - 2], N = b.shape[b.ndim() - 1];
      NX_CHECK(K == K2, "SHAPE", name << ": cannot multiply " << shape_str(a0.shape) << " by " << shape_str(b0.shape)
                                      << " (inner sizes " << K << " and " << K2 << " differ)");
      if (n > 2 && in[2]) {
        check_float(*in[2], name, "bias");
        NX_CHECK(in[2]->ndim() == 1 && in[2]->shape[0] == N, "SHAPE", name << ": bias must be [" << N << "], got " << shape_str(in[2]->shape));
      }
      // Broadcast batch dims.
      int abd = a.ndim() - 2, bbd = b.ndim() - 2, nb = std::max(abd, bbd);
      Shape batch(nb);
      for (int i = 0; i < nb; i++) {
        int64_t da = i - (nb - abd) >= 0 ? a.shape[i - (nb - abd)] : 1;
        int64_t db = i - (nb - bbd) >= 0 ? b.shape[i - (nb - bbd)] : 1;
        NX_CHECK(da == db || da == 1 || db == 1, "SHAPE",
                 name << ": batch dims of " << shape_str(a0.shape) << " and " << shape_str(b0.shape) << " do not broadcast");
        batch[i] = std::max(da, db);
      }
      Shape oshape = batch;
      if (a0.ndim() > 1) oshape.push_back(M);
      if (b0.ndim() > 1) oshape.push_back(N);
      Tensor out = Tensor::empty(oshape, DType::F32);
      // A view of out with explicit [..., M, N] dims for the kernel.
      Shape ofull = batch;
      ofull.push_back(M);
      ofull.push_back(N);
      Tensor o2 = out.view(ofull, Tensor::contiguous_strides(ofull), 0);
      int64_t nbatch = 1;
      for (auto d : batch) nbatch *= d;
      KView av = a.kview(), bv = b.kview(), ov = o2.kview();
      bool hb = n > 2 && in[2];
      KView biasv = hb ? in[2]->kview() : KView{};
      queue([=] {
        auto sub = [](const KView& v, const Shape& batch, int64_t bi) {
          // pick batch index bi (row-major over `batch`) of v, broadcasting size-1 / missing dims
          KView r;
          r.data = v.data;
          r.dtype = v.dtype;
          r.ndim = 2;
          r.shape[0] = v.shape[v.ndim - 2];
          r.shape[1] = v.shape[v.ndim - 1];
          r.strides[0] = v.strides[v.ndim - 2];
          r.strides[1] = v.strides[v.ndim - 1];
          int vb = v.ndim - 2, nbd = static_cast<int>(batch.size());
          int64_t rem = bi, off = 0;
          for (int i = nbd - 1; i >= 0; i--) {
            int64_t idx = rem % batch[i];
            rem /= batch[i];
            int vi = i - (nbd - vb);
            if (vi >= 0 && v.shape[vi] != 1) off += idx * v.strides[vi];
          }
          r.data = static_cast<char*>(v.data) + off * static_cast<int64_t>(dtype_size(v.dtype));
          return r;
        };
        for (int64_t bi = 0; bi < nbatch; bi++) {
          KView as = sub(av, batch, bi), bs = sub(bv, batch, bi), os = sub(ov, batch, bi);
          ref ? ref::gemm(as, bs, hb ? &biasv : nullptr, os) : fast::gemm(as, bs, hb ? &biasv : nullptr, os);
        }
      }, {out});
      return {out};
    }
    case Op::ROPE: {
      const Tensor &x = *in[0], &pos = *in[1], &inv = *in[2];
      check_float(x, name, "x");
      check_int(pos, name, "positions");
      NX_CHECK(x.ndim() == 4, "SHAPE", name << ": x must be [batch, seq, heads, head_dim], got " << shape_str(x.shape));
      NX_CHECK(pos.ndim() == 2 && pos.shape[0] == x.shape[0] && pos.shape[1] == x.shape[1], "SHAPE",
               name << ": positions must be [" << x.shape[0] << ", " << x.shape[1] << "], got " << shape_str(pos.shape));
      NX_CHECK(inv.dtype == DType::F32 && inv.ndim() == 1 && inv.shape[0] * 2 <= x.shape[3], "SHAPE",
               name << ": inv_freq must be f32 [rot_dim/2] with rot_dim <= head_dim");
      bool inter = attr(at, 0, name, "interleaved") != 0;
      Tensor out = Tensor::empty(x.shape, x.dtype);
      KView xv = x.kview(), pv = pos.kview(), iv = inv.kview(), ov = out.kview();
      queue([=] { ref ? ref::rope(xv, pv, iv, inter, ov) : fast::rope(xv, pv, iv, inter, ov); }, {out});
      return {out};
    }
    case Op::ATTENTION: {
      const Tensor &q = *in[0], &k = *in[1], &v = *in[2];
      check_float(q, name, "q");
      check_float(k, name, "k");
      check_float(v, name, "v");
      NX_CHECK(q.ndim() == 4 && k.ndim() == 4 && v.ndim() == 4, "SHAPE", name << ": q, k, v must be [batch, heads, seq, head_dim]");
      NX_CHECK(k.shape == v.shape, "SHAPE", name << ": k " << shape_str(k.shape) << " and v " << shape_str(v.shape) << " differ");
      NX_CHECK(q.shape[0] == k.shape[0] && q.shape[3] == k.shape[3], "SHAPE",
               name << ": q " << shape_str(q.shape) << " does not match k " << shape_str(k.shape));
      NX_CHECK(k.shape[1] > 0 && q.shape[1] % k.shape[1] == 0, "SHAPE", name << ": query heads must be a multiple of kv heads");
      NX_CHECK(k.shape[2] >= q.shape[2], "SHAPE", name << ": fewer keys than queries");
      bool hm = n > 3 && in[3];
      if (hm)
        NX_CHECK(in[3]->ndim() == 2 && in[3]->shape[0] == q.shape[0] && in[3]->shape[1] == k.shape[2], "SHAPE",
                 name << ": mask must be [" << q.shape[0] << ", " << k.shape[2] << "], got " << shape_str(in[3]->shape));
      float scale = static_cast<float>(attr(at, 0, name, "scale"));
      // Stored as [B, Tq, Hq, D] and returned as the [B, Hq, Tq, D] view: transposing back (what every
      // model does before o_proj) is then free.
      Tensor phys = Tensor::empty({q.shape[0], q.shape[2], q.shape[1], q.shape[3]}, DType::F32);
      Tensor out = phys.view(q.shape, {phys.strides[0], phys.strides[2], phys.strides[1], phys.strides[3]}, 0);
      KView qv = q.kview(), kv = k.kview(), vv = v.kview(), ov = out.kview();
      KView mv = hm ? in[3]->kview() : KView{};
      queue([=] {
        ref ? ref::attention(qv, kv, vv, hm ? &mv : nullptr, scale, ov) : fast::attention(qv, kv, vv, hm ? &mv : nullptr, scale, ov);
      }, {out});
      return {out};
    }
    case Op::PACK_WEIGHT: {
      // w [K, N] (any float dtype and strides) -> the GEMM panel layout [P, K, W], P = ceil(N / W) (gemm.h).
      // [release] = 1: once packed, w's pages are dropped from this process when w lies in a read-only
      // file mapping (the mapped weights then do not count twice; reading w maps them again).
      const Tensor& w = *in[0];
      check_float(w, name, "weight");
      NX_CHECK(w.ndim() == 2, "SHAPE", name << ": weight must be [in, out], got " << shape_str(w.shape));
      const bool release = !at.empty() && at[0] != 0 && w.storage->mapped;
      const int64_t K = w.shape[0], N = w.shape[1], W = packed_width();
      Tensor out = Tensor::empty({(N + W - 1) / W, K, W}, DType::F32);
      KView wv = w.kview(), ov = out.kview();
      NX_CHECK(w.strides[0] >= 0 && w.strides[1] >= 0, "BAD_INPUT", name << ": negative strides are not supported");
      size_t span = 0;  // bytes from w's first element to just past its last
      if (w.numel() > 0) {
        int64_t last = 0;
        for (int i = 0; i < 2; i++) last += (w.shape[i] - 1) * w.strides[i];
        span = static_cast<size_t>(last + 1) * dtype_size(w.dtype);
      }
      queue([=] {
        float* dst = static_cast<float*>(ov.data);
        if (ref) {
          ref::pack_weight(wv, dst);
        } else if (release && wv.stride(0) == 1 && N > W) {
          // W[N,K].t() (nn.Linear, tied embeddings): a run of panels reads a contiguous run of W rows, so
          // pack ~8 MiB of them at a time and drop their pages at once; the source and the packed copy
          // never coexist whole (the GPT-2 LM head is 154 MB).
          const int64_t chunk = std::max<int64_t>(1, (int64_t{8} << 20) / std::max<int64_t>(1, K * W * 4)) * W;
          for (int64_t j0 = 0; j0 < N; j0 += chunk) {
            KView part = wv;
            part.shape[1] = std::min(chunk, N - j0);
            part.data = static_cast<char*>(wv.data) + j0 * wv.stride(1) * static_cast<int64_t>(dtype_size(wv.dtype));
            fast::pack_weight(part, dst + j0 * K);
            drop_mapped_pages(part.data, static_cast<size_t>(((part.shape[1] - 1) * wv.stride(1) + K) * dtype_size(wv.dtype)));
          }
          return;
        } else {
          fast::pack_weight(wv, dst);
        }
        if (release && span > 0) drop_mapped_pages(wv.data, span);
      }, {out});
      return {out};
    }
    case Op::LINEAR_PACKED: {
      // out [M, N] = residual + act(a [M, K] @ w + bias), w given by pack_weight; [N, act]: act 0 none,
      // 1 gelu_tanh, 2 gelu (erf); residual [M, N] optional (added last: the same bits as an add op)
      const Tensor &a = *in[0], &pk = *in[1];
      check_float(a, name, "a");
      NX_CHECK(a.ndim() == 2, "SHAPE", name << ": a must be [rows, in], got " << shape_str(a.shape));
      const int64_t N = static_cast<int64_t>(attr(at, 0, name, "N"));
      const int act = at.size() > 1 ? static_cast<int>(at[1]) : 0;
      NX_CHECK(act >= 0 && act <= 2, "BAD_INPUT", name << ": unknown activation " << act);
      const int64_t K = a.shape[1], W = packed_width();
      NX_CHECK(N >= 0 && pk.dtype == DType::F32 && pk.ndim() == 3 && pk.is_contiguous() && pk.shape[0] == (N + W - 1) / W &&
                   pk.shape[1] == K && pk.shape[2] == W,
               "SHAPE", name << ": packed weight " << shape_str(pk.shape) << " " << dtype_name(pk.dtype) << " is not the packed form of an ["
                             << K << ", " << N << "] weight (pack_weight)");
      const bool hb = n > 2 && in[2];
      if (hb) {
        check_float(*in[2], name, "bias");
        NX_CHECK(in[2]->ndim() == 1 && in[2]->shape[0] == N, "SHAPE", name << ": bias must be [" << N << "], got " << shape_str(in[2]->shape));
      }
      const bool hr = n > 3 && in[3];
      if (hr) {
        check_float(*in[3], name, "residual");
        NX_CHECK(in[3]->ndim() == 2 && in[3]->shape[0] == a.shape[0] && in[3]->shape[1] == N, "SHAPE",
                 name << ": residual must be [" << a.shape[0] << ", " << N << "], got " << shape_str(in[3]->shape));
      }
      Tensor out = Tensor::empty({a.shape[0], N}, DType::F32);
      KView av = a.kview(), pv = pk.kview(), ov = out.kview();
      KView biasv = hb ? in[2]->kview() : KView{}, resv = hr ? in[3]->kview() : KView{};
      const Epilogue ep = static_cast<Epilogue>(act);
      queue([=] {
        const float* w = static_cast<const float*>(pv.data);
        const KView *bp = hb ? &biasv : nullptr, *rp = hr ? &resv : nullptr;
        ref ? ref::gemm_packed(av, w, N, bp, rp, ep, ov) : fast::gemm_packed(av, w, N, bp, rp, ep, ov);
      }, {out});
      return {out};
    }
    // ---------------- indexing ----------------
    case Op::EMBEDDING: {
      const Tensor &w = *in[0], &ids = *in[1];
      check_float(w, name, "weight");
      check_int(ids, name, "ids");
      if (!at.empty()) {
        // [V]: w is pack_weight's form of a [D, V] matrix (a tied LM head E.t()); row v of the table E
        // is its column v (gemm.h packed_columns)
        const int64_t V = static_cast<int64_t>(at[0]), W = packed_width();
        NX_CHECK(V >= 0 && w.dtype == DType::F32 && w.ndim() == 3 && w.is_contiguous() && w.shape[0] == (V + W - 1) / W && w.shape[2] == W,
                 "SHAPE", name << ": packed weight " << shape_str(w.shape) << " is not the packed form of a [dim, " << V << "] matrix");
        const int64_t D = w.shape[1];
        Shape os = ids.shape;
        os.push_back(D);
        Tensor out = Tensor::empty(os, DType::F32);
        KView wv = w.kview(), iv = ids.kview(), ov = out.kview();
        queue([=] { packed_columns(static_cast<const float*>(wv.data), D, V, iv, ov); }, {out});
        return {out};
      }
      NX_CHECK(w.ndim() == 2, "SHAPE", name << ": weight must be [vocab, dim]");
      Shape os = ids.shape;
      os.push_back(w.shape[1]);
      Tensor out = Tensor::empty(os, DType::F32);
      KView wv = w.kview(), iv = ids.kview(), ov = out.kview();
      queue([=] { ref ? ref::embedding(wv, iv, ov) : fast::embedding(wv, iv, ov); }, {out});
      return {out};
    }
    case Op::GATHER: case Op::INDEX_SELECT: {
      const Tensor &x = *in[0], &idx = *in[1];
      check_int(idx, name, "index");
      int dim = normalize_dim(static_cast<int64_t>(attr(at, 0, name, "dim")), x.ndim(), name);
      Shape os;
      if (op == Op::GATHER) {
        NX_CHECK(idx.ndim() == x.ndim(), "SHAPE", name << ": index must have as many dims as x");
        for (int i = 0; i < x.ndim(); i++)
          NX_CHECK(i == dim || idx.shape[i] <= x.shape[i], "SHAPE", name << ": index " << shape_str(idx.shape) << " larger than x " << shape_str(x.shape));
        os = idx.shape;
      } else {
        NX_CHECK(idx.ndim() == 1, "SHAPE", name << ": index must be 1-D");
        os = x.shape;
        os[dim] = idx.shape[0];
      }
      Tensor out = Tensor::empty(os, x.dtype);
      KView xv = x.kview(), iv = idx.kview(), ov = out.kview();
      if (op == Op::GATHER)
        queue([=] { ref ? ref::gather(xv, dim, iv, ov) : fast::gather(xv, dim, iv, ov); }, {out});
      else
        queue([=] { ref ? ref::index_select(xv, dim, iv, ov) : fast::index_select(xv, dim, iv, ov); }, {out});
      return {out};
    }
    case Op::SCATTER_: {
      const Tensor &dst = *in[0], &idx = *in[1], &src = *in[2];
      check_writable(dst, name);
      check_int(idx, name, "index");
      int dim = normalize_dim(static_cast<int64_t>(attr(at, 0, name, "dim")), dst.ndim(), name);
      NX_CHECK(idx.ndim() == dst.ndim() && src.ndim() == dst.ndim(), "SHAPE", name << ": dst, index and src need the same rank");
      for (int i = 0; i < dst.ndim(); i++)
        NX_CHECK(idx.shape[i] <= src.shape[i] && (i == dim || idx.shape[i] <= dst.shape[i]), "SHAPE",
                 name << ": index " << shape_str(idx.shape) << " does not fit src " << shape_str(src.shape) << " / dst " << shape_str(dst.shape));
      KView dv = dst.kview(), iv = idx.kview(), sv = src.kview();
      queue([=] { ref ? ref::scatter(dv, dim, iv, sv) : fast::scatter(dv, dim, iv, sv); }, {dst});
      return {dst};
    }
    case Op::TOPK: {
      const Tensor& x = *in[0];
      NX_CHECK(x.ndim() >= 1, "SHAPE", name << ": needs at least one dim");
      int64_t k = static_cast<int64_t>(attr(at, 0, name, "k"));
      NX_CHECK(k >= 0 && k <= x.shape.back(), "INDEX", name << ": k=" << k << " out of range for size " << x.shape.back());
      Shape os = x.shape;
      os.back() = k;
      Tensor vals = Tensor::empty(os, x.dtype), idxs = Tensor::empty(os, DType::I64);
      KView xv = x.kview(), vv = vals.kview(), iv = idxs.kview();
      queue([=] { ref ? ref::topk(xv, k, vv, iv) : fast::topk(xv, k, vv, iv); }, {vals, idxs});
      return {vals, idxs};
    }
    case Op::COUNT: break;
  }
  NX_FAIL("INVALID_GRAPH", "op " << name << " is not implemented");
}

}  // namespace nx
