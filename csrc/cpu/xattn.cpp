// CPU kernels of image-causal cross-attention (see csrc/include/flamingo_rt/xattn.h).
//
// Work decomposition. The runs of equal media_index along each row ("segments") are found
// once. The forward is a list of tasks (b, segment chunk of <= kChunk tokens) x head, spread
// over OpenMP threads (dynamic schedule: chunks differ in size). For each block of kTB
// queries a task computes the scores transposed, S^T = K (scale q)^T (N keys x kTB queries),
// reading the image's keys and values as rows (in place when they are float32 / float64 with
// unit element stride, else converted once per image into dense zero-padded fp32 rows), runs
// the softmax down the columns (vectorized over queries; online across images in
// all_previous mode) and O = P V. Nothing larger than N x kTB scores exists at any time.
//
// Backward, image-causal mode: one task per (b, head, image j) owns dK_j and dV_j and walks
// the segments with media_index == j; per query block it recomputes S^T and P^T, then
// dP^T = V dO^T, D = colsum(P^T * dP^T), dS^T = P^T (dP^T - D), dQ = scale dS K (those
// tokens see only image j, so dQ has one writer too), dK += dS^T (scale q), dV += P^T dO,
// with K and V copied once into dense rows (the backward passes over them several times).
// all_previous mode: first a task per (b, head, token chunk) makes a pass over its images
// for the softmax max, normalizer and D = sum_n p_n dP_n per row (online, from the same
// exponentials as p; saved as lse and D), and a second for dQ = scale sum_j dS_j K_j (row
// layout, K transposed into scratch); then a task per (b, head, image j) walks every segment
// with media_index >= j and accumulates dK_j, dV_j from them (transposed layout, P from lse).
//
// Inner loops: a register-blocked product C (+)= A B (up to 8 rows x a 16-64 column block of
// accumulators in GCC vector-extension registers, B row-major, A with any row and k strides);
// the task functions are compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2+FMA) and the
// baseline with target_clones and picked at load time (as bias_gamma_act.cpp). bfloat16 is
// converted to fp32 on load; float64 uses the same code in double.
#include "flamingo_rt/kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_amx.h"
#include "cpu_math.h"

#ifdef _OPENMP
#include <omp.h>
#endif

// Reductions (max, sum) and exp loops are vectorized by `omp simd` (FRT_SIMD, cpu_math.h;
// honoured with -fopenmp, ignored -- and then scalar -- without OpenMP).

#if defined(__GNUC__) && !defined(__clang__)
// The vector-typed helpers below are always inlined; no vector crosses a call boundary.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace flamingo_rt {
using namespace cpu;  // element types and scalar math: cpu_math.h
namespace {

constexpr int64_t kTB = 32;      // queries per block
constexpr int64_t kChunk = 128;  // tokens per forward task
constexpr int64_t kVW = 16;      // column block of the product kernel (and padding unit)
// Below this many multiply-adds a call runs on one thread: waking a team costs more
// (milliseconds on a loaded machine) than the work.
constexpr double kParallelMinMacs = 1 << 20;

// Multiply-adds of the forward (one image per token, or all up to it).
inline double fwd_macs(int64_t B, int64_t T, int64_t H, int64_t dh, int64_t M, int64_t N, bool allp) {
  return 2.0 * double(B) * double(T) * double(H) * double(dh) * double(N) * (allp ? double(std::max<int64_t>(M, 1)) / 2 + 1 : 1);
}

FRT_INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }



// float64 exp beside cpu::exp_f32 (float). The using-declaration is needed: this overload,
// declared in this namespace, would otherwise hide cpu's float one from unqualified lookup
// and every float32 exp would go through libm's scalar double exp (~30% of a forward).
using cpu::exp_f32;
FRT_INLINE double exp_f32(double a) { return std::exp(a); }
FRT_INLINE float log_acc(float a) { return std::log(a); }
FRT_INLINE double log_acc(double a) { return std::log(a); }

// Vector registers as GCC/Clang vector-extension types of VB bytes. A type wider than the
// ISA's registers is not split into registers: GCC keeps it in memory (BLKmode) and every
// += goes through the stack (measured ~4 GFLOP/s for 64-byte vectors on an AVX2-only EPYC).
// So the width is the running CPU's: 64 bytes with AVX-512 (32 zmm), 32 with AVX2 (16 ymm),
// 16 otherwise -- picked once at run time (each target clone carries all three paths).
template <typename A, int VB>
struct VecOf {
  typedef A type __attribute__((vector_size(VB)));
};

inline int vector_bytes() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const int vb = __builtin_cpu_supports("avx512f") ? 64 : __builtin_cpu_supports("avx2") ? 32 : 16;
  return vb;
#else
  return 16;  // AArch64 NEON (and others): 128-bit registers
#endif
}

template <typename V, typename A>
FRT_INLINE V vload(const A* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename A>
FRT_INLINE void vstore(A* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// C[r, 0:W] (+)= sum_k A[r, k] B[k, 0:W] for R rows, A[r, k] at a[r * lda + k * ak]; W a
// multiple of CW (the column block); B rows readable to W. R x (CW / lanes) accumulator
// vectors stay in registers across the k loop.
template <typename A, int R, int VB, int CW>
FRT_INLINE void mk_rows(const A* a, int64_t lda, int64_t ak, const A* b, int64_t ldb, A* c,
                         int64_t ldc, int64_t K, int64_t W, bool accumulate) {
  using V = typename VecOf<A, VB>::type;
  constexpr int L = VB / int(sizeof(A));  // lanes per vector
  constexpr int NV = CW / L;              // vectors per row of a column block
  static_assert(NV >= 1 && NV * L == CW, "column block: a whole number of vectors");
  for (int64_t j0 = 0; j0 < W; j0 += CW) {
    V s[R][NV];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < NV; ++u) s[r][u] = accumulate ? vload<V>(c + r * ldc + j0 + u * L) : V{};
    const A* bk = b + j0;
    const A* ak0 = a;
    for (int64_t k = 0; k < K; ++k, bk += ldb, ak0 += ak) {
      V bv[NV];
      for (int u = 0; u < NV; ++u) bv[u] = vload<V>(bk + u * L);
      for (int r = 0; r < R; ++r) {
        const A ar = ak0[r * lda];
        for (int u = 0; u < NV; ++u) s[r][u] += ar * bv[u];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < NV; ++u) vstore(c + r * ldc + j0 + u * L, s[r][u]);
  }
}

// Row blocks as large as the register file allows: R x NV accumulators + NV for B + 1.
template <typename A, int VB, int CW>
FRT_INLINE void gemm_vb(int64_t rows, const A* a, int64_t lda, int64_t ak, const A* b, int64_t ldb,
                         A* c, int64_t ldc, int64_t K, int64_t W, bool accumulate) {
  constexpr int L = VB / int(sizeof(A));
  constexpr int kRegs = VB == 64 ? 32 : 16;
  // A column block of at least one vector; with 16 registers at most two (a 64-wide block
  // of 8-lane AVX2 vectors would leave one row of 8 accumulators, 9 loads per 8 FMAs).
  constexpr int CW1 = CW < L ? L : CW;
  constexpr int CWV = kRegs == 16 && CW1 > 2 * L ? 2 * L : CW1;
  constexpr int NV = CWV / L;
  constexpr int RB0 = (kRegs - 1 - NV) / NV;
  constexpr int RB = RB0 > 8 ? 8 : (RB0 < 1 ? 1 : RB0);
  constexpr int RH = RB / 2 > 0 ? RB / 2 : 1;
  int64_t r = 0;
  for (; r + RB <= rows; r += RB)
    mk_rows<A, RB, VB, CWV>(a + r * lda, lda, ak, b, ldb, c + r * ldc, ldc, K, W, accumulate);
  for (; r + RH <= rows; r += RH)
    mk_rows<A, RH, VB, CWV>(a + r * lda, lda, ak, b, ldb, c + r * ldc, ldc, K, W, accumulate);
  // two rows share their B loads (32 queries = 5 x 6 + 2: one-row passes were 12% of the
  // AVX2 forward, 3 loads per 2 FMAs)
  if constexpr (RH > 2) {
    if (r + 2 <= rows) {
      mk_rows<A, 2, VB, CWV>(a + r * lda, lda, ak, b, ldb, c + r * ldc, ldc, K, W, accumulate);
      r += 2;
    }
  }
  for (; r < rows; ++r) mk_rows<A, 1, VB, CWV>(a + r * lda, lda, ak, b, ldb, c + r * ldc, ldc, K, W, accumulate);
}

// C (rows x W) (+)= A (rows x K, A[r, k] at a[r * lda + k * ak]) B (K x W); W a multiple of
// CW (16, 32 or 64) and of the vector width.
template <typename A, int CW = int(kVW)>
FRT_INLINE void gemm_ak(int64_t rows, const A* a, int64_t lda, int64_t ak, const A* b, int64_t ldb,
                         A* c, int64_t ldc, int64_t K, int64_t W, bool accumulate) {
  switch (vector_bytes()) {
    case 64: gemm_vb<A, 64, CW>(rows, a, lda, ak, b, ldb, c, ldc, K, W, accumulate); break;
    case 32: gemm_vb<A, 32, CW>(rows, a, lda, ak, b, ldb, c, ldc, K, W, accumulate); break;
    default: gemm_vb<A, 16, CW>(rows, a, lda, ak, b, ldb, c, ldc, K, W, accumulate); break;
  }
}

// C (rows x W) (+)= A (rows x K, row-major) B (K x W).
template <typename A>
FRT_INLINE void gemm(int64_t rows, const A* a, int64_t lda, const A* b, int64_t ldb, A* c,
                      int64_t ldc, int64_t K, int64_t W, bool accumulate) {
  gemm_ak<A>(rows, a, lda, 1, b, ldb, c, ldc, K, W, accumulate);
}

struct Seg {
  int64_t b, t0, len, idx;
};

// Shapes, pointers and strides shared by forward and backward.
struct Ctx {
  int64_t B, T, H, dh, M, N, Np, Dp;
  int64_t N1;  // rows [0, N1) of an image from k/v, [N1, N) from k2/v2 (n_tail)
  bool allprev;
  double scale;
  const void *q, *k, *v, *go;
  const int64_t *qs, *ks, *vs, *gos;
  void *out, *dq, *dk, *dv;
  const int64_t *os, *dqs, *dks, *dvs;
  const void *k2, *v2;
  const int64_t *ks2, *vs2;
  void *dk2, *dv2;
  const int64_t *dks2, *dvs2;
  float* lse32;  // all_previous backward: per (b, h, t) log-sum-exp and D
  float* d32;
  double* lse64;
  double* d64;
};

template <class L>
struct Scratch {
  using Acc = typename L::Acc;
  std::vector<Acc> qs, qt, gt, st, dpt, go, o, s, dp, kt, kr, vr, vt, dk, dv, m, l, lse, d;
  void init(const Ctx& c) {
    const size_t tbd = size_t(kTB * c.Dp), tbn = size_t(kTB * c.Np);
    const size_t dn = size_t(c.dh * c.Np), nd = size_t(c.N * c.Dp);
    qs.assign(tbd, 0); qt.assign(tbd, 0); gt.assign(tbd, 0); go.assign(tbd, 0); o.assign(tbd, 0);
    st.assign(size_t(c.Np * kTB), 0); dpt.assign(size_t(c.Np * kTB), 0);
    s.assign(tbn, 0); dp.assign(tbn, 0);
    kt.assign(dn, 0); vt.assign(dn, 0); kr.assign(nd, 0); vr.assign(nd, 0);
    dk.assign(nd, 0); dv.assign(nd, 0);
    m.assign(kTB, 0); l.assign(kTB, 0); lse.assign(kTB, 0); d.assign(kTB, 0);
  }
};

template <class L>
FRT_INLINE const typename L::T* cptr(const void* p) {
  return static_cast<const typename L::T*>(p);
}
template <class L>
FRT_INLINE typename L::T* mptr(void* p) {
  return static_cast<typename L::T*>(p);
}

// rows x dh of a (B, T, H, dh) tensor -> dst rows of ld Dp, times mul; pads zero.
template <class L>
FRT_INLINE void load_rows(const Ctx& c, const void* src, const int64_t* st, int64_t b, int64_t t0,
                           int64_t rows, int64_t h, typename L::Acc mul, typename L::Acc* dst) {
  using Acc = typename L::Acc;
  const typename L::T* base = cptr<L>(src) + b * st[0] + h * st[2];
  for (int64_t r = 0; r < rows; ++r) {
    const typename L::T* row = base + (t0 + r) * st[1];
    Acc* d = dst + r * c.Dp;
    if (st[3] == 1) {
      for (int64_t i = 0; i < c.dh; ++i) d[i] = Acc(L::load(row[i])) * mul;
    } else {
      for (int64_t i = 0; i < c.dh; ++i) d[i] = Acc(L::load(row[i * st[3]])) * mul;
    }
    for (int64_t i = c.dh; i < c.Dp; ++i) d[i] = Acc(0);
  }
}

template <class L>
FRT_INLINE void store_rows(const Ctx& c, void* dstp, const int64_t* st, int64_t b, int64_t t0,
                            int64_t rows, int64_t h, const typename L::Acc* src,
                            const typename L::Acc* rowmul) {
  typename L::T* base = mptr<L>(dstp) + b * st[0] + h * st[2];
  for (int64_t r = 0; r < rows; ++r) {
    typename L::T* row = base + (t0 + r) * st[1];
    const typename L::Acc* s = src + r * c.Dp;
    const typename L::Acc mul = rowmul ? rowmul[r] : typename L::Acc(1);
    if (st[3] == 1) {
      for (int64_t i = 0; i < c.dh; ++i) row[i] = L::store(s[i] * mul);
    } else {
      for (int64_t i = 0; i < c.dh; ++i) row[i * st[3]] = L::store(s[i] * mul);
    }
  }
}

template <class L>
FRT_INLINE void zero_rows(const Ctx& c, void* dstp, const int64_t* st, int64_t b, int64_t t0,
                           int64_t rows, int64_t h) {
  typename L::T* base = mptr<L>(dstp) + b * st[0] + h * st[2];
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < c.dh; ++i) base[(t0 + r) * st[1] + i * st[3]] = L::store(0.0f);
}

// Row n of image j's keys or values (B, M, N, H, dh) for batch row b and head h, and its
// element stride `es`: rows n >= c.N1 come from src2 (the n_tail source).
template <class L>
FRT_INLINE const typename L::T* image_row(const Ctx& c, const void* src, const int64_t* st, const void* src2,
                                          const int64_t* st2, int64_t b, int64_t j, int64_t n, int64_t h,
                                          int64_t& es) {
  if (n < c.N1) {
    es = st[4];
    return cptr<L>(src) + b * st[0] + j * st[1] + n * st[2] + h * st[3];
  }
  es = st2[4];
  return cptr<L>(src2) + b * st2[0] + j * st2[1] + (n - c.N1) * st2[2] + h * st2[3];
}

// Image j's keys or values (B, M, N, H, dh): row-major N x Dp (`rowm`) and/or transposed
// dh x Np (`tr`), both zero-padded (rows through image_row).
template <class L>
FRT_INLINE void load_image(const Ctx& c, const void* src, const int64_t* st, const void* src2,
                            const int64_t* st2, int64_t b, int64_t j, int64_t h,
                            typename L::Acc* rowm, typename L::Acc* tr) {
  using Acc = typename L::Acc;
  for (int64_t n = 0; n < c.N; ++n) {
    int64_t es;
    const typename L::T* row = image_row<L>(c, src, st, src2, st2, b, j, n, h, es);
    if (rowm) {
      Acc* d = rowm + n * c.Dp;
      if (es == 1) {
        FRT_SIMD
        for (int64_t i = 0; i < c.dh; ++i) d[i] = Acc(L::load(row[i]));
      } else {
        for (int64_t i = 0; i < c.dh; ++i) d[i] = Acc(L::load(row[i * es]));
      }
      for (int64_t i = c.dh; i < c.Dp; ++i) d[i] = Acc(0);
    }
    if (tr)
      for (int64_t i = 0; i < c.dh; ++i) tr[i * c.Np + n] = Acc(L::load(row[i * es]));
  }
  if (tr)
    for (int64_t i = 0; i < c.dh; ++i)
      for (int64_t n = c.N; n < c.Np; ++n) tr[i * c.Np + n] = Acc(0);
}

// Keys or values of image j as (at most two) runs of rows for the products: rows [0, N1)
// and [N1, N) (the n_tail source). Read in place when they are already the accumulation
// type with unit element stride (and, when `full_width`, dh is a multiple of kVW: a product
// then reads whole column blocks of each row); else converted into `scratch` (N x Dp,
// zero-padded) as one run.
template <class L>
struct ImageRows {
  const typename L::Acc* p[2] = {nullptr, nullptr};
  int64_t ld[2] = {0, 0}, n[2] = {0, 0};
};

template <class L>
FRT_INLINE ImageRows<L> image_rows(const Ctx& c, const void* src, const int64_t* st, const void* src2,
                                   const int64_t* st2, int64_t b, int64_t j, int64_t h, bool full_width,
                                   typename L::Acc* scratch, bool copy = false) {
  using T = typename L::T;
  using Acc = typename L::Acc;
  ImageRows<L> r;
  if constexpr (std::is_same<T, Acc>::value) {
    const bool direct = !copy && (!full_width || c.dh == c.Dp) && (c.N1 == 0 || st[4] == 1) &&
                        (c.N1 == c.N || st2[4] == 1);
    if (direct) {
      if (c.N1 > 0) {
        r.p[0] = cptr<L>(src) + b * st[0] + j * st[1] + h * st[3];
        r.ld[0] = st[2];
        r.n[0] = c.N1;
      }
      if (c.N1 < c.N) {
        r.p[1] = cptr<L>(src2) + b * st2[0] + j * st2[1] + h * st2[3];
        r.ld[1] = st2[2];
        r.n[1] = c.N - c.N1;
      }
      return r;
    }
  }
  load_image<L>(c, src, st, src2, st2, b, j, h, scratch, nullptr);
  r.p[0] = scratch;
  r.ld[0] = c.Dp;
  r.n[0] = c.N;
  return r;
}

// rows x dh of a (B, T, H, dh) tensor, times mul, transposed: dst[i * kTB + r]; columns
// r >= rows are zero.
template <class L>
FRT_INLINE void load_rows_t(const Ctx& c, const void* src, const int64_t* st, int64_t b, int64_t t0,
                             int64_t rows, int64_t h, typename L::Acc mul, typename L::Acc* dst) {
  using Acc = typename L::Acc;
  const typename L::T* base = cptr<L>(src) + b * st[0] + h * st[2];
  for (int64_t r = 0; r < rows; ++r) {
    const typename L::T* row = base + (t0 + r) * st[1];
    for (int64_t i = 0; i < c.dh; ++i) dst[i * kTB + r] = Acc(L::load(row[i * st[3]])) * mul;
  }
  for (int64_t i = 0; i < c.dh; ++i)
    for (int64_t r = rows; r < kTB; ++r) dst[i * kTB + r] = Acc(0);
}

// C (rows x Dp, row-major) += A (rows x K, A[r, k] at a[r * lda + k * ak]) B (K x Dp, row
// stride ldb), with the widest column block (64, 32 or 16) that divides Dp. The products of
// the transposed layout: O += P V and dq = dS K (A = P^T / dS^T read along its columns),
// dV += P^T dO and dK += dS^T q (A = the key rows of P^T / dS^T).
template <class A>
FRT_INLINE void gemm_dp(int64_t rows, const A* a, int64_t lda, int64_t ak, const A* b, int64_t ldb, A* c,
                        int64_t Dp, int64_t K) {
  if (Dp % 64 == 0)
    gemm_ak<A, 64>(rows, a, lda, ak, b, ldb, c, Dp, K, Dp, true);
  else if (Dp % 32 == 0)
    gemm_ak<A, 32>(rows, a, lda, ak, b, ldb, c, Dp, K, Dp, true);
  else
    gemm_ak<A, 16>(rows, a, lda, ak, b, ldb, c, Dp, K, Dp, true);
}

// Softmax pieces of a transposed score block st (n x kTB, one column per query), vectorized
// over the columns: mx[r] = max(mx[r], max_k st[k, r]); then st[k, r] = exp(st[k, r] - mx[r])
// in place, sum[r] += the column's exponentials.
template <class A>
FRT_INLINE void column_max(const A* st, int64_t n, A* mx) {
  for (int64_t k = 0; k < n; ++k) {
    const A* sr = st + k * kTB;
    FRT_SIMD
    for (int64_t r = 0; r < kTB; ++r) mx[r] = sr[r] > mx[r] ? sr[r] : mx[r];
  }
}
template <class A>
FRT_INLINE void column_exp_sum(A* st, int64_t n, const A* mx, A* sum) {
  for (int64_t k = 0; k < n; ++k) {
    A* sr = st + k * kTB;
    FRT_SIMD
    for (int64_t r = 0; r < kTB; ++r) {
      const A e = exp_f32(sr[r] - mx[r]);
      sr[r] = e;
      sum[r] += e;
    }
  }
}

// Forward of one block of `rows` queries (in s.qt, scaled, transposed: dh x kTB) against
// images [j_lo, j_hi]: s.o = normalized output (the backward recomputes the softmax
// statistics, so none are kept).
// The scores are computed transposed, S^T = K (scale q)^T (N x kTB), so the keys are read
// as rows (in place for float32 / float64) and the softmax reductions over the keys run
// down the columns: one vector of queries at a time, no horizontal reductions. Online
// softmax across images (all_previous mode). `loaded` caches which image s.kr / s.vr hold.
template <class L>
FRT_INLINE void attend_block(const Ctx& c, Scratch<L>& s, int64_t b, int64_t h, int64_t rows,
                              int64_t j_lo, int64_t j_hi, int64_t& loaded, ImageRows<L>& kr,
                              ImageRows<L>& vr) {
  using Acc = typename L::Acc;
  const Acc ninf = -std::numeric_limits<Acc>::infinity();
  Acc* m = s.m.data();
  Acc* l = s.l.data();
  Acc* mx = s.lse.data();  // this image's running max
  Acc* sum = s.d.data();
  for (int64_t r = 0; r < kTB; ++r) {
    m[r] = ninf;
    l[r] = Acc(0);
  }
  std::fill(s.o.begin(), s.o.begin() + rows * c.Dp, Acc(0));
  Acc* st = s.st.data();
  for (int64_t j = j_lo; j <= j_hi; ++j) {
    if (loaded != j) {
      kr = image_rows<L>(c, c.k, c.ks, c.k2, c.ks2, b, j, h, false, s.kr.data());
      vr = image_rows<L>(c, c.v, c.vs, c.v2, c.vs2, b, j, h, true, s.vr.data());
      loaded = j;
    }
    for (int part = 0, n0 = 0; part < 2; n0 += kr.n[part], ++part)
      if (kr.n[part] > 0)
        gemm_ak<Acc, int(kTB)>(kr.n[part], kr.p[part], kr.ld[part], 1, s.qt.data(), kTB,
                               st + n0 * kTB, kTB, c.dh, kTB, false);
    for (int64_t r = 0; r < kTB; ++r) {
      mx[r] = m[r];
      sum[r] = Acc(0);
    }
    column_max(st, c.N, mx);
    column_exp_sum(st, c.N, mx, sum);
    for (int64_t r = 0; r < rows; ++r) {
      if (m[r] != mx[r]) {  // rescale what earlier images contributed
        const Acc alpha = m[r] == ninf ? Acc(0) : exp_f32(m[r] - mx[r]);
        Acc* orow = s.o.data() + r * c.Dp;
        for (int64_t i = 0; i < c.Dp; ++i) orow[i] *= alpha;
        l[r] *= alpha;
        m[r] = mx[r];
      }
      l[r] += sum[r];
    }
    for (int part = 0, n0 = 0; part < 2; n0 += vr.n[part], ++part)
      if (vr.n[part] > 0)
        gemm_dp<Acc>(rows, st + n0 * kTB, 1, kTB, vr.p[part], vr.ld[part], s.o.data(), c.Dp, vr.n[part]);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const Acc inv = Acc(1) / l[r];
    Acc* orow = s.o.data() + r * c.Dp;
    for (int64_t i = 0; i < c.Dp; ++i) orow[i] *= inv;
  }
}

// ------------------------------------------------------------------ forward task

template <class L>
FRT_INLINE void fwd_task(const Ctx& c, const Seg& sg, int64_t h, Scratch<L>& s) {
  using Acc = typename L::Acc;
  if (sg.idx < 0) {
    zero_rows<L>(c, c.out, c.os, sg.b, sg.t0, sg.len, h);
    return;
  }
  const int64_t j_lo = c.allprev ? 0 : sg.idx;
  int64_t loaded = -1;
  ImageRows<L> kr, vr;
  for (int64_t t0 = sg.t0; t0 < sg.t0 + sg.len; t0 += kTB) {
    const int64_t rows = std::min(kTB, sg.t0 + sg.len - t0);
    load_rows_t<L>(c, c.q, c.qs, sg.b, t0, rows, h, Acc(c.scale), s.qt.data());
    attend_block<L>(c, s, sg.b, h, rows, j_lo, sg.idx, loaded, kr, vr);
    store_rows<L>(c, c.out, c.os, sg.b, t0, rows, h, s.o.data(), nullptr);
  }
}

FRT_CLONES void fwd_task_f32(const Ctx& c, const Seg& sg, int64_t h, Scratch<F32>& s) {
  fwd_task<F32>(c, sg, h, s);
}
FRT_CLONES void fwd_task_bf16(const Ctx& c, const Seg& sg, int64_t h, Scratch<BF16>& s) {
  fwd_task<BF16>(c, sg, h, s);
}
FRT_CLONES void fwd_task_f64(const Ctx& c, const Seg& sg, int64_t h, Scratch<F64>& s) {
  fwd_task<F64>(c, sg, h, s);
}
FRT_INLINE void fwd_dispatch(const Ctx& c, const Seg& sg, int64_t h, Scratch<F32>& s) {
  fwd_task_f32(c, sg, h, s);
}
FRT_INLINE void fwd_dispatch(const Ctx& c, const Seg& sg, int64_t h, Scratch<BF16>& s) {
  fwd_task_bf16(c, sg, h, s);
}
FRT_INLINE void fwd_dispatch(const Ctx& c, const Seg& sg, int64_t h, Scratch<F64>& s) {
  fwd_task_f64(c, sg, h, s);
}

// ------------------------------------------------------------------ single-row forward

// The forward of one query row (a segment of one token: every row of a decode step) and
// head, without the query blocks: a 32-column block of scores per key for one query is 32
// times the work (a decode step against 33 images, 8 heads x 64, took 34 us through the
// blocks, most of it the padded product and the block scratch). Scores against the keys of
// images [j_lo, idx] (one image when image-causal), softmax, the weighted sum of the values;
// `buf` holds (images x N) scores and Dp outputs.
template <class L>
FRT_INLINE void fwd_row(const Ctx& c, const Seg& sg, int64_t h, std::vector<typename L::Acc>& buf) {
  using Acc = typename L::Acc;
  using T = typename L::T;
  const int64_t b = sg.b, t = sg.t0;
  if (sg.idx < 0) {
    zero_rows<L>(c, c.out, c.os, b, t, 1, h);
    return;
  }
  const int64_t j_lo = c.allprev ? 0 : sg.idx, nimg = sg.idx - j_lo + 1;
  buf.resize(size_t(nimg * c.N + 2 * c.Dp));
  Acc* sc = buf.data();
  Acc* q = sc + nimg * c.N;
  Acc* o = q + c.Dp;
  const T* qrow = cptr<L>(c.q) + b * c.qs[0] + t * c.qs[1] + h * c.qs[2];
  for (int64_t i = 0; i < c.dh; ++i) q[i] = Acc(L::load(qrow[i * c.qs[3]])) * Acc(c.scale);
  Acc mx = -std::numeric_limits<Acc>::infinity();
  for (int64_t j = j_lo; j <= sg.idx; ++j)
    for (int64_t n = 0; n < c.N; ++n) {
      int64_t es;
      const T* kr = image_row<L>(c, c.k, c.ks, c.k2, c.ks2, b, j, n, h, es);
      Acc acc = 0;
      if (es == 1) {
        FRT_SIMD_RED(+ : acc)
        for (int64_t i = 0; i < c.dh; ++i) acc += Acc(L::load(kr[i])) * q[i];
      } else {
        for (int64_t i = 0; i < c.dh; ++i) acc += Acc(L::load(kr[i * es])) * q[i];
      }
      sc[(j - j_lo) * c.N + n] = acc;
      mx = acc > mx ? acc : mx;
    }
  Acc l = 0;
  const int64_t ns = nimg * c.N;
  FRT_SIMD_RED(+ : l)
  for (int64_t n = 0; n < ns; ++n) {
    const Acc e = exp_f32(sc[n] - mx);
    sc[n] = e;
    l += e;
  }
  std::fill(o, o + c.dh, Acc(0));
  for (int64_t j = j_lo; j <= sg.idx; ++j)
    for (int64_t n = 0; n < c.N; ++n) {
      int64_t es;
      const T* vr = image_row<L>(c, c.v, c.vs, c.v2, c.vs2, b, j, n, h, es);
      const Acc p = sc[(j - j_lo) * c.N + n];
      if (es == 1) {
        FRT_SIMD
        for (int64_t i = 0; i < c.dh; ++i) o[i] += p * Acc(L::load(vr[i]));
      } else {
        for (int64_t i = 0; i < c.dh; ++i) o[i] += p * Acc(L::load(vr[i * es]));
      }
    }
  const Acc inv = Acc(1) / l;
  T* out = mptr<L>(c.out) + b * c.os[0] + t * c.os[1] + h * c.os[2];
  for (int64_t i = 0; i < c.dh; ++i) out[i * c.os[3]] = L::store(o[i] * inv);
}

FRT_CLONES void fwd_row_f32(const Ctx& c, const Seg& sg, int64_t h, std::vector<float>& buf) {
  fwd_row<F32>(c, sg, h, buf);
}
FRT_CLONES void fwd_row_bf16(const Ctx& c, const Seg& sg, int64_t h, std::vector<float>& buf) {
  fwd_row<BF16>(c, sg, h, buf);
}
FRT_CLONES void fwd_row_f64(const Ctx& c, const Seg& sg, int64_t h, std::vector<double>& buf) {
  fwd_row<F64>(c, sg, h, buf);
}
FRT_INLINE void row_dispatch(const Ctx& c, const Seg& sg, int64_t h, std::vector<float>& buf, F32) {
  fwd_row_f32(c, sg, h, buf);
}
FRT_INLINE void row_dispatch(const Ctx& c, const Seg& sg, int64_t h, std::vector<float>& buf, BF16) {
  fwd_row_bf16(c, sg, h, buf);
}
FRT_INLINE void row_dispatch(const Ctx& c, const Seg& sg, int64_t h, std::vector<double>& buf, F64) {
  fwd_row_f64(c, sg, h, buf);
}

// ------------------------------------------------------------------ backward tasks

// all_previous, phase 1, first pass over images [0, j_hi] for a block of `rows` queries (in
// s.qs, scaled) and their output gradients (in s.go): per row the softmax max s.m and
// normalizer s.l, and D = sum_n p_n dP_n (dP = dO V^T) in s.d, accumulated online from the
// same exponentials the second pass turns into p. D is not rowsum(dO * O): that equals it in
// exact arithmetic, but with one or two keys per row and a sharp softmax, p * (dP - D) cancels
// and a D that is not built from these very p cost up to 1.7e-4 relative in dq and dK.
template <class L>
FRT_INLINE void softmax_stats_block(const Ctx& c, Scratch<L>& s, int64_t b, int64_t h, int64_t rows,
                                     int64_t j_hi) {
  using Acc = typename L::Acc;
  const Acc ninf = -std::numeric_limits<Acc>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    s.m[r] = ninf;
    s.l[r] = Acc(0);
    s.d[r] = Acc(0);
  }
  for (int64_t j = 0; j <= j_hi; ++j) {
    load_image<L>(c, c.k, c.ks, c.k2, c.ks2, b, j, h, nullptr, s.kt.data());
    load_image<L>(c, c.v, c.vs, c.v2, c.vs2, b, j, h, nullptr, s.vt.data());
    gemm<Acc>(rows, s.qs.data(), c.Dp, s.kt.data(), c.Np, s.s.data(), c.Np, c.dh, c.Np, false);
    gemm<Acc>(rows, s.go.data(), c.Dp, s.vt.data(), c.Np, s.dp.data(), c.Np, c.dh, c.Np, false);
    for (int64_t r = 0; r < rows; ++r) {
      const Acc* sr = s.s.data() + r * c.Np;
      const Acc* dpr = s.dp.data() + r * c.Np;
      Acc mx = s.m[r];
      FRT_SIMD_RED(max : mx)
      for (int64_t n = 0; n < c.N; ++n) mx = sr[n] > mx ? sr[n] : mx;
      Acc sum = Acc(0), dsum = Acc(0);
      FRT_SIMD_RED(+ : sum, dsum)
      for (int64_t n = 0; n < c.N; ++n) {
        const Acc e = exp_f32(sr[n] - mx);
        sum += e;
        dsum += e * dpr[n];
      }
      if (s.m[r] != mx) {  // rescale what earlier images contributed
        const Acc alpha = s.m[r] == ninf ? Acc(0) : exp_f32(s.m[r] - mx);
        s.l[r] *= alpha;
        s.d[r] *= alpha;
        s.m[r] = mx;
      }
      s.l[r] += sum;
      s.d[r] += dsum;
    }
  }
  for (int64_t r = 0; r < rows; ++r) s.d[r] /= s.l[r];
}

// all_previous, phase 1: dq of a token chunk, and lse / D per row for phase 2.
template <class L>
FRT_INLINE void bwd_rows_task(const Ctx& c, const Seg& sg, int64_t h, Scratch<L>& s) {
  using Acc = typename L::Acc;
  if (sg.idx < 0) {
    zero_rows<L>(c, c.dq, c.dqs, sg.b, sg.t0, sg.len, h);
    return;
  }
  for (int64_t t0 = sg.t0; t0 < sg.t0 + sg.len; t0 += kTB) {
    const int64_t rows = std::min(kTB, sg.t0 + sg.len - t0);
    load_rows<L>(c, c.q, c.qs, sg.b, t0, rows, h, Acc(c.scale), s.qs.data());
    load_rows<L>(c, c.go, c.gos, sg.b, t0, rows, h, Acc(1), s.go.data());
    softmax_stats_block<L>(c, s, sg.b, h, rows, sg.idx);
    const int64_t so = (sg.b * c.H + h) * c.T + t0;
    for (int64_t r = 0; r < rows; ++r) {
      s.lse[r] = Acc(1) / s.l[r];  // here: 1 / l, for p = exp(s - m) / l below
      const Acc lse = s.m[r] + log_acc(s.l[r]);
      if constexpr (sizeof(Acc) == 8) {
        c.lse64[so + r] = lse;
        c.d64[so + r] = s.d[r];
      } else {
        c.lse32[so + r] = lse;
        c.d32[so + r] = s.d[r];
      }
    }
    // dq = scale sum_j dS_j K_j, accumulated in s.o
    std::fill(s.o.begin(), s.o.begin() + rows * c.Dp, Acc(0));
    for (int64_t j = 0; j <= sg.idx; ++j) {
      load_image<L>(c, c.k, c.ks, c.k2, c.ks2, sg.b, j, h, s.kr.data(), s.kt.data());
      load_image<L>(c, c.v, c.vs, c.v2, c.vs2, sg.b, j, h, nullptr, s.vt.data());
      gemm<Acc>(rows, s.qs.data(), c.Dp, s.kt.data(), c.Np, s.s.data(), c.Np, c.dh, c.Np, false);
      gemm<Acc>(rows, s.go.data(), c.Dp, s.vt.data(), c.Np, s.dp.data(), c.Np, c.dh, c.Np, false);
      for (int64_t r = 0; r < rows; ++r) {
        Acc* sr = s.s.data() + r * c.Np;
        Acc* dpr = s.dp.data() + r * c.Np;
        const Acc mx = s.m[r], inv = s.lse[r], d = s.d[r];
        FRT_SIMD
        for (int64_t n = 0; n < c.N; ++n) {
          const Acc p = exp_f32(sr[n] - mx) * inv;
          dpr[n] = p * (dpr[n] - d);
        }
      }
      gemm<Acc>(rows, s.dp.data(), c.Np, s.kr.data(), c.Dp, s.o.data(), c.Dp, c.N, c.Dp, true);
    }
    for (int64_t r = 0; r < rows; ++r) s.m[r] = Acc(c.scale);
    store_rows<L>(c, c.dq, c.dqs, sg.b, t0, rows, h, s.o.data(), s.m.data());
  }
}

// dK_j, dV_j of image j (and, image-causal mode, dq of the tokens of image j). Transposed
// layout as the forward: per block of kTB queries, S^T = K_j (scale q)^T and dP^T = V_j dO^T
// (N x kTB, keys and values read as rows, in place for float32 / float64), P^T and
// dS^T = P^T (dP^T - D) computed down the columns (vectorized over queries); then
// dV += P^T dO and dK += dS^T (scale q) (the N x kTB blocks as A), and dq = scale dS K_j (A:
// dS^T read along its columns). No transposed copy of an N x kTB block.
template <class L>
FRT_INLINE void bwd_image_task(const Ctx& c, const std::vector<Seg>& segs, int64_t b, int64_t j,
                                int64_t h, Scratch<L>& s) {
  using Acc = typename L::Acc;
  const size_t nd = size_t(c.N * c.Dp);
  std::fill(s.dk.begin(), s.dk.begin() + nd, Acc(0));
  std::fill(s.dv.begin(), s.dv.begin() + nd, Acc(0));
  bool loaded = false;
  ImageRows<L> kr, vr;
  Acc* st = s.st.data();    // S^T, then P^T
  Acc* dpt = s.dpt.data();  // dP^T, then dS^T
  Acc* mx = s.lse.data();
  Acc* sum = s.l.data();
  Acc* dd = s.d.data();
  for (const Seg& sg : segs) {
    if (sg.b != b || sg.idx < 0) continue;
    if (c.allprev ? sg.idx < j : sg.idx != j) continue;
    if (!loaded) {  // copied (dense rows: the backward passes over them several times)
      kr = image_rows<L>(c, c.k, c.ks, c.k2, c.ks2, b, j, h, true, s.kr.data(), true);
      vr = image_rows<L>(c, c.v, c.vs, c.v2, c.vs2, b, j, h, true, s.vr.data(), true);
      loaded = true;
    }
    for (int64_t t0 = sg.t0; t0 < sg.t0 + sg.len; t0 += kTB) {
      const int64_t rows = std::min(kTB, sg.t0 + sg.len - t0);
      load_rows<L>(c, c.q, c.qs, b, t0, rows, h, Acc(c.scale), s.qs.data());
      load_rows<L>(c, c.go, c.gos, b, t0, rows, h, Acc(1), s.go.data());
      load_rows_t<L>(c, c.q, c.qs, b, t0, rows, h, Acc(c.scale), s.qt.data());
      load_rows_t<L>(c, c.go, c.gos, b, t0, rows, h, Acc(1), s.gt.data());
      // (keys and values may be split differently: one read in place, the other copied)
      for (int part = 0, n0 = 0; part < 2; n0 += kr.n[part], ++part)
        if (kr.n[part] > 0)
          gemm_ak<Acc, int(kTB)>(kr.n[part], kr.p[part], kr.ld[part], 1, s.qt.data(), kTB,
                                 st + n0 * kTB, kTB, c.dh, kTB, false);
      for (int part = 0, n0 = 0; part < 2; n0 += vr.n[part], ++part)
        if (vr.n[part] > 0)
          gemm_ak<Acc, int(kTB)>(vr.n[part], vr.p[part], vr.ld[part], 1, s.gt.data(), kTB,
                                 dpt + n0 * kTB, kTB, c.dh, kTB, false);
      if (c.allprev) {
        const int64_t so = (b * c.H + h) * c.T + t0;
        for (int64_t r = 0; r < kTB; ++r) {
          if constexpr (sizeof(Acc) == 8) {
            mx[r] = r < rows ? c.lse64[so + r] : Acc(0);
            dd[r] = r < rows ? c.d64[so + r] : Acc(0);
          } else {
            mx[r] = r < rows ? c.lse32[so + r] : Acc(0);
            dd[r] = r < rows ? c.d32[so + r] : Acc(0);
          }
        }
        for (int64_t n = 0; n < c.N; ++n) {
          Acc* sr = st + n * kTB;
          FRT_SIMD
          for (int64_t r = 0; r < kTB; ++r) sr[r] = exp_f32(sr[r] - mx[r]);
        }
      } else {
        for (int64_t r = 0; r < kTB; ++r) {
          mx[r] = st[r];
          sum[r] = Acc(0);
          dd[r] = Acc(0);
        }
        column_max(st + kTB, c.N - 1, mx);
        column_exp_sum(st, c.N, mx, sum);
        for (int64_t r = 0; r < kTB; ++r) sum[r] = Acc(1) / sum[r];
        for (int64_t n = 0; n < c.N; ++n) {
          Acc* sr = st + n * kTB;
          const Acc* dr = dpt + n * kTB;
          FRT_SIMD
          for (int64_t r = 0; r < kTB; ++r) {
            sr[r] *= sum[r];
            dd[r] += sr[r] * dr[r];
          }
        }
      }
      for (int64_t n = 0; n < c.N; ++n) {  // dS^T = P^T (dP^T - D)
        const Acc* sr = st + n * kTB;
        Acc* dr = dpt + n * kTB;
        FRT_SIMD
        for (int64_t r = 0; r < kTB; ++r) dr[r] = sr[r] * (dr[r] - dd[r]);
      }
      if (!c.allprev) {  // dq = scale dS K_j
        std::fill(s.o.begin(), s.o.begin() + rows * c.Dp, Acc(0));
        for (int part = 0, n0 = 0; part < 2; n0 += kr.n[part], ++part)
          if (kr.n[part] > 0)
            gemm_dp<Acc>(rows, dpt + n0 * kTB, 1, kTB, kr.p[part], kr.ld[part], s.o.data(), c.Dp, kr.n[part]);
        for (int64_t r = 0; r < rows; ++r) s.m[r] = Acc(c.scale);
        store_rows<L>(c, c.dq, c.dqs, b, t0, rows, h, s.o.data(), s.m.data());
      }
      gemm_dp<Acc>(c.N, st, kTB, 1, s.go.data(), c.Dp, s.dv.data(), c.Dp, rows);   // dV += P^T dO
      gemm_dp<Acc>(c.N, dpt, kTB, 1, s.qs.data(), c.Dp, s.dk.data(), c.Dp, rows);  // dK += dS^T (scale q)
    }
  }
  typename L::T* dk = mptr<L>(c.dk) + b * c.dks[0] + j * c.dks[1] + h * c.dks[3];
  typename L::T* dv = mptr<L>(c.dv) + b * c.dvs[0] + j * c.dvs[1] + h * c.dvs[3];
  for (int64_t n = 0; n < c.N1; ++n)
    for (int64_t i = 0; i < c.dh; ++i) {
      dk[n * c.dks[2] + i * c.dks[4]] = L::store(s.dk[n * c.Dp + i]);
      dv[n * c.dvs[2] + i * c.dvs[4]] = L::store(s.dv[n * c.Dp + i]);
    }
  if (c.N1 < c.N) {  // the n_tail rows
    typename L::T* dk2 = mptr<L>(c.dk2) + b * c.dks2[0] + j * c.dks2[1] + h * c.dks2[3];
    typename L::T* dv2 = mptr<L>(c.dv2) + b * c.dvs2[0] + j * c.dvs2[1] + h * c.dvs2[3];
    for (int64_t n = c.N1; n < c.N; ++n)
      for (int64_t i = 0; i < c.dh; ++i) {
        dk2[(n - c.N1) * c.dks2[2] + i * c.dks2[4]] = L::store(s.dk[n * c.Dp + i]);
        dv2[(n - c.N1) * c.dvs2[2] + i * c.dvs2[4]] = L::store(s.dv[n * c.Dp + i]);
      }
  }
}

#define FRT_XDEF(NAME, LT)                                                                   \
  FRT_CLONES void bwd_rows_##NAME(const Ctx& c, const Seg& sg, int64_t h, Scratch<LT>& s) { \
    bwd_rows_task<LT>(c, sg, h, s);                                                         \
  }                                                                                         \
  FRT_CLONES void bwd_image_##NAME(const Ctx& c, const std::vector<Seg>& segs, int64_t b,  \
                                    int64_t j, int64_t h, Scratch<LT>& s) {                 \
    bwd_image_task<LT>(c, segs, b, j, h, s);                                                \
  }                                                                                         \
  FRT_INLINE void bwd_rows(const Ctx& c, const Seg& sg, int64_t h, Scratch<LT>& s) {       \
    bwd_rows_##NAME(c, sg, h, s);                                                           \
  }                                                                                         \
  FRT_INLINE void bwd_image(const Ctx& c, const std::vector<Seg>& segs, int64_t b,         \
                             int64_t j, int64_t h, Scratch<LT>& s) {                        \
    bwd_image_##NAME(c, segs, b, j, h, s);                                                  \
  }
FRT_XDEF(f32, F32)
FRT_XDEF(bf16, BF16)
FRT_XDEF(f64, F64)
#undef FRT_XDEF

// ------------------------------------------------------------------ drivers

// Segments (runs of equal media_index) of every row, cut into chunks of <= max_len tokens.
// Returns false when a value lies outside [-1, M).
bool find_segments(const int32_t* mi, const int64_t* ms, int64_t B, int64_t T, int64_t M,
                   int64_t max_len, std::vector<Seg>& out) {
  out.clear();
  for (int64_t b = 0; b < B; ++b) {
    int64_t t = 0;
    while (t < T) {
      const int64_t idx = mi[b * ms[0] + t * ms[1]];
      if (idx < -1 || idx >= M) return false;
      int64_t e = t + 1;
      while (e < T && mi[b * ms[0] + e * ms[1]] == idx) ++e;
      for (int64_t s = t; s < e; s += max_len) out.push_back({b, s, std::min(max_len, e - s), idx});
      t = e;
    }
  }
  return true;
}

// The bfloat16 image-causal kernels on AMX tiles (attention_amx.h) take the call:
// image-causal mode, dh a multiple of 32, unit element strides of the queries and of the
// tensors given per image (keys and values; their gradients in the backward), each split
// into rows [0, N1) and the n_tail rows; and a CPU with AMX-BF16.
bool amx_fits(const Ctx& c, std::initializer_list<const int64_t*> head, std::initializer_list<const int64_t*> tail) {
  if (c.allprev || !amx::fits(c.dh) || c.qs[3] != 1) return false;
  for (const int64_t* st : head)
    if (c.N1 > 0 && st[4] != 1) return false;
  for (const int64_t* st : tail)
    if (c.N1 < c.N && st[4] != 1) return false;
  return amx::available();
}

// The forward: also a unit element stride of the output.
bool amx_fwd_fits(const Ctx& c) { return c.os[3] == 1 && amx_fits(c, {c.ks, c.vs}, {c.ks2, c.vs2}); }

// Image j's rows of a (B, M, N, H, dh) tensor for batch row b, head h: rows [0, N1) from
// src, the rest from src2 (the n_tail source); Run is amx::Rows or amx::OutRows.
template <class Run, class P>
void amx_runs(const Ctx& c, P src, const int64_t* st, P src2, const int64_t* st2, int64_t b, int64_t j, int64_t h,
              Run* runs) {
  using E = std::remove_pointer_t<decltype(runs[0].p)>;
  if (c.N1 > 0) runs[0] = {static_cast<E*>(src) + b * st[0] + j * st[1] + h * st[3], st[2], c.N1};
  if (c.N1 < c.N) runs[1] = {static_cast<E*>(src2) + b * st2[0] + j * st2[1] + h * st2[3], st2[2], c.N - c.N1};
  if (c.N1 == 0) std::swap(runs[0], runs[1]);
}

void amx_fwd_task(const Ctx& c, const Seg& sg, int64_t h, amx::Scratch& s) {
  if (sg.idx < 0) {
    zero_rows<BF16>(c, c.out, c.os, sg.b, sg.t0, sg.len, h);
    return;
  }
  amx::ImageAttention a;
  a.q = cptr<BF16>(c.q) + sg.b * c.qs[0] + sg.t0 * c.qs[1] + h * c.qs[2];
  a.q_ld = c.qs[1];
  a.rows = sg.len;
  amx_runs(c, c.k, c.ks, c.k2, c.ks2, sg.b, sg.idx, h, a.k);
  amx_runs(c, c.v, c.vs, c.v2, c.vs2, sg.b, sg.idx, h, a.v);
  a.N = c.N;
  a.dh = c.dh;
  a.scale = float(c.scale);
  a.out = mptr<BF16>(c.out) + sg.b * c.os[0] + sg.t0 * c.os[1] + h * c.os[2];
  a.out_ld = c.os[1];
  amx::image_attention_bf16(a, s);
}

template <class L>
void run_fwd(const Ctx& c, const std::vector<Seg>& segs) {
  const int64_t ntask = int64_t(segs.size()) * c.H;
  const bool par = ntask > 1 && fwd_macs(c.B, c.T, c.H, c.dh, c.M, c.N, c.allprev) >= kParallelMinMacs;
  bool rows_only = true;  // single-token segments alone (a decode step): the row path
  for (const Seg& sg : segs) rows_only = rows_only && sg.len == 1;
  if (rows_only) {
#pragma omp parallel if (par)
    {
      std::vector<typename L::Acc> buf;
#pragma omp for schedule(static)
      for (int64_t t = 0; t < ntask; ++t) row_dispatch(c, segs[size_t(t / c.H)], t % c.H, buf, L{});
    }
    return;
  }
  if constexpr (std::is_same<L, BF16>::value) {
    if (amx_fwd_fits(c)) {
#pragma omp parallel if (par)
      {
        amx::Scratch s;
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < ntask; ++t) amx_fwd_task(c, segs[size_t(t / c.H)], t % c.H, s);
      }
      return;
    }
  }
#pragma omp parallel if (par)
  {
    Scratch<L> s;
    s.init(c);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntask; ++t) fwd_dispatch(c, segs[size_t(t / c.H)], t % c.H, s);
  }
}

// The backward: also unit element strides of the output gradient and of dq, dk, dv.
bool amx_bwd_fits(const Ctx& c) {
  return c.gos[3] == 1 && c.dqs[3] == 1 &&
         amx_fits(c, {c.ks, c.vs, c.dks, c.dvs}, {c.ks2, c.vs2, c.dks2, c.dvs2});
}

static_assert(kChunk <= amx::kMaxBlockRows, "a forward chunk is one AMX backward block");

// Image j of batch row b, head h: the segments that attend to it (chunks of <= kChunk rows).
void amx_bwd_image_task(const Ctx& c, const std::vector<Seg>& segs, int64_t b, int64_t j, int64_t h,
                        std::vector<amx::QueryBlock>& blocks, amx::BackwardScratch& s) {
  blocks.clear();
  for (const Seg& sg : segs) {
    if (sg.b != b || sg.idx != j) continue;
    amx::QueryBlock qb;
    qb.q = cptr<BF16>(c.q) + b * c.qs[0] + sg.t0 * c.qs[1] + h * c.qs[2];
    qb.go = cptr<BF16>(c.go) + b * c.gos[0] + sg.t0 * c.gos[1] + h * c.gos[2];
    qb.dq = mptr<BF16>(c.dq) + b * c.dqs[0] + sg.t0 * c.dqs[1] + h * c.dqs[2];
    qb.rows = sg.len;
    blocks.push_back(qb);
  }
  amx::ImageAttentionBackward a;
  a.blocks = blocks.data();
  a.nblocks = int64_t(blocks.size());
  a.q_ld = c.qs[1];
  a.go_ld = c.gos[1];
  a.dq_ld = c.dqs[1];
  amx_runs(c, c.k, c.ks, c.k2, c.ks2, b, j, h, a.k);
  amx_runs(c, c.v, c.vs, c.v2, c.vs2, b, j, h, a.v);
  amx_runs(c, c.dk, c.dks, c.dk2, c.dks2, b, j, h, a.dk);
  amx_runs(c, c.dv, c.dvs, c.dv2, c.dvs2, b, j, h, a.dv);
  a.N = c.N;
  a.dh = c.dh;
  a.scale = float(c.scale);
  amx::image_attention_backward_bf16(a, s);
}

template <class L>
void run_bwd(const Ctx& c, const std::vector<Seg>& segs) {
  const bool par = 2.5 * fwd_macs(c.B, c.T, c.H, c.dh, c.M, c.N, c.allprev) >= kParallelMinMacs;
  if constexpr (std::is_same<L, BF16>::value) {
    if (amx_bwd_fits(c)) {
      for (const Seg& sg : segs)  // dq of rows without an image; the others: their image's task
        if (sg.idx < 0)
          for (int64_t h = 0; h < c.H; ++h) zero_rows<BF16>(c, c.dq, c.dqs, sg.b, sg.t0, sg.len, h);
      const int64_t ntask = c.B * c.M * c.H;
#pragma omp parallel if (par && ntask > 1)
      {
        amx::BackwardScratch s;
        std::vector<amx::QueryBlock> blocks;
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < ntask; ++t) {
          const int64_t h = t % c.H, j = (t / c.H) % c.M, b = t / (c.H * c.M);
          amx_bwd_image_task(c, segs, b, j, h, blocks, s);
        }
      }
      return;
    }
  }
  if (c.allprev) {
    const int64_t ntask = int64_t(segs.size()) * c.H;
#pragma omp parallel if (par && ntask > 1)
    {
      Scratch<L> s;
      s.init(c);
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < ntask; ++t) bwd_rows(c, segs[size_t(t / c.H)], t % c.H, s);
    }
  } else {
    // dq of rows without an image; the others are written by their image's task.
    for (const Seg& sg : segs)
      if (sg.idx < 0)
        for (int64_t h = 0; h < c.H; ++h) zero_rows<L>(c, c.dq, c.dqs, sg.b, sg.t0, sg.len, h);
  }
  const int64_t ntask = c.B * c.M * c.H;
#pragma omp parallel if (par && ntask > 1)
  {
    Scratch<L> s;
    s.init(c);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntask; ++t) {
      const int64_t h = t % c.H, j = (t / c.H) % c.M, b = t / (c.H * c.M);
      bwd_image(c, segs, b, j, h, s);
    }
  }
}

}  // namespace

namespace {

inline bool valid_dtype(DType d) {
  return d == DType::kFloat32 || d == DType::kBFloat16 || d == DType::kFloat64;
}

template <class P>
Status check_sizes(const P& p) {
  if (!valid_dtype(p.dtype)) return Status::kUnsupportedDtype;
  if (p.B < 0 || p.T < 0 || p.H < 0 || p.dh < 0 || p.M < 0 || p.N < 0) return Status::kInvalidArgument;
  if (p.n_tail < 0 || p.n_tail > p.N) return Status::kInvalidArgument;
  if (p.n_tail > 0 && p.B * p.M * p.H * p.dh > 0 && (p.k_tail == nullptr || p.v_tail == nullptr))
    return Status::kInvalidArgument;
  return Status::kOk;
}

Ctx make_ctx(int64_t B, int64_t T, int64_t H, int64_t dh, int64_t M, int64_t N, bool allprev,
             double scale) {
  Ctx c{};
  c.B = B; c.T = T; c.H = H; c.dh = dh; c.M = M; c.N = N;
  c.N1 = N;
  c.Np = round_up(std::max<int64_t>(N, 1), kVW);
  c.Dp = round_up(std::max<int64_t>(dh, 1), kVW);
  c.allprev = allprev;
  c.scale = scale;
  return c;
}

}  // namespace

Status image_causal_attention_fwd_cpu(const ImageCausalAttnParams& p) {
  Status st = check_sizes(p);
  if (st != Status::kOk) return st;
  if (p.B * p.T * p.H * p.dh == 0) return Status::kOk;
  if (p.q == nullptr || p.out == nullptr || p.media_index == nullptr) return Status::kInvalidArgument;
  if (p.M * (p.N - p.n_tail) > 0 && (p.k == nullptr || p.v == nullptr)) return Status::kInvalidArgument;
  std::vector<Seg> segs;
  if (!find_segments(p.media_index, p.media_index_strides, p.B, p.T, p.M, kChunk, segs))
    return Status::kInvalidArgument;
  bool any_image = false;
  for (const Seg& s : segs) any_image = any_image || s.idx >= 0;
  if (any_image && p.N == 0) return Status::kInvalidArgument;  // softmax over no keys
  Ctx c = make_ctx(p.B, p.T, p.H, p.dh, p.M, p.N, p.all_previous, p.scale);
  c.q = p.q; c.qs = p.q_strides;
  c.k = p.k; c.ks = p.k_strides;
  c.v = p.v; c.vs = p.v_strides;
  c.out = p.out; c.os = p.out_strides;
  c.N1 = p.N - p.n_tail;
  c.k2 = p.k_tail; c.ks2 = p.k_tail_strides;
  c.v2 = p.v_tail; c.vs2 = p.v_tail_strides;
  if (p.dtype == DType::kBFloat16)
    run_fwd<BF16>(c, segs);
  else if (p.dtype == DType::kFloat64)
    run_fwd<F64>(c, segs);
  else
    run_fwd<F32>(c, segs);
  return Status::kOk;
}

Status image_causal_attention_bwd_cpu(const ImageCausalAttnBackwardParams& p) {
  Status st = check_sizes(p);
  if (st != Status::kOk) return st;
  const bool rows = p.B * p.T * p.H * p.dh > 0, imgs = p.B * p.M * p.N * p.H * p.dh > 0;
  if (!rows && !imgs) return Status::kOk;
  if (rows && (p.q == nullptr || p.grad_out == nullptr || p.dq == nullptr || p.media_index == nullptr))
    return Status::kInvalidArgument;
  if (imgs && p.N > p.n_tail && (p.k == nullptr || p.v == nullptr || p.dk == nullptr || p.dv == nullptr))
    return Status::kInvalidArgument;
  if (imgs && p.n_tail > 0 && (p.dk_tail == nullptr || p.dv_tail == nullptr)) return Status::kInvalidArgument;
  std::vector<Seg> segs;
  if (p.T > 0 && p.media_index == nullptr) return Status::kInvalidArgument;
  if (!find_segments(p.media_index, p.media_index_strides, p.B, p.T, p.M, kChunk, segs))
    return Status::kInvalidArgument;
  bool any_image = false;
  for (const Seg& s : segs) any_image = any_image || s.idx >= 0;
  if (any_image && p.N == 0) return Status::kInvalidArgument;
  Ctx c = make_ctx(p.B, p.T, p.H, p.dh, p.M, p.N, p.all_previous, p.scale);
  c.q = p.q; c.qs = p.q_strides;
  c.k = p.k; c.ks = p.k_strides;
  c.v = p.v; c.vs = p.v_strides;
  c.go = p.grad_out; c.gos = p.grad_out_strides;
  c.dq = p.dq; c.dqs = p.dq_strides;
  c.dk = p.dk; c.dks = p.dk_strides;
  c.dv = p.dv; c.dvs = p.dv_strides;
  c.N1 = p.N - p.n_tail;
  c.k2 = p.k_tail; c.ks2 = p.k_tail_strides;
  c.v2 = p.v_tail; c.vs2 = p.v_tail_strides;
  c.dk2 = p.dk_tail; c.dks2 = p.dk_tail_strides;
  c.dv2 = p.dv_tail; c.dvs2 = p.dv_tail_strides;
  if (p.dh == 0 || p.H == 0 || p.B == 0) return Status::kOk;
  std::vector<float> st32;
  std::vector<double> st64;
  const size_t nrow = size_t(p.B * p.H * p.T);
  if (p.all_previous) {
    if (p.dtype == DType::kFloat64) {
      st64.assign(2 * nrow, 0.0);
      c.lse64 = st64.data();
      c.d64 = st64.data() + nrow;
    } else {
      st32.assign(2 * nrow, 0.0f);
      c.lse32 = st32.data();
      c.d32 = st32.data() + nrow;
    }
  }
  if (p.dtype == DType::kBFloat16)
    run_bwd<BF16>(c, segs);
  else if (p.dtype == DType::kFloat64)
    run_bwd<F64>(c, segs);
  else
    run_bwd<F32>(c, segs);
  return Status::kOk;
}

}  // namespace flamingo_rt
