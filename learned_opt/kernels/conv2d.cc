// A 'SAME', stride-1 2-D convolution (NHWC input, HWIO kernel, odd kernel sizes, float32) and its
// kernel's gradient, as direct CPU kernels for the small conv nets of the optimizee tasks.
//
// XLA:CPU runs a convolution inside a lax.scan ~25x slower than outside it
// (../shared/probes/conv_in_scan.py), so tasks/cifar10.py writes it as im2col by shifted slices
// and a matmul: a kh * kw times larger copy of every activation, written and read again by the
// forward pass, and the same again (with a transpose of the output's cotangent) by the backward
// pass. Here each image is copied once, zero-padded, into a thread's scratch (in L1 or L2), and
// every output is accumulated in registers from it:
//
// * Forward: y[n, h, w, :] = sum over (i, j, ci) of xpad[n, h + i, w + j, ci] * k[i, j, ci, :], a
//   tile of up to 8 output pixels times one vector of output channels in registers, each kernel
//   vector loaded once per tile; with at most 4 outputs from 16 or more inputs, a tile of 4
//   pixels times the outputs, summing over input channels in the lanes. The input's gradient is
//   this function of the output's cotangent and the flipped, transposed kernel
//   (learned_opt/kernels/conv.py), so it needs no kernel of its own.
// * Kernel gradient: dk[i, j, ci, :] = sum over (n, h, w) of xpad[n, h + i, w + j, ci] *
//   dy[n, h, w, :]. For a kernel row i the entries (j, ci) are contiguous in a padded image row,
//   so a run of up to 24 of them is accumulated in registers over all of an image's pixels.
//   Images are summed in fixed chunks, then the chunks in order: the result does not depend on
//   the number of threads.
//
// Leading dimensions (a jax.vmap over problems) are groups: x (..., n, h, w, cin) with the
// kernel (..., kh, kw, cin, cout), each group its own kernel. Built on first use by
// learned_opt/kernels/conv.py (flags in build.py).

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using learned_opt_simd::AlignedFloats;
using learned_opt_simd::kLanes;
using learned_opt_simd::LoadPart;
using learned_opt_simd::Splat;
using learned_opt_simd::StorePart;
using learned_opt_simd::Vec;

constexpr int kTileMax = 8;    // output pixels per forward tile
constexpr int kRunMax = 24;    // kernel entries per gradient accumulation run
constexpr int64_t kChunkImages = 8;  // images a kernel-gradient partial sum covers, at most

// The sizes of one call, checked against every buffer.
struct Shape {
  int64_t groups = 0, images = 0;  // images per group
  int height = 0, width = 0, cin = 0, cout = 0, kh = 0, kw = 0;
  int pad_h() const { return kh / 2; }
  int pad_w() const { return kw / 2; }
  int padded_width() const { return width + 2 * pad_w(); }
  int64_t padded_size() const {
    return static_cast<int64_t>(height + 2 * pad_h()) * padded_width() * cin;
  }
  int64_t image_in() const { return static_cast<int64_t>(height) * width * cin; }
  int64_t image_out() const { return static_cast<int64_t>(height) * width * cout; }
  int64_t kernel_size() const { return static_cast<int64_t>(kh) * kw * cin * cout; }
};

// Copies one image (height, width, cin) into the interior of padded, whose border stays zero.
void PadImage(const float* image, float* padded, const Shape& s) {
  const int64_t row = static_cast<int64_t>(s.width) * s.cin;
  for (int h = 0; h < s.height; ++h) {
    const int64_t at = static_cast<int64_t>(h + s.pad_h()) * s.padded_width() + s.pad_w();
    float* to = padded + at * s.cin;
    std::memcpy(to, image + h * row, row * sizeof(float));
  }
}

// out[t, co .. co + lanes) for TILE output pixels starting at (h, w) of a padded image. CIN > 0
// is the input's channel count known at compile time (unrolled, constant offsets); 0: s.cin.
template <int TILE, int CIN>
void ForwardTile(const float* padded, const float* kernel, float* out, int h, int w, int co,
                 int lanes, const Shape& s) {
  const int cin = CIN > 0 ? CIN : s.cin;
  Vec acc[TILE];
  for (int t = 0; t < TILE; ++t) acc[t] = Splat(0.0f);
  for (int i = 0; i < s.kh; ++i) {
    const float* x = padded + (static_cast<int64_t>(h + i) * s.padded_width() + w) * cin;
    const float* k = kernel + static_cast<int64_t>(i * s.kw) * cin * s.cout + co;
    // Along a padded row the taps (j, ci) are one run of kw * cin floats, q = j * cin + ci.
    const int run = s.kw * cin;
    if (lanes == kLanes) {
      for (int q = 0; q < run; ++q) {
        const Vec kv = learned_opt_simd::Load(k + q * s.cout);
        for (int t = 0; t < TILE; ++t) acc[t] += Splat(x[t * cin + q]) * kv;
      }
    } else {
      for (int q = 0; q < run; ++q) {
        const Vec kv = LoadPart(k + q * s.cout, lanes);
        for (int t = 0; t < TILE; ++t) acc[t] += Splat(x[t * cin + q]) * kv;
      }
    }
  }
  for (int t = 0; t < TILE; ++t) StorePart(out + static_cast<int64_t>(t) * s.cout, acc[t], lanes);
}

// y for one padded image: every output row in tiles of 8, 4, then single pixels.
template <int CIN>
void ForwardImageOf(const float* padded, const float* kernel, float* y, const Shape& s) {
  for (int co = 0; co < s.cout; co += kLanes) {
    const int lanes = std::min(kLanes, s.cout - co);
    for (int h = 0; h < s.height; ++h) {
      float* row = y + static_cast<int64_t>(h) * s.width * s.cout + co;
      int w = 0;
      for (; w + kTileMax <= s.width; w += kTileMax) {
        ForwardTile<kTileMax, CIN>(padded, kernel, row + w * s.cout, h, w, co, lanes, s);
      }
      for (; w + 4 <= s.width; w += 4) {
        ForwardTile<4, CIN>(padded, kernel, row + w * s.cout, h, w, co, lanes, s);
      }
      for (; w < s.width; ++w) {
        ForwardTile<1, CIN>(padded, kernel, row + w * s.cout, h, w, co, lanes, s);
      }
    }
  }
}

// The channel counts of the tasks' nets compiled with constant offsets, others at run time.
void ForwardImage(const float* padded, const float* kernel, float* y, const Shape& s) {
  switch (s.cin) {
    case 3: return ForwardImageOf<3>(padded, kernel, y, s);
    case 8: return ForwardImageOf<8>(padded, kernel, y, s);
    case 16: return ForwardImageOf<16>(padded, kernel, y, s);
    case 32: return ForwardImageOf<32>(padded, kernel, y, s);
    case 64: return ForwardImageOf<64>(padded, kernel, y, s);
    case 128: return ForwardImageOf<128>(padded, kernel, y, s);
    default: return ForwardImageOf<0>(padded, kernel, y, s);
  }
}

// Few outputs (cout <= kNarrowMax, as a gradient of a 3-channel image) from many inputs: a vector
// of output channels would be mostly empty, so the sum over input channels runs in the vector
// lanes instead, with the kernel transposed to (kh, kw, cout, cin), then across them.
constexpr int kNarrowMax = 4;
constexpr int kNarrowTile = 4;  // output pixels per tile

inline float SumLanes(Vec v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#else
  float lanes[kLanes];
  learned_opt_simd::Store(lanes, v);
  float total = 0.0f;
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
#endif
}

// out[t * COUT + co] for TILE output pixels from (h, w); kt the transposed kernel.
template <int COUT, int TILE>
void NarrowTile(const float* padded, const float* kt, float* out, int h, int w, const Shape& s) {
  Vec acc[TILE][COUT];
  for (int t = 0; t < TILE; ++t) {
    for (int co = 0; co < COUT; ++co) acc[t][co] = Splat(0.0f);
  }
  const int cin = s.cin, full = cin / kLanes * kLanes;
  for (int i = 0; i < s.kh; ++i) {
    for (int j = 0; j < s.kw; ++j) {
      const float* x = padded + (static_cast<int64_t>(h + i) * s.padded_width() + w + j) * cin;
      const float* k = kt + static_cast<int64_t>(i * s.kw + j) * COUT * cin;
      for (int ci = 0; ci < full; ci += kLanes) {
        Vec kv[COUT];
        for (int co = 0; co < COUT; ++co) kv[co] = learned_opt_simd::Load(k + co * cin + ci);
        for (int t = 0; t < TILE; ++t) {
          const Vec xv = learned_opt_simd::Load(x + t * cin + ci);
          for (int co = 0; co < COUT; ++co) acc[t][co] += xv * kv[co];
        }
      }
      if (full < cin) {
        const int lanes = cin - full;
        Vec kv[COUT];
        for (int co = 0; co < COUT; ++co) kv[co] = LoadPart(k + co * cin + full, lanes);
        for (int t = 0; t < TILE; ++t) {
          const Vec xv = LoadPart(x + t * cin + full, lanes);
          for (int co = 0; co < COUT; ++co) acc[t][co] += xv * kv[co];
        }
      }
    }
  }
  for (int t = 0; t < TILE; ++t) {
    for (int co = 0; co < COUT; ++co) out[t * COUT + co] = SumLanes(acc[t][co]);
  }
}

template <int COUT>
void NarrowImageOf(const float* padded, const float* kt, float* y, const Shape& s) {
  for (int h = 0; h < s.height; ++h) {
    float* row = y + static_cast<int64_t>(h) * s.width * COUT;
    int w = 0;
    for (; w + kNarrowTile <= s.width; w += kNarrowTile) {
      NarrowTile<COUT, kNarrowTile>(padded, kt, row + w * COUT, h, w, s);
    }
    for (; w < s.width; ++w) NarrowTile<COUT, 1>(padded, kt, row + w * COUT, h, w, s);
  }
}

void NarrowImage(const float* padded, const float* kt, float* y, const Shape& s) {
  switch (s.cout) {
    case 1: return NarrowImageOf<1>(padded, kt, y, s);
    case 2: return NarrowImageOf<2>(padded, kt, y, s);
    case 3: return NarrowImageOf<3>(padded, kt, y, s);
    default: return NarrowImageOf<4>(padded, kt, y, s);
  }
}

// Each group's kernel (kh, kw, cin, cout) as (kh, kw, cout, cin).
std::vector<float> Transposed(const float* kernel, const Shape& s) {
  std::vector<float> out(s.groups * s.kernel_size());
  for (int64_t g = 0; g < s.groups; ++g) {
    const float* from = kernel + g * s.kernel_size();
    float* to = out.data() + g * s.kernel_size();
    for (int64_t tap = 0; tap < static_cast<int64_t>(s.kh) * s.kw; ++tap) {
      for (int ci = 0; ci < s.cin; ++ci) {
        for (int co = 0; co < s.cout; ++co) {
          to[(tap * s.cout + co) * s.cin + ci] = from[(tap * s.cin + ci) * s.cout + co];
        }
      }
    }
  }
  return out;
}

// dk[i, q0 .. q0 + RUN, co .. co + lanes) += the sum over an image's pixels of
// xpad[h + i, w, q0 + r] * dy[h, w, co ..], q = j * cin + ci running along a padded row. FULL:
// lanes == kLanes (a separate loop: with the test inside it the accumulators leave registers).
template <int RUN, bool FULL>
void GradientRun(const float* padded, const float* dy, float* dk, int i, int q0, int co,
                 int lanes, const Shape& s) {
  Vec acc[RUN];
#pragma GCC unroll 32
  for (int r = 0; r < RUN; ++r) acc[r] = Splat(0.0f);
  for (int h = 0; h < s.height; ++h) {
    const float* x = padded + static_cast<int64_t>(h + i) * s.padded_width() * s.cin + q0;
    const float* d = dy + static_cast<int64_t>(h) * s.width * s.cout + co;
    for (int w = 0; w < s.width; ++w, x += s.cin, d += s.cout) {
      const Vec dv = FULL ? learned_opt_simd::Load(d) : LoadPart(d, lanes);
#pragma GCC unroll 32
      for (int r = 0; r < RUN; ++r) acc[r] += Splat(x[r]) * dv;
    }
  }
  float* k = dk + (static_cast<int64_t>(i) * s.kw * s.cin + q0) * s.cout + co;
  for (int r = 0; r < RUN; ++r) {
    StorePart(k + r * s.cout, LoadPart(k + r * s.cout, lanes) + acc[r], lanes);
  }
}

using RunFn = void (*)(const float*, const float*, float*, int, int, int, int, const Shape&);

template <bool FULL, int... R>
constexpr std::array<RunFn, sizeof...(R)> RunTable(std::integer_sequence<int, R...>) {
  return {&GradientRun<R + 1, FULL>...};
}

// dk += one padded image's contribution (dk (kh, kw, cin, cout)).
void GradientImage(const float* padded, const float* dy, float* dk, const Shape& s) {
  static constexpr auto kFullRuns = RunTable<true>(std::make_integer_sequence<int, kRunMax>{});
  static constexpr auto kPartRuns = RunTable<false>(std::make_integer_sequence<int, kRunMax>{});
  const int run_length = s.kw * s.cin;
  for (int co = 0; co < s.cout; co += kLanes) {
    const int lanes = std::min(kLanes, s.cout - co);
    for (int i = 0; i < s.kh; ++i) {
      for (int q0 = 0; q0 < run_length; q0 += kRunMax) {
        const int run = std::min(kRunMax, run_length - q0);
        (lanes == kLanes ? kFullRuns : kPartRuns)[run - 1](padded, dy, dk, i, q0, co, lanes, s);
      }
    }
  }
}

// The shape of x (..., n, h, w, cin) and a kernel (..., kh, kw, cin, cout) with the same leading
// dimensions, or an error naming what does not fit.
ffi::Error ReadShape(ffi::Span<const int64_t> x, ffi::Span<const int64_t> k, Shape& s) {
  if (x.size() < 4 || k.size() != x.size()) {
    return ffi::Error::InvalidArgument(
        "x must be (..., n, h, w, cin) and the kernel (..., kh, kw, cin, cout), same leading dims");
  }
  const size_t lead = x.size() - 4;
  s.groups = 1;
  for (size_t d = 0; d < lead; ++d) {
    if (x[d] != k[d]) return ffi::Error::InvalidArgument("x and the kernel differ in leading dims");
    s.groups *= x[d];
  }
  s.images = x[lead];
  s.height = static_cast<int>(x[lead + 1]);
  s.width = static_cast<int>(x[lead + 2]);
  s.cin = static_cast<int>(x[lead + 3]);
  s.kh = static_cast<int>(k[lead]);
  s.kw = static_cast<int>(k[lead + 1]);
  s.cout = static_cast<int>(k[lead + 3]);
  if (k[lead + 2] != s.cin) {
    return ffi::Error::InvalidArgument("x's channels differ from the kernel's");
  }
  if (s.kh % 2 == 0 || s.kw % 2 == 0) {
    return ffi::Error::InvalidArgument(
        "the kernel's height and width must be odd ('SAME' padding)");
  }
  return ffi::Error::Success();
}

ffi::Error ConvForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                       ffi::ResultBuffer<ffi::F32> y) {
  Shape s;
  if (ffi::Error e = ReadShape(x.dimensions(), kernel.dimensions(), s); !e.success()) return e;
  if (y->element_count() != static_cast<size_t>(s.groups * s.images * s.image_out())) {
    return ffi::Error::InvalidArgument("y must be (..., n, h, w, cout)");
  }
  const float *xp = x.typed_data(), *kp = kernel.typed_data();
  float* yp = y->typed_data();
  const bool narrow = s.cout <= kNarrowMax && s.cin >= kLanes;
  const std::vector<float> transposed = narrow ? Transposed(kp, s) : std::vector<float>();
  const float* tp = transposed.data();
  learned_opt_simd::ParallelRows(pool, 0, false, s.groups * s.images, 1, [=] {
    auto padded = std::make_shared<AlignedFloats>(s.padded_size());
    return [=](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        PadImage(xp + n * s.image_in(), padded->data, s);
        const int64_t k = (n / s.images) * s.kernel_size();
        if (narrow) {
          NarrowImage(padded->data, tp + k, yp + n * s.image_out(), s);
        } else {
          ForwardImage(padded->data, kp + k, yp + n * s.image_out(), s);
        }
      }
    };
  });
  return ffi::Error::Success();
}

ffi::Error ConvKernelGradient(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dk) {
  Shape s;
  if (ffi::Error e = ReadShape(x.dimensions(), dk->dimensions(), s); !e.success()) return e;
  if (dy.element_count() != static_cast<size_t>(s.groups * s.images * s.image_out())) {
    return ffi::Error::InvalidArgument("dy must be (..., n, h, w, cout)");
  }
  const learned_opt_simd::GroupChunks chunks(
      s.groups, s.images, std::min<int64_t>(kChunkImages, std::max<int64_t>(s.images, 1)));
  std::vector<float> partial(static_cast<size_t>(chunks.count() * s.kernel_size()), 0.0f);
  const float *xp = x.typed_data(), *dp = dy.typed_data();
  float* partial_p = partial.data();
  learned_opt_simd::ParallelRows(pool, 0, false, chunks.count(), 1, [=] {
    auto padded = std::make_shared<AlignedFloats>(s.padded_size());
    return [=](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        for (int64_t n = chunks.first(c); n < chunks.last(c); ++n) {
          PadImage(xp + n * s.image_in(), padded->data, s);
          GradientImage(padded->data, dp + n * s.image_out(), partial_p + c * s.kernel_size(), s);
        }
      }
    };
  });
  float* out = dk->typed_data();
  for (int64_t g = 0; g < s.groups; ++g) {
    float* to = out + g * s.kernel_size();
    std::memset(to, 0, s.kernel_size() * sizeof(float));
    for (int64_t c = g * chunks.per_group; c < (g + 1) * chunks.per_group; ++c) {
      const float* from = partial_p + c * s.kernel_size();
      for (int64_t e = 0; e < s.kernel_size(); ++e) to[e] += from[e];
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LearnedOptConvForward, ConvForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x (..., n, h, w, cin)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // kernel (..., kh, kw, cin, cout)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y (..., n, h, w, cout)

XLA_FFI_DEFINE_HANDLER_SYMBOL(LearnedOptConvKernelGradient, ConvKernelGradient,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x (..., n, h, w, cin)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dy (..., n, h, w, cout)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dk (..., kh, kw, cin, cout)
