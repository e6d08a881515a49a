// The LSTM cell's element-wise part, forward and backward, as two fused CPU kernels.
//
// learned_opt/lstm.py computes each layer as z = [x, h] @ W + b (a matmul XLA does well) and then
// the gates from z (rows, 4 hidden), in order i, f, g, o, and the old cell c (rows, hidden)
// (gates.h has the formulas). XLA:CPU runs them, and above all their derivative, as many passes
// over (rows, 4 hidden) arrays (the backward pass ~2x the forward's time, each ~1.3x a layer's
// matmul forward and backward on 2 cores). Here each is one pass over a tile of rows in L1,
// the results written back in the caller's layout; the backward kernel recomputes the gates from
// z and returns the cotangents of z and c. Used where XLA must compute the matmuls (LSTM+GAC);
// lstm_stack.cc runs a whole step without GAC.
//
// Rows are independent, so the results do not depend on how rows are split between threads.
// Built on first use by learned_opt/kernels/stack.py (flags in build.py).

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>

#include "gates.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using learned_opt_gates::BackwardTile;
using learned_opt_gates::ForwardTile;
using learned_opt_gates::kTileRows;
using learned_opt_gates::Tiles;

constexpr int64_t kChunkRows = 1024;  // rows a thread takes at a time

void ForwardRows(const float* z, const float* c, float* h_out, float* c_out, int hidden,
                 int64_t begin, int64_t end, Tiles& t) {
  for (int64_t row = begin; row < end; row += kTileRows) {
    const int count = static_cast<int>(std::min<int64_t>(kTileRows, end - row));
    const int64_t at = row * hidden;
    ForwardTile(z + 4 * at, 4 * hidden, c + at, h_out + at, c_out + at, hidden, count, t);
  }
}

void BackwardRows(const float* z, const float* c, const float* dh, const float* dc_new,
                  float* dz, float* dc, int hidden, int64_t begin, int64_t end, Tiles& t) {
  for (int64_t row = begin; row < end; row += kTileRows) {
    const int count = static_cast<int>(std::min<int64_t>(kTileRows, end - row));
    const int64_t at = row * hidden;
    BackwardTile(z + 4 * at, 4 * hidden, c + at, dh + at, dc_new + at, dz + 4 * at, 4 * hidden,
                 dc + at, hidden, count, t);
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

