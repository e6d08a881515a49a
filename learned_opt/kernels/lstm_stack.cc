// One step of a stacked coordinatewise LSTM on every coordinate of one parameter leaf, forward
// and backward, as two fused CPU kernels (``stack`` in learned_opt/kernels/stack.py).
//
// x (rows, features), h and c (rows, layers, hidden) in the optimizer state's own layout, weights
// per layer. Per tile of kTileRows rows, layer after layer, the operand a = [input, h_l] and the
// pre-activations z = a W + b are built in L1 and used there; nothing per layer is written to
// memory but the new state, so XLA neither slices the state per layer nor stacks it again, and
// saves only the step's inputs for the backward pass. The backward kernel recomputes a and z for
// every layer (and keeps the gates' activations of the layers below the top, which the
// recomputation had to evaluate anyway to feed the layer above), then walks the layers down: dz
// from the gates' derivative (gates.h), da = dz W^T (split into the input's cotangent, which is
// the layer below's dh', and dh), dW += a^T dz, db += sum dz. Weight cotangents are summed per
// chunk of kChunkRows rows into the chunk's own slot, then the slots in chunk order, so the
// result does not depend on which thread took which chunk; under a jax.vmap with the weights
// shared, the rows are groups (problems), each with its own weight cotangents, and groups smaller
// than a chunk are taken several at a time, so that tiles stay full (simd.h's GroupChunks). The
// Readout handlers add the optimizer's read-out u = h'_top w_out + b_out per row, from the top
// layer's h' in the tile; their backward pass also runs the top layer's gates in its
// recomputation, for h'_top, and adds du w_out into the top layer's dh'. The forward kernel may
// run in place (h' and c' the buffers of h and c): a tile reads a layer's old state of its rows
// before it writes that layer's new state. A truncation (train/truncation.py) has two more: a
// read-out step inside a workspace holding every step's state (slot t to slot t + 1, in place),
// and its backward pass over all the steps, tile by tile, each tile's state cotangents in its own
// buffers, returning only the weights' cotangents. Built on first use by stack.py (flags in
// build.py).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "gates.h"
#include "simd.h"
#include "tile_matmul.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using learned_opt_gates::BackwardTile;
using learned_opt_gates::ForwardTile;
using learned_opt_gates::kActivations;
using learned_opt_gates::kTileRows;
using learned_opt_gates::Tiles;
using learned_opt_simd::AlignedFloats;
using learned_opt_simd::CopyRow;
using learned_opt_simd::kLanes;
using learned_opt_simd::Load;
using learned_opt_simd::LoadPart;
using learned_opt_simd::Splat;
using learned_opt_simd::Store;
using learned_opt_simd::StorePart;
using learned_opt_simd::SumLanes;
using learned_opt_simd::Vec;
using learned_opt_tile_matmul::Layer;
using learned_opt_tile_matmul::PackWeights;
using learned_opt_tile_matmul::RoundUp;
using learned_opt_tile_matmul::SumChunks;
using learned_opt_tile_matmul::SumLayerChunks;
using learned_opt_tile_matmul::TileMatmul;

// Rows a thread takes at a time: several times a row of the gates alone, and the quadratic
// meta-step's 1,280 rows must still split evenly between two threads.
constexpr int64_t kChunkRows = 128;

struct Stack {
  int64_t rows = 0;
  int layers = 0, hidden = 0, features = 0;
  std::vector<Layer> l;
};

// The step's sizes from h (..., layers, hidden) and its weights, the first 2 x layers of `args`
// (w_0, b_0, w_1, b_1, ...), packed; or an error naming the mismatch.
ffi::Error PackStack(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& h,
                     const ffi::Buffer<ffi::F32>& c, const ffi::RemainingArgs& args, Stack& s,
                     int64_t slots = 1, int64_t x_slots = 1) {
  const auto dims = h.dimensions();
  if (dims.size() < 2 || dims[dims.size() - 1] == 0 || dims[dims.size() - 2] == 0) {
    return ffi::Error::InvalidArgument("h must be (..., layers, hidden) with both > 0");
  }
  s.layers = static_cast<int>(dims[dims.size() - 2]);
  s.hidden = static_cast<int>(dims[dims.size() - 1]);
  s.rows = static_cast<int64_t>(h.element_count()) / (s.layers * s.hidden * slots);
  if (c.element_count() != h.element_count()) {
    return ffi::Error::InvalidArgument("c must be shaped like h");
  }
  if (args.size() < static_cast<size_t>(2 * s.layers)) {
    return ffi::Error::InvalidArgument("expected a w and a b per layer");
  }
  s.l.resize(s.layers);
  for (int i = 0; i < s.layers; ++i) {
    auto w = args.get<ffi::Buffer<ffi::F32>>(2 * i);
    auto b = args.get<ffi::Buffer<ffi::F32>>(2 * i + 1);
    if (!w.has_value() || !b.has_value()) return ffi::Error::InvalidArgument("weights not f32");
    Layer& l = s.l[i];
    l.n = 4 * s.hidden;
    const auto w_dims = w->dimensions();
    if (w_dims.size() != 2 || w_dims[1] != l.n || w_dims[0] <= s.hidden ||
        b->element_count() != static_cast<size_t>(l.n)) {
      return ffi::Error::InvalidArgument("layer " + std::to_string(i) +
                                         ": w must be (in + hidden, 4 hidden), b (4 hidden,)");
    }
    l.fan_in = static_cast<int>(w_dims[0]);
    if (i > 0 && l.fan_in != 2 * s.hidden) {
      return ffi::Error::InvalidArgument("layers above the first take the hidden state below");
    }
    PackWeights(w->typed_data(), b->typed_data(), l);
  }
  s.features = s.l[0].fan_in - s.hidden;
  if (x.element_count() != static_cast<size_t>(s.rows * s.features * x_slots)) {
    return ffi::Error::InvalidArgument("x must be (..., features) with h's rows");
  }
  return ffi::Error::Success();
}

// One thread's scratch: per layer the tile's operand, z, old cell and, below the top, the
// gates' activations (kept for the backward pass), and tiles for the chain between layers and
// the cotangents.
struct StackScratch {
  explicit StackScratch(const Stack& s) : tiles(s.hidden), tile(kTileRows * s.hidden + kLanes) {
    for (const Layer& l : s.l) {
      a.push_back(std::make_unique<AlignedFloats>(kTileRows * l.fan_in_4));
      z.push_back(std::make_unique<AlignedFloats>(kTileRows * l.n_pad));
      c.push_back(std::make_unique<AlignedFloats>(tile));
      act.push_back(std::make_unique<AlignedFloats>(kActivations * tile));
    }
    for (auto* t : {&h_new, &c_new, &dh, &dc, &dc_old, &carry}) {
      t->reset(new AlignedFloats(tile));
    }
    dz.reset(new AlignedFloats(kTileRows * s.l[0].n_pad));
    int widest = 0;
    for (const Layer& l : s.l) widest = std::max(widest, l.fan_in_pad);
    da.reset(new AlignedFloats(kTileRows * widest));
  }
  Tiles tiles;
  int tile;  // floats in a (kTileRows, hidden) tile, plus a vector of padding
  std::vector<std::unique_ptr<AlignedFloats>> a, z, c, act;
  std::unique_ptr<AlignedFloats> h_new, c_new, dh, dc, dc_old, carry, dz, da;
};

// The tile's forward pass, layer by layer; per layer a, z and the old cell stay in the scratch.
// With h_out and c_out the new states are written out (the forward kernel); without, not (the
// backward pass's recomputation, which keeps the activations of the layers below the top, and
// with top_gates the top layer's too and its h' in s.h_new).
void StackForwardTile(const Stack& st, const float* x, const float* h, const float* c,
                      int64_t row, int count, float* h_out, float* c_out, bool top_gates,
                      StackScratch& s) {
  const int hidden = st.hidden, state_row = st.layers * hidden;
  for (int i = 0; i < st.layers; ++i) {
    const Layer& l = st.l[i];
    float* a = s.a[i]->data;
    const int in = l.fan_in - hidden;
    std::memset(a, 0, kTileRows * l.fan_in_4 * sizeof(float));
    for (int m = 0; m < count; ++m) {
      const float* input = i == 0 ? x + (row + m) * in : s.h_new->data + m * hidden;
      CopyRow(a + m * l.fan_in_4, input, in);
      CopyRow(a + m * l.fan_in_4 + in, h + (row + m) * state_row + i * hidden, hidden);
      CopyRow(s.c[i]->data + m * hidden, c + (row + m) * state_row + i * hidden, hidden);
    }
    TileMatmul(kTileRows, l.n_pad / kLanes, a, l.fan_in_4, 1, l.fan_in, l.w->data, l.n_pad,
               l.b->data, false, s.z[i]->data, l.n_pad);
    // The backward pass needs the top layer's z only, unless a read-out needs its h.
    if (h_out == nullptr && i == st.layers - 1 && !top_gates) break;
    ForwardTile(s.z[i]->data, l.n_pad, s.c[i]->data, s.h_new->data, s.c_new->data, hidden, count,
                s.tiles, h_out == nullptr ? s.act[i]->data : nullptr, s.tile);
    if (h_out != nullptr) {
      for (int m = 0; m < count; ++m) {
        const int64_t at = (row + m) * state_row + i * hidden;
        CopyRow(h_out + at, s.h_new->data + m * hidden, hidden);
        CopyRow(c_out + at, s.c_new->data + m * hidden, hidden);
      }
    }
  }
}

struct StackIo {
  const float *x, *h, *c;
  float *h_out, *c_out;                    // forward
  const float *dh_new, *dc_new;            // backward: cotangents of the new states
  float *dx, *dh, *dc;                     // backward: cotangents of x and the old states
  int64_t slot_size;                       // backward: per chunk, per layer dW then db
  // With a read-out u = h'_top . w_out + b_out (nullptr without): u (rows) forward; du (rows)
  // backward, whose dw_out and db_out follow the layers' in each slot.
  const float* w_out = nullptr;
  float b_out = 0.0f;
  float* out = nullptr;
  const float* d_out = nullptr;
};

// The read-out's slot part: dw_out padded to whole vectors, then db_out (a vector, lane 0).
int64_t ReadoutSlot(int hidden) { return RoundUp(hidden, kLanes) + kLanes; }

void StackForwardRows(const Stack& st, const StackIo& io, int64_t begin, int64_t end,
                      StackScratch& s) {
  for (int64_t row = begin; row < end; row += kTileRows) {
    const int count = static_cast<int>(std::min<int64_t>(kTileRows, end - row));
    StackForwardTile(st, io.x, io.h, io.c, row, count, io.h_out, io.c_out, true, s);
    if (io.out == nullptr) continue;
    for (int m = 0; m < count; ++m) {  // s.h_new holds the top layer's h'
      const float* h_top = s.h_new->data + m * st.hidden;
      Vec u = Splat(0.0f);
      for (int j = 0; j < st.hidden; j += kLanes) {
        const int n = std::min(kLanes, st.hidden - j);
        u += LoadPart(h_top + j, n) * LoadPart(io.w_out + j, n);
      }
      io.out[row + m] = io.b_out + SumLanes(u);
    }
  }
}

// The tile of `count` rows from `row`, its part of the weight cotangents added into each
// chunk's slot (slots + c * io.slot_size). x, h, c and du are read at `row`; dh', dc' read and
// dx, dh, dc written at `cot_row` (the row itself, or 0 for a tile's own cotangent buffers).
void StackBackwardTile(const Stack& st, const StackIo& io, int64_t row, int count,
                       int64_t cot_row, const learned_opt_simd::GroupChunks& chunks, float* slots,
                       StackScratch& s) {
  const int hidden = st.hidden, state_row = st.layers * hidden;
  const bool readout = io.d_out != nullptr;
  StackForwardTile(st, io.x, io.h, io.c, row, count, nullptr, nullptr, readout, s);
  for (int i = st.layers - 1; i >= 0; --i) {
    const Layer& l = st.l[i];
    const int in = l.fan_in - hidden;
    for (int m = 0; m < count; ++m) {
      const int64_t at = (cot_row + m) * state_row + i * hidden;
      CopyRow(s.dh->data + m * hidden, io.dh_new + at, hidden);
      CopyRow(s.dc->data + m * hidden, io.dc_new + at, hidden);
    }
    if (i < st.layers - 1) {  // the layer above took this layer's new h as its input
      for (int j = 0; j < count * hidden; j += kLanes) {
        Store(s.dh->data + j, Load(s.dh->data + j) + Load(s.carry->data + j));
      }
    } else if (readout) {  // u = h' . w_out + b_out read the top layer's new h
      for (int m = 0; m < count; ++m) {
        float* readout_slot = slots + (chunks.chunk_of(row + m) + 1) * io.slot_size -
                              ReadoutSlot(hidden);
        const float du = io.d_out[row + m];
        const Vec du_v = Splat(du);
        float* dh = s.dh->data + m * hidden;
        const float* h_top = s.h_new->data + m * hidden;
        for (int j = 0; j < hidden; j += kLanes) {  // dw_out's padding lanes stay 0
          const int n = std::min(kLanes, hidden - j);
          StorePart(dh + j, LoadPart(dh + j, n) + du_v * LoadPart(io.w_out + j, n), n);
          Store(readout_slot + j, Load(readout_slot + j) + du_v * LoadPart(h_top + j, n));
        }
        readout_slot[RoundUp(hidden, kLanes)] += du;
      }
    }
    float* dz = s.dz->data;
    if (count < kTileRows) {
      std::memset(dz + count * l.n_pad, 0, (kTileRows - count) * l.n_pad * sizeof(float));
    }
    // Below the top (and at the top with a read-out) the recomputation kept the activations;
    // else the top layer's come from z.
    BackwardTile(s.z[i]->data, l.n_pad, s.c[i]->data, s.dh->data, s.dc->data, dz, l.n_pad,
                 s.dc_old->data, hidden, count, s.tiles,
                 i < st.layers - 1 || readout ? s.act[i]->data : nullptr, s.tile);
    TileMatmul(kTileRows, l.fan_in_pad / kLanes, dz, l.n_pad, 1, l.n, l.wt->data, l.fan_in_pad,
               nullptr, false, s.da->data, l.fan_in_pad);
    for (int m = 0; m < count; ++m) {
      const float* da = s.da->data + m * l.fan_in_pad;
      const int64_t at = (cot_row + m) * state_row + i * hidden;
      CopyRow(io.dc + at, s.dc_old->data + m * hidden, hidden);
      CopyRow(io.dh + at, da + in, hidden);
      if (i > 0) {
        CopyRow(s.carry->data + m * hidden, da, hidden);
      } else {
        CopyRow(io.dx + (cot_row + m) * in, da, in);
      }
    }
    // In a slot: layer i's dW (fan_in_4, n_pad) then db (n_pad), after the layers below.
    int64_t layer_offset = 0;
    for (int k = 0; k < i; ++k) layer_offset += (st.l[k].fan_in_4 + 1) * st.l[k].n_pad;
    chunks.ForEachPart(row, row + count, [&](int64_t c, int64_t first, int64_t last) {
      float* layer_dw = slots + c * io.slot_size + layer_offset;
      float* layer_db = layer_dw + l.fan_in_4 * l.n_pad;
      const int m0 = static_cast<int>(first - row), m1 = static_cast<int>(last - row);
      TileMatmul(l.fan_in_4, l.n_pad / kLanes, s.a[i]->data + m0 * l.fan_in_4, 1, l.fan_in_4,
                 m1 - m0, dz + m0 * l.n_pad, l.n_pad, nullptr, true, layer_dw, l.n_pad);
      for (int m = m0; m < m1; ++m) {
        for (int j = 0; j < l.n_pad; j += kLanes) {
          Store(layer_db + j, Load(layer_db + j) + Load(dz + m * l.n_pad + j));
        }
      }
    });
  }
}

// Rows [begin, end), tile by tile (StackBackwardTile).
void StackBackwardRows(const Stack& st, const StackIo& io, int64_t begin, int64_t end,
                       const learned_opt_simd::GroupChunks& chunks, float* slots,
                       StackScratch& s) {
  for (int64_t row = begin; row < end; row += kTileRows) {
    const int count = static_cast<int>(std::min<int64_t>(kTileRows, end - row));
    StackBackwardTile(st, io, row, count, row, chunks, slots, s);
  }
}

std::function<std::function<void(int64_t, int64_t)>()> WithStackScratch(
    const Stack& st, std::function<void(int64_t, int64_t, StackScratch&)> body) {
  return [&st, body] {
    auto scratch = std::make_shared<StackScratch>(st);
    return [scratch, body](int64_t begin, int64_t end) { body(begin, end, *scratch); };
  };
}

// The read-out's w_out (hidden, 1) and b_out (1,) at args[at], args[at + 1], into io; or an
// error naming the mismatch.
ffi::Error PackReadout(const Stack& st, const ffi::RemainingArgs& args, size_t at, StackIo& io) {
  auto w = args.get<ffi::Buffer<ffi::F32>>(at);
  auto b = args.get<ffi::Buffer<ffi::F32>>(at + 1);
  if (!w.has_value() || !b.has_value() || w->element_count() != static_cast<size_t>(st.hidden) ||
      b->element_count() != 1) {
    return ffi::Error::InvalidArgument("the read-out must be f32 w_out (hidden, 1), b_out (1,)");
  }
  io.w_out = w->typed_data();
  io.b_out = b->typed_data()[0];
  return ffi::Error::Success();
}

// Arguments x, h, c, w_0, b_0, ..., [w_out, b_out]; results h', c', [u].
ffi::Error RunStackForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> h,
                           ffi::Buffer<ffi::F32> c, const ffi::RemainingArgs& rest, float* h_out,
                           float* c_out, float* out, size_t out_count) {
  Stack st;
  if (ffi::Error e = PackStack(x, h, c, rest, st); !e.success()) return e;
  const bool readout = out != nullptr;
  if (rest.size() != static_cast<size_t>(2 * st.layers + (readout ? 2 : 0))) {
    return ffi::Error::InvalidArgument(readout ? "expected a w and a b per layer, w_out, b_out"
                                               : "expected a w and a b per layer, nothing else");
  }
  StackIo io{};
  if (readout) {
    if (ffi::Error e = PackReadout(st, rest, 2 * st.layers, io); !e.success()) return e;
    if (out_count != static_cast<size_t>(st.rows)) {
      return ffi::Error::InvalidArgument("the read-out's result must have h's rows");
    }
    io.out = out;
  }
  io.x = x.typed_data();
  io.h = h.typed_data();
  io.c = c.typed_data();
  io.h_out = h_out;
  io.c_out = c_out;
  learned_opt_simd::ParallelRows(
      pool, 0, false, st.rows, kChunkRows,
      WithStackScratch(st, [&st, &io](int64_t begin, int64_t end, StackScratch& s) {
        StackForwardRows(st, io, begin, end, s);
      }));
  return ffi::Error::Success();
}

ffi::Error StackForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> h,
                        ffi::Buffer<ffi::F32> c, ffi::RemainingArgs weights,
                        ffi::ResultBuffer<ffi::F32> h_out, ffi::ResultBuffer<ffi::F32> c_out) {
  return RunStackForward(pool, x, h, c, weights, h_out->typed_data(), c_out->typed_data(),
                         nullptr, 0);
}

ffi::Error StackReadoutForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F32> c,
                               ffi::RemainingArgs weights, ffi::ResultBuffer<ffi::F32> h_out,
                               ffi::ResultBuffer<ffi::F32> c_out, ffi::ResultBuffer<ffi::F32> out) {
  return RunStackForward(pool, x, h, c, weights, h_out->typed_data(), c_out->typed_data(),
                         out->typed_data(), out->element_count());
}

// Arguments x, h, c, w_0, b_0, ..., [w_out, b_out], dh', dc', [du]; results dx, dh, dc, dw_0,
// db_0, ..., [dw_out, db_out].
ffi::Error RunStackBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> h,
                            ffi::Buffer<ffi::F32> c, const ffi::RemainingArgs& rest,
                            ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dh,
                            ffi::ResultBuffer<ffi::F32> dc, ffi::RemainingRets weight_grads,
                            bool readout) {
  Stack st;
  if (ffi::Error e = PackStack(x, h, c, rest, st); !e.success()) return e;
  const size_t weights = 2 * st.layers + (readout ? 2 : 0);
  if (rest.size() != weights + (readout ? 3 : 2) || weight_grads.size() != weights) {
    return ffi::Error::InvalidArgument(
        "expected w, b per layer, [w_out, b_out], then dh', dc', [du]; dw, db per layer, "
        "[dw_out, db_out]");
  }
  auto dh_new = rest.get<ffi::Buffer<ffi::F32>>(weights);
  auto dc_new = rest.get<ffi::Buffer<ffi::F32>>(weights + 1);
  if (!dh_new.has_value() || !dc_new.has_value() ||
      dh_new->element_count() != h.element_count() ||
      dc_new->element_count() != h.element_count()) {
    return ffi::Error::InvalidArgument("dh' and dc' must be f32, shaped like h");
  }
  StackIo io{};
  int64_t slot_size = 0;
  for (const Layer& l : st.l) slot_size += static_cast<int64_t>(l.fan_in_4 + 1) * l.n_pad;
  if (readout) {
    if (ffi::Error e = PackReadout(st, rest, 2 * st.layers, io); !e.success()) return e;
    auto d_out = rest.get<ffi::Buffer<ffi::F32>>(weights + 2);
    if (!d_out.has_value() || d_out->element_count() != static_cast<size_t>(st.rows)) {
      return ffi::Error::InvalidArgument("du must be f32 with h's rows");
    }
    io.d_out = d_out->typed_data();
    slot_size += ReadoutSlot(st.hidden);
  }
  // The weight cotangents' leading dims, if any, are groups (a jax.vmap of the backward pass
  // with the weights shared): the rows are that many consecutive groups, each its own sums.
  std::vector<float*> grads;
  int64_t groups = -1;
  for (size_t i = 0; i < weights; ++i) {
    const bool in_layers = i < static_cast<size_t>(2 * st.layers);
    const Layer* l = in_layers ? &st.l[i / 2] : nullptr;
    // Per group: dw (fan_in, n), db (n); the read-out's dw_out (hidden,), db_out (1,).
    const int64_t size = in_layers ? (i % 2 == 0 ? static_cast<int64_t>(l->fan_in) * l->n : l->n)
                                   : (i % 2 == 0 ? st.hidden : 1);
    auto grad = weight_grads.get<ffi::Buffer<ffi::F32>>(i);
    if (!grad.has_value()) return ffi::Error::InvalidArgument("weight cotangents must be f32");
    if (groups < 0) groups = static_cast<int64_t>((*grad)->element_count()) / size;
    if (groups <= 0 || (*grad)->element_count() != static_cast<size_t>(groups * size) ||
        st.rows % groups != 0) {
      return ffi::Error::InvalidArgument(
          "every weight's cotangent must be shaped like it, after the same leading dims "
          "(groups), which divide h's rows");
    }
    grads.push_back((*grad)->typed_data());
  }
  const learned_opt_simd::GroupChunks chunks(groups, st.rows / groups, kChunkRows);
  AlignedFloats slots(static_cast<size_t>(std::max<int64_t>(chunks.count(), 1)) * slot_size);
  io.x = x.typed_data();
  io.h = h.typed_data();
  io.c = c.typed_data();
  io.dh_new = dh_new->typed_data();
  io.dc_new = dc_new->typed_data();
  io.dx = dx->typed_data();
  io.dh = dh->typed_data();
  io.dc = dc->typed_data();
  io.slot_size = slot_size;
  float* slots_p = slots.data;
  learned_opt_simd::ParallelRows(
      pool, 0, false, chunks.units(), 1,
      WithStackScratch(st, [&, slots_p](int64_t begin, int64_t end, StackScratch& s) {
        for (int64_t u = begin; u < end; ++u) {
          StackBackwardRows(st, io, chunks.unit_first(u), chunks.unit_last(u), chunks, slots_p, s);
        }
      }));
  // Per group, sum its chunks' slots in chunk order into each layer's dW and db, then the
  // read-out's (the slot's last part).
  for (int64_t g = 0; g < groups; ++g) {
    const float* group_slots = slots.data + g * chunks.per_group * slot_size;
    const int64_t offset =
        SumLayerChunks(group_slots, chunks.per_group, slot_size, st.l, grads, g);
    if (readout) {
      SumChunks(group_slots, chunks.per_group, slot_size, offset, 1, st.hidden, 0,
                grads[2 * st.layers] + g * st.hidden);
      SumChunks(group_slots, chunks.per_group, slot_size, offset + RoundUp(st.hidden, kLanes), 1,
                1, 0, grads[2 * st.layers + 1] + g);
    }
  }
  return ffi::Error::Success();
}

// Arguments x, h, c, w_0, b_0, ..., dh', dc'; results dx, dh, dc, dw_0, db_0, ...
ffi::Error StackBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> h,
                         ffi::Buffer<ffi::F32> c, ffi::RemainingArgs rest,
                         ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dh,
                         ffi::ResultBuffer<ffi::F32> dc, ffi::RemainingRets weight_grads) {
  return RunStackBackward(pool, x, h, c, rest, dx, dh, dc, weight_grads, false);
}

ffi::Error StackReadoutBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F32> c,
                                ffi::RemainingArgs rest, ffi::ResultBuffer<ffi::F32> dx,
                                ffi::ResultBuffer<ffi::F32> dh, ffi::ResultBuffer<ffi::F32> dc,
                                ffi::RemainingRets weight_grads) {
  return RunStackBackward(pool, x, h, c, rest, dx, dh, dc, weight_grads, true);
}

// A truncation's step on its workspace: wh, wc (slots, ..., layers, hidden) hold the state of
// every step of the truncation; reads slot t, writes slot t + 1 (in place: the results alias wh
// and wc), and the read-out u (...) of the new top h.
ffi::Error StackReadoutStepForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                   ffi::Buffer<ffi::F32> wh, ffi::Buffer<ffi::F32> wc,
                                   ffi::Buffer<ffi::S32> t, ffi::RemainingArgs rest,
                                   ffi::ResultBuffer<ffi::F32> wh_out,
                                   ffi::ResultBuffer<ffi::F32> wc_out,
                                   ffi::ResultBuffer<ffi::F32> out) {
  const auto dims = wh.dimensions();
  if (dims.size() < 3 || dims[0] < 2) {
    return ffi::Error::InvalidArgument("wh must be (slots, ..., layers, hidden), slots >= 2");
  }
  const int64_t slots = dims[0];
  Stack st;
  if (ffi::Error e = PackStack(x, wh, wc, rest, st, slots); !e.success()) return e;
  if (rest.size() != static_cast<size_t>(2 * st.layers + 2)) {
    return ffi::Error::InvalidArgument("expected a w and a b per layer, w_out, b_out");
  }
  const int64_t step = t.typed_data()[0];
  if (step < 0 || step + 1 >= slots) return ffi::Error::InvalidArgument("t outside the workspace");
  StackIo io{};
  if (ffi::Error e = PackReadout(st, rest, 2 * st.layers, io); !e.success()) return e;
  if (out->element_count() != static_cast<size_t>(st.rows)) {
    return ffi::Error::InvalidArgument("the read-out's result must have h's rows");
  }
  const int64_t slot = st.rows * st.layers * st.hidden;
  io.out = out->typed_data();
  io.x = x.typed_data();
  io.h = wh_out->typed_data() + step * slot;  // aliases wh
  io.c = wc_out->typed_data() + step * slot;
  io.h_out = wh_out->typed_data() + (step + 1) * slot;
  io.c_out = wc_out->typed_data() + (step + 1) * slot;
  learned_opt_simd::ParallelRows(
      pool, 0, false, st.rows, kChunkRows,
      WithStackScratch(st, [&st, &io](int64_t begin, int64_t end, StackScratch& s) {
        StackForwardRows(st, io, begin, end, s);
      }));
  return ffi::Error::Success();
}

// The weight cotangents of a whole truncation: xs (steps, ..., features), the workspace wh, wc
// (steps + 1, ..., layers, hidden) its forward pass filled, weights, w_out, b_out, and du (steps,
// ...), the read-out's cotangents; the state's cotangents run backward through the steps inside
// each tile (from 0 after the last step: the state after a truncation is not differentiated).
ffi::Error StackReadoutSequenceBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xs,
                                        ffi::Buffer<ffi::F32> wh, ffi::Buffer<ffi::F32> wc,
                                        ffi::RemainingArgs rest, ffi::RemainingRets weight_grads) {
  const auto dims = wh.dimensions();
  if (dims.size() < 3 || dims[0] < 1) {
    return ffi::Error::InvalidArgument("wh must be (steps + 1, ..., layers, hidden)");
  }
  const int64_t steps = dims[0] - 1;
  Stack st;
  if (ffi::Error e = PackStack(xs, wh, wc, rest, st, steps + 1, steps); !e.success()) return e;
  const size_t weights = 2 * st.layers + 2;
  if (rest.size() != weights + 1 || weight_grads.size() != weights) {
    return ffi::Error::InvalidArgument("expected w, b per layer, w_out, b_out, du");
  }
  StackIo io{};
  if (ffi::Error e = PackReadout(st, rest, 2 * st.layers, io); !e.success()) return e;
  auto d_out = rest.get<ffi::Buffer<ffi::F32>>(weights);
  if (!d_out.has_value() || d_out->element_count() != static_cast<size_t>(st.rows * steps)) {
    return ffi::Error::InvalidArgument("du must be f32 (steps, rows)");
  }
  int64_t slot_size = ReadoutSlot(st.hidden);
  for (const Layer& l : st.l) slot_size += static_cast<int64_t>(l.fan_in_4 + 1) * l.n_pad;
  std::vector<float*> grads;
  for (size_t i = 0; i < weights; ++i) {
    auto grad = weight_grads.get<ffi::Buffer<ffi::F32>>(i);
    if (!grad.has_value()) return ffi::Error::InvalidArgument("weight cotangents must be f32");
    grads.push_back((*grad)->typed_data());
  }
  const learned_opt_simd::GroupChunks chunks(1, st.rows, kChunkRows);
  AlignedFloats slots(static_cast<size_t>(std::max<int64_t>(chunks.count(), 1)) * slot_size);
  const int64_t state_slot = st.rows * st.layers * st.hidden;
  const float* xs_p = xs.typed_data();
  const float* wh_p = wh.typed_data();
  const float* wc_p = wc.typed_data();
  const float* du_p = d_out->typed_data();
  float* slots_p = slots.data;
  const int state_row = st.layers * st.hidden;
  learned_opt_simd::ParallelRows(
      pool, 0, false, chunks.units(), 1,
      WithStackScratch(st, [&, slots_p](int64_t begin, int64_t end, StackScratch& s) {
        AlignedFloats dh(kTileRows * state_row + kLanes), dc(kTileRows * state_row + kLanes);
        AlignedFloats dx(kTileRows * st.features + kLanes);
        for (int64_t u = begin; u < end; ++u) {
          const int64_t last = chunks.unit_last(u);
          for (int64_t row = chunks.unit_first(u); row < last; row += kTileRows) {
            const int count = static_cast<int>(std::min<int64_t>(kTileRows, last - row));
            std::memset(dh.data, 0, kTileRows * state_row * sizeof(float));
            std::memset(dc.data, 0, kTileRows * state_row * sizeof(float));
            for (int64_t step = steps - 1; step >= 0; --step) {
              StackIo tio = io;
              tio.x = xs_p + step * st.rows * st.features;
              tio.h = wh_p + step * state_slot;
              tio.c = wc_p + step * state_slot;
              tio.d_out = du_p + step * st.rows;
              tio.dh_new = tio.dh = dh.data;  // in place: a layer's dh' is read before its dh
              tio.dc_new = tio.dc = dc.data;
              tio.dx = dx.data;
              tio.slot_size = slot_size;
              StackBackwardTile(st, tio, row, count, 0, chunks, slots_p, s);
            }
          }
        }
      }));
  const int64_t offset = SumLayerChunks(slots.data, chunks.per_group, slot_size, st.l, grads, 0);
  SumChunks(slots.data, chunks.per_group, slot_size, offset, 1, st.hidden, 0,
            grads[2 * st.layers]);
  SumChunks(slots.data, chunks.per_group, slot_size, offset + RoundUp(st.hidden, kLanes), 1, 1, 0,
            grads[2 * st.layers + 1]);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LearnedOptStackForward, StackForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x (..., features)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h (..., layers, hidden)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // c (..., layers, hidden)
                                  .RemainingArgs()                // w_0, b_0, w_1, b_1, ...
                                  .Ret<ffi::Buffer<ffi::F32>>()   // h'
                                  .Ret<ffi::Buffer<ffi::F32>>());  // c'

XLA_FFI_DEFINE_HANDLER_SYMBOL(LearnedOptStackBackward, StackBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x (..., features)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h (..., layers, hidden)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // c (..., layers, hidden)
                                  .RemainingArgs()                // w_0, b_0, ..., dh', dc'
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dh
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dc
                                  .RemainingRets());              // dw_0, db_0, ...

XLA_FFI_DEFINE_HANDLER_SYMBOL(LearnedOptStackReadoutForward, StackReadoutForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x (..., features)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h (..., layers, hidden)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // c (..., layers, hidden)
                                  .RemainingArgs()                // w_0, b_0, ..., w_out, b_out
                                  .Ret<ffi::Buffer<ffi::F32>>()   // h'
                                  .Ret<ffi::Buffer<ffi::F32>>()   // c'
                                  .Ret<ffi::Buffer<ffi::F32>>());  // u (...)

XLA_FFI_DEFINE_HANDLER_SYMBOL(LearnedOptStackReadoutBackward, StackReadoutBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x (..., features)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h (..., layers, hidden)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // c (..., layers, hidden)
                                  .RemainingArgs()  // w_0, b_0, ..., w_out, b_out, dh', dc', du
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dh
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dc
                                  .RemainingRets());  // dw_0, db_0, ..., dw_out, db_out

XLA_FFI_DEFINE_HANDLER_SYMBOL(LearnedOptStackReadoutStepForward, StackReadoutStepForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x (..., features)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // wh (slots, ..., L, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // wc
                                  .Arg<ffi::Buffer<ffi::S32>>()   // t ()
                                  .RemainingArgs()                // w_0, b_0, ..., w_out, b_out
                                  .Ret<ffi::Buffer<ffi::F32>>()   // wh (aliased)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // wc (aliased)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // u (...)

XLA_FFI_DEFINE_HANDLER_SYMBOL(LearnedOptStackReadoutSequenceBackward, StackReadoutSequenceBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // xs (steps, ..., features)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // wh (steps + 1, ..., L, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // wc
                                  .RemainingArgs()                // w_0, ..., b_out, du
                                  .RemainingRets());              // dw_0, ..., db_out
