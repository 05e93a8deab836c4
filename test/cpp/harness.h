// harness.h: a tiny C++ test harness for kernel conformance (fast kernel vs reference kernel).
//
// Each *_test.cpp registers cases with NX_TEST(name) { ... } and uses the helpers below to build
// random strided views. `nx_kernel_tests [filter]` runs every case whose name contains filter and ends
// with the line "N passed, N failed". Tolerances are written at each check with the reason beside them.
#pragma once
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "../../kernels/common.h"

namespace nxt {

struct Case {
  const char* name;
  void (*fn)();
};
std::vector<Case>& registry();
struct Registrar {
  Registrar(const char* n, void (*f)()) { registry().push_back({n, f}); }
};
#define NX_TEST(name)                                  \
  static void name();                                  \
  static ::nxt::Registrar name##_registrar(#name, name); \
  static void name()

// Failures are counted per case; a check prints what failed and where.
extern int g_failures;
#define NX_EXPECT(cond, ...)                                            \
  do {                                                                  \
    if (!(cond)) {                                                      \
      ::nxt::g_failures++;                                              \
      std::fprintf(stderr, "  FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                \
      std::fprintf(stderr, "\n");                                       \
    }                                                                   \
  } while (0)

std::mt19937_64& rng();
inline int64_t rand_int(int64_t lo, int64_t hi) {  // inclusive
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng());
}

// A buffer that owns memory plus a KView into it. `make(shape, dtype, layout)` where layout picks
// contiguous, transposed last two dims, or a strided slice (every other element along the last dim),
// so kernels meet non-contiguous inputs.
enum class Layout { Contiguous, Transposed, Strided };
struct Buf {
  std::vector<unsigned char> mem;
  nx::KView v;
};
std::shared_ptr<Buf> make(const std::vector<int64_t>& shape, nx::DType dt, Layout layout = Layout::Contiguous);
// Fill with uniform random values in [lo, hi] (ints: integers in that range).
void fill_random(const nx::KView& v, double lo = -1.0, double hi = 1.0);
// Copy to a dense f32 vector in row-major order of the view's shape.
std::vector<float> to_f32(const nx::KView& v);
// Compare two views elementwise: returns max |a-b| / (atol + rtol*|b|) over elements (<= 1 passes),
// printing the worst element when it fails.
bool allclose(const nx::KView& got, const nx::KView& want, double atol, double rtol, const char* what);

}  // namespace nxt
