// LayerNorm over the last dim of rows, with statistics for the backward (CPU kernel):
//
//   mean[r] = mean(x[r, :]),  rstd[r] = 1 / sqrt(var(x[r, :]) + eps)   (biased variance)
//   y[r, i] = (x[r, i] - mean[r]) * rstd[r] * weight[i] + bias[i]      (affine optional)
//
// x float32 or bfloat16, y float32 or bfloat16 (the normalized input of a bf16 product is made
// in one pass, no float32 copy), weight / bias float32 (or both null), mean / rstd float32.
// Math in float32; y rounded to nearest even when bfloat16. Rows (unit element stride, any
// row stride) are spread over OpenMP threads.
#pragma once

#include <cstdint>

namespace flamingo_rt {

struct LayerNormRowsParams {
  const void* x = nullptr;       // (R, D), row stride x_stride
  DType x_dtype = DType::kFloat32;
  int64_t x_stride = 0;
  const float* weight = nullptr;  // (D,) or null
  const float* bias = nullptr;    // (D,) or null (null unless weight is given)
  void* y = nullptr;             // (R, D), row stride y_stride
  DType y_dtype = DType::kFloat32;
  int64_t y_stride = 0;
  float* mean = nullptr;         // (R,)
  float* rstd = nullptr;         // (R,)
  int64_t R = 0, D = 0;
  double eps = 1e-5;
};

Status layer_norm_rows_cpu(const LayerNormRowsParams& p);

}  // namespace flamingo_rt
