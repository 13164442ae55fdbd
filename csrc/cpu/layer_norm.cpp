// CPU kernel of layer_norm_rows (see csrc/include/flamingo_rt/layer_norm.h).
//
// A row at a time: loaded (bf16 widened) into a float32 scratch row, its mean, then the
// variance from the deviations (two passes over the row in L1, not E[x^2] - E[x]^2), then
// y written in its dtype. The row functions are compiled per ISA level (FRT_CLONES) and
// vectorized by `omp simd`; tasks are blocks of rows over OpenMP threads.
#include "flamingo_rt/kernels.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_math.h"

namespace flamingo_rt {
namespace {

using namespace cpu;

constexpr int64_t kRowsPerTask = 16;

template <class LX, class LY>
FRT_INLINE void ln_rows(const LayerNormRowsParams& p, int64_t r0, int64_t r1, float* buf) {
  const int64_t D = p.D;
  const float inv_d = 1.0f / float(D);
  for (int64_t r = r0; r < r1; ++r) {
    const typename LX::T* x = static_cast<const typename LX::T*>(p.x) + r * p.x_stride;
    typename LY::T* y = static_cast<typename LY::T*>(p.y) + r * p.y_stride;
    float s = 0.0f;
    FRT_SIMD_RED(+ : s)
    for (int64_t i = 0; i < D; ++i) {
      buf[i] = LX::load(x[i]);
      s += buf[i];
    }
    const float mean = s * inv_d;
    float v = 0.0f;
    FRT_SIMD_RED(+ : v)
    for (int64_t i = 0; i < D; ++i) {
      const float d = buf[i] - mean;
      v += d * d;
    }
    const float rstd = 1.0f / std::sqrt(v * inv_d + float(p.eps));
    p.mean[r] = mean;
    p.rstd[r] = rstd;
    if (p.weight) {
      const float* w = p.weight;
      const float* b = p.bias;
      if (b) {
        FRT_SIMD
        for (int64_t i = 0; i < D; ++i) y[i] = LY::store((buf[i] - mean) * rstd * w[i] + b[i]);
      } else {
        FRT_SIMD
        for (int64_t i = 0; i < D; ++i) y[i] = LY::store((buf[i] - mean) * rstd * w[i]);
      }
    } else {
      FRT_SIMD
      for (int64_t i = 0; i < D; ++i) y[i] = LY::store((buf[i] - mean) * rstd);
    }
  }
}

FRT_CLONES void ln_f32_f32(const LayerNormRowsParams& p, int64_t r0, int64_t r1, float* buf) {
  ln_rows<F32, F32>(p, r0, r1, buf);
}
FRT_CLONES void ln_f32_bf16(const LayerNormRowsParams& p, int64_t r0, int64_t r1, float* buf) {
  ln_rows<F32, BF16>(p, r0, r1, buf);
}
FRT_CLONES void ln_bf16_f32(const LayerNormRowsParams& p, int64_t r0, int64_t r1, float* buf) {
  ln_rows<BF16, F32>(p, r0, r1, buf);
}
FRT_CLONES void ln_bf16_bf16(const LayerNormRowsParams& p, int64_t r0, int64_t r1, float* buf) {
  ln_rows<BF16, BF16>(p, r0, r1, buf);
}

}  // namespace

Status layer_norm_rows_cpu(const LayerNormRowsParams& p) {
  const auto ok = [](DType d) { return d == DType::kFloat32 || d == DType::kBFloat16; };
  if (!ok(p.x_dtype) || !ok(p.y_dtype)) return Status::kUnsupportedDtype;
  if (p.R < 0 || p.D < 0 || !(p.eps >= 0.0)) return Status::kInvalidArgument;
  if (p.R == 0) return Status::kOk;
  if (p.D == 0 || p.x == nullptr || p.y == nullptr || p.mean == nullptr || p.rstd == nullptr)
    return Status::kInvalidArgument;
  if (p.bias != nullptr && p.weight == nullptr) return Status::kInvalidArgument;
  const bool xb = p.x_dtype == DType::kBFloat16, yb = p.y_dtype == DType::kBFloat16;
  auto rows = xb ? (yb ? ln_bf16_bf16 : ln_bf16_f32) : (yb ? ln_f32_bf16 : ln_f32_f32);
  const int64_t ntask = (p.R + kRowsPerTask - 1) / kRowsPerTask;
#pragma omp parallel if (ntask > 1 && p.R * p.D >= (1 << 16))
  {
    std::vector<float> buf(size_t(p.D));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < ntask; ++t) {
      const int64_t r0 = t * kRowsPerTask;
      rows(p, r0, std::min(p.R, r0 + kRowsPerTask), buf.data());
    }
  }
  return Status::kOk;
}

}  // namespace flamingo_rt
