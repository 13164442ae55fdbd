// bfloat16 attention on Intel AMX tiles (see attention_amx.h).
//
// Layouts (per call, i.e. per (image, head) task; the queries of a task share its keys):
//   kw: the keys as 32-bit words (pairs of bfloat16 along dh), transposed: word w of key n
//       at kw[w * Nk + n], Nk = N rounded up to 64 (zero keys past N). A tile row of it is
//       16 keys x one word: the B operand of S = Q K^T (16 x 32 bfloat16 of Q per A tile).
//   vp: the values as interleaved row pairs: vp[i * dh + d] = (v[2i][d], v[2i+1][d]), rows
//       past N zero, N rounded up to 32: the B operand of O = P V (the tiles' pair layout).
// Per block of 16 queries: S (16 x Nk float32) from tiles 0-3 (64 keys at a time), the
// softmax per row in float32 (AVX-512) into P (16 x Nv bfloat16, zero past N), then O
// (16 x dh float32) from tiles 0-3 (64 columns at a time), normalized and rounded (RNE) into
// the output rows. Tiles 4 and 5 hold the A and B operands; every tile is 16 rows x 64 bytes.
#include "attention_amx.h"

#include "flamingo_rt/kernels.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__linux__) && \
    ((defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11) || (defined(__clang__) && __clang_major__ >= 12))
#define FRT_HAVE_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define FRT_HAVE_AMX 0
#endif

#if FRT_HAVE_AMX && defined(__GNUC__) && !defined(__clang__)
// GCC 12 flags the intrinsics' own _mm512_undefined_* placeholders (set1, reductions).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace flamingo_rt {
namespace amx {

#if FRT_HAVE_AMX

namespace {

constexpr long kArchReqXcompPerm = 0x1023;  // arch_prctl: ask for an XSAVE feature
constexpr long kXfeatureXtiledata = 18;     // AMX tile data

bool hardware_and_os() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = (d >> 24) & 1u, bf16 = (d >> 22) & 1u, avx512f = (b >> 16) & 1u, avx512bw = (b >> 30) & 1u;
  if (!(tile && bf16 && avx512f && avx512bw)) return false;
  unsigned a1 = 0, b1 = 0, c1 = 0, d1 = 0;
  if (!__get_cpuid_count(7, 1, &a1, &b1, &c1, &d1) || !((a1 >> 5) & 1u)) return false;  // avx512_bf16
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

struct TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

#define FRT_AMX_TARGET \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

FRT_AMX_TARGET inline void load_config() {
  TileConfig cfg;
  for (int t = 0; t < 6; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// exp(a), float32 x 16, the same scheme as cpu::exp_f32 (range reduction by ln 2, degree-7
// Taylor): 0 below -87.33, NaN stays NaN.
FRT_AMX_TARGET inline __m512 exp16(__m512 a) {
  const __m512 lo = _mm512_set1_ps(-87.33f);
  __m512 ac = _mm512_max_ps(lo, a);                         // NaN in a stays (second operand)
  ac = _mm512_min_ps(_mm512_set1_ps(88.0f), ac);
  const __m512 shifter = _mm512_set1_ps(12582912.0f);       // 1.5 * 2^23
  const __m512 k = _mm512_add_ps(_mm512_mul_ps(ac, _mm512_set1_ps(1.44269504088896341f)), shifter);
  const __m512i n = _mm512_sub_epi32(_mm512_castps_si512(k), _mm512_castps_si512(shifter));
  const __m512 kf = _mm512_sub_ps(k, shifter);
  __m512 r = _mm512_fnmadd_ps(kf, _mm512_set1_ps(0.693145751953125f), ac);
  r = _mm512_fnmadd_ps(kf, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23));
  const __m512 e = _mm512_mul_ps(p, scale);
  return _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(a, lo, _CMP_LT_OQ), _mm512_setzero_ps());
}

// r[0..15] (16 x 16 32-bit words) transposed in place.
FRT_AMX_TARGET inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // u[4i + e], 128-bit lane L: rows 4i..4i+3 at column 4L + e
  for (int e = 0; e < 4; ++e) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x88);
    const __m512i v1 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xDD);
    const __m512i w0 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x88);
    const __m512i w1 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xDD);
    r[e] = _mm512_shuffle_i32x4(v0, w0, 0x88);
    r[8 + e] = _mm512_shuffle_i32x4(v0, w0, 0xDD);
    r[4 + e] = _mm512_shuffle_i32x4(v1, w1, 0x88);
    r[12 + e] = _mm512_shuffle_i32x4(v1, w1, 0xDD);
  }
}

// Row n of keys or values given as two runs; nullptr past N.
inline const uint16_t* row_of(const Rows* runs, int64_t n) {
  if (n < runs[0].n) return runs[0].p + n * runs[0].ld;
  n -= runs[0].n;
  return n < runs[1].n ? runs[1].p + n * runs[1].ld : nullptr;
}

FRT_AMX_TARGET void pack_keys(const ImageAttention& a, int64_t Nk, uint32_t* kw) {
  const int64_t W = a.dh / 2;  // words per key
  for (int64_t n0 = 0; n0 < Nk; n0 += 16) {
    const uint16_t* rows[16];
    for (int r = 0; r < 16; ++r) rows[r] = n0 + r < a.N ? row_of(a.k, n0 + r) : nullptr;
    for (int64_t w0 = 0; w0 < W; w0 += 16) {
      __m512i x[16];
      for (int r = 0; r < 16; ++r)
        x[r] = rows[r] ? _mm512_loadu_si512(rows[r] + 2 * w0) : _mm512_setzero_si512();
      transpose16(x);
      for (int c = 0; c < 16; ++c) _mm512_storeu_si512(kw + (w0 + c) * Nk + n0, x[c]);
    }
  }
}

FRT_AMX_TARGET void pack_values(const ImageAttention& a, int64_t Nv, uint32_t* vp) {
  alignas(64) static const uint16_t kLo[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                              8,  40, 9,  41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                              24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo = _mm512_load_si512(kLo), hi = _mm512_load_si512(kHi);
  for (int64_t i = 0; i < Nv / 2; ++i) {
    const uint16_t* r0 = 2 * i < a.N ? row_of(a.v, 2 * i) : nullptr;
    const uint16_t* r1 = 2 * i + 1 < a.N ? row_of(a.v, 2 * i + 1) : nullptr;
    uint32_t* dst = vp + i * a.dh;
    for (int64_t d0 = 0; d0 < a.dh; d0 += 32) {
      const __m512i x0 = r0 ? _mm512_loadu_si512(r0 + d0) : _mm512_setzero_si512();
      const __m512i x1 = r1 ? _mm512_loadu_si512(r1 + d0) : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + d0, _mm512_permutex2var_epi16(x0, lo, x1));
      _mm512_storeu_si512(dst + d0 + 16, _mm512_permutex2var_epi16(x0, hi, x1));
    }
  }
}

// S[:, n0 : n0 + 64] = Q K^T for one block of 16 query rows (q: row stride q_ld elements).
FRT_AMX_TARGET inline void scores64(const uint16_t* q, int64_t q_ld, const uint32_t* kw, int64_t Nk,
                                    int64_t dh, int64_t n0, float* s) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t c = 0; c < dh / 32; ++c) {
    _tile_loadd(4, q + 32 * c, q_ld * 2);
    const uint32_t* b = kw + (16 * c) * Nk + n0;
    _tile_loadd(5, b, Nk * 4);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(5, b + 16, Nk * 4);
    _tile_dpbf16ps(1, 4, 5);
    _tile_loadd(5, b + 32, Nk * 4);
    _tile_dpbf16ps(2, 4, 5);
    _tile_loadd(5, b + 48, Nk * 4);
    _tile_dpbf16ps(3, 4, 5);
  }
  _tile_stored(0, s + n0, Nk * 4);
  _tile_stored(1, s + n0 + 16, Nk * 4);
  _tile_stored(2, s + n0 + 32, Nk * 4);
  _tile_stored(3, s + n0 + 48, Nk * 4);
}

// O[:, d0 : d0 + 16 * NT] = P V for one block (p: 16 x Nv bfloat16).
template <int NT>
FRT_AMX_TARGET inline void values(const uint16_t* p, int64_t Nv, const uint32_t* vp, int64_t dh, int64_t d0,
                                  float* o) {
  _tile_zero(0);
  if constexpr (NT > 1) _tile_zero(1);
  if constexpr (NT > 2) _tile_zero(2);
  if constexpr (NT > 3) _tile_zero(3);
  for (int64_t kc = 0; kc < Nv / 32; ++kc) {
    _tile_loadd(4, p + 32 * kc, Nv * 2);
    const uint32_t* b = vp + (16 * kc) * dh + d0;
    _tile_loadd(5, b, dh * 4);
    _tile_dpbf16ps(0, 4, 5);
    if constexpr (NT > 1) {
      _tile_loadd(5, b + 16, dh * 4);
      _tile_dpbf16ps(1, 4, 5);
    }
    if constexpr (NT > 2) {
      _tile_loadd(5, b + 32, dh * 4);
      _tile_dpbf16ps(2, 4, 5);
    }
    if constexpr (NT > 3) {
      _tile_loadd(5, b + 48, dh * 4);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
  _tile_stored(0, o + d0, dh * 4);
  if constexpr (NT > 1) _tile_stored(1, o + d0 + 16, dh * 4);
  if constexpr (NT > 2) _tile_stored(2, o + d0 + 32, dh * 4);
  if constexpr (NT > 3) _tile_stored(3, o + d0 + 48, dh * 4);
}

// Row r of S (N scores, then padding) -> P row (bfloat16 exp(scale s - max(scale s)), zero
// past N up to Nv); returns the row's sum of the float32 exponentials.
FRT_AMX_TARGET inline float softmax_row(const float* s, int64_t N, int64_t Nv, float scale, uint16_t* p) {
  __m512 mx = _mm512_set1_ps(-__builtin_inff()), mn = _mm512_set1_ps(__builtin_inff());
  int64_t n = 0;
  for (; n + 16 <= N; n += 16) {
    const __m512 x = _mm512_loadu_ps(s + n);
    mx = _mm512_max_ps(mx, x);
    mn = _mm512_min_ps(mn, x);
  }
  if (n < N) {
    const __mmask16 mk = __mmask16((1u << (N - n)) - 1);
    const __m512 x = _mm512_loadu_ps(s + n);
    mx = _mm512_mask_max_ps(mx, mk, mx, x);
    mn = _mm512_mask_min_ps(mn, mk, mn, x);
  }
  // max of scale * s (scale < 0 turns the minimum into it); NaN scores are missed by the
  // max but stay NaN below, and so does the row's output.
  const float m = scale >= 0.0f ? scale * _mm512_reduce_max_ps(mx) : scale * _mm512_reduce_min_ps(mn);
  const __m512 vs = _mm512_set1_ps(scale), vm = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (n = 0; n < Nv; n += 32) {
    __m512 e[2];
    for (int h = 0; h < 2; ++h) {
      const int64_t k = n + 16 * h;
      const int64_t valid = std::min<int64_t>(std::max<int64_t>(N - k, 0), 16);
      const __mmask16 mk = valid == 16 ? __mmask16(0xffff) : __mmask16((1u << valid) - 1);
      const __m512 x = _mm512_maskz_loadu_ps(mk, s + k);
      e[h] = _mm512_maskz_mov_ps(mk, exp16(_mm512_fmsub_ps(x, vs, vm)));
      sum = _mm512_add_ps(sum, e[h]);
    }
    _mm512_storeu_si512(p + n, (__m512i)_mm512_cvtne2ps_pbh(e[1], e[0]));
  }
  return _mm512_reduce_add_ps(sum);
}

FRT_AMX_TARGET void attend(const ImageAttention& a, Scratch& sc) {
  const int64_t dh = a.dh, N = a.N;
  const int64_t Nk = (N + 63) / 64 * 64, Nv = (N + 31) / 32 * 32;
  if (int64_t(sc.kw.size()) < Nk * dh / 2) sc.kw.resize(size_t(Nk * dh / 2));
  if (int64_t(sc.vp.size()) < Nv / 2 * dh) sc.vp.resize(size_t(Nv / 2 * dh));
  if (int64_t(sc.s.size()) < 16 * Nk) sc.s.resize(size_t(16 * Nk));
  if (int64_t(sc.p.size()) < 16 * Nv) sc.p.resize(size_t(16 * Nv));
  if (int64_t(sc.o.size()) < 16 * dh) sc.o.resize(size_t(16 * dh));
  if (int64_t(sc.q.size()) < 16 * dh) sc.q.resize(size_t(16 * dh));
  sc.sum.resize(16);
  pack_keys(a, Nk, sc.kw.data());
  pack_values(a, Nv, sc.vp.data());
  load_config();
  for (int64_t r0 = 0; r0 < a.rows; r0 += 16) {
    const int64_t rows = std::min<int64_t>(16, a.rows - r0);
    const uint16_t* q = a.q + r0 * a.q_ld;
    int64_t q_ld = a.q_ld;
    if (rows < 16) {  // a partial block: its rows into zero-padded scratch
      std::fill(sc.q.begin(), sc.q.begin() + 16 * dh, uint16_t(0));
      for (int64_t r = 0; r < rows; ++r) std::memcpy(sc.q.data() + r * dh, q + r * a.q_ld, size_t(dh) * 2);
      q = sc.q.data();
      q_ld = dh;
    }
    for (int64_t n0 = 0; n0 < Nk; n0 += 64) scores64(q, q_ld, sc.kw.data(), Nk, dh, n0, sc.s.data());
    for (int64_t r = 0; r < rows; ++r)
      sc.sum[size_t(r)] = softmax_row(sc.s.data() + r * Nk, N, Nv, a.scale, sc.p.data() + r * Nv);
    if (rows < 16) std::fill(sc.p.begin() + rows * Nv, sc.p.begin() + 16 * Nv, uint16_t(0));
    int64_t d0 = 0;
    for (; d0 + 64 <= dh; d0 += 64) values<4>(sc.p.data(), Nv, sc.vp.data(), dh, d0, sc.o.data());
    if (dh - d0 == 32) values<2>(sc.p.data(), Nv, sc.vp.data(), dh, d0, sc.o.data());
    for (int64_t r = 0; r < rows; ++r) {
      const __m512 inv = _mm512_set1_ps(1.0f / sc.sum[size_t(r)]);
      uint16_t* dst = a.out + (r0 + r) * a.out_ld;
      const float* src = sc.o.data() + r * dh;
      for (int64_t d = 0; d < dh; d += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(src + d), inv)));
    }
  }
  _tile_release();
}

}  // namespace

bool available() {
  static const bool hw = hardware_and_os();
  if (!hw) return false;
  const char* env = std::getenv("FLAMINGO_RT_CPU_AMX");
  return !(env && env[0] == '0' && env[1] == '\0');
}

void image_attention_bf16(const ImageAttention& a, Scratch& s) {
  if (a.rows <= 0 || a.N <= 0) return;
  attend(a, s);
}

#else  // no AMX toolchain / platform

bool available() { return false; }
void image_attention_bf16(const ImageAttention&, Scratch&) {}

#endif

}  // namespace amx

bool cpu_amx_enabled() { return amx::available(); }

}  // namespace flamingo_rt
