// CPU stages of the bfloat16 F(2x2, 3x3) Winograd convolution (see
// csrc/include/flamingo_rt/conv3x3_winograd_bf16.h): the input transform x -> V (bfloat16),
// the products M = V @ U (bfloat16 operands, float32 sums), the output transform M -> y with
// bias + activation + gamma, the weight transform; for the weight gradient the input and
// output-gradient transforms into pairs of tiles, the products dL/dU (+)= Vp^T Yp and the
// inverse weight transform G^T dL/dU G.
//
// The transforms work on 16 channels at a time in float32 (channels are the contiguous dim of
// channels-last x, y, dy and of V, M), a task being one 2x2 output tile (or a pair of tiles)
// with all its channels; tasks are spread over OpenMP threads. Whole 16-channel chunks run
// through AVX-512 BF16 intrinsics where the CPU has them (one instruction per bf16 <-> float32
// conversion), the rest through portable loops compiled per ISA level (FRT_CLONES). The products: register-blocked AVX-512 BF16 kernels (6 rows x 64 columns of
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
#include <type_traits>

#include "cpu_act.h"
#include "cpu_isa.h"
#include "cpu_math.h"
#include "gelu_avx512.h"
#include "winograd_tiles.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include "avx512_transpose16.h"
#endif

#ifdef FRT_X86_ISA  // cpu_isa.h
#define FRT_WINO16_AVX512BF16 1
#define FRT_AVX512BF16 FRT_TARGET_AVX512BF16
#endif

namespace flamingo_rt {
namespace {

using namespace cpu;

constexpr int kVec = 16;  // channels per step
constexpr int kIn = 4;    // input tile edge
constexpr int kT = kWinogradF23Tile;

bool have_avx512bf16();  // the CPU runs AVX-512 F, BW, VL and BF16 code (cpu_isa.h)

// d -> V (16 points x nl lanes, float32, not rounded) of one 4x4 input window (zero outside).
template <int L>
FRT_INLINE void input_points(const uint16_t* x, int64_t sx_h, int64_t sx_w, int64_t y0, int64_t x0, int64_t H,
                             int64_t W, float v[kIn * kIn][kVec], int nl) {
  const int n = L == kVec ? kVec : nl;
  float d[kIn][kIn][kVec];
  for (int i = 0; i < kIn; ++i) {
    const int64_t yy = y0 + i;
    const bool row_in = yy >= 0 && yy < H;
    for (int j = 0; j < kIn; ++j) {
      const int64_t xx = x0 + j;
      if (row_in && xx >= 0 && xx < W) {
        const uint16_t* src = x + yy * sx_h + xx * sx_w;
        FRT_SIMD for (int l = 0; l < n; ++l) d[i][j][l] = BF16::load(src[l]);
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
  for (int i = 0; i < kIn; ++i) {  // (B^T d) B
    FRT_SIMD for (int l = 0; l < n; ++l) {
      const float t0 = t[i][0][l], t1 = t[i][1][l], t2 = t[i][2][l], t3 = t[i][3][l];
      v[i * kIn + 0][l] = t0 - t2;
      v[i * kIn + 1][l] = t1 + t2;
      v[i * kIn + 2][l] = t2 - t1;
      v[i * kIn + 3][l] = t1 - t3;
    }
  }
}

// One 16-channel chunk of an input tile: d (4x4 pixels, zero outside the image) -> V's 16
// points, rounded to bfloat16. `L` lanes are live (16, or the group's last partial chunk).
template <int L>
FRT_INLINE void input_chunk(const uint16_t* x, int64_t sx_h, int64_t sx_w, int64_t y0, int64_t x0, int64_t H,
                            int64_t W, uint16_t* v, int64_t v_point_stride, int nl) {
  const int n = L == kVec ? kVec : nl;
  float pts[kIn * kIn][kVec];
  input_points<L>(x, sx_h, sx_w, y0, x0, H, W, pts, nl);
  for (int pt = 0; pt < kIn * kIn; ++pt) {
    uint16_t* vp = v + pt * v_point_stride;
    FRT_SIMD for (int l = 0; l < n; ++l) vp[l] = BF16::store(pts[pt][l]);
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

// The K x K window of pixel pointers of a tile whose window starts at (y0, x0) of image `img`
// (null outside the image, or everywhere when !live: a pair's missing second tile).
template <int K>
FRT_INLINE void window_pointers(const uint16_t* src, int64_t s_n, int64_t s_h, int64_t s_w, int64_t h, int64_t w,
                                bool live, int64_t img, int64_t y0, int64_t x0, const uint16_t* px[K][K]) {
  for (int i = 0; i < K; ++i)
    for (int j = 0; j < K; ++j) {
      const int64_t yy = y0 + i, xx = x0 + j;
      px[i][j] = live && yy >= 0 && yy < h && xx >= 0 && xx < w ? src + img * s_n + yy * s_h + xx * s_w : nullptr;
    }
}

// d -> V = B^T d B (16 points, float32) of the 16 channels at offset `off` of a 4x4 window.
FRT_AVX512BF16 inline void input_points_avx512(const uint16_t* const px[kIn][kIn], int64_t off,
                                               __m512 v[kIn * kIn]) {
  __m512 t[kIn][kIn];  // B^T d, column by column
  for (int j = 0; j < kIn; ++j) {
    __m512 d[kIn];
    for (int i = 0; i < kIn; ++i) d[i] = px[i][j] ? load_bf16x16(px[i][j] + off) : _mm512_setzero_ps();
    t[0][j] = _mm512_sub_ps(d[0], d[2]);
    t[1][j] = _mm512_add_ps(d[1], d[2]);
    t[2][j] = _mm512_sub_ps(d[2], d[1]);
    t[3][j] = _mm512_sub_ps(d[1], d[3]);
  }
  for (int i = 0; i < kIn; ++i) {  // (B^T d) B
    v[i * kIn + 0] = _mm512_sub_ps(t[i][0], t[i][2]);
    v[i * kIn + 1] = _mm512_add_ps(t[i][1], t[i][2]);
    v[i * kIn + 2] = _mm512_sub_ps(t[i][2], t[i][1]);
    v[i * kIn + 3] = _mm512_sub_ps(t[i][1], t[i][3]);
  }
}

FRT_AVX512BF16 void input_tile_avx512bf16(const Conv3x3WinogradBf16Params& p, int64_t tiles, int64_t t, int64_t img,
                                          int64_t y0, int64_t x0) {
  uint16_t* v = static_cast<uint16_t*>(p.v);
  const int64_t cg = p.c_in / p.groups;
  const int64_t ps = p.groups * tiles * cg;  // V (16, G, T, cg)
  const int64_t full = cg / kVec * kVec;
  const uint16_t* px[kIn][kIn];
  window_pointers<kIn>(static_cast<const uint16_t*>(p.x), p.sx_n, p.sx_h, p.sx_w, p.h, p.w, true, img, y0, x0, px);
  const uint16_t* x = static_cast<const uint16_t*>(p.x) + img * p.sx_n;
  for (int64_t g = 0; g < p.groups; ++g) {
    uint16_t* vg = v + (g * tiles + t) * cg;
    for (int64_t c0 = 0; c0 < full; c0 += kVec) {
      __m512 pts[kIn * kIn];
      input_points_avx512(px, g * cg + c0, pts);
      for (int pt = 0; pt < kIn * kIn; ++pt) store_bf16x16(vg + c0 + pt * ps, pts[pt]);
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
#ifdef FRT_GELU_AVX512
          if constexpr (HAS_ACT && A == Act::kGelu) {
            val = gelu512::gelu(val);  // gelu_avx512.h: piecewise polynomials
          } else
#endif
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

// ------------------------------------------------------------------ weight gradient: pair transforms

// dy -> Yg = A dy A^T (16 points x nl lanes, float32) of one 2x2 output tile (zero outside).
template <int L>
FRT_INLINE void grad_points(const uint16_t* dy, int64_t s_h, int64_t s_w, int64_t y0, int64_t x0, int64_t H,
                            int64_t W, float v[kIn * kIn][kVec], int nl) {
  const int n = L == kVec ? kVec : nl;
  float d[kT][kT][kVec];
  for (int a = 0; a < kT; ++a)
    for (int b = 0; b < kT; ++b) {
      const int64_t yy = y0 + a, xx = x0 + b;
      if (yy < H && xx < W) {
        const uint16_t* src = dy + yy * s_h + xx * s_w;
        FRT_SIMD for (int l = 0; l < n; ++l) d[a][b][l] = BF16::load(src[l]);
      } else {
        FRT_SIMD for (int l = 0; l < n; ++l) d[a][b][l] = 0.0f;
      }
    }
  FRT_SIMD for (int l = 0; l < n; ++l) {
    // A dy (A's rows (1, 0), (1, 1), (1, -1), (0, -1)), column by column
    const float d00 = d[0][0][l], d01 = d[0][1][l], d10 = d[1][0][l], d11 = d[1][1][l];
    const float s0[kIn] = {d00, d00 + d10, d00 - d10, -d10};
    const float s1[kIn] = {d01, d01 + d11, d01 - d11, -d11};
    for (int i = 0; i < kIn; ++i) {  // (A dy) A^T
      v[i * kIn + 0][l] = s0[i];
      v[i * kIn + 1][l] = s0[i] + s1[i];
      v[i * kIn + 2][l] = s0[i] - s1[i];
      v[i * kIn + 3][l] = -s1[i];
    }
  }
}

// Two tiles' points rounded to bfloat16 and interleaved: dst[p * point_stride + 2 * l + e]
// from a (e = 0) and b (e = 1).
FRT_INLINE void store_pairs(const float a[kIn * kIn][kVec], const float b[kIn * kIn][kVec], uint16_t* dst,
                            int64_t point_stride, int n) {
  for (int pt = 0; pt < kIn * kIn; ++pt) {
    uint16_t* d = dst + pt * point_stride;
    FRT_SIMD for (int l = 0; l < n; ++l) {
      d[2 * l] = BF16::store(a[pt][l]);
      d[2 * l + 1] = BF16::store(b[pt][l]);
    }
  }
}

// ------------------------------------------------------------------ stage 2: products

// C (rows x n, ldc) = A (rows x k) @ B (k x n), bfloat16 operands, float32 sums (ACC: C += ...).
// Both in pairs along k: A's (i, q) at A[i * a_row + (q / 2) * a_pair + q % 2] (the forward's
// V: a_row = lda, a_pair = 2; the weight gradient's Vp^T: a_row = 2, a_pair = 2 * rows of Vp),
// B's (q, j) at B[(q / 2) * ldb2 + 2 * j + q % 2]. The portable loop.
template <bool ACC>
FRT_CLONES void gemm_plain(const uint16_t* A, int64_t a_row, int64_t a_pair, const uint16_t* B, int64_t ldb2,
                           float* C, int64_t ldc, int64_t rows, int64_t k, int64_t n) {
  for (int64_t i = 0; i < rows; ++i) {
    float* c = C + i * ldc;
    if (!ACC) FRT_SIMD for (int64_t j = 0; j < n; ++j) c[j] = 0.0f;
    for (int64_t q = 0; q < k; ++q) {
      const float a = BF16::load(A[i * a_row + (q / 2) * a_pair + (q % 2)]);
      const uint16_t* b = B + (q / 2) * ldb2 + (q % 2);
      FRT_SIMD for (int64_t j = 0; j < n; ++j) c[j] += a * BF16::load(b[2 * j]);
    }
  }
}

#ifdef FRT_WINO16_AVX512BF16
// MR rows x NV vectors of 16 columns of C over k2 pairs of the reduction, in MR * NV zmm
// accumulators: per pair, NV loads of B's row of pairs and MR broadcasts of A's pair (row r,
// pair q at A + r * a_row + q * a_pair); ACC adds to C.
template <int MR, int NV, bool ACC>
FRT_AVX512BF16 inline void micro(const uint16_t* A, int64_t a_row, int64_t a_pair, const uint16_t* B, int64_t ldb2,
                                 float* C, int64_t ldc, int64_t k2) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = ACC ? _mm512_loadu_ps(C + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t q = 0; q < k2; ++q) {
    __m512i b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_si512(B + q * ldb2 + 32 * v);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, A + r * a_row + q * a_pair, sizeof(pair));
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

template <int NV, bool ACC>
FRT_AVX512BF16 inline void rows_block(const uint16_t* A, int64_t a_row, int64_t a_pair, const uint16_t* B,
                                      int64_t ldb2, float* C, int64_t ldc, int64_t rows, int64_t k2) {
  int64_t i = 0;
  for (; i + kMR <= rows; i += kMR) micro<kMR, NV, ACC>(A + i * a_row, a_row, a_pair, B, ldb2, C + i * ldc, ldc, k2);
  const uint16_t* a = A + i * a_row;
  float* c = C + i * ldc;
  switch (rows - i) {
    case 5: micro<5, NV, ACC>(a, a_row, a_pair, B, ldb2, c, ldc, k2); break;
    case 4: micro<4, NV, ACC>(a, a_row, a_pair, B, ldb2, c, ldc, k2); break;
    case 3: micro<3, NV, ACC>(a, a_row, a_pair, B, ldb2, c, ldc, k2); break;
    case 2: micro<2, NV, ACC>(a, a_row, a_pair, B, ldb2, c, ldc, k2); break;
    case 1: micro<1, NV, ACC>(a, a_row, a_pair, B, ldb2, c, ldc, k2); break;
    default: break;
  }
}

// gemm_plain's product for n a multiple of 16 and k even: column panels of 64 (B's panel stays
// in L1 / L2 across the row blocks).
template <bool ACC>
FRT_AVX512BF16 void gemm_avx512bf16(const uint16_t* A, int64_t a_row, int64_t a_pair, const uint16_t* B,
                                    int64_t ldb2, float* C, int64_t ldc, int64_t rows, int64_t k, int64_t n) {
  const int64_t k2 = k / 2;
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) rows_block<4, ACC>(A, a_row, a_pair, B + 2 * j, ldb2, C + j, ldc, rows, k2);
  switch ((n - j) / 16) {
    case 3: rows_block<3, ACC>(A, a_row, a_pair, B + 2 * j, ldb2, C + j, ldc, rows, k2); break;
    case 2: rows_block<2, ACC>(A, a_row, a_pair, B + 2 * j, ldb2, C + j, ldc, rows, k2); break;
    case 1: rows_block<1, ACC>(A, a_row, a_pair, B + 2 * j, ldb2, C + j, ldc, rows, k2); break;
    default: break;
  }
}

bool have_avx512bf16() {
  return cpu::isa::avx512_bf16();
}
#else
bool have_avx512bf16() { return false; }
#endif

// The weight gradient's products for one (point, group) pair: C (rows x cog) (+)= A^T B over k
// tiles, A the rows' columns of Vp (row c: 2 apart; pair q: 2 * cg apart), B Yp's (k / 2 pairs
// of cog); the AVX-512 BF16 kernel when vec, else the portable loop.
template <bool ACC>
void weight_grad_products(bool vec, const uint16_t* A, int64_t cg, const uint16_t* B, int64_t cog, float* C,
                          int64_t rows, int64_t k) {
#ifdef FRT_WINO16_AVX512BF16
  if (vec) {
    gemm_avx512bf16<ACC>(A, 2, 2 * cg, B, 2 * cog, C, cog, rows, k, cog);
    return;
  }
#endif
  (void)vec;
  gemm_plain<ACC>(A, 2, 2 * cg, B, 2 * cog, C, cog, rows, k, cog);
}

// The checks every stage starts with: sizes (c_in / groups even), the tile range, then (when
// there is work) the pointers the stage uses. Sets *tiles to the range's tile count, 0 when
// there is nothing to do: kOk with *tiles == 0 means return.
Status begin_stage(const Conv3x3WinogradBf16Params& p, bool no_channels, bool pointers, int64_t* tiles) {
  *tiles = 0;
  if (p.n < 0 || p.h < 0 || p.w < 0 || p.c_in < 0 || p.c_out < 0 || p.groups < 1 || p.c_in % p.groups ||
      p.c_out % p.groups || (p.c_in / p.groups) % 2)
    return Status::kInvalidArgument;
  const int64_t n = range_tile_count(p.n * winograd_f23_tiles(p.h) * winograd_f23_tiles(p.w), p.tile_begin,
                                     p.tile_count);
  if (n < 0) return Status::kInvalidArgument;
  if (n == 0 || no_channels) return Status::kOk;
  if (!pointers) return Status::kInvalidArgument;
  *tiles = n;
  return Status::kOk;
}

// cpu::for_each_tile over the call's range.
template <class Fn>
void for_each_tile(const Conv3x3WinogradBf16Params& p, int64_t tiles, int64_t origin_offset, Fn fn) {
  cpu::for_each_tile<kT>(p.h, p.w, p.tile_begin, tiles, origin_offset, fn);
}

template <bool HAS_ACT, Act A>
void output_all(const Conv3x3WinogradBf16Params& p, int64_t tiles) {
#ifdef FRT_WINO16_AVX512BF16
  if (have_avx512bf16() && !p.portable) {
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

// Image and top-left output pixel of tile t of the range.
FRT_INLINE void tile_origin(const Conv3x3WinogradBf16Params& p, int64_t t, int64_t* img, int64_t* y0, int64_t* x0) {
  cpu::tile_origin<kT>(p.h, p.w, p.tile_begin + t, img, y0, x0);
}

// Tiles 2q and 2q + 1 of the range (the second zero past the range's end) -> pair q of Vp
// (GRAD false: x's input windows) or of Yp (GRAD true: dy's output tiles), every group, channels
// c_begin.. of each.
template <bool GRAD>
FRT_CLONES void pair_transform(const Conv3x3WinogradBf16Params& p, int64_t tiles, int64_t q, int64_t c_begin) {
  const int64_t npairs = (tiles + 1) / 2;
  const int64_t C = GRAD ? p.c_out : p.c_in, cpg = C / p.groups;
  const uint16_t* src = static_cast<const uint16_t*>(GRAD ? p.dy : p.x);
  const int64_t s_n = GRAD ? p.sdy_n : p.sx_n, s_h = GRAD ? p.sdy_h : p.sx_h, s_w = GRAD ? p.sdy_w : p.sx_w;
  uint16_t* out = static_cast<uint16_t*>(GRAD ? p.m : p.v);
  const int64_t point_stride = p.groups * npairs * cpg * 2;  // (16, G, npairs, cpg, 2)
  const bool second = 2 * q + 1 < tiles;
  int64_t img[2], y0[2], x0[2];
  for (int e = 0; e < 2; ++e)
    if (e == 0 || second) tile_origin(p, 2 * q + e, &img[e], &y0[e], &x0[e]);
  const int off = GRAD ? 0 : -1;  // an input window starts one pixel up and left (the padding)
  for (int64_t g = 0; g < p.groups; ++g) {
    uint16_t* og = out + ((g * npairs + q) * cpg) * 2;
    for (int64_t c0 = c_begin; c0 < cpg; c0 += kVec) {
      const int nl = int(std::min<int64_t>(kVec, cpg - c0));
      float a[kIn * kIn][kVec], b[kIn * kIn][kVec];
      for (int e = 0; e < 2; ++e) {
        float(*v)[kVec] = e == 0 ? a : b;
        if (e == 1 && !second) {
          for (int pt = 0; pt < kIn * kIn; ++pt) FRT_SIMD for (int l = 0; l < kVec; ++l) v[pt][l] = 0.0f;
          continue;
        }
        const uint16_t* base = src + img[e] * s_n + g * cpg + c0;
        if constexpr (GRAD) {
          if (nl == kVec) grad_points<kVec>(base, s_h, s_w, y0[e], x0[e], p.h, p.w, v, nl);
          else grad_points<0>(base, s_h, s_w, y0[e], x0[e], p.h, p.w, v, nl);
        } else {
          if (nl == kVec) input_points<kVec>(base, s_h, s_w, y0[e] + off, x0[e] + off, p.h, p.w, v, nl);
          else input_points<0>(base, s_h, s_w, y0[e] + off, x0[e] + off, p.h, p.w, v, nl);
        }
      }
      store_pairs(a, b, og + c0 * 2, point_stride, nl);
    }
  }
}

#ifdef FRT_WINO16_AVX512BF16
// pair_transform with intrinsics for whole 16-channel chunks (the tail chunk through the portable
// code): both tiles' 16 points in registers, rounded and interleaved in three instructions.
template <bool GRAD>
FRT_AVX512BF16 void pair_transform_avx512bf16(const Conv3x3WinogradBf16Params& p, int64_t tiles, int64_t q) {
  const int64_t npairs = (tiles + 1) / 2;
  const int64_t C = GRAD ? p.c_out : p.c_in, cpg = C / p.groups, full = cpg / kVec * kVec;
  const uint16_t* src = static_cast<const uint16_t*>(GRAD ? p.dy : p.x);
  const int64_t s_n = GRAD ? p.sdy_n : p.sx_n, s_h = GRAD ? p.sdy_h : p.sx_h, s_w = GRAD ? p.sdy_w : p.sx_w;
  uint16_t* out = static_cast<uint16_t*>(GRAD ? p.m : p.v);
  const int64_t ps = p.groups * npairs * cpg * 2;  // (16, G, npairs, cpg, 2)
  const bool second = 2 * q + 1 < tiles;
  constexpr int kWin = GRAD ? kT : kIn;  // pixels read per tile edge
  // per tile: the window's pixel pointers (null outside the image or past the range)
  const uint16_t* px[2][kWin][kWin];
  for (int e = 0; e < 2; ++e) {
    int64_t img = 0, y0 = 0, x0 = 0;
    const bool live = e == 0 || second;
    if (live) tile_origin(p, 2 * q + e, &img, &y0, &x0);
    const int64_t off = GRAD ? 0 : -1;  // an input window starts one pixel up and left (the padding)
    window_pointers<kWin>(src, s_n, s_h, s_w, p.h, p.w, live, img, y0 + off, x0 + off, px[e]);
  }
  __m512i idx;  // word 2l <- a's l (upper half of cvtne2ps's result), 2l + 1 <- b's l
  {
    alignas(64) int16_t t[32];
    for (int l = 0; l < 16; ++l) t[2 * l] = int16_t(16 + l), t[2 * l + 1] = int16_t(l);
    idx = _mm512_load_si512(t);
  }
  for (int64_t g = 0; g < p.groups; ++g) {
    uint16_t* og = out + ((g * npairs + q) * cpg) * 2;
    for (int64_t c0 = 0; c0 < full; c0 += kVec) {
      const int64_t off = g * cpg + c0;
      __m512 v[2][kIn * kIn];
      for (int e = 0; e < 2; ++e) {
        if constexpr (GRAD) {  // A dy A^T
          __m512 d[kWin][kWin];
          for (int i = 0; i < kWin; ++i)
            for (int j = 0; j < kWin; ++j)
              d[i][j] = px[e][i][j] ? load_bf16x16(px[e][i][j] + off) : _mm512_setzero_ps();
          const __m512 s0[kIn] = {d[0][0], _mm512_add_ps(d[0][0], d[1][0]), _mm512_sub_ps(d[0][0], d[1][0]),
                                  _mm512_sub_ps(_mm512_setzero_ps(), d[1][0])};
          const __m512 s1[kIn] = {d[0][1], _mm512_add_ps(d[0][1], d[1][1]), _mm512_sub_ps(d[0][1], d[1][1]),
                                  _mm512_sub_ps(_mm512_setzero_ps(), d[1][1])};
          for (int i = 0; i < kIn; ++i) {
            v[e][i * kIn + 0] = s0[i];
            v[e][i * kIn + 1] = _mm512_add_ps(s0[i], s1[i]);
            v[e][i * kIn + 2] = _mm512_sub_ps(s0[i], s1[i]);
            v[e][i * kIn + 3] = _mm512_sub_ps(_mm512_setzero_ps(), s1[i]);
          }
        } else {  // B^T d B
          input_points_avx512(px[e], off, v[e]);
        }
      }
      uint16_t* dst = og + c0 * 2;
      for (int pt = 0; pt < kIn * kIn; ++pt) {
        const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(v[0][pt], v[1][pt]);  // b's in the lower half
        _mm512_storeu_si512(dst + pt * ps, _mm512_permutexvar_epi16(idx, both));
      }
    }
  }
  if (full < cpg) pair_transform<GRAD>(p, tiles, q, full);
}
#endif

template <bool GRAD>
Status pairs_stage(const Conv3x3WinogradBf16Params& p) {
  int64_t tiles;
  const Status st = begin_stage(p, GRAD ? p.c_out == 0 : p.c_in == 0, GRAD ? (p.dy && p.m) : (p.x && p.v), &tiles);
  if (st != Status::kOk || tiles == 0) return st;
  const int64_t npairs = (tiles + 1) / 2;
#ifdef FRT_WINO16_AVX512BF16
  if (have_avx512bf16() && !p.portable) {
#pragma omp parallel for schedule(static) if (npairs > 1)
    for (int64_t q = 0; q < npairs; ++q) pair_transform_avx512bf16<GRAD>(p, tiles, q);
    return Status::kOk;
  }
#endif
#pragma omp parallel for schedule(static) if (npairs > 1)
  for (int64_t q = 0; q < npairs; ++q) pair_transform<GRAD>(p, tiles, q, 0);
  return Status::kOk;
}

// One row of dw's kernels: for lanes o < cog, dU's 16 points of (c, o) at du0[pt * plane + o]
// -> G^T dU G (float64) at dw0[o * dw_stride .. + 9], stored as O (F32, or BF16: the float32
// value rounded to nearest even).
template <class O>
FRT_CLONES void weight_grad_row_f64(const float* du0, int64_t plane, int64_t cog, typename O::T* dw0,
                                int64_t dw_stride) {
  FRT_SIMD for (int64_t o = 0; o < cog; ++o) {
    double r[kIn][3];  // dU G: G's columns (1, 1/2, 1/2, 0), (0, 1/2, -1/2, 0), (0, 1/2, 1/2, 1)
    for (int i = 0; i < kIn; ++i) {
      const double u0 = du0[(i * kIn + 0) * plane + o], u1 = du0[(i * kIn + 1) * plane + o];
      const double u2 = du0[(i * kIn + 2) * plane + o], u3 = du0[(i * kIn + 3) * plane + o];
      r[i][0] = u0 + 0.5 * (u1 + u2);
      r[i][1] = 0.5 * (u1 - u2);
      r[i][2] = 0.5 * (u1 + u2) + u3;
    }
    typename O::T* k = dw0 + o * dw_stride;
    for (int j = 0; j < 3; ++j) {  // G^T (dU G)
      k[0 * 3 + j] = O::store(float(r[0][j] + 0.5 * (r[1][j] + r[2][j])));
      k[1 * 3 + j] = O::store(float(0.5 * (r[1][j] - r[2][j])));
      k[2 * 3 + j] = O::store(float(0.5 * (r[1][j] + r[2][j]) + r[3][j]));
    }
  }
}

#ifdef FRT_WINO16_AVX512BF16
// The same for 16 output channels at a time in float32: the 16 points' vectors (lanes: the
// channels) -> 9 tap vectors, transposed in registers so each channel's 9 taps leave in one
// masked store (the float64 loop, a strided store per tap and lane: 0.58 ms against 0.30 for
// a 768 x 128 x 3 x 3 weight's separate inverse at 14 x 14).
template <class O>
FRT_AVX512BF16 void weight_grad_row_avx512(const float* du0, int64_t plane, int64_t cog, typename O::T* dw0,
                                           int64_t dw_stride) {
  const __m512 h = _mm512_set1_ps(0.5f);
  for (int64_t c0 = 0; c0 < cog; c0 += 16) {
    __m512 r[kIn][3];  // dU G
    for (int i = 0; i < kIn; ++i) {
      const float* u = du0 + (i * kIn) * plane + c0;
      const __m512 u0 = _mm512_loadu_ps(u), u1 = _mm512_loadu_ps(u + plane);
      const __m512 u2 = _mm512_loadu_ps(u + 2 * plane), u3 = _mm512_loadu_ps(u + 3 * plane);
      const __m512 s12 = _mm512_add_ps(u1, u2);
      r[i][0] = _mm512_fmadd_ps(h, s12, u0);
      r[i][1] = _mm512_mul_ps(h, _mm512_sub_ps(u1, u2));
      r[i][2] = _mm512_fmadd_ps(h, s12, u3);
    }
    __m512i t[16];  // rows: the 9 taps (G^T (dU G)), then zeros; after the transpose, channels
    for (int j = 0; j < 3; ++j) {
      const __m512 s12 = _mm512_add_ps(r[1][j], r[2][j]);
      t[0 * 3 + j] = _mm512_castps_si512(_mm512_fmadd_ps(h, s12, r[0][j]));
      t[1 * 3 + j] = _mm512_castps_si512(_mm512_mul_ps(h, _mm512_sub_ps(r[1][j], r[2][j])));
      t[2 * 3 + j] = _mm512_castps_si512(_mm512_fmadd_ps(h, s12, r[3][j]));
    }
    for (int k = 9; k < 16; ++k) t[k] = _mm512_setzero_si512();
    transpose16x16(t);
    for (int j = 0; j < 16; ++j) {
      typename O::T* d = dw0 + (c0 + j) * dw_stride;
      if constexpr (std::is_same_v<O, BF16>)  // rounded to nearest even, as BF16::store
        _mm256_mask_storeu_epi16(d, 0x1ff, (__m256i)_mm512_cvtneps_pbh(_mm512_castsi512_ps(t[j])));
      else
        _mm512_mask_storeu_epi32(d, 0x1ff, t[j]);
    }
  }
}
#endif

// One row of dw (see weight_grad_row_f64): float32 on AVX-512 BF16 CPUs where cog is a multiple
// of 16, else the float64 loop. The separate inverse and the fused last stage both come here, so
// they agree bit for bit.
template <class O>
void weight_grad_row(const float* du0, int64_t plane, int64_t cog, typename O::T* dw0, int64_t dw_stride) {
#ifdef FRT_WINO16_AVX512BF16
  if (have_avx512bf16() && cog % 16 == 0) {
    weight_grad_row_avx512<O>(du0, plane, cog, dw0, dw_stride);
    return;
  }
#endif
  weight_grad_row_f64<O>(du0, plane, cog, dw0, dw_stride);
}

}  // namespace

bool winograd_bf16_cpu_supported() { return have_avx512bf16(); }

Status conv3x3_winograd_bf16_input_cpu(const Conv3x3WinogradBf16Params& p) {
  int64_t tiles;
  const Status st = begin_stage(p, p.c_in == 0, p.x && p.v, &tiles);
  if (st != Status::kOk || tiles == 0) return st;
  // the 4x4 window of output tile (ty, tx) starts one pixel up and left (the padding)
#ifdef FRT_WINO16_AVX512BF16
  if (have_avx512bf16() && !p.portable) {
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
  const bool vec = !plain && !p.portable && conv3x3_winograd_bf16_products_vectorized(p);
  // result rows: the range's tiles (M[pg] = V[pg] @ U[pg])
  for_each_product_task(pairs, tiles, [&](int64_t pg, int64_t r0, int64_t rows) {
    const uint16_t* A = v + (pg * tiles + r0) * cg;
    const uint16_t* B = u + pg * cg * cog;
    float* C = m + (pg * tiles + r0) * cog;
#ifdef FRT_WINO16_AVX512BF16
    if (vec) {
      gemm_avx512bf16<false>(A, cg, 2, B, 2 * cog, C, cog, rows, cg, cog);
      return;
    }
#endif
    (void)vec;
    gemm_plain<false>(A, cg, 2, B, 2 * cog, C, cog, rows, cg, cog);
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

Status conv3x3_winograd_bf16_input_pairs_cpu(const Conv3x3WinogradBf16Params& p) { return pairs_stage<false>(p); }

Status conv3x3_winograd_bf16_grad_output_pairs_cpu(const Conv3x3WinogradBf16Params& p) {
  return pairs_stage<true>(p);
}

Status conv3x3_winograd_bf16_weight_grad_products_cpu(const Conv3x3WinogradBf16Params& p, bool plain) {
  int64_t tiles;
  const Status st = begin_stage(p, p.c_out == 0 || p.c_in == 0, p.v && p.m && p.du, &tiles);
  if (st != Status::kOk || tiles == 0) return st;
  const int64_t cg = p.c_in / p.groups, cog = p.c_out / p.groups;
  const int64_t npairs = (tiles + 1) / 2, k = 2 * npairs;
  const int64_t pgs = kWinogradF23Points * p.groups;
  const uint16_t* vp = static_cast<const uint16_t*>(p.v);
  const uint16_t* yp = static_cast<const uint16_t*>(p.m);
  const bool vec = !plain && !p.portable && conv3x3_winograd_bf16_products_vectorized(p);
  const bool acc = p.du_accumulate;
  // result rows: the input channels (du[pg] = Vp[pg]^T @ Yp[pg], reduced over the tile pairs)
  for_each_product_task(pgs, cg, [&](int64_t pg, int64_t r0, int64_t rows) {
    const uint16_t* A = vp + pg * npairs * cg * 2 + 2 * r0;  // row c: 2 apart; pair q: 2 * cg apart
    const uint16_t* B = yp + pg * npairs * cog * 2;
    float* C = p.du + (pg * cg + r0) * cog;
    if (acc) weight_grad_products<true>(vec, A, cg, B, cog, C, rows, k);
    else weight_grad_products<false>(vec, A, cg, B, cog, C, rows, k);
  });
  return Status::kOk;
}

template <class O>
Status weight_grad_out(const float* du, int64_t c_out, int64_t c_in_per_group, int64_t groups,
                       typename O::T* dw) {
  if (c_out < 0 || c_in_per_group < 0 || groups < 1 || c_out % groups) return Status::kInvalidArgument;
  if (c_out == 0 || c_in_per_group == 0) return Status::kOk;
  if (!du || !dw) return Status::kInvalidArgument;
  const int64_t cog = c_out / groups, cg = c_in_per_group;
  const int64_t plane = groups * cg * cog;
#pragma omp parallel for schedule(static)
  for (int64_t gc = 0; gc < groups * cg; ++gc) {
    const int64_t g = gc / cg, c = gc % cg;
    weight_grad_row<O>(du + (g * cg + c) * cog, plane, cog, dw + ((g * cog) * cg + c) * 9, cg * 9);
  }
  return Status::kOk;
}

Status winograd_f23_weight_grad_cpu(const float* du, int64_t c_out, int64_t c_in_per_group, int64_t groups,
                                    float* dw) {
  return weight_grad_out<F32>(du, c_out, c_in_per_group, groups, dw);
}

namespace {

// conv3x3_winograd_bf16_weight_grad_last_cpu for dw stored as O (F32 or BF16).
template <class O>
Status weight_grad_last(const Conv3x3WinogradBf16Params& p, bool plain, typename O::T* dw) {
  int64_t tiles;
  const Status st = begin_stage(p, p.c_out == 0 || p.c_in == 0, p.v && p.m && dw && (p.du || !p.du_accumulate),
                                &tiles);
  if (st != Status::kOk) return st;
  const int64_t cg = p.c_in / p.groups, cog = p.c_out / p.groups, groups = p.groups;
  if (cg == 0 || cog == 0) return Status::kOk;
  if (tiles == 0) {  // an empty last range: du holds the whole sum (or there is none)
    if (p.du_accumulate) return weight_grad_out<O>(p.du, p.c_out, cg, groups, dw);
    std::fill(dw, dw + p.c_out * cg * 9, O::store(0.0f));
    return Status::kOk;
  }
  const int64_t npairs = (tiles + 1) / 2, k = 2 * npairs;
  const uint16_t* vp = static_cast<const uint16_t*>(p.v);
  const uint16_t* yp = static_cast<const uint16_t*>(p.m);
  const bool vec = !plain && !p.portable && conv3x3_winograd_bf16_products_vectorized(p);
  const int64_t plane = groups * cg * cog;  // du's point stride
  weight_grad_blocks<kWinogradF23Points>(
      groups, cg, cog, dw,
      [&](int64_t g, int pt, int64_t r0, int64_t rows, float* C) {
        const int64_t pg = pt * groups + g;
        const uint16_t* A = vp + pg * npairs * cg * 2 + 2 * r0;
        const uint16_t* B = yp + pg * npairs * cog * 2;
        if (p.du_accumulate) {
          std::memcpy(C, p.du + pt * plane + (g * cg + r0) * cog, size_t(rows * cog) * sizeof(float));
          weight_grad_products<true>(vec, A, cg, B, cog, C, rows, k);
        } else {
          weight_grad_products<false>(vec, A, cg, B, cog, C, rows, k);
        }
      },
      [&](const float* du0, int64_t ps, typename O::T* taps0, int64_t taps_stride) {
        weight_grad_row<O>(du0, ps, cog, taps0, taps_stride);
      });
  return Status::kOk;
}

}  // namespace

Status conv3x3_winograd_bf16_weight_grad_last_cpu(const Conv3x3WinogradBf16Params& p, float* dw, bool plain) {
  return weight_grad_last<F32>(p, plain, dw);
}

Status conv3x3_winograd_bf16_weight_grad_last_cpu(const Conv3x3WinogradBf16Params& p, uint16_t* dw, bool plain) {
  return weight_grad_last<BF16>(p, plain, dw);
}

Status winograd_f23_weight_grad_cpu(const float* du, int64_t c_out, int64_t c_in_per_group, int64_t groups,
                                    uint16_t* dw) {
  return weight_grad_out<BF16>(du, c_out, c_in_per_group, groups, dw);
}

Status winograd_f23_weight_bf16_cpu(const float* w, int64_t c_out, int64_t c_in_per_group, int64_t groups,
                                    uint16_t* u, bool flipped_transposed) {
  return weight_bf16<F32>(w, c_out, c_in_per_group, groups, u, flipped_transposed);
}

Status winograd_f23_weight_bf16_cpu(const uint16_t* w, int64_t c_out, int64_t c_in_per_group, int64_t groups,
                                    uint16_t* u, bool flipped_transposed) {
  return weight_bf16<BF16>(w, c_out, c_in_per_group, groups, u, flipped_transposed);
}

Status winograd_f23_weight_bf16_transpose_cpu(const uint16_t* u, int64_t k_in, int64_t k_out, int64_t groups,
                                              uint16_t* ut) {
  if (k_in < 0 || k_out < 0 || groups < 1 || k_in % 2 || k_out % 2) return Status::kInvalidArgument;
  if (k_in == 0 || k_out == 0) return Status::kOk;
  if (!u || !ut) return Status::kInvalidArgument;
  const int64_t ip_n = k_in / 2, op_n = k_out / 2, mat = ip_n * k_out;  // 32-bit words per (point, group)
  constexpr int kSwap[4] = {3, 1, 2, 0};
  constexpr int64_t kBlk = 32;  // (input pair, output pair) blocks: both sides' lines stay in L1
  const int64_t nb_i = (ip_n + kBlk - 1) / kBlk, nb_o = (op_n + kBlk - 1) / kBlk;
  const int64_t tasks = kWinogradF23Points * groups * nb_i * nb_o;
  const uint32_t* src_all = reinterpret_cast<const uint32_t*>(u);
  uint32_t* dst_all = reinterpret_cast<uint32_t*>(ut);
#pragma omp parallel for schedule(static) if (tasks * kBlk * kBlk >= 32768)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t bo = t % nb_o, bi = (t / nb_o) % nb_i, pg = t / (nb_o * nb_i);
    const int64_t p = pg / groups, g = pg % groups;
    const int64_t q = 4 * kSwap[p / 4] + kSwap[p % 4];  // U'[q] comes from U[p]
    // word A[ip][o] = (M[2 ip][o], M[2 ip + 1][o]); word B[op][i] = (M[i][2 op], M[i][2 op + 1])
    const uint32_t* A = src_all + (p * groups + g) * mat;
    uint32_t* B = dst_all + (q * groups + g) * mat;
    const int64_t i1 = std::min(ip_n, (bi + 1) * kBlk), o1 = std::min(op_n, (bo + 1) * kBlk);
    for (int64_t op = bo * kBlk; op < o1; ++op) {
      uint32_t* b = B + op * k_in;
      for (int64_t ip = bi * kBlk; ip < i1; ++ip) {
        const uint32_t a0 = A[ip * k_out + 2 * op], a1 = A[ip * k_out + 2 * op + 1];
        b[2 * ip] = (a0 & 0xffffu) | (a1 << 16);             // (M[2ip][2op], M[2ip][2op + 1])
        b[2 * ip + 1] = (a0 >> 16) | (a1 & 0xffff0000u);     // (M[2ip + 1][2op], M[2ip + 1][2op + 1])
      }
    }
  }
  return Status::kOk;
}

}  // namespace flamingo_rt
