// CPU kernels for decoding steps, called from XLA through its FFI (valle_jax/kernels/__init__.py).
//
// RowsLinear: y[M, N] = x[M, K] @ w[N, K]^T for the few rows of a decoding step (M = batch size),
// with x and y float32 and w float32 or bfloat16 (widened in registers, never in memory).
//
// Why by hand: at a decoding step every weight is read once per step, so the step is a stream over
// the weights. XLA's CPU dot reads float32 weights near the memory bandwidth at one row, but runs an
// 8-row product at ~45 GFLOP/s, and it has no fast bfloat16 dot at all (a bf16 x bf16 -> f32
// matrix-vector product is ~10x slower than float32 there): bf16 weights, which halve the bytes to
// stream, were slower, not faster. Here the weights are rows of length K (the transposed layout, as
// in torch.nn.Linear), read front to back; each output is a dot product accumulated in 8-wide
// registers, MR rows of x by NR rows of w at a time, and the rows of the next panel of w are
// prefetched while this one is computed (the hardware prefetcher alone does not run far enough
// ahead of a loop this busy). Columns of y are shared between the calling thread and XLA's
// intra-op thread pool in chunks taken from an atomic counter, so a helper that starts late, or
// never, only means the caller does more of the chunks itself.
//
// Requires AVX2 and FMA (the Python side checks the CPU before loading this library).
#include <immintrin.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const uint16_t* p) {  // 8 bfloat16 -> 8 float32: the bits, shifted up
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline float widen(float v) { return v; }

inline float widen(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// y[m0 .. m0+MR, n0 .. n0+NR]: MR x NR accumulators (at most 12 of the 16 registers).
template <int MR, int NR, typename W>
void tile(const float* x, const W* w, float* y, int64_t K, int64_t N, int64_t m0, int64_t n0) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  const W* wr[NR];
  const float* xr[MR];
  for (int j = 0; j < NR; ++j) wr[j] = w + (n0 + j) * K;
  for (int i = 0; i < MR; ++i) xr[i] = x + (m0 + i) * K;
  const char* next = reinterpret_cast<const char*>(w + (n0 + NR) * K);  // prefetching never faults
  constexpr int64_t per_line = 64 / sizeof(W);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if (k % per_line == 0)
      for (int j = 0; j < NR; ++j) _mm_prefetch(next + (j * K + k) * int64_t(sizeof(W)), _MM_HINT_T0);
    __m256 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = load8(wr[j] + k);
    for (int i = 0; i < MR; ++i) {
      __m256 xv = _mm256_loadu_ps(xr[i] + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float s = hsum(acc[i][j]);
      for (int64_t kk = k; kk < K; ++kk) s += xr[i][kk] * widen(wr[j][kk]);
      y[(m0 + i) * N + n0 + j] = s;
    }
}

// Rows of w per tile for MR rows of x: as many independent accumulators as the registers allow,
// since one row of x alone is a chain of dependent FMAs per accumulator.
template <int MR>
constexpr int tile_width() { return MR == 1 ? 8 : MR == 2 ? 6 : MR == 3 ? 4 : 3; }

template <int MR, typename W>
void row_group(const float* x, const W* w, float* y, int64_t K, int64_t N, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int NR = tile_width<MR>();
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) tile<MR, NR>(x, w, y, K, N, m0, n);
  for (; n < n1; ++n) tile<MR, 1>(x, w, y, K, N, m0, n);
}

// Columns [n0, n1) of y for every row of x, four rows at a time (the panel of w stays in L1/L2
// between row groups, so memory sees it once).
template <typename W>
void columns(const float* x, const W* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) row_group<4>(x, w, y, K, N, m, n0, n1);
  switch (M - m) {
    case 3: row_group<3>(x, w, y, K, N, m, n0, n1); break;
    case 2: row_group<2>(x, w, y, K, N, m, n0, n1); break;
    case 1: row_group<1>(x, w, y, K, N, m, n0, n1); break;
    default: break;
  }
}

struct Progress {
  std::atomic<int64_t> next{0};  // the next chunk to take
  std::atomic<int64_t> done{0};  // chunks finished
};

constexpr int64_t kChunk = 48;  // columns per chunk: a multiple of every tile width (8, 6, 4, 3)

template <typename W>
void rows_linear(ffi::ThreadPool& pool, const float* x, const W* w, float* y, int64_t M, int64_t K, int64_t N) {
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  // shared with helper tasks, which may start after this call has returned: owned jointly
  auto progress = std::make_shared<Progress>();
  auto work = [=]() {
    for (int64_t c; (c = progress->next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      const int64_t n0 = c * kChunk, n1 = n0 + kChunk < N ? n0 + kChunk : N;
      columns(x, w, y, M, K, N, n0, n1);
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = pool.num_threads();
  if (helpers > chunks - 1) helpers = chunks - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work]() { work(); });
  work();
  while (progress->done.load(std::memory_order_acquire) < chunks) _mm_pause();  // chunks still in a helper's hands
}

ffi::Error RowsLinearImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                          ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2) return ffi::Error::InvalidArgument("RowsLinear: x and w must be 2-D");
  const int64_t M = xd[0], K = xd[1], N = wd[0];
  if (wd[1] != K) return ffi::Error::InvalidArgument("RowsLinear: x [M, K] and w [N, K] differ in K");
  switch (w.element_type()) {
    case ffi::DataType::F32:
      rows_linear(pool, x.typed_data(), static_cast<const float*>(w.untyped_data()), y->typed_data(), M, K, N);
      break;
    case ffi::DataType::BF16:
      rows_linear(pool, x.typed_data(), static_cast<const uint16_t*>(w.untyped_data()), y->typed_data(), M, K, N);
      break;
    default:
      return ffi::Error::InvalidArgument("RowsLinear: w must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ValleRowsLinear, RowsLinearImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
