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

#include "avx512_transpose16.h"
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

// exp(a), float32 x 16: a = (k + f) ln 2 with k = round(a / ln 2), |f ln 2| <= ln 2 / 2; e^(f ln 2)
// by its degree-6 Taylor polynomial (relative error below 1.3e-7: the softmax's probabilities are
// rounded to bfloat16 and its sums kept in float32), times 2^k by vscalefps (which also gives 0
// for k below the float range and inf above it). 0 below -87.33 (and for -inf); NaN stays NaN.
FRT_AMX_TARGET inline __m512 exp16(__m512 a) {
  const __m512 lo = _mm512_set1_ps(-87.33f);
  const __m512 ac = _mm512_max_ps(lo, a);  // NaN in a stays (second operand); -inf -> lo
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(ac, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), ac);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512 e = _mm512_scalef_ps(p, k);
  return _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(a, lo, _CMP_LT_OQ), _mm512_setzero_ps());
}

// Row n of keys or values given as two runs; nullptr past N.
inline const uint16_t* row_of(const Rows* runs, int64_t n) {
  if (n < runs[0].n) return runs[0].p + n * runs[0].ld;
  n -= runs[0].n;
  return n < runs[1].n ? runs[1].p + n * runs[1].ld : nullptr;
}

// Rows given by row(i) (a pointer to dh bfloat16, or nullptr for a zero row), i < R (a
// multiple of 16) -> 32-bit words transposed: w[wd * R + i] = word wd of row i.
template <class RowFn>
FRT_AMX_TARGET void pack_words_t(RowFn row, int64_t R, int64_t dh, uint32_t* w) {
  for (int64_t r0 = 0; r0 < R; r0 += 16) {
    const uint16_t* rows[16];
    for (int r = 0; r < 16; ++r) rows[r] = row(r0 + r);
    for (int64_t w0 = 0; w0 < dh / 2; w0 += 16) {
      __m512i x[16];
      for (int r = 0; r < 16; ++r) x[r] = rows[r] ? _mm512_loadu_si512(rows[r] + 2 * w0) : _mm512_setzero_si512();
      cpu::transpose16x16(x);
      for (int c = 0; c < 16; ++c) _mm512_storeu_si512(w + (w0 + c) * R + r0, x[c]);
    }
  }
}

// Rows given by row(i) (W bfloat16, W a multiple of 32, or nullptr for zeros), i < R (even)
// -> row pairs interleaved, the tiles' B layout: p[i * W + e] = (row 2i [e], row 2i+1 [e]).
template <class RowFn>
FRT_AMX_TARGET void pack_pairs(RowFn row, int64_t R, int64_t W, uint32_t* p) {
  alignas(64) static const uint16_t kLo[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                              8,  40, 9,  41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                              24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo = _mm512_load_si512(kLo), hi = _mm512_load_si512(kHi);
  for (int64_t i = 0; i < R / 2; ++i) {
    const uint16_t* r0 = row(2 * i);
    const uint16_t* r1 = row(2 * i + 1);
    uint32_t* dst = p + i * W;
    for (int64_t e = 0; e < W; e += 32) {
      const __m512i x0 = r0 ? _mm512_loadu_si512(r0 + e) : _mm512_setzero_si512();
      const __m512i x1 = r1 ? _mm512_loadu_si512(r1 + e) : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + e, _mm512_permutex2var_epi16(x0, lo, x1));
      _mm512_storeu_si512(dst + e + 16, _mm512_permutex2var_epi16(x0, hi, x1));
    }
  }
}

// Dense rows (row stride ld) of which the first `rows` exist; nullptr past them.
struct DenseRows {
  const uint16_t* p;
  int64_t ld, rows;
  const uint16_t* operator()(int64_t i) const { return i < rows ? p + i * ld : nullptr; }
};

// An image's keys or values as their two runs; nullptr past N.
struct ImageRowsOf {
  const Rows* runs;
  int64_t N;
  const uint16_t* operator()(int64_t n) const { return n < N ? row_of(runs, n) : nullptr; }
};

// NT output tiles in a row: C[:, 16t : 16t + 16] (+)= sum_k A_k B_{k,t} over `ksteps` steps of
// 32 bfloat16, A_k at a + k * a_kstep (16 rows, stride a_ld bytes), B_{k,t} at b + k * b_kstep
// + t * 64 (16 rows of 16 words, stride b_ld bytes); C float32, stride c_ld bytes, loaded
// first when `accumulate`.
template <int NT>
FRT_AMX_TARGET inline void tiles_row(const char* a, int64_t a_ld, int64_t a_kstep, const char* b, int64_t b_ld,
                                     int64_t b_kstep, int64_t ksteps, float* c, int64_t c_ld, bool accumulate) {
  if (accumulate) {
    _tile_loadd(0, c, c_ld);
    if constexpr (NT > 1) _tile_loadd(1, c + 16, c_ld);
    if constexpr (NT > 2) _tile_loadd(2, c + 32, c_ld);
    if constexpr (NT > 3) _tile_loadd(3, c + 48, c_ld);
  } else {
    _tile_zero(0);
    if constexpr (NT > 1) _tile_zero(1);
    if constexpr (NT > 2) _tile_zero(2);
    if constexpr (NT > 3) _tile_zero(3);
  }
  for (int64_t k = 0; k < ksteps; ++k) {
    _tile_loadd(4, a + k * a_kstep, a_ld);
    const char* bk = b + k * b_kstep;
    _tile_loadd(5, bk, b_ld);
    _tile_dpbf16ps(0, 4, 5);
    if constexpr (NT > 1) {
      _tile_loadd(5, bk + 64, b_ld);
      _tile_dpbf16ps(1, 4, 5);
    }
    if constexpr (NT > 2) {
      _tile_loadd(5, bk + 128, b_ld);
      _tile_dpbf16ps(2, 4, 5);
    }
    if constexpr (NT > 3) {
      _tile_loadd(5, bk + 192, b_ld);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
  _tile_stored(0, c, c_ld);
  if constexpr (NT > 1) _tile_stored(1, c + 16, c_ld);
  if constexpr (NT > 2) _tile_stored(2, c + 32, c_ld);
  if constexpr (NT > 3) _tile_stored(3, c + 48, c_ld);
}

// A row of `ntiles` output tiles, four at a time (B and C advance 64 bytes per tile).
FRT_AMX_TARGET inline void tiles_row_n(int64_t ntiles, const void* a, int64_t a_ld, int64_t a_kstep, const void* b,
                                       int64_t b_ld, int64_t b_kstep, int64_t ksteps, float* c, int64_t c_ld,
                                       bool accumulate) {
  const char* ap = static_cast<const char*>(a);
  const char* bp = static_cast<const char*>(b);
  for (int64_t t = 0; t < ntiles; t += 4) {
    const char* bt = bp + t * 64;
    float* ct = c + t * 16;
    switch (std::min<int64_t>(4, ntiles - t)) {
      case 4: tiles_row<4>(ap, a_ld, a_kstep, bt, b_ld, b_kstep, ksteps, ct, c_ld, accumulate); break;
      case 3: tiles_row<3>(ap, a_ld, a_kstep, bt, b_ld, b_kstep, ksteps, ct, c_ld, accumulate); break;
      case 2: tiles_row<2>(ap, a_ld, a_kstep, bt, b_ld, b_kstep, ksteps, ct, c_ld, accumulate); break;
      default: tiles_row<1>(ap, a_ld, a_kstep, bt, b_ld, b_kstep, ksteps, ct, c_ld, accumulate); break;
    }
  }
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
  pack_words_t(ImageRowsOf{a.k, N}, Nk, dh, sc.kw.data());
  pack_pairs(ImageRowsOf{a.v, N}, Nv, dh, sc.vp.data());
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
    // S (16 x Nk) = Q K^T: A the query rows (32 dims a step), B the keys' transposed words
    tiles_row_n(Nk / 16, q, q_ld * 2, 64, sc.kw.data(), Nk * 4, 16 * Nk * 4, dh / 32, sc.s.data(), Nk * 4, false);
    for (int64_t r = 0; r < rows; ++r)
      sc.sum[size_t(r)] = softmax_row(sc.s.data() + r * Nk, N, Nv, a.scale, sc.p.data() + r * Nv);
    if (rows < 16) std::fill(sc.p.begin() + rows * Nv, sc.p.begin() + 16 * Nv, uint16_t(0));
    // O (16 x dh) = P V: A the probabilities (32 keys a step), B the values' row pairs
    tiles_row_n(dh / 16, sc.p.data(), Nv * 2, 64, sc.vp.data(), dh * 4, 16 * dh * 4, Nv / 32, sc.o.data(), dh * 4,
                false);
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


// ------------------------------------------------------------------ backward
//
// Per image and head (one call): the keys and values copied to dense zero-padded rows (kr,
// vr: Np x dh, Np = N rounded up to 32) and K^T (kt: dh x Np). Per block of R query rows
// (R = rows rounded up to 32, zero rows past them), transposed so that the softmax runs down
// columns (one vector = 16 queries, no horizontal reductions):
//   S^T = kr Q^T, dP^T = vr dO^T          (A: key rows; B: Q / dO as transposed words)
//   P^T, D, dS^T = P^T (dP^T - D)         (float32, AVX-512; P^T and dS^T then in bf16)
//   dV += P^T dO, dK += dS^T Q            (A: P^T / dS^T rows; B: dO / Q as row pairs)
//   dQ^T = K^T dS^T                        (A: kt; B: dS^T as row pairs), transposed out
// dK and dV accumulate in float32 scratch across blocks; scale applied on the way out.

// src (Np x dh bfloat16, dense) -> dst = src^T (dh x Np).
FRT_AMX_TARGET void transpose_bf16(const uint16_t* src, int64_t Np, int64_t dh, uint16_t* dst) {
  for (int64_t n0 = 0; n0 < Np; n0 += 16)
    for (int64_t w0 = 0; w0 < dh / 2; w0 += 16) {
      __m512i x[16];
      for (int r = 0; r < 16; ++r) x[r] = _mm512_loadu_si512(src + (n0 + r) * dh + 2 * w0);
      cpu::transpose16x16(x);  // x[c]: word w0 + c of keys n0..n0+15, element 2(w0+c) in the low half
      for (int c = 0; c < 16; ++c) {
        const int64_t d = 2 * (w0 + c);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d * Np + n0), _mm512_cvtepi32_epi16(x[c]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (d + 1) * Np + n0),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(x[c], 16)));
      }
    }
}

// One column block of 16 queries (column q0 of R): P^T, D and dS^T from S^T and dP^T
// (float32, Np x R, N valid rows); P^T and dS^T also in bfloat16 (rows past N zero).
FRT_AMX_TARGET void softmax_grad_columns(float* st, const float* dpt, int64_t N, int64_t Np, int64_t R, int64_t q0,
                                         float scale, uint16_t* pt, uint16_t* dst) {
  __m512 mx = _mm512_set1_ps(-__builtin_inff()), mn = _mm512_set1_ps(__builtin_inff());
  for (int64_t n = 0; n < N; ++n) {
    const __m512 x = _mm512_loadu_ps(st + n * R + q0);
    mx = _mm512_max_ps(mx, x);
    mn = _mm512_min_ps(mn, x);
  }
  const __m512 vs = _mm512_set1_ps(scale);
  const __m512 m = _mm512_mul_ps(vs, scale >= 0.0f ? mx : mn);  // max of scale * s per query
  __m512 sum = _mm512_setzero_ps();
  for (int64_t n = 0; n < N; ++n) {
    float* p = st + n * R + q0;
    const __m512 e = exp16(_mm512_fmsub_ps(_mm512_loadu_ps(p), vs, m));
    _mm512_storeu_ps(p, e);
    sum = _mm512_add_ps(sum, e);
  }
  const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), sum);
  __m512 d = _mm512_setzero_ps();
  for (int64_t n = 0; n < N; ++n) {
    float* p = st + n * R + q0;
    const __m512 pv = _mm512_mul_ps(_mm512_loadu_ps(p), inv);
    _mm512_storeu_ps(p, pv);
    d = _mm512_fmadd_ps(pv, _mm512_loadu_ps(dpt + n * R + q0), d);
  }
  for (int64_t n = 0; n < N; ++n) {
    const __m512 pv = _mm512_loadu_ps(st + n * R + q0);
    const __m512 ds = _mm512_mul_ps(pv, _mm512_sub_ps(_mm512_loadu_ps(dpt + n * R + q0), d));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(pt + n * R + q0), (__m256i)_mm512_cvtneps_pbh(pv));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + n * R + q0), (__m256i)_mm512_cvtneps_pbh(ds));
  }
  for (int64_t n = N; n < Np; ++n) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(pt + n * R + q0), _mm256_setzero_si256());
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + n * R + q0), _mm256_setzero_si256());
  }
}

// float32 rows (Np x dh, ld dh) times mul -> bfloat16 output rows, split as `out`.
FRT_AMX_TARGET void store_key_rows(const float* acc, int64_t N, int64_t dh, float mul, const OutRows* out) {
  const __m512 vm = _mm512_set1_ps(mul);
  for (int64_t n = 0; n < N; ++n) {
    uint16_t* dst = n < out[0].n ? out[0].p + n * out[0].ld : out[1].p + (n - out[0].n) * out[1].ld;
    for (int64_t d = 0; d < dh; d += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(acc + n * dh + d), vm)));
  }
}

FRT_AMX_TARGET void attend_backward(const ImageAttentionBackward& a, BackwardScratch& sc) {
  const int64_t dh = a.dh, N = a.N, Np = (N + 31) / 32 * 32, RM = kMaxBlockRows;
  auto grow16 = [](std::vector<uint16_t>& v, int64_t n) { if (int64_t(v.size()) < n) v.resize(size_t(n)); };
  auto grow32 = [](std::vector<uint32_t>& v, int64_t n) { if (int64_t(v.size()) < n) v.resize(size_t(n)); };
  auto growf = [](std::vector<float>& v, int64_t n) { if (int64_t(v.size()) < n) v.resize(size_t(n)); };
  grow16(sc.kr, Np * dh); grow16(sc.vr, Np * dh); grow16(sc.kt, dh * Np);
  grow16(sc.pt, Np * RM); grow16(sc.dst, Np * RM);
  grow32(sc.qw, dh / 2 * RM); grow32(sc.dow, dh / 2 * RM); grow32(sc.qp, RM / 2 * dh); grow32(sc.dop, RM / 2 * dh);
  grow32(sc.dsp, Np / 2 * RM);
  growf(sc.st, Np * RM); growf(sc.dpt, Np * RM); growf(sc.dk, Np * dh); growf(sc.dv, Np * dh); growf(sc.dqt, dh * RM);
  if (a.nblocks == 0) {  // no query attends to this image
    std::fill(sc.dk.begin(), sc.dk.begin() + N * dh, 0.0f);
    store_key_rows(sc.dk.data(), N, dh, 1.0f, a.dk);
    store_key_rows(sc.dk.data(), N, dh, 1.0f, a.dv);
    return;
  }
  // keys and values as dense rows (zero past N), and K^T
  for (int64_t n = 0; n < Np; ++n) {
    const uint16_t* kn = n < N ? row_of(a.k, n) : nullptr;
    const uint16_t* vn = n < N ? row_of(a.v, n) : nullptr;
    uint16_t* kd = sc.kr.data() + n * dh;
    uint16_t* vd = sc.vr.data() + n * dh;
    if (kn) std::memcpy(kd, kn, size_t(dh) * 2); else std::memset(kd, 0, size_t(dh) * 2);
    if (vn) std::memcpy(vd, vn, size_t(dh) * 2); else std::memset(vd, 0, size_t(dh) * 2);
  }
  transpose_bf16(sc.kr.data(), Np, dh, sc.kt.data());
  load_config();
  for (int64_t bi = 0; bi < a.nblocks; ++bi) {
    const QueryBlock& qb = a.blocks[bi];
    const int64_t rows = qb.rows, R = (rows + 31) / 32 * 32;
    pack_words_t(DenseRows{qb.q, a.q_ld, rows}, R, dh, sc.qw.data());
    pack_words_t(DenseRows{qb.go, a.go_ld, rows}, R, dh, sc.dow.data());
    pack_pairs(DenseRows{qb.q, a.q_ld, rows}, R, dh, sc.qp.data());
    pack_pairs(DenseRows{qb.go, a.go_ld, rows}, R, dh, sc.dop.data());
    float* st = sc.st.data();
    float* dpt = sc.dpt.data();
    for (int64_t kb = 0; kb < Np / 16; ++kb) {  // S^T and dP^T, 16 keys x R
      tiles_row_n(R / 16, sc.kr.data() + kb * 16 * dh, dh * 2, 64, sc.qw.data(), R * 4, 16 * R * 4, dh / 32,
                  st + kb * 16 * R, R * 4, false);
      tiles_row_n(R / 16, sc.vr.data() + kb * 16 * dh, dh * 2, 64, sc.dow.data(), R * 4, 16 * R * 4, dh / 32,
                  dpt + kb * 16 * R, R * 4, false);
    }
    for (int64_t q0 = 0; q0 < R; q0 += 16)
      softmax_grad_columns(st, dpt, N, Np, R, q0, a.scale, sc.pt.data(), sc.dst.data());
    const bool acc = bi > 0;
    for (int64_t kb = 0; kb < Np / 16; ++kb) {  // dV += P^T dO, dK += dS^T Q: 16 keys x dh
      tiles_row_n(dh / 16, sc.pt.data() + kb * 16 * R, R * 2, 64, sc.dop.data(), dh * 4, 16 * dh * 4, R / 32,
                  sc.dv.data() + kb * 16 * dh, dh * 4, acc);
      tiles_row_n(dh / 16, sc.dst.data() + kb * 16 * R, R * 2, 64, sc.qp.data(), dh * 4, 16 * dh * 4, R / 32,
                  sc.dk.data() + kb * 16 * dh, dh * 4, acc);
    }
    pack_pairs(DenseRows{sc.dst.data(), R, Np}, Np, R, sc.dsp.data());  // dS^T as pairs of key rows
    for (int64_t db = 0; db < dh / 16; ++db)  // dQ^T = K^T dS^T: 16 dims x R
      tiles_row_n(R / 16, sc.kt.data() + db * 16 * Np, Np * 2, 64, sc.dsp.data(), R * 4, 16 * R * 4, Np / 32,
                  sc.dqt.data() + db * 16 * R, R * 4, false);
    const __m512 vs = _mm512_set1_ps(a.scale);
    for (int64_t q0 = 0; q0 < rows; q0 += 16)  // dq rows = scale (dQ^T)^T
      for (int64_t d0 = 0; d0 < dh; d0 += 16) {
        __m512i x[16];
        for (int r = 0; r < 16; ++r) x[r] = _mm512_loadu_si512(sc.dqt.data() + (d0 + r) * R + q0);
        cpu::transpose16x16(x);
        for (int c = 0; c < 16 && q0 + c < rows; ++c)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb.dq + (q0 + c) * a.dq_ld + d0),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_castsi512_ps(x[c]), vs)));
      }
  }
  _tile_release();
  store_key_rows(sc.dk.data(), N, dh, a.scale, a.dk);
  store_key_rows(sc.dv.data(), N, dh, 1.0f, a.dv);
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

void image_attention_backward_bf16(const ImageAttentionBackward& a, BackwardScratch& s) {
  if (a.N <= 0) return;
  attend_backward(a, s);
}

#else  // no AMX toolchain / platform

bool available() { return false; }
void image_attention_bf16(const ImageAttention&, Scratch&) {}
void image_attention_backward_bf16(const ImageAttentionBackward&, BackwardScratch&) {}

#endif

}  // namespace amx

bool cpu_amx_enabled() { return amx::available(); }

}  // namespace flamingo_rt
