// CUDA kernels for bias_gamma_act and its backward (see csrc/include/flamingo_rt/kernels.h).
// Raw pointers + stream, no torch.
//
// Layout: as on the CPU, the logical (N, C, H, W) dims are reordered by x's strides,
// size-1 dims dropped and neighbouring non-channel dims merged when contiguous in
// every operand. Consecutive threads walk the innermost (smallest-stride) dim, so
// accesses coalesce for NCHW, NHWC and other dense layouts; any strides are correct.
// Index math is 32-bit with multiply-high division by the (runtime-constant) dim sizes
// when every index fits, 64-bit otherwise.
//
// Forward: one elementwise grid-stride kernel; 16-byte vector loads/stores when the
// innermost dim is contiguous and aligned.
//
// Math is float32 (float64 for float64 tensors).
//
// Backward: grad_x elementwise; grad_bias deterministically in two passes: every block
// owns a fixed piece (chosen from the shape alone) and writes one partial (math type) per
// channel to the workspace, reduced in a fixed order (shuffles, then shared memory);
// a second kernel adds a channel's partials in order (float64) and writes grad_bias.
//   - channel not innermost (NCHW): block = (channel, split of its N*H*W elements),
//     threads along the contiguous spatial run;
//   - channel innermost (NHWC): block = (tile of 64 channels, split of the rows),
//     threads along the channels.
#include "flamingo_rt/kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../cpu/layout_plan.h"
#include "cuda_status.cuh"
#include "elem.cuh"
#include <type_traits>

namespace flamingo_rt {

namespace {

using cuda_detail::launch_status;

// ------------------------------------------------------------------ elements, math

using cuda_detail::Elem;  // Acc: the math type (float32, float64 for float64)

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

constexpr float kInvSqrt2 = 0.707106781186547524f;
constexpr float kInvSqrt2Pi = 0.398942280401432678f;

template <Act A>
__device__ __forceinline__ float act_fwd(float v) {
  if (A == Act::kRelu) return v < 0.0f ? 0.0f : v;
  if (A == Act::kSilu) return v / (1.0f + expf(-v));
  return v * (0.5f * erfcf(-v * kInvSqrt2));  // exact GELU, accurate in the tail
}

template <Act A>
__device__ __forceinline__ float act_grad(float v) {
  if (A == Act::kRelu) return v > 0.0f ? 1.0f : 0.0f;
  if (A == Act::kSilu) {
    const float s = 1.0f / (1.0f + expf(-v));
    return s * (1.0f + v * (1.0f - s));
  }
  return 0.5f * erfcf(-v * kInvSqrt2) + v * expf(-0.5f * v * v) * kInvSqrt2Pi;
}

template <Act A>
__device__ __forceinline__ double act_fwd(double v) {
  if (A == Act::kRelu) return v < 0.0 ? 0.0 : v;
  if (A == Act::kSilu) return v / (1.0 + exp(-v));
  return v * (0.5 * erfc(-v * 0.70710678118654752440));
}

template <Act A>
__device__ __forceinline__ double act_grad(double v) {
  if (A == Act::kRelu) return v > 0.0 ? 1.0 : 0.0;
  if (A == Act::kSilu) {
    const double s = 1.0 / (1.0 + exp(-v));
    return s * (1.0 + v * (1.0 - s));
  }
  return 0.5 * erfc(-v * 0.70710678118654752440) +
         v * exp(-0.5 * v * v) * 0.39894228040143267794;
}

// ------------------------------------------------------------------ index math

// n / d for a runtime-constant d. 32-bit: q = (umulhi(n, m) + n) >> s with
// s = ceil(log2 d), m = floor(2^32 (2^s - d) / d) + 1; exact for n < 2^31.
template <typename I>
struct Divider;

template <>
struct Divider<uint32_t> {
  uint32_t m = 1, s = 0;
  Divider() = default;
  explicit Divider(uint32_t d) {
    s = 0;
    while ((uint64_t(1) << s) < d) ++s;
    m = uint32_t(((uint64_t(1) << 32) * ((uint64_t(1) << s) - d)) / d + 1);
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return (__umulhi(n, m) + n) >> s; }
};

template <>
struct Divider<uint64_t> {
  uint64_t d = 1;
  Divider() = default;
  explicit Divider(uint64_t dd) : d(dd) {}
  __device__ __forceinline__ uint64_t div(uint64_t n) const { return n / d; }
};

// The operands' dims after reordering / merging: csrc/cpu/layout_plan.h (the CPU kernel's plan).
using layout::abs64;
using layout::make_plan;
using layout::Plan;

constexpr int64_t kMax32 = int64_t(1) << 31;

// Largest |offset| reachable in an operand.
template <int K>
int64_t max_extent(const Plan<K>& p, int k) {
  int64_t e = 0;
  for (int d = 0; d < p.nd; ++d) e += (p.size[d] - 1) * abs64(p.stride[k][d]);
  return e;
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

int grid_for(int64_t work, int threads) {
  const int64_t b = (work + threads - 1) / threads;
  return int(std::max<int64_t>(1, std::min<int64_t>(b, int64_t(1) << 20)));
}

// ------------------------------------------------------------------ forward

template <typename I>
struct FwdArgs {
  const void* x;
  void* y;
  const void* bias;
  int64_t bias_stride;
  double gamma;
  int nd;
  int cpos;
  I size[4];  // size[nd - 1] counts VEC-wide groups
  Divider<I> div[4];
  int64_t sx[4];
  int64_t sy[4];
  I n;  // work items = elements / VEC
};

template <typename T, Act A, int VEC, typename I>
__global__ void __launch_bounds__(256) bga_fwd_kernel(const FwdArgs<I> a) {
  using Acc = typename Elem<T>::Acc;
  const Acc gamma = Acc(a.gamma);
  const T* __restrict__ x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  const T* __restrict__ b = static_cast<const T*>(a.bias);
  const int inner = a.nd - 1;
  for (I v = I(blockIdx.x) * blockDim.x + threadIdx.x; v < a.n; v += I(gridDim.x) * blockDim.x) {
    I rem = v;
    int64_t ox = 0, oy = 0;
    I c = 0;
#pragma unroll
    for (int d = 3; d >= 0; --d) {
      if (d < a.nd) {
        const I q = a.div[d].div(rem);
        I i = rem - q * a.size[d];
        rem = q;
        if (d == inner) i *= VEC;
        ox += int64_t(i) * a.sx[d];
        oy += int64_t(i) * a.sy[d];
        if (d == a.cpos) c = i;
      }
    }
    const bool bias_along = a.cpos == inner;
    if (VEC == 1) {
      const Acc bv = b ? Elem<T>::load(b[int64_t(c) * a.bias_stride]) : Acc(0);
      y[oy] = Elem<T>::store(gamma * act_fwd<A>(Elem<T>::load(x[ox]) + bv));
    } else {
      const Pack<T, VEC> in = *reinterpret_cast<const Pack<T, VEC>*>(x + ox);
      Pack<T, VEC> out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const I ck = bias_along ? c + k : c;
        const Acc bv = b ? Elem<T>::load(b[int64_t(ck) * a.bias_stride]) : Acc(0);
        out.v[k] = Elem<T>::store(gamma * act_fwd<A>(Elem<T>::load(in.v[k]) + bv));
      }
      *reinterpret_cast<Pack<T, VEC>*>(y + oy) = out;
    }
  }
}

template <typename T, Act A, int VEC, typename I>
Status launch_fwd(const BiasGammaActParams& p, const Plan<2>& pl, cudaStream_t stream) {
  FwdArgs<I> a;
  a.x = p.x;
  a.y = p.y;
  a.bias = p.bias;
  a.bias_stride = p.bias_stride;
  a.gamma = p.gamma;
  a.nd = pl.nd;
  a.cpos = pl.cpos;
  int64_t n = 1;
  for (int d = 0; d < 4; ++d) {
    const int64_t s = d < pl.nd ? (d == pl.nd - 1 ? pl.size[d] / VEC : pl.size[d]) : 1;
    a.size[d] = I(s);
    a.div[d] = Divider<I>(I(s));
    a.sx[d] = d < pl.nd ? pl.stride[0][d] : 0;
    a.sy[d] = d < pl.nd ? pl.stride[1][d] : 0;
    n *= s;
  }
  a.n = I(n);
  bga_fwd_kernel<T, A, VEC, I><<<grid_for(n, 256), 256, 0, stream>>>(a);
  return launch_status();
}

template <typename T, Act A>
Status fwd_dispatch(const BiasGammaActParams& p, cudaStream_t stream) {
  const int64_t* strides[2] = {p.x_strides, p.y_strides};
  const Plan<2> pl = make_plan<2>(p.sizes, strides);
  const int64_t numel = p.sizes[0] * p.sizes[1] * p.sizes[2] * p.sizes[3];
  const bool fits32 = numel < kMax32 && max_extent(pl, 0) < kMax32 && max_extent(pl, 1) < kMax32;
  if (!fits32) return launch_fwd<T, A, 1, uint64_t>(p, pl, stream);
  constexpr int VEC = 16 / sizeof(T);
  const int inner = pl.nd - 1;
  bool vec = pl.stride[0][inner] == 1 && pl.stride[1][inner] == 1 && pl.size[inner] % VEC == 0 &&
             aligned16(p.x) && aligned16(p.y);
  for (int d = 0; d < inner; ++d)
    vec = vec && pl.stride[0][d] % VEC == 0 && pl.stride[1][d] % VEC == 0;
  if (vec) return launch_fwd<T, A, VEC, uint32_t>(p, pl, stream);
  return launch_fwd<T, A, 1, uint32_t>(p, pl, stream);
}

template <typename T>
Status fwd_act(const BiasGammaActParams& p, cudaStream_t stream) {
  switch (p.act) {
    case Act::kRelu: return fwd_dispatch<T, Act::kRelu>(p, stream);
    case Act::kSilu: return fwd_dispatch<T, Act::kSilu>(p, stream);
    default: return fwd_dispatch<T, Act::kGelu>(p, stream);
  }
}

// ------------------------------------------------------------------ backward

template <typename I>
struct BwdArgs {
  const void* x;
  const void* dy;
  void* dx;
  const void* bias;
  int64_t bias_stride;
  void* partial;  // [S][C] of the math type, or null when grad_bias is not wanted
  double gamma;
  int no;           // non-channel dims, outermost first
  I osize[3];
  Divider<I> odiv[3];
  int64_t osx[3], osdy[3], osdx[3];
  int64_t csx, csdy, csdx;  // channel strides (0 when C == 1)
  I C;
  I M;          // elements per channel (product of the non-channel dims)
  I per_split;  // elements (channel-major) or rows (channel-minor) per block
  I S;          // splits
};

template <typename I>
__device__ __forceinline__ void other_offsets(const BwdArgs<I>& a, I j, int64_t& ox, int64_t& ody,
                                              int64_t& odx) {
  ox = ody = odx = 0;
#pragma unroll
  for (int d = 2; d >= 0; --d) {
    if (d < a.no) {
      const I q = a.odiv[d].div(j);
      const I i = j - q * a.osize[d];
      j = q;
      ox += int64_t(i) * a.osx[d];
      ody += int64_t(i) * a.osdy[d];
      odx += int64_t(i) * a.osdx[d];
    }
  }
}

// Deterministic sum over a 256-thread block; the result is valid in thread 0.
template <typename F>
__device__ __forceinline__ F block_sum_256(F v, F* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  F s = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < 8; ++w) s += smem[w];
  return s;
}

// Channel not innermost: block = (channel c, split of its M elements), 256 threads.
template <typename T, Act A, typename I>
__global__ void __launch_bounds__(256) bga_bwd_cmajor(const BwdArgs<I> a) {
  using Acc = typename Elem<T>::Acc;
  __shared__ Acc smem[8];
  const Acc gamma = Acc(a.gamma);
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ dy = static_cast<const T*>(a.dy);
  T* dx = static_cast<T*>(a.dx);
  const T* __restrict__ b = static_cast<const T*>(a.bias);
  const I blk = I(blockIdx.x);
  const I c = blk / a.S;
  const I split = blk - c * a.S;
  const I j0 = split * a.per_split;
  const I j1 = min(a.M, j0 + a.per_split);
  const Acc bv = b ? Elem<T>::load(b[int64_t(c) * a.bias_stride]) : Acc(0);
  const int64_t cx = int64_t(c) * a.csx, cdy = int64_t(c) * a.csdy, cdx = int64_t(c) * a.csdx;
  Acc acc = 0;
  for (I j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
    int64_t ox, ody, odx;
    other_offsets(a, j, ox, ody, odx);
    const Acc v = Elem<T>::load(x[cx + ox]) + bv;
    const Acc g = gamma * act_grad<A>(v) * Elem<T>::load(dy[cdy + ody]);
    dx[cdx + odx] = Elem<T>::store(g);
    acc += g;
  }
  if (a.partial != nullptr) {
    const Acc s = block_sum_256(acc, smem);
    if (threadIdx.x == 0) static_cast<Acc*>(a.partial)[int64_t(split) * a.C + c] = s;
  }
}

// Channel innermost: block (64 channels, 4 rows) = (tile of channels, split of rows).
template <typename T, Act A, typename I>
__global__ void __launch_bounds__(256) bga_bwd_cminor(const BwdArgs<I> a) {
  using Acc = typename Elem<T>::Acc;
  __shared__ Acc smem[4][64];
  const Acc gamma = Acc(a.gamma);
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ dy = static_cast<const T*>(a.dy);
  T* dx = static_cast<T*>(a.dx);
  const T* __restrict__ b = static_cast<const T*>(a.bias);
  const I c = I(blockIdx.x) * 64 + threadIdx.x;
  const I split = I(blockIdx.y);
  const I r0 = split * a.per_split;
  const I r1 = min(a.M, r0 + a.per_split);
  const bool live = c < a.C;
  Acc acc = 0;
  if (live) {
    const Acc bv = b ? Elem<T>::load(b[int64_t(c) * a.bias_stride]) : Acc(0);
    const int64_t cx = int64_t(c) * a.csx, cdy = int64_t(c) * a.csdy, cdx = int64_t(c) * a.csdx;
    for (I r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
      int64_t ox, ody, odx;
      other_offsets(a, r, ox, ody, odx);
      const Acc v = Elem<T>::load(x[cx + ox]) + bv;
      const Acc g = gamma * act_grad<A>(v) * Elem<T>::load(dy[cdy + ody]);
      dx[cdx + odx] = Elem<T>::store(g);
      acc += g;
    }
  }
  if (a.partial != nullptr) {
    smem[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && live) {
      const Acc s = ((smem[0][threadIdx.x] + smem[1][threadIdx.x]) + smem[2][threadIdx.x]) +
                    smem[3][threadIdx.x];
      static_cast<Acc*>(a.partial)[int64_t(split) * a.C + c] = s;
    }
  }
}

// grad_bias[c] = sum over s of partial[s][c], in order (float64).
template <typename T>
__global__ void bga_bias_reduce(const void* partial_, int64_t S, int64_t C, T* gb,
                                int64_t gb_stride) {
  using Acc = typename Elem<T>::Acc;
  const Acc* __restrict__ partial = static_cast<const Acc*>(partial_);
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double s = 0.0;
  for (int64_t k = 0; k < S; ++k) s += partial[k * C + c];
  gb[c * gb_stride] = Elem<T>::store(Acc(s));
}

constexpr int64_t kSplitElems = 4096;  // channel-major: elements per block
constexpr int64_t kSplitRows = 64;     // channel-minor: rows per block (x 64 channels)
constexpr int64_t kMaxGridY = 65535;

struct BwdShape {
  Plan<3> pl;
  bool cminor = false;
  int64_t C = 1;  // channels as the kernels see them (1 when C == 1 was dropped)
  int64_t M = 0;  // elements per channel
  int64_t per_split = 1;
  int64_t S = 0;
  bool fits32 = true;
};

BwdShape bwd_shape(const BiasGammaActBackwardParams& p) {
  BwdShape s;
  const int64_t* strides[3] = {p.x_strides, p.grad_out_strides, p.grad_x_strides};
  s.pl = make_plan<3>(p.sizes, strides);
  const int64_t numel = p.sizes[0] * p.sizes[1] * p.sizes[2] * p.sizes[3];
  s.C = s.pl.cpos >= 0 ? s.pl.size[s.pl.cpos] : 1;
  s.M = s.C > 0 ? numel / s.C : 0;
  s.cminor = s.pl.cpos >= 0 && s.pl.cpos == s.pl.nd - 1;
  if (s.M > 0) {
    if (s.cminor) {
      s.per_split = std::max(kSplitRows, (s.M + kMaxGridY - 1) / kMaxGridY);
    } else {
      s.per_split = kSplitElems;
    }
    s.S = (s.M + s.per_split - 1) / s.per_split;
  }
  s.fits32 = numel < kMax32 && s.C * s.S < kMax32;
  for (int k = 0; k < 3; ++k) s.fits32 = s.fits32 && max_extent(s.pl, k) < kMax32;
  return s;
}

template <typename T, Act A, typename I>
Status launch_bwd(const BiasGammaActBackwardParams& p, const BwdShape& s, void* partial,
                  cudaStream_t stream) {
  BwdArgs<I> a;
  a.x = p.x;
  a.dy = p.grad_out;
  a.dx = p.grad_x;
  a.bias = p.bias;
  a.bias_stride = p.bias_stride;
  a.partial = partial;
  a.gamma = p.gamma;
  a.no = 0;
  for (int d = 0; d < 3; ++d) {
    a.osize[d] = 1;
    a.odiv[d] = Divider<I>(I(1));
    a.osx[d] = a.osdy[d] = a.osdx[d] = 0;
  }
  a.csx = a.csdy = a.csdx = 0;
  for (int d = 0; d < s.pl.nd; ++d) {
    if (d == s.pl.cpos) {
      a.csx = s.pl.stride[0][d];
      a.csdy = s.pl.stride[1][d];
      a.csdx = s.pl.stride[2][d];
      continue;
    }
    a.osize[a.no] = I(s.pl.size[d]);
    a.odiv[a.no] = Divider<I>(I(s.pl.size[d]));
    a.osx[a.no] = s.pl.stride[0][d];
    a.osdy[a.no] = s.pl.stride[1][d];
    a.osdx[a.no] = s.pl.stride[2][d];
    ++a.no;
  }
  a.C = I(s.C);
  a.M = I(s.M);
  a.per_split = I(s.per_split);
  a.S = I(s.S);
  if (s.cminor) {
    const dim3 grid(unsigned((s.C + 63) / 64), unsigned(s.S));
    bga_bwd_cminor<T, A, I><<<grid, dim3(64, 4), 0, stream>>>(a);
  } else {
    bga_bwd_cmajor<T, A, I><<<unsigned(s.C * s.S), 256, 0, stream>>>(a);
  }
  return launch_status();
}

template <typename T>
Status bwd_typed(const BiasGammaActBackwardParams& p, cudaStream_t stream) {
  const BwdShape s = bwd_shape(p);
  const int64_t C = p.sizes[1];
  void* partial = p.grad_bias != nullptr ? p.workspace : nullptr;
  if (s.M > 0 && s.C > 0) {
    if (s.cminor && (s.C + 63) / 64 > int64_t(0x7fffffff)) return Status::kInvalidArgument;
    Status st;
    auto run = [&](auto act) {
      constexpr Act A = decltype(act)::value;
      return s.fits32 ? launch_bwd<T, A, uint32_t>(p, s, partial, stream)
                      : launch_bwd<T, A, uint64_t>(p, s, partial, stream);
    };
    switch (p.act) {
      case Act::kRelu: st = run(std::integral_constant<Act, Act::kRelu>{}); break;
      case Act::kSilu: st = run(std::integral_constant<Act, Act::kSilu>{}); break;
      default: st = run(std::integral_constant<Act, Act::kGelu>{}); break;
    }
    if (st != Status::kOk) return st;
  }
  if (p.grad_bias != nullptr && C > 0) {
    // S == 0 (empty N*H*W) writes zeros. C == 1 (dropped channel dim): s.C == 1 == C.
    const int64_t S = (s.M > 0 && s.C > 0) ? s.S : 0;
    bga_bias_reduce<T><<<unsigned((C + 255) / 256), 256, 0, stream>>>(
        partial, S, C, static_cast<T*>(p.grad_bias), p.grad_bias_stride);
    return launch_status();
  }
  return Status::kOk;
}

bool valid_act(Act a) { return a == Act::kGelu || a == Act::kRelu || a == Act::kSilu; }

Status check_common(DType dtype, Act act, const int64_t sizes[4]) {
  if (dtype != DType::kFloat32 && dtype != DType::kBFloat16 && dtype != DType::kFloat16 &&
      dtype != DType::kFloat64)
    return Status::kUnsupportedDtype;
  if (!valid_act(act)) return Status::kInvalidArgument;
  for (int d = 0; d < 4; ++d)
    if (sizes[d] < 0) return Status::kInvalidArgument;
  return Status::kOk;
}

}  // namespace

bool built_with_cuda() { return true; }

Status bias_gamma_act_cuda(const BiasGammaActParams& p) {
  const Status st = check_common(p.dtype, p.act, p.sizes);
  if (st != Status::kOk) return st;
  const int64_t numel = p.sizes[0] * p.sizes[1] * p.sizes[2] * p.sizes[3];
  if (numel == 0) return Status::kOk;
  if (p.x == nullptr || p.y == nullptr) return Status::kInvalidArgument;
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  switch (p.dtype) {
    case DType::kBFloat16: return fwd_act<__nv_bfloat16>(p, stream);
    case DType::kFloat16: return fwd_act<__half>(p, stream);
    case DType::kFloat64: return fwd_act<double>(p, stream);
    default: return fwd_act<float>(p, stream);
  }
}

size_t bias_gamma_act_backward_cuda_workspace_bytes(const BiasGammaActBackwardParams& p) {
  if (p.grad_bias == nullptr || check_common(p.dtype, p.act, p.sizes) != Status::kOk) return 0;
  const BwdShape s = bwd_shape(p);
  return size_t(s.S * s.C) * (p.dtype == DType::kFloat64 ? sizeof(double) : sizeof(float));
}

Status bias_gamma_act_backward_cuda(const BiasGammaActBackwardParams& p) {
  const Status st = check_common(p.dtype, p.act, p.sizes);
  if (st != Status::kOk) return st;
  const int64_t numel = p.sizes[0] * p.sizes[1] * p.sizes[2] * p.sizes[3];
  if (numel > 0 && (p.x == nullptr || p.grad_out == nullptr || p.grad_x == nullptr))
    return Status::kInvalidArgument;
  const size_t need = bias_gamma_act_backward_cuda_workspace_bytes(p);
  if (need > 0 && (p.workspace == nullptr || p.workspace_bytes < need))
    return Status::kWorkspaceTooSmall;
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  switch (p.dtype) {
    case DType::kBFloat16: return bwd_typed<__nv_bfloat16>(p, stream);
    case DType::kFloat16: return bwd_typed<__half>(p, stream);
    case DType::kFloat64: return bwd_typed<double>(p, stream);
    default: return bwd_typed<float>(p, stream);
  }
}

}  // namespace flamingo_rt
