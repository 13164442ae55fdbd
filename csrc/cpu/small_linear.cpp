// Small-batch linear layer on the CPU: see csrc/include/flamingo_rt/small_linear.h.
//
// OpenMP over blocks of output features; for each weight row, B dot products of length K
// while the row is in L1/L2, so the weights stream from memory once. The dot products are
// `omp simd` reductions in float32 (float64 for float64), compiled per ISA level with
// target_clones (AVX-512 / AVX2 / baseline) and picked at load time. bfloat16 weights are
// widened on the fly (a shift), x is widened once into a float32 scratch.
#include <vector>

#include "cpu_math.h"
#include "flamingo_rt/kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace flamingo_rt {
using namespace cpu;  // element types and scalar math: cpu_math.h
namespace {

// One weight row (float32) against B float32 rows of x.
FRT_CLONES void rows_f32(const float* w, const float* x, int64_t xs, int64_t B, int64_t K, float* acc) {
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x + b * xs;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < K; ++k) s += w[k] * xb[k];
    acc[b] = s;
  }
}

// One bfloat16 weight row against B float32 rows of x (x already widened).
FRT_CLONES void rows_bf16(const uint16_t* w, const float* x, int64_t xs, int64_t B, int64_t K, float* acc) {
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x + b * xs;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < K; ++k) s += BF16::load(w[k]) * xb[k];
    acc[b] = s;
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

}  // namespace

Status small_linear_cpu(const SmallLinearParams& p) {
  if (!p.x || !p.w || !p.y || p.B < 0 || p.K < 0 || p.N < 0 || p.B > kSmallLinearMaxRows ||
      p.x_row_stride < p.K || p.w_row_stride < p.K)
    return Status::kInvalidArgument;
  if (p.B == 0 || p.N == 0) return Status::kOk;
  const int64_t B = p.B, K = p.K, N = p.N;
  switch (p.dtype) {
    case DType::kFloat32: {
      const float* x = static_cast<const float*>(p.x);
      const float* w = static_cast<const float*>(p.w);
      const float* bias = static_cast<const float*>(p.bias);
      float* y = static_cast<float*>(p.y);
#pragma omp parallel for schedule(static) num_threads(threads_for(N, K, 4))
      for (int64_t n = 0; n < N; ++n) {
        float acc[kSmallLinearMaxRows];
        rows_f32(w + n * p.w_row_stride, x, p.x_row_stride, B, K, acc);
        const float bn = bias ? bias[n] : 0.f;
        for (int64_t b = 0; b < B; ++b) y[b * N + n] = acc[b] + bn;
      }
      return Status::kOk;
    }
    case DType::kBFloat16: {
      const uint16_t* x16 = static_cast<const uint16_t*>(p.x);
      const uint16_t* w = static_cast<const uint16_t*>(p.w);
      const uint16_t* bias = static_cast<const uint16_t*>(p.bias);
      uint16_t* y = static_cast<uint16_t*>(p.y);
      std::vector<float> xf(static_cast<size_t>(B * K));
      for (int64_t b = 0; b < B; ++b)
        for (int64_t k = 0; k < K; ++k) xf[b * K + k] = BF16::load(x16[b * p.x_row_stride + k]);
#pragma omp parallel for schedule(static) num_threads(threads_for(N, K, 2))
      for (int64_t n = 0; n < N; ++n) {
        float acc[kSmallLinearMaxRows];
        rows_bf16(w + n * p.w_row_stride, xf.data(), K, B, K, acc);
        const float bn = bias ? BF16::load(bias[n]) : 0.f;
        for (int64_t b = 0; b < B; ++b) y[b * N + n] = BF16::store(acc[b] + bn);
      }
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
