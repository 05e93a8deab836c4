// index_test.cpp: embedding, gather, scatter, index_select and topk: ref vs hand-computed values, fast
// vs ref on random shapes/dtypes/layouts, and the INDEX errors. Every comparison here is exact
// (tolerance 0): these kernels only move values (dtype conversions are the same rounding in both).
//
// Run: g++ -O3 -std=c++17 -march=native -I. test/cpp/harness.cpp test/cpp/index_test.cpp
//        kernels/cpu/index.cpp native/src/core/threadpool.cpp -lpthread -o /tmp/idx && /tmp/idx
#include <cmath>
#include <string>
#include <vector>

#include "../../kernels/cpu/index.h"
#include "harness.h"

using nx::DType;
using nx::KView;
using nxt::Layout;

namespace {

float at(const KView& v, std::vector<int64_t> idx) { return nx::load_f32(v.data, v.dtype, v.offset_of(idx.data())); }
int64_t at_i(const KView& v, std::vector<int64_t> idx) { return nx::load_i64(v.data, v.dtype, v.offset_of(idx.data())); }

std::shared_ptr<nxt::Buf> ints(const std::vector<int64_t>& shape, DType dt, const std::vector<int64_t>& vals) {
  auto b = nxt::make(shape, dt);
  for (size_t i = 0; i < vals.size(); i++) nx::store_i64(b->v.data, dt, static_cast<int64_t>(i), vals[i]);
  return b;
}

// Runs fn, expecting nx::Error with code INDEX whose message contains `needle`.
template <typename Fn>
void expect_index_error(Fn&& fn, const std::string& needle, const char* what) {
  try {
    fn();
    NX_EXPECT(false, "%s: no error thrown", what);
  } catch (const nx::Error& e) {
    NX_EXPECT(e.code == "INDEX", "%s: code %s", what, e.code.c_str());
    NX_EXPECT(std::string(e.what()).find(needle) != std::string::npos, "%s: message '%s' lacks '%s'", what, e.what(),
              needle.c_str());
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// embedding
// ---------------------------------------------------------------------------------------------------
NX_TEST(embedding_hand_values) {
  auto w = nxt::make({4, 3}, DType::F32);
  for (int i = 0; i < 12; i++) w->v.ptr<float>()[i] = static_cast<float>(i);
  auto ids = ints({2, 2}, DType::I32, {3, 0, 3, 1});
  for (int which = 0; which < 2; which++) {
    auto out = nxt::make({2, 2, 3}, DType::F32);
    if (which == 0) nx::ref::embedding(w->v, ids->v, out->v);
    else nx::fast::embedding(w->v, ids->v, out->v);
    const int64_t want_row[4] = {3, 0, 3, 1};
    for (int64_t n = 0; n < 4; n++)
      for (int64_t d = 0; d < 3; d++)
        NX_EXPECT(at(out->v, {n / 2, n % 2, d}) == static_cast<float>(want_row[n] * 3 + d), "(%d) n%lld d%lld", which,
                  (long long)n, (long long)d);
  }
}

NX_TEST(embedding_out_of_range_errors) {
  auto w = nxt::make({512, 8}, DType::F32);
  auto out = nxt::make({3, 8}, DType::F32);
  auto ids = ints({3}, DType::I64, {1, 600, 2});
  expect_index_error([&] { nx::ref::embedding(w->v, ids->v, out->v); }, "id 600 out of range [0, 512)", "ref 600");
  expect_index_error([&] { nx::fast::embedding(w->v, ids->v, out->v); }, "id 600 out of range [0, 512)", "fast 600");
  auto neg = ints({3}, DType::I32, {1, -1, 2});
  expect_index_error([&] { nx::fast::embedding(w->v, neg->v, out->v); }, "id -1 out of range [0, 512)", "fast -1");
}

NX_TEST(embedding_fast_vs_ref) {
  for (DType wt : {DType::F32, DType::BF16, DType::F16})
    for (DType idt : {DType::I32, DType::I64})
      for (DType ot : {DType::F32, wt})
        for (int64_t D : {1, 8, 80}) {
          const int64_t V = 37;
          auto w = nxt::make({V, D}, wt, D > 1 ? Layout::Strided : Layout::Contiguous);
          nxt::fill_random(w->v);
          auto ids = nxt::make({3, 5}, idt);
          nxt::fill_random(ids->v, 0, V - 1);
          auto o1 = nxt::make({3, 5, D}, ot), o2 = nxt::make({3, 5, D}, ot, Layout::Transposed);
          nx::ref::embedding(w->v, ids->v, o1->v);
          nx::fast::embedding(w->v, ids->v, o2->v);
          nxt::allclose(o2->v, o1->v, 0, 0, "embedding");
        }
}

// ---------------------------------------------------------------------------------------------------
// gather / scatter
// ---------------------------------------------------------------------------------------------------
NX_TEST(gather_hand_values_and_fast) {
  // x [2, 4] = [[0, 1, 2, 3], [10, 11, 12, 13]], dim 1, index [[3, 0], [1, 1]] -> [[3, 0], [11, 11]]
  auto x = nxt::make({2, 4}, DType::F32);
  for (int i = 0; i < 4; i++) x->v.ptr<float>()[i] = static_cast<float>(i), x->v.ptr<float>()[4 + i] = 10.0f + i;
  auto idx = ints({2, 2}, DType::I64, {3, 0, 1, 1});
  for (int which = 0; which < 2; which++) {
    auto out = nxt::make({2, 2}, DType::F32);
    if (which == 0) nx::ref::gather(x->v, 1, idx->v, out->v);
    else nx::fast::gather(x->v, 1, idx->v, out->v);
    NX_EXPECT(at(out->v, {0, 0}) == 3 && at(out->v, {0, 1}) == 0 && at(out->v, {1, 0}) == 11 && at(out->v, {1, 1}) == 11,
              "gather values (%d)", which);
  }
  // random: dim 0 and 1, x larger than index in the other dim, transposed x
  for (int dim : {0, 1, -1})
    for (DType dt : {DType::F32, DType::BF16, DType::I32}) {
      auto xr = nxt::make({6, 9}, dt, Layout::Transposed);
      nxt::fill_random(xr->v, -100, 100);
      auto ir = nxt::make({4, 5}, DType::I64);
      nxt::fill_random(ir->v, 0, (dim == 0 ? 6 : 9) - 1);
      auto o1 = nxt::make({4, 5}, dt), o2 = nxt::make({4, 5}, dt);
      nx::ref::gather(xr->v, dim, ir->v, o1->v);
      nx::fast::gather(xr->v, dim, ir->v, o2->v);
      nxt::allclose(o2->v, o1->v, 0, 0, "gather fast vs ref");
      // direct check of the definition
      for (int64_t i = 0; i < 4; i++)
        for (int64_t j = 0; j < 5; j++) {
          const int64_t k = at_i(ir->v, {i, j});
          const float want = dim == 0 ? at(xr->v, {k, j}) : at(xr->v, {i, k});
          NX_EXPECT(at(o1->v, {i, j}) == want, "gather def (%lld,%lld)", (long long)i, (long long)j);
        }
    }
  auto bad = ints({2, 2}, DType::I32, {0, 4, 1, 1});
  auto out = nxt::make({2, 2}, DType::F32);
  expect_index_error([&] { nx::ref::gather(x->v, 1, bad->v, out->v); }, "id 4 out of range [0, 4)", "gather ref");
  expect_index_error([&] { nx::fast::gather(x->v, 1, bad->v, out->v); }, "id 4 out of range [0, 4)", "gather fast");
}

NX_TEST(scatter_hand_values_and_fast) {
  // dst [2, 4] zeros, dim 1, index [[2, 0], [3, 1]], src [[5, 6], [7, 8]] -> [[6, 0, 5, 0], [0, 8, 0, 7]]
  auto idx = ints({2, 2}, DType::I64, {2, 0, 3, 1});
  auto src = nxt::make({2, 2}, DType::F32);
  for (int i = 0; i < 4; i++) src->v.ptr<float>()[i] = 5.0f + i;
  const float want[8] = {6, 0, 5, 0, 0, 8, 0, 7};
  for (int which = 0; which < 2; which++) {
    auto dst = nxt::make({2, 4}, DType::F32);
    if (which == 0) nx::ref::scatter(dst->v, 1, idx->v, src->v);
    else nx::fast::scatter(dst->v, 1, idx->v, src->v);
    for (int i = 0; i < 8; i++) NX_EXPECT(dst->v.ptr<float>()[i] == want[i], "scatter [%d] (%d)", i, which);
  }
  // random, with src larger than index; fast vs ref on strided dst
  for (int dim : {0, 1}) {
    auto ir = nxt::make({3, 4}, DType::I32);
    nxt::fill_random(ir->v, 0, 5);
    auto sr = nxt::make({5, 6}, DType::F32);
    nxt::fill_random(sr->v);
    auto d1 = nxt::make({6, 6}, DType::F32), d2 = nxt::make({6, 6}, DType::F32, Layout::Strided);
    nx::ref::scatter(d1->v, dim, ir->v, sr->v);
    nx::fast::scatter(d2->v, dim, ir->v, sr->v);
    nxt::allclose(d2->v, d1->v, 0, 0, "scatter fast vs ref");
  }
  // an out-of-range index throws before anything is written
  auto dst = nxt::make({2, 4}, DType::F32);
  auto bad = ints({2, 2}, DType::I64, {0, 1, 2, 9});
  expect_index_error([&] { nx::fast::scatter(dst->v, 1, bad->v, src->v); }, "id 9 out of range [0, 4)", "scatter");
  for (int i = 0; i < 8; i++) NX_EXPECT(dst->v.ptr<float>()[i] == 0.0f, "scatter wrote before failing");
}

// ---------------------------------------------------------------------------------------------------
// index_select
// ---------------------------------------------------------------------------------------------------
NX_TEST(index_select_hand_values_and_fast) {
  // x [3, 2] = [[0, 1], [2, 3], [4, 5]], dim 0, index [-1, 0, 2, -3] -> rows 2, 0, 2, 0
  auto x = nxt::make({3, 2}, DType::F32);
  for (int i = 0; i < 6; i++) x->v.ptr<float>()[i] = static_cast<float>(i);
  auto idx = ints({4}, DType::I64, {-1, 0, 2, -3});
  const int64_t rows[4] = {2, 0, 2, 0};
  for (int which = 0; which < 2; which++) {
    auto out = nxt::make({4, 2}, DType::F32);
    if (which == 0) nx::ref::index_select(x->v, 0, idx->v, out->v);
    else nx::fast::index_select(x->v, 0, idx->v, out->v);
    for (int64_t r = 0; r < 4; r++)
      for (int64_t c = 0; c < 2; c++)
        NX_EXPECT(at(out->v, {r, c}) == static_cast<float>(rows[r] * 2 + c), "row %lld col %lld (%d)", (long long)r,
                  (long long)c, which);
  }
  // random: every dim of a 3-D tensor, several dtypes and layouts
  for (int dim : {0, 1, 2, -1})
    for (DType dt : {DType::F32, DType::BF16, DType::F16, DType::I64})
      for (Layout lay : {Layout::Contiguous, Layout::Transposed, Layout::Strided}) {
        const std::vector<int64_t> shape = {4, 5, 7};
        const int d = dim < 0 ? dim + 3 : dim;
        auto xr = nxt::make(shape, dt, lay);
        nxt::fill_random(xr->v, -50, 50);
        auto ir = nxt::make({6}, DType::I32);
        nxt::fill_random(ir->v, -shape[d], shape[d] - 1);
        std::vector<int64_t> os = shape;
        os[d] = 6;
        auto o1 = nxt::make(os, dt), o2 = nxt::make(os, dt, lay);
        nx::ref::index_select(xr->v, dim, ir->v, o1->v);
        nx::fast::index_select(xr->v, dim, ir->v, o2->v);
        nxt::allclose(o2->v, o1->v, 0, 0, "index_select fast vs ref");
      }
  auto out = nxt::make({1, 2}, DType::F32);
  auto big = ints({1}, DType::I64, {3}), small = ints({1}, DType::I32, {-4});
  expect_index_error([&] { nx::fast::index_select(x->v, 0, big->v, out->v); }, "id 3 out of range [-3, 3)", "big fast");
  expect_index_error([&] { nx::ref::index_select(x->v, 0, big->v, out->v); }, "id 3 out of range [-3, 3)", "big ref");
  expect_index_error([&] { nx::fast::index_select(x->v, 0, small->v, out->v); }, "id -4 out of range [-3, 3)", "neg");
}

// ---------------------------------------------------------------------------------------------------
// topk
// ---------------------------------------------------------------------------------------------------
NX_TEST(topk_ties_and_nan) {
  // [1, 3, 3, 2, 3], k = 4 -> values [3, 3, 3, 2], indices [1, 2, 4, 3] (ties: lower index first)
  auto x = nxt::make({1, 5}, DType::F32);
  const float xv[5] = {1, 3, 3, 2, 3};
  for (int i = 0; i < 5; i++) x->v.ptr<float>()[i] = xv[i];
  for (int which = 0; which < 2; which++)
    for (int64_t k : {1, 4}) {
      auto vals = nxt::make({1, k}, DType::F32), ind = nxt::make({1, k}, DType::I64);
      if (which == 0) nx::ref::topk(x->v, k, vals->v, ind->v);
      else nx::fast::topk(x->v, k, vals->v, ind->v);
      const float wv[4] = {3, 3, 3, 2};
      const int64_t wi[4] = {1, 2, 4, 3};
      for (int64_t j = 0; j < k; j++) {
        NX_EXPECT(at(vals->v, {0, j}) == wv[j], "value %lld (%d)", (long long)j, which);
        NX_EXPECT(at_i(ind->v, {0, j}) == wi[j], "index %lld: %lld (%d)", (long long)j, (long long)at_i(ind->v, {0, j}),
                  which);
      }
    }
  // NaN ranks above every number (torch): [1, NaN, 2], k = 2 -> [NaN, 2], [1, 2]
  auto xn = nxt::make({3}, DType::F32);
  xn->v.ptr<float>()[0] = 1, xn->v.ptr<float>()[1] = NAN, xn->v.ptr<float>()[2] = 2;
  for (int which = 0; which < 2; which++) {
    auto vals = nxt::make({2}, DType::F32), ind = nxt::make({2}, DType::I64);
    if (which == 0) nx::ref::topk(xn->v, 2, vals->v, ind->v);
    else nx::fast::topk(xn->v, 2, vals->v, ind->v);
    NX_EXPECT(std::isnan(at(vals->v, {0})) && at(vals->v, {1}) == 2, "nan values (%d)", which);
    NX_EXPECT(at_i(ind->v, {0}) == 1 && at_i(ind->v, {1}) == 2, "nan indices (%d)", which);
  }
}

NX_TEST(topk_fast_vs_ref) {
  for (DType dt : {DType::F32, DType::BF16, DType::I32})
    for (int64_t n : {1, 7, 1000})
      for (int64_t k : {1, 5, 50, 1000}) {
        if (k > n) continue;
        for (Layout lay : {Layout::Contiguous, Layout::Transposed}) {
          auto x = nxt::make({3, n}, dt, lay);
          // integers in a small range: many ties, so the tie rule is exercised
          nxt::fill_random(x->v, -20, 20);
          if (dt != DType::I32) {  // and some non-integers
            for (int64_t i = 0; i < n; i += 3) nx::store_f32(x->v.data, dt, x->v.offset_of(std::vector<int64_t>{1, i}.data()), 0.37f * i);
          }
          auto v1 = nxt::make({3, k}, dt), i1 = nxt::make({3, k}, DType::I64);
          auto v2 = nxt::make({3, k}, dt, lay), i2 = nxt::make({3, k}, DType::I64, lay);
          nx::ref::topk(x->v, k, v1->v, i1->v);
          nx::fast::topk(x->v, k, v2->v, i2->v);
          nxt::allclose(v2->v, v1->v, 0, 0, "topk values");
          nxt::allclose(i2->v, i1->v, 0, 0, "topk indices");
          // ref itself: sorted descending, ties by index ascending
          for (int64_t r = 0; r < 3; r++)
            for (int64_t j = 1; j < k; j++) {
              const float a = at(v1->v, {r, j - 1}), b = at(v1->v, {r, j});
              NX_EXPECT(a > b || (a == b && at_i(i1->v, {r, j - 1}) < at_i(i1->v, {r, j})), "ref order r%lld j%lld",
                        (long long)r, (long long)j);
            }
        }
      }
}
