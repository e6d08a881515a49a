// The LSTM cell's element-wise part, and a whole layer (matmul and gates), forward and backward,
// as fused CPU kernels (the layer kernels are at the end of this file).
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

// Gathers gate k of a tile's count rows of z (rows at z_stride floats) into tiles[k], k = 0..3.
void GatherGates(const float* z, int z_stride, int count, int hidden, Tiles& tiles) {
  for (int k = 0; k < 4; ++k) {
    for (int m = 0; m < count; ++m) {
      CopyRow(tiles[k] + m * hidden, z + m * z_stride + k * hidden, hidden);
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
void ForwardTile(const float* z, int z_stride, const float* c, float* h_out, float* c_out,
                 int hidden, int count, Tiles& t) {
  const int n = count * hidden;
  GatherGates(z, z_stride, count, hidden, t);
  const float* c_old = Operand(c, n, t[4]);
  float* c_new = Result(c_out, n, t[5]);
  float* h_new = Result(h_out, n, t[6]);
  for (int j = 0; j < n; j += kLanes) {
    const Gates a = Activate(t, j);
    const Vec c_j = a.f * Load(c_old + j) + a.i * a.g;
    Store(c_new + j, c_j);
    Store(h_new + j, a.o * Tanh(c_j));
  }
  Flush(c_out, n, c_new);
  Flush(h_out, n, h_new);
}

// The gates' derivative on one tile: dz's rows at dz_stride, the rest contiguous (count, hidden).
void BackwardTile(const float* z, int z_stride, const float* c, const float* dh,
                  const float* dc_new, float* dz, int dz_stride, float* dc, int hidden, int count,
                  Tiles& t) {
  const Vec one = Splat(1.0f);
  const int n = count * hidden;
  GatherGates(z, z_stride, count, hidden, t);
  const float* c_in = Operand(c, n, t[4]);
  const float* dh_in = Operand(dh, n, t[5]);
  const float* dc_in = Operand(dc_new, n, t[6]);
  float* dc_out = Result(dc, n, t[7]);
  for (int j = 0; j < n; j += kLanes) {
    const Gates a = Activate(t, j);
    const Vec c_old = Load(c_in + j), dh_j = Load(dh_in + j);
    const Vec tanh_c = Tanh(a.f * c_old + a.i * a.g);
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

// ---- Matmuls on tiles, for the stack kernels below. ----

// Register tile: 4 rows, up to kMaxPanel column vectors (4 x 6 zmm accumulators with AVX-512,
// 4 x 3 ymm otherwise).
constexpr int kMaxPanel = kLanes == 16 ? 6 : 3;

// Rows a thread takes at a time in the stack kernels: several times a row of the gates alone, and
// the quadratic meta-step's 1,280 rows must still split evenly between two threads.
constexpr int64_t kLayerChunkRows = 128;

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
void TileMatmul(int rows, int vectors, const float* a, int a_stride, int a_inner, int inner,
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
  int64_t rows = 0;
  int hidden = 0, fan_in = 0, n = 0, n_pad = 0, fan_in_pad = 0, fan_in_4 = 0;
  std::unique_ptr<AlignedFloats> w, b, wt;
};

// Fills l's padded sizes and packed weights from w (fan_in, n) and b (n,), row-major.
void PackWeights(const float* wp, const float* bp, Layer& l) {
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

// ---- The whole stacked LSTM step of one leaf: every layer, forward and backward. ----
//
// x (rows, features), h and c (rows, layers, hidden) in the optimizer state's own layout, weights
// per layer. Per tile of kTileRows rows, layer after layer, the operand a = [input, h_l] and the
// pre-activations z = a W + b are built in L1 and used there; nothing per layer is written to
// memory but the new state, so XLA neither slices the state per layer nor stacks it again, and
// saves only the step's inputs for the backward pass. The backward kernel recomputes a and z for
// every layer, then walks the layers down: dz from the gates' derivative, da = dz W^T (split into
// the input's cotangent, which is the layer below's dh', and dh), dW += a^T dz, db += sum dz.
// Weight cotangents are summed per chunk of kLayerChunkRows rows into the chunk's own slot, then
// the slots in chunk order, so the result does not depend on which thread took which chunk.

struct Stack {
  int64_t rows = 0;
  int layers = 0, hidden = 0, features = 0;
  std::vector<Layer> l;
};

ffi::Error PackStack(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& h,
                     const ffi::Buffer<ffi::F32>& c, const ffi::RemainingArgs& weights,
                     size_t first_weight, Stack& s) {
  const auto dims = h.dimensions();
  if (dims.size() < 2 || dims[dims.size() - 1] == 0 || dims[dims.size() - 2] == 0) {
    return ffi::Error::InvalidArgument("h must be (..., layers, hidden) with both > 0");
  }
  s.layers = static_cast<int>(dims[dims.size() - 2]);
  s.hidden = static_cast<int>(dims[dims.size() - 1]);
  s.rows = static_cast<int64_t>(h.element_count()) / (s.layers * s.hidden);
  if (c.element_count() != h.element_count()) {
    return ffi::Error::InvalidArgument("c must be shaped like h");
  }
  if (weights.size() < first_weight + 2 * s.layers) {
    return ffi::Error::InvalidArgument("expected a w and a b per layer");
  }
  s.l.resize(s.layers);
  for (int i = 0; i < s.layers; ++i) {
    auto w = weights.get<ffi::Buffer<ffi::F32>>(first_weight + 2 * i);
    auto b = weights.get<ffi::Buffer<ffi::F32>>(first_weight + 2 * i + 1);
    if (!w.has_value() || !b.has_value()) return ffi::Error::InvalidArgument("weights not f32");
    Layer& l = s.l[i];
    l.rows = s.rows;
    l.hidden = s.hidden;
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
  if (x.element_count() != static_cast<size_t>(s.rows) * s.features) {
    return ffi::Error::InvalidArgument("x must be (..., features) with h's rows");
  }
  return ffi::Error::Success();
}

// One thread's scratch: per layer the tile's operand, z and old cell (kept for the backward
// pass), and tiles for the chain between layers and the cotangents.
struct StackScratch {
  explicit StackScratch(const Stack& s) : tiles(s.hidden) {
    for (const Layer& l : s.l) {
      a.push_back(std::make_unique<AlignedFloats>(kTileRows * l.fan_in_4));
      z.push_back(std::make_unique<AlignedFloats>(kTileRows * l.n_pad));
      c.push_back(std::make_unique<AlignedFloats>(kTileRows * s.hidden + kLanes));
    }
    const int tile = kTileRows * s.hidden + kLanes;
    for (auto* t : {&h_new, &c_new, &dh, &dc, &dc_old, &carry}) {
      t->reset(new AlignedFloats(tile));
    }
    dz.reset(new AlignedFloats(kTileRows * s.l[0].n_pad));
    int widest = 0;
    for (const Layer& l : s.l) widest = std::max(widest, l.fan_in_pad);
    da.reset(new AlignedFloats(kTileRows * widest));
  }
  Tiles tiles;
  std::vector<std::unique_ptr<AlignedFloats>> a, z, c;
  std::unique_ptr<AlignedFloats> h_new, c_new, dh, dc, dc_old, carry, dz, da;
};

// The tile's forward pass, layer by layer; per layer a, z and the old cell stay in the scratch.
// With h_out and c_out the new states are written out (the forward kernel); without, not (the
// backward pass's recomputation).
void StackForwardTile(const Stack& st, const float* x, const float* h, const float* c,
                      int64_t row, int count, float* h_out, float* c_out, StackScratch& s) {
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
    if (h_out == nullptr && i == st.layers - 1) break;  // the backward pass needs z only
    ForwardTile(s.z[i]->data, l.n_pad, s.c[i]->data, s.h_new->data, s.c_new->data, hidden, count,
                s.tiles);
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
  float* slots;                            // backward: per chunk, per layer dW then db
  int64_t slot_size;
};

void StackForwardRows(const Stack& st, const StackIo& io, int64_t begin, int64_t end,
                      StackScratch& s) {
  for (int64_t row = begin; row < end; row += kTileRows) {
    const int count = static_cast<int>(std::min<int64_t>(kTileRows, end - row));
    StackForwardTile(st, io.x, io.h, io.c, row, count, io.h_out, io.c_out, s);
  }
}

void StackBackwardRows(const Stack& st, const StackIo& io, int64_t begin, int64_t end,
                       StackScratch& s) {
  const int hidden = st.hidden, state_row = st.layers * hidden;
  float* slot = io.slots + (begin / kLayerChunkRows) * io.slot_size;
  for (int64_t row = begin; row < end; row += kTileRows) {
    const int count = static_cast<int>(std::min<int64_t>(kTileRows, end - row));
    StackForwardTile(st, io.x, io.h, io.c, row, count, nullptr, nullptr, s);
    for (int i = st.layers - 1; i >= 0; --i) {
      const Layer& l = st.l[i];
      const int in = l.fan_in - hidden;
      for (int m = 0; m < count; ++m) {
        const int64_t at = (row + m) * state_row + i * hidden;
        CopyRow(s.dh->data + m * hidden, io.dh_new + at, hidden);
        CopyRow(s.dc->data + m * hidden, io.dc_new + at, hidden);
      }
      if (i < st.layers - 1) {  // the layer above took this layer's new h as its input
        for (int j = 0; j < count * hidden; j += kLanes) {
          Store(s.dh->data + j, Load(s.dh->data + j) + Load(s.carry->data + j));
        }
      }
      float* dz = s.dz->data;
      if (count < kTileRows) {
        std::memset(dz + count * l.n_pad, 0, (kTileRows - count) * l.n_pad * sizeof(float));
      }
      BackwardTile(s.z[i]->data, l.n_pad, s.c[i]->data, s.dh->data, s.dc->data, dz, l.n_pad,
                   s.dc_old->data, hidden, count, s.tiles);
      TileMatmul(kTileRows, l.fan_in_pad / kLanes, dz, l.n_pad, 1, l.n, l.wt->data, l.fan_in_pad,
                 nullptr, false, s.da->data, l.fan_in_pad);
      for (int m = 0; m < count; ++m) {
        const float* da = s.da->data + m * l.fan_in_pad;
        const int64_t at = (row + m) * state_row + i * hidden;
        CopyRow(io.dc + at, s.dc_old->data + m * hidden, hidden);
        CopyRow(io.dh + at, da + in, hidden);
        if (i > 0) {
          CopyRow(s.carry->data + m * hidden, da, hidden);
        } else {
          CopyRow(io.dx + (row + m) * in, da, in);
        }
      }
      // In the slot: layer i's dW (fan_in_4, n_pad) then db (n_pad), after the layers below.
      float* layer_dw = slot;
      for (int k = 0; k < i; ++k) layer_dw += (st.l[k].fan_in_4 + 1) * st.l[k].n_pad;
      float* layer_db = layer_dw + l.fan_in_4 * l.n_pad;
      TileMatmul(l.fan_in_4, l.n_pad / kLanes, s.a[i]->data, 1, l.fan_in_4, kTileRows, dz,
                 l.n_pad, nullptr, true, layer_dw, l.n_pad);
      for (int m = 0; m < kTileRows; ++m) {
        for (int j = 0; j < l.n_pad; j += kLanes) {
          Store(layer_db + j, Load(layer_db + j) + Load(dz + m * l.n_pad + j));
        }
      }
    }
  }
}

std::function<std::function<void(int64_t, int64_t)>()> WithStackScratch(
    const Stack& st, std::function<void(int64_t, int64_t, StackScratch&)> body) {
  return [&st, body] {
    auto scratch = std::make_shared<StackScratch>(st);
    return [scratch, body](int64_t begin, int64_t end) { body(begin, end, *scratch); };
  };
}

ffi::Error StackForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> h,
                        ffi::Buffer<ffi::F32> c, ffi::RemainingArgs weights,
                        ffi::ResultBuffer<ffi::F32> h_out, ffi::ResultBuffer<ffi::F32> c_out) {
  Stack st;
  if (ffi::Error e = PackStack(x, h, c, weights, 0, st); !e.success()) return e;
  StackIo io{};
  io.x = x.typed_data();
  io.h = h.typed_data();
  io.c = c.typed_data();
  io.h_out = h_out->typed_data();
  io.c_out = c_out->typed_data();
  learned_opt_simd::ParallelRows(
      pool, 0, false, st.rows, kLayerChunkRows,
      WithStackScratch(st, [&st, &io](int64_t begin, int64_t end, StackScratch& s) {
        StackForwardRows(st, io, begin, end, s);
      }));
  return ffi::Error::Success();
}

// Arguments x, h, c, w_0, b_0, ..., dh', dc'; results dx, dh, dc, dw_0, db_0, ...
ffi::Error StackBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> h,
                         ffi::Buffer<ffi::F32> c, ffi::RemainingArgs rest,
                         ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dh,
                         ffi::ResultBuffer<ffi::F32> dc, ffi::RemainingRets weight_grads) {
  Stack st;
  if (ffi::Error e = PackStack(x, h, c, rest, 0, st); !e.success()) return e;
  if (rest.size() != static_cast<size_t>(2 * st.layers + 2) ||
      weight_grads.size() != static_cast<size_t>(2 * st.layers)) {
    return ffi::Error::InvalidArgument("expected w, b per layer, then dh', dc'; dw, db per layer");
  }
  auto dh_new = rest.get<ffi::Buffer<ffi::F32>>(2 * st.layers);
  auto dc_new = rest.get<ffi::Buffer<ffi::F32>>(2 * st.layers + 1);
  if (!dh_new.has_value() || !dc_new.has_value() ||
      dh_new->element_count() != h.element_count() ||
      dc_new->element_count() != h.element_count()) {
    return ffi::Error::InvalidArgument("dh' and dc' must be f32, shaped like h");
  }
  int64_t slot_size = 0;
  for (const Layer& l : st.l) slot_size += static_cast<int64_t>(l.fan_in_4 + 1) * l.n_pad;
  const int64_t chunks = (st.rows + kLayerChunkRows - 1) / kLayerChunkRows;
  AlignedFloats slots(static_cast<size_t>(std::max<int64_t>(chunks, 1)) * slot_size);
  StackIo io{};
  io.x = x.typed_data();
  io.h = h.typed_data();
  io.c = c.typed_data();
  io.dh_new = dh_new->typed_data();
  io.dc_new = dc_new->typed_data();
  io.dx = dx->typed_data();
  io.dh = dh->typed_data();
  io.dc = dc->typed_data();
  io.slots = slots.data;
  io.slot_size = slot_size;
  learned_opt_simd::ParallelRows(
      pool, 0, false, st.rows, kLayerChunkRows,
      WithStackScratch(st, [&st, &io](int64_t begin, int64_t end, StackScratch& s) {
        StackBackwardRows(st, io, begin, end, s);
      }));
  // Sum the chunks' slots in chunk order into each layer's dW and db.
  int64_t offset = 0;
  for (int i = 0; i < st.layers; ++i) {
    const Layer& l = st.l[i];
    auto dw = weight_grads.get<ffi::Buffer<ffi::F32>>(2 * i);
    auto db = weight_grads.get<ffi::Buffer<ffi::F32>>(2 * i + 1);
    if (!dw.has_value() || !db.has_value() ||
        (*dw)->element_count() != static_cast<size_t>(l.fan_in) * l.n ||
        (*db)->element_count() != static_cast<size_t>(l.n)) {
      return ffi::Error::InvalidArgument("dw and db must be f32, shaped like w and b");
    }
    float *dwp = (*dw)->typed_data(), *dbp = (*db)->typed_data();
    std::memset(dwp, 0, static_cast<size_t>(l.fan_in) * l.n * sizeof(float));
    std::memset(dbp, 0, l.n * sizeof(float));
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const float* slot = slots.data + chunk * slot_size + offset;
      for (int k = 0; k < l.fan_in; ++k) {
        for (int j = 0; j < l.n; ++j) dwp[k * l.n + j] += slot[k * l.n_pad + j];
      }
      for (int j = 0; j < l.n; ++j) dbp[j] += slot[l.fan_in_4 * l.n_pad + j];
    }
    offset += static_cast<int64_t>(l.fan_in_4 + 1) * l.n_pad;
  }
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
