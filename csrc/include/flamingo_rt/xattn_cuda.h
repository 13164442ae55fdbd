// flamingo_rt image-causal cross-attention, CUDA kernels (C++17, no torch).
//
// The math, shapes and strides are those of csrc/include/flamingo_rt/xattn.h
// (ImageCausalAttnParams): q, out (B, T, H, dh); k, v (B, M, N, H, dh); media_index (B, T)
// int32; strides in elements, any values. Pointers are device pointers; `stream` is a
// cudaStream_t (nullptr: the legacy default stream). Kernels are asynchronous on `stream`.
//
// dtypes: float32, bfloat16, float16 (math and accumulation in float32); float64 returns
// kUnsupportedDtype. Head dim 1..256. Rows whose media_index is -1 (or outside [-1, M):
// the kernels never read out of bounds, such rows see no image) are exactly 0.
//
// image_causal_attention_fwd_cuda: any T. Tiles of 16 consecutive tokens of one (b, h);
//   each tile stages 32-key chunks of only the images its tokens see (one image, two at a
//   segment boundary; every image up to the last in all-previous mode) in shared memory
//   and runs an online softmax in float32. T <= 4 goes to the decode kernel.
// image_causal_attention_decode_cuda: one block of 4 warps per (b, t, h) row, keys read
//   straight from the cache; the warps split the row's 32-key chunks and merge their
//   partial softmax states at the end. Meant for decoding: one new token per sequence,
//   q (B, 1, H, dh) against cached per-image k/v (B, M, N, H, dh), media_index (B, 1).
//   Correct for any T (one block per row), but the tile kernel is faster for long T.
//
// Without CUDA in the build both return kNotCompiled.
#pragma once

#include "flamingo_rt/kernels.h"

namespace flamingo_rt {

Status image_causal_attention_fwd_cuda(const ImageCausalAttnParams& p, void* stream);
Status image_causal_attention_decode_cuda(const ImageCausalAttnParams& p, void* stream);
// Text of the last CUDA error these functions returned kCudaError for, on the calling
// thread ("" if none; always "" without CUDA).
const char* image_causal_attention_cuda_last_error();

}  // namespace flamingo_rt
