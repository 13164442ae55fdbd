// Small-batch linear layer (the decode step's matrix-vector products).
//
// y (B, N) = x (B, K) @ w (N, K)^T (+ bias (N,)), for B small (one token per sequence at
// decode time): the cost is reading w once, so the kernel streams each weight row once and
// applies it to all B rows while it is in cache. float32 and bfloat16 (float32 math and
// accumulation), float64 for checking, and float32 x, bias and y with a bfloat16 w
// (`bf16_weight`: half the bytes to stream, the products as exact as with the weight widened
// to float32). Rows of x and w are contiguous (unit stride in K); row strides are given in
// elements. bfloat16 x against bfloat16 w on CPUs with AVX512_BF16 runs vdpbf16ps (the same
// float32 accumulation, subnormals flushed; FLAMINGO_RT_NO_AVX512_BF16=1 in the environment
// forces the portable float32-FMA kernels).
#pragma once

#include <cstdint>

namespace flamingo_rt {

struct SmallLinearParams {
  const void* x = nullptr;     // (B, K), row stride x_row_stride
  const void* w = nullptr;     // (N, K), row stride w_row_stride
  const void* bias = nullptr;  // (N,) or nullptr
  void* y = nullptr;           // (B, N), contiguous
  int64_t B = 0, K = 0, N = 0;
  int64_t x_row_stride = 0, w_row_stride = 0;
  DType dtype = DType::kFloat32;  // of x, bias and y (and of w unless bf16_weight)
  bool bf16_weight = false;       // with dtype kFloat32: w is bfloat16
};

// Largest B the kernel takes (the torch op falls back to a GEMM above it).
constexpr int64_t kSmallLinearMaxRows = 16;

Status small_linear_cpu(const SmallLinearParams& p);

}  // namespace flamingo_rt
