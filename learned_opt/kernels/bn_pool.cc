// A conv layer's tail in the CIFAR-10 net, relu(max_pool(batch_norm(z) + bias)), forward and
// backward, as two CPU kernels (tasks/cifar10.py's convnet_logits; learned_opt/kernels/bn_pool.py).
//
// XLA runs this block as a dozen passes over the conv's output z: the statistics, the
// normalization, the pooling's window maxima, its tie counts and masks, the ReLU's mask, and in the
// backward pass as many again. Here the forward pass reads z twice (the per-channel sums, then
// normalize, pool and ReLU in one sweep) and the backward pass reads z and the output's cotangent
// twice (the two sums batch norm's derivative needs, then dz), recomputing the normalized values
// and each window's maximum instead of saving masks.
//
// Batch norm uses the batch's statistics over (n, h, w) per channel (training mode), as
// cifar10.batch_norm: y = (z - mean) / sqrt(var + eps) + bias; 2 x 2 max pooling with stride 2,
// whose derivative splits a window's cotangent equally between tied maxima (as XLA's reduce_max);
// the ReLU's derivative at 0 is 0. Sums run per image in float, per fixed chunk of images in
// double, then over chunks in order: the results do not depend on the thread count.
//
// Leading dimensions (a jax.vmap over problems) are groups with their own statistics and bias:
// z (..., n, h, w, c), bias (..., c).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using learned_opt_simd::kLanes;
using learned_opt_simd::LoadPart;
using learned_opt_simd::Splat;
using learned_opt_simd::StorePart;
using learned_opt_simd::Vec;

constexpr int64_t kChunkImages = 8;  // images a partial sum covers, at most

struct Shape {
  int64_t groups = 0, images = 0;
  int64_t height = 0, width = 0, channels = 0;
  int64_t image() const { return height * width * channels; }
  int64_t pooled() const { return image() / 4; }
  learned_opt_simd::GroupChunks chunks() const { return {groups, images, kChunkImages}; }
};

ffi::Error ReadShape(ffi::Span<const int64_t> z, ffi::Span<const int64_t> bias, Shape& s) {
  if (z.size() < 4 || bias.size() != z.size() - 3) {
    return ffi::Error::InvalidArgument("z must be (..., n, h, w, c) and the bias (..., c)");
  }
  const size_t lead = z.size() - 4;
  s.groups = 1;
  for (size_t d = 0; d < lead; ++d) {
    if (z[d] != bias[d]) {
      return ffi::Error::InvalidArgument("z and the bias differ in leading dims");
    }
    s.groups *= z[d];
  }
  s.images = z[lead];
  s.height = z[lead + 1];
  s.width = z[lead + 2];
  s.channels = z[lead + 3];
  if (bias[lead] != s.channels) return ffi::Error::InvalidArgument("the bias must be (..., c)");
  if (s.height % 2 || s.width % 2) {
    return ffi::Error::InvalidArgument("2 x 2 pooling needs an even height and width");
  }
  return ffi::Error::Success();
}

// Runs body(chunk, first image, last image, group) for every chunk of images on the pool.
void ForChunks(ffi::ThreadPool& pool, const Shape& s,
               std::function<void(int64_t, int64_t, int64_t, int64_t)> body) {
  const learned_opt_simd::GroupChunks chunks = s.chunks();
  learned_opt_simd::ParallelRows(pool, 0, false, chunks.count(), 1, [chunks, body] {
    return [chunks, body](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        body(c, chunks.first(c), chunks.last(c), chunks.group(c));
      }
    };
  });
}

// sums[k] (per_group of them) of a group: its chunks' partial sums, in chunk order.
void SumChunks(const Shape& s, const std::vector<double>& partial, int64_t group, int64_t per_group,
               double* sums) {
  std::fill(sums, sums + per_group, 0.0);
  const int64_t per_group_chunks = s.chunks().per_group;
  for (int64_t c = group * per_group_chunks; c < (group + 1) * per_group_chunks; ++c) {
    for (int64_t k = 0; k < per_group; ++k) sums[k] += partial[c * per_group + k];
  }
}

// Adds a vector of per-image float sums to double partial sums [0, lanes).
inline void AddTo(double* to, Vec v, int lanes) {
  float buffer[kLanes];
  learned_opt_simd::Store(buffer, v);
  for (int l = 0; l < lanes; ++l) to[l] += buffer[l];
}

// x when x > 0 or NaN, else 0: jnp.maximum(x, 0).
inline Vec Relu(Vec x) { return (x > Splat(0.0f)) | (x != x) ? x : Splat(0.0f); }

// The largest of four, NaN if any is NaN (XLA's reduce_max).
inline Vec Max4(const Vec* y) {
  Vec top = y[0];
  for (int k = 1; k < 4; ++k) top = (y[k] > top) | (y[k] != y[k]) ? y[k] : top;
  return top;
}

// One 2 x 2 window of one image, channels [ch, ch + lanes): its four values of z at `at`.
struct Window {
  int64_t at[4];
  int64_t out;  // the pooled position
};

template <typename Body>
void ForWindows(const Shape& s, Body body) {
  const int64_t row = s.width * s.channels;
  for (int64_t h = 0; h < s.height; h += 2) {
    for (int64_t w = 0; w < s.width; w += 2) {
      for (int64_t ch = 0; ch < s.channels; ch += kLanes) {
        const int64_t base = h * row + w * s.channels + ch;
        const Window win{{base, base + s.channels, base + row, base + row + s.channels},
                         ((h / 2) * (s.width / 2) + w / 2) * s.channels + ch};
        body(win, ch, static_cast<int>(std::min<int64_t>(kLanes, s.channels - ch)));
      }
    }
  }
}

// Per-channel constants of one group, as vectors for the channels [ch, ch + lanes).
struct Constants {
  const float *mean, *rstd, *bias;
  Vec Mean(int64_t ch, int lanes) const { return LoadPart(mean + ch, lanes); }
  Vec Rstd(int64_t ch, int lanes) const { return LoadPart(rstd + ch, lanes); }
  Vec Bias(int64_t ch, int lanes) const { return LoadPart(bias + ch, lanes); }
};

// The normalized values xhat = (z - mean) * rstd of a window, its maximum after the bias, and
// the cotangent of each of its four y = xhat + bias: d_out where the ReLU passed the maximum,
// split between ties.
inline void WindowGradient(const float* image, const float* d_out, const Window& win, int64_t ch,
                           int lanes, const Constants& k, Vec* xhat, Vec* dy) {
  const Vec m = k.Mean(ch, lanes), r = k.Rstd(ch, lanes), b = k.Bias(ch, lanes);
  Vec y[4];
  for (int q = 0; q < 4; ++q) {
    xhat[q] = (LoadPart(image + win.at[q], lanes) - m) * r;
    y[q] = xhat[q] + b;
  }
  const Vec top = Max4(y);
  Vec ties = Splat(0.0f);
  for (int q = 0; q < 4; ++q) ties += y[q] == top ? Splat(1.0f) : Splat(0.0f);
  // ties >= 1 unless the maximum is NaN, where top > 0 is false (lanes past `lanes` hold zeros).
  const Vec share = top > Splat(0.0f) ? LoadPart(d_out + win.out, lanes) / ties : Splat(0.0f);
  for (int q = 0; q < 4; ++q) dy[q] = y[q] == top ? share : Splat(0.0f);
}

// mean and 1 / sqrt(var + eps) per group and channel (groups, c). Sums are of z - z[first pixel]
// (a shift near the mean keeps E[x^2] - E[x]^2 accurate), per image in float, then in double.
void Statistics(ffi::ThreadPool& pool, const Shape& s, const float* z, float epsilon, float* mean,
                float* rstd) {
  const int64_t per_group = 2 * s.channels;
  std::vector<double> partial(s.chunks().count() * per_group, 0.0);
  ForChunks(pool, s, [&](int64_t c, int64_t first, int64_t last, int64_t group) {
    const float* shift = z + group * s.images * s.image();
    double* sums = partial.data() + c * per_group;
    const int64_t pixels = s.height * s.width;
    for (int64_t n = first; n < last; ++n) {
      for (int64_t ch = 0; ch < s.channels; ch += kLanes) {
        const int lanes = static_cast<int>(std::min<int64_t>(kLanes, s.channels - ch));
        const Vec k = LoadPart(shift + ch, lanes);
        Vec sum = Splat(0.0f), squares = Splat(0.0f);
        const float* p = z + n * s.image() + ch;
        for (int64_t q = 0; q < pixels; ++q, p += s.channels) {
          const Vec x = LoadPart(p, lanes) - k;
          sum += x;
          squares += x * x;
        }
        AddTo(sums + ch, sum, lanes);
        AddTo(sums + s.channels + ch, squares, lanes);
      }
    }
  });
  std::vector<double> sums(per_group);
  const double count = static_cast<double>(s.images * s.height * s.width);
  for (int64_t g = 0; g < s.groups; ++g) {
    SumChunks(s, partial, g, per_group, sums.data());
    const float* shift = z + g * s.images * s.image();
    for (int64_t ch = 0; ch < s.channels; ++ch) {
      const double shifted = sums[ch] / count;
      const double var = std::max(0.0, sums[s.channels + ch] / count - shifted * shifted);
      mean[g * s.channels + ch] = static_cast<float>(shift[ch] + shifted);
      rstd[g * s.channels + ch] = static_cast<float>(1.0 / std::sqrt(var + epsilon));
    }
  }
}

ffi::Error BnPoolForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> z, ffi::Buffer<ffi::F32> bias,
                         ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> mean,
                         ffi::ResultBuffer<ffi::F32> rstd, float epsilon) {
  Shape s;
  if (ffi::Error e = ReadShape(z.dimensions(), bias.dimensions(), s); !e.success()) return e;
  if (s.images == 0) return ffi::Error::InvalidArgument("batch norm needs at least one image");
  const float *zp = z.typed_data(), *bp = bias.typed_data();
  float *op = out->typed_data(), *mp = mean->typed_data(), *rp = rstd->typed_data();
  Statistics(pool, s, zp, epsilon, mp, rp);
  ForChunks(pool, s, [&](int64_t, int64_t first, int64_t last, int64_t g) {
    const Constants k{mp + g * s.channels, rp + g * s.channels, bp + g * s.channels};
    for (int64_t n = first; n < last; ++n) {
      const float* image = zp + n * s.image();
      float* o = op + n * s.pooled();
      ForWindows(s, [&](const Window& win, int64_t ch, int lanes) {
        const Vec m = k.Mean(ch, lanes), r = k.Rstd(ch, lanes), b = k.Bias(ch, lanes);
        Vec y[4];
        for (int q = 0; q < 4; ++q) y[q] = (LoadPart(image + win.at[q], lanes) - m) * r + b;
        StorePart(o + win.out, Relu(Max4(y)), lanes);
      });
    }
  });
  return ffi::Error::Success();
}

ffi::Error BnPoolBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> z, ffi::Buffer<ffi::F32> bias,
                          ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd,
                          ffi::Buffer<ffi::F32> d_out, ffi::ResultBuffer<ffi::F32> dz,
                          ffi::ResultBuffer<ffi::F32> dbias) {
  Shape s;
  if (ffi::Error e = ReadShape(z.dimensions(), bias.dimensions(), s); !e.success()) return e;
  if (d_out.element_count() != static_cast<size_t>(s.groups * s.images * s.pooled())) {
    return ffi::Error::InvalidArgument("d_out must be (..., n, h / 2, w / 2, c)");
  }
  const float *zp = z.typed_data(), *bp = bias.typed_data(), *mp = mean.typed_data();
  const float *rp = rstd.typed_data(), *dp = d_out.typed_data();
  float *dzp = dz->typed_data(), *dbp = dbias->typed_data();
  // Pass 1: per channel, sum(dy) and sum(dy * xhat).
  const int64_t per_group = 2 * s.channels;
  std::vector<double> partial(s.chunks().count() * per_group, 0.0);
  ForChunks(pool, s, [&](int64_t c, int64_t first, int64_t last, int64_t g) {
    const Constants k{mp + g * s.channels, rp + g * s.channels, bp + g * s.channels};
    double* sums = partial.data() + c * per_group;
    std::vector<float> image_sums(per_group);
    for (int64_t n = first; n < last; ++n) {
      std::fill(image_sums.begin(), image_sums.end(), 0.0f);
      ForWindows(s, [&](const Window& win, int64_t ch, int lanes) {
        Vec xhat[4], dy[4];
        WindowGradient(zp + n * s.image(), dp + n * s.pooled(), win, ch, lanes, k, xhat, dy);
        Vec sum = LoadPart(image_sums.data() + ch, lanes);
        Vec moment = LoadPart(image_sums.data() + s.channels + ch, lanes);
        for (int q = 0; q < 4; ++q) {
          sum += dy[q];
          moment += dy[q] * xhat[q];
        }
        StorePart(image_sums.data() + ch, sum, lanes);
        StorePart(image_sums.data() + s.channels + ch, moment, lanes);
      });
      for (int64_t q = 0; q < per_group; ++q) sums[q] += image_sums[q];
    }
  });
  std::vector<float> mean_dy(s.groups * s.channels), mean_moment(s.groups * s.channels);
  std::vector<double> sums(per_group);
  const double count = static_cast<double>(s.images * s.height * s.width);
  for (int64_t g = 0; g < s.groups; ++g) {
    SumChunks(s, partial, g, per_group, sums.data());
    for (int64_t ch = 0; ch < s.channels; ++ch) {
      dbp[g * s.channels + ch] = static_cast<float>(sums[ch]);
      mean_dy[g * s.channels + ch] = static_cast<float>(sums[ch] / count);
      mean_moment[g * s.channels + ch] = static_cast<float>(sums[s.channels + ch] / count);
    }
  }
  // Pass 2: dz = rstd * (dy - mean(dy) - xhat * mean(dy * xhat)).
  ForChunks(pool, s, [&](int64_t, int64_t first, int64_t last, int64_t g) {
    const Constants k{mp + g * s.channels, rp + g * s.channels, bp + g * s.channels};
    const float *md = mean_dy.data() + g * s.channels, *mm = mean_moment.data() + g * s.channels;
    for (int64_t n = first; n < last; ++n) {
      float* out = dzp + n * s.image();
      ForWindows(s, [&](const Window& win, int64_t ch, int lanes) {
        Vec xhat[4], dy[4];
        WindowGradient(zp + n * s.image(), dp + n * s.pooled(), win, ch, lanes, k, xhat, dy);
        const Vec r = k.Rstd(ch, lanes), a = LoadPart(md + ch, lanes), b = LoadPart(mm + ch, lanes);
        for (int q = 0; q < 4; ++q) {
          StorePart(out + win.at[q], r * (dy[q] - a - xhat[q] * b), lanes);
        }
      });
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LearnedOptBnPoolForward, BnPoolForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // z (..., n, h, w, c)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias (..., c)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out (..., n, h/2, w/2, c)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // mean (..., c)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // rstd (..., c)
                                  .Attr<float>("epsilon"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LearnedOptBnPoolBackward, BnPoolBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // z
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()   // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()   // rstd
                                  .Arg<ffi::Buffer<ffi::F32>>()   // d_out (..., n, h/2, w/2, c)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dz (..., n, h, w, c)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dbias (..., c)
