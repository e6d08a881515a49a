// Register-tiled matmuls on small tiles in L1, for the stack, MLP and Gram kernels: a few rows
// times a few column vectors of accumulators, the operand's elements broadcast, the weights'
// rows loaded as vectors; a layer's weights packed for them, and its cotangents summed over
// fixed chunks of rows.

#ifndef LEARNED_OPT_KERNELS_TILE_MATMUL_H_
#define LEARNED_OPT_KERNELS_TILE_MATMUL_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "simd.h"

namespace learned_opt_tile_matmul {

using learned_opt_simd::AlignedFloats;
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

// A layer's sizes and its weights in the kernels' layout: W (fan_in, n_pad) and b (n_pad) with
// zero columns up to whole vectors, and W^T (n, fan_in_pad) likewise.
struct Layer {
  int fan_in = 0, n = 0, n_pad = 0, fan_in_pad = 0, fan_in_4 = 0;
  std::unique_ptr<AlignedFloats> w, b, wt;
};

// Fills l's padded sizes and packed weights from w (fan_in, n) and b (n,), row-major.
inline void PackWeights(const float* wp, const float* bp, Layer& l) {
  l.n_pad = RoundUp(l.n, kLanes);
  l.fan_in_pad = RoundUp(l.fan_in, kLanes);
  l.fan_in_4 = RoundUp(l.fan_in, 4);
  l.w = std::make_unique<AlignedFloats>(static_cast<size_t>(l.fan_in) * l.n_pad);
  l.b = std::make_unique<AlignedFloats>(l.n_pad);
  l.wt = std::make_unique<AlignedFloats>(static_cast<size_t>(l.n) * l.fan_in_pad);
  for (int k = 0; k < l.fan_in; ++k) {
    std::memcpy(l.w->data + k * l.n_pad, wp + k * l.n, l.n * sizeof(float));
    for (int j = 0; j < l.n; ++j) l.wt->data[j * l.fan_in_pad + k] = wp[k * l.n + j];
  }
  std::memcpy(l.b->data, bp, l.n * sizeof(float));
}

// out (rows, cols) = the sum over the chunks' slots, in chunk order, of the (rows, cols) block at
// offset in each (its rows stride floats apart, a multiple of kLanes; 0 for one row): whole
// vectors of the padded block, then its (rows, cols) part copied out. Deterministic whatever
// thread took a chunk; every element is summed in the same order as one at a time would be.
inline void SumChunks(const float* slots, int64_t chunks, int64_t slot_size, int64_t offset,
                      int rows, int cols, int stride, float* out) {
  const int width = stride > 0 ? stride : RoundUp(cols, kLanes);
  AlignedFloats sum(static_cast<size_t>(rows) * width);
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const float* block = slots + chunk * slot_size + offset;
    for (int j = 0; j < rows * width; j += kLanes) {
      Store(sum.data + j, Load(sum.data + j) + Load(block + j));
    }
  }
  for (int k = 0; k < rows; ++k) {
    std::memcpy(out + k * cols, sum.data + k * width, cols * sizeof(float));
  }
}

// Group g's weight cotangents of every layer from its `chunks` slots (slot_size floats apart,
// each holding per layer dW (fan_in_4, n_pad) then db (n_pad)), summed in chunk order into
// grads[2 i] + g fan_in n (dW) and grads[2 i + 1] + g n (db). Returns the slot offset past the
// layers.
inline int64_t SumLayerChunks(const float* slots, int64_t chunks, int64_t slot_size,
                              const std::vector<Layer>& layers, const std::vector<float*>& grads,
                              int64_t g) {
  int64_t offset = 0;
  for (size_t i = 0; i < layers.size(); ++i) {
    const Layer& l = layers[i];
    SumChunks(slots, chunks, slot_size, offset, l.fan_in, l.n, l.n_pad,
              grads[2 * i] + g * l.fan_in * l.n);
    SumChunks(slots, chunks, slot_size, offset + l.fan_in_4 * l.n_pad, 1, l.n, l.n_pad,
              grads[2 * i + 1] + g * l.n);
    offset += static_cast<int64_t>(l.fan_in_4 + 1) * l.n_pad;
  }
  return offset;
}

}  // namespace learned_opt_tile_matmul

#endif  // LEARNED_OPT_KERNELS_TILE_MATMUL_H_
