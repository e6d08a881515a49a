// A small MLP on every row, forward and backward, as two CPU kernels: the per-parameter MLP
// optimizer's network (learned_opt/per_param_mlp.py) on every coordinate of a parameter leaf,
//
//   h_0 = x,  h_{l+1} = relu(h_l W_l + b_l) for the hidden layers,  y = h_L W_out + b_out,
//
// x (rows, features), y (rows, outputs), the read-out a layer like the others without the ReLU.
// Per tile of kTileRows rows every layer's activations stay in L1, where XLA writes and reads
// each layer's (rows, hidden) pre-activations, activations and masks, runs the skinny matmuls
// (11 features, 2 outputs) and the weight cotangents (dots over all rows, after transposes) far
// below its peak. The backward kernel recomputes the tile's forward pass (nothing but x is kept
// between the calls), then walks the layers down: dz = dy at the read-out, dz_l = dh_{l+1} *
// [h_{l+1} > 0] below it, dh_l = dz_l W_l^T (dx at the bottom), dW_l += h_l^T dz_l, db_l += sum
// dz_l. Weight cotangents are summed per chunk of kChunkRows rows into the chunk's own slot,
// then the slots in chunk order: the result does not depend on which thread took which chunk.
// Under a jax.vmap with shared weights the rows are groups (problems), each with its own weight
// cotangents (a per-problem gradient must not be the batch's sum); groups smaller than a chunk
// are taken several at a time, so that tiles stay full (simd.h's GroupChunks).
// Built on first use by learned_opt/kernels/mlp.py (flags in build.py).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "simd.h"
#include "tile_matmul.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using learned_opt_simd::AlignedFloats;
using learned_opt_simd::CopyRow;
using learned_opt_simd::kLanes;
using learned_opt_simd::Load;
using learned_opt_simd::Splat;
using learned_opt_simd::Store;
using learned_opt_simd::Vec;
using learned_opt_tile_matmul::Layer;
using learned_opt_tile_matmul::PackWeights;
using learned_opt_tile_matmul::SumLayerChunks;
using learned_opt_tile_matmul::TileMatmul;

constexpr int kTileRows = 32;  // rows computed together (a multiple of 8)
// Rows a thread takes at a time, each chunk with its own slot of weight cotangents.
constexpr int64_t kChunkRows = 512;

struct Mlp {
  int64_t rows = 0;
  int features = 0, outputs = 0;
  std::vector<Layer> l;  // the hidden layers, then the read-out
  // A tile's floats for layer i's operand: x (kTileRows, fan_in_4) below, the previous layer's
  // activations (kTileRows, its n_pad) above; the row stride of that operand.
  int stride(size_t i) const { return i == 0 ? l[0].fan_in_4 : l[i - 1].n_pad; }
};

// The sizes and packed weights from x (..., features) and `args` from `at`: w_0, b_0, ...,
// w_out, b_out (`layers` pairs, the last the read-out); or an error naming the mismatch.
ffi::Error PackMlp(const ffi::Buffer<ffi::F32>& x, const ffi::RemainingArgs& args, size_t layers,
                   Mlp& s) {
  const auto dims = x.dimensions();
  if (dims.size() == 0 || dims.back() == 0) {
    return ffi::Error::InvalidArgument("x must be (..., features), features > 0");
  }
  s.features = static_cast<int>(dims.back());
  s.rows = static_cast<int64_t>(x.element_count()) / s.features;
  if (layers == 0 || args.size() < 2 * layers) {
    return ffi::Error::InvalidArgument("expected a w and a b per layer, the read-out last");
  }
  s.l.resize(layers);
  for (size_t i = 0; i < layers; ++i) {
    auto w = args.get<ffi::Buffer<ffi::F32>>(2 * i);
    auto b = args.get<ffi::Buffer<ffi::F32>>(2 * i + 1);
    if (!w.has_value() || !b.has_value()) return ffi::Error::InvalidArgument("weights not f32");
    const auto w_dims = w->dimensions();
    const int fan_in = i == 0 ? s.features : s.l[i - 1].n;
    if (w_dims.size() != 2 || w_dims[0] != fan_in || w_dims[1] == 0 ||
        b->element_count() != static_cast<size_t>(w_dims[1])) {
      return ffi::Error::InvalidArgument("layer " + std::to_string(i) +
                                         ": w must be (fan_in, n) with fan_in the features or "
                                         "the layer below's n, b (n,)");
    }
    Layer& l = s.l[i];
    l.fan_in = fan_in;
    l.n = static_cast<int>(w_dims[1]);
    PackWeights(w->typed_data(), b->typed_data(), l);
  }
  s.outputs = s.l.back().n;
  return ffi::Error::Success();
}

// One thread's tiles: each layer's operand (x or the activations below), the read-out's output,
// and the cotangents walking down.
struct MlpScratch {
  explicit MlpScratch(const Mlp& s) {
    int widest = 0;
    for (size_t i = 0; i < s.l.size(); ++i) {
      a.push_back(std::make_unique<AlignedFloats>(kTileRows * s.stride(i)));
      widest = std::max({widest, s.l[i].n_pad, s.l[i].fan_in_pad});
    }
    out = std::make_unique<AlignedFloats>(kTileRows * s.l.back().n_pad);
    dz = std::make_unique<AlignedFloats>(kTileRows * widest);
    da = std::make_unique<AlignedFloats>(kTileRows * widest);
  }
  std::vector<std::unique_ptr<AlignedFloats>> a;
  std::unique_ptr<AlignedFloats> out, dz, da;
};

// The tile of `count` rows from `row`: x into a[0] (zero rows and columns beyond), each hidden
// layer's ReLU activations into the next operand, the read-out into s.out.
void ForwardTile(const Mlp& st, const float* x, int64_t row, int count, MlpScratch& s) {
  float* a0 = s.a[0]->data;
  const int x_stride = st.stride(0);
  std::memset(a0, 0, kTileRows * x_stride * sizeof(float));
  for (int m = 0; m < count; ++m) {
    CopyRow(a0 + m * x_stride, x + (row + m) * st.features, st.features);
  }
  const size_t top = st.l.size() - 1;
  for (size_t i = 0; i <= top; ++i) {
    const Layer& l = st.l[i];
    float* z = i < top ? s.a[i + 1]->data : s.out->data;
    TileMatmul(kTileRows, l.n_pad / kLanes, s.a[i]->data, st.stride(i), 1, l.fan_in, l.w->data,
               l.n_pad, l.b->data, false, z, l.n_pad);
    if (i == top) break;
    const Vec zero = Splat(0.0f);
    for (int j = 0; j < kTileRows * l.n_pad; j += kLanes) {
      const Vec v = Load(z + j);
      Store(z + j, v < zero ? zero : v);  // a NaN stays NaN, as in XLA's max(z, 0)
    }
  }
}

void ForwardRows(const Mlp& st, const float* x, float* y, int64_t begin, int64_t end,
                 MlpScratch& s) {
  const int n_pad = st.l.back().n_pad;
  for (int64_t row = begin; row < end; row += kTileRows) {
    const int count = static_cast<int>(std::min<int64_t>(kTileRows, end - row));
    ForwardTile(st, x, row, count, s);
    for (int m = 0; m < count; ++m) {
      CopyRow(y + (row + m) * st.outputs, s.out->data + m * n_pad, st.outputs);
    }
  }
}

// Per chunk: every layer's dW (fan_in_4, n_pad), then its db (n_pad).
int64_t SlotSize(const Mlp& st) {
  int64_t size = 0;
  for (const Layer& l : st.l) size += static_cast<int64_t>(l.fan_in_4 + 1) * l.n_pad;
  return size;
}

// Rows [begin, end), each chunk's part of their weight cotangents added into the chunk's slot
// (slots + c * slot_size).
void BackwardRows(const Mlp& st, const float* x, const float* dy, float* dx,
                  const learned_opt_simd::GroupChunks& chunks, float* slots, int64_t slot_size,
                  int64_t begin, int64_t end, MlpScratch& s) {
  const size_t top = st.l.size() - 1;
  for (int64_t row = begin; row < end; row += kTileRows) {
    const int count = static_cast<int>(std::min<int64_t>(kTileRows, end - row));
    ForwardTile(st, x, row, count, s);
    // The read-out's dz is dy, zero in the rows past count (their recomputed activations are
    // not zero, so their cotangents must be).
    float* dz = s.dz->data;
    const int out_pad = st.l.back().n_pad;
    std::memset(dz, 0, kTileRows * out_pad * sizeof(float));
    for (int m = 0; m < count; ++m) {
      CopyRow(dz + m * out_pad, dy + (row + m) * st.outputs, st.outputs);
    }
    for (size_t k = top + 1; k-- > 0;) {
      const Layer& l = st.l[k];
      int64_t layer_offset = 0;
      for (size_t j = 0; j < k; ++j) layer_offset += (st.l[j].fan_in_4 + 1) * st.l[j].n_pad;
      // dW += a^T dz, db += the column sums of dz, over each chunk's rows into its slot.
      chunks.ForEachPart(row, row + count, [&](int64_t c, int64_t first, int64_t last) {
        float* layer_dw = slots + c * slot_size + layer_offset;
        float* layer_db = layer_dw + l.fan_in_4 * l.n_pad;
        const int m0 = static_cast<int>(first - row), m1 = static_cast<int>(last - row);
        TileMatmul(l.fan_in_4, l.n_pad / kLanes, s.a[k]->data + m0 * st.stride(k), 1,
                   st.stride(k), m1 - m0, dz + m0 * l.n_pad, l.n_pad, nullptr, true, layer_dw,
                   l.n_pad);
        for (int j = 0; j < l.n_pad; j += kLanes) {
          Vec sum = Load(layer_db + j);
          for (int m = m0; m < m1; ++m) sum += Load(dz + m * l.n_pad + j);
          Store(layer_db + j, sum);
        }
      });
      // da = dz W^T: dx at the bottom, else (through the ReLU, whose derivative is 0 where its
      // output is not positive, NaN included) the next dz down.
      float* da = s.da->data;
      TileMatmul(kTileRows, l.fan_in_pad / kLanes, dz, l.n_pad, 1, l.n, l.wt->data, l.fan_in_pad,
                 nullptr, false, da, l.fan_in_pad);
      if (k == 0) {
        for (int m = 0; m < count; ++m) {
          CopyRow(dx + (row + m) * st.features, da + m * l.fan_in_pad, st.features);
        }
        break;
      }
      const float* h = s.a[k]->data;  // the layer below's activations, stride fan_in_pad
      const Vec zero = Splat(0.0f);
      for (int j = 0; j < kTileRows * l.fan_in_pad; j += kLanes) {
        Store(dz + j, Load(h + j) > zero ? Load(da + j) : zero);
      }
    }
  }
}

std::function<std::function<void(int64_t, int64_t)>()> WithScratch(
    const Mlp& st, std::function<void(int64_t, int64_t, MlpScratch&)> body) {
  return [&st, body] {
    auto scratch = std::make_shared<MlpScratch>(st);
    return [scratch, body](int64_t begin, int64_t end) { body(begin, end, *scratch); };
  };
}

// Arguments x, w_0, b_0, ..., w_out, b_out; result y (..., outputs).
ffi::Error MlpForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs weights,
                      ffi::ResultBuffer<ffi::F32> y) {
  Mlp st;
  if (weights.size() % 2 != 0) {
    return ffi::Error::InvalidArgument("expected a w and a b per layer, nothing else");
  }
  if (ffi::Error e = PackMlp(x, weights, weights.size() / 2, st); !e.success()) return e;
  if (y->element_count() != static_cast<size_t>(st.rows) * st.outputs) {
    return ffi::Error::InvalidArgument("y must be (..., outputs) with x's rows");
  }
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  learned_opt_simd::ParallelRows(
      pool, 0, false, st.rows, kChunkRows,
      WithScratch(st, [&st, xp, yp](int64_t begin, int64_t end, MlpScratch& s) {
        ForwardRows(st, xp, yp, begin, end, s);
      }));
  return ffi::Error::Success();
}

// Arguments x, w_0, b_0, ..., w_out, b_out, dy; results dx, dw_0, db_0, ..., dw_out, db_out.
// The weight cotangents may have leading dims, groups (a jax.vmap of the backward pass with the
// weights shared): the rows are then that many consecutive groups, each with its own sums.
ffi::Error MlpBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs rest,
                       ffi::ResultBuffer<ffi::F32> dx, ffi::RemainingRets weight_grads) {
  Mlp st;
  if (rest.size() % 2 != 1 || weight_grads.size() + 1 != rest.size()) {
    return ffi::Error::InvalidArgument(
        "expected w, b per layer, then dy; results dx, then dw, db per layer");
  }
  if (ffi::Error e = PackMlp(x, rest, rest.size() / 2, st); !e.success()) return e;
  auto dy = rest.get<ffi::Buffer<ffi::F32>>(rest.size() - 1);
  if (!dy.has_value() || dy->element_count() != static_cast<size_t>(st.rows) * st.outputs) {
    return ffi::Error::InvalidArgument("dy must be f32 (..., outputs) with x's rows");
  }
  if (dx->element_count() != x.element_count()) {
    return ffi::Error::InvalidArgument("dx must be shaped like x");
  }
  std::vector<float*> grads;
  int64_t groups = -1;
  for (size_t i = 0; i < st.l.size(); ++i) {
    const Layer& l = st.l[i];
    auto dw = weight_grads.get<ffi::Buffer<ffi::F32>>(2 * i);
    auto db = weight_grads.get<ffi::Buffer<ffi::F32>>(2 * i + 1);
    if (groups < 0 && dw.has_value()) {
      const int64_t size = static_cast<int64_t>(l.fan_in) * l.n;
      groups = static_cast<int64_t>((*dw)->element_count()) / size;
    }
    if (!dw.has_value() || !db.has_value() || groups <= 0 ||
        (*dw)->element_count() != static_cast<size_t>(groups * l.fan_in * l.n) ||
        (*db)->element_count() != static_cast<size_t>(groups * l.n) || st.rows % groups != 0) {
      return ffi::Error::InvalidArgument(
          "dw and db must be f32, shaped like w and b after the same leading dims (groups), "
          "which divide x's rows");
    }
    grads.push_back((*dw)->typed_data());
    grads.push_back((*db)->typed_data());
  }
  const learned_opt_simd::GroupChunks chunks(groups, st.rows / groups, kChunkRows);
  const int64_t slot_size = SlotSize(st);
  AlignedFloats slots(static_cast<size_t>(std::max<int64_t>(chunks.count(), 1)) * slot_size);
  const float *xp = x.typed_data(), *dyp = dy->typed_data();
  float *dxp = dx->typed_data(), *slots_p = slots.data;
  learned_opt_simd::ParallelRows(
      pool, 0, false, chunks.units(), 1,
      WithScratch(st, [=, &st](int64_t begin, int64_t end, MlpScratch& s) {
        for (int64_t u = begin; u < end; ++u) {
          BackwardRows(st, xp, dyp, dxp, chunks, slots_p, slot_size, chunks.unit_first(u),
                       chunks.unit_last(u), s);
        }
      }));
  for (int64_t g = 0; g < groups; ++g) {
    SumLayerChunks(slots.data + g * chunks.per_group * slot_size, chunks.per_group, slot_size,
                   st.l, grads, g);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LearnedOptMlpForward, MlpForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x (..., features)
                                  .RemainingArgs()                 // w_0, b_0, ..., w_out, b_out
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y (..., outputs)

XLA_FFI_DEFINE_HANDLER_SYMBOL(LearnedOptMlpBackward, MlpBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (..., features)
                                  .RemainingArgs()                // weights, then dy (..., outputs)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .RemainingRets());              // dw_0, db_0, ..., dw_out, db_out
