// The LSTM cell's element-wise part, forward and backward, as two fused CPU kernels.
//
// learned_opt/lstm.py computes each layer as z = [x, h] @ W + b (a matmul XLA does well) and then
// the gates from z (rows, 4 hidden), in order i, f, g, o, and the old cell c (rows, hidden):
//
//   c' = sigmoid(z_f) c + sigmoid(z_i) tanh(z_g),   h' = sigmoid(z_o) tanh(c').
//
// XLA:CPU runs that, and above all its derivative, as many passes over (rows, 4 hidden) arrays
// (the backward pass ~2x the forward's time, each ~1.3x a layer's matmul forward and backward on
// 2 cores). Here each is one pass over a tile of rows in L1: the tile's four gate blocks are
// gathered into contiguous scratch, so every vector operation is full whatever hidden is, and
// the results are written back in the caller's layout. The backward kernel recomputes the gates
// from z (nothing but z and c is saved between the passes) and returns the cotangents of z and c:
//
//   dc_total = dc' + dh' o (1 - tanh(c')^2)
//   dz_i = dc_total g i (1 - i),  dz_f = dc_total c f (1 - f),  dz_g = dc_total i (1 - g^2),
//   dz_o = dh' tanh(c') o (1 - o),  dc = dc_total f.
//
// Rows are independent, so the results do not depend on how rows are split between threads.
// Built on first use by learned_opt/kernels/fused_gates.py (flags in build.py).

#include <cstdint>
#include <cstring>
#include <memory>

#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using learned_opt_simd::AlignedFloats;
using learned_opt_simd::CopyRow;
using learned_opt_simd::kLanes;
using learned_opt_simd::Load;
using learned_opt_simd::Sigmoid;
using learned_opt_simd::Splat;
using learned_opt_simd::Store;
using learned_opt_simd::Tanh;
using learned_opt_simd::Vec;

constexpr int kTileRows = 16;         // rows gathered and computed together
constexpr int64_t kChunkRows = 1024;  // rows a thread takes at a time

// One thread's tile buffers: the four gate blocks and up to four (rows, hidden) operands or
// results, each kTileRows * hidden floats plus a vector of padding.
struct Tiles {
  explicit Tiles(int hidden) : stride(kTileRows * hidden + kLanes), buffer(8 * stride) {}
  float* operator[](int k) { return buffer.data + k * stride; }
  int stride;
  AlignedFloats buffer;
};

// Gathers gate k of rows [row, row + count) of z (rows, 4 hidden) into tiles[k], k = 0..3.
void GatherGates(const float* z, int64_t row, int count, int hidden, Tiles& tiles) {
  for (int k = 0; k < 4; ++k) {
    for (int m = 0; m < count; ++m) {
      CopyRow(tiles[k] + m * hidden, z + (row + m) * 4 * hidden + k * hidden, hidden);
    }
  }
}

struct Gates {
  Vec i, f, g, o;
};

inline Gates Activate(Tiles& t, int j) {
  return {Sigmoid(Load(t[0] + j)), Sigmoid(Load(t[1] + j)), Tanh(Load(t[2] + j)),
          Sigmoid(Load(t[3] + j))};
}

void ForwardRows(const float* z, const float* c, float* h_out, float* c_out, int hidden,
                 int64_t begin, int64_t end, Tiles& t) {
  for (int64_t row = begin; row < end; row += kTileRows) {
    const int count = static_cast<int>(std::min<int64_t>(kTileRows, end - row));
    const int n = count * hidden;
    GatherGates(z, row, count, hidden, t);
    std::memcpy(t[4], c + row * hidden, n * sizeof(float));
    for (int j = 0; j < n; j += kLanes) {
      const Gates a = Activate(t, j);
      const Vec c_new = a.f * Load(t[4] + j) + a.i * a.g;
      Store(t[5] + j, c_new);
      Store(t[6] + j, a.o * Tanh(c_new));
    }
    std::memcpy(c_out + row * hidden, t[5], n * sizeof(float));
    std::memcpy(h_out + row * hidden, t[6], n * sizeof(float));
  }
}

void BackwardRows(const float* z, const float* c, const float* dh, const float* dc_new,
                  float* dz, float* dc, int hidden, int64_t begin, int64_t end, Tiles& t) {
  const Vec one = Splat(1.0f);
  for (int64_t row = begin; row < end; row += kTileRows) {
    const int count = static_cast<int>(std::min<int64_t>(kTileRows, end - row));
    const int n = count * hidden;
    GatherGates(z, row, count, hidden, t);
    std::memcpy(t[4], c + row * hidden, n * sizeof(float));
    std::memcpy(t[5], dh + row * hidden, n * sizeof(float));
    std::memcpy(t[6], dc_new + row * hidden, n * sizeof(float));
    for (int j = 0; j < n; j += kLanes) {
      const Gates a = Activate(t, j);
      const Vec c_old = Load(t[4] + j), dh_j = Load(t[5] + j);
      const Vec tanh_c = Tanh(a.f * c_old + a.i * a.g);
      const Vec total = Load(t[6] + j) + dh_j * a.o * (one - tanh_c * tanh_c);
      Store(t[7] + j, total * a.f);
      // The gate cotangents overwrite the gates' own tiles, read above for this j only.
      Store(t[0] + j, total * a.g * a.i * (one - a.i));
      Store(t[1] + j, total * c_old * a.f * (one - a.f));
      Store(t[2] + j, total * a.i * (one - a.g * a.g));
      Store(t[3] + j, dh_j * tanh_c * a.o * (one - a.o));
    }
    for (int m = 0; m < count; ++m) {
      for (int k = 0; k < 4; ++k) {
        CopyRow(dz + (row + m) * 4 * hidden + k * hidden, t[k] + m * hidden, hidden);
      }
    }
    std::memcpy(dc + row * hidden, t[7], n * sizeof(float));
  }
}

// rows and hidden from c (..., hidden) and z (..., 4 hidden), or an error naming the mismatch.
ffi::Error Shape(const ffi::Buffer<ffi::F32>& z, const ffi::Buffer<ffi::F32>& c, int64_t& rows,
                 int& hidden) {
  const auto dims = c.dimensions();
  if (dims.size() == 0 || dims.back() == 0) {
    return ffi::Error::InvalidArgument("c must be (..., hidden) with hidden > 0");
  }
  hidden = static_cast<int>(dims.back());
  rows = static_cast<int64_t>(c.element_count()) / hidden;
  if (z.element_count() != static_cast<size_t>(rows) * 4 * hidden) {
    return ffi::Error::InvalidArgument("z must be (..., 4 hidden) with c's rows");
  }
  return ffi::Error::Success();
}

std::function<std::function<void(int64_t, int64_t)>()> WithTiles(
    int hidden, std::function<void(int64_t, int64_t, Tiles&)> body) {
  return [hidden, body] {
    auto tiles = std::make_shared<Tiles>(hidden);
    return [tiles, body](int64_t begin, int64_t end) { body(begin, end, *tiles); };
  };
}

ffi::Error GatesForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> z, ffi::Buffer<ffi::F32> c,
                        ffi::ResultBuffer<ffi::F32> h_out, ffi::ResultBuffer<ffi::F32> c_out) {
  int64_t rows;
  int hidden;
  if (ffi::Error e = Shape(z, c, rows, hidden); !e.success()) return e;
  const float *zp = z.typed_data(), *cp = c.typed_data();
  float *hp = h_out->typed_data(), *op = c_out->typed_data();
  learned_opt_simd::ParallelRows(
      pool, 0, false, rows, kChunkRows,
      WithTiles(hidden, [=](int64_t begin, int64_t end, Tiles& t) {
        ForwardRows(zp, cp, hp, op, hidden, begin, end, t);
      }));
  return ffi::Error::Success();
}

ffi::Error GatesBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> z, ffi::Buffer<ffi::F32> c,
                         ffi::Buffer<ffi::F32> dh, ffi::Buffer<ffi::F32> dc_new,
                         ffi::ResultBuffer<ffi::F32> dz, ffi::ResultBuffer<ffi::F32> dc) {
  int64_t rows;
  int hidden;
  if (ffi::Error e = Shape(z, c, rows, hidden); !e.success()) return e;
  if (dh.element_count() != c.element_count() || dc_new.element_count() != c.element_count()) {
    return ffi::Error::InvalidArgument("dh and dc must be shaped like c");
  }
  const float *zp = z.typed_data(), *cp = c.typed_data();
  const float *dhp = dh.typed_data(), *dnp = dc_new.typed_data();
  float *dzp = dz->typed_data(), *dcp = dc->typed_data();
  learned_opt_simd::ParallelRows(
      pool, 0, false, rows, kChunkRows,
      WithTiles(hidden, [=](int64_t begin, int64_t end, Tiles& t) {
        BackwardRows(zp, cp, dhp, dnp, dzp, dcp, hidden, begin, end, t);
      }));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LearnedOptGatesForward, GatesForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // z (..., 4 hidden)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // c (..., hidden)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // h' (..., hidden)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // c' (..., hidden)

XLA_FFI_DEFINE_HANDLER_SYMBOL(LearnedOptGatesBackward, GatesBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // z (..., 4 hidden)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // c (..., hidden)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dh' (..., hidden)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dc' (..., hidden)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dz (..., 4 hidden)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dc (..., hidden)
