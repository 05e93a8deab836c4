// harness.h: the CUDA conformance suite's harness: every CUDA kernel against its CPU reference
// (nx::ref), in the style of test/cpp (ggml's test-backend-ops).
//
// A Buf is host memory plus a byte-for-byte mirror on the GPU, with one KView into each (same shape,
// strides and offset). Inputs are filled on the host and uploaded; an output is made twice from the same
// bytes, the reference writes one on the host, the CUDA kernel the other on the device, and after the
// download `allclose` compares the view's elements with the tolerance written at each call AND checks
// that every byte outside the view is untouched (strided outputs have gaps that must survive).
//
//   build/nx_cuda_tests [filter]    runs every case whose name contains filter; last line
//                                   "N passed, M failed"; exit 0 / 1; exit 77 (after a "SKIP: <reason>"
//                                   line) when no CUDA device is usable.
#pragma once
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "../../kernels/common.h"

namespace nxc {

struct Case {
  const char* name;
  void (*fn)();
};
std::vector<Case>& registry();
struct Registrar {
  Registrar(const char* n, void (*f)()) { registry().push_back({n, f}); }
};
#define NXC_TEST(name)                                    \
  static void name();                                     \
  static ::nxc::Registrar name##_registrar(#name, name);  \
  static void name()

extern int g_failures;
#define NXC_EXPECT(cond, ...)                                            \
  do {                                                                   \
    if (!(cond)) {                                                       \
      ::nxc::g_failures++;                                               \
      std::fprintf(stderr, "  FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                 \
      std::fprintf(stderr, "\n");                                        \
    }                                                                    \
  } while (0)

std::mt19937_64& rng();
inline int64_t rand_int(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng()); }

// Layouts of a made view: dense; last two dims transposed; every other element of the last dim
// (starting at element 1); size-1 dims broadcast to `shape` with stride 0 (inputs only).
enum class Layout { Contiguous, Transposed, Strided };
const char* layout_name(Layout l);
constexpr Layout kLayouts[] = {Layout::Contiguous, Layout::Transposed, Layout::Strided};

struct Buf {
  std::vector<unsigned char> host;
  void* dev = nullptr;
  size_t n = 0;
  nx::KView h, d;  // the same view over host and device memory
  Buf() = default;
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf();
  void upload();    // host -> device (all bytes)
  void download();  // device -> host (all bytes)
};
using BufP = std::shared_ptr<Buf>;

// A view of `shape` in `layout`; memory holds a fixed byte pattern (on both sides).
BufP make(const std::vector<int64_t>& shape, nx::DType dt, Layout layout = Layout::Contiguous);
// A second Buf with the same layout and bytes (for the two outputs).
BufP clone(const Buf& b);
// Uniform random values in [lo, hi] (integers rounded; bool: 0/1) written into the view, then uploaded.
void fill_random(Buf& b, double lo = -1.0, double hi = 1.0);
// Set element lin (row-major) of the view to v on the host, then upload.
void set_f(Buf& b, int64_t lin, float v);
// A view of b with dim d broadcast: shape[d] = n with stride 0 (b's shape[d] must be 1).
nx::KView broadcast(const nx::KView& v, int d, int64_t n);

// Downloads got, then compares its view with want's host view: max |g - w| / (atol + rtol |w|) <= 1
// (NaN must match NaN) and every byte of got outside the view equal to want's. Prints the worst element.
bool allclose(Buf& got, const Buf& want, double atol, double rtol, const std::string& what);
// One unit in the last place of a dtype at magnitude 1 (the rounding a narrow output adds): f16 2^-10,
// bf16 2^-7, f32 2^-23, ints 0.
double ulp1(nx::DType t);

// Expects fn to throw nx::Error with `code`; returns the message ("" when it did not throw).
template <typename Fn>
std::string expect_error(Fn&& fn, const char* code, const std::string& what) {
  try {
    fn();
  } catch (const nx::Error& e) {
    NXC_EXPECT(e.code == code, "%s: code %s, want %s (%s)", what.c_str(), e.code.c_str(), code, e.what());
    return e.what();
  }
  NXC_EXPECT(false, "%s: no error thrown", what.c_str());
  return "";
}

}  // namespace nxc
