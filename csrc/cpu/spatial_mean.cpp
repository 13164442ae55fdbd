// CPU kernel of the squeeze in squeeze-excite: the mean of each (n, c) plane
// (csrc/include/flamingo_rt/nfnet.h).
//
// The frozen NFNet's SE gate pools a bfloat16 or float32 activation into float32 logits'
// inputs. torch's x.mean(dim=(2, 3), dtype=float32) first casts the whole activation to a
// new float32 tensor (an allocation and a pass over memory as large as the activation), then
// reduces it: here one read of x, float32 accumulation, no temporary.
//
// Layouts: channels-last (pixel stride C): a task is one image n and a block of kCh channels;
// it walks the pixels in order with kCh float32 accumulators, vectorized over channels, adding
// a block of kPix pixels' partial sums to the total at a time (sums of kPix terms, then of
// HW / kPix: rounding grows with both, not with HW). Planes (dense H*W): a task is one (n, c)
// plane, kLanes running sums (a vector) added up at the end. Anything else: a plain strided
// loop. FRT_CLONES: AVX-512 / AVX2 / baseline picked at run time.
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu_math.h"
#include "flamingo_rt/kernels.h"
#include "flamingo_rt/nfnet.h"

namespace flamingo_rt {
namespace {

using namespace cpu;

constexpr int64_t kCh = 64;   // channels per channels-last task
constexpr int64_t kPix = 64;  // pixels per partial sum (channels-last, strided)
constexpr int64_t kLanes = 16;  // running sums of a plane

// Channels-last: the mean over HW pixels (row stride `ld`) of `width` channels (W of them
// when W > 1, a compile-time width the compiler keeps in vector registers).
template <class L, int64_t W>
FRT_INLINE void cl_block(const typename L::T* base, int64_t ld, int64_t HW, typename L::Acc inv,
                         typename L::Acc* o, int64_t width = W) {
  using Acc = typename L::Acc;
  const int64_t len = W > 1 ? W : width;
  Acc total[kCh], part[kCh];
  for (int64_t j = 0; j < kCh; ++j) total[j] = Acc(0);
  for (int64_t q0 = 0; q0 < HW; q0 += kPix) {
    const int64_t q1 = q0 + kPix < HW ? q0 + kPix : HW;
    for (int64_t j = 0; j < kCh; ++j) part[j] = Acc(0);
    for (int64_t q = q0; q < q1; ++q) {
      const typename L::T* x = base + q * ld;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) part[j] += L::load(x[j]);
    }
    for (int64_t j = 0; j < kCh; ++j) total[j] += part[j];
  }
  for (int64_t j = 0; j < len; ++j) o[j] = total[j] * inv;
}

template <class L>
FRT_CLONES void mean_impl(const SpatialMeanParams& p) {
  using T = typename L::T;
  using Acc = typename L::Acc;
  const int64_t N = p.sizes[0], C = p.sizes[1], H = p.sizes[2], W = p.sizes[3], HW = H * W;
  const int64_t* s = p.x_strides;
  const T* X = static_cast<const T*>(p.x);
  Acc* out = static_cast<Acc*>(p.out);
  if (HW == 0) {
    for (int64_t i = 0; i < N * C; ++i) out[i] = std::numeric_limits<Acc>::quiet_NaN();
    return;
  }
  const Acc inv = Acc(1) / Acc(HW);
  const bool par = N * C * HW >= (1 << 15);
  const bool cl = (C == 1 || s[1] == 1) && (W == 1 || s[3] == C) && (H == 1 || s[2] == W * C);
  const bool planes = (W == 1 || s[3] == 1) && (H == 1 || s[2] == W);
  if (cl) {
    const int64_t cb = (C + kCh - 1) / kCh;
#pragma omp parallel for schedule(static) if (par)
    for (int64_t t = 0; t < N * cb; ++t) {
      const int64_t n = t / cb, c0 = (t % cb) * kCh;
      const T* base = X + n * s[0] + c0;
      Acc* o = out + n * C + c0;
      if (c0 + kCh <= C)
        cl_block<L, kCh>(base, C, HW, inv, o);  // a fixed width: accumulators in registers
      else
        cl_block<L, 1>(base, C, HW, inv, o, C - c0);
    }
  } else if (planes) {
#pragma omp parallel for schedule(static) if (par)
    for (int64_t t = 0; t < N * C; ++t) {
      const T* x = X + (t / C) * s[0] + (t % C) * s[1];
      // kLanes running sums (one vector), reduced once at the end
      Acc lanes[kLanes];
      for (int64_t j = 0; j < kLanes; ++j) lanes[j] = Acc(0);
      int64_t q = 0;
      for (; q + kLanes <= HW; q += kLanes) {
#pragma omp simd
        for (int64_t j = 0; j < kLanes; ++j) lanes[j] += L::load(x[q + j]);
      }
      Acc total = Acc(0);
      for (; q < HW; ++q) total += L::load(x[q]);
      for (int64_t j = 0; j < kLanes; ++j) total += lanes[j];
      out[t] = total * inv;
    }
  } else {
#pragma omp parallel for schedule(static) if (par)
    for (int64_t t = 0; t < N * C; ++t) {
      const T* x = X + (t / C) * s[0] + (t % C) * s[1];
      Acc total = Acc(0), part = Acc(0);
      int64_t k = 0;
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w) {
          part += L::load(x[h * s[2] + w * s[3]]);
          if (++k == kPix) {
            total += part;
            part = Acc(0);
            k = 0;
          }
        }
      out[t] = (total + part) * inv;
    }
  }
}

}  // namespace

Status spatial_mean_cpu(const SpatialMeanParams& p) {
  for (int d = 0; d < 4; ++d)
    if (p.sizes[d] < 0) return Status::kInvalidArgument;
  if (p.sizes[0] * p.sizes[1] == 0) return Status::kOk;
  if (p.out == nullptr || (p.sizes[2] * p.sizes[3] > 0 && p.x == nullptr)) return Status::kInvalidArgument;
  switch (p.dtype) {
    case DType::kFloat32: mean_impl<F32>(p); return Status::kOk;
    case DType::kBFloat16: mean_impl<BF16>(p); return Status::kOk;
    case DType::kFloat64: mean_impl<F64>(p); return Status::kOk;
    default: return Status::kUnsupportedDtype;
  }
}

}  // namespace flamingo_rt
