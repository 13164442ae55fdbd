// Decode attention on the CPU: see csrc/include/flamingo_rt/decode_attention.h.
//
// OpenMP over (batch row, query head). Per problem: pass 1 reads K once (scores of the
// visible slots into a per-thread scratch, their max), pass 2 turns the scores into
// exp(s - max) and reads V once, accumulating p * v in float32 (float64 for float64).
// Dot products and row updates are `omp simd` loops over Dh, compiled per ISA level; on
// AVX-512 CPUs float32 / bfloat16 heads of Dh = 16, 32, ..., 128 take an intrinsics path
// (avx512::problem below: 16 slots' scores reduced together, q and the output in registers).
// Hot bf16 call of the medium model's step (16 heads x 64, 700 slots): 132 -> 69 us, the
// same outputs; the bf16 decode step 0.7-1.2 ms faster (float32 is bound by reading K/V).
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
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

#ifdef FRT_X86_ISA
// AVX-512 path for float32 / bfloat16 with Dh a multiple of 16, at most 128 (the decode
// step's heads): the per-slot `dot` / `axpy` calls above spent more on the call, the
// reduction of each 16-lane sum and the accumulator's loads and stores than on the 64
// products. Here q and the output accumulator stay in registers, and the scores of 16 slots
// are summed together (reduce16: one vector of 16 sums from 16 vectors of partial sums).
namespace avx512 {

template <bool BF>
FRT_TARGET_AVX512 inline __attribute__((always_inline)) __m512 load16(const void* p) {
  if constexpr (BF) {
    const __m256i h = _mm256_loadu_si256(static_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_loadu_ps(static_cast<const float*>(p));
  }
}

// Lane i of the result = the sum of the 16 lanes of p[i]. A tree of 128-bit-lane and
// in-lane shuffles (15 adds for 16 sums); it ends with lane L holding the sum of its input
// kPerm[L], so the inputs are taken in that order (kPerm is its own inverse).
FRT_TARGET_AVX512 inline __attribute__((always_inline)) __m512 reduce16(const __m512* p) {
  static constexpr int kPerm[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
  __m512 w[8], x[4];
  for (int i = 0; i < 8; ++i) {
    const __m512 a = p[kPerm[2 * i]], b = p[kPerm[2 * i + 1]];
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int j = 0; j < 4; ++j)
    x[j] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * j], w[2 * j + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * j], w[2 * j + 1], 0xDD));
  const __m512 y0 = _mm512_add_ps(_mm512_unpacklo_ps(x[0], x[1]), _mm512_unpackhi_ps(x[0], x[1]));
  const __m512 y1 = _mm512_add_ps(_mm512_unpacklo_ps(x[2], x[3]), _mm512_unpackhi_ps(x[2], x[3]));
  return _mm512_add_ps(_mm512_shuffle_ps(y0, y1, 0x44), _mm512_shuffle_ps(y0, y1, 0xEE));
}

// One (row, head) problem: qf (Dh) the scaled query in float32, k / v rows of Dh elements
// (slot strides k_ss, v_ss), m the visibility of the S slots, sc scratch of S floats;
// writes the Dh outputs (0 when no slot is visible). Same passes as the portable path.
template <bool BF>
FRT_TARGET_AVX512 void problem(const float* qf, const void* k, int64_t k_ss, const void* v, int64_t v_ss, const uint8_t* m,
                         int64_t S, int64_t D, float* sc, void* out) {
  using T = typename std::conditional<BF, uint16_t, float>::type;
  const T* kb = static_cast<const T*>(k);
  const T* vb = static_cast<const T*>(v);
  const int nq = static_cast<int>(D / 16);
  const float ninf = -std::numeric_limits<float>::infinity();
  __m512 q[8];
  for (int c = 0; c < nq; ++c) q[c] = _mm512_loadu_ps(qf + 16 * c);
  __m512 vmax = _mm512_set1_ps(ninf);
  bool any_visible = false;
  for (int64_t s0 = 0; s0 < S; s0 += 16) {
    const int n = S - s0 < 16 ? static_cast<int>(S - s0) : 16;
    __m512 part[16];
    __mmask16 vis = 0;
    for (int i = 0; i < 16; ++i) {
      if (i < n && m[s0 + i]) {
        const T* kr = kb + (s0 + i) * k_ss;
        __m512 a = _mm512_mul_ps(q[0], load16<BF>(kr));
        for (int c = 1; c < nq; ++c) a = _mm512_fmadd_ps(q[c], load16<BF>(kr + 16 * c), a);
        part[i] = a;
        vis = static_cast<__mmask16>(vis | (1u << i));
      } else {
        part[i] = _mm512_setzero_ps();
      }
    }
    any_visible |= vis != 0;
    const __m512 s16 = _mm512_mask_blend_ps(vis, _mm512_set1_ps(ninf), reduce16(part));
    _mm512_mask_storeu_ps(sc + s0, static_cast<__mmask16>((1u << n) - 1u), s16);
    vmax = _mm512_max_ps(s16, vmax);  // a NaN score is not the max (maxps takes its second operand)
  }
  const float mx = _mm512_reduce_max_ps(vmax);
  T* dst = static_cast<T*>(out);
  if (any_visible && !(mx > ninf)) {  // every visible score NaN or -inf: softmax is NaN, as the reference
    for (int64_t d = 0; d < D; ++d) dst[d] = BF ? T(BF16::store(std::numeric_limits<float>::quiet_NaN()))
                                                : T(std::numeric_limits<float>::quiet_NaN());
    return;
  }
  __m512 acc[8];
  for (int c = 0; c < nq; ++c) acc[c] = _mm512_setzero_ps();
  float sum = 0.f;
  if (mx > ninf) {
#pragma omp simd reduction(+ : sum)
    for (int64_t s = 0; s < S; ++s) {  // unseen slots hold -inf: exp gives 0
      const float e = exp_f32(sc[s] - mx);
      sc[s] = e;
      sum += e;
    }
    for (int64_t s = 0; s < S; ++s) {
      if (!m[s]) continue;
      const __m512 e = _mm512_set1_ps(sc[s]);
      const T* vr = vb + s * v_ss;
      for (int c = 0; c < nq; ++c) acc[c] = _mm512_fmadd_ps(e, load16<BF>(vr + 16 * c), acc[c]);
    }
  }
  const __m512 inv = _mm512_set1_ps(sum > 0.f ? 1.f / sum : 0.f);
  alignas(64) float o[128];
  for (int c = 0; c < nq; ++c) _mm512_store_ps(o + 16 * c, _mm512_mul_ps(acc[c], inv));
  for (int64_t d = 0; d < D; ++d) dst[d] = BF ? T(BF16::store(o[d])) : T(o[d]);
}

}  // namespace avx512
#endif

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
#ifdef FRT_X86_ISA
  const bool fast = D % 16 == 0 && D <= 128 && isa::avx512();
#endif
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
#ifdef FRT_X86_ISA
      if constexpr (!std::is_same<E, F64>::value) {
        if (fast) {
          avx512::problem<std::is_same<E, BF16>::value>(qf.data(), kb, p.k_ss, vb, p.v_ss, m, S, D, score.data(),
                                                        out + bh * D);
          continue;
        }
      }
#endif
      Acc mx = -std::numeric_limits<Acc>::infinity();
      bool any_visible = false;
      for (int64_t s = 0; s < S; ++s) {
        if (!m[s]) continue;
        const Acc sc = dot<E>(qf.data(), kb + s * p.k_ss, D);
        score[s] = sc;
        mx = sc > mx ? sc : mx;
        any_visible = true;
      }
      for (int64_t d = 0; d < D; ++d) acc[d] = 0;
      Acc sum = 0;
      if (any_visible && !(mx > -std::numeric_limits<Acc>::infinity())) {
        // every visible score NaN or -inf: the softmax is NaN, as the reference's
        T* o = out + bh * D;
        for (int64_t d = 0; d < D; ++d) o[d] = E::store(std::numeric_limits<Acc>::quiet_NaN());
        continue;
      }
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
