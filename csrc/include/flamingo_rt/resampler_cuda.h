// flamingo_rt: Perceiver Resampler attention, CUDA C++ forward.
//
// For each medium n < N and head h < H, the L latent queries q[n, :, h, :] attend to the
// S feature keys k_x[n, :, h, :] followed by the L latent keys k_l[n, :, h, :] (values
// v_x, v_l likewise), softmax(scale * q k^T) v, without the keys being concatenated in
// memory. All tensors are logically (N, rows, H, dh) with arbitrary element strides
// (a fused [K | V] projection output viewed per half works as is). Math in float32.
//
// Plain C++17 in this header: raw pointers, sizes, strides (in elements), a stream.
// Without CUDA in the build the function exists and returns Status::kNotCompiled.
#pragma once

#include <cstdint>

#include "flamingo_rt/kernels.h"

namespace flamingo_rt {

struct ResamplerAttentionParams {
  DType dtype = DType::kFloat32;  // float32, bfloat16 or float16 (all tensors alike)
  int64_t n = 0;                  // media
  int64_t L = 0;                  // latents (queries; also the latent keys)
  int64_t S = 0;                  // feature tokens per medium (may be 0)
  int64_t H = 0;                  // heads
  int64_t dh = 0;                 // head dim, 1..128
  const void* q = nullptr;        // (n, L, H, dh)
  const void* k_x = nullptr;      // (n, S, H, dh)
  const void* v_x = nullptr;      // (n, S, H, dh)
  const void* k_l = nullptr;      // (n, L, H, dh)
  const void* v_l = nullptr;      // (n, L, H, dh)
  void* out = nullptr;            // (n, L, H, dh)
  int64_t q_strides[4] = {};
  int64_t k_x_strides[4] = {};
  int64_t v_x_strides[4] = {};
  int64_t k_l_strides[4] = {};
  int64_t v_l_strides[4] = {};
  int64_t out_strides[4] = {};
  double scale = 0.0;             // softmax scale (usually dh^-0.5)
  void* stream = nullptr;         // cudaStream_t; nullptr: the legacy default stream
};

// Largest head dim the kernel handles.
constexpr int64_t kResamplerCudaMaxHeadDim = 128;

Status resampler_attention_cuda(const ResamplerAttentionParams& p);

// Text of the last CUDA error seen by resampler_attention_cuda on this thread ("" if none).
const char* resampler_attention_cuda_last_error();

}  // namespace flamingo_rt
