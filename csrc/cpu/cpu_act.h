// The activations of the fused NFNet tails, scalar and vectorizable (internal; not a public
// header): used by bias_gamma_act.cpp and the Winograd convolution's output transform.
// float32 math uses our own exp (cpu_math.h) and erfc (a degree-10 minimax fit), so loops
// around these functions vectorize; float64 uses libm.
#pragma once

#include <cmath>

#include "cpu_math.h"
#include "flamingo_rt/kernels.h"

namespace flamingo_rt {
namespace cpu {

// Standard normal CDF Phi(v) and density term exp(-v^2/2) (shared with the derivative).
FRT_INLINE void normal_cdf(float v, float& cdf, float& gauss) {
  const float av = std::fabs(v);  // |v|: a sign-bit clear, no compare
  const float z = av * 0.707106781186547524f;  // |v| / sqrt(2)
  const float t = 1.0f / (1.0f + 0.5f * z);
  gauss = exp_f32(-0.5f * v * v);  // = exp(-z^2)
  // Q(t) = erfc(z) exp(z^2) / t, our minimax fit on t in [1/6, 1].
  float q = 0.03537511080503464f;
  q = q * t - 0.18870429694652557f;
  q = q * t + 0.3753531575202942f;
  q = q * t - 0.2804901897907257f;
  q = q * t - 0.03065057098865509f;
  q = q * t + 0.04090958088636398f;
  q = q * t + 0.052542589604854584f;
  q = q * t + 0.18624885380268097f;
  q = q * t + 0.24506381154060364f;
  q = q * t + 0.28226393461227417f;
  q = q * t + 0.2820880115032196f;
  const float tail = 0.5f * t * gauss * q;  // Phi(-|v|) = erfc(z) / 2
  cdf = select_f32(v < 0.0f, tail, 1.0f - tail);
}

template <Act A>
FRT_INLINE float act_fwd(float v) {
  if constexpr (A == Act::kRelu) {
    return select_f32(v < 0.0f, 0.0f, v);  // NaN passes through, like torch
  } else if constexpr (A == Act::kSilu) {
    return v / (1.0f + exp_f32(-v));
  } else {
    float cdf, gauss;
    normal_cdf(v, cdf, gauss);
    return v * cdf;
  }
}

// float64: libm (not vectorized; float64 is for checking).
template <Act A>
FRT_INLINE double act_fwd(double v) {
  if constexpr (A == Act::kRelu) {
    return v < 0.0 ? 0.0 : v;
  } else if constexpr (A == Act::kSilu) {
    return v / (1.0 + std::exp(-v));
  } else {
    return v * (0.5 * std::erfc(-v * 0.70710678118654752440));
  }
}

// d act / d v
template <Act A>
FRT_INLINE float act_grad(float v) {
  if constexpr (A == Act::kRelu) {
    return select_f32(v > 0.0f, 1.0f, 0.0f);
  } else if constexpr (A == Act::kSilu) {
    const float s = 1.0f / (1.0f + exp_f32(-v));
    return s * (1.0f + v * (1.0f - s));
  } else {
    float cdf, gauss;
    normal_cdf(v, cdf, gauss);
    return cdf + v * gauss * 0.398942280401432678f;  // Phi(v) + v * phi(v)
  }
}

template <Act A>
FRT_INLINE double act_grad(double v) {
  if constexpr (A == Act::kRelu) {
    return v > 0.0 ? 1.0 : 0.0;
  } else if constexpr (A == Act::kSilu) {
    const double s = 1.0 / (1.0 + std::exp(-v));
    return s * (1.0 + v * (1.0 - s));
  } else {
    return 0.5 * std::erfc(-v * 0.70710678118654752440) +
           v * std::exp(-0.5 * v * v) * 0.39894228040143267794;
  }
}

}  // namespace cpu
}  // namespace flamingo_rt
