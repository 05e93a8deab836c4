// harness.cpp: the runner and helpers declared in harness.h.
#include "harness.h"

#include <cstring>

namespace nxt {

std::vector<Case>& registry() {
  static std::vector<Case> r;
  return r;
}
int g_failures = 0;
std::mt19937_64& rng() {
  static std::mt19937_64 g(12345);
  return g;
}

std::shared_ptr<Buf> make(const std::vector<int64_t>& shape, nx::DType dt, Layout layout) {
  auto b = std::make_shared<Buf>();
  int nd = static_cast<int>(shape.size());
  b->v.dtype = dt;
  b->v.ndim = nd;
  for (int i = 0; i < nd; i++) b->v.shape[i] = shape[i];
  // physical shape
  std::vector<int64_t> phys(shape);
  if (layout == Layout::Transposed && nd >= 2) std::swap(phys[nd - 1], phys[nd - 2]);
  if (layout == Layout::Strided && nd >= 1) phys[nd - 1] = shape[nd - 1] * 2 + 1;
  std::vector<int64_t> pstr(nd);
  int64_t s = 1;
  for (int i = nd - 1; i >= 0; i--) { pstr[i] = s; s *= std::max<int64_t>(phys[i], 1); }
  b->mem.assign(static_cast<size_t>(s) * nx::dtype_size(dt) + 64, 0);
  for (int i = 0; i < nd; i++) b->v.strides[i] = pstr[i];
  if (layout == Layout::Transposed && nd >= 2) {
    b->v.strides[nd - 1] = pstr[nd - 2];
    b->v.strides[nd - 2] = pstr[nd - 1];
  }
  b->v.data = b->mem.data();
  if (layout == Layout::Strided && nd >= 1) {
    b->v.strides[nd - 1] = 2;
    b->v.data = b->mem.data() + nx::dtype_size(dt);  // start at element 1
  }
  return b;
}

void fill_random(const nx::KView& v, double lo, double hi) {
  std::uniform_real_distribution<double> d(lo, hi);
  nx::for_each_index(v.ndim, v.shape, [&](int64_t, const int64_t* idx) {
    int64_t o = v.offset_of(idx);
    if (nx::dtype_is_float(v.dtype))
      nx::store_f32(v.data, v.dtype, o, static_cast<float>(d(rng())));
    else
      nx::store_i64(v.data, v.dtype, o, static_cast<int64_t>(std::floor(d(rng()) + 0.5)));
  });
}

std::vector<float> to_f32(const nx::KView& v) {
  std::vector<float> out(static_cast<size_t>(v.numel()));
  nx::for_each_index(v.ndim, v.shape, [&](int64_t lin, const int64_t* idx) {
    out[static_cast<size_t>(lin)] = nx::load_f32(v.data, v.dtype, v.offset_of(idx));
  });
  return out;
}

bool allclose(const nx::KView& got, const nx::KView& want, double atol, double rtol, const char* what) {
  auto g = to_f32(got), w = to_f32(want);
  if (g.size() != w.size()) {
    g_failures++;
    std::fprintf(stderr, "  FAIL %s: size %zu vs %zu\n", what, g.size(), w.size());
    return false;
  }
  double worst = 0;
  size_t wi = 0;
  for (size_t i = 0; i < g.size(); i++) {
    double diff = std::fabs(static_cast<double>(g[i]) - w[i]);
    double lim = atol + rtol * std::fabs(static_cast<double>(w[i]));
    double r = (std::isnan(g[i]) != std::isnan(w[i])) ? 1e30 : (std::isnan(g[i]) ? 0 : diff / lim);
    if (r > worst) { worst = r; wi = i; }
  }
  if (worst > 1.0) {
    g_failures++;
    std::fprintf(stderr, "  FAIL %s: element %zu got %.9g want %.9g (err/tol %.3g)\n", what, wi, g[wi], w[wi], worst);
    return false;
  }
  return true;
}

}  // namespace nxt

int main(int argc, char** argv) {
  const char* filter = argc > 1 ? argv[1] : "";
  if (const char* t = std::getenv("NX_THREADS")) nx::set_num_threads(std::atoi(t));
  int passed = 0, failed = 0;
  for (auto& c : nxt::registry()) {
    if (std::strstr(c.name, filter) == nullptr) continue;
    int before = nxt::g_failures;
    try {
      c.fn();
    } catch (const std::exception& e) {
      nxt::g_failures++;
      std::fprintf(stderr, "  FAIL %s threw: %s\n", c.name, e.what());
    }
    bool ok = nxt::g_failures == before;
    std::printf("%s %s\n", ok ? "ok  " : "FAIL", c.name);
    (ok ? passed : failed)++;
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
