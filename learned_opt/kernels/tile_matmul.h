// Register-tiled matmuls on small tiles in L1, for the stack kernels (lstm_stack.cc): a few rows
// times a few column vectors of accumulators, the operand's elements broadcast, the weights'
// rows loaded as vectors.

#ifndef LEARNED_OPT_KERNELS_TILE_MATMUL_H_
#define LEARNED_OPT_KERNELS_TILE_MATMUL_H_

#include <algorithm>

#include "simd.h"

namespace learned_opt_tile_matmul {

using learned_opt_simd::kLanes;
using learned_opt_simd::Load;
using learned_opt_simd::Splat;
using learned_opt_simd::Store;
using learned_opt_simd::Vec;

// Register tile: 4 rows, up to kMaxPanel column vectors (4 x 6 zmm accumulators with AVX-512,
// 4 x 3 ymm otherwise).
constexpr int kMaxPanel = kLanes == 16 ? 6 : 3;

inline int RoundUp(int n, int m) { return (n + m - 1) / m * m; }

// out[0:kRows, 0:kVectors vectors] = (accumulate ? out : bias or 0) + A @ w[0:inner, :], where
// A[m, k] = a[m * a_stride + k * a_inner] (a_inner = 1: rows of a; a_stride = 1: columns, so A
// is a^T without a transposed copy).
template <int kRows, int kVectors>
inline void MatPanel(const float* a, int a_stride, int a_inner, int inner, const float* w,
                     int w_stride, const float* bias, bool accumulate, float* out,
                     int out_stride) {
  Vec acc[kRows][kVectors];
  for (int v = 0; v < kVectors; ++v) {
    const Vec init = bias != nullptr ? Load(bias + v * kLanes) : Splat(0.0f);
    for (int m = 0; m < kRows; ++m) {
      acc[m][v] = accumulate ? Load(out + m * out_stride + v * kLanes) : init;
    }
  }
  for (int k = 0; k < inner; ++k, w += w_stride, a += a_inner) {
    Vec wk[kVectors];
    for (int v = 0; v < kVectors; ++v) wk[v] = Load(w + v * kLanes);
    for (int m = 0; m < kRows; ++m) {
      const Vec x = Splat(a[m * a_stride]);
      for (int v = 0; v < kVectors; ++v) acc[m][v] += x * wk[v];
    }
  }
  for (int m = 0; m < kRows; ++m) {
    for (int v = 0; v < kVectors; ++v) Store(out + m * out_stride + v * kLanes, acc[m][v]);
  }
}

// out (rows, vectors column vectors) = [out +] A @ w for rows a multiple of 4 (see MatPanel):
// register tiles of 8 rows when at most 3 vectors are left, else of 4.
inline void TileMatmul(int rows, int vectors, const float* a, int a_stride, int a_inner, int inner,
                const float* w, int w_stride, const float* bias, bool accumulate, float* out,
                int out_stride) {
  for (int first = 0; first < vectors; first += kMaxPanel) {
    const int n = std::min(kMaxPanel, vectors - first);
    const float* wf = w + first * kLanes;
    const float* bf = bias != nullptr ? bias + first * kLanes : nullptr;
    int r = 0;
    if (n <= kMaxPanel / 2) {
      for (; r + 8 <= rows; r += 8) {
        const float* ar = a + r * a_stride;
        float* of = out + r * out_stride + first * kLanes;
        switch (n) {
#define LO_MAT8_CASE(V)                                                                         \
  case V:                                                                                        \
    if constexpr (V <= kMaxPanel / 2)                                                            \
      MatPanel<8, V>(ar, a_stride, a_inner, inner, wf, w_stride, bf, accumulate, of, out_stride); \
    break;
          LO_MAT8_CASE(1)
          LO_MAT8_CASE(2)
          LO_MAT8_CASE(3)
#undef LO_MAT8_CASE
          default:
            break;
        }
      }
    }
    for (; r < rows; r += 4) {
      const float* ar = a + r * a_stride;
      float* of = out + r * out_stride + first * kLanes;
      switch (n) {
#define LO_MAT_CASE(V)                                                                          \
  case V:                                                                                        \
    if constexpr (V <= kMaxPanel)                                                                \
      MatPanel<4, V>(ar, a_stride, a_inner, inner, wf, w_stride, bf, accumulate, of, out_stride); \
    break;
        LO_MAT_CASE(1)
        LO_MAT_CASE(2)
        LO_MAT_CASE(3)
        LO_MAT_CASE(4)
        LO_MAT_CASE(5)
        LO_MAT_CASE(6)
#undef LO_MAT_CASE
        default:
          break;
      }
    }
  }
}

}  // namespace learned_opt_tile_matmul

#endif  // LEARNED_OPT_KERNELS_TILE_MATMUL_H_
