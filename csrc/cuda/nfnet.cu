// CUDA forward kernels of the NFNet ops (csrc/include/flamingo_rt/nfnet.h): scaled weight
// standardization and the squeeze-excite residual tail. Raw pointers + stream, no torch.
//
// ws_standardize: one block per output channel (row); the row's sum and sum of squared
// deviations are reduced in float64 (warp shuffles, then shared memory, fixed order), then
// every thread writes its strided share of the row. Rows are short (fan_in = I/g*kh*kw,
// at most ~14K), so one block per row saturates the GPU for all but the smallest layers.
//
// se_residual: one elementwise grid-stride kernel in y's memory order (channels-last,
// NCHW, or any strides through the logical index); the gate sigmoid is recomputed per
// element (one expf, far below the memory time). scale is read on the device (no sync).
#include "flamingo_rt/kernels.h"
#include "flamingo_rt/nfnet.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_status.cuh"
#include "elem.cuh"

namespace flamingo_rt {
namespace {

using cuda_detail::Elem;

using cuda_detail::launch_status;

constexpr int kWsThreads = 256;

__device__ __forceinline__ double block_sum(double v, double* smem) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  double r = 0.0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWsThreads / 32; ++w) r += smem[w];
    smem[kWsThreads / 32] = r;
  }
  __syncthreads();
  r = smem[kWsThreads / 32];
  __syncthreads();
  return r;
}

template <typename T>
__global__ void __launch_bounds__(kWsThreads)
    ws_fwd_kernel(const T* __restrict__ W, int64_t ws, const T* __restrict__ G, int64_t gs,
                  T* __restrict__ O, int64_t os, int64_t fan_in, double eps) {
  using E = Elem<T>;
  __shared__ double smem[kWsThreads / 32 + 1];
  const int64_t row = blockIdx.x;
  const T* w = W + row * ws;
  T* out = O + row * os;
  double s = 0.0;
  for (int64_t k = threadIdx.x; k < fan_in; k += kWsThreads) s += double(E::load(w[k]));
  const double mean = block_sum(s, smem) / double(fan_in);
  double v = 0.0;
  for (int64_t k = threadIdx.x; k < fan_in; k += kWsThreads) {
    const double d = double(E::load(w[k])) - mean;
    v += d * d;
  }
  const double var = block_sum(v, smem) / double(fan_in);
  const double a = rsqrt(var + eps) * double(E::load(G[row * gs])) * rsqrt(double(fan_in));
  using Acc = typename E::Acc;
  const Acc af = Acc(a), bf = Acc(-mean * a);
  for (int64_t k = threadIdx.x; k < fan_in; k += kWsThreads)
    out[k] = E::store(Acc(E::load(w[k])) * af + bf);
}

template <typename T>
Status ws_launch(const WsStandardizeParams& p) {
  cudaStream_t st = static_cast<cudaStream_t>(p.stream);
  ws_fwd_kernel<T><<<unsigned(p.rows), kWsThreads, 0, st>>>(
      static_cast<const T*>(p.weight), p.weight_row_stride, static_cast<const T*>(p.gain),
      p.gain_stride, static_cast<T*>(p.out), p.out_row_stride, p.fan_in, p.eps);
  return launch_status();
}

// ------------------------------------------------------------------ se_residual

struct SeGeom {
  int64_t N, C, H, W;
  int64_t xs[4], ss[4], ys[4];
  int64_t gs0, gs1;
  int mode;  // 0 generic (logical NCHW index), 1 all channels-last dense, 2 all NCHW dense
};

template <typename T>
__global__ void se_fwd_kernel(const T* __restrict__ X, const T* __restrict__ G,
                              const T* __restrict__ S, const T* __restrict__ scale,
                              T* __restrict__ Y, SeGeom g, int64_t total) {
  using E = Elem<T>;
  using Acc = typename E::Acc;
  const Acc sc = E::load(*scale);
  const int64_t HW = g.H * g.W;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, c, xo, so, yo;
    if (g.mode == 1) {  // dense channels-last: i = (n * HW + pix) * C + c
      c = i % g.C;
      n = i / (HW * g.C);
      const int64_t r = i - n * HW * g.C;
      xo = n * g.xs[0] + r;
      so = n * g.ss[0] + r;
      yo = n * g.ys[0] + r;
    } else if (g.mode == 2) {  // dense planes: i = (n * C + c) * HW + pix
      const int64_t pix = i % HW, nc = i / HW;
      c = nc % g.C;
      n = nc / g.C;
      xo = n * g.xs[0] + c * g.xs[1] + pix;
      so = n * g.ss[0] + c * g.ss[1] + pix;
      yo = n * g.ys[0] + c * g.ys[1] + pix;
    } else {
      const int64_t w = i % g.W, h = (i / g.W) % g.H;
      c = (i / HW) % g.C;
      n = i / (HW * g.C);
      xo = n * g.xs[0] + c * g.xs[1] + h * g.xs[2] + w * g.xs[3];
      so = n * g.ss[0] + c * g.ss[1] + h * g.ss[2] + w * g.ss[3];
      yo = n * g.ys[0] + c * g.ys[1] + h * g.ys[2] + w * g.ys[3];
    }
    const Acc gl = E::load(G[n * g.gs0 + c * g.gs1]);
    const Acc sig = Acc(1) / (Acc(1) + exp(-gl));
    Y[yo] = E::store(E::load(S[so]) + sc * sig * E::load(X[xo]));
  }
}

bool se_dense_cl(const int64_t sz[4], const int64_t s[4]) {
  return (sz[1] == 1 || s[1] == 1) && (sz[3] == 1 || s[3] == sz[1]) &&
         (sz[2] == 1 || s[2] == sz[3] * sz[1]);
}
bool se_dense_planes(const int64_t sz[4], const int64_t s[4]) {
  return (sz[3] == 1 || s[3] == 1) && (sz[2] == 1 || s[2] == sz[3]);
}

template <typename T>
Status se_launch(const SeResidualParams& p) {
  SeGeom g;
  g.N = p.sizes[0];
  g.C = p.sizes[1];
  g.H = p.sizes[2];
  g.W = p.sizes[3];
  for (int d = 0; d < 4; ++d) {
    g.xs[d] = p.x_strides[d];
    g.ss[d] = p.shortcut_strides[d];
    g.ys[d] = p.y_strides[d];
  }
  g.gs0 = p.gate_strides[0];
  g.gs1 = p.gate_strides[1];
  if (se_dense_cl(p.sizes, g.xs) && se_dense_cl(p.sizes, g.ss) && se_dense_cl(p.sizes, g.ys))
    g.mode = 1;
  else if (se_dense_planes(p.sizes, g.xs) && se_dense_planes(p.sizes, g.ss) &&
           se_dense_planes(p.sizes, g.ys))
    g.mode = 2;
  else
    g.mode = 0;
  const int64_t total = g.N * g.C * g.H * g.W;
  const int threads = 256;
  int64_t blocks = (total + threads - 1) / threads;
  if (blocks > 65535LL * 16) blocks = 65535LL * 16;
  se_fwd_kernel<T><<<unsigned(blocks), threads, 0, static_cast<cudaStream_t>(p.stream)>>>(
      static_cast<const T*>(p.x), static_cast<const T*>(p.gate), static_cast<const T*>(p.shortcut),
      static_cast<const T*>(p.scale), static_cast<T*>(p.y), g, total);
  return launch_status();
}

}  // namespace

Status ws_standardize_cuda(const WsStandardizeParams& p) {
  if (p.rows < 0 || p.fan_in < 0 || !(p.eps >= 0.0)) return Status::kInvalidArgument;
  if (p.rows == 0 || p.fan_in == 0) return Status::kOk;
  if (!p.weight || !p.gain || !p.out || p.rows > 0x7fffffffLL) return Status::kInvalidArgument;
  if (p.out_bfloat16) return Status::kUnsupportedDtype;  // CPU only
  switch (p.dtype) {
    case DType::kFloat32: return ws_launch<float>(p);
    case DType::kBFloat16: return ws_launch<__nv_bfloat16>(p);
    case DType::kFloat16: return ws_launch<__half>(p);
    case DType::kFloat64: return ws_launch<double>(p);
  }
  return Status::kUnsupportedDtype;
}

Status se_residual_cuda(const SeResidualParams& p) {
  for (int d = 0; d < 4; ++d)
    if (p.sizes[d] < 0) return Status::kInvalidArgument;
  if (p.sizes[0] * p.sizes[1] * p.sizes[2] * p.sizes[3] == 0) return Status::kOk;
  if (!p.x || !p.gate || !p.shortcut || !p.scale || !p.y) return Status::kInvalidArgument;
  if (p.scale_float32 && p.dtype != DType::kFloat32) return Status::kUnsupportedDtype;  // CPU only
  switch (p.dtype) {
    case DType::kFloat32: return se_launch<float>(p);
    case DType::kBFloat16: return se_launch<__nv_bfloat16>(p);
    case DType::kFloat16: return se_launch<__half>(p);
    case DType::kFloat64: return se_launch<double>(p);
  }
  return Status::kUnsupportedDtype;
}

}  // namespace flamingo_rt
