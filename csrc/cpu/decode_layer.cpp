// Fused decode steps on the CPU: see csrc/include/flamingo_rt/decode_layer.h.
//
// Each step is a fixed sequence: the products through small_linear_cpu (OpenMP over weight
// rows), the attention through decode_attention_cpu, and the norms, rotary terms, cache
// writes, activations and residual adds as single-threaded loops over the B x D (or B x F)
// elements -- a few microseconds at the sizes of a decode step. Scratch vectors are per
// call; nothing is kept between calls.
#include <cmath>
#include <vector>

#include "cpu_act.h"
#include "cpu_math.h"
#include "flamingo_rt/kernels.h"

namespace flamingo_rt {
using namespace cpu;  // element types and scalar math: cpu_math.h
namespace {

// y (B, N) = x (B, K) W^T (+ b), contiguous rows.
Status product(const void* x, const void* w, const void* b, void* y, int64_t B, int64_t K, int64_t N, DType dt) {
  SmallLinearParams p;
  p.x = x;
  p.w = w;
  p.bias = b;
  p.y = y;
  p.B = B;
  p.K = K;
  p.N = N;
  p.x_row_stride = K;
  p.w_row_stride = K;
  p.dtype = dt;
  return small_linear_cpu(p);
}

template <typename E>
using Vec = std::vector<typename E::T>;

// y = w * round(x / rms(x)) per row of x (B, D), as lm.RMSNorm: x taken to float32 (for
// float64 too), the normalization in float32, rounded to the activation dtype, then the
// weight in that dtype.
template <typename E>
void rms_norm(const typename E::T* x, const typename E::T* w, typename E::T* y, int64_t B, int64_t D, float eps) {
  using Acc = typename E::Acc;
  for (int64_t b = 0; b < B; ++b) {
    const typename E::T* xr = x + b * D;
    float ss = 0;
    for (int64_t d = 0; d < D; ++d) {
      const float v = static_cast<float>(E::load(xr[d]));
      ss += v * v;
    }
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
    for (int64_t d = 0; d < D; ++d) {
      const float n = static_cast<float>(E::load(xr[d])) * inv;
      y[b * D + d] = E::store(E::load(w[d]) * E::load(E::store(Acc(n))));
    }
  }
}

// y = (x - mean) / sqrt(var + eps) * w + b per row (nn.LayerNorm, biased variance), one
// rounding at the end.
template <typename E>
void layer_norm(const typename E::T* x, const typename E::T* w, const typename E::T* bias, typename E::T* y, int64_t B,
                int64_t D, float eps) {
  using Acc = typename E::Acc;
  for (int64_t b = 0; b < B; ++b) {
    const typename E::T* xr = x + b * D;
    Acc s = 0;
    for (int64_t d = 0; d < D; ++d) s += E::load(xr[d]);
    const Acc mean = s / Acc(D);
    Acc ss = 0;
    for (int64_t d = 0; d < D; ++d) {
      const Acc c = E::load(xr[d]) - mean;
      ss += c * c;
    }
    const Acc rstd = Acc(1) / std::sqrt(ss / Acc(D) + Acc(eps));
    for (int64_t d = 0; d < D; ++d)
      y[b * D + d] = E::store((E::load(xr[d]) - mean) * rstd * E::load(w[d]) + E::load(bias[d]));
  }
}

// Rotate-half rotary embedding of x (B, heads, Dh) in place: x * c + rotate_half(x) * s with
// the float32 tables rounded to the activation dtype and each term rounded (apply_rotary).
template <typename E>
void rope(typename E::T* x, const float* cos, const float* sin, int64_t B, int64_t heads, int64_t Dh) {
  using Acc = typename E::Acc;
  const int64_t half = Dh / 2;
  std::vector<Acc> c(static_cast<size_t>(Dh)), s(static_cast<size_t>(Dh)), t(static_cast<size_t>(Dh));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t d = 0; d < Dh; ++d) {
      c[d] = E::load(E::store(Acc(cos[b * Dh + d])));
      s[d] = E::load(E::store(Acc(sin[b * Dh + d])));
    }
    for (int64_t h = 0; h < heads; ++h) {
      typename E::T* xr = x + (b * heads + h) * Dh;
      for (int64_t d = 0; d < Dh; ++d) t[d] = E::load(xr[d]);
      for (int64_t d = 0; d < Dh; ++d) {
        const Acc rot = d < half ? -t[d + half] : t[d - half];
        const Acc a = E::load(E::store(t[d] * c[d]));
        const Acc r = E::load(E::store(rot * s[d]));
        xr[d] = E::store(a + r);
      }
    }
  }
}

// h = h + g * y, rounded once (addcmul; g = 1 for a plain residual add).
template <typename E>
void residual_add(typename E::T* h, const typename E::T* y, typename E::Acc g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] = E::store(E::load(h[i]) + g * E::load(y[i]));
}

// tanh of a gate parameter in its dtype (block.gate(): param.tanh().to(dtype)), or 1.
template <typename E>
typename E::Acc gate_value(const void* gate) {
  if (!gate) return typename E::Acc(1);
  return E::load(E::store(std::tanh(E::load(*static_cast<const typename E::T*>(gate)))));
}

template <typename E>
Status decoder_layer(const DecoderLayerStepParams& p) {
  using T = typename E::T;
  using Acc = typename E::Acc;
  const int64_t B = p.B, D = p.D, H = p.H, Hkv = p.Hkv, Dh = p.Dh, F = p.F;
  T* h = static_cast<T*>(p.h);
  Vec<E> x(static_cast<size_t>(B * D)), q(static_cast<size_t>(B * H * Dh)), k(static_cast<size_t>(B * Hkv * Dh)),
      v(static_cast<size_t>(B * Hkv * Dh)), att(static_cast<size_t>(B * H * Dh)), o(static_cast<size_t>(B * D));
  rms_norm<E>(h, static_cast<const T*>(p.ln1_w), x.data(), B, D, p.eps1);
  Status s;
  if ((s = product(x.data(), p.q_w, p.q_b, q.data(), B, D, H * Dh, p.dtype)) != Status::kOk) return s;
  if ((s = product(x.data(), p.k_w, p.k_b, k.data(), B, D, Hkv * Dh, p.dtype)) != Status::kOk) return s;
  if ((s = product(x.data(), p.v_w, p.v_b, v.data(), B, D, Hkv * Dh, p.dtype)) != Status::kOk) return s;
  rope<E>(q.data(), p.cos, p.sin, B, H, Dh);
  rope<E>(k.data(), p.cos, p.sin, B, Hkv, Dh);
  T* kc = static_cast<T*>(p.k_cache);
  T* vc = static_cast<T*>(p.v_cache);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < Hkv; ++j)
      for (int64_t d = 0; d < Dh; ++d) {
        kc[b * p.k_sb + j * p.k_sh + p.slot * p.k_ss + d] = k[(b * Hkv + j) * Dh + d];
        vc[b * p.v_sb + j * p.v_sh + p.slot * p.v_ss + d] = v[(b * Hkv + j) * Dh + d];
      }
  DecodeAttentionParams a;
  a.q = q.data();
  a.k = kc;
  a.v = vc;
  a.mask = p.mask;
  a.out = att.data();
  a.B = B;
  a.H = H;
  a.Hkv = Hkv;
  a.S = p.E;
  a.Dh = Dh;
  a.q_sb = H * Dh;
  a.q_sh = Dh;
  a.k_sb = p.k_sb;
  a.k_sh = p.k_sh;
  a.k_ss = p.k_ss;
  a.v_sb = p.v_sb;
  a.v_sh = p.v_sh;
  a.v_ss = p.v_ss;
  a.mask_sb = p.mask_sb;
  a.scale = p.scale;
  a.dtype = p.dtype;
  if ((s = decode_attention_cpu(a)) != Status::kOk) return s;
  if ((s = product(att.data(), p.o_w, p.o_b, o.data(), B, H * Dh, D, p.dtype)) != Status::kOk) return s;
  residual_add<E>(h, o.data(), Acc(1), B * D);
  rms_norm<E>(h, static_cast<const T*>(p.ln2_w), x.data(), B, D, p.eps2);
  Vec<E> g(static_cast<size_t>(B * F)), u(static_cast<size_t>(B * F));
  if ((s = product(x.data(), p.gate_w, p.gate_b, g.data(), B, D, F, p.dtype)) != Status::kOk) return s;
  if ((s = product(x.data(), p.up_w, p.up_b, u.data(), B, D, F, p.dtype)) != Status::kOk) return s;
  for (int64_t i = 0; i < B * F; ++i)  // silu(g) rounded, then its product with u (silu_mul)
    g[i] = E::store(E::load(E::store(act_fwd<Act::kSilu>(E::load(g[i])))) * E::load(u[i]));
  if ((s = product(g.data(), p.down_w, p.down_b, o.data(), B, F, D, p.dtype)) != Status::kOk) return s;
  residual_add<E>(h, o.data(), Acc(1), B * D);
  return Status::kOk;
}

template <typename E>
Status xattn_block(const XattnBlockStepParams& p) {
  using T = typename E::T;
  using Acc = typename E::Acc;
  const int64_t B = p.B, D = p.D, H = p.H, Dh = p.Dh, F = p.F, I = p.H * p.Dh;
  T* h = static_cast<T*>(p.h);
  Vec<E> x(static_cast<size_t>(B * D)), q(static_cast<size_t>(B * I)), att(static_cast<size_t>(B * I)),
      o(static_cast<size_t>(B * D));
  layer_norm<E>(h, static_cast<const T*>(p.attn_ln_w), static_cast<const T*>(p.attn_ln_b), x.data(), B, D, p.attn_eps);
  Status s;
  if ((s = product(x.data(), p.q_w, nullptr, q.data(), B, D, I, p.dtype)) != Status::kOk) return s;
  std::vector<uint8_t> ones;
  const T* kb = static_cast<const T*>(p.k);
  const T* vb = static_cast<const T*>(p.v);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t m = p.media_index[b];
    T* out = att.data() + b * I;
    if (m < 0) {  // no image yet: the attention gives exactly 0
      for (int64_t i = 0; i < I; ++i) out[i] = E::store(Acc(0));
      continue;
    }
    const int64_t first = p.all_previous ? 0 : m, S = (m - first + 1) * p.N;
    if (ones.size() < static_cast<size_t>(S)) ones.assign(static_cast<size_t>(S), 1);
    DecodeAttentionParams a;
    a.q = q.data() + b * I;
    a.k = kb + b * p.k_sb + first * p.k_sm;
    a.v = vb + b * p.v_sb + first * p.v_sm;
    a.mask = ones.data();
    a.out = out;
    a.B = 1;
    a.H = H;
    a.Hkv = H;
    a.S = S;
    a.Dh = Dh;
    a.q_sb = I;
    a.q_sh = Dh;
    a.k_sb = 0;
    a.k_sh = p.k_sh;
    a.k_ss = p.k_sn;
    a.v_sb = 0;
    a.v_sh = p.v_sh;
    a.v_ss = p.v_sn;
    a.mask_sb = 0;
    a.scale = p.scale;
    a.dtype = p.dtype;
    if ((s = decode_attention_cpu(a)) != Status::kOk) return s;
  }
  if ((s = product(att.data(), p.out_w, nullptr, o.data(), B, I, D, p.dtype)) != Status::kOk) return s;
  residual_add<E>(h, o.data(), gate_value<E>(p.attn_gate), B * D);
  layer_norm<E>(h, static_cast<const T*>(p.ff_ln_w), static_cast<const T*>(p.ff_ln_b), x.data(), B, D, p.ff_eps);
  Vec<E> f(static_cast<size_t>(B * F));
  if ((s = product(x.data(), p.fc1_w, nullptr, f.data(), B, D, F, p.dtype)) != Status::kOk) return s;
  if (p.squared_relu) {  // relu_ (exact in the activation dtype) then square_, rounded
    for (int64_t i = 0; i < B * F; ++i) {
      const Acc r = act_fwd<Act::kRelu>(E::load(f[i]));
      f[i] = E::store(r * r);
    }
  } else {
    for (int64_t i = 0; i < B * F; ++i) f[i] = E::store(act_fwd<Act::kGelu>(E::load(f[i])));
  }
  if ((s = product(f.data(), p.fc2_w, nullptr, o.data(), B, F, D, p.dtype)) != Status::kOk) return s;
  residual_add<E>(h, o.data(), gate_value<E>(p.ff_gate), B * D);
  return Status::kOk;
}

template <template <typename> class Run, typename P>
Status by_dtype(const P& p) {
  switch (p.dtype) {
    case DType::kFloat32: return Run<F32>::run(p);
    case DType::kBFloat16: return Run<BF16>::run(p);
    case DType::kFloat64: return Run<F64>::run(p);
    default: return Status::kUnsupportedDtype;
  }
}

template <typename E>
struct RunDecoderLayer {
  static Status run(const DecoderLayerStepParams& p) { return decoder_layer<E>(p); }
};
template <typename E>
struct RunXattnBlock {
  static Status run(const XattnBlockStepParams& p) { return xattn_block<E>(p); }
};

}  // namespace

Status decoder_layer_step_cpu(const DecoderLayerStepParams& p) {
  if (!p.h || !p.ln1_w || !p.ln2_w || !p.q_w || !p.k_w || !p.v_w || !p.o_w || !p.gate_w || !p.up_w || !p.down_w ||
      !p.cos || !p.sin || !p.k_cache || !p.v_cache || !p.mask)
    return Status::kInvalidArgument;
  if (p.B < 0 || p.B > kSmallLinearMaxRows || p.D < 1 || p.H < 1 || p.Hkv < 1 || p.H % p.Hkv || p.Dh < 2 || p.Dh % 2 ||
      p.F < 1 || p.E < 1 || p.E > p.S || p.slot < 0 || p.slot >= p.E)
    return Status::kInvalidArgument;
  if (p.B == 0) return Status::kOk;
  return by_dtype<RunDecoderLayer>(p);
}

Status xattn_block_step_cpu(const XattnBlockStepParams& p) {
  if (!p.h || !p.attn_ln_w || !p.attn_ln_b || !p.q_w || !p.out_w || !p.k || !p.v || !p.media_index || !p.ff_ln_w ||
      !p.ff_ln_b || !p.fc1_w || !p.fc2_w)
    return Status::kInvalidArgument;
  if (p.B < 0 || p.B > kSmallLinearMaxRows || p.D < 1 || p.H < 1 || p.Dh < 1 || p.F < 1 || p.M < 0 || p.N < 1)
    return Status::kInvalidArgument;
  if (p.all_previous && p.M > 1 && (p.k_sm != p.N * p.k_sn || p.v_sm != p.N * p.v_sn)) return Status::kInvalidArgument;
  for (int64_t b = 0; b < p.B; ++b)
    if (p.media_index[b] >= p.M || p.media_index[b] < -1) return Status::kInvalidArgument;
  if (p.B == 0) return Status::kOk;
  return by_dtype<RunXattnBlock>(p);
}

}  // namespace flamingo_rt
