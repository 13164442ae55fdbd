// CPU kernels for the squeeze-excite residual tail and its backward
// (csrc/include/flamingo_rt/nfnet.h).
//
// Layouts: when x, shortcut, y (grad_out, grad_x) are all dense channels-last, a task is
// one image n and a block of pixels, and the inner loop runs over C with the per-channel
// factor scale * sigmoid(gate[n, c]) read from a small array; when they are all dense in
// H*W (NCHW), a task is one (n, c) plane with a scalar factor. Anything else takes a
// plain strided loop. Inner loops are vectorized (FRT_CLONES: AVX-512 / AVX2 / baseline
// at run time). Math in float32 (float64 for float64).
//
// The scale (and grad_scale) may be float32 beside bf16 data (scale_float32: a float32 gain
// under bf16 autocast), read and written as such.
//
// Backward sums: gx[n, c] is accumulated in one fixed order per (n, c) (pixels in order),
// grad_scale over (n, c) in order after the parallel part, so results do not depend on
// the number of threads.
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_math.h"
#include "flamingo_rt/kernels.h"
#include "flamingo_rt/nfnet.h"

namespace flamingo_rt {
namespace {

using namespace cpu;

enum Layout { kGeneric = 0, kChannelsLast = 1, kPlanes = 2 };

Layout layout_of(const int64_t sizes[4], std::initializer_list<const int64_t*> strides) {
  const int64_t C = sizes[1], H = sizes[2], W = sizes[3];
  bool cl = true, pl = true;
  for (const int64_t* s : strides) {
    cl = cl && (C == 1 || s[1] == 1) && (W == 1 || s[3] == C) && (H == 1 || s[2] == W * C);
    pl = pl && (W == 1 || s[3] == 1) && (H == 1 || s[2] == W);
  }
  // channels-last needs the pixel stride to be C for every operand; planes the H*W run
  if (cl) return kChannelsLast;
  if (pl) return kPlanes;
  return kGeneric;
}

// The scale as double: one element of the data's type, or a float32 (scale_float32).
template <class L>
double load_scale(const void* scale, bool scale_float32) {
  if (scale_float32) return double(*static_cast<const float*>(scale));
  return double(L::load(*static_cast<const typename L::T*>(scale)));
}

template <class L>
std::vector<typename L::Acc> factors(const int64_t sizes[4], const void* gate,
                                     const int64_t gs[2], double s,
                                     std::vector<typename L::Acc>* sig_out) {
  using T = typename L::T;
  using Acc = typename L::Acc;
  const T* g = static_cast<const T*>(gate);
  const int64_t N = sizes[0], C = sizes[1];
  std::vector<Acc> a(size_t(N * C));
  if (sig_out) sig_out->resize(size_t(N * C));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      const double v = double(L::load(g[n * gs[0] + c * gs[1]]));
      const double sg = 1.0 / (1.0 + std::exp(-v));
      a[size_t(n * C + c)] = Acc(s * sg);
      if (sig_out) (*sig_out)[size_t(n * C + c)] = Acc(sg);
    }
  return a;
}

template <class L>
FRT_CLONES void fwd_impl(const SeResidualParams& p) {
  using T = typename L::T;
  using Acc = typename L::Acc;
  const int64_t N = p.sizes[0], C = p.sizes[1], H = p.sizes[2], W = p.sizes[3];
  const std::vector<Acc> fac =
      factors<L>(p.sizes, p.gate, p.gate_strides, load_scale<L>(p.scale, p.scale_float32), nullptr);
  const Acc* a = fac.data();
  const T* X = static_cast<const T*>(p.x);
  const T* S = static_cast<const T*>(p.shortcut);
  T* Y = static_cast<T*>(p.y);
  const Layout lay = layout_of(p.sizes, {p.x_strides, p.shortcut_strides, p.y_strides});
  const int64_t HW = H * W;
  const bool par = N * C * HW >= (1 << 15);
  if (lay == kChannelsLast) {
    constexpr int64_t kPix = 64;
    const int64_t blocks = (HW + kPix - 1) / kPix;
#pragma omp parallel for schedule(static) if (par)
    for (int64_t t = 0; t < N * blocks; ++t) {
      const int64_t n = t / blocks, p0 = (t % blocks) * kPix;
      const int64_t p1 = p0 + kPix < HW ? p0 + kPix : HW;
      const Acc* an = a + n * C;
      for (int64_t q = p0; q < p1; ++q) {
        const T* x = X + n * p.x_strides[0] + q * C;
        const T* sc = S + n * p.shortcut_strides[0] + q * C;
        T* y = Y + n * p.y_strides[0] + q * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) y[c] = L::store(L::load(sc[c]) + an[c] * L::load(x[c]));
      }
    }
  } else if (lay == kPlanes) {
#pragma omp parallel for schedule(static) if (par)
    for (int64_t t = 0; t < N * C; ++t) {
      const int64_t n = t / C, c = t % C;
      const T* x = X + n * p.x_strides[0] + c * p.x_strides[1];
      const T* sc = S + n * p.shortcut_strides[0] + c * p.shortcut_strides[1];
      T* y = Y + n * p.y_strides[0] + c * p.y_strides[1];
      const Acc f = a[t];
#pragma omp simd
      for (int64_t i = 0; i < HW; ++i) y[i] = L::store(L::load(sc[i]) + f * L::load(x[i]));
    }
  } else {
#pragma omp parallel for schedule(static) if (par)
    for (int64_t t = 0; t < N * C; ++t) {
      const int64_t n = t / C, c = t % C;
      const Acc f = a[t];
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w) {
          const T xv = X[n * p.x_strides[0] + c * p.x_strides[1] + h * p.x_strides[2] + w * p.x_strides[3]];
          const T sv = S[n * p.shortcut_strides[0] + c * p.shortcut_strides[1] +
                         h * p.shortcut_strides[2] + w * p.shortcut_strides[3]];
          Y[n * p.y_strides[0] + c * p.y_strides[1] + h * p.y_strides[2] + w * p.y_strides[3]] =
              L::store(L::load(sv) + f * L::load(xv));
        }
    }
  }
}

template <class L>
FRT_CLONES void bwd_impl(const SeResidualBackwardParams& p) {
  using T = typename L::T;
  using Acc = typename L::Acc;
  const int64_t N = p.sizes[0], C = p.sizes[1], H = p.sizes[2], W = p.sizes[3];
  std::vector<Acc> sig;
  const double s = load_scale<L>(p.scale, p.scale_float32);
  const std::vector<Acc> fac = factors<L>(p.sizes, p.gate, p.gate_strides, s, &sig);
  const Acc* a = fac.data();
  const T* X = static_cast<const T*>(p.x);
  const T* GO = static_cast<const T*>(p.grad_out);
  T* DX = static_cast<T*>(p.grad_x);
  const Layout lay = layout_of(p.sizes, {p.x_strides, p.grad_out_strides, p.grad_x_strides});
  const int64_t HW = H * W;
  const bool par = N * C * HW >= (1 << 15);
  std::vector<Acc> gx(size_t(N * C), Acc(0));
  Acc* G = gx.data();
  if (lay == kChannelsLast) {
    constexpr int64_t kCh = 64;  // channel block: one task sums its channels over all pixels
    const int64_t cb = (C + kCh - 1) / kCh;
#pragma omp parallel for schedule(static) if (par)
    for (int64_t t = 0; t < N * cb; ++t) {
      const int64_t n = t / cb, c0 = (t % cb) * kCh;
      const int64_t c1 = c0 + kCh < C ? c0 + kCh : C, len = c1 - c0;
      Acc acc[kCh];
      for (int64_t j = 0; j < kCh; ++j) acc[j] = Acc(0);
      const Acc* an = a + n * C + c0;
      for (int64_t q = 0; q < HW; ++q) {
        const T* x = X + n * p.x_strides[0] + q * C + c0;
        const T* go = GO + n * p.grad_out_strides[0] + q * C + c0;
        T* dx = DX + n * p.grad_x_strides[0] + q * C + c0;
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) {
          const Acc g = L::load(go[j]);
          dx[j] = L::store(g * an[j]);
          acc[j] += g * L::load(x[j]);
        }
      }
      for (int64_t j = 0; j < len; ++j) G[n * C + c0 + j] = acc[j];
    }
  } else if (lay == kPlanes) {
#pragma omp parallel for schedule(static) if (par)
    for (int64_t t = 0; t < N * C; ++t) {
      const int64_t n = t / C, c = t % C;
      const T* x = X + n * p.x_strides[0] + c * p.x_strides[1];
      const T* go = GO + n * p.grad_out_strides[0] + c * p.grad_out_strides[1];
      T* dx = DX + n * p.grad_x_strides[0] + c * p.grad_x_strides[1];
      const Acc f = a[t];
      Acc s = Acc(0);
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < HW; ++i) {
        const Acc g = L::load(go[i]);
        dx[i] = L::store(g * f);
        s += g * L::load(x[i]);
      }
      G[t] = s;
    }
  } else {
#pragma omp parallel for schedule(static) if (par)
    for (int64_t t = 0; t < N * C; ++t) {
      const int64_t n = t / C, c = t % C;
      const Acc f = a[t];
      Acc s = Acc(0);
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w) {
          const Acc g = L::load(GO[n * p.grad_out_strides[0] + c * p.grad_out_strides[1] +
                                   h * p.grad_out_strides[2] + w * p.grad_out_strides[3]]);
          const Acc xv = L::load(X[n * p.x_strides[0] + c * p.x_strides[1] + h * p.x_strides[2] +
                                   w * p.x_strides[3]]);
          DX[n * p.grad_x_strides[0] + c * p.grad_x_strides[1] + h * p.grad_x_strides[2] +
             w * p.grad_x_strides[3]] = L::store(g * f);
          s += g * xv;
        }
      G[t] = s;
    }
  }
  T* DG = static_cast<T*>(p.grad_gate);
  double ds = 0.0;
  for (int64_t t = 0; t < N * C; ++t) {
    const double sg = double(sig[size_t(t)]), g = double(G[t]);
    DG[t] = L::store(Acc(g * s * sg * (1.0 - sg)));
    ds += g * sg;
  }
  if (p.scale_float32)
    *static_cast<float*>(p.grad_scale) = float(ds);
  else
    *static_cast<T*>(p.grad_scale) = L::store(Acc(ds));
}

bool bad_sizes(const int64_t sizes[4]) {
  for (int d = 0; d < 4; ++d)
    if (sizes[d] < 0) return true;
  return false;
}

}  // namespace

Status se_residual_cpu(const SeResidualParams& p) {
  if (bad_sizes(p.sizes)) return Status::kInvalidArgument;
  if (p.sizes[0] * p.sizes[1] * p.sizes[2] * p.sizes[3] == 0) return Status::kOk;
  if (!p.x || !p.gate || !p.shortcut || !p.scale || !p.y) return Status::kInvalidArgument;
  switch (p.dtype) {
    case DType::kFloat32: fwd_impl<F32>(p); return Status::kOk;
    case DType::kBFloat16: fwd_impl<BF16>(p); return Status::kOk;
    case DType::kFloat64: fwd_impl<F64>(p); return Status::kOk;
    default: return Status::kUnsupportedDtype;
  }
}

Status se_residual_backward_cpu(const SeResidualBackwardParams& p) {
  if (bad_sizes(p.sizes)) return Status::kInvalidArgument;
  if (!p.gate || !p.scale || !p.grad_gate || !p.grad_scale) return Status::kInvalidArgument;
  if (p.sizes[2] * p.sizes[3] > 0 && p.sizes[0] * p.sizes[1] > 0 &&
      (!p.x || !p.grad_out || !p.grad_x))
    return Status::kInvalidArgument;
  switch (p.dtype) {
    case DType::kFloat32: bwd_impl<F32>(p); return Status::kOk;
    case DType::kBFloat16: bwd_impl<BF16>(p); return Status::kOk;
    case DType::kFloat64: bwd_impl<F64>(p); return Status::kOk;
    default: return Status::kUnsupportedDtype;
  }
}

}  // namespace flamingo_rt
