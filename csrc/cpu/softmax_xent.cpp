// CPU kernel of softmax_xent_rows (see csrc/include/flamingo_rt/softmax_xent.h).
//
// A row at a time: its maximum (one pass), then exp(x - max) into a float32 scratch row and
// their sum in float64 (second pass, the row's float32 exps stay in L2: 32,000 words are 125 KiB),
// lse = max + log(sum), and the gradient written from the scratch (third pass). The row
// functions are compiled per ISA level (FRT_CLONES) and vectorized by `omp simd` around the
// branch-free exp_f32; tasks are blocks of rows over OpenMP threads.
#include "flamingo_rt/kernels.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_math.h"

namespace flamingo_rt {
namespace {

using namespace cpu;

constexpr int64_t kRowsPerTask = 4;

// Returns false when a target is out of range (that row's gradient is left unwritten).
template <class L>
FRT_INLINE bool xent_rows(const SoftmaxXentRowsParams& p, int64_t r0, int64_t r1, float* e) {
  using T = typename L::T;
  const int64_t V = p.V;
  bool ok = true;
  for (int64_t r = r0; r < r1; ++r) {
    T* x = static_cast<T*>(p.logits) + r * p.stride;
    const int64_t t = p.targets[r];
    if (t == p.ignore_index) {
      p.loss[r] = 0.0f;
      if (p.write_grad) {
        FRT_SIMD
        for (int64_t j = 0; j < V; ++j) x[j] = L::store(0.0f);
      }
      continue;
    }
    if (t < 0 || t >= V) {
      p.loss[r] = std::numeric_limits<float>::quiet_NaN();
      ok = false;
      continue;
    }
    float m = -std::numeric_limits<float>::infinity();
    FRT_SIMD_RED(max : m)
    for (int64_t j = 0; j < V; ++j) m = std::max(m, L::load(x[j]));
    // a row of -inf (or with +inf / NaN) gives a non-finite loss, as torch's would
    const float shift = std::isfinite(m) ? m : 0.0f;
    // the sum in float64: in float32 each lane's partial sum next to the row's largest term
    // (exp(0) = 1) dropped every term below half its ulp (a row of 1037 logits with one
    // dominant: its softmax 3e-6 too large with 8-lane AVX2 partial sums)
    double s = 0.0;
    FRT_SIMD_RED(+ : s)
    for (int64_t j = 0; j < V; ++j) {
      e[j] = exp_f32(L::load(x[j]) - shift);
      s += double(e[j]);
    }
    p.loss[r] = float(double(shift) + std::log(s) - double(L::load(x[t])));
    if (p.write_grad) {
      const float inv = float(double(p.scale) / s);
      FRT_SIMD
      for (int64_t j = 0; j < V; ++j) x[j] = L::store(e[j] * inv);
      x[t] = L::store(e[t] * inv - p.scale);
    }
  }
  return ok;
}

FRT_CLONES bool xent_f32(const SoftmaxXentRowsParams& p, int64_t r0, int64_t r1, float* e) {
  return xent_rows<F32>(p, r0, r1, e);
}
FRT_CLONES bool xent_bf16(const SoftmaxXentRowsParams& p, int64_t r0, int64_t r1, float* e) {
  return xent_rows<BF16>(p, r0, r1, e);
}

}  // namespace

Status softmax_xent_rows_cpu(const SoftmaxXentRowsParams& p) {
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kBFloat16) return Status::kUnsupportedDtype;
  if (p.N < 0 || p.V < 0) return Status::kInvalidArgument;
  if (p.N == 0) return Status::kOk;
  if (p.V == 0 || p.logits == nullptr || p.targets == nullptr || p.loss == nullptr || p.stride < p.V)
    return Status::kInvalidArgument;
  auto rows = p.dtype == DType::kBFloat16 ? xent_bf16 : xent_f32;
  const int64_t ntask = (p.N + kRowsPerTask - 1) / kRowsPerTask;
  std::atomic<bool> ok{true};
#pragma omp parallel if (ntask > 1 && p.N * p.V >= (1 << 16))
  {
    std::vector<float> e(size_t(p.V));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < ntask; ++t) {
      const int64_t r0 = t * kRowsPerTask;
      if (!rows(p, r0, std::min(p.N, r0 + kRowsPerTask), e.data())) ok.store(false, std::memory_order_relaxed);
    }
  }
  return ok.load() ? Status::kOk : Status::kInvalidArgument;
}

}  // namespace flamingo_rt
