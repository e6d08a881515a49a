// The Gram matrix G = F^T F / n of features F (..., n, c), float32, as a CPU kernel: neural art's
// style loss (tasks/neural_art.py) takes it of VGG16's features at every style layer, every step.
//
// XLA:CPU runs F^T F (a dot contracting the leading dimension of both operands) through Eigen at
// 70-130 GFLOP/s on neural art's shapes (4096 x 64, 1024 x 128). Here G is computed a block row
// of kLanes rows at a time, only from the diagonal block rightwards, by the register-tiled
// matmuls of tile_matmul.h (F^T is read as a strided operand, without a transposed copy), and the
// blocks below the diagonal are mirrored: 5/8 of the products for c = 64 with AVX-512 vectors.
// Each (group, block row) is a task that writes its own elements of G, and every element is one
// sum over F's rows in order: the result does not depend on the number of threads. Channel
// counts that are not whole vectors run on a zero-padded copy of F.
//
// Leading dimensions (jax.vmap over problems and images) are groups, each its own G. Built on
// first use by learned_opt/kernels/gram.py (flags in build.py).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

#include "simd.h"
#include "tile_matmul.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using learned_opt_simd::AlignedFloats;
using learned_opt_simd::kLanes;
using learned_opt_tile_matmul::RoundUp;
using learned_opt_tile_matmul::TileMatmul;

struct Shape {
  int64_t groups = 1, n = 0;
  int c = 0, c_pad = 0, blocks = 0;
};

// One group's block row `block` of G (rows [block * kLanes, ...), columns from the same index
// on) from its features f (n, c), and the mirror of its off-diagonal part below the diagonal.
// scratch holds kLanes x c_pad floats, plus n x c_pad for a padded copy of f where c is not a
// whole number of vectors.
void BlockRow(const float* f, const Shape& s, int block, float* scratch, float* g) {
  const int first = block * kLanes;
  const float* features = f;
  if (s.c != s.c_pad) {
    float* padded = scratch + kLanes * s.c_pad;
    for (int64_t k = 0; k < s.n; ++k) {
      std::memcpy(padded + k * s.c_pad, f + k * s.c, s.c * sizeof(float));
      std::memset(padded + k * s.c_pad + s.c, 0, (s.c_pad - s.c) * sizeof(float));
    }
    features = padded;
  }
  // scratch[m, j - first] = sum over k of features[k, first + m] * features[k, j], j >= first.
  TileMatmul(kLanes, s.blocks - block, features + first, 1, s.c_pad, static_cast<int>(s.n),
             features + first, s.c_pad, nullptr, false, scratch, s.c_pad);
  const float n = static_cast<float>(s.n);
  const int rows = std::min(kLanes, s.c - first);
  for (int m = 0; m < rows; ++m) {
    const int i = first + m;
    for (int j = first; j < s.c; ++j) {
      const float value = scratch[m * s.c_pad + (j - first)] / n;
      g[static_cast<int64_t>(i) * s.c + j] = value;
      if (j >= first + kLanes) g[static_cast<int64_t>(j) * s.c + i] = value;
    }
  }
}

ffi::Error Gram(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> features,
                ffi::ResultBuffer<ffi::F32> gram) {
  const auto dims = features.dimensions();
  if (dims.size() < 2) return ffi::Error::InvalidArgument("features must be (..., n, c)");
  Shape s;
  for (size_t d = 0; d + 2 < dims.size(); ++d) s.groups *= dims[d];
  s.n = dims[dims.size() - 2];
  s.c = static_cast<int>(dims[dims.size() - 1]);
  s.c_pad = RoundUp(s.c, kLanes);
  s.blocks = s.c_pad / kLanes;
  if (gram->element_count() != static_cast<size_t>(s.groups) * s.c * s.c) {
    return ffi::Error::InvalidArgument("the Gram matrix must be (..., c, c)");
  }
  if (s.c == 0 || s.groups == 0) return ffi::Error::Success();
  const float* fp = features.typed_data();
  float* gp = gram->typed_data();
  const size_t scratch_size =
      static_cast<size_t>(kLanes) * s.c_pad + (s.c != s.c_pad ? s.n * s.c_pad : 0);
  learned_opt_simd::ParallelRows(pool, 0, false, s.groups * s.blocks, 1, [=] {
    auto scratch = std::make_shared<AlignedFloats>(scratch_size);
    return [=](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t group = task / s.blocks;
        BlockRow(fp + group * s.n * s.c, s, static_cast<int>(task % s.blocks), scratch->data,
                 gp + group * s.c * s.c);
      }
    };
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LearnedOptGram, Gram,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // features (..., n, c)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // G (..., c, c)
