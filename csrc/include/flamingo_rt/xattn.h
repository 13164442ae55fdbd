// flamingo_rt image-causal cross-attention kernels (C++17, no torch). Included by kernels.h.
//
//   out[b, t, h, :] = sum_{j, n} P[b, h, t, (j, n)] * v[b, j, n, h, :]
//   P = softmax over the allowed keys of  scale * q[b, t, h, :] . k[b, j, n, h, :]
//
// allowed keys: image j == media_index[b, t] (all_previous = false, image-causal), or every
// image j <= media_index[b, t] (all_previous = true). Rows with media_index == -1 are
// exactly 0 (and get dq = 0). media_index values must lie in [-1, M); they are expected to
// be non-decreasing along t (then the tokens that see one image form one segment), but any
// order gives correct results.
//
// Tensors (strides in elements, any values, so non-contiguous views need no copy):
//   q, out, grad_out, dq  (B, T, H, dh)
//   k, v, dk, dv          (B, M, N, H, dh)
//   media_index           (B, T) int32
// All float tensors have `dtype` (float32, bfloat16 or float64; math in float32, float64
// for float64). Never materializes a (T, M*N) matrix: the work is O(T * N * dh) per head in
// image-causal mode.
//
// Backward: dv = P^T dO, dS = P * (dO v^T - rowsum(P * dO v^T)), dq = scale dS k,
// dk = scale dS^T q. Every output element is written by one task, sums run in an order fixed
// by the shape, so results are deterministic and independent of the thread count.
#pragma once

#include <cstdint>

namespace flamingo_rt {

struct ImageCausalAttnParams {
  DType dtype = DType::kFloat32;
  int64_t B = 0, T = 0, H = 0, dh = 0, M = 0, N = 0;
  bool all_previous = false;
  double scale = 1.0;

  const void* q = nullptr;
  int64_t q_strides[4] = {0, 0, 0, 0};
  const void* k = nullptr;
  int64_t k_strides[5] = {0, 0, 0, 0, 0};
  const void* v = nullptr;
  int64_t v_strides[5] = {0, 0, 0, 0, 0};
  const int32_t* media_index = nullptr;
  int64_t media_index_strides[2] = {0, 0};
  void* out = nullptr;
  int64_t out_strides[4] = {0, 0, 0, 0};
  // Optional second key/value source (the Perceiver Resampler's latents, so that its keys
  // [features; latents] need no concatenation): when n_tail > 0, rows n >= N - n_tail of
  // every image come from k_tail / v_tail (B, M, n_tail, H, dh), row n - (N - n_tail), and
  // k / v hold only the first N - n_tail rows.
  int64_t n_tail = 0;
  const void* k_tail = nullptr;
  int64_t k_tail_strides[5] = {0, 0, 0, 0, 0};
  const void* v_tail = nullptr;
  int64_t v_tail_strides[5] = {0, 0, 0, 0, 0};
};

struct ImageCausalAttnBackwardParams {
  DType dtype = DType::kFloat32;
  int64_t B = 0, T = 0, H = 0, dh = 0, M = 0, N = 0;
  bool all_previous = false;
  double scale = 1.0;

  const void* grad_out = nullptr;
  int64_t grad_out_strides[4] = {0, 0, 0, 0};
  const void* q = nullptr;
  int64_t q_strides[4] = {0, 0, 0, 0};
  const void* k = nullptr;
  int64_t k_strides[5] = {0, 0, 0, 0, 0};
  const void* v = nullptr;
  int64_t v_strides[5] = {0, 0, 0, 0, 0};
  const int32_t* media_index = nullptr;
  int64_t media_index_strides[2] = {0, 0};
  void* dq = nullptr;
  int64_t dq_strides[4] = {0, 0, 0, 0};
  void* dk = nullptr;
  int64_t dk_strides[5] = {0, 0, 0, 0, 0};
  void* dv = nullptr;
  int64_t dv_strides[5] = {0, 0, 0, 0, 0};
  // Optional second key/value source (the Perceiver Resampler's latents, so that its keys
  // [features; latents] need no concatenation): when n_tail > 0, rows n >= N - n_tail of
  // every image come from k_tail / v_tail (B, M, n_tail, H, dh), row n - (N - n_tail), and
  // k / v hold only the first N - n_tail rows.
  int64_t n_tail = 0;
  const void* k_tail = nullptr;
  int64_t k_tail_strides[5] = {0, 0, 0, 0, 0};
  const void* v_tail = nullptr;
  int64_t v_tail_strides[5] = {0, 0, 0, 0, 0};
  void* dk_tail = nullptr;  // with n_tail > 0: the gradients of k_tail / v_tail
  int64_t dk_tail_strides[5] = {0, 0, 0, 0, 0};
  void* dv_tail = nullptr;
  int64_t dv_tail_strides[5] = {0, 0, 0, 0, 0};
};

// CPU (OpenMP) kernels: float32, bfloat16, float64. kInvalidArgument for negative sizes,
// null pointers (with non-empty tensors) or a media_index value outside [-1, M).
Status image_causal_attention_fwd_cpu(const ImageCausalAttnParams& p);
Status image_causal_attention_bwd_cpu(const ImageCausalAttnBackwardParams& p);

}  // namespace flamingo_rt
