// harness.cpp: the runner and helpers declared in harness.h.
#include "harness.h"

#include <cstring>

#include "../../kernels/cuda/cuda.h"

namespace nxc {

std::vector<Case>& registry() {
  static std::vector<Case> r;
  return r;
}
int g_failures = 0;
std::mt19937_64& rng() {
  static std::mt19937_64 g(20250601);
  return g;
}

const char* layout_name(Layout l) {
  switch (l) {
    case Layout::Contiguous: return "contiguous";
    case Layout::Transposed: return "transposed";
    case Layout::Strided: return "strided";
  }
  return "?";
}

Buf::~Buf() {
  if (dev) nx::cuda::device_free(0, dev, n);
}
void Buf::upload() { nx::cuda::copy_h2d(dev, host.data(), n); }
void Buf::download() { nx::cuda::copy_d2h(host.data(), dev, n); }

namespace {
nx::KView rebase(const nx::KView& v, void* base_from, void* base_to) {
  nx::KView r = v;
  r.data = static_cast<char*>(base_to) + (static_cast<char*>(v.data) - static_cast<char*>(base_from));
  return r;
}
}  // namespace

BufP make(const std::vector<int64_t>& shape, nx::DType dt, Layout layout) {
  auto b = std::make_shared<Buf>();
  const int nd = static_cast<int>(shape.size());
  nx::KView v;
  v.dtype = dt;
  v.ndim = nd;
  for (int i = 0; i < nd; i++) v.shape[i] = shape[i];
  std::vector<int64_t> phys(shape);
  if (layout == Layout::Transposed && nd >= 2) std::swap(phys[nd - 1], phys[nd - 2]);
  if (layout == Layout::Strided && nd >= 1) phys[nd - 1] = shape[nd - 1] * 2 + 1;
  std::vector<int64_t> pstr(nd);
  int64_t s = 1;
  for (int i = nd - 1; i >= 0; i--) {
    pstr[i] = s;
    s *= std::max<int64_t>(phys[i], 1);
  }
  b->n = static_cast<size_t>(s) * nx::dtype_size(dt) + 64;
  b->host.assign(b->n, 0x5a);  // a pattern: outputs must leave the bytes outside their view alone
  for (int i = 0; i < nd; i++) v.strides[i] = pstr[i];
  if (layout == Layout::Transposed && nd >= 2) {
    v.strides[nd - 1] = pstr[nd - 2];
    v.strides[nd - 2] = pstr[nd - 1];
  }
  v.data = b->host.data();
  if (layout == Layout::Strided && nd >= 1) {
    v.strides[nd - 1] = 2;
    v.data = b->host.data() + nx::dtype_size(dt);
  }
  b->dev = nx::cuda::device_alloc(0, b->n);
  b->h = v;
  b->d = rebase(v, b->host.data(), b->dev);
  b->upload();
  return b;
}

BufP clone(const Buf& src) {
  auto b = std::make_shared<Buf>();
  b->host = src.host;
  b->n = src.n;
  b->dev = nx::cuda::device_alloc(0, b->n);
  b->h = rebase(src.h, const_cast<unsigned char*>(src.host.data()), b->host.data());
  b->d = rebase(src.h, const_cast<unsigned char*>(src.host.data()), b->dev);
  b->upload();
  return b;
}

void fill_random(Buf& b, double lo, double hi) {
  std::uniform_real_distribution<double> d(lo, hi);
  const nx::KView& v = b.h;
  nx::for_each_index(v.ndim, v.shape, [&](int64_t, const int64_t* idx) {
    const int64_t o = v.offset_of(idx);
    if (nx::dtype_is_float(v.dtype))
      nx::store_f32(v.data, v.dtype, o, static_cast<float>(d(rng())));
    else
      nx::store_i64(v.data, v.dtype, o, static_cast<int64_t>(std::floor(d(rng()) + 0.5)));
  });
  b.upload();
}

void set_f(Buf& b, int64_t lin, float val) {
  const nx::KView& v = b.h;
  int64_t o = 0;
  for (int d = v.ndim - 1; d >= 0; d--) {
    o += (lin % v.shape[d]) * v.strides[d];
    lin /= v.shape[d];
  }
  nx::store_f32(v.data, v.dtype, o, val);
  b.upload();
}

nx::KView broadcast(const nx::KView& v, int d, int64_t n) {
  nx::KView r = v;
  r.shape[d] = n;
  r.strides[d] = 0;
  return r;
}

double ulp1(nx::DType t) {
  switch (t) {
    case nx::DType::F16: return 1.0 / 1024;
    case nx::DType::BF16: return 1.0 / 128;
    case nx::DType::F32: return 1.0 / 8388608;
    default: return 0.0;
  }
}

bool allclose(Buf& got, const Buf& want, double atol, double rtol, const std::string& what) {
  got.download();
  const nx::KView& g = got.h;
  const nx::KView& w = want.h;
  double worst = 0;
  int64_t wi = -1;
  float gw = 0, ww = 0;
  std::vector<unsigned char> covered(got.n, 0);
  const size_t es = nx::dtype_size(g.dtype);
  nx::for_each_index(g.ndim, g.shape, [&](int64_t lin, const int64_t* idx) {
    const int64_t og = g.offset_of(idx), ow = w.offset_of(idx);
    const size_t byte = static_cast<size_t>(static_cast<const unsigned char*>(g.data) - got.host.data()) + og * es;
    for (size_t k = 0; k < es && byte + k < covered.size(); k++) covered[byte + k] = 1;
    const float a = nx::load_f32(g.data, g.dtype, og), b = nx::load_f32(w.data, w.dtype, ow);
    double r;
    if (!nx::dtype_is_float(g.dtype)) {
      r = nx::load_i64(g.data, g.dtype, og) == nx::load_i64(w.data, w.dtype, ow) ? 0.0 : 1e30;
    } else if (std::isnan(a) || std::isnan(b)) {
      r = (std::isnan(a) && std::isnan(b)) ? 0.0 : 1e30;
    } else if (std::isinf(a) || std::isinf(b)) {
      r = a == b ? 0.0 : 1e30;
    } else {
      const double lim = atol + rtol * std::fabs(static_cast<double>(b));
      const double diff = std::fabs(static_cast<double>(a) - b);
      r = lim > 0 ? diff / lim : (diff == 0 ? 0.0 : 1e30);
    }
    if (r > worst) {
      worst = r;
      wi = lin;
      gw = a;
      ww = b;
    }
  });
  bool ok = worst <= 1.0;
  if (!ok) {
    g_failures++;
    std::fprintf(stderr, "  FAIL %s: element %lld got %.9g want %.9g (err/tol %.3g)\n", what.c_str(), static_cast<long long>(wi), gw,
                 ww, worst);
  }
  // bytes outside the view: untouched
  const size_t gap_ref_off = static_cast<size_t>(static_cast<const unsigned char*>(w.data) - want.host.data());
  const size_t gap_got_off = static_cast<size_t>(static_cast<const unsigned char*>(g.data) - got.host.data());
  if (gap_ref_off == gap_got_off && want.n == got.n) {
    for (size_t i = 0; i < got.n; i++) {
      if (!covered[i] && got.host[i] != want.host[i]) {
        g_failures++;
        std::fprintf(stderr, "  FAIL %s: byte %zu outside the view was written (0x%02x, want 0x%02x)\n", what.c_str(), i, got.host[i],
                     want.host[i]);
        return false;
      }
    }
  }
  return ok;
}

}  // namespace nxc

int main(int argc, char** argv) {
  std::string why;
  if (!nx::cuda::available(&why)) {
    std::printf("SKIP: CUDA not available: %s\n", why.c_str());
    return 77;
  }
  nx::cuda::set_device(0);
  std::string blas_why;
  const bool blas = nx::cuda::cublas_available(&blas_why);
  std::printf("device: %s; CUDA runtime %s, driver %s; cuBLAS: %s\n", nx::cuda::device_name(0).c_str(),
              nx::cuda::runtime_version().c_str(), nx::cuda::driver_version().c_str(), blas ? "loaded" : blas_why.c_str());
  const char* filter = argc > 1 ? argv[1] : "";
  int passed = 0, failed = 0;
  for (auto& c : nxc::registry()) {
    if (std::strstr(c.name, filter) == nullptr) continue;
    const int before = nxc::g_failures;
    try {
      c.fn();
      nx::cuda::synchronize(0);  // an asynchronous kernel fault surfaces here, blamed on this case
    } catch (const std::exception& e) {
      nxc::g_failures++;
      std::fprintf(stderr, "  FAIL %s threw: %s\n", c.name, e.what());
    }
    const bool ok = nxc::g_failures == before;
    std::printf("%s %s\n", ok ? "ok  " : "FAIL", c.name);
    std::fflush(stdout);
    (ok ? passed : failed)++;
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
