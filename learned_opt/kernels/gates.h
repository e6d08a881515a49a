// The LSTM gates on a tile of rows, forward and backward, shared by the gate kernels
// (lstm_gates.cc) and the stack kernels (lstm_stack.cc). The math (gates in order i, f, g, o):
//
//   c' = sigmoid(z_f) c + sigmoid(z_i) tanh(z_g),   h' = sigmoid(z_o) tanh(c');
//   dc_total = dc' + dh' o (1 - tanh(c')^2)
//   dz_i = dc_total g i (1 - i),  dz_f = dc_total c f (1 - f),  dz_g = dc_total i (1 - g^2),
//   dz_o = dh' tanh(c') o (1 - o),  dc = dc_total f.
//
// A tile's four gate blocks are gathered into contiguous scratch, so every vector operation is
// full whatever hidden is; the backward recomputes the gates from z (nothing but z and c is
// needed between the passes), unless the caller kept ForwardTile's activations.

#ifndef LEARNED_OPT_KERNELS_GATES_H_
#define LEARNED_OPT_KERNELS_GATES_H_

#include <cstdint>
#include <cstring>

#include "simd.h"

namespace learned_opt_gates {

using learned_opt_simd::AlignedFloats;
using learned_opt_simd::CopyRow;
using learned_opt_simd::kLanes;
using learned_opt_simd::Load;
using learned_opt_simd::Sigmoid;
using learned_opt_simd::Splat;
using learned_opt_simd::Store;
using learned_opt_simd::Tanh;
using learned_opt_simd::Vec;

constexpr int kTileRows = 16;  // rows gathered and computed together

// One thread's tile buffers: the four gate blocks and up to four (rows, hidden) operands or
// results, each kTileRows * hidden floats plus a vector of padding.
struct Tiles {
  explicit Tiles(int hidden) : stride(kTileRows * hidden + kLanes), buffer(8 * stride) {}
  float* operator[](int k) { return buffer.data + k * stride; }
  int stride;
  AlignedFloats buffer;
};

// Gathers gate k of a tile's count rows of z (rows at z_stride floats) into tiles[k], k = 0..3.
inline void GatherGates(const float* z, int z_stride, int count, int hidden, Tiles& tiles) {
  for (int k = 0; k < 4; ++k) {
    for (int m = 0; m < count; ++m) {
      CopyRow(tiles[k] + m * hidden, z + m * z_stride + k * hidden, hidden);
    }
  }
}

struct Gates {
  Vec i, f, g, o;
};

constexpr int kActivations = 5;  // i, f, g, o, tanh(c')

inline Gates Activate(Tiles& t, int j) {
  return {Sigmoid(Load(t[0] + j)), Sigmoid(Load(t[1] + j)), Tanh(Load(t[2] + j)),
          Sigmoid(Load(t[3] + j))};
}

// The tile's (count, hidden) operands are read, and its results written, in place when they
// are whole vectors (n a multiple of kLanes: always for a full tile); else through the tiles.
inline const float* Operand(const float* p, int n, float* tile) {
  if (n % kLanes == 0) return p;
  std::memcpy(tile, p, n * sizeof(float));
  return tile;
}

inline float* Result(float* p, int n, float* tile) { return n % kLanes == 0 ? p : tile; }

inline void Flush(float* p, int n, const float* result) {
  if (result != p) std::memcpy(p, result, n * sizeof(float));
}

// The gates of one tile of count <= kTileRows rows: z's rows at z_stride, c, h_out, c_out
// contiguous (count, hidden).
// With act, the activations i, f, g, o and tanh(c') are kept there too (kActivations blocks of
// act_stride floats), for a backward pass that then need not recompute them.
inline void ForwardTile(const float* z, int z_stride, const float* c, float* h_out, float* c_out,
                 int hidden, int count, Tiles& t, float* act = nullptr, int act_stride = 0) {
  const int n = count * hidden;
  GatherGates(z, z_stride, count, hidden, t);
  const float* c_old = Operand(c, n, t[4]);
  float* c_new = Result(c_out, n, t[5]);
  float* h_new = Result(h_out, n, t[6]);
  for (int j = 0; j < n; j += kLanes) {
    const Gates a = Activate(t, j);
    const Vec c_j = a.f * Load(c_old + j) + a.i * a.g;
    const Vec tanh_c = Tanh(c_j);
    Store(c_new + j, c_j);
    Store(h_new + j, a.o * tanh_c);
    if (act != nullptr) {
      Store(act + j, a.i);
      Store(act + act_stride + j, a.f);
      Store(act + 2 * act_stride + j, a.g);
      Store(act + 3 * act_stride + j, a.o);
      Store(act + 4 * act_stride + j, tanh_c);
    }
  }
  Flush(c_out, n, c_new);
  Flush(h_out, n, h_new);
}

// The gates' derivative on one tile: dz's rows at dz_stride, the rest contiguous (count, hidden).
// With act (ForwardTile's), the activations are read from there instead of recomputed from z.
inline void BackwardTile(const float* z, int z_stride, const float* c, const float* dh,
                  const float* dc_new, float* dz, int dz_stride, float* dc, int hidden, int count,
                  Tiles& t, const float* act = nullptr, int act_stride = 0) {
  const Vec one = Splat(1.0f);
  const int n = count * hidden;
  if (act == nullptr) GatherGates(z, z_stride, count, hidden, t);
  const float* c_in = Operand(c, n, t[4]);
  const float* dh_in = Operand(dh, n, t[5]);
  const float* dc_in = Operand(dc_new, n, t[6]);
  float* dc_out = Result(dc, n, t[7]);
  for (int j = 0; j < n; j += kLanes) {
    const Vec c_old = Load(c_in + j), dh_j = Load(dh_in + j);
    Gates a;
    Vec tanh_c;
    if (act != nullptr) {
      a = {Load(act + j), Load(act + act_stride + j), Load(act + 2 * act_stride + j),
           Load(act + 3 * act_stride + j)};
      tanh_c = Load(act + 4 * act_stride + j);
    } else {
      a = Activate(t, j);
      tanh_c = Tanh(a.f * c_old + a.i * a.g);
    }
    const Vec total = Load(dc_in + j) + dh_j * a.o * (one - tanh_c * tanh_c);
    Store(dc_out + j, total * a.f);
    // The gate cotangents overwrite the gates' own tiles, read above for this j only.
    Store(t[0] + j, total * a.g * a.i * (one - a.i));
    Store(t[1] + j, total * c_old * a.f * (one - a.f));
    Store(t[2] + j, total * a.i * (one - a.g * a.g));
    Store(t[3] + j, dh_j * tanh_c * a.o * (one - a.o));
  }
  for (int m = 0; m < count; ++m) {
    for (int k = 0; k < 4; ++k) {
      CopyRow(dz + m * dz_stride + k * hidden, t[k] + m * hidden, hidden);
    }
  }
  Flush(dc, n, dc_out);
}

}  // namespace learned_opt_gates

#endif  // LEARNED_OPT_KERNELS_GATES_H_
