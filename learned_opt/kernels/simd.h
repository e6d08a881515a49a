// Vector math and row-parallel work shared by the CPU kernels (lstm_stack.cc, lstm_gates.cc).
//
// Vectors are GCC/Clang vector extensions as wide as -march=native allows (AVX-512: 16 floats,
// AVX/AVX2: 8, else 4). exp is a range reduction to [-ln2/2, ln2/2] (two-constant Cody-Waite)
// and a degree-6 polynomial fitted for least relative error (~1e-7 relative in float): ~1e-7
// absolute error in sigmoid and tanh, NaN in -> NaN out. build.py hashes this header into every
// kernel's cache key, so editing it rebuilds them.

#ifndef LEARNED_OPT_KERNELS_SIMD_H_
#define LEARNED_OPT_KERNELS_SIMD_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace learned_opt_simd {

#if defined(__AVX512F__)
#define LO_LANES 16
#elif defined(__AVX__)
#define LO_LANES 8
#else
#define LO_LANES 4
#endif
constexpr int kLanes = LO_LANES;
typedef float Vec __attribute__((vector_size(LO_LANES * sizeof(float))));
typedef int32_t IVec __attribute__((vector_size(LO_LANES * sizeof(float))));

// x in every lane: a shuffle of lane 0 is one broadcast instruction (a lane-by-lane loop would
// become masked inserts, and Vec{} + x an extra add).
inline Vec Splat(float x) { return __builtin_shuffle(Vec{x}, IVec{}); }

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

// dst[0, n) = src[0, n): a row of state, too short for memcpy's call to pay off.
inline void CopyRow(float* dst, const float* src, int n) {
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) Store(dst + i, Load(src + i));
#if defined(__AVX512F__)
  if (i < n) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(dst + i, mask, _mm512_maskz_loadu_ps(mask, src + i));
  }
#else
  for (; i < n; ++i) dst[i] = src[i];
#endif
}

// The lanes [0, n) of a vector of floats at p, zero elsewhere (n <= kLanes); and its store.
inline Vec LoadPart(const float* p, int n) {
  if (n == kLanes) return Load(p);
#if defined(__AVX512F__)
  return (Vec)_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
#else
  float buffer[kLanes] = {};
  std::memcpy(buffer, p, n * sizeof(float));
  return Load(buffer);
#endif
}

inline void StorePart(float* p, Vec v, int n) {
  if (n == kLanes) {
    Store(p, v);
    return;
  }
#if defined(__AVX512F__)
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), (__m512)v);
#else
  float buffer[kLanes];
  Store(buffer, v);
  std::memcpy(p, buffer, n * sizeof(float));
#endif
}

// The sum of v's lanes.
inline float SumLanes(Vec v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#else
  float sum = 0.0f;
  for (int i = 0; i < kLanes; ++i) sum += v[i];
  return sum;
#endif
}

// exp(x), x a vector; NaN stays NaN, |x| is clamped to 87 (exp(+-87) is still a normal float).
inline Vec Exp(Vec x) {
  const Vec hi = Splat(87.0f), lo = Splat(-87.0f);
  x = x > hi ? hi : x;  // written as selects so that a NaN passes through
  x = x < lo ? lo : x;
  // n = round(x / ln2): with AVX-512 one rounding instruction, else the 1.5 * 2^23 trick (round
  // to nearest in the default mode).
#if defined(__AVX512F__)
  const Vec n = (Vec)_mm512_roundscale_ps((__m512)(x * Splat(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  const Vec magic = Splat(12582912.0f);
  const Vec n = (x * Splat(1.44269504088896341f) + magic) - magic;
#endif
  // r = x - n ln2, with ln2 split in a part exact in float and a remainder.
  Vec r = x - n * Splat(0.693145751953125f);
  r = r - n * Splat(1.428606765330187045e-06f);
  // exp(r), |r| <= ln2 / 2: a degree-6 polynomial fitted for least maximum relative error
  // (2e-9 in exact arithmetic, 1e-7 evaluated in float by Horner's rule).
  Vec p = Splat(1.3843857450410724e-3f);
  p = p * r + Splat(8.374162018299103e-3f);
  p = p * r + Splat(4.166799783706665e-2f);
  p = p * r + Splat(0.16666431725025177f);
  p = p * r + Splat(0.4999999403953552f);
  p = p * r + Splat(1.0f);
  p = p * r + Splat(1.0f);
  // p 2^n; n lies in [-126, 126] after the clamp.
#if defined(__AVX512F__)
  return (Vec)_mm512_scalef_ps((__m512)p, (__m512)n);
#else
  IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
#endif
}

// 1 / d, d >= 1. With AVX-512: the 14-bit estimate and one Newton step (error ~2^-28, so within
// an ulp or two of the division), several times the throughput of a division.
inline Vec Reciprocal(Vec d) {
#if defined(__AVX512F__)
  const Vec r = (Vec)_mm512_rcp14_ps((__m512)d);  // same-size vector casts: a no-op
  return r * (Splat(2.0f) - d * r);
#else
  return Splat(1.0f) / d;
#endif
}

// a / (1 + exp(-k z)) + b per lane: sigmoid with (k, a, b) = (1, 1, 0), tanh with (2, 2, -1).
inline Vec Squash(Vec z, Vec neg_k, Vec a, Vec b) {
  return a * Reciprocal(Splat(1.0f) + Exp(neg_k * z)) + b;
}

inline Vec Sigmoid(Vec z) { return Reciprocal(Splat(1.0f) + Exp(-z)); }

inline Vec Tanh(Vec z) { return Squash(z, Splat(-2.0f), Splat(2.0f), Splat(-1.0f)); }

// Memory aligned to a vector, zeroed, for packed weights and per-thread scratch.
struct AlignedFloats {
  explicit AlignedFloats(size_t n)
      : data(static_cast<float*>(std::aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64))) {
    std::memset(data, 0, ((n * sizeof(float) + 63) / 64) * 64);
  }
  ~AlignedFloats() { std::free(data); }
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
  float* data;
};

// Rows [0, rows) in chunks of chunk_rows, shared through an atomic counter between the calling
// thread and pool tasks (so a busy core simply takes fewer chunks). A participating thread calls
// make_worker() once, before its first chunk, for a function running rows [begin, end) with that
// thread's own scratch. A task the pool starts late (after the call returned) finds no chunk
// left and touches nothing but this object, which it co-owns.
struct RowWork {
  using Worker = std::function<void(int64_t begin, int64_t end)>;
  std::function<Worker()> make_worker;
  int64_t rows = 0, chunk_rows = 1, chunks = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Run() {
    int64_t chunk = next.fetch_add(1);
    if (chunk >= chunks) return;
    Worker worker = make_worker();
    for (; chunk < chunks; chunk = next.fetch_add(1)) {
      const int64_t begin = chunk * chunk_rows;
      worker(begin, std::min(rows, begin + chunk_rows));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// `groups` consecutive groups of group_rows rows (images) each, cut into chunks of at most
// chunk_rows that never span two groups: a fixed count per group, so a group's partial sums,
// added in chunk order, do not depend on which thread took which chunk. Chunk c covers rows
// [first(c), last(c)) of group group(c).
struct GroupChunks {
  GroupChunks(int64_t groups, int64_t group_rows, int64_t chunk_rows)
      : groups(groups),
        group_rows(group_rows),
        chunk_rows(chunk_rows),
        per_group((group_rows + chunk_rows - 1) / chunk_rows) {}
  int64_t count() const { return groups * per_group; }
  int64_t group(int64_t c) const { return c / per_group; }
  int64_t first(int64_t c) const { return group(c) * group_rows + (c % per_group) * chunk_rows; }
  int64_t last(int64_t c) const {
    return std::min(first(c) + chunk_rows, (group(c) + 1) * group_rows);
  }
  // The chunk holding row r.
  int64_t chunk_of(int64_t r) const {
    const int64_t g = r / group_rows;
    return g * per_group + (r - g * group_rows) / chunk_rows;
  }
  // Calls part(c, begin, end) for each chunk's part [begin, end) of rows [first_row, last_row),
  // in row order.
  template <typename Part>
  void ForEachPart(int64_t first_row, int64_t last_row, Part part) const {
    for (int64_t r = first_row; r < last_row;) {
      const int64_t c = chunk_of(r), end = std::min(last_row, last(c));
      part(c, r, end);
      r = end;
    }
  }
  // Work units, what a thread takes at a time: one chunk, or, where groups are smaller than a
  // chunk, as many whole groups as fit in chunk_rows rows, so that a tile of rows is not mostly
  // padding (a unit's tiles may span groups; each group still has its own chunk). Fixed, like
  // the chunks, whatever the threads.
  int64_t per_unit() const {
    return per_group == 1 && group_rows < chunk_rows ? chunk_rows / group_rows : 1;
  }
  int64_t units() const { return (count() + per_unit() - 1) / per_unit(); }
  int64_t unit_first(int64_t u) const { return first(u * per_unit()); }
  int64_t unit_last(int64_t u) const { return last(std::min(count(), (u + 1) * per_unit()) - 1); }
  int64_t groups, group_rows, chunk_rows, per_group;
};

// Runs make_worker's workers over [0, rows) on `threads` threads (0: the XLA pool's size; 1: the
// calling thread only); spawn: the extra threads are fresh std::threads, not pool tasks (to
// compare). Returns when every chunk is done.
inline void ParallelRows(xla::ffi::ThreadPool& pool, int64_t threads, bool spawn, int64_t rows,
                         int64_t chunk_rows, std::function<RowWork::Worker()> make_worker) {
  auto work = std::make_shared<RowWork>();
  work->make_worker = std::move(make_worker);
  work->rows = rows;
  work->chunk_rows = chunk_rows;
  work->chunks = (rows + chunk_rows - 1) / chunk_rows;
  int64_t helpers = (threads > 0 ? threads : pool.num_threads()) - 1;
  helpers = std::max<int64_t>(0, std::min(helpers, work->chunks - 1));
  std::vector<std::thread> spawned;
  for (int64_t t = 0; t < helpers; ++t) {
    if (spawn) {
      spawned.emplace_back([work] { work->Run(); });
    } else {
      pool.Schedule([work] { work->Run(); });
    }
  }
  work->Run();
  for (std::thread& t : spawned) t.join();
  // Chunks taken by pool tasks are running now; wait for them (each takes well under a second).
  while (work->done.load(std::memory_order_acquire) < work->chunks) std::this_thread::yield();
}

}  // namespace learned_opt_simd

#endif  // LEARNED_OPT_KERNELS_SIMD_H_
