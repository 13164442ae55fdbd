// CPU stages of the bfloat16 F(2x2, 3x3) Winograd convolution (see
// csrc/include/flamingo_rt/conv3x3_winograd_bf16.h): the input transform x -> V (bfloat16),
// the products M = V @ U (bfloat16 operands, float32 sums), the output transform M -> y with
// bias + activation + gamma, the weight transform.
//
// The transforms work on 16 channels at a time in float32 (channels are the contiguous dim of
// channels-last x, y and of V, M), a task being one 2x2 output tile with all its channels;
// tasks are spread over OpenMP threads, the per-tile functions compiled per ISA level
// (FRT_CLONES). The products: register-blocked AVX-512 BF16 kernels (6 rows x 64 columns of
// the result in 24 zmm accumulators; per pair of input channels one `vdpbf16ps` per
// accumulator, A's pair broadcast as one 32-bit element, U's row of pairs loaded) where the CPU
// has AVX-512 BF16, a plain float32 loop elsewhere; tasks are (point, group) pairs x row
// blocks, each summing in one fixed order (deterministic).
//
// Transform matrices (F(2x2, 3x3), interpolation points 0, +-1, inf):
//   B^T = [1  0 -1  0]   G = [ 1    0    0 ]   A^T = [1 1  1  0]
//         [0  1  1  0]       [1/2  1/2  1/2]         [0 1 -1 -1]
//         [0 -1  1  0]       [1/2 -1/2  1/2]
//         [0  1  0 -1]       [ 0    0    1 ]
#include "flamingo_rt/conv3x3_winograd_bf16.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu_act.h"
#include "cpu_math.h"

#if defined(__x86_64__) && defined(__GNUC__) && (__GNUC__ >= 10 || defined(__clang__))
#include <immintrin.h>
#define FRT_WINO16_AVX512BF16 1
#define FRT_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#endif

namespace flamingo_rt {
namespace {

using namespace cpu;

constexpr int kVec = 16;  // channels per step
constexpr int kIn = 4;    // input tile edge
constexpr int kT = kWinogradF23Tile;

bool have_avx512bf16();  // the CPU runs AVX-512 F, BW and BF16 code

FRT_INLINE float bf16_to_float(uint16_t v) { return bits_to_float(uint32_t(v) << 16); }

// One 16-channel chunk of an input tile: d (4x4 pixels, zero outside the image) -> V's 16
// points, rounded to bfloat16. `L` lanes are live (16, or the group's last partial chunk).
template <int L>
FRT_INLINE void input_chunk(const uint16_t* x, int64_t sx_h, int64_t sx_w, int64_t y0, int64_t x0, int64_t H,
                            int64_t W, uint16_t* v, int64_t v_point_stride, int nl) {
  const int n = L == kVec ? kVec : nl;
  float d[kIn][kIn][kVec];
  for (int i = 0; i < kIn; ++i) {
    const int64_t yy = y0 + i;
    const bool row_in = yy >= 0 && yy < H;
    for (int j = 0; j < kIn; ++j) {
      const int64_t xx = x0 + j;
      if (row_in && xx >= 0 && xx < W) {
        const uint16_t* src = x + yy * sx_h + xx * sx_w;
        FRT_SIMD for (int l = 0; l < n; ++l) d[i][j][l] = bf16_to_float(src[l]);
      } else {
        FRT_SIMD for (int l = 0; l < n; ++l) d[i][j][l] = 0.0f;
      }
    }
  }
  float t[kIn][kIn][kVec];  // B^T d
  for (int j = 0; j < kIn; ++j) {
    FRT_SIMD for (int l = 0; l < n; ++l) {
      const float d0 = d[0][j][l], d1 = d[1][j][l], d2 = d[2][j][l], d3 = d[3][j][l];
      t[0][j][l] = d0 - d2;
      t[1][j][l] = d1 + d2;
      t[2][j][l] = d2 - d1;
      t[3][j][l] = d1 - d3;
    }
  }
  for (int i = 0; i < kIn; ++i) {  // (B^T d) B, stored point by point
    uint16_t* vi = v + (i * kIn) * v_point_stride;
    FRT_SIMD for (int l = 0; l < n; ++l) {
      const float t0 = t[i][0][l], t1 = t[i][1][l], t2 = t[i][2][l], t3 = t[i][3][l];
      vi[0 * v_point_stride + l] = BF16::store(t0 - t2);
      vi[1 * v_point_stride + l] = BF16::store(t1 + t2);
      vi[2 * v_point_stride + l] = BF16::store(t2 - t1);
      vi[3 * v_point_stride + l] = BF16::store(t1 - t3);
    }
  }
}

// Every channel of tile `t` (image origin y0, x0 of its 4x4 input window).
FRT_CLONES void input_tile(const Conv3x3WinogradBf16Params& p, int64_t tiles, int64_t t, int64_t img, int64_t y0,
                           int64_t x0) {
  const uint16_t* x = static_cast<const uint16_t*>(p.x) + img * p.sx_n;
  uint16_t* v = static_cast<uint16_t*>(p.v);
  const int64_t cg = p.c_in / p.groups;
  const int64_t point_stride = p.groups * tiles * cg;  // V (16, G, T, cg)
  for (int64_t g = 0; g < p.groups; ++g) {
    uint16_t* vg = v + (g * tiles + t) * cg;
    const uint16_t* xg = x + g * cg;
    int64_t c0 = 0;
    for (; c0 + kVec <= cg; c0 += kVec)
      input_chunk<kVec>(xg + c0, p.sx_h, p.sx_w, y0, x0, p.h, p.w, vg + c0, point_stride, kVec);
    if (c0 < cg) input_chunk<0>(xg + c0, p.sx_h, p.sx_w, y0, x0, p.h, p.w, vg + c0, point_stride, int(cg - c0));
  }
}

#ifdef FRT_WINO16_AVX512BF16
// input_tile with intrinsics for whole 16-channel chunks (bf16 <-> float32 conversions in one
// instruction each: GCC's code for the portable loops ran at ~1 ns per input element).
FRT_AVX512BF16 inline __m512 load_bf16x16(const uint16_t* src) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_maskz_cvtepu16_epi32(__mmask16(0xffff), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))), 16));
}
FRT_AVX512BF16 inline void store_bf16x16(uint16_t* dst, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(v));
}

FRT_AVX512BF16 void input_tile_avx512bf16(const Conv3x3WinogradBf16Params& p, int64_t tiles, int64_t t, int64_t img,
                                          int64_t y0, int64_t x0) {
  const uint16_t* x = static_cast<const uint16_t*>(p.x) + img * p.sx_n;
  uint16_t* v = static_cast<uint16_t*>(p.v);
  const int64_t cg = p.c_in / p.groups;
  const int64_t ps = p.groups * tiles * cg;  // V (16, G, T, cg)
  const int64_t full = cg / kVec * kVec;
  bool in[kIn][kIn];
  const uint16_t* src[kIn][kIn];
  for (int i = 0; i < kIn; ++i)
    for (int j = 0; j < kIn; ++j) {
      const int64_t yy = y0 + i, xx = x0 + j;
      in[i][j] = yy >= 0 && yy < p.h && xx >= 0 && xx < p.w;
      src[i][j] = in[i][j] ? x + yy * p.sx_h + xx * p.sx_w : nullptr;
    }
  for (int64_t g = 0; g < p.groups; ++g) {
    uint16_t* vg = v + (g * tiles + t) * cg;
    for (int64_t c0 = 0; c0 < full; c0 += kVec) {
      const int64_t off = g * cg + c0;
      __m512 t[kIn][kIn];  // B^T d, column by column
      for (int j = 0; j < kIn; ++j) {
        __m512 d[kIn];
        for (int i = 0; i < kIn; ++i) d[i] = in[i][j] ? load_bf16x16(src[i][j] + off) : _mm512_setzero_ps();
        t[0][j] = _mm512_sub_ps(d[0], d[2]);
        t[1][j] = _mm512_add_ps(d[1], d[2]);
        t[2][j] = _mm512_sub_ps(d[2], d[1]);
        t[3][j] = _mm512_sub_ps(d[1], d[3]);
      }
      uint16_t* vc = vg + c0;
      for (int i = 0; i < kIn; ++i) {
        uint16_t* vi = vc + (i * kIn) * ps;
        store_bf16x16(vi, _mm512_sub_ps(t[i][0], t[i][2]));
        store_bf16x16(vi + ps, _mm512_add_ps(t[i][1], t[i][2]));
        store_bf16x16(vi + 2 * ps, _mm512_sub_ps(t[i][2], t[i][1]));
        store_bf16x16(vi + 3 * ps, _mm512_sub_ps(t[i][1], t[i][3]));
      }
    }
    if (full < cg)
      input_chunk<0>(x + g * cg + full, p.sx_h, p.sx_w, y0, x0, p.h, p.w, vg + full, ps, int(cg - full));
  }
}
#endif

// One 16-channel chunk of an output tile: M's 16 points -> the 2x2 outputs, with
// gamma * act(. + bias) in float32, rounded to bfloat16 and stored where inside the image.
template <int L, bool HAS_ACT, Act A>
FRT_INLINE void output_chunk(const float* m, int64_t m_point_stride, const float* bias, float gamma, uint16_t* y,
                             int64_t sy_h, int64_t sy_w, int rows, int cols, int nl) {
  const int n = L == kVec ? kVec : nl;
  float s[kT][kIn][kVec];  // A^T m
  for (int j = 0; j < kIn; ++j) {
    const float* mj = m + j * m_point_stride;
    FRT_SIMD for (int l = 0; l < n; ++l) {
      const float m0 = mj[0 * kIn * m_point_stride + l], m1 = mj[1 * kIn * m_point_stride + l];
      const float m2 = mj[2 * kIn * m_point_stride + l], m3 = mj[3 * kIn * m_point_stride + l];
      s[0][j][l] = m0 + m1 + m2;
      s[1][j][l] = m1 - m2 - m3;
    }
  }
  float b[kVec];
  FRT_SIMD for (int l = 0; l < n; ++l) b[l] = bias ? bias[l] : 0.0f;
  for (int r = 0; r < rows; ++r) {
    float o[kT][kVec];  // (A^T m) A
    FRT_SIMD for (int l = 0; l < n; ++l) {
      const float s0 = s[r][0][l], s1 = s[r][1][l], s2 = s[r][2][l], s3 = s[r][3][l];
      o[0][l] = s0 + s1 + s2;
      o[1][l] = s1 - s2 - s3;
    }
    for (int c = 0; c < cols; ++c) {
      uint16_t* dst = y + r * sy_h + c * sy_w;
      FRT_SIMD for (int l = 0; l < n; ++l) {
        const float val = o[c][l] + b[l];
        if constexpr (HAS_ACT) {
          dst[l] = BF16::store(gamma * act_fwd<A>(val));
        } else {
          dst[l] = BF16::store(gamma * val);
        }
      }
    }
  }
}

template <bool HAS_ACT, Act A>
FRT_CLONES void output_tile(const Conv3x3WinogradBf16Params& p, int64_t tiles, int64_t t, int64_t img, int64_t y0,
                            int64_t x0) {
  const float* m = static_cast<const float*>(p.m);
  uint16_t* y = static_cast<uint16_t*>(p.y) + img * p.sy_n + y0 * p.sy_h + x0 * p.sy_w;
  const int64_t cog = p.c_out / p.groups;
  const int64_t point_stride = p.groups * tiles * cog;  // M (16, G, T, cog)
  const int rows = int(std::min<int64_t>(kT, p.h - y0));
  const int cols = int(std::min<int64_t>(kT, p.w - x0));
  const float gamma = float(p.gamma);
  for (int64_t g = 0; g < p.groups; ++g) {
    const float* mg = m + (g * tiles + t) * cog;
    uint16_t* yg = y + g * cog;
    const float* bg = p.bias ? p.bias + g * cog : nullptr;
    int64_t c0 = 0;
    for (; c0 + kVec <= cog; c0 += kVec)
      output_chunk<kVec, HAS_ACT, A>(mg + c0, point_stride, bg ? bg + c0 : nullptr, gamma, yg + c0, p.sy_h, p.sy_w,
                                     rows, cols, kVec);
    if (c0 < cog)
      output_chunk<0, HAS_ACT, A>(mg + c0, point_stride, bg ? bg + c0 : nullptr, gamma, yg + c0, p.sy_h, p.sy_w,
                                  rows, cols, int(cog - c0));
  }
}

#ifdef FRT_WINO16_AVX512BF16
// output_tile with intrinsics for whole 16-channel chunks (the tail's float32 math in a
// vectorized loop, the bfloat16 rounding in one instruction).
template <bool HAS_ACT, Act A>
FRT_AVX512BF16 void output_tile_avx512bf16(const Conv3x3WinogradBf16Params& p, int64_t tiles, int64_t t,
                                           int64_t img, int64_t y0, int64_t x0) {
  const float* m = static_cast<const float*>(p.m);
  uint16_t* y = static_cast<uint16_t*>(p.y) + img * p.sy_n + y0 * p.sy_h + x0 * p.sy_w;
  const int64_t cog = p.c_out / p.groups;
  const int64_t ps = p.groups * tiles * cog;  // M (16, G, T, cog)
  const int rows = int(std::min<int64_t>(kT, p.h - y0));
  const int cols = int(std::min<int64_t>(kT, p.w - x0));
  const float gamma = float(p.gamma);
  const __m512 vgamma = _mm512_set1_ps(gamma);
  const int64_t full = cog / kVec * kVec;
  for (int64_t g = 0; g < p.groups; ++g) {
    const float* mg = m + (g * tiles + t) * cog;
    uint16_t* yg = y + g * cog;
    const float* bg = p.bias ? p.bias + g * cog : nullptr;
    for (int64_t c0 = 0; c0 < full; c0 += kVec) {
      const float* mc = mg + c0;
      __m512 s[kT][kIn];  // A^T m
      for (int j = 0; j < kIn; ++j) {
        const __m512 m0 = _mm512_loadu_ps(mc + (0 * kIn + j) * ps), m1 = _mm512_loadu_ps(mc + (1 * kIn + j) * ps);
        const __m512 m2 = _mm512_loadu_ps(mc + (2 * kIn + j) * ps), m3 = _mm512_loadu_ps(mc + (3 * kIn + j) * ps);
        const __m512 a = _mm512_add_ps(m1, m2);
        s[0][j] = _mm512_add_ps(m0, a);
        s[1][j] = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
      }
      const __m512 b = bg ? _mm512_loadu_ps(bg + c0) : _mm512_setzero_ps();
      for (int r = 0; r < rows; ++r) {
        __m512 o[kT];
        o[0] = _mm512_add_ps(_mm512_add_ps(s[r][0], _mm512_add_ps(s[r][1], s[r][2])), b);
        o[1] = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(s[r][1], s[r][2]), s[r][3]), b);
        for (int c = 0; c < cols; ++c) {
          __m512 val = o[c];
          if constexpr (HAS_ACT) {
            alignas(64) float buf[kVec];
            _mm512_store_ps(buf, val);
            FRT_SIMD for (int l = 0; l < kVec; ++l) buf[l] = act_fwd<A>(buf[l]);
            val = _mm512_load_ps(buf);
          }
          store_bf16x16(yg + c0 + r * p.sy_h + c * p.sy_w, _mm512_mul_ps(vgamma, val));
        }
      }
    }
    if (full < cog)
      output_chunk<0, HAS_ACT, A>(mg + full, ps, bg ? bg + full : nullptr, gamma, yg + full, p.sy_h, p.sy_w, rows,
                                  cols, int(cog - full));
  }
}
#endif

// ------------------------------------------------------------------ stage 2: products

// C (rows x n, ldc) = A (rows x k, lda; bfloat16) @ B, B in pairs of rows: element (q, j) at
// B[(q / 2) * ldb2 + 2 * j + q % 2] (ldb2 = 2 * n). The portable loop, float32 sums.
FRT_CLONES void gemm_plain(const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb2, float* C, int64_t ldc,
                           int64_t rows, int64_t k, int64_t n) {
  for (int64_t i = 0; i < rows; ++i) {
    float* c = C + i * ldc;
    FRT_SIMD for (int64_t j = 0; j < n; ++j) c[j] = 0.0f;
    for (int64_t q = 0; q < k; ++q) {
      const float a = bf16_to_float(A[i * lda + q]);
      const uint16_t* b = B + (q / 2) * ldb2 + (q % 2);
      FRT_SIMD for (int64_t j = 0; j < n; ++j) c[j] += a * bf16_to_float(b[2 * j]);
    }
  }
}

#ifdef FRT_WINO16_AVX512BF16
// MR rows x NV vectors of 16 columns of C over k2 pairs of A's columns, in MR * NV zmm
// accumulators: per pair, NV loads of B's row of pairs and MR broadcasts of A's pair.
template <int MR, int NV>
FRT_AVX512BF16 inline void micro(const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb2, float* C,
                                 int64_t ldc, int64_t k2) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t q = 0; q < k2; ++q) {
    __m512i b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_si512(B + q * ldb2 + 32 * v);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, A + r * lda + 2 * q, sizeof(pair));
      const __m512i a = _mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)a, (__m512bh)b[v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + r * ldc + 16 * v, acc[r][v]);
}

constexpr int kMR = 6;  // rows per register block (6 x 4 zmm accumulators)

template <int NV>
FRT_AVX512BF16 inline void rows_block(const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb2, float* C,
                                      int64_t ldc, int64_t rows, int64_t k2) {
  int64_t i = 0;
  for (; i + kMR <= rows; i += kMR) micro<kMR, NV>(A + i * lda, lda, B, ldb2, C + i * ldc, ldc, k2);
  switch (rows - i) {
    case 5: micro<5, NV>(A + i * lda, lda, B, ldb2, C + i * ldc, ldc, k2); break;
    case 4: micro<4, NV>(A + i * lda, lda, B, ldb2, C + i * ldc, ldc, k2); break;
    case 3: micro<3, NV>(A + i * lda, lda, B, ldb2, C + i * ldc, ldc, k2); break;
    case 2: micro<2, NV>(A + i * lda, lda, B, ldb2, C + i * ldc, ldc, k2); break;
    case 1: micro<1, NV>(A + i * lda, lda, B, ldb2, C + i * ldc, ldc, k2); break;
    default: break;
  }
}

// n a multiple of 16, k even: column panels of 64 (B's panel stays in L1 / L2 across the row
// blocks).
FRT_AVX512BF16 void gemm_avx512bf16(const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb2, float* C,
                                    int64_t ldc, int64_t rows, int64_t k, int64_t n) {
  const int64_t k2 = k / 2;
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) rows_block<4>(A, lda, B + 2 * j, ldb2, C + j, ldc, rows, k2);
  switch ((n - j) / 16) {
    case 3: rows_block<3>(A, lda, B + 2 * j, ldb2, C + j, ldc, rows, k2); break;
    case 2: rows_block<2>(A, lda, B + 2 * j, ldb2, C + j, ldc, rows, k2); break;
    case 1: rows_block<1>(A, lda, B + 2 * j, ldb2, C + j, ldc, rows, k2); break;
    default: break;
  }
}

bool have_avx512bf16() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512bf16");
  return ok;
}
#else
bool have_avx512bf16() { return false; }
#endif

// fn(pg, r0, n) for every (point, group) pair pg of `pairs` and block [r0, r0 + n) of 48 of
// the product's `rows` result rows, over OpenMP threads (each task sums in one fixed order).
template <class Fn>
void for_each_product_task(int64_t pairs, int64_t rows, Fn fn) {
  constexpr int64_t kRowsPerTask = 48;
  const int64_t blocks = (rows + kRowsPerTask - 1) / kRowsPerTask;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t pg = 0; pg < pairs; ++pg)
    for (int64_t rb = 0; rb < blocks; ++rb)
      fn(pg, rb * kRowsPerTask, std::min(kRowsPerTask, rows - rb * kRowsPerTask));
}

// The checks every stage starts with: sizes (c_in / groups even), the tile range, then (when
// there is work) the pointers the stage uses. Sets *tiles to the range's tile count, 0 when
// there is nothing to do: kOk with *tiles == 0 means return.
Status begin_stage(const Conv3x3WinogradBf16Params& p, bool no_channels, bool pointers, int64_t* tiles) {
  *tiles = 0;
  if (p.n < 0 || p.h < 0 || p.w < 0 || p.c_in < 0 || p.c_out < 0 || p.groups < 1 || p.c_in % p.groups ||
      p.c_out % p.groups || (p.c_in / p.groups) % 2)
    return Status::kInvalidArgument;
  const int64_t all = p.n * winograd_f23_tiles(p.h) * winograd_f23_tiles(p.w);
  if (p.tile_begin < 0 || p.tile_begin > all) return Status::kInvalidArgument;
  const int64_t n = p.tile_count < 0 ? all - p.tile_begin : p.tile_count;
  if (p.tile_begin + n > all) return Status::kInvalidArgument;
  if (n == 0 || no_channels) return Status::kOk;
  if (!pointers) return Status::kInvalidArgument;
  *tiles = n;
  return Status::kOk;
}

// fn(t, img, y0, x0) for every tile t of the range (counted from its start; img, y0, x0 its
// image and top-left output pixel plus origin_offset), over OpenMP threads.
template <class Fn>
void for_each_tile(const Conv3x3WinogradBf16Params& p, int64_t tiles, int64_t origin_offset, Fn fn) {
  const int64_t th = winograd_f23_tiles(p.h), tw = winograd_f23_tiles(p.w);
#pragma omp parallel for schedule(static) if (tiles > 1)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t a = p.tile_begin + t;
    const int64_t img = a / (th * tw), rem = a % (th * tw);
    fn(t, img, (rem / tw) * kT + origin_offset, (rem % tw) * kT + origin_offset);
  }
}

template <bool HAS_ACT, Act A>
void output_all(const Conv3x3WinogradBf16Params& p, int64_t tiles) {
#ifdef FRT_WINO16_AVX512BF16
  if (have_avx512bf16()) {
    for_each_tile(p, tiles, 0, [&](int64_t t, int64_t img, int64_t y0, int64_t x0) {
      output_tile_avx512bf16<HAS_ACT, A>(p, tiles, t, img, y0, x0);
    });
    return;
  }
#endif
  for_each_tile(p, tiles, 0, [&](int64_t t, int64_t img, int64_t y0, int64_t x0) {
    output_tile<HAS_ACT, A>(p, tiles, t, img, y0, x0);
  });
}

// bfloat16 nearest to d (ties to even), through a float32 rounded to odd (exact: float32
// keeps more than two extra bits); branch-free, so loops around it vectorize.
FRT_INLINE uint32_t double_to_bf16_bits(double d) {
  const float f = float(d);  // nearest
  const double back = double(f);
  uint32_t bits = float_to_bits(f);
  const bool inexact = (back != d) & (back - back == 0.0);  // (finite; no &&: a branch)
  const bool above = (back < 0 ? -back : back) > (d < 0 ? -d : d);
  bits = inexact ? ((above ? bits - 1u : bits) | 1u) : bits;  // toward zero, then odd
  return BF16::store(bits_to_float(bits));
}

// G k G^T of one 3x3 kernel k (taps reversed with FLIP) in float64, rounded to bfloat16,
// point p stored at out[p * stride].
template <class E, bool FLIP>
FRT_INLINE void transform_kernel(const typename E::T* k, uint16_t* out, int64_t stride) {
  double t[kIn][3];  // G k: rows of the kernel combined
#pragma GCC unroll 3
  for (int j = 0; j < 3; ++j) {
    const double k0 = E::load(k[FLIP ? 8 - j : j]), k1 = E::load(k[FLIP ? 5 - j : 3 + j]);
    const double k2 = E::load(k[FLIP ? 2 - j : 6 + j]);
    t[0][j] = k0;
    t[1][j] = 0.5 * (k0 + k1 + k2);
    t[2][j] = 0.5 * (k0 - k1 + k2);
    t[3][j] = k2;
  }
#pragma GCC unroll 4
  for (int r = 0; r < kIn; ++r) {  // (G k) G^T
    const double r0 = t[r][0], r1 = t[r][1], r2 = t[r][2];
    uint16_t* o = out + (r * kIn) * stride;
    o[0] = uint16_t(double_to_bf16_bits(r0));
    o[stride] = uint16_t(double_to_bf16_bits(0.5 * (r0 + r1 + r2)));
    o[2 * stride] = uint16_t(double_to_bf16_bits(0.5 * (r0 - r1 + r2)));
    o[3 * stride] = uint16_t(double_to_bf16_bits(r2));
  }
}

// One row of U's bfloat16 pairs: for lanes l < n, kernels lo + l * k_stride and
// hi + l * k_stride transformed (transform_kernel), the pair (lo's, hi's) of point p stored at
// dst[2 * (p * plane + l)] and the next element. Vectorized over the lanes (the taps gathered).
template <class E, bool FLIP>
FRT_CLONES void weight_pairs(const typename E::T* lo, const typename E::T* hi, int64_t k_stride, int64_t n,
                             uint16_t* dst, int64_t plane) {
  FRT_SIMD for (int64_t l = 0; l < n; ++l) {
    transform_kernel<E, FLIP>(lo + l * k_stride, dst + 2 * l, 2 * plane);
    transform_kernel<E, FLIP>(hi + l * k_stride, dst + 2 * l + 1, 2 * plane);
  }
}

// winograd_f23_weight_bf16_cpu for weights stored as E (F32 or BF16).
template <class E>
Status weight_bf16(const typename E::T* w, int64_t c_out, int64_t c_in_per_group, int64_t groups, uint16_t* u,
                   bool flipped_transposed) {
  if (c_out < 0 || c_in_per_group < 0 || groups < 1 || c_out % groups) return Status::kInvalidArgument;
  const int64_t cog = c_out / groups, cg = c_in_per_group;
  // the convolution U is made for: its input channels per group (taken in pairs) and outputs
  const int64_t k_in = flipped_transposed ? cog : cg, k_out = flipped_transposed ? cg : cog;
  if (k_in % 2) return Status::kInvalidArgument;
  if (c_out == 0 || cg == 0) return Status::kOk;
  if (!w || !u) return Status::kInvalidArgument;
  // U's pairs: [p, g, i / 2, j] for the convolution's input channel pair i and output j
  const int64_t plane = groups * (k_in / 2) * k_out;  // pairs per point
  const int64_t pairs = groups * (k_in / 2);
#pragma omp parallel for schedule(static)
  for (int64_t gi = 0; gi < pairs; ++gi) {
    const int64_t g = gi / (k_in / 2), i = 2 * (gi % (k_in / 2));
    uint16_t* dst = u + 2 * gi * k_out;
    if (flipped_transposed) {  // pair of old outputs i, i + 1; lanes: old inputs (kernels 9 apart)
      const typename E::T* lo = w + ((g * cog + i) * cg) * 9;
      weight_pairs<E, true>(lo, lo + cg * 9, 9, k_out, dst, plane);
    } else {  // pair of inputs i, i + 1; lanes: outputs (kernels cg * 9 apart)
      const typename E::T* lo = w + ((g * cog) * cg + i) * 9;
      weight_pairs<E, false>(lo, lo + 9, cg * 9, k_out, dst, plane);
    }
  }
  return Status::kOk;
}

}  // namespace

bool winograd_bf16_cpu_supported() { return have_avx512bf16(); }

Status conv3x3_winograd_bf16_input_cpu(const Conv3x3WinogradBf16Params& p) {
  int64_t tiles;
  const Status st = begin_stage(p, p.c_in == 0, p.x && p.v, &tiles);
  if (st != Status::kOk || tiles == 0) return st;
  // the 4x4 window of output tile (ty, tx) starts one pixel up and left (the padding)
#ifdef FRT_WINO16_AVX512BF16
  if (have_avx512bf16()) {
    for_each_tile(p, tiles, -1, [&](int64_t t, int64_t img, int64_t y0, int64_t x0) {
      input_tile_avx512bf16(p, tiles, t, img, y0, x0);
    });
    return Status::kOk;
  }
#endif
  for_each_tile(p, tiles, -1, [&](int64_t t, int64_t img, int64_t y0, int64_t x0) {
    input_tile(p, tiles, t, img, y0, x0);
  });
  return Status::kOk;
}

bool conv3x3_winograd_bf16_products_vectorized(const Conv3x3WinogradBf16Params& p) {
  return have_avx512bf16() && p.groups >= 1 && (p.c_out / p.groups) % 16 == 0;
}

Status conv3x3_winograd_bf16_products_cpu(const Conv3x3WinogradBf16Params& p, bool plain) {
  int64_t tiles;
  const Status st = begin_stage(p, p.c_out == 0, p.v && p.u && p.m, &tiles);
  if (st != Status::kOk || tiles == 0) return st;
  const int64_t cg = p.c_in / p.groups, cog = p.c_out / p.groups;
  const int64_t pairs = kWinogradF23Points * p.groups;
  const uint16_t* v = static_cast<const uint16_t*>(p.v);
  const uint16_t* u = static_cast<const uint16_t*>(p.u);
  float* m = static_cast<float*>(p.m);
  const bool vec = !plain && conv3x3_winograd_bf16_products_vectorized(p);
  // result rows: the range's tiles (M[pg] = V[pg] @ U[pg])
  for_each_product_task(pairs, tiles, [&](int64_t pg, int64_t r0, int64_t rows) {
    const uint16_t* A = v + (pg * tiles + r0) * cg;
    const uint16_t* B = u + pg * cg * cog;
    float* C = m + (pg * tiles + r0) * cog;
#ifdef FRT_WINO16_AVX512BF16
    if (vec) {
      gemm_avx512bf16(A, cg, B, 2 * cog, C, cog, rows, cg, cog);
      return;
    }
#endif
    (void)vec;
    gemm_plain(A, cg, B, 2 * cog, C, cog, rows, cg, cog);
  });
  return Status::kOk;
}

Status conv3x3_winograd_bf16_output_cpu(const Conv3x3WinogradBf16Params& p) {
  int64_t tiles;
  const Status st = begin_stage(p, p.c_out == 0, p.m && p.y, &tiles);
  if (st != Status::kOk || tiles == 0) return st;
  if (!p.has_act) {
    output_all<false, Act::kGelu>(p, tiles);
    return Status::kOk;
  }
  switch (p.act) {
    case Act::kGelu: output_all<true, Act::kGelu>(p, tiles); return Status::kOk;
    case Act::kRelu: output_all<true, Act::kRelu>(p, tiles); return Status::kOk;
    case Act::kSilu: output_all<true, Act::kSilu>(p, tiles); return Status::kOk;
  }
  return Status::kInvalidArgument;
}

Status winograd_f23_weight_bf16_cpu(const float* w, int64_t c_out, int64_t c_in_per_group, int64_t groups,
                                    uint16_t* u, bool flipped_transposed) {
  return weight_bf16<F32>(w, c_out, c_in_per_group, groups, u, flipped_transposed);
}

Status winograd_f23_weight_bf16_cpu(const uint16_t* w, int64_t c_out, int64_t c_in_per_group, int64_t groups,
                                    uint16_t* u, bool flipped_transposed) {
  return weight_bf16<BF16>(w, c_out, c_in_per_group, groups, u, flipped_transposed);
}

}  // namespace flamingo_rt
