// CPU kernels for scaled weight standardization and its backward (csrc/include/flamingo_rt/nfnet.h).
//
// One task per output channel (row), spread over OpenMP threads. Each row is read in
// its storage type and every sum is accumulated in float64 (vectorized, in a fixed order),
// so the result is deterministic and more accurate than the float32 reference; the
// per-element loops are written so that the compiler vectorizes them (FRT_CLONES: AVX-512 /
// AVX2 / baseline picked at run time). Weights are small (a few MB for an F6 layer): the
// forward makes three passes over a row (mean, variance, output), the backward two.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu_math.h"
#include "flamingo_rt/kernels.h"
#include "flamingo_rt/nfnet.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace flamingo_rt {

#ifndef FLAMINGO_RT_WITH_CUDA
Status ws_standardize_cuda(const WsStandardizeParams&) { return Status::kNotCompiled; }
Status se_residual_cuda(const SeResidualParams&) { return Status::kNotCompiled; }
#endif

namespace {

using namespace cpu;

// mean and rstd of one row (float64).
template <class L>
FRT_INLINE void row_stats(const typename L::T* w, int64_t n, double eps, double& mean,
                          double& rstd) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += double(L::load(w[k]));
  mean = s / double(n);
  double v = 0.0;
#pragma omp simd reduction(+ : v)
  for (int64_t k = 0; k < n; ++k) {
    const double d = double(L::load(w[k])) - mean;
    v += d * d;
  }
  rstd = 1.0 / std::sqrt(v / double(n) + eps);
}

// LO: the output's storage (L's own, or BF16 beside a float32 weight: out_bfloat16).
template <class L, class LO = L>
FRT_INLINE void fwd_rows(const WsStandardizeParams& p, int64_t r0, int64_t r1) {
  using T = typename L::T;
  const T* W = static_cast<const T*>(p.weight);
  const T* G = static_cast<const T*>(p.gain);
  typename LO::T* O = static_cast<typename LO::T*>(p.out);
  const int64_t n = p.fan_in;
  const double inv_sqrt_fan = 1.0 / std::sqrt(double(n));
  for (int64_t o = r0; o < r1; ++o) {
    const T* w = W + o * p.weight_row_stride;
    typename LO::T* out = O + o * p.out_row_stride;
    double mean, rstd;
    row_stats<L>(w, n, p.eps, mean, rstd);
    const double a = rstd * double(L::load(G[o * p.gain_stride])) * inv_sqrt_fan;
    using Acc = typename L::Acc;
    const Acc af = Acc(a), bf = Acc(-mean * a);
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) out[k] = LO::store(Acc(L::load(w[k])) * af + bf);
  }
}

// Backward of one row in two passes: one over (w, grad_out) for four float64 sums (sum w,
// sum w^2, sum go, sum go*w; the variance as E[w^2] - mean^2 is exact to ~1e-16 relative in
// float64 for any weight whose |mean| is not ~1e8 times its spread), then one that writes
//   dw = rstd * s * (go - mean(go) - xhat * mean(go * xhat))
// in the storage type's accumulation type (float for float32 / bfloat16).
// LG: grad_out's storage (L's own, or BF16 beside a float32 weight: grad_out_bfloat16).
template <class L, class LG = L>
FRT_INLINE void bwd_rows(const WsStandardizeBackwardParams& p, int64_t r0, int64_t r1) {
  using T = typename L::T;
  using Acc = typename L::Acc;
  const T* W = static_cast<const T*>(p.weight);
  const T* G = static_cast<const T*>(p.gain);
  const typename LG::T* GO = static_cast<const typename LG::T*>(p.grad_out);
  T* DW = static_cast<T*>(p.grad_weight);
  T* DG = static_cast<T*>(p.grad_gain);
  const int64_t n = p.fan_in;
  const double inv_n = 1.0 / double(n), inv_sqrt_fan = 1.0 / std::sqrt(double(n));
  for (int64_t o = r0; o < r1; ++o) {
    const T* w = W + o * p.weight_row_stride;
    const typename LG::T* go = GO + o * p.grad_out_row_stride;
    T* dw = DW + o * p.grad_weight_row_stride;
    double s1 = 0.0, s2 = 0.0, sg = 0.0, sgw = 0.0;
#pragma omp simd reduction(+ : s1, s2, sg, sgw)
    for (int64_t k = 0; k < n; ++k) {
      const double wk = double(L::load(w[k])), gk = double(LG::load(go[k]));
      s1 += wk;
      s2 += wk * wk;
      sg += gk;
      sgw += gk * wk;
    }
    const double mean = s1 * inv_n;
    const double var = std::max(s2 * inv_n - mean * mean, 0.0);
    const double rstd = 1.0 / std::sqrt(var + p.eps);
    const double sgx = rstd * (sgw - mean * sg);  // sum(grad_out * xhat)
    DG[o * p.grad_gain_stride] = L::store(Acc(sgx * inv_sqrt_fan));
    const double c0 = rstd * double(L::load(G[o * p.gain_stride])) * inv_sqrt_fan;
    const double mg = sg * inv_n, mgx = sgx * inv_n;
    // dw = c0 (go - mg) - c0 mgx rstd (w - mean)
    const Acc a = Acc(c0), am = Acc(c0 * mg), b = Acc(c0 * mgx * rstd), mf = Acc(mean);
#pragma omp simd
    for (int64_t k = 0; k < n; ++k)
      dw[k] = L::store(a * Acc(LG::load(go[k])) - am - b * (Acc(L::load(w[k])) - mf));
  }
}

// The per-row loops are compiled once per ISA level here (FRT_CLONES), with the row loop of
// one thread's share inside: the OpenMP region only splits the rows (a clone's outlined
// parallel body would call code compiled for the baseline ISA).
#define FRT_WS_ROWS(NAME, LT, LX)                                                      \
  FRT_CLONES void fwd_rows_##NAME(const WsStandardizeParams& p, int64_t r0, int64_t r1) { \
    fwd_rows<LT, LX>(p, r0, r1);                                                       \
  }                                                                                    \
  FRT_CLONES void bwd_rows_##NAME(const WsStandardizeBackwardParams& p, int64_t r0,     \
                                  int64_t r1) {                                        \
    bwd_rows<LT, LX>(p, r0, r1);                                                       \
  }
FRT_WS_ROWS(f32, F32, F32)
FRT_WS_ROWS(bf16, BF16, BF16)
FRT_WS_ROWS(f64, F64, F64)
FRT_WS_ROWS(f32_bf16, F32, BF16)  // a float32 weight with a bf16 output / grad_out
#undef FRT_WS_ROWS

// rows [r0, r1) of thread t of n: contiguous, equal shares (static schedule)
inline void share(int64_t rows, int t, int n, int64_t& r0, int64_t& r1) {
  const int64_t q = rows / n, rem = rows % n;
  r0 = t * q + std::min<int64_t>(t, rem);
  r1 = r0 + q + (t < rem ? 1 : 0);
}

template <class P, class F>
void split_rows(const P& p, F rows_fn) {
#pragma omp parallel if (p.rows * p.fan_in >= (1 << 15))
  {
#ifdef _OPENMP
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
#else
    const int t = 0, n = 1;
#endif
    int64_t r0, r1;
    share(p.rows, t, n, r0, r1);
    if (r0 < r1) rows_fn(p, r0, r1);
  }
}

}  // namespace

Status ws_standardize_cpu(const WsStandardizeParams& p) {
  if (p.rows < 0 || p.fan_in < 0 || !(p.eps >= 0.0)) return Status::kInvalidArgument;
  if (p.rows == 0 || p.fan_in == 0) return Status::kOk;
  if (!p.weight || !p.gain || !p.out) return Status::kInvalidArgument;
  if (p.out_bfloat16) {
    if (p.dtype != DType::kFloat32) return Status::kUnsupportedDtype;
    split_rows(p, fwd_rows_f32_bf16);
    return Status::kOk;
  }
  switch (p.dtype) {
    case DType::kFloat32: split_rows(p, fwd_rows_f32); return Status::kOk;
    case DType::kBFloat16: split_rows(p, fwd_rows_bf16); return Status::kOk;
    case DType::kFloat64: split_rows(p, fwd_rows_f64); return Status::kOk;
    default: return Status::kUnsupportedDtype;
  }
}

Status ws_standardize_backward_cpu(const WsStandardizeBackwardParams& p) {
  if (p.rows < 0 || p.fan_in < 0 || !(p.eps >= 0.0)) return Status::kInvalidArgument;
  if (p.rows == 0) return Status::kOk;
  if (!p.grad_gain) return Status::kInvalidArgument;
  if (p.fan_in == 0) {
    return Status::kOk;
  }
  if (!p.weight || !p.gain || !p.grad_out || !p.grad_weight) return Status::kInvalidArgument;
  if (p.grad_out_bfloat16) {
    if (p.dtype != DType::kFloat32) return Status::kUnsupportedDtype;
    split_rows(p, bwd_rows_f32_bf16);
    return Status::kOk;
  }
  switch (p.dtype) {
    case DType::kFloat32: split_rows(p, bwd_rows_f32); return Status::kOk;
    case DType::kBFloat16: split_rows(p, bwd_rows_bf16); return Status::kOk;
    case DType::kFloat64: split_rows(p, bwd_rows_f64); return Status::kOk;
    default: return Status::kUnsupportedDtype;
  }
}

}  // namespace flamingo_rt
