// index_test.cpp: nx::cuda embedding / gather / scatter / index_select / topk against nx::ref
// (kernels/cpu/index.h). Every comparison is exact (tolerance 0): these kernels only move values, and
// dtype conversions round the same way on both sides. Out-of-range indices: the same INDEX error and
// message as the reference (the first bad index in row-major order).
#include <string>
#include <vector>

#include "../../kernels/cpu/index.h"
#include "../../kernels/cuda/cuda.h"
#include "harness.h"

using nx::DType;
using nxc::Layout;

namespace {
const DType kValue[] = {DType::F32, DType::F16, DType::BF16, DType::I32, DType::I64, DType::BOOL};
const DType kIndex[] = {DType::I32, DType::I64};

void fill_ids(nxc::Buf& b, int64_t lo, int64_t hi) { nxc::fill_random(b, static_cast<double>(lo), static_cast<double>(hi)); }

template <typename Ref, typename Cuda>
void same_error(Ref&& r, Cuda&& c, const std::string& what) {
  const std::string want = nxc::expect_error(r, "INDEX", "ref " + what);
  const std::string got = nxc::expect_error(c, "INDEX", "cuda " + what);
  NXC_EXPECT(got == want, "%s: message '%s' vs '%s'", what.c_str(), got.c_str(), want.c_str());
}
}  // namespace

NXC_TEST(cuda_embedding_vs_ref) {
  for (DType dw : {DType::F32, DType::BF16, DType::F16}) {
    for (DType di : kIndex) {
      for (const std::vector<int64_t>& ids_shape : std::vector<std::vector<int64_t>>{{1}, {5}, {2, 7}, {3, 1, 4}, {0}}) {
        const int64_t V = 37, D = nxc::rand_int(1, 70);
        auto w = nxc::make({V, D}, dw, nxc::kLayouts[nxc::rand_int(0, 2)]);
        nxc::fill_random(*w, -2, 2);
        auto ids = nxc::make(ids_shape, di, nxc::rand_int(0, 1) ? Layout::Contiguous : Layout::Strided);
        fill_ids(*ids, 0, V - 1);
        std::vector<int64_t> os(ids_shape);
        os.push_back(D);
        for (DType dout : {DType::F32, dw}) {
          auto want = nxc::make(os, dout, nxc::kLayouts[nxc::rand_int(0, 2)]), got = nxc::clone(*want);
          nx::ref::embedding(w->h, ids->h, want->h);
          nx::cuda::embedding(w->d, ids->d, got->d);
          nxc::allclose(*got, *want, 0, 0, std::string("embedding w ") + nx::dtype_name(dw) + " ids " + nx::dtype_name(di));
        }
      }
    }
  }
  auto w = nxc::make({4, 3}, DType::F32);
  auto ids = nxc::make({2, 3}, DType::I64), out = nxc::make({2, 3, 3}, DType::F32);
  fill_ids(*ids, 0, 3);
  nxc::set_f(*ids, 4, 9);
  nxc::set_f(*ids, 2, -1);  // the first bad one in row-major order
  same_error([&] { nx::ref::embedding(w->h, ids->h, out->h); }, [&] { nx::cuda::embedding(w->d, ids->d, out->d); }, "embedding");
}

NXC_TEST(cuda_gather_scatter_index_select_vs_ref) {
  const std::vector<std::vector<int64_t>> shapes = {{5}, {3, 4}, {2, 3, 5}, {1, 6, 1}, {4, 0}};
  for (const auto& shape : shapes) {
    const int nd = static_cast<int>(shape.size());
    for (int dim = 0; dim < nd; dim++) {
      if (shape[dim] == 0) continue;
      for (DType dv : kValue) {
        const DType di = kIndex[nxc::rand_int(0, 1)];
        auto x = nxc::make(shape, dv, nxc::kLayouts[nxc::rand_int(0, 2)]);
        nxc::fill_random(*x, -50, 50);
        // gather: index smaller than x in every dim but dim (random extent there)
        std::vector<int64_t> is(shape);
        for (int i = 0; i < nd; i++) is[i] = i == dim ? nxc::rand_int(1, 6) : nxc::rand_int(std::min<int64_t>(shape[i], 1), shape[i]);
        auto idx = nxc::make(is, di, nxc::kLayouts[nxc::rand_int(0, 2)]);
        fill_ids(*idx, 0, shape[dim] - 1);
        auto gw = nxc::make(is, dv, nxc::kLayouts[nxc::rand_int(0, 2)]), gg = nxc::clone(*gw);
        nx::ref::gather(x->h, dim, idx->h, gw->h);
        nx::cuda::gather(x->d, dim, idx->d, gg->d);
        nxc::allclose(*gg, *gw, 0, 0, std::string("gather ") + nx::dtype_name(dv) + " dim " + std::to_string(dim));
        // scatter: src at least as large as index; repeated indices: the last write wins on both sides
        auto src = nxc::make(is, dv == DType::BOOL ? DType::BOOL : DType::F32, nxc::kLayouts[nxc::rand_int(0, 2)]);
        nxc::fill_random(*src, -50, 50);
        auto dst_want = nxc::make(shape, dv, nxc::kLayouts[nxc::rand_int(0, 2)]);
        nxc::fill_random(*dst_want, -5, 5);
        auto dst_got = nxc::clone(*dst_want);
        nx::ref::scatter(dst_want->h, dim, idx->h, src->h);
        nx::cuda::scatter(dst_got->d, dim, idx->d, src->d);
        nxc::allclose(*dst_got, *dst_want, 0, 0, std::string("scatter ") + nx::dtype_name(dv) + " dim " + std::to_string(dim));
        // index_select: 1-D index with negative entries
        const int64_t k = nxc::rand_int(0, 7);
        auto sel = nxc::make({k}, di, nxc::rand_int(0, 1) ? Layout::Contiguous : Layout::Strided);
        fill_ids(*sel, -shape[dim], shape[dim] - 1);
        std::vector<int64_t> os(shape);
        os[dim] = k;
        auto sw = nxc::make(os, dv, nxc::kLayouts[nxc::rand_int(0, 2)]), sg = nxc::clone(*sw);
        nx::ref::index_select(x->h, dim, sel->h, sw->h);
        nx::cuda::index_select(x->d, dim, sel->d, sg->d);
        nxc::allclose(*sg, *sw, 0, 0, std::string("index_select ") + nx::dtype_name(dv) + " dim " + std::to_string(dim));
      }
    }
  }
  // errors
  auto x = nxc::make({3, 4}, DType::F32), o = nxc::make({3, 4}, DType::F32);
  auto idx = nxc::make({3, 4}, DType::I64);
  fill_ids(*idx, 0, 3);
  nxc::set_f(*idx, 7, 4);
  nxc::set_f(*idx, 9, -2);
  same_error([&] { nx::ref::gather(x->h, 1, idx->h, o->h); }, [&] { nx::cuda::gather(x->d, 1, idx->d, o->d); }, "gather");
  same_error([&] { nx::ref::scatter(o->h, 1, idx->h, x->h); }, [&] { nx::cuda::scatter(o->d, 1, idx->d, x->d); }, "scatter");
  auto sel = nxc::make({3}, DType::I32), so = nxc::make({3, 3}, DType::F32);
  fill_ids(*sel, 0, 2);
  nxc::set_f(*sel, 1, -5);
  same_error([&] { nx::ref::index_select(x->h, 1, sel->h, so->h); }, [&] { nx::cuda::index_select(x->d, 1, sel->d, so->d); },
             "index_select");
}

NXC_TEST(cuda_topk_vs_ref) {
  const std::vector<std::vector<int64_t>> shapes = {{1}, {9}, {3, 17}, {2, 2, 300}, {4, 1}, {0, 5}};
  for (const auto& shape : shapes) {
    const int64_t n = shape.back();
    for (DType dx : {DType::F32, DType::BF16, DType::F16, DType::I32, DType::I64}) {
      for (int64_t k : {int64_t(0), int64_t(1), std::min<int64_t>(3, n), n}) {
        if (k > n) continue;
        auto x = nxc::make(shape, dx, nxc::kLayouts[nxc::rand_int(0, 2)]);
        nxc::fill_random(*x, -4, 4);  // ints and bf16: plenty of ties (lower index first)
        int64_t numel = 1;
        for (auto s : shape) numel *= s;
        if (nx::dtype_is_float(dx) && numel > 4) {
          nxc::set_f(*x, numel / 2, NAN);
          nxc::set_f(*x, numel / 4, NAN);
        }
        std::vector<int64_t> os(shape);
        os.back() = k;
        auto vw = nxc::make(os, dx, nxc::kLayouts[nxc::rand_int(0, 2)]), vg = nxc::clone(*vw);
        auto iw = nxc::make(os, DType::I64, nxc::kLayouts[nxc::rand_int(0, 2)]), ig = nxc::clone(*iw);
        nx::ref::topk(x->h, k, vw->h, iw->h);
        nx::cuda::topk(x->d, k, vg->d, ig->d);
        const std::string what = std::string("topk ") + nx::dtype_name(dx) + " n " + std::to_string(n) + " k " + std::to_string(k);
        nxc::allclose(*vg, *vw, 0, 0, what + " values");
        nxc::allclose(*ig, *iw, 0, 0, what + " indices");
      }
    }
  }
}
