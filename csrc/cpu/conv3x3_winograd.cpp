// CPU stages of the F(4x4, 3x3) Winograd convolution (see
// csrc/include/flamingo_rt/conv3x3_winograd.h): the input transform x -> V, the products
// M = V @ U, the output transform M -> y with bias + activation + gamma, the weight
// transform; for the weight gradient the output-gradient transform dy -> A dy A^T, the
// products dL/dU (+)= V^T @ (A dy A^T) and the inverse weight transform G^T dL/dU G.
//
// The activation transforms work on 16 channels at a time (one AVX-512 vector of float32;
// channels are the contiguous dim of channels-last x, y, dy and of V, M), a task being one
// 4x4 output tile with all its channels; tasks are spread over OpenMP threads. The per-tile
// functions are compiled per ISA level (FRT_CLONES: AVX-512, AVX2, baseline). The products
// are register-blocked AVX-512 kernels (6 rows x 64 columns of the result in 24 zmm
// accumulators) where the CPU has AVX-512F, a plain loop elsewhere; tasks are (point,
// group) pairs x row blocks, each summing in one fixed order (deterministic).
//
// Transform matrices (Lavin & Gray's F(4x4, 3x3), interpolation points 0, +-1, +-2, inf):
//   B^T = [4  0 -5  0 1 0]   G = [ 1/4     0     0]   A^T = [1 1  1 1  1 0]
//         [0 -4 -4  1 1 0]       [-1/6 -1/6  -1/6]         [0 1 -1 2 -2 0]
//         [0  4 -4 -1 1 0]       [-1/6  1/6  -1/6]         [0 1  1 4  4 0]
//         [0 -2 -1  2 1 0]       [1/24  1/12  1/6]         [0 1 -1 8 -8 1]
//         [0  2 -1 -2 1 0]       [1/24 -1/12  1/6]
//         [0  4  0 -5 0 1]       [ 0     0     1 ]
#include "flamingo_rt/conv3x3_winograd.h"

#include <algorithm>
#include <cstring>

#include "cpu_act.h"
#include "cpu_isa.h"
#include "cpu_math.h"
#include "gelu_avx512.h"
#include "winograd_tiles.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include "avx512_transpose16.h"
#define FRT_WINO_AVX512 1
#endif

namespace flamingo_rt {
namespace {

using namespace cpu;

constexpr int kVec = 16;  // channels per step
constexpr int kIn = 6;    // input tile edge

// One 16-channel chunk of an input tile: d (6x6 pixels, zero outside the image) -> V's 36
// points. `L` lanes are live (16, or the group's last partial chunk).
template <int L>
FRT_INLINE void input_chunk(const float* x, int64_t sx_h, int64_t sx_w, int64_t y0, int64_t x0,
                            int64_t H, int64_t W, float* v, int64_t v_point_stride, int nl) {
  const int n = L == kVec ? kVec : nl;
  float d[kIn][kIn][kVec];
  for (int i = 0; i < kIn; ++i) {
    const int64_t yy = y0 + i;
    const bool row_in = yy >= 0 && yy < H;
    for (int j = 0; j < kIn; ++j) {
      const int64_t xx = x0 + j;
      if (row_in && xx >= 0 && xx < W) {
        const float* src = x + yy * sx_h + xx * sx_w;
        FRT_SIMD for (int l = 0; l < n; ++l) d[i][j][l] = src[l];
      } else {
        FRT_SIMD for (int l = 0; l < n; ++l) d[i][j][l] = 0.0f;
      }
    }
  }
  float t[kIn][kIn][kVec];  // B^T d
  for (int j = 0; j < kIn; ++j) {
    FRT_SIMD for (int l = 0; l < n; ++l) {
      const float d0 = d[0][j][l], d1 = d[1][j][l], d2 = d[2][j][l];
      const float d3 = d[3][j][l], d4 = d[4][j][l], d5 = d[5][j][l];
      t[0][j][l] = 4.0f * d0 - 5.0f * d2 + d4;
      t[1][j][l] = (d3 + d4) - 4.0f * (d1 + d2);
      t[2][j][l] = (d4 - d3) + 4.0f * (d1 - d2);
      t[3][j][l] = (d4 - d2) + 2.0f * (d3 - d1);
      t[4][j][l] = (d4 - d2) - 2.0f * (d3 - d1);
      t[5][j][l] = 4.0f * d1 - 5.0f * d3 + d5;
    }
  }
  for (int i = 0; i < kIn; ++i) {  // (B^T d) B, stored point by point
    float* vi = v + (i * kIn) * v_point_stride;
    FRT_SIMD for (int l = 0; l < n; ++l) {
      const float t0 = t[i][0][l], t1 = t[i][1][l], t2 = t[i][2][l];
      const float t3 = t[i][3][l], t4 = t[i][4][l], t5 = t[i][5][l];
      vi[0 * v_point_stride + l] = 4.0f * t0 - 5.0f * t2 + t4;
      vi[1 * v_point_stride + l] = (t3 + t4) - 4.0f * (t1 + t2);
      vi[2 * v_point_stride + l] = (t4 - t3) + 4.0f * (t1 - t2);
      vi[3 * v_point_stride + l] = (t4 - t2) + 2.0f * (t3 - t1);
      vi[4 * v_point_stride + l] = (t4 - t2) - 2.0f * (t3 - t1);
      vi[5 * v_point_stride + l] = 4.0f * t1 - 5.0f * t3 + t5;
    }
  }
}

// Every channel of tile `t` (image origin y0, x0 of its 6x6 input window).
FRT_CLONES void input_tile(const Conv3x3WinogradParams& p, int64_t tiles, int64_t t, int64_t img,
                           int64_t y0, int64_t x0) {
  const float* x = static_cast<const float*>(p.x) + img * p.sx_n;
  float* v = static_cast<float*>(p.v);
  const int64_t cg = p.c_in / p.groups;
  const int64_t point_stride = p.groups * tiles * cg;  // V (36, G, T, cg)
  for (int64_t g = 0; g < p.groups; ++g) {
    float* vg = v + (g * tiles + t) * cg;
    const float* xg = x + g * cg;
    int64_t c0 = 0;
    for (; c0 + kVec <= cg; c0 += kVec)
      input_chunk<kVec>(xg + c0, p.sx_h, p.sx_w, y0, x0, p.h, p.w, vg + c0, point_stride, kVec);
    if (c0 < cg)
      input_chunk<0>(xg + c0, p.sx_h, p.sx_w, y0, x0, p.h, p.w, vg + c0, point_stride, int(cg - c0));
  }
}

// One 16-channel chunk of an output tile: M's 36 points -> the 4x4 outputs, with
// gamma * act(. + bias), stored where inside the image.
template <int L, bool HAS_ACT, Act A>
FRT_INLINE void output_chunk(const float* m, int64_t m_point_stride, const float* bias, float gamma,
                             float* y, int64_t sy_h, int64_t sy_w, int rows, int cols, int nl) {
  const int n = L == kVec ? kVec : nl;
  float s[kWinogradTile][kIn][kVec];  // A^T m
  for (int j = 0; j < kIn; ++j) {
    const float* mj = m + j * m_point_stride;
    FRT_SIMD for (int l = 0; l < n; ++l) {
      const float m0 = mj[0 * kIn * m_point_stride + l], m1 = mj[1 * kIn * m_point_stride + l];
      const float m2 = mj[2 * kIn * m_point_stride + l], m3 = mj[3 * kIn * m_point_stride + l];
      const float m4 = mj[4 * kIn * m_point_stride + l], m5 = mj[5 * kIn * m_point_stride + l];
      const float a = m1 + m2, b = m1 - m2, c = m3 + m4, e = m3 - m4;
      s[0][j][l] = m0 + a + c;
      s[1][j][l] = b + 2.0f * e;
      s[2][j][l] = a + 4.0f * c;
      s[3][j][l] = b + 8.0f * e + m5;
    }
  }
  float b[kVec];
  FRT_SIMD for (int l = 0; l < n; ++l) b[l] = bias ? bias[l] : 0.0f;
  // GELU where the CPU has AVX-512: the tile's pre-activations gathered in one buffer,
  // gelu_avx512.h's piecewise polynomials over it in one call, then stored
  bool batch_gelu = false;
#ifdef FRT_GELU_AVX512
  if constexpr (HAS_ACT && A == Act::kGelu) batch_gelu = gelu512::available();
#endif
  alignas(64) float pre[kWinogradTile * kWinogradTile][kVec];
  if (batch_gelu && n < kVec) std::memset(pre, 0, sizeof(pre));  // lanes past n: defined, unused
  for (int r = 0; r < rows; ++r) {
    float o[kWinogradTile][kVec];  // (A^T m) A
    FRT_SIMD for (int l = 0; l < n; ++l) {
      const float s0 = s[r][0][l], s1 = s[r][1][l], s2 = s[r][2][l];
      const float s3 = s[r][3][l], s4 = s[r][4][l], s5 = s[r][5][l];
      const float a = s1 + s2, bb = s1 - s2, c = s3 + s4, e = s3 - s4;
      o[0][l] = s0 + a + c;
      o[1][l] = bb + 2.0f * e;
      o[2][l] = a + 4.0f * c;
      o[3][l] = bb + 8.0f * e + s5;
    }
    if (batch_gelu) {
      for (int c = 0; c < kWinogradTile; ++c)
        FRT_SIMD for (int l = 0; l < n; ++l) pre[r * kWinogradTile + c][l] = o[c][l] + b[l];
      continue;
    }
    for (int c = 0; c < cols; ++c) {
      float* dst = y + r * sy_h + c * sy_w;
      FRT_SIMD for (int l = 0; l < n; ++l) {
        const float val = o[c][l] + b[l];
        if constexpr (HAS_ACT) {
          dst[l] = gamma * act_fwd<A>(val);
        } else {
          dst[l] = gamma * val;
        }
      }
    }
  }
#ifdef FRT_GELU_AVX512
  if (batch_gelu) {
    gelu512::gelu_inplace(&pre[0][0], int64_t(rows) * kWinogradTile * kVec, gamma);
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c) {
        float* dst = y + r * sy_h + c * sy_w;
        FRT_SIMD for (int l = 0; l < n; ++l) dst[l] = pre[r * kWinogradTile + c][l];
      }
  }
#endif
}

template <bool HAS_ACT, Act A>
FRT_CLONES void output_tile(const Conv3x3WinogradParams& p, int64_t tiles, int64_t t, int64_t img,
                            int64_t y0, int64_t x0) {
  const float* m = static_cast<const float*>(p.m);
  const float* bias = static_cast<const float*>(p.bias);
  float* y = static_cast<float*>(p.y) + img * p.sy_n + y0 * p.sy_h + x0 * p.sy_w;
  const int64_t cog = p.c_out / p.groups;
  const int64_t point_stride = p.groups * tiles * cog;  // M (36, G, T, cog)
  const int rows = int(std::min<int64_t>(kWinogradTile, p.h - y0));
  const int cols = int(std::min<int64_t>(kWinogradTile, p.w - x0));
  const float gamma = float(p.gamma);
  for (int64_t g = 0; g < p.groups; ++g) {
    const float* mg = m + (g * tiles + t) * cog;
    float* yg = y + g * cog;
    const float* bg = bias ? bias + g * cog : nullptr;
    int64_t c0 = 0;
    for (; c0 + kVec <= cog; c0 += kVec)
      output_chunk<kVec, HAS_ACT, A>(mg + c0, point_stride, bg ? bg + c0 : nullptr, gamma, yg + c0,
                                     p.sy_h, p.sy_w, rows, cols, kVec);
    if (c0 < cog)
      output_chunk<0, HAS_ACT, A>(mg + c0, point_stride, bg ? bg + c0 : nullptr, gamma, yg + c0,
                                  p.sy_h, p.sy_w, rows, cols, int(cog - c0));
  }
}

// ------------------------------------------------------------------ stage 2: products

// C (rows x n, ldc) = op(A) @ B (k x n, ldb), row-major float32, op(A) (rows x k) being A
// (lda: A[r * lda + q]) or, with TA, A's transpose (A[q * lda + r]: the weight gradient's
// V^T, reduced over tiles); ACC adds to C instead of overwriting it. The portable loop.
template <bool TA, bool ACC>
FRT_CLONES void gemm_plain(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                           int64_t rows, int64_t k, int64_t n) {
  for (int64_t i = 0; i < rows; ++i) {
    float* c = C + i * ldc;
    if (!ACC) FRT_SIMD for (int64_t j = 0; j < n; ++j) c[j] = 0.0f;
    for (int64_t q = 0; q < k; ++q) {
      const float a = TA ? A[q * lda + i] : A[i * lda + q];
      const float* b = B + q * ldb;
      FRT_SIMD for (int64_t j = 0; j < n; ++j) c[j] += a * b[j];
    }
  }
}

#ifdef FRT_WINO_AVX512
#define FRT_AVX512 __attribute__((target("avx512f")))

// MR rows x NV vectors of 16 columns of C, accumulated over k in MR * NV zmm registers:
// per k, NV loads of B's row and MR broadcasts of op(A)'s column.
template <int MR, int NV, bool TA, bool ACC>
FRT_AVX512 inline void micro(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                             int64_t k) {
  // (the fixed loops are unrolled explicitly: at -O2 GCC kept acc in memory, 70 vs 210 GFLOP/s)
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = ACC ? _mm512_loadu_ps(C + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t q = 0; q < k; ++q) {
    __m512 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(B + q * ldb + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(TA ? A[q * lda + r] : A[r * lda + q]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(a, b[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + r * ldc + 16 * v, acc[r][v]);
}

constexpr int kMR = 6;  // rows per register block (6 x 4 zmm accumulators)

template <int NV, bool TA, bool ACC>
FRT_AVX512 inline void rows_block(const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                                  int64_t ldc, int64_t rows, int64_t k) {
  // row i of op(A) starts at A + i * lda, or (TA) at column i: A + i
  const int64_t rs = TA ? 1 : lda;
  int64_t i = 0;
  for (; i + kMR <= rows; i += kMR) micro<kMR, NV, TA, ACC>(A + i * rs, lda, B, ldb, C + i * ldc, ldc, k);
  switch (rows - i) {
    case 5: micro<5, NV, TA, ACC>(A + i * rs, lda, B, ldb, C + i * ldc, ldc, k); break;
    case 4: micro<4, NV, TA, ACC>(A + i * rs, lda, B, ldb, C + i * ldc, ldc, k); break;
    case 3: micro<3, NV, TA, ACC>(A + i * rs, lda, B, ldb, C + i * ldc, ldc, k); break;
    case 2: micro<2, NV, TA, ACC>(A + i * rs, lda, B, ldb, C + i * ldc, ldc, k); break;
    case 1: micro<1, NV, TA, ACC>(A + i * rs, lda, B, ldb, C + i * ldc, ldc, k); break;
    default: break;
  }
}

// n a multiple of 16: column panels of 64 (B's panel stays in L1 / L2 across the row blocks).
template <bool TA, bool ACC>
FRT_AVX512 void gemm_avx512(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                            int64_t rows, int64_t k, int64_t n) {
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) rows_block<4, TA, ACC>(A, lda, B + j, ldb, C + j, ldc, rows, k);
  switch ((n - j) / 16) {
    case 3: rows_block<3, TA, ACC>(A, lda, B + j, ldb, C + j, ldc, rows, k); break;
    case 2: rows_block<2, TA, ACC>(A, lda, B + j, ldb, C + j, ldc, rows, k); break;
    case 1: rows_block<1, TA, ACC>(A, lda, B + j, ldb, C + j, ldc, rows, k); break;
    default: break;
  }
}

bool have_avx512() {
  return cpu::isa::avx512();
}
#else
bool have_avx512() { return false; }
#endif

// ------------------------------------------------------------------ weight gradient

// One 16-channel chunk of an output-gradient tile: dy (4x4, zero outside the image) ->
// Yg = A dy A^T at the 36 points, A = (A^T)^T (rows (1,0,0,0), (1,1,1,1), (1,-1,1,-1),
// (1,2,4,8), (1,-2,4,-8), (0,0,0,1)).
template <int L>
FRT_INLINE void grad_chunk(const float* dy, int64_t s_h, int64_t s_w, int rows, int cols, float* m,
                           int64_t m_point_stride, int nl) {
  const int n = L == kVec ? kVec : nl;
  float d[kWinogradTile][kWinogradTile][kVec];
  for (int i = 0; i < kWinogradTile; ++i)
    for (int j = 0; j < kWinogradTile; ++j) {
      if (i < rows && j < cols) {
        const float* src = dy + i * s_h + j * s_w;
        FRT_SIMD for (int l = 0; l < n; ++l) d[i][j][l] = src[l];
      } else {
        FRT_SIMD for (int l = 0; l < n; ++l) d[i][j][l] = 0.0f;
      }
    }
  float t[kIn][kWinogradTile][kVec];  // A dy
  for (int j = 0; j < kWinogradTile; ++j) {
    FRT_SIMD for (int l = 0; l < n; ++l) {
      const float d0 = d[0][j][l], d1 = d[1][j][l], d2 = d[2][j][l], d3 = d[3][j][l];
      const float e = d0 + d2, o = d1 + d3, e4 = d0 + 4.0f * d2, o4 = 2.0f * d1 + 8.0f * d3;
      t[0][j][l] = d0;
      t[1][j][l] = e + o;
      t[2][j][l] = e - o;
      t[3][j][l] = e4 + o4;
      t[4][j][l] = e4 - o4;
      t[5][j][l] = d3;
    }
  }
  for (int a = 0; a < kIn; ++a) {  // (A dy) A^T
    float* ma = m + (a * kIn) * m_point_stride;
    FRT_SIMD for (int l = 0; l < n; ++l) {
      const float t0 = t[a][0][l], t1 = t[a][1][l], t2 = t[a][2][l], t3 = t[a][3][l];
      const float e = t0 + t2, o = t1 + t3, e4 = t0 + 4.0f * t2, o4 = 2.0f * t1 + 8.0f * t3;
      ma[0 * m_point_stride + l] = t0;
      ma[1 * m_point_stride + l] = e + o;
      ma[2 * m_point_stride + l] = e - o;
      ma[3 * m_point_stride + l] = e4 + o4;
      ma[4 * m_point_stride + l] = e4 - o4;
      ma[5 * m_point_stride + l] = t3;
    }
  }
}

FRT_CLONES void grad_tile(const Conv3x3WinogradParams& p, int64_t tiles, int64_t t, int64_t img, int64_t y0,
                          int64_t x0) {
  const float* dy = static_cast<const float*>(p.dy) + img * p.sdy_n + y0 * p.sdy_h + x0 * p.sdy_w;
  float* m = static_cast<float*>(p.m);
  const int64_t cog = p.c_out / p.groups;
  const int64_t point_stride = p.groups * tiles * cog;  // Yg (36, G, T, cog), in M's buffer
  const int rows = int(std::min<int64_t>(kWinogradTile, p.h - y0));
  const int cols = int(std::min<int64_t>(kWinogradTile, p.w - x0));
  for (int64_t g = 0; g < p.groups; ++g) {
    float* mg = m + (g * tiles + t) * cog;
    const float* dg = dy + g * cog;
    int64_t c0 = 0;
    for (; c0 + kVec <= cog; c0 += kVec)
      grad_chunk<kVec>(dg + c0, p.sdy_h, p.sdy_w, rows, cols, mg + c0, point_stride, kVec);
    if (c0 < cog) grad_chunk<0>(dg + c0, p.sdy_h, p.sdy_w, rows, cols, mg + c0, point_stride, int(cog - c0));
  }
}

// op(A) @ B into C (ACC: added to C) through the AVX-512 kernels when vec, else the plain loop.
template <bool TA, bool ACC>
void gemm(bool vec, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t rows,
          int64_t k, int64_t n) {
#ifdef FRT_WINO_AVX512
  if (vec) {
    gemm_avx512<TA, ACC>(A, lda, B, ldb, C, ldc, rows, k, n);
    return;
  }
#endif
  (void)vec;
  gemm_plain<TA, ACC>(A, lda, B, ldb, C, ldc, rows, k, n);
}

// The checks every stage starts with: dtype, sizes, the tile range, then (when there is work)
// the pointers the stage uses (`pointers`). Sets *tiles to the range's tile count, 0 when there
// is nothing to do (an empty range, or `no_channels`): kOk with *tiles == 0 means return.
Status begin_stage(const Conv3x3WinogradParams& p, bool no_channels, bool pointers, int64_t* tiles) {
  *tiles = 0;
  if (p.dtype != DType::kFloat32) return Status::kUnsupportedDtype;
  if (p.n < 0 || p.h < 0 || p.w < 0 || p.c_in < 0 || p.c_out < 0 || p.groups < 1 ||
      p.c_in % p.groups || p.c_out % p.groups)
    return Status::kInvalidArgument;
  const int64_t n = range_tile_count(p.n * winograd_tiles(p.h) * winograd_tiles(p.w), p.tile_begin, p.tile_count);
  if (n < 0) return Status::kInvalidArgument;
  if (n == 0 || no_channels) return Status::kOk;
  if (!pointers) return Status::kInvalidArgument;
  *tiles = n;
  return Status::kOk;
}

// cpu::for_each_tile over the call's range.
template <class Fn>
void for_each_tile(const Conv3x3WinogradParams& p, int64_t tiles, int64_t origin_offset, Fn fn) {
  cpu::for_each_tile<kWinogradTile>(p.h, p.w, p.tile_begin, tiles, origin_offset, fn);
}

template <bool HAS_ACT, Act A>
void output_all(const Conv3x3WinogradParams& p, int64_t tiles) {
  for_each_tile(p, tiles, 0, [&](int64_t t, int64_t img, int64_t y0, int64_t x0) {
    output_tile<HAS_ACT, A>(p, tiles, t, img, y0, x0);
  });
}

}  // namespace

Status conv3x3_winograd_input_cpu(const Conv3x3WinogradParams& p) {
  int64_t tiles;
  const Status st = begin_stage(p, p.c_in == 0, p.x && p.v, &tiles);
  if (st != Status::kOk || tiles == 0) return st;
  // the 6x6 window of output tile (ty, tx) starts one pixel up and left (the padding)
  for_each_tile(p, tiles, -1, [&](int64_t t, int64_t img, int64_t y0, int64_t x0) {
    input_tile(p, tiles, t, img, y0, x0);
  });
  return Status::kOk;
}

Status conv3x3_winograd_grad_output_transform_cpu(const Conv3x3WinogradParams& p) {
  int64_t tiles;
  const Status st = begin_stage(p, p.c_out == 0, p.dy && p.m, &tiles);
  if (st != Status::kOk || tiles == 0) return st;
  for_each_tile(p, tiles, 0, [&](int64_t t, int64_t img, int64_t y0, int64_t x0) {
    grad_tile(p, tiles, t, img, y0, x0);
  });
  return Status::kOk;
}

Status conv3x3_winograd_weight_grad_products_cpu(const Conv3x3WinogradParams& p) {
  int64_t tiles;
  const Status st = begin_stage(p, p.c_out == 0 || p.c_in == 0, p.v && p.m && p.du, &tiles);
  if (st != Status::kOk || tiles == 0) return st;
  const int64_t cg = p.c_in / p.groups, cog = p.c_out / p.groups;
  const int64_t pairs = kWinogradPoints * p.groups;
  const float* v = static_cast<const float*>(p.v);
  const float* m = static_cast<const float*>(p.m);
  float* du = static_cast<float*>(p.du);
  const bool vec = conv3x3_winograd_products_vectorized(p);
  // result rows: the input channels (du[pg] = V[pg]^T @ Yg[pg], reduced over the tiles)
  for_each_product_task(pairs, cg, [&](int64_t pg, int64_t r0, int64_t rows) {
    const float* A = v + pg * tiles * cg + r0;  // columns r0.. of V[pg]
    const float* B = m + pg * tiles * cog;
    float* C = du + (pg * cg + r0) * cog;
    if (p.du_accumulate)
      gemm<true, true>(vec, A, cg, B, cog, C, cog, rows, tiles, cog);
    else
      gemm<true, false>(vec, A, cg, B, cog, C, cog, rows, tiles, cog);
  });
  return Status::kOk;
}

bool conv3x3_winograd_products_vectorized(const Conv3x3WinogradParams& p) {
  return have_avx512() && p.groups >= 1 && (p.c_out / p.groups) % 16 == 0;
}

Status conv3x3_winograd_products_cpu(const Conv3x3WinogradParams& p) {
  int64_t tiles;
  const Status st = begin_stage(p, p.c_out == 0, p.v && p.u && p.m, &tiles);
  if (st != Status::kOk || tiles == 0) return st;
  const int64_t cg = p.c_in / p.groups, cog = p.c_out / p.groups;
  const int64_t pairs = kWinogradPoints * p.groups;
  const float* v = static_cast<const float*>(p.v);
  const float* u = static_cast<const float*>(p.u);
  float* m = static_cast<float*>(p.m);
  const bool vec = conv3x3_winograd_products_vectorized(p);
  // result rows: the range's tiles (M[pg] = V[pg] @ U[pg])
  for_each_product_task(pairs, tiles, [&](int64_t pg, int64_t r0, int64_t rows) {
    gemm<false, false>(vec, v + (pg * tiles + r0) * cg, cg, u + pg * cg * cog, cog, m + (pg * tiles + r0) * cog,
                       cog, rows, cg, cog);
  });
  return Status::kOk;
}

Status conv3x3_winograd_output_cpu(const Conv3x3WinogradParams& p) {
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

namespace {

// U's entries for one row of U (a group's input channel) over its cog columns: kernel co
// (9 taps) at kb + co * k_stride, its taps in reverse order with FLIP, written to
// u0[p * plane_stride + co] for the 36 points p. Float64 math, vectorized over the columns
// (the taps are gathered).
template <bool FLIP>
FRT_CLONES void weight_row(const float* kb, int64_t k_stride, int64_t cog, float* u0, int64_t plane_stride) {
  constexpr double g1 = 1.0 / 6, g2 = 1.0 / 12, g3 = 1.0 / 24;
  FRT_SIMD for (int64_t co = 0; co < cog; ++co) {
    const float* k = kb + co * k_stride;
    double gk[kIn][3];  // G k: rows of G = (1/4, 0, 0), -(1, 1, 1)/6, (-1, 1, -1)/6,
                        // (1/24, 1/12, 1/6), (1/24, -1/12, 1/6), (0, 0, 1)
    for (int j = 0; j < 3; ++j) {
      const double k0 = k[FLIP ? 8 - j : j], k1 = k[FLIP ? 5 - j : 3 + j], k2 = k[FLIP ? 2 - j : 6 + j];
      gk[0][j] = 0.25 * k0;
      gk[1][j] = -g1 * (k0 + k1 + k2);
      gk[2][j] = -g1 * (k0 - k1 + k2);
      gk[3][j] = g3 * k0 + g2 * k1 + g1 * k2;
      gk[4][j] = g3 * k0 - g2 * k1 + g1 * k2;
      gk[5][j] = k2;
    }
    for (int a = 0; a < kIn; ++a) {  // (G k) G^T
      const double t0 = gk[a][0], t1 = gk[a][1], t2 = gk[a][2];
      float* ua = u0 + (a * kIn) * plane_stride + co;
      ua[0 * plane_stride] = float(0.25 * t0);
      ua[1 * plane_stride] = float(-g1 * (t0 + t1 + t2));
      ua[2 * plane_stride] = float(-g1 * (t0 - t1 + t2));
      ua[3 * plane_stride] = float(g3 * t0 + g2 * t1 + g1 * t2);
      ua[4 * plane_stride] = float(g3 * t0 - g2 * t1 + g1 * t2);
      ua[5 * plane_stride] = float(t2);
    }
  }
}

}  // namespace

Status winograd_f43_weight_cpu(const float* w, int64_t c_out, int64_t c_in_per_group, int64_t groups,
                               float* u, bool flipped_transposed) {
  if (c_out < 0 || c_in_per_group < 0 || groups < 1 || c_out % groups) return Status::kInvalidArgument;
  if (c_out == 0 || c_in_per_group == 0) return Status::kOk;
  if (!w || !u) return Status::kInvalidArgument;
  const int64_t cog = c_out / groups, ci = c_in_per_group;
  const int64_t plane = groups * ci * cog;  // U (36, G, ci, cog), or transposed (36, G, cog, ci)
  // one task per row of U: the row at every point is contiguous over U's columns (a task per
  // output channel, scalar, took 9.3 ms for a 768 x 128 x 3 x 3 weight)
  if (flipped_transposed) {
    // U's rows are the forward's output channels o, its columns the input channels c (taps at
    // stride 9), every kernel flipped: the input gradient's convolution
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t o = 0; o < cog; ++o)
        weight_row<true>(w + (g * cog + o) * ci * 9, 9, ci, u + (g * cog + o) * ci, plane);
    return Status::kOk;
  }
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t c = 0; c < ci; ++c)
      weight_row<false>(w + (g * cog * ci + c) * 9, ci * 9, cog, u + (g * ci + c) * cog, plane);
  return Status::kOk;
}

namespace {

// dw of one (group, input channel) row over the group's output channels: du at
// du0[p * plane_stride + co] (36 points) -> dw_co (9 taps) at dw0 + co * dw_stride, as
// G^T du G in float64 (G's columns: (1/4, -1/6, -1/6, 1/24, 1/24, 0),
// (0, -1/6, 1/6, 1/12, -1/12, 0), (0, -1/6, -1/6, 1/6, 1/6, 1)).
FRT_CLONES void weight_grad_row_f64(const float* du0, int64_t plane_stride, int64_t cog, float* dw0, int64_t dw_stride) {
  constexpr double g1 = 1.0 / 6, g2 = 1.0 / 12, g3 = 1.0 / 24;
  FRT_SIMD for (int64_t co = 0; co < cog; ++co) {
    double s[kIn][3];  // du G
    for (int a = 0; a < kIn; ++a) {
      const float* r = du0 + (a * kIn) * plane_stride + co;
      const double u0 = r[0], u1 = r[plane_stride], u2 = r[2 * plane_stride];
      const double u3 = r[3 * plane_stride], u4 = r[4 * plane_stride], u5 = r[5 * plane_stride];
      s[a][0] = 0.25 * u0 - g1 * (u1 + u2) + g3 * (u3 + u4);
      s[a][1] = g1 * (u2 - u1) + g2 * (u3 - u4);
      s[a][2] = g1 * (u3 + u4 - u1 - u2) + u5;
    }
    float* d = dw0 + co * dw_stride;
    for (int l = 0; l < 3; ++l) {  // G^T (du G)
      d[0 * 3 + l] = float(0.25 * s[0][l] - g1 * (s[1][l] + s[2][l]) + g3 * (s[3][l] + s[4][l]));
      d[1 * 3 + l] = float(g1 * (s[2][l] - s[1][l]) + g2 * (s[3][l] - s[4][l]));
      d[2 * 3 + l] = float(g1 * (s[3][l] + s[4][l] - s[1][l] - s[2][l]) + s[5][l]);
    }
  }
}

#ifdef FRT_WINO_AVX512
// The same for 16 output channels at a time in float32 (AVX-512): the 36 points' vectors
// (lanes: the channels) -> 9 tap vectors, transposed in registers so each channel's 9 taps
// leave in one masked store. In the fused last stage the float64 loop (8 lanes, a strided
// store per tap and lane) made a 768 x 128 x 3 x 3 gradient at 7 x 7 4-5x slower.
FRT_AVX512 void weight_grad_row_avx512(const float* du0, int64_t plane_stride, int64_t cog, float* dw0,
                                       int64_t dw_stride) {
  const __m512 q = _mm512_set1_ps(0.25f), g1 = _mm512_set1_ps(1.0f / 6), g2 = _mm512_set1_ps(1.0f / 12),
               g3 = _mm512_set1_ps(1.0f / 24);
  for (int64_t c0 = 0; c0 < cog; c0 += 16) {
    __m512 s[kIn][3];  // du G
    for (int a = 0; a < kIn; ++a) {
      const float* r = du0 + (a * kIn) * plane_stride + c0;
      const __m512 u0 = _mm512_loadu_ps(r), u1 = _mm512_loadu_ps(r + plane_stride);
      const __m512 u2 = _mm512_loadu_ps(r + 2 * plane_stride), u3 = _mm512_loadu_ps(r + 3 * plane_stride);
      const __m512 u4 = _mm512_loadu_ps(r + 4 * plane_stride), u5 = _mm512_loadu_ps(r + 5 * plane_stride);
      const __m512 p12 = _mm512_add_ps(u1, u2), p34 = _mm512_add_ps(u3, u4);
      s[a][0] = _mm512_fmadd_ps(g3, p34, _mm512_fnmadd_ps(g1, p12, _mm512_mul_ps(q, u0)));
      s[a][1] = _mm512_fmadd_ps(g2, _mm512_sub_ps(u3, u4), _mm512_mul_ps(g1, _mm512_sub_ps(u2, u1)));
      s[a][2] = _mm512_fmadd_ps(g1, _mm512_sub_ps(p34, p12), u5);
    }
    __m512i t[16];  // rows: the 9 taps (G^T (du G)), then zeros; after the transpose, channels
    for (int l = 0; l < 3; ++l) {
      const __m512 p12 = _mm512_add_ps(s[1][l], s[2][l]), p34 = _mm512_add_ps(s[3][l], s[4][l]);
      t[0 * 3 + l] = _mm512_castps_si512(_mm512_fmadd_ps(g3, p34, _mm512_fnmadd_ps(g1, p12, _mm512_mul_ps(q, s[0][l]))));
      t[1 * 3 + l] = _mm512_castps_si512(
          _mm512_fmadd_ps(g2, _mm512_sub_ps(s[3][l], s[4][l]), _mm512_mul_ps(g1, _mm512_sub_ps(s[2][l], s[1][l]))));
      t[2 * 3 + l] = _mm512_castps_si512(_mm512_fmadd_ps(g1, _mm512_sub_ps(p34, p12), s[5][l]));
    }
    for (int k = 9; k < 16; ++k) t[k] = _mm512_setzero_si512();
    transpose16x16(t);
    for (int j = 0; j < 16; ++j) _mm512_mask_storeu_epi32(dw0 + (c0 + j) * dw_stride, 0x1ff, t[j]);
  }
}
#endif

// One row of dw from du (see weight_grad_row_f64): float32 AVX-512 where the CPU has it and
// cog is a multiple of 16, else the float64 loop. Both weight-gradient paths (the separate
// inverse and the fused last stage) come here, so they agree bit for bit.
void weight_grad_row(const float* du0, int64_t plane_stride, int64_t cog, float* dw0, int64_t dw_stride) {
#ifdef FRT_WINO_AVX512
  if (have_avx512() && cog % 16 == 0) {
    weight_grad_row_avx512(du0, plane_stride, cog, dw0, dw_stride);
    return;
  }
#endif
  weight_grad_row_f64(du0, plane_stride, cog, dw0, dw_stride);
}

}  // namespace

Status winograd_f43_weight_grad_cpu(const float* du, int64_t c_out, int64_t c_in_per_group, int64_t groups,
                                    float* dw) {
  if (c_out < 0 || c_in_per_group < 0 || groups < 1 || c_out % groups) return Status::kInvalidArgument;
  if (c_out == 0 || c_in_per_group == 0) return Status::kOk;
  if (!du || !dw) return Status::kInvalidArgument;
  const int64_t cog = c_out / groups, ci = c_in_per_group;
  const int64_t plane = groups * ci * cog;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t c = 0; c < ci; ++c)
      weight_grad_row(du + (g * ci + c) * cog, plane, cog, dw + (g * cog * ci + c) * 9, ci * 9);
  return Status::kOk;
}

Status conv3x3_winograd_weight_grad_last_cpu(const Conv3x3WinogradParams& p, float* dw) {
  int64_t tiles;
  const Status st = begin_stage(p, p.c_out == 0 || p.c_in == 0, p.v && p.m && dw && (p.du || !p.du_accumulate),
                                &tiles);
  if (st != Status::kOk) return st;
  const int64_t cg = p.c_in / p.groups, cog = p.c_out / p.groups, groups = p.groups;
  if (cg == 0 || cog == 0) return Status::kOk;
  if (tiles == 0) {  // an empty last range: du holds the whole sum (or there is none)
    if (p.du_accumulate) return winograd_f43_weight_grad_cpu(static_cast<const float*>(p.du), p.c_out, cg, groups, dw);
    std::fill(dw, dw + p.c_out * cg * 9, 0.0f);
    return Status::kOk;
  }
  const float* v = static_cast<const float*>(p.v);
  const float* m = static_cast<const float*>(p.m);
  const float* du = static_cast<const float*>(p.du);
  const bool vec = conv3x3_winograd_products_vectorized(p);
  const int64_t plane = groups * cg * cog;  // du's point stride
  weight_grad_blocks<kWinogradPoints>(
      groups, cg, cog, dw,
      [&](int64_t g, int pt, int64_t r0, int64_t rows, float* C) {
        const int64_t pg = pt * groups + g;
        const float* A = v + pg * tiles * cg + r0;  // columns r0.. of V[pg]
        const float* B = m + pg * tiles * cog;
        if (p.du_accumulate) {
          std::memcpy(C, du + pt * plane + (g * cg + r0) * cog, size_t(rows * cog) * sizeof(float));
          gemm<true, true>(vec, A, cg, B, cog, C, cog, rows, tiles, cog);
        } else {
          gemm<true, false>(vec, A, cg, B, cog, C, cog, rows, tiles, cog);
        }
      },
      [&](const float* du0, int64_t ps, float* taps0, int64_t taps_stride) {
        weight_grad_row(du0, ps, cog, taps0, taps_stride);
      });
  return Status::kOk;
}

}  // namespace flamingo_rt
