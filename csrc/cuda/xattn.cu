// CUDA kernels of image-causal cross-attention, forward and single-token decode
// (see csrc/include/flamingo_rt/xattn_cuda.h). Raw pointers + strides + stream, no torch.
//
// Both kernels keep an online softmax per query row in float32: running max m, running
// sum l and the output accumulator acc, with lane `l` of a warp owning the head-dim
// elements d = l, l + 32, ... (DPL = ceil(dh / 32) of them, a template parameter).
// Keys are processed in chunks of 32, lane n of the warp scoring key n of the chunk.
// Running maxima start at -1e30 (finite) so that a row with no allowed key so far gives
// exp(0) = 1 rescales of zeros instead of inf - inf = NaN; a row that never sees a key
// keeps l = 0 and is written as exactly 0. All offsets are 64-bit.
//
// Tile kernel (any T): block = 4 warps = (16 consecutive tokens, b, h). The tile's
// media indices go to shared memory; the images it needs are [lo, hi] (its smallest and
// largest valid index; [0, hi] in all-previous mode). Per image and 32-key chunk the
// block stages K and V (converted to float32, rows padded to dh + 1 floats so that lane n
// reading row n hits distinct banks) in shared memory; each warp then updates its 4 rows
// that see this image (a warp-uniform test). q is staged once, pre-multiplied by scale.
//
// Decode kernel: block = 4 warps = one (b, t, h) row. The row's (image, chunk) pairs are
// dealt round-robin to the warps, which read K and V straight from global memory (the
// cache) and keep their own softmax state; the four states are merged through shared
// memory at the end (m = max m_w, l = sum l_w e^(m_w - m), acc likewise).
#include "flamingo_rt/kernels.h"
#include "flamingo_rt/xattn_cuda.h"
#include "cuda_status.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "elem.cuh"

namespace flamingo_rt {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kTileT = 16;                   // tokens per tile-kernel block
constexpr int kRowsPerWarp = kTileT / kWarps;  // 4
constexpr int kChunk = 32;                   // keys per chunk (one per lane)
constexpr float kNegBig = -1.0e30f;
constexpr int kMaxDh = 256;

template <typename T>
__device__ __forceinline__ float ld(const T* p, int64_t off);
template <>
__device__ __forceinline__ float ld<float>(const float* p, int64_t off) { return __ldg(p + off); }
template <>
__device__ __forceinline__ float ld<__nv_bfloat16>(const __nv_bfloat16* p, int64_t off) {
  return __bfloat162float(p[off]);
}
template <>
__device__ __forceinline__ float ld<__half>(const __half* p, int64_t off) { return __half2float(p[off]); }

template <typename T>
__device__ __forceinline__ T st(float v) {
  return cuda_detail::from_f32<T>(v);
}

using cuda_detail::warp_max;
using cuda_detail::warp_sum;

struct Args {
  const void* q;
  const void* k;
  const void* v;
  const int32_t* idx;
  void* out;
  int64_t sq[4], sk[5], sv[5], si[2], so[4];
  int64_t B, T, H, dh, M, N;
  float scale;
  bool all_previous;
};

// media index of row (b, t), -1 when it names no valid image (outside [0, M)).
__device__ __forceinline__ int row_image(const Args& a, int64_t b, int64_t t) {
  const int m = a.idx[b * a.si[0] + t * a.si[1]];
  return (m >= 0 && int64_t(m) < a.M) ? m : -1;
}

// ------------------------------------------------------------------ tile kernel

template <typename T, int DPL>
__global__ void __launch_bounds__(kThreads) xattn_fwd_tile_kernel(const Args a) {
  extern __shared__ float smem[];
  __shared__ int idx_s[kTileT];
  const int dh = int(a.dh);
  const int ldk = dh + 1;
  float* q_s = smem;                      // [kTileT][dh]
  float* k_s = q_s + kTileT * dh;         // [kChunk][ldk]
  float* v_s = k_s + kChunk * ldk;        // [kChunk][ldk]
  float* p_s = v_s + kChunk * ldk;        // [kWarps][kChunk]

  const T* __restrict__ q = static_cast<const T*>(a.q);
  const T* __restrict__ k = static_cast<const T*>(a.k);
  const T* __restrict__ v = static_cast<const T*>(a.v);
  T* out = static_cast<T*>(a.out);

  const int64_t bh = blockIdx.y;
  const int64_t b = bh / a.H;
  const int64_t h = bh - b * a.H;
  const int64_t t0 = int64_t(blockIdx.x) * kTileT;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;

  if (threadIdx.x < kTileT) {
    const int64_t t = t0 + threadIdx.x;
    idx_s[threadIdx.x] = t < a.T ? row_image(a, b, t) : -1;
  }
  const int64_t qb = b * a.sq[0] + h * a.sq[2];
  for (int i = threadIdx.x; i < kTileT * dh; i += kThreads) {
    const int r = i / dh, d = i - r * dh;
    const int64_t t = t0 + r;
    q_s[i] = t < a.T ? ld<T>(q, qb + t * a.sq[1] + d * a.sq[3]) * a.scale : 0.0f;
  }
  __syncthreads();

  int lo = INT_MAX, hi = -1;
#pragma unroll
  for (int r = 0; r < kTileT; ++r) {
    const int m = idx_s[r];
    if (m >= 0) {
      lo = min(lo, m);
      hi = max(hi, m);
    }
  }
  if (a.all_previous) lo = 0;

  float m_r[kRowsPerWarp], l_r[kRowsPerWarp], acc[kRowsPerWarp][DPL];
  int img_r[kRowsPerWarp];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    m_r[rr] = kNegBig;
    l_r[rr] = 0.0f;
    img_r[rr] = idx_s[warp * kRowsPerWarp + rr];
#pragma unroll
    for (int e = 0; e < DPL; ++e) acc[rr][e] = 0.0f;
  }

  const int64_t kb = b * a.sk[0] + h * a.sk[3];
  const int64_t vb = b * a.sv[0] + h * a.sv[3];
  float* p_w = p_s + warp * kChunk;
  for (int j = lo; j <= hi; ++j) {
    for (int64_t n0 = 0; n0 < a.N; n0 += kChunk) {
      const int nc = int(a.N - n0 < kChunk ? a.N - n0 : kChunk);
      __syncthreads();  // the previous chunk is no longer read
      for (int i = threadIdx.x; i < nc * dh; i += kThreads) {
        const int n = i / dh, d = i - n * dh;
        const int64_t nn = n0 + n;
        k_s[n * ldk + d] = ld<T>(k, kb + int64_t(j) * a.sk[1] + nn * a.sk[2] + d * a.sk[4]);
        v_s[n * ldk + d] = ld<T>(v, vb + int64_t(j) * a.sv[1] + nn * a.sv[2] + d * a.sv[4]);
      }
      __syncthreads();
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        const int m = img_r[rr];
        const bool sees = m >= 0 && (a.all_previous ? m >= j : m == j);
        if (!sees) continue;  // uniform across the warp
        const float* qr = q_s + (warp * kRowsPerWarp + rr) * dh;
        float s = kNegBig;
        if (lane < nc) {
          const float* kr = k_s + lane * ldk;
          float dot = 0.0f;
#pragma unroll 8
          for (int d = 0; d < dh; ++d) dot = fmaf(qr[d], kr[d], dot);
          s = dot;
        }
        const float m_new = fmaxf(m_r[rr], warp_max(s));
        const float alpha = expf(m_r[rr] - m_new);
        const float p = lane < nc ? expf(s - m_new) : 0.0f;
        l_r[rr] = l_r[rr] * alpha + warp_sum(p);
        m_r[rr] = m_new;
        p_w[lane] = p;
        __syncwarp();
#pragma unroll
        for (int e = 0; e < DPL; ++e) {
          const int d = lane + 32 * e;
          float o = acc[rr][e] * alpha;
          if (d < dh)
#pragma unroll 8
            for (int n = 0; n < nc; ++n) o = fmaf(p_w[n], v_s[n * ldk + d], o);
          acc[rr][e] = o;
        }
        __syncwarp();
      }
    }
  }

  const int64_t ob = b * a.so[0] + h * a.so[2];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t t = t0 + warp * kRowsPerWarp + rr;
    if (t >= a.T) continue;
    const bool has = l_r[rr] > 0.0f;
    const float inv = has ? 1.0f / l_r[rr] : 0.0f;
#pragma unroll
    for (int e = 0; e < DPL; ++e) {
      const int d = lane + 32 * e;
      if (d < dh) out[ob + t * a.so[1] + int64_t(d) * a.so[3]] = st<T>(has ? acc[rr][e] * inv : 0.0f);
    }
  }
}

// ------------------------------------------------------------------ decode kernel

template <typename T, int DPL>
__global__ void __launch_bounds__(kThreads) xattn_decode_kernel(const Args a) {
  __shared__ float q_s[kMaxDh];
  __shared__ float p_s[kWarps][kChunk];
  __shared__ float m_s[kWarps], l_s[kWarps];
  __shared__ float acc_s[kWarps][kMaxDh];

  const T* __restrict__ q = static_cast<const T*>(a.q);
  const T* __restrict__ k = static_cast<const T*>(a.k);
  const T* __restrict__ v = static_cast<const T*>(a.v);
  T* out = static_cast<T*>(a.out);
  const int dh = int(a.dh);
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;

  // blockIdx.x = (b * T + t) * H + h
  const int64_t row = blockIdx.x;
  const int64_t h = row % a.H;
  const int64_t bt = row / a.H;
  const int64_t t = bt % a.T;
  const int64_t b = bt / a.T;
  const int m = row_image(a, b, t);
  const int64_t ob = b * a.so[0] + t * a.so[1] + h * a.so[2];
  if (m < 0) {  // no image: exactly 0 (uniform over the block, before any barrier)
    for (int d = threadIdx.x; d < dh; d += kThreads) out[ob + int64_t(d) * a.so[3]] = st<T>(0.0f);
    return;
  }
  const int64_t qb = b * a.sq[0] + t * a.sq[1] + h * a.sq[2];
  for (int d = threadIdx.x; d < dh; d += kThreads) q_s[d] = ld<T>(q, qb + int64_t(d) * a.sq[3]) * a.scale;
  __syncthreads();

  const int lo = a.all_previous ? 0 : m;
  const int64_t chunks_per_image = (a.N + kChunk - 1) / kChunk;
  const int64_t total = int64_t(m - lo + 1) * chunks_per_image;
  const int64_t kb = b * a.sk[0] + h * a.sk[3];
  const int64_t vb = b * a.sv[0] + h * a.sv[3];

  float m_w = kNegBig, l_w = 0.0f, acc[DPL];
#pragma unroll
  for (int e = 0; e < DPL; ++e) acc[e] = 0.0f;
  float* p_w = p_s[warp];
  for (int64_t c = warp; c < total; c += kWarps) {  // warp-uniform loop
    const int64_t j = lo + c / chunks_per_image;
    const int64_t n0 = (c % chunks_per_image) * kChunk;
    const int nc = int(a.N - n0 < kChunk ? a.N - n0 : kChunk);
    const int64_t kj = kb + j * a.sk[1];
    const int64_t vj = vb + j * a.sv[1];
    float s = kNegBig;
    if (lane < nc) {
      const int64_t kr = kj + (n0 + lane) * a.sk[2];
      float dot = 0.0f;
#pragma unroll 8
      for (int d = 0; d < dh; ++d) dot = fmaf(q_s[d], ld<T>(k, kr + int64_t(d) * a.sk[4]), dot);
      s = dot;
    }
    const float m_new = fmaxf(m_w, warp_max(s));
    const float alpha = expf(m_w - m_new);
    const float p = lane < nc ? expf(s - m_new) : 0.0f;
    l_w = l_w * alpha + warp_sum(p);
    m_w = m_new;
    p_w[lane] = p;
    __syncwarp();
#pragma unroll
    for (int e = 0; e < DPL; ++e) {
      const int d = lane + 32 * e;
      float o = acc[e] * alpha;
      if (d < dh)
#pragma unroll 8
        for (int n = 0; n < nc; ++n) o = fmaf(p_w[n], ld<T>(v, vj + (n0 + n) * a.sv[2] + int64_t(d) * a.sv[4]), o);
      acc[e] = o;
    }
    __syncwarp();
  }

  if (lane == 0) {
    m_s[warp] = m_w;
    l_s[warp] = l_w;
  }
#pragma unroll
  for (int e = 0; e < DPL; ++e) {
    const int d = lane + 32 * e;
    if (d < dh) acc_s[warp][d] = acc[e];
  }
  __syncthreads();
  float mx = kNegBig;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, m_s[w]);
  float wgt[kWarps];
  float l = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    wgt[w] = l_s[w] > 0.0f ? expf(m_s[w] - mx) : 0.0f;
    l += l_s[w] * wgt[w];
  }
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  for (int d = threadIdx.x; d < dh; d += kThreads) {
    float o = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o = fmaf(acc_s[w][d], wgt[w], o);
    out[ob + int64_t(d) * a.so[3]] = st<T>(l > 0.0f ? o * inv : 0.0f);
  }
}

// ------------------------------------------------------------------ host side

using cuda_detail::launch_status;

Args make_args(const ImageCausalAttnParams& p) {
  Args a;
  a.q = p.q;
  a.k = p.k;
  a.v = p.v;
  a.idx = p.media_index;
  a.out = p.out;
  for (int d = 0; d < 4; ++d) {
    a.sq[d] = p.q_strides[d];
    a.so[d] = p.out_strides[d];
  }
  for (int d = 0; d < 5; ++d) {
    a.sk[d] = p.k_strides[d];
    a.sv[d] = p.v_strides[d];
  }
  a.si[0] = p.media_index_strides[0];
  a.si[1] = p.media_index_strides[1];
  a.B = p.B;
  a.T = p.T;
  a.H = p.H;
  a.dh = p.dh;
  a.M = p.M;
  a.N = p.N;
  a.scale = float(p.scale);
  a.all_previous = p.all_previous;
  return a;
}

// Zero `out` (used when there is no image at all, M == 0): one element per thread.
template <typename T>
__global__ void zero_out_kernel(const Args a) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n = a.B * a.T * a.H * a.dh;
  if (i >= n) return;
  int64_t r = i;
  const int64_t d = r % a.dh; r /= a.dh;
  const int64_t h = r % a.H; r /= a.H;
  const int64_t t = r % a.T;
  const int64_t b = r / a.T;
  static_cast<T*>(a.out)[b * a.so[0] + t * a.so[1] + h * a.so[2] + d * a.so[3]] = st<T>(0.0f);
}

Status check(const ImageCausalAttnParams& p) {
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16)
    return Status::kUnsupportedDtype;
  if (p.B < 0 || p.T < 0 || p.H < 0 || p.dh < 0 || p.M < 0 || p.N < 0) return Status::kInvalidArgument;
  if (p.dh > kMaxDh) return Status::kInvalidArgument;
  if (p.M > 0 && p.N == 0) return Status::kInvalidArgument;
  const int64_t numel = p.B * p.T * p.H * p.dh;
  if (numel > 0 && (p.q == nullptr || p.out == nullptr || p.media_index == nullptr)) return Status::kInvalidArgument;
  if (numel > 0 && p.M > 0 && (p.k == nullptr || p.v == nullptr)) return Status::kInvalidArgument;
  if (p.B * p.T * p.H >= (int64_t(1) << 31)) return Status::kInvalidArgument;  // decode grid.x
  return Status::kOk;
}

template <typename T>
Status zero_all(const Args& a, cudaStream_t stream) {
  const int64_t n = a.B * a.T * a.H * a.dh;
  zero_out_kernel<T><<<unsigned((n + 255) / 256), 256, 0, stream>>>(a);
  return launch_status();
}

template <typename T, int DPL>
Status launch_tile(const Args& a, cudaStream_t stream) {
  const int dh = int(a.dh);
  const size_t smem = sizeof(float) * size_t(kTileT * dh + 2 * kChunk * (dh + 1) + kWarps * kChunk);
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(xattn_fwd_tile_kernel<T, DPL>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return cuda_detail::record_cuda_error(e);
  }
  const dim3 grid(unsigned((a.T + kTileT - 1) / kTileT), unsigned(a.B * a.H));
  xattn_fwd_tile_kernel<T, DPL><<<grid, kThreads, smem, stream>>>(a);
  return launch_status();
}

template <typename T, int DPL>
Status launch_decode(const Args& a, cudaStream_t stream) {
  xattn_decode_kernel<T, DPL><<<unsigned(a.B * a.T * a.H), kThreads, 0, stream>>>(a);
  return launch_status();
}

template <typename T>
Status dispatch(const Args& a, bool decode, cudaStream_t stream) {
  if (a.M == 0) return zero_all<T>(a, stream);
  const int dpl = int((a.dh + 31) / 32);
  if (decode) {
    switch (dpl) {
      case 1: return launch_decode<T, 1>(a, stream);
      case 2: return launch_decode<T, 2>(a, stream);
      case 3: return launch_decode<T, 3>(a, stream);
      case 4: return launch_decode<T, 4>(a, stream);
      default: return launch_decode<T, 8>(a, stream);
    }
  }
  if (a.B * a.H > 65535) return Status::kInvalidArgument;  // grid.y limit
  switch (dpl) {
    case 1: return launch_tile<T, 1>(a, stream);
    case 2: return launch_tile<T, 2>(a, stream);
    case 3: return launch_tile<T, 3>(a, stream);
    case 4: return launch_tile<T, 4>(a, stream);
    default: return launch_tile<T, 8>(a, stream);
  }
}

Status run(const ImageCausalAttnParams& p, bool decode, void* stream_) {
  const Status st = check(p);
  if (st != Status::kOk) return st;
  if (p.B * p.T * p.H * p.dh == 0) return Status::kOk;
  const Args a = make_args(p);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_);
  switch (p.dtype) {
    case DType::kBFloat16: return dispatch<__nv_bfloat16>(a, decode, stream);
    case DType::kFloat16: return dispatch<__half>(a, decode, stream);
    default: return dispatch<float>(a, decode, stream);
  }
}

}  // namespace

// T <= 4: the decode kernel (one block per row) beats a mostly empty 16-token tile.
Status image_causal_attention_fwd_cuda(const ImageCausalAttnParams& p, void* stream) {
  return run(p, p.T <= 4, stream);
}

Status image_causal_attention_decode_cuda(const ImageCausalAttnParams& p, void* stream) {
  return run(p, true, stream);
}

const char* image_causal_attention_cuda_last_error() { return last_cuda_error(); }

}  // namespace flamingo_rt
