// CUDA C++ forward of the Perceiver Resampler attention (see
// csrc/include/flamingo_rt/resampler_cuda.h). Raw pointers + strides + stream, no torch.
//
// Block = 4 warps = (medium n, head h, tile of 16 latent rows); each warp owns 4 rows.
// Grid = (n * H, ceil(L / 16)), all media in one launch.
// The keys are streamed in tiles of 32: first the S feature keys from k_x / v_x, then
// the L latent keys from k_l / v_l (never concatenated). A tile of K and V is staged in
// shared memory as float32 (K rows padded by one float so lane j reading key j is
// conflict-free); the 16 query rows, pre-multiplied by scale * log2(e), stay in shared
// memory as float32 (read as broadcasts).
// Per tile: lane j computes the scores of key j for the warp's 4 rows (dh FMAs each),
// online softmax in the exp2 domain with butterfly warp reductions (every lane holds the
// row max / sum), then each lane accumulates dh / 32 output dims: acc[r][i] += p_j * v[j][d]
// with p_j broadcast by shuffles. Accumulation in float32; output in the input dtype.
#include "flamingo_rt/resampler_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda_status.cuh"
#include "elem.cuh"

namespace flamingo_rt {

namespace {

constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 4;
constexpr int kRows = kWarps * kRowsPerWarp;  // latent rows per block
constexpr int kKeys = 32;                     // keys per tile (one per lane)
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;

using cuda_detail::from_f32;
using cuda_detail::to_f32;
using cuda_detail::warp_max;
using cuda_detail::warp_sum;

struct Args {
  const void* q;
  const void* k[2];  // features, latents
  const void* v[2];
  void* out;
  int64_t sq[4], sk[2][4], sv[2][4], so[4];
  int64_t keys[2];  // S, L
  int64_t L, H;
  int dh;
  float qk_scale;  // scale * log2(e)
};

// DPL: output dims per lane (dh <= 32 * DPL).
template <typename T, int DPL>
__global__ void __launch_bounds__(kThreads) resampler_fwd_kernel(const Args a) {
  constexpr int D = 32 * DPL;
  __shared__ float qs[kRows][D];
  __shared__ float ks[kKeys][D + 1];
  __shared__ float vs[kKeys][D];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int64_t nh = blockIdx.x;
  const int64_t n = nh / a.H;
  const int64_t h = nh - n * a.H;
  const int64_t row0 = int64_t(blockIdx.y) * kRows;
  const int dh = a.dh;

  // the block's query rows, scaled; rows past L and dims past dh are zero
  const T* __restrict__ q = static_cast<const T*>(a.q) + n * a.sq[0] + h * a.sq[2];
  for (int e = tid; e < kRows * D; e += kThreads) {
    const int r = e / D;
    const int d = e - r * D;
    const int64_t row = row0 + r;
    float x = 0.0f;
    if (row < a.L && d < dh) x = to_f32(q[row * a.sq[1] + d * a.sq[3]]) * a.qk_scale;
    qs[r][d] = x;
  }

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][DPL];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int i = 0; i < DPL; ++i) acc[r][i] = 0.0f;
  }

#pragma unroll 1
  for (int src = 0; src < 2; ++src) {
    const int64_t count = a.keys[src];
    const T* __restrict__ kb = static_cast<const T*>(a.k[src]) + n * a.sk[src][0] + h * a.sk[src][2];
    const T* __restrict__ vb = static_cast<const T*>(a.v[src]) + n * a.sv[src][0] + h * a.sv[src][2];
    const int64_t ks_s = a.sk[src][1], ks_d = a.sk[src][3];
    const int64_t vs_s = a.sv[src][1], vs_d = a.sv[src][3];
#pragma unroll 1
    for (int64_t t0 = 0; t0 < count; t0 += kKeys) {
      __syncthreads();  // the previous tile is consumed (first time: qs is written)
      for (int e = tid; e < kKeys * D; e += kThreads) {
        const int j = e / D;
        const int d = e - j * D;
        const int64_t key = t0 + j;
        float kx = 0.0f, vx = 0.0f;
        if (key < count && d < dh) {
          kx = to_f32(kb[key * ks_s + d * ks_d]);
          vx = to_f32(vb[key * vs_s + d * vs_d]);
        }
        ks[j][d] = kx;
        vs[j][d] = vx;
      }
      __syncthreads();

      // scores of key `lane` for the warp's rows
      float s[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) s[r] = 0.0f;
      const float* qw = &qs[warp * kRowsPerWarp][0];
#pragma unroll 8
      for (int d = 0; d < D; ++d) {
        const float kd = ks[lane][d];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) s[r] = fmaf(qw[r * D + d], kd, s[r]);
      }
      const bool valid = t0 + lane < count;  // lane 0 is always valid: t0 < count

      // online softmax; s[r] becomes p of key `lane`
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const float sr = valid ? s[r] : -INFINITY;
        const float m_new = fmaxf(m[r], warp_max(sr));  // finite
        const float alpha = exp2f(m[r] - m_new);         // 0 on the first tile
        const float p = exp2f(sr - m_new);                // 0 for invalid keys
        l[r] = l[r] * alpha + warp_sum(p);
        m[r] = m_new;
#pragma unroll
        for (int i = 0; i < DPL; ++i) acc[r][i] *= alpha;
        s[r] = p;
      }

      // acc += P V
#pragma unroll 4
      for (int j = 0; j < kKeys; ++j) {
        float pj[kRowsPerWarp];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) pj[r] = __shfl_sync(0xffffffffu, s[r], j);
#pragma unroll
        for (int i = 0; i < DPL; ++i) {
          const float vj = vs[j][lane + 32 * i];
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) acc[r][i] = fmaf(pj[r], vj, acc[r][i]);
        }
      }
    }
  }

  T* out = static_cast<T*>(a.out) + n * a.so[0] + h * a.so[2];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t row = row0 + warp * kRowsPerWarp + r;
    if (row >= a.L) continue;
    const float inv = 1.0f / l[r];
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
      const int d = lane + 32 * i;
      if (d < dh) out[row * a.so[1] + d * a.so[3]] = from_f32<T>(acc[r][i] * inv);
    }
  }
}

template <typename T>
Status launch(const ResamplerAttentionParams& p, const Args& a) {
  const dim3 grid(unsigned(p.n * p.H), unsigned((p.L + kRows - 1) / kRows));
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  const int dpl = int((p.dh + 31) / 32);
  switch (dpl) {
    case 1: resampler_fwd_kernel<T, 1><<<grid, kThreads, 0, stream>>>(a); break;
    case 2: resampler_fwd_kernel<T, 2><<<grid, kThreads, 0, stream>>>(a); break;
    case 3: resampler_fwd_kernel<T, 3><<<grid, kThreads, 0, stream>>>(a); break;
    default: resampler_fwd_kernel<T, 4><<<grid, kThreads, 0, stream>>>(a); break;
  }
  return cuda_detail::launch_status();
}

}  // namespace

const char* resampler_attention_cuda_last_error() { return last_cuda_error(); }

Status resampler_attention_cuda(const ResamplerAttentionParams& p) {
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16)
    return Status::kUnsupportedDtype;
  if (p.n < 0 || p.L < 0 || p.S < 0 || p.H < 0 || p.dh < 1 || p.dh > kResamplerCudaMaxHeadDim)
    return Status::kInvalidArgument;
  if (p.n == 0 || p.L == 0 || p.H == 0) return Status::kOk;
  if (p.q == nullptr || p.k_l == nullptr || p.v_l == nullptr || p.out == nullptr ||
      (p.S > 0 && (p.k_x == nullptr || p.v_x == nullptr)))
    return Status::kInvalidArgument;
  if (p.n * p.H > int64_t(0x7fffffff) || (p.L + kRows - 1) / kRows > 65535)
    return Status::kInvalidArgument;
  Args a;
  a.q = p.q;
  a.k[0] = p.k_x;
  a.k[1] = p.k_l;
  a.v[0] = p.v_x;
  a.v[1] = p.v_l;
  a.out = p.out;
  for (int d = 0; d < 4; ++d) {
    a.sq[d] = p.q_strides[d];
    a.sk[0][d] = p.k_x_strides[d];
    a.sk[1][d] = p.k_l_strides[d];
    a.sv[0][d] = p.v_x_strides[d];
    a.sv[1][d] = p.v_l_strides[d];
    a.so[d] = p.out_strides[d];
  }
  a.keys[0] = p.S;
  a.keys[1] = p.L;
  a.L = p.L;
  a.H = p.H;
  a.dh = int(p.dh);
  a.qk_scale = float(p.scale) * kLog2e;
  switch (p.dtype) {
    case DType::kBFloat16: return launch<__nv_bfloat16>(p, a);
    case DType::kFloat16: return launch<__half>(p, a);
    default: return launch<float>(p, a);
  }
}

}  // namespace flamingo_rt
