// CPU kernels for decoding steps, called from XLA through its FFI (valle_jax/kernels/__init__.py).
//
// RowsLinear: y[M, N] = x[M, K] @ w[K, N] for the few rows of a decoding step (M = batch size), with
// x and y float32 and w float32 or bfloat16 (widened in registers, never in memory), w packed in
// panels of 32 columns: w_PKC [P, K, 32], P = ceil(N / 32), panel p holding columns 32p .. 32p + 31
// row after row (zeros past N). Or w ternary (BitNet b1.58, valle_jax/ternary.py): w_PK2 uint32
// [P, K, 2], word 0 of a panel row with bit j set where column j is +1, word 1 where it is -1, so a
// step streams 2 bits a weight (16x fewer bytes than float32). The bits become a vector of -1, 0,
// +1 in registers (AVX-512: two masked moves; AVX2: two lookups in a 256-entry table of 8-lane bit
// patterns) and go through the same loop; the caller quantises x to 8-bit integers held in floats
// and rescales y, so the sums are of integers and exact.
//
// Why by hand: at a decoding step every weight is read once per step, so the step is a stream over
// the weights. XLA's CPU dot runs a product of a few rows at ~45-85 GFLOP/s, and it has no fast
// bfloat16 dot at all (a bf16 x bf16 -> f32 matrix-vector product is ~10x slower than float32
// there): bf16 weights, which halve the bytes to stream, were slower, not faster. Packed, each
// panel is one contiguous stream; each step of the contraction loads a row of the panel (two
// vectors with AVX-512) and multiplies it by x[m, k] broadcast, for up to 12 rows of x at once
// (6 with AVX2), so there are no horizontal sums and rows past the first cost only their
// multiply-adds while the panel is in L1 or L2. The stream is prefetched a few KB ahead (the
// hardware prefetcher alone does not run far enough ahead of a loop this busy). Panels are shared
// between the calling thread and XLA's intra-op thread pool through an atomic counter, so a helper
// that starts late, or never, only means the caller does more of them itself. Against the earlier
// form over w [N, K] (dot products, 3 rows of w by 8 rows of x per tile), a jitted chain of the
// half preset's step products went 10.7 -> 9.9 ms at one row, 12.7 -> 11.0 ms at 8, 38.9 ->
// 21.6 ms at 32 (float32 weights).
//
// CacheAttention: softmax attention of a decoding step's queries over a KV cache, reading only the
// slots written so far. XLA's attention over the cache reads every slot of the preallocated buffer
// at every step (its shapes are static), so a step early in an utterance read as much cache as the
// last one; here the loop stops at `live` (the cache's fill). Scores and probabilities stay in a
// per-thread buffer; masked slots get probability exactly 0, as with XLA's -max_float fill.
//
// BlockAttention: the same attention for many queries at once (a prefill, a NAR level): see the
// section below.
//
// Built with AVX2 and FMA, or also with AVX-512 (avx512f/bw/dq/vl), which makes `vf` below 16 lanes
// wide; the Python side checks the CPU before loading a build.
#include <immintrin.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// One vector of floats: 16 lanes with AVX-512 (the library is built twice, once with -mavx512*
// where the CPU has it), else 8 with AVX2. The kernels below are written once against these.
#if defined(__AVX512F__)
using vf = __m512;
constexpr int kLanes = 16;
// rows of x per tile where more rows than that share each panel of w (registers: 8 x 3 accumulators
// of the 32; 4 x 3 of AVX2's 16)
constexpr int kGroup = 8;
// rows of x per packed panel pass: 12 x 2 accumulators of the 32 registers (AVX2: 6 x 2 of 16)
constexpr int kPanelRows = 12;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset(float a) { return _mm512_set1_ps(a); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline vf vload(const uint16_t* p) {  // 16 bfloat16 -> 16 float32: the bits, shifted up
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// the first n (< 16) elements, zeros after them; nothing past them is read
inline vf vload_first(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(__mmask16((1u << n) - 1), p); }
inline vf vload_first(const uint16_t* p, int64_t n) {
  __m256i h = _mm256_maskz_loadu_epi16(__mmask16((1u << n) - 1), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline vf vkeep(vf x, const bool* m) {  // x where the 16 mask bytes at m are set, else -inf
  __mmask16 keep = _mm_test_epi8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m)), _mm_set1_epi8(1));
  return _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), keep, x);
}
inline float vhmax(vf v) { return _mm512_reduce_max_ps(v); }
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
// the first n (< 16) lanes of v to p; nothing past them is written
inline void vstore_first(float* p, vf v, int64_t n) { _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1), v); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vfnma(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
inline vf vround(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf vexp2i(vf n) {  // 2^n for integral n in float32's exponent range
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
inline vf vzero_where_neginf(vf x, vf y) {  // y, with 0 where x is -inf
  return _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, vset(-INFINITY), _CMP_EQ_OQ), vzero());
}
#else
using vf = __m256;
constexpr int kLanes = 8;
constexpr int kGroup = 4;
constexpr int kPanelRows = 6;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset(float a) { return _mm256_set1_ps(a); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline vf vload(const uint16_t* p) {  // 8 bfloat16 -> 8 float32: the bits, shifted up
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline vf vload_first(const float* p, int64_t n) {
  return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}
inline vf vload_first(const uint16_t* p, int64_t n) {  // no 16-bit masked load in AVX2
  alignas(16) uint16_t part[8] = {0};
  for (int64_t i = 0; i < n; ++i) part[i] = p[i];
  return vload(part);
}
inline vf vkeep(vf x, const bool* m) {
  __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m)));
  return _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), x, _mm256_castsi256_ps(_mm256_cmpgt_epi32(bytes, _mm256_setzero_si256())));
}
inline float vhmax(vf v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline void vstore_first(float* p, vf v, int64_t n) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), lanes), v);
}
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vfnma(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
inline float vsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
inline vf vround(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf vexp2i(vf n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline vf vzero_where_neginf(vf x, vf y) {
  return _mm256_andnot_ps(_mm256_cmp_ps(x, vset(-INFINITY), _CMP_EQ_OQ), y);
}
#endif

// One row of a ternary panel: bit j of `plus` / `minus` set where column j is +1 / -1.
struct Ternary {
  uint32_t plus, minus;
};

// Elements of W per panel row (32 weights): 32 floats or bfloat16, one Ternary.
template <typename W>
constexpr int64_t kRowElements = 32;
template <>
constexpr int64_t kRowElements<Ternary> = 1;

// Vector v of a panel row (lanes v * kLanes ..), widened to float32.
template <typename W>
inline vf wload(const W* row, int v) {
  return vload(row + v * kLanes);
}

#if defined(__AVX512F__)
template <>
inline vf wload(const Ternary* row, int v) {
  const __mmask16 plus = __mmask16(row->plus >> (16 * v)), minus = __mmask16(row->minus >> (16 * v));
  return _mm512_mask_mov_ps(_mm512_maskz_mov_ps(plus, vset(1.0f)), minus, vset(-1.0f));
}
#else
// kBitLanes[b]: lane i is 1.0f where bit i of byte b is set (8 KB: stays in L1 while a panel streams)
struct BitLanes {
  alignas(32) float lanes[256][8];
  BitLanes() {
    for (int b = 0; b < 256; ++b)
      for (int i = 0; i < 8; ++i) lanes[b][i] = float((b >> i) & 1);
  }
};
const BitLanes kBitLanes;

template <>
inline vf wload(const Ternary* row, int v) {
  const int shift = 8 * v;
  return vsub(vload(kBitLanes.lanes[(row->plus >> shift) & 255]), vload(kBitLanes.lanes[(row->minus >> shift) & 255]));
}
#endif

inline float widen(float v) { return v; }

inline float widen(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// y[M, N] = x[M, K] @ w[N, K]^T in dot-product form, each operand with its own row stride (in
// elements): block_attention's probabilities times its values (rows of the cache, [D, C]), which
// are not packed like rows_linear's weights.
template <typename W>
struct Product {
  const float* x;
  int64_t ldx;
  const W* w;
  int64_t ldw;
  float* y;
  int64_t ldy;
  int64_t K;
};

// y[m0 .. m0+MR, n0 .. n0+NR]: MR x NR accumulators. A contraction that is not a whole number of
// vectors ends with one masked load per row (nothing past K is read).
template <int MR, int NR, typename W>
void tile(const Product<W>& p, int64_t m0, int64_t n0) {
  const int64_t K = p.K;
  vf acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = vzero();
  const W* wr[NR];
  const float* xr[MR];
  for (int j = 0; j < NR; ++j) wr[j] = p.w + (n0 + j) * p.ldw;
  for (int i = 0; i < MR; ++i) xr[i] = p.x + (m0 + i) * p.ldx;
  const char* next = reinterpret_cast<const char*>(p.w + (n0 + NR) * p.ldw);  // prefetching never faults
  constexpr int64_t per_line = 64 / sizeof(W);
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    if (k % per_line == 0)
      for (int j = 0; j < NR; ++j) _mm_prefetch(next + (j * p.ldw + k) * int64_t(sizeof(W)), _MM_HINT_T0);
    vf wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = vload(wr[j] + k);
    for (int i = 0; i < MR; ++i) {
      vf xv = vload(xr[i] + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = vfma(xv, wv[j], acc[i][j]);
    }
  }
  if (k < K) {
    vf wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = vload_first(wr[j] + k, K - k);
    for (int i = 0; i < MR; ++i) {
      vf xv = vload_first(xr[i] + k, K - k);
      for (int j = 0; j < NR; ++j) acc[i][j] = vfma(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) p.y[(m0 + i) * p.ldy + n0 + j] = vsum(acc[i][j]);
}

// Rows of w per tile for MR rows of x: as many independent accumulators as the registers allow,
// since one row of x alone is a chain of dependent FMAs per accumulator.
template <int MR>
constexpr int tile_width() {
  return kLanes == 16 ? (MR <= 2 ? 8 : 6) : (MR == 1 ? 8 : MR == 2 ? 6 : MR == 3 ? 4 : 3);
}

template <int MR, typename W>
void row_group(const Product<W>& p, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int NR = tile_width<MR>();
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) tile<MR, NR>(p, m0, n);
  for (; n < n1; ++n) tile<MR, 1>(p, m0, n);
}

// Tiles of NR rows of w for every row of x, kGroup rows at a time: each panel of w is read from
// memory once and then used by every row group while it is in L1.
template <int NR, typename W>
void panel(const Product<W>& p, int64_t M, int64_t n) {
  int64_t m = 0;
  for (; m + kGroup <= M; m += kGroup) tile<kGroup, NR>(p, m, n);
  if (kGroup > 4 && m + 4 <= M) {
    tile<4, NR>(p, m, n);
    m += 4;
  }
  switch (M - m) {
    case 3: tile<3, NR>(p, m, n); break;
    case 2: tile<2, NR>(p, m, n); break;
    case 1: tile<1, NR>(p, m, n); break;
    default: break;
  }
}

// Columns [n0, n1) of y. Up to four rows of x: one row group, its tiles as wide as its registers
// allow. More: tiles three rows of w wide, shared by the row groups.
template <typename W>
void columns(const Product<W>& p, int64_t M, int64_t n0, int64_t n1) {
  switch (M) {
    case 1: row_group<1>(p, 0, n0, n1); return;
    case 2: row_group<2>(p, 0, n0, n1); return;
    case 3: row_group<3>(p, 0, n0, n1); return;
    case 4: row_group<4>(p, 0, n0, n1); return;
    default: break;
  }
  int64_t n = n0;
  for (; n + 3 <= n1; n += 3) panel<3>(p, M, n);
  for (; n < n1; ++n) panel<1>(p, M, n);
}

// exp(x) for x <= 0 (softmax after subtracting the maximum): 2^n * p(r), n = round(x / ln 2),
// r = x - n ln 2 in two parts, p a degree-6 polynomial (relative error ~1e-7); x < -87 gives ~0.
inline vf exp_nonpositive(vf x) {
  x = vmax(x, vset(-87.0f));
  vf n = vround(vmul(x, vset(1.44269504088896341f)));
  vf r = vfnma(n, vset(0.693359375f), x);
  r = vfnma(n, vset(-2.12194440e-4f), r);
  vf p = vset(1.9875691500e-4f);
  p = vfma(p, r, vset(1.3981999507e-3f));
  p = vfma(p, r, vset(8.3334519073e-3f));
  p = vfma(p, r, vset(4.1665795894e-2f));
  p = vfma(p, r, vset(1.6666665459e-1f));
  p = vfma(p, r, vset(5.0000001201e-1f));
  p = vfma(p, vmul(r, r), vadd(r, vset(1.0f)));
  return vmul(p, vexp2i(n));
}

// a . b over n elements; b float32 or bfloat16 (the cache's dtype)
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  vf acc0 = vzero(), acc1 = vzero();
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    acc0 = vfma(vload(a + i), vload(b + i), acc0);
    acc1 = vfma(vload(a + i + kLanes), vload(b + i + kLanes), acc1);
  }
  for (; i + kLanes <= n; i += kLanes) acc0 = vfma(vload(a + i), vload(b + i), acc0);
  float s = vsum(vadd(acc0, acc1));
  for (; i < n; ++i) s += a[i] * widen(b[i]);
  return s;
}

// s[0, n) -> exp(s - top) in place (-inf slots exactly 0); returns their sum.
inline float exp_shifted(float* s, int64_t n, float top) {
  const vf vtop = vset(top);
  vf vtotal = vzero();
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    const vf x = vload(s + c);
    const vf e = vzero_where_neginf(x, exp_nonpositive(vsub(x, vtop)));
    vstore(s + c, e);
    vtotal = vadd(vtotal, e);
  }
  float total = vsum(vtotal);
  for (; c < n; ++c) {
    s[c] = s[c] == -INFINITY ? 0.0f : std::exp(s[c] - top);
    total += s[c];
  }
  return total;
}

// A query with nothing visible: XLA's softmax over equal fills is uniform over every slot, so its
// output o[D] is the mean of the values v [D, C] over all C slots.
template <typename T>
void uniform_over_slots(const T* v, int64_t C, int64_t D, float* o) {
  const float share = 1.0f / float(C);
  for (int64_t d = 0; d < D; ++d) {
    float total = 0.0f;
    for (int64_t c = 0; c < C; ++c) total += widen(v[d * C + c]);
    o[d] = total * share;
  }
}

// One (batch row, kv head) unit: Q queries [Q, D] over keys [C, D] and values [D, C] (C = the
// cache's slots, `live` of them read; float32 or bfloat16), the mask rows [S, C] of its batch row
// (query q uses row q / (Q / S)); out [Q, D]. `buf` holds `live` floats.
template <typename T>
void attend_unit(const float* q, const T* k, const T* v, const bool* mask, float* out, int64_t Q, int64_t S,
                 int64_t C, int64_t D, int64_t live, float scale, float* buf) {
  const int64_t per_row = Q / S;
  for (int64_t qi = 0; qi < Q; ++qi) {
    const bool* m = mask + (qi / per_row) * C;
    const float* qv = q + qi * D;
    float top = -INFINITY;
    for (int64_t c = 0; c < live; ++c) {
      buf[c] = m[c] ? dot(qv, k + c * D, D) * scale : -INFINITY;
      top = buf[c] > top ? buf[c] : top;
    }
    float* o = out + qi * D;
    if (top == -INFINITY) {
      uniform_over_slots(v, C, D, o);
      continue;
    }
    const float inv = 1.0f / exp_shifted(buf, live, top);
    for (int64_t d = 0; d < D; ++d) o[d] = dot(buf, v + d * C, live) * inv;
  }
}

struct Progress {
  std::atomic<int64_t> next{0};  // the next chunk to take
  std::atomic<int64_t> done{0};  // chunks finished
};

// Below this many multiply-adds a call runs on the calling thread alone: waking a pool thread
// (microseconds) costs more than it saves.
constexpr int64_t kShareAbove = int64_t(1) << 15;

// Runs work() on the calling thread and, when `parallel`, on pool threads (each takes units from
// `progress` until none are left), and returns once all `units` are done. The caller counts as one
// of the pool's threads (as many as cores): one helper fewer. As many helpers as the pool has threads
// put three threads on two cores where XLA runs independent calls side by side (a jitted chain of
// the half preset's step products, where the helpers started ~170 us late on average: 13.0-15.7 ms
// at one row against 11.2 ms, 8 rows 16.6-18.4 against 13.5 ms); the AR's own steps ran the same
// either way.
template <typename Work>
void share(ffi::ThreadPool& pool, const std::shared_ptr<Progress>& progress, int64_t units, bool parallel,
           Work work) {
  int64_t helpers = parallel ? pool.num_threads() - 1 : 0;
  if (helpers > units - 1) helpers = units - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work]() { work(); });
  work();
  while (progress->done.load(std::memory_order_acquire) < units) _mm_pause();  // units still in a helper's hands
}

constexpr int64_t kPanel = 32;         // columns per packed panel of w
constexpr int64_t kPrefetchAhead = 2048;  // bytes of the panel stream prefetched ahead of the loads

// y[0 .. MR, 0 .. cols) for MR rows of x (row stride ldx) and the vectors [v0, v0 + 2) of one
// packed panel wp [K, 32] (y's row stride ldy); `prefetch`: this pass is the first over the panel.
template <int MR, typename W>
void panel_tile(const float* x, int64_t ldx, const W* wp, int64_t K, int v0, float* y, int64_t ldy, int64_t cols,
                bool prefetch) {
  vf acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = vzero();
  constexpr int64_t row_bytes = kRowElements<W> * sizeof(W);
  const char* ahead = reinterpret_cast<const char*>(wp) + kPrefetchAhead;  // prefetching never faults
  for (int64_t k = 0; k < K; ++k) {
    // one prefetch per cache line of the stream (a ternary row is 8 bytes: every 8th row)
    if (prefetch && (row_bytes >= 64 || (k * row_bytes) % 64 == 0))
      for (int64_t b = 0; b < row_bytes || b == 0; b += 64) _mm_prefetch(ahead + k * row_bytes + b, _MM_HINT_T0);
    const W* row = wp + k * kRowElements<W>;
    const vf w0 = wload(row, v0), w1 = wload(row, v0 + 1);
    for (int i = 0; i < MR; ++i) {
      const vf xv = vset(x[i * ldx + k]);
      acc[i][0] = vfma(xv, w0, acc[i][0]);
      acc[i][1] = vfma(xv, w1, acc[i][1]);
    }
  }
  for (int j = 0; j < 2; ++j) {
    const int64_t c = (v0 + j) * kLanes;
    for (int i = 0; i < MR; ++i) {
      if (c + kLanes <= cols) vstore(y + i * ldy + c, acc[i][j]);
      else if (c < cols) vstore_first(y + i * ldy + c, acc[i][j], cols - c);
    }
  }
}

template <int MR, typename W>
void panel_tile_rows(int64_t rows, const float* x, int64_t ldx, const W* wp, int64_t K, int v0, float* y,
                     int64_t ldy, int64_t cols, bool prefetch) {
  if constexpr (MR > 0) {
    if (rows == MR) return panel_tile<MR>(x, ldx, wp, K, v0, y, ldy, cols, prefetch);
    panel_tile_rows<MR - 1>(rows, x, ldx, wp, K, v0, y, ldy, cols, prefetch);
  }
}

// Columns [32p, 32p + cols) of y from panel p: the rows of x in groups of at most kPanelRows, as
// even as they divide (16 rows: 8 + 8, not 12 + 4); AVX2 takes the panel's two halves in turn.
template <typename W>
void panel_columns(const float* x, const W* wp, float* y, int64_t M, int64_t K, int64_t N, int64_t cols) {
  const int64_t groups = (M + kPanelRows - 1) / kPanelRows;
  for (int v0 = 0; v0 < kPanel / kLanes; v0 += 2) {
    for (int64_t g = 0, m = 0; g < groups; ++g) {
      const int64_t rows = (M - m) / (groups - g);
      panel_tile_rows<kPanelRows>(rows, x + m * K, K, wp, K, v0, y + m * N, N, cols, v0 == 0 && g == 0);
      m += rows;
    }
  }
}

template <typename W>
void rows_linear(ffi::ThreadPool& pool, const float* x, const W* w, float* y, int64_t M, int64_t K, int64_t N) {
  const int64_t panels = (N + kPanel - 1) / kPanel;
  // shared with helper tasks, which may start after this call has returned: owned jointly
  auto progress = std::make_shared<Progress>();
  auto work = [=]() {
    for (int64_t p; (p = progress->next.fetch_add(1, std::memory_order_relaxed)) < panels;) {
      const int64_t cols = N - p * kPanel < kPanel ? N - p * kPanel : kPanel;
      panel_columns(x, w + p * K * kRowElements<W>, y + p * kPanel, M, K, N, cols);
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  share(pool, progress, panels, M * K * N > kShareAbove, work);
}

ffi::Error RowsLinearImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                          ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2)
    return ffi::Error::InvalidArgument("RowsLinear: x [M, K], w [P, K, 32], y [M, N]");
  const int64_t M = xd[0], K = xd[1], N = yd[1];
  const int64_t row = w.element_type() == ffi::DataType::U32 ? 2 : kPanel;  // ternary: two words a panel row
  if (yd[0] != M || wd[1] != K || wd[2] != row || wd[0] != (N + kPanel - 1) / kPanel)
    return ffi::Error::InvalidArgument("RowsLinear: x [M, K], w [ceil(N / 32), K, 32 or 2] and y [M, N] disagree");
  switch (w.element_type()) {
    case ffi::DataType::F32:
      rows_linear(pool, x.typed_data(), static_cast<const float*>(w.untyped_data()), y->typed_data(), M, K, N);
      break;
    case ffi::DataType::BF16:
      rows_linear(pool, x.typed_data(), static_cast<const uint16_t*>(w.untyped_data()), y->typed_data(), M, K, N);
      break;
    case ffi::DataType::U32:
      rows_linear(pool, x.typed_data(), static_cast<const Ternary*>(w.untyped_data()), y->typed_data(), M, K, N);
      break;
    default:
      return ffi::Error::InvalidArgument("RowsLinear: w must be float32, bfloat16 or packed ternary (uint32)");
  }
  return ffi::Error::Success();
}

template <typename T>
void cache_attention(ffi::ThreadPool& pool, const float* qp, const T* kp, const T* vp, const bool* mp, float* op,
                     int64_t N, int64_t Q, int64_t D, int64_t C, int64_t S, int64_t G, int64_t live) {
  const float scale = 1.0f / std::sqrt(float(D));
  auto progress = std::make_shared<Progress>();
  auto work = [=]() {
    std::unique_ptr<float[]> buf(new float[live > 0 ? live : 1]);
    for (int64_t n; (n = progress->next.fetch_add(1, std::memory_order_relaxed)) < N;) {
      attend_unit(qp + n * Q * D, kp + n * C * D, vp + n * D * C, mp + (n / G) * S * C, op + n * Q * D, Q, S, C, D,
                  live, scale, buf.get());
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  share(pool, progress, N, 2 * N * Q * live * D > kShareAbove, work);
}

// ---- BlockAttention: many queries at once (the NAR's levels, a prefill) -------------------------
//
// Per unit (batch row, kv head): queries q [Q, D], keys transposed kT [D, C], values v [D, C]
// (the cache's layout), taken eight queries at a time. Scores are computed in the broadcast form
// (each query's element times a vector of 16 keys: no horizontal sums), masked, turned into
// probabilities in place, and multiplied by the values with the dot-product tiles (`columns`). A
// block stops at the last slot any of its queries may see, so a causal block skips the slots after it.
// XLA computed the same with separate passes over [Q, C] score and probability buffers (half preset
// NAR: ~9.6 ms per layer and level, ~0.8 s of 2.5 s).

constexpr int kBlockRows = 8;                         // queries per work item
constexpr int kScoreRows = kLanes == 16 ? 8 : 4;      // queries per score tile
constexpr int kScoreVecs = kLanes == 16 ? 3 : 2;      // key vectors per score tile

// s[i, c0 .. c0 + NV * kLanes) = q_i . k_c for MQ queries (rows of q, stride D); with Tail, one
// vector of which only the first `rem` keys exist.
template <int MQ, int NV, bool Tail, typename T>
void score_tile(const float* q, int64_t D, const T* kT, int64_t C, int64_t c0, int64_t rem, float* s, int64_t lds) {
  vf acc[MQ][NV];
  for (int i = 0; i < MQ; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = vzero();
  for (int64_t d = 0; d < D; ++d) {
    const T* row = kT + d * C + c0;
    vf kv[NV];
    for (int j = 0; j < NV; ++j) kv[j] = Tail ? vload_first(row, rem) : vload(row + j * kLanes);
    for (int i = 0; i < MQ; ++i) {
      const vf qi = vset(q[i * D + d]);
      for (int j = 0; j < NV; ++j) acc[i][j] = vfma(qi, kv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MQ; ++i)
    for (int j = 0; j < NV; ++j) vstore(s + i * lds + c0 + j * kLanes, acc[i][j]);
}

template <int MQ, typename T>
void score_rows(const float* q, int64_t D, const T* kT, int64_t C, int64_t hi, float* s, int64_t lds) {
  int64_t c = 0;
  for (; c + kScoreVecs * kLanes <= hi; c += kScoreVecs * kLanes) score_tile<MQ, kScoreVecs, false>(q, D, kT, C, c, 0, s, lds);
  for (; c + kLanes <= hi; c += kLanes) score_tile<MQ, 1, false>(q, D, kT, C, c, 0, s, lds);
  if (c < hi) score_tile<MQ, 1, true>(q, D, kT, C, c, hi - c, s, lds);
}

template <int MQ, typename T>
void score_rest(int64_t rows, const float* q, int64_t D, const T* kT, int64_t C, int64_t hi, float* s, int64_t lds) {
  if constexpr (MQ > 0) {
    if (rows == MQ) return score_rows<MQ>(q, D, kT, C, hi, s, lds);
    score_rest<MQ - 1>(rows, q, D, kT, C, hi, s, lds);
  }
}

// 1 + the last of the n mask bytes at m that is set (0: none)
inline int64_t visible_end(const bool* m, int64_t n) {
  while (n >= 32) {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + n - 32));
    const unsigned unset = unsigned(_mm256_movemask_epi8(_mm256_cmpeq_epi8(bytes, _mm256_setzero_si256())));
    if (unset != 0xFFFFFFFFu) return n - __builtin_clz(~unset);
    n -= 32;
  }
  while (n > 0 && !m[n - 1]) --n;
  return n;
}

// Scores s[0, hi) of one query -> unnormalised probabilities (masked slots exactly 0); returns
// 1 / their sum, or 0 when the mask allows no slot.
inline float softmax_row(float* s, const bool* m, int64_t hi, float scale) {
  const vf vscale = vset(scale);
  vf vtop = vset(-INFINITY);
  int64_t c = 0;
  for (; c + kLanes <= hi; c += kLanes) {
    const vf x = vkeep(vmul(vload(s + c), vscale), m + c);
    vstore(s + c, x);
    vtop = vmax(vtop, x);
  }
  float top = vhmax(vtop);
  for (; c < hi; ++c) {
    s[c] = m[c] ? s[c] * scale : -INFINITY;
    top = s[c] > top ? s[c] : top;
  }
  return top == -INFINITY ? 0.0f : 1.0f / exp_shifted(s, hi, top);
}

// Queries [q0, q0 + rows) of unit n. `buf` holds kBlockRows x lds floats.
template <typename T>
void attend_block(const float* q, const T* kT, const T* v, const bool* mask, float* out, int64_t Q, int64_t S,
                  int64_t C, int64_t D, int64_t live, int64_t q0, int64_t rows, float scale, float* buf,
                  int64_t lds) {
  const int64_t per_row = Q / S;
  int64_t hi = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t end = visible_end(mask + ((q0 + i) / per_row) * C, live);
    hi = end > hi ? end : hi;
  }
  float inv[kBlockRows];
  if (hi > 0) {
    int64_t i = 0;
    for (; i + kScoreRows <= rows; i += kScoreRows)
      score_rows<kScoreRows>(q + (q0 + i) * D, D, kT, C, hi, buf + i * lds, lds);
    score_rest<kScoreRows - 1>(rows - i, q + (q0 + i) * D, D, kT, C, hi, buf + i * lds, lds);
    for (i = 0; i < rows; ++i) inv[i] = softmax_row(buf + i * lds, mask + ((q0 + i) / per_row) * C, hi, scale);
    columns(Product<T>{buf, lds, v, C, out + q0 * D, D, hi}, rows, 0, D);
  } else {
    for (int64_t i = 0; i < rows; ++i) inv[i] = 0.0f;
  }
  for (int64_t i = 0; i < rows; ++i) {
    float* o = out + (q0 + i) * D;
    if (inv[i] == 0.0f) {
      uniform_over_slots(v, C, D, o);
      continue;
    }
    for (int64_t d = 0; d < D; ++d) o[d] *= inv[i];
  }
}

template <typename T>
void block_attention(ffi::ThreadPool& pool, const float* qp, const T* kp, const T* vp, const bool* mp, float* op,
                     int64_t N, int64_t Q, int64_t D, int64_t C, int64_t S, int64_t G, int64_t live) {
  const float scale = 1.0f / std::sqrt(float(D));
  const int64_t blocks = (Q + kBlockRows - 1) / kBlockRows;
  const int64_t lds = (live + kLanes - 1) / kLanes * kLanes;
  auto progress = std::make_shared<Progress>();
  auto work = [=]() {
    std::unique_ptr<float[]> buf(new float[kBlockRows * (lds > 0 ? lds : 1)]);
    for (int64_t item; (item = progress->next.fetch_add(1, std::memory_order_relaxed)) < N * blocks;) {
      const int64_t n = item / blocks, q0 = (item % blocks) * kBlockRows;
      const int64_t rows = Q - q0 < kBlockRows ? Q - q0 : kBlockRows;
      attend_block(qp + n * Q * D, kp + n * D * C, vp + n * D * C, mp + (n / G) * S * C, op + n * Q * D, Q, S, C, D,
                   live, q0, rows, scale, buf.get(), lds);
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  share(pool, progress, N * blocks, 2 * N * Q * live * D > kShareAbove, work);
}

// Checks shared by both attention kernels: q [N, Q, D], k [N, C, D] (`keys_transposed`: [N, D, C]),
// v [N, D, C], mask [B, S, C], live []; fills the sizes.
ffi::Error attention_shapes(const char* name, ffi::Buffer<ffi::F32>& q, ffi::AnyBuffer& k, ffi::AnyBuffer& v,
                            ffi::Buffer<ffi::PRED>& mask, ffi::Buffer<ffi::S32>& live_buf, bool keys_transposed,
                            int64_t* N, int64_t* Q, int64_t* D, int64_t* C, int64_t* S, int64_t* G, int64_t* live) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = mask.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || vd.size() != 3 || md.size() != 3 || live_buf.element_count() != 1)
    return ffi::Error::InvalidArgument(std::string(name) + ": q [N, Q, D], k, v [N, D, C], mask [B, S, C], live []");
  *N = qd[0], *Q = qd[1], *D = qd[2], *C = vd[2], *S = md[1];
  const int64_t B = md[0];
  const bool k_ok = keys_transposed ? (kd[1] == *D && kd[2] == *C) : (kd[1] == *C && kd[2] == *D);
  if (kd[0] != *N || !k_ok || vd[0] != *N || vd[1] != *D || md[2] != *C || B == 0 || *N % B || *S == 0 || *Q % *S)
    return ffi::Error::InvalidArgument(std::string(name) + ": operand shapes disagree");
  if (k.element_type() != v.element_type())
    return ffi::Error::InvalidArgument(std::string(name) + ": keys and values differ in dtype");
  const int64_t l = live_buf.typed_data()[0];
  *live = l < 0 ? 0 : l > *C ? *C : l;
  *G = *N / B;
  return ffi::Error::Success();
}

// Calls run(T{}) with T the type the keys and values are read as (bfloat16 and its bits: uint16).
template <typename Run>
ffi::Error by_kv_type(const char* name, ffi::DataType type, Run run) {
  switch (type) {
    case ffi::DataType::F32: run(float{}); return ffi::Error::Success();
    case ffi::DataType::BF16:
    case ffi::DataType::U16:  // bfloat16 bits (a cache held as uint16: valle_jax/models/layers.py)
      run(uint16_t{});
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument(std::string(name) +
                                         ": keys and values must be float32 or bfloat16 (or its bits)");
  }
}

// Both attention kernels: BlockAttention reads the keys transposed.
template <bool KeysTransposed>
ffi::Error AttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                         ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::S32> live_buf, ffi::ResultBuffer<ffi::F32> out) {
  const char* name = KeysTransposed ? "BlockAttention" : "CacheAttention";
  int64_t N, Q, D, C, S, G, live;
  ffi::Error shapes = attention_shapes(name, q, k, v, mask, live_buf, KeysTransposed, &N, &Q, &D, &C, &S, &G, &live);
  if (shapes.failure()) return shapes;
  return by_kv_type(name, k.element_type(), [&](auto type) {
    using T = decltype(type);
    const auto run = KeysTransposed ? block_attention<T> : cache_attention<T>;
    run(pool, q.typed_data(), static_cast<const T*>(k.untyped_data()), static_cast<const T*>(v.untyped_data()),
        mask.typed_data(), out->typed_data(), N, Q, D, C, S, G, live);
  });
}

}  // namespace

// q, k, v, mask, live -> out
#define VALLE_ATTENTION_BINDING                                                                            \
  ffi::Ffi::Bind()                                                                                         \
      .Ctx<ffi::ThreadPool>()                                                                              \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                        \
      .Arg<ffi::AnyBuffer>()                                                                               \
      .Arg<ffi::AnyBuffer>()                                                                               \
      .Arg<ffi::Buffer<ffi::PRED>>()                                                                       \
      .Arg<ffi::Buffer<ffi::S32>>()                                                                        \
      .Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(ValleCacheAttention, AttentionImpl<false>, VALLE_ATTENTION_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ValleBlockAttention, AttentionImpl<true>, VALLE_ATTENTION_BINDING);

XLA_FFI_DEFINE_HANDLER_SYMBOL(ValleRowsLinear, RowsLinearImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
