// One forward step of the coordinatewise LSTM optimizer (learned_opt/lstm.py, no global averaging
// cells) on every coordinate of one parameter leaf, fused into a single pass over the rows.
//
// For each coordinate (a row) it runs preprocessing -> every LSTM layer -> the linear read-out ->
// the output scale while the row's state is in L1, instead of XLA:CPU's separate matmul and
// element-wise passes over all rows. Rows go in tiles of kTileRows: one layer's pre-activations
// for a tile, (kTileRows, 4 hidden), are a register-blocked matmul (the weights, 20 KB at 20
// units, stay in L1), the gate non-linearities are applied in registers, and the cell update runs
// on the tile from a small scratch. Rows are shared between threads in chunks taken from an atomic
// counter, on XLA's own CPU thread pool (the FFI execution context's), so a busy core simply takes
// fewer chunks.
//
// Built on first use by learned_opt/kernels/fused_lstm.py (flags in build.py); registered as an
// XLA FFI target and called through jax.ffi.ffi_call.
//
// The math is lstm.py's: z = [x, h] @ W + b, gates i, f, g, o = z split in four,
// c' = sigmoid(f) c + sigmoid(i) tanh(g), h' = sigmoid(o) tanh(c'), update = scale (h'_top w + b).
// sigmoid(z) = 1 / (1 + exp(-z)) and tanh(z) = 2 / (1 + exp(-2 z)) - 1, exp from simd.h.

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using learned_opt_simd::AlignedFloats;
using learned_opt_simd::CopyRow;
using learned_opt_simd::kLanes;
using learned_opt_simd::Load;
using learned_opt_simd::Splat;
using learned_opt_simd::Squash;
using learned_opt_simd::Store;
using learned_opt_simd::Tanh;
using learned_opt_simd::Vec;

// Column vectors per register tile of 4 rows: 4 x 6 accumulators of 32 zmm with AVX-512,
// 4 x 3 of 16 ymm otherwise.
constexpr int kMaxPanel = kLanes == 16 ? 6 : 3;

constexpr int kTileRows = 4;       // rows whose pre-activations are computed together
constexpr int64_t kChunkRows = 512;  // rows a thread takes at a time

// The network in the kernel's layout: each layer's W (in + hidden, 4 hidden) with its columns
// padded to whole vectors (zeros), its bias likewise, and per column the squash constants.
struct Net {
  int layers = 0, hidden = 0, features = 0;
  int vectors = 0;   // column vectors of one layer's pre-activations: ceil(4 hidden / kLanes)
  int columns = 0;   // vectors * kLanes
  int hidden_pad = 0;  // hidden rounded up to whole vectors
  std::vector<const float*> w, b;
  const float* neg_k = nullptr;
  const float* act_a = nullptr;
  const float* act_b = nullptr;
  const float* out_w = nullptr;
  float out_b = 0.0f;
  std::unique_ptr<AlignedFloats> storage;
};

struct Preprocess {
  int mode = 0;  // 0: none, 1: scale, 2: log_sign
  float factor = 1.0f, threshold = 0.0f, p = 1.0f, exp_p = 1.0f;
};

struct Io {
  int64_t rows = 0;
  const float* grad = nullptr;
  const float* h_in = nullptr;
  const float* c_in = nullptr;
  float* update = nullptr;
  float* h_out = nullptr;
  float* c_out = nullptr;
  float output_scale = 1.0f;
};

// Per-thread scratch: one tile's matmul operand [layer input, old hidden state] per row, the top
// layer's output, pre-activations, and
// a zero state row plus a discard row for the tile's missing rows past the end.
struct Scratch {
  explicit Scratch(const Net& net)
      : z_stride(net.columns + kLanes),
        a_stride(std::max(2, net.hidden) + net.hidden),
        a(kTileRows * a_stride),
        top(kTileRows * net.hidden_pad),
        z(kTileRows * z_stride),
        c_old(net.hidden_pad),
        c_new(kTileRows * net.hidden + net.hidden_pad + kLanes),
        tanh_c(kTileRows * net.hidden + net.hidden_pad + kLanes),
        zero_row(net.layers * net.hidden),
        discard_row(net.layers * net.hidden) {}
  int z_stride;
  int a_stride;
  AlignedFloats a, top, z, c_old, c_new, tanh_c, zero_row, discard_row;
};

// One layer's pre-activations for a tile, columns [first, first + kVectors) vectors, squashed.
// a: the tile's matmul operand, kTileRows rows of [layer input, old hidden state] (fan_in
// floats) at stride a_stride.
template <int kVectors>
inline void Panel(const Net& net, int layer, int first, const float* a, int fan_in, int a_stride,
                  float* z, int z_stride) {
  const int columns = net.columns;
  const float* w = net.w[layer] + first * kLanes;
  Vec acc[kTileRows][kVectors];
  for (int v = 0; v < kVectors; ++v) {
    const Vec bias = Load(net.b[layer] + (first + v) * kLanes);
    for (int m = 0; m < kTileRows; ++m) acc[m][v] = bias;
  }
  for (int k = 0; k < fan_in; ++k, w += columns) {
    Vec wk[kVectors];
    for (int v = 0; v < kVectors; ++v) wk[v] = Load(w + v * kLanes);
    for (int m = 0; m < kTileRows; ++m) {
      const Vec x = Splat(a[m * a_stride + k]);
      for (int v = 0; v < kVectors; ++v) acc[m][v] += x * wk[v];
    }
  }
  for (int v = 0; v < kVectors; ++v) {
    const int col = (first + v) * kLanes;
    const Vec nk = Load(net.neg_k + col), sa = Load(net.act_a + col), sb = Load(net.act_b + col);
    for (int m = 0; m < kTileRows; ++m) {
      Store(z + m * z_stride + col, Squash(acc[m][v], nk, sa, sb));
    }
  }
}

inline void PanelDispatch(int vectors, const Net& net, int layer, int first, const float* a,
                          int fan_in, int a_stride, float* z, int z_stride) {
  switch (vectors) {
#define LO_PANEL_CASE(n)                                                               \
  case n:                                                                              \
    if constexpr (n <= kMaxPanel)                                                      \
      Panel<n>(net, layer, first, a, fan_in, a_stride, z, z_stride);                   \
    break;
    LO_PANEL_CASE(1)
    LO_PANEL_CASE(2)
    LO_PANEL_CASE(3)
    LO_PANEL_CASE(4)
    LO_PANEL_CASE(5)
    LO_PANEL_CASE(6)
#undef LO_PANEL_CASE
    default:
      break;
  }
}

inline float Sign(float g) { return g > 0.0f ? 1.0f : (g < 0.0f ? -1.0f : g); }

// Rows [row, row + count) of the leaf, count <= kTileRows.
void Tile(const Net& net, const Preprocess& pre, const Io& io, int64_t row, int count,
          Scratch& s) {
  const int hidden = net.hidden, state_row = net.layers * hidden, hp = net.hidden_pad;
  const float* h_in[kTileRows];
  const float* c_in[kTileRows];
  float* h_out[kTileRows];
  float* c_out[kTileRows];
  float* a = s.a.data;
  const int as = s.a_stride;
  for (int m = 0; m < kTileRows; ++m) {
    const bool real = m < count;
    const int64_t offset = (row + m) * state_row;
    h_in[m] = real ? io.h_in + offset : s.zero_row.data;
    c_in[m] = real ? io.c_in + offset : s.zero_row.data;
    h_out[m] = real ? io.h_out + offset : s.discard_row.data;
    c_out[m] = real ? io.c_out + offset : s.discard_row.data;
    const float g = real ? io.grad[row + m] : 0.0f;
    // preprocess.py's formulas, in float32 as XLA computes them.
    if (pre.mode == 2) {
      const float magnitude = std::fabs(g);
      const bool big = magnitude >= pre.threshold;  // false for NaN, as in jnp.where
      a[m * as] = big ? std::log(std::min(magnitude, FLT_MAX)) / pre.p : -1.0f;
      a[m * as + 1] = big ? Sign(g) : pre.exp_p * g;
    } else {
      a[m * as] = pre.mode == 1 ? pre.factor * g : g;
    }
  }
  int in_size = net.features;
  for (int layer = 0; layer < net.layers; ++layer) {
    // The operand's second part: each row's old hidden state of this layer.
    for (int m = 0; m < kTileRows; ++m) {
      CopyRow(a + m * as + in_size, h_in[m] + layer * hidden, hidden);
    }
    for (int first = 0; first < net.vectors; first += kMaxPanel) {
      const int n = std::min(kMaxPanel, net.vectors - first);
      PanelDispatch(n, net, layer, first, a, in_size + hidden, as, s.z.data, s.z_stride);
    }
    // Every read of this layer's old state is done: the new state may overwrite it (in place).
    // The tile's new cells, row after row (a row's padding lanes are overwritten by the next),
    // then tanh of all of them at once: 4 x 20 units are 5 vectors, not 4 x 2.
    float* c_new = s.c_new.data;
    for (int m = 0; m < kTileRows; ++m) {
      const float* z = s.z.data + m * s.z_stride;
      CopyRow(s.c_old.data, c_in[m] + layer * hidden, hidden);
      for (int u = 0; u < hp; u += kLanes) {
        Store(c_new + m * hidden + u, Load(z + hidden + u) * Load(s.c_old.data + u) +
                                          Load(z + u) * Load(z + 2 * hidden + u));
      }
    }
    for (int j = 0; j < kTileRows * hidden; j += kLanes) {
      Store(s.tanh_c.data + j, Tanh(Load(c_new + j)));
    }
    for (int m = 0; m < kTileRows; ++m) {
      const float* z = s.z.data + m * s.z_stride;
      float* h_new = s.top.data + m * hp;
      for (int u = 0; u < hp; u += kLanes) {
        Store(h_new + u, Load(z + 3 * hidden + u) * Load(s.tanh_c.data + m * hidden + u));
      }
      CopyRow(c_out[m] + layer * hidden, c_new + m * hidden, hidden);
      CopyRow(h_out[m] + layer * hidden, h_new, hidden);
      CopyRow(a + m * as, h_new, hidden);  // the next layer's input
    }
    in_size = hidden;
  }
  for (int m = 0; m < count; ++m) {
    float y = 0.0f;
    for (int u = 0; u < hidden; ++u) y += s.top.data[m * hp + u] * net.out_w[u];
    io.update[row + m] = io.output_scale * (y + net.out_b);
  }
}

void Rows(const Net& net, const Preprocess& pre, const Io& io, int64_t begin, int64_t end,
          Scratch& s) {
  for (int64_t row = begin; row < end; row += kTileRows) {
    Tile(net, pre, io, row, static_cast<int>(std::min<int64_t>(kTileRows, end - row)), s);
  }
}

// Packs phi (layers' w (in + hidden, 4 hidden) and b (4 hidden)) into the kernel's layout.
ffi::Error PackNet(const ffi::RemainingArgs& layer_args, int layers, int hidden, int features,
                   const float* out_w, float out_b, Net& net) {
  if (layer_args.size() != static_cast<size_t>(2 * layers)) {
    return ffi::Error::InvalidArgument("expected a w and a b per layer");
  }
  net.layers = layers;
  net.hidden = hidden;
  net.features = features;
  net.vectors = (4 * hidden + kLanes - 1) / kLanes;
  net.columns = net.vectors * kLanes;
  net.hidden_pad = ((hidden + kLanes - 1) / kLanes) * kLanes;
  if (net.vectors > kMaxPanel * 64) return ffi::Error::InvalidArgument("hidden_size too large");
  size_t total = 3 * net.columns;
  for (int l = 0; l < layers; ++l) {
    total += static_cast<size_t>((l == 0 ? features : hidden) + hidden + 1) * net.columns;
  }
  net.storage = std::make_unique<AlignedFloats>(total);
  float* cursor = net.storage->data;
  float* neg_k = cursor;
  float* act_a = cursor + net.columns;
  float* act_b = cursor + 2 * net.columns;
  cursor += 3 * net.columns;
  for (int col = 0; col < net.columns; ++col) {
    const bool is_tanh = col / hidden == 2;  // gate order i, f, g, o; g is the tanh one
    neg_k[col] = is_tanh ? -2.0f : -1.0f;
    act_a[col] = is_tanh ? 2.0f : 1.0f;
    act_b[col] = is_tanh ? -1.0f : 0.0f;
  }
  net.neg_k = neg_k;
  net.act_a = act_a;
  net.act_b = act_b;
  for (int l = 0; l < layers; ++l) {
    const int fan_in = (l == 0 ? features : hidden) + hidden;
    auto w = layer_args.get<ffi::Buffer<ffi::F32>>(2 * l);
    auto b = layer_args.get<ffi::Buffer<ffi::F32>>(2 * l + 1);
    if (!w.has_value() || !b.has_value()) return ffi::Error::InvalidArgument("weights not f32");
    if (w->element_count() != static_cast<size_t>(fan_in) * 4 * hidden ||
        b->element_count() != static_cast<size_t>(4 * hidden)) {
      return ffi::Error::InvalidArgument("layer " + std::to_string(l) + " has the wrong shape");
    }
    for (int k = 0; k < fan_in; ++k) {
      std::memcpy(cursor + k * net.columns, w->typed_data() + k * 4 * hidden,
                  4 * hidden * sizeof(float));
    }
    net.w.push_back(cursor);
    cursor += fan_in * net.columns;
    std::memcpy(cursor, b->typed_data(), 4 * hidden * sizeof(float));
    net.b.push_back(cursor);
    cursor += net.columns;
  }
  net.out_w = out_w;
  net.out_b = out_b;
  return ffi::Error::Success();
}

ffi::Error LstmStep(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> grad, ffi::Buffer<ffi::F32> hidden,
                    ffi::Buffer<ffi::F32> cell, ffi::Buffer<ffi::F32> out_w,
                    ffi::Buffer<ffi::F32> out_b, ffi::RemainingArgs layer_args,
                    ffi::ResultBuffer<ffi::F32> update, ffi::ResultBuffer<ffi::F32> hidden_out,
                    ffi::ResultBuffer<ffi::F32> cell_out, int32_t preprocess, float factor,
                    float threshold, float p, float exp_p, float output_scale, int64_t threads,
                    int32_t spawn) {
  const auto dims = hidden.dimensions();
  if (dims.size() < 2) return ffi::Error::InvalidArgument("hidden must be (..., layers, units)");
  const int layers = static_cast<int>(dims[dims.size() - 2]);
  const int units = static_cast<int>(dims[dims.size() - 1]);
  if (layers * units == 0) return ffi::Error::InvalidArgument("no hidden units");
  const int64_t rows = static_cast<int64_t>(hidden.element_count()) / (layers * units);
  const int features = preprocess == 2 ? 2 : 1;
  if (grad.element_count() != static_cast<size_t>(rows) ||
      cell.element_count() != hidden.element_count() ||
      out_w.element_count() != static_cast<size_t>(units) || out_b.element_count() != 1) {
    return ffi::Error::InvalidArgument("inconsistent shapes");
  }
  Net net;
  if (ffi::Error e = PackNet(layer_args, layers, units, features, out_w.typed_data(),
                             out_b.typed_data()[0], net);
      !e.success()) {
    return e;
  }
  const Preprocess pre{preprocess, factor, threshold, p, exp_p};
  const Io io{rows, grad.typed_data(), hidden.typed_data(), cell.typed_data(),
              update->typed_data(), hidden_out->typed_data(), cell_out->typed_data(),
              output_scale};
  learned_opt_simd::ParallelRows(pool, threads, spawn, rows, kChunkRows, [&net, &pre, &io] {
    auto scratch = std::make_shared<Scratch>(net);
    return [&net, &pre, &io, scratch](int64_t begin, int64_t end) {
      Rows(net, pre, io, begin, end, *scratch);
    };
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LearnedOptLstmStep, LstmStep,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // grad (rows,)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // hidden (rows, layers, units)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cell (rows, layers, units)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out w (units, 1)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out b (1,)
                                  .RemainingArgs()               // w_0, b_0, w_1, b_1, ...
                                  .Ret<ffi::Buffer<ffi::F32>>()  // update (rows,)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // hidden
                                  .Ret<ffi::Buffer<ffi::F32>>()  // cell
                                  .Attr<int32_t>("preprocess")
                                  .Attr<float>("factor")
                                  .Attr<float>("threshold")
                                  .Attr<float>("p")
                                  .Attr<float>("exp_p")
                                  .Attr<float>("output_scale")
                                  .Attr<int64_t>("threads")
                                  .Attr<int32_t>("spawn"));
