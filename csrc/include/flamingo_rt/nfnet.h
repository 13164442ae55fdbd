// flamingo_rt NFNet kernels (C++17, no torch): scaled weight standardization and the
// squeeze-excite residual tail of a NormFree block, forward and backward; the squeeze
// (spatial mean) of the frozen fast path.
// Same conventions as kernels.h: one params struct of raw pointers, sizes and strides (in
// elements), a dtype tag, a Status result; `stream` is a cudaStream_t for *_cuda.
#pragma once

#include <cstddef>
#include <cstdint>

#include "flamingo_rt/kernels.h"

namespace flamingo_rt {

// ---------------------------------------------------------------------------------
// ws_standardize (timm's ScaledStdConv2d)
//
//   out[o, k] = (w[o, k] - mean_o) / sqrt(var_o + eps) * gain[o] * fan_in^-0.5
//
// over `rows` output channels of `fan_in` weights each (a conv weight (O, I/g, kh, kw)
// is O rows of I/g*kh*kw). var is the biased variance. Row o of each operand starts at
// base + o * row_stride and is contiguous. Statistics are accumulated in float64, so the
// result is deterministic and independent of the thread count. Rows with fan_in == 0
// are a no-op.
struct WsStandardizeParams {
  DType dtype = DType::kFloat32;
  int64_t rows = 0, fan_in = 0;
  double eps = 1e-5;
  const void* weight = nullptr;
  int64_t weight_row_stride = 0;
  const void* gain = nullptr;  // rows elements
  int64_t gain_stride = 1;
  void* out = nullptr;
  int64_t out_row_stride = 0;
  void* stream = nullptr;  // CUDA only
  // out is bfloat16 while dtype is float32: the standardized weight rounded once, as bf16
  // autocast would cast it for the convolution (CPU only; CUDA returns kUnsupportedDtype)
  bool out_bfloat16 = false;
};

// Backward: with xhat = (w - mean) * rstd, s = gain * fan_in^-0.5, g = grad_out * s,
//   grad_gain[o]    = fan_in^-0.5 * sum_k grad_out[o, k] * xhat[o, k]
//   grad_weight[o,k]= rstd * (g - mean_k(g) - xhat * mean_k(g * xhat))
struct WsStandardizeBackwardParams {
  DType dtype = DType::kFloat32;
  int64_t rows = 0, fan_in = 0;
  double eps = 1e-5;
  const void* grad_out = nullptr;
  int64_t grad_out_row_stride = 0;
  const void* weight = nullptr;
  int64_t weight_row_stride = 0;
  const void* gain = nullptr;
  int64_t gain_stride = 1;
  void* grad_weight = nullptr;
  int64_t grad_weight_row_stride = 0;
  void* grad_gain = nullptr;
  int64_t grad_gain_stride = 1;
  void* stream = nullptr;  // CUDA only
  bool grad_out_bfloat16 = false;  // grad_out is bfloat16 while dtype is float32 (CPU only)
};

Status ws_standardize_cpu(const WsStandardizeParams& p);
Status ws_standardize_backward_cpu(const WsStandardizeBackwardParams& p);
Status ws_standardize_cuda(const WsStandardizeParams& p);  // forward only on CUDA

// ---------------------------------------------------------------------------------
// se_residual (NormFree block tail)
//
//   y[n, c, h, w] = shortcut[n, c, h, w] + scale * x[n, c, h, w] * sigmoid(gate[n, c])
//
// over a logical (N, C, H, W) tensor; element (n, c, h, w) of T at
// T + n*s[0] + c*s[1] + h*s[2] + w*s[3]. `scale` points at one element of `dtype`, or
// of float32 when `scale_float32` is set (a float32 gain beside bf16 activations under
// autocast; CPU only: the CUDA kernel returns kUnsupportedDtype) (a device pointer on
// CUDA: no host sync). x, shortcut, y, gate have `dtype`.
// y may alias shortcut when their strides are equal.
struct SeResidualParams {
  DType dtype = DType::kFloat32;
  int64_t sizes[4] = {0, 0, 0, 0};  // N, C, H, W
  const void* x = nullptr;
  int64_t x_strides[4] = {0, 0, 0, 0};
  const void* gate = nullptr;  // (N, C) pre-sigmoid logits
  int64_t gate_strides[2] = {0, 0};
  const void* shortcut = nullptr;
  int64_t shortcut_strides[4] = {0, 0, 0, 0};
  const void* scale = nullptr;
  void* y = nullptr;
  int64_t y_strides[4] = {0, 0, 0, 0};
  void* stream = nullptr;  // CUDA only
  bool scale_float32 = false;  // scale is float32 (not `dtype`); CPU only
};

// Backward (the shortcut's gradient is grad_out itself): with sig = sigmoid(gate),
// gx[n, c] = sum_{h,w} grad_out * x,
//   grad_x    = grad_out * scale * sig
//   grad_gate = gx * scale * sig * (1 - sig)      (N, C)
//   grad_scale= sum_{n,c} gx * sig                 (one element)
// Sums run in float32 (float64 for float64) in an order fixed by the shape alone. With
// `scale_float32`, scale and grad_scale are float32 (the other tensors `dtype`).
struct SeResidualBackwardParams {
  DType dtype = DType::kFloat32;
  int64_t sizes[4] = {0, 0, 0, 0};
  const void* grad_out = nullptr;
  int64_t grad_out_strides[4] = {0, 0, 0, 0};
  const void* x = nullptr;
  int64_t x_strides[4] = {0, 0, 0, 0};
  const void* gate = nullptr;
  int64_t gate_strides[2] = {0, 0};
  const void* scale = nullptr;
  void* grad_x = nullptr;
  int64_t grad_x_strides[4] = {0, 0, 0, 0};
  void* grad_gate = nullptr;  // (N, C) dense
  void* grad_scale = nullptr;  // one element
  void* stream = nullptr;
  bool scale_float32 = false;  // scale and grad_scale are float32 (not `dtype`)
};

Status se_residual_cpu(const SeResidualParams& p);
Status se_residual_backward_cpu(const SeResidualBackwardParams& p);
Status se_residual_cuda(const SeResidualParams& p);  // forward only on CUDA

// ---------------------------------------------------------------------------------
// spatial_mean (the squeeze of squeeze-excite)
//
//   out[n, c] = mean over (h, w) of x[n, c, h, w]
//
// over a logical (N, C, H, W) tensor with element strides x_strides (as se_residual).
// Accumulated in float32 (float64 for float64), in blocks of pixels whose sums are then
// added, in one fixed order per (n, c): results do not depend on the thread count; out (N, C) dense, float32 for
// float32 / bfloat16 x, float64 for float64. H * W == 0 gives NaN (0 / 0, as torch).
struct SpatialMeanParams {
  DType dtype = DType::kFloat32;  // of x
  int64_t sizes[4] = {0, 0, 0, 0};
  const void* x = nullptr;
  int64_t x_strides[4] = {0, 0, 0, 0};
  void* out = nullptr;  // (N, C) dense: float for kFloat32 / kBFloat16, double for kFloat64
};

Status spatial_mean_cpu(const SpatialMeanParams& p);

}  // namespace flamingo_rt
