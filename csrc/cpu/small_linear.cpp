// Small-batch linear layer on the CPU: see csrc/include/flamingo_rt/small_linear.h.
//
// OpenMP over blocks of output features; each weight row is read once, against all B rows
// of x (pairs of weight rows against groups of four x rows; for B = 1 four weight rows at a
// time). The rows taken together come from different parts of a thread's block (row i of
// each half, or of each quarter), so the block is read as two or four long sequential
// streams, which the hardware prefetchers follow; adjacent rows taken together (a stream
// that restarts every few KB) ran at half the memory bandwidth or less.
// The dot products are `omp simd` reductions in float32 (float64 for float64), compiled per
// ISA level with target_clones (AVX-512 / AVX2 / baseline) and picked at load time. bfloat16
// weights are widened on the fly (a shift), x is widened once into a float32 scratch; a
// bfloat16 weight against float32 x (`bf16_weight`) takes the same bfloat16 row kernels.
// Their float32 sums are those of the float32 kernels on the widened weight where the
// compiler vectorizes both loops alike (AVX-512: bit for bit); on AVX2 it vectorizes them
// differently and the last bits may differ. Widening rows into a scratch for the float32
// kernels instead made them equal but 2-3x slower at one row (2048 x 8192 on an AVX2 Zen 3:
// 2.0 against 0.86 ms): not taken.
//
// bfloat16 x against bfloat16 weights on CPUs with AVX512_BF16 take vdpbf16ps instead
// (DpDots below): 32 products a vector instruction, no widening, float32 accumulation (each
// product is exact in float32 and added with one rounding, as an FMA; subnormal inputs and
// sums flush to zero). The float32-FMA kernels above widened every weight element and ran at
// half the multiply rate: from two rows on they were compute bound and slower than oneDNN's
// GEMM (4096 x 1024 weight, 2-core Zen 4: 16 rows 1526 us against F.linear's 557, 2 rows 402
// against 262).
#include <vector>

#include "cpu_isa.h"
#include "cpu_math.h"
#include "flamingo_rt/kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace flamingo_rt {
using namespace cpu;  // element types and scalar math: cpu_math.h
namespace {

// The float32 / bfloat16 dot products, several at once: a single `omp simd` reduction is one
// chain of dependent FMAs (4 cycles each on Zen 4 / Skylake), so one dot product at a time ran
// at the FMA latency, not at the memory bandwidth (a 768 x 1536 float32 weight against 4 rows
// took 164 us hot, 273 us cold: 17-29 GB/s). Two weight rows against four x rows (eight
// independent chains, six loads per eight FMAs), or four weight rows against one x
// row (B = 1, the decode step), keep the FMA units busy and read each weight row once.

// Widening of a weight element: float32 as is, bfloat16 by a shift.
FRT_INLINE float widen(float v) { return v; }
FRT_INLINE float widen(uint16_t v) { return BF16::load(v); }

// s[r * 4 + c] = w_r . x_c for weight rows w0, w1 and x rows x0..x3 (length K).
#define FRT_DOT_2X4(NAME, WT)                                                                      \
  FRT_CLONES void NAME(const WT* w0, const WT* w1, const float* x0, const float* x1, const float* x2, \
                       const float* x3, int64_t K, float* s) {                                     \
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f, b0 = 0.f, b1 = 0.f, b2 = 0.f, b3 = 0.f;           \
    _Pragma("omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)")                              \
    for (int64_t k = 0; k < K; ++k) {                                                              \
      const float u = widen(w0[k]), v = widen(w1[k]);                                              \
      const float p0 = x0[k], p1 = x1[k], p2 = x2[k], p3 = x3[k];                                  \
      a0 += u * p0; a1 += u * p1; a2 += u * p2; a3 += u * p3;                                      \
      b0 += v * p0; b1 += v * p1; b2 += v * p2; b3 += v * p3;                                      \
    }                                                                                              \
    s[0] = a0; s[1] = a1; s[2] = a2; s[3] = a3; s[4] = b0; s[5] = b1; s[6] = b2; s[7] = b3;        \
  }

// s[r] = w_r . x for weight rows w0..w3 and one x row (length K).
#define FRT_DOT_4X1(NAME, WT)                                                                      \
  FRT_CLONES void NAME(const WT* w0, const WT* w1, const WT* w2, const WT* w3, const float* x, int64_t K, \
                       float* s) {                                                                 \
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;                                                  \
    _Pragma("omp simd reduction(+ : a0, a1, a2, a3)")                                              \
    for (int64_t k = 0; k < K; ++k) {                                                              \
      const float p = x[k];                                                                        \
      a0 += widen(w0[k]) * p; a1 += widen(w1[k]) * p; a2 += widen(w2[k]) * p; a3 += widen(w3[k]) * p; \
    }                                                                                              \
    s[0] = a0; s[1] = a1; s[2] = a2; s[3] = a3;                                                    \
  }

FRT_DOT_4X1(dot_4x1_f32, float)
FRT_DOT_4X1(dot_4x1_bf16, uint16_t)
FRT_DOT_2X4(dot_2x4_f32, float)
FRT_DOT_2X4(dot_2x4_bf16, uint16_t)

// The row kernels by element type: float32 or bfloat16 weights against float32 x (FMA).
struct FmaDots {
  template <typename WT>
  static void d4x1(const WT* w0, const WT* w1, const WT* w2, const WT* w3, const float* x, int64_t K, float* s) {
    if constexpr (sizeof(WT) == 4) {
      dot_4x1_f32(w0, w1, w2, w3, x, K, s);
    } else {
      dot_4x1_bf16(w0, w1, w2, w3, x, K, s);
    }
  }
  template <typename WT>
  static void d2x4(const WT* w0, const WT* w1, const float* x0, const float* x1, const float* x2, const float* x3,
                   int64_t K, float* s) {
    if constexpr (sizeof(WT) == 4) {
      dot_2x4_f32(w0, w1, x0, x1, x2, x3, K, s);
    } else {
      dot_2x4_bf16(w0, w1, x0, x1, x2, x3, K, s);
    }
  }
};

#ifdef FRT_X86_ISA
// bfloat16 weights against bfloat16 x by vdpbf16ps: lane i of an accumulator sums the
// products of elements 2i and 2i + 1 of every 32-element block (a tail block zero-filled),
// the 16 lanes summed at the end (_mm512_reduce_add_ps's fixed tree).
struct DpDots {
  // 32 elements from p (those of the mask m; the rest zero)
  FRT_TARGET_AVX512BF16 static inline __attribute__((always_inline)) __m512bh load(const uint16_t* p, __mmask32 m) {
    return (__m512bh)_mm512_maskz_loadu_epi16(m, p);
  }

  // the mask of the block at k: all 32 elements, or the K - k of a tail
  static inline __mmask32 block_mask(int64_t K, int64_t k) {
    return K - k >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1ull << (K - k)) - 1ull);
  }

  FRT_TARGET_AVX512BF16 static void d4x1(const uint16_t* w0, const uint16_t* w1, const uint16_t* w2,
                                         const uint16_t* w3, const uint16_t* x, int64_t K, float* s) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K; k += 32) {
      const __mmask32 m = block_mask(K, k);
      const __m512bh p = load(x + k, m);
      a0 = _mm512_dpbf16_ps(a0, load(w0 + k, m), p);
      a1 = _mm512_dpbf16_ps(a1, load(w1 + k, m), p);
      a2 = _mm512_dpbf16_ps(a2, load(w2 + k, m), p);
      a3 = _mm512_dpbf16_ps(a3, load(w3 + k, m), p);
    }
    s[0] = _mm512_reduce_add_ps(a0);
    s[1] = _mm512_reduce_add_ps(a1);
    s[2] = _mm512_reduce_add_ps(a2);
    s[3] = _mm512_reduce_add_ps(a3);
  }

  FRT_TARGET_AVX512BF16 static void d2x4(const uint16_t* w0, const uint16_t* w1, const uint16_t* x0,
                                         const uint16_t* x1, const uint16_t* x2, const uint16_t* x3, int64_t K,
                                         float* s) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int64_t k = 0; k < K; k += 32) {
      const __mmask32 m = block_mask(K, k);
      const __m512bh u = load(w0 + k, m), v = load(w1 + k, m);
      const __m512bh p0 = load(x0 + k, m), p1 = load(x1 + k, m), p2 = load(x2 + k, m), p3 = load(x3 + k, m);
      a0 = _mm512_dpbf16_ps(a0, u, p0); a1 = _mm512_dpbf16_ps(a1, u, p1);
      a2 = _mm512_dpbf16_ps(a2, u, p2); a3 = _mm512_dpbf16_ps(a3, u, p3);
      b0 = _mm512_dpbf16_ps(b0, v, p0); b1 = _mm512_dpbf16_ps(b1, v, p1);
      b2 = _mm512_dpbf16_ps(b2, v, p2); b3 = _mm512_dpbf16_ps(b3, v, p3);
    }
    s[0] = _mm512_reduce_add_ps(a0); s[1] = _mm512_reduce_add_ps(a1);
    s[2] = _mm512_reduce_add_ps(a2); s[3] = _mm512_reduce_add_ps(a3);
    s[4] = _mm512_reduce_add_ps(b0); s[5] = _mm512_reduce_add_ps(b1);
    s[6] = _mm512_reduce_add_ps(b2); s[7] = _mm512_reduce_add_ps(b3);
  }
};
#endif

// y[b, n] = store(x_b . w_n + bias_n) for the weight rows of one task, [n0, n1): with B = 1,
// row i of each quarter of the rows together; else row i of each half against groups of four
// x rows. Missing rows of a group repeat the last real one (their results are dropped), so
// every size takes the same kernels. Each y element is one dot product summed in one fixed
// order: the result does not depend on the threads or on the task split.
template <typename Dots, typename WT, typename XT, typename Store>
void rows_task(const WT* w, int64_t ws, const XT* x, int64_t xs, int64_t B, int64_t K, int64_t n0, int64_t n1,
               const float* bias, Store store) {
  float s[8];
  if (B == 1) {
    const int64_t q = (n1 - n0 + 3) / 4;
    for (int64_t i = 0; i < q; ++i) {
      int64_t rows[4];
      for (int64_t j = 0; j < 4; ++j) rows[j] = n0 + j * q + i;
      int64_t r = 4;
      while (rows[r - 1] >= n1) --r;  // the last quarter may run out (rows[0] < n1 always)
      const WT* wr[4];
      for (int64_t j = 0; j < 4; ++j) wr[j] = w + rows[j < r ? j : r - 1] * ws;
      Dots::d4x1(wr[0], wr[1], wr[2], wr[3], x, K, s);
      for (int64_t j = 0; j < r; ++j) store(0, rows[j], s[j] + (bias ? bias[rows[j]] : 0.f));
    }
    return;
  }
  const int64_t h = (n1 - n0 + 1) / 2;
  for (int64_t i = 0; i < h; ++i) {
    const int64_t rows[2] = {n0 + i, n0 + h + i};
    const int64_t r = rows[1] < n1 ? 2 : 1;
    const WT* w0 = w + rows[0] * ws;
    const WT* w1 = w + rows[r - 1] * ws;
    for (int64_t b = 0; b < B; b += 4) {
      const int64_t c = B - b < 4 ? B - b : 4;
      const XT* xr[4];
      for (int64_t k = 0; k < 4; ++k) xr[k] = x + (b + (k < c ? k : c - 1)) * xs;
      Dots::d2x4(w0, w1, xr[0], xr[1], xr[2], xr[3], K, s);
      for (int64_t j = 0; j < r; ++j)
        for (int64_t k = 0; k < c; ++k) store(b + k, rows[j], s[j * 4 + k] + (bias ? bias[rows[j]] : 0.f));
    }
  }
}

void rows_f64(const double* w, const double* x, int64_t xs, int64_t B, int64_t K, double* acc) {
  for (int64_t b = 0; b < B; ++b) {
    const double* xb = x + b * xs;
    double s = 0.0;
    for (int64_t k = 0; k < K; ++k) s += w[k] * xb[k];
    acc[b] = s;
  }
}

// Threads only when there is enough weight to stream (a few hundred KB per thread).
int threads_for(int64_t N, int64_t K, int64_t elt) {
  const int64_t bytes = N * K * elt;
#ifdef _OPENMP
  const int max_t = omp_get_max_threads();
#else
  const int max_t = 1;
#endif
  const int64_t want = bytes / (256 * 1024);
  return static_cast<int>(want < 1 ? 1 : (want < max_t ? want : max_t));
}

// Runs f(n0, n1) over contiguous blocks of the N weight rows, one block per thread, block
// edges on multiples of 4 rows (the kernels' row groups).
template <typename F>
void for_row_tasks(int64_t N, int threads, F f) {
  const int64_t groups = (N + 3) / 4;
#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
#else
    const int64_t t = 0, T = 1;
#endif
    const int64_t g0 = groups * t / T, g1 = groups * (t + 1) / T;
    const int64_t n0 = g0 * 4, n1 = g1 * 4 < N ? g1 * 4 : N;
    if (n0 < n1) f(n0, n1);
  }
}

}  // namespace

Status small_linear_cpu(const SmallLinearParams& p) {
  if (p.bf16_weight && p.dtype != DType::kFloat32) return Status::kUnsupportedDtype;
  if (!p.x || !p.w || !p.y || p.B < 0 || p.K < 0 || p.N < 0 || p.B > kSmallLinearMaxRows ||
      p.x_row_stride < p.K || p.w_row_stride < p.K)
    return Status::kInvalidArgument;
  if (p.B == 0 || p.N == 0) return Status::kOk;
  const int64_t B = p.B, K = p.K, N = p.N;
  switch (p.dtype) {
    case DType::kFloat32: {
      const float* x = static_cast<const float*>(p.x);
      const float* bias = static_cast<const float*>(p.bias);
      float* y = static_cast<float*>(p.y);
      if (p.bf16_weight) {  // float32 x against bfloat16 weight rows, widened as they are read
        const uint16_t* w = static_cast<const uint16_t*>(p.w);
        for_row_tasks(N, threads_for(N, K, 2), [&](int64_t n0, int64_t n1) {
          rows_task<FmaDots>(w, p.w_row_stride, x, p.x_row_stride, B, K, n0, n1, bias,
                    [&](int64_t b, int64_t n, float v) { y[b * N + n] = v; });
        });
        return Status::kOk;
      }
      const float* w = static_cast<const float*>(p.w);
      for_row_tasks(N, threads_for(N, K, 4), [&](int64_t n0, int64_t n1) {
        rows_task<FmaDots>(w, p.w_row_stride, x, p.x_row_stride, B, K, n0, n1, bias,
                  [&](int64_t b, int64_t n, float v) { y[b * N + n] = v; });
      });
      return Status::kOk;
    }
    case DType::kBFloat16: {
      const uint16_t* x16 = static_cast<const uint16_t*>(p.x);
      const uint16_t* w = static_cast<const uint16_t*>(p.w);
      const uint16_t* bias = static_cast<const uint16_t*>(p.bias);
      uint16_t* y = static_cast<uint16_t*>(p.y);
      std::vector<float> bf(bias ? static_cast<size_t>(N) : 0);
      for (int64_t n = 0; n < static_cast<int64_t>(bf.size()); ++n) bf[n] = BF16::load(bias[n]);
#ifdef FRT_X86_ISA
      if (isa::avx512_bf16()) {
        for_row_tasks(N, threads_for(N, K, 2), [&](int64_t n0, int64_t n1) {
          rows_task<DpDots>(w, p.w_row_stride, x16, p.x_row_stride, B, K, n0, n1, bias ? bf.data() : nullptr,
                            [&](int64_t b, int64_t n, float v) { y[b * N + n] = BF16::store(v); });
        });
        return Status::kOk;
      }
#endif
      std::vector<float> xf(static_cast<size_t>(B * K));
      for (int64_t b = 0; b < B; ++b)
        for (int64_t k = 0; k < K; ++k) xf[b * K + k] = BF16::load(x16[b * p.x_row_stride + k]);
      for_row_tasks(N, threads_for(N, K, 2), [&](int64_t n0, int64_t n1) {
        rows_task<FmaDots>(w, p.w_row_stride, xf.data(), K, B, K, n0, n1, bias ? bf.data() : nullptr,
                  [&](int64_t b, int64_t n, float v) { y[b * N + n] = BF16::store(v); });
      });
      return Status::kOk;
    }
    case DType::kFloat64: {
      const double* x = static_cast<const double*>(p.x);
      const double* w = static_cast<const double*>(p.w);
      const double* bias = static_cast<const double*>(p.bias);
      double* y = static_cast<double*>(p.y);
#pragma omp parallel for schedule(static) num_threads(threads_for(N, K, 8))
      for (int64_t n = 0; n < N; ++n) {
        double acc[kSmallLinearMaxRows];
        rows_f64(w + n * p.w_row_stride, x, p.x_row_stride, B, K, acc);
        const double bn = bias ? bias[n] : 0.0;
        for (int64_t b = 0; b < B; ++b) y[b * N + n] = acc[b] + bn;
      }
      return Status::kOk;
    }
    default:
      return Status::kUnsupportedDtype;
  }
}

}  // namespace flamingo_rt
