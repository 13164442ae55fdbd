// Decode attention on the CPU: see csrc/include/flamingo_rt/decode_attention.h.
//
// OpenMP over (batch row, query head). Per problem: pass 1 reads K once (scores of the
// visible slots into a per-thread scratch, their max), pass 2 turns the scores into
// exp(s - max) and reads V once, accumulating p * v in float32 (float64 for float64).
// Dot products and row updates are `omp simd` loops over Dh, compiled per ISA level.
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_math.h"
#include "flamingo_rt/kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace flamingo_rt {
using namespace cpu;  // element types and scalar math: cpu_math.h
namespace {

template <typename E>
FRT_CLONES typename E::Acc dot(const typename E::Acc* q, const typename E::T* k, int64_t D) {
  typename E::Acc s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) s += q[d] * E::load(k[d]);
  return s;
}

template <typename E>
FRT_CLONES void axpy(typename E::Acc a, const typename E::T* v, typename E::Acc* acc, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) acc[d] += a * E::load(v[d]);
}

template <typename E>
Status run(const DecodeAttentionParams& p) {
  using T = typename E::T;
  using Acc = typename E::Acc;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  const int64_t B = p.B, H = p.H, S = p.S, D = p.Dh, G = p.H / p.Hkv;
  const Acc scale = Acc(p.scale);
  // one thread per problem unless the cache is large enough to pay for the fork
  const int64_t bytes = B * p.Hkv * S * D * int64_t(sizeof(T)) * 2;
#pragma omp parallel if (bytes > (256 << 10) && B * H > 1)
  {
    std::vector<Acc> score(static_cast<size_t>(S)), acc(static_cast<size_t>(D)), qf(static_cast<size_t>(D));
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H, h = bh % H, hk = h / G;
      const T* qr = q + b * p.q_sb + h * p.q_sh;
      const T* kb = k + b * p.k_sb + hk * p.k_sh;
      const T* vb = v + b * p.v_sb + hk * p.v_sh;
      const uint8_t* m = p.mask + b * p.mask_sb;
      for (int64_t d = 0; d < D; ++d) qf[d] = E::load(qr[d]) * scale;
      Acc mx = -std::numeric_limits<Acc>::infinity();
      for (int64_t s = 0; s < S; ++s) {
        if (!m[s]) continue;
        const Acc sc = dot<E>(qf.data(), kb + s * p.k_ss, D);
        score[s] = sc;
        mx = sc > mx ? sc : mx;
      }
      for (int64_t d = 0; d < D; ++d) acc[d] = 0;
      Acc sum = 0;
      if (mx > -std::numeric_limits<Acc>::infinity()) {
        for (int64_t s = 0; s < S; ++s) {
          if (!m[s]) continue;
          const Acc e = std::exp(score[s] - mx);
          sum += e;
          axpy<E>(e, vb + s * p.v_ss, acc.data(), D);
        }
      }
      const Acc inv = sum > 0 ? Acc(1) / sum : Acc(0);
      T* o = out + bh * D;
      for (int64_t d = 0; d < D; ++d) o[d] = E::store(acc[d] * inv);
    }
  }
  return Status::kOk;
}

}  // namespace

Status decode_attention_cpu(const DecodeAttentionParams& p) {
  if (!p.q || !p.k || !p.v || !p.mask || !p.out || p.B < 0 || p.H < 0 || p.Hkv < 1 || p.S < 0 || p.Dh < 0 ||
      (p.H > 0 && p.H % p.Hkv != 0))
    return Status::kInvalidArgument;
  if (p.B == 0 || p.H == 0 || p.Dh == 0) return Status::kOk;
  switch (p.dtype) {
    case DType::kFloat32: return run<F32>(p);
    case DType::kBFloat16: return run<BF16>(p);
    case DType::kFloat64: return run<F64>(p);
    default: return Status::kUnsupportedDtype;
  }
}

}  // namespace flamingo_rt
