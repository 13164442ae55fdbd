// CPU kernels for bias_gamma_act and its backward (see csrc/include/flamingo_rt/kernels.h).
//
// Layout handling: the four logical dims (N, C, H, W) are reordered by x's strides
// (largest outermost), size-1 dims are dropped and neighbouring non-channel dims that
// are contiguous in every operand are merged. The innermost dim (contiguous: H*W for
// NCHW, C for NHWC) is the loop the compiler vectorizes; a task is a block of rows of
// the next dim x a chunk of the innermost (about 16K elements, so short rows like 7x7
// or small C cost no per-row overhead), and tasks are spread over OpenMP threads. Any
// strides work; unit strides take the vectorized path.
//
// ISA: no -march flag is needed. On x86-64 Linux with GCC, the row functions are
// compiled three times (x86-64-v4 = AVX-512, x86-64-v3 = AVX2+FMA, baseline SSE2) with
// `target_clones` and the loader picks the best one for the running CPU, so a portable
// build runs everywhere and still uses wide vectors where they exist.
//
// Math is float32 with our own vectorizable exp and erfc (no libm calls in the inner
// loops): erfc(z) = t * exp(-z^2) * Q(t), t = 1 / (1 + z/2), Q a degree-10 polynomial
// fitted by us (minimax relative error 3.4e-9 on z in [0, 10]); exp by Cody-Waite range
// reduction and a degree-7 Taylor polynomial. Both are within a few float32 ulp, and
// GELU keeps its relative accuracy in the negative tail. On AVX-512 CPUs, contiguous GELU
// runs (float32 and bfloat16, forward and backward) use gelu_avx512.h's piecewise
// polynomials instead (about twice as fast; as accurate).
//
// float64 tensors use float64 math (libm) throughout.
//
// dbias: every task (a fixed piece of the tensor, chosen from the shape only) sums its
// part in float32 over blocks of kChunk elements, the blocks' sums in float64 (float64
// throughout for float64); the partials are then added in a fixed order in float64, so the
// result does not depend on the number of threads.
#include "flamingo_rt/kernels.h"
#include "layout_plan.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "cpu_act.h"
#include "cpu_math.h"
#include "gelu_avx512.h"

#ifdef _OPENMP
#include <omp.h>
#endif


namespace flamingo_rt {

#ifndef FLAMINGO_RT_WITH_CUDA
// Builds without CUDA still export the CUDA entry points, so hosts link either way.
bool built_with_cuda() { return false; }
const char* last_cuda_error() { return ""; }
Status bias_gamma_act_cuda(const BiasGammaActParams&) { return Status::kNotCompiled; }
size_t bias_gamma_act_backward_cuda_workspace_bytes(const BiasGammaActBackwardParams&) {
  return 0;
}
Status bias_gamma_act_backward_cuda(const BiasGammaActBackwardParams&) {
  return Status::kNotCompiled;
}
#endif

namespace {

using namespace cpu;  // element types and scalar math: cpu_math.h

// ------------------------------------------------------------------ run kernels

// Where the bias comes from within a run.
enum BiasMode { kBiasConst = 0, kBiasInner = 1, kBiasRow = 2 };
// What the backward accumulates for dbias within a run.
enum AccMode { kAccNone = 0, kAccSum = 1, kAccVec = 2, kAccRow = 3 };

// A task's work: `rows` runs of `len` elements. Element (r, i) of an operand lives at
// base + r * row_stride + i * stride (strides in elements).
struct Run {
  DType dtype;
  Act act;
  double gamma;
  int64_t rows, len;
  const void* x;
  int64_t sx, rsx;
  const void* dy;  // backward only
  int64_t sdy, rsdy;
  void* out;  // y (forward) or dx (backward)
  int64_t so, rso;
  int bias_mode;
  const void* bias;  // kBiasInner: bias[i * sb]; kBiasRow: bias[r * rsb]
  int64_t sb, rsb;
  double bconst;  // kBiasConst: the bias value (0 without bias)
  int acc_mode;
  void* acc;  // kAccVec: acc[i] += dx (len entries); kAccRow: acc[r] = sum of row r
              // (L::Acc); kAccSum: the return value is the run's sum
  // Short rows stored back to back (unit strides, row stride == len in every operand):
  // one flat loop over rows * len with the bias expanded into `sbias` (and, backward,
  // dx kept in `sgrad` for the dbias sums); both L::Acc arrays of rows * len.
  bool flat;
  void* sbias;
  void* sgrad;
};

// Short rows (7x7 maps in NCHW, a few channels in NHWC) leave the vector loop mostly
// in its scalar remainder; below this length contiguous runs use the flat loop.
constexpr int64_t kShortRow = 128;

template <class L>
FRT_INLINE void expand_bias(const Run& r, typename L::Acc* bs) {
  using T = typename L::T;
  const T* b = static_cast<const T*>(r.bias);
  if (r.bias_mode == kBiasInner) {
    for (int64_t j = 0; j < r.len; ++j) bs[j] = L::load(b[j * r.sb]);
    for (int64_t k = 1; k < r.rows; ++k)
      for (int64_t j = 0; j < r.len; ++j) bs[k * r.len + j] = bs[j];
  } else {
    for (int64_t k = 0; k < r.rows; ++k) {
      const typename L::Acc v = L::load(b[k * r.rsb]);
      for (int64_t j = 0; j < r.len; ++j) bs[k * r.len + j] = v;
    }
  }
}

// ------------------------------------------------------------------ chunked runs

// Contiguous bfloat16 runs are widened into float32 buffers a chunk at a time, the math
// runs on the buffers, and the results are narrowed back. With the conversions inside the
// math loop, GCC's target_clones code ran the backward at 1.4 ns per element per thread
// against 1.0 ns this way (and the float32 loop's 0.8); the bits are the same (the same
// per-element float32 math), only dbias's float32 partial sums run in another order.
// float32 GELU runs take the same chunks where the CPU has AVX-512 (gelu_avx512.h: its
// piecewise-polynomial GELU works on a buffer).
constexpr int64_t kChunk = 256;

// Where a chunked run's bias comes from: one value, a vector in the element type, a
// float32 vector (the flat loop's expanded bias).
enum ChunkBias { kCbConst = 0, kCbElem = 1, kCbF32 = 2 };

template <class L>
constexpr bool kIsBf16 = std::is_same<L, BF16>::value;

// Whether contiguous runs of L with activation A may go through the chunks (compile time),
// and whether they do on this CPU.
template <class L, Act A>
constexpr bool kMayChunk = kIsBf16<L> || (std::is_same<L, F32>::value && A == Act::kGelu);

// Whether activation A runs as gelu_avx512.h's piecewise polynomials on this CPU.
template <Act A>
FRT_INLINE bool piecewise_gelu() {
#ifdef FRT_GELU_AVX512
  return A == Act::kGelu && gelu512::available();
#else
  return false;
#endif
}

template <class L, Act A>
FRT_INLINE bool chunked() {
  return kIsBf16<L> || (kMayChunk<L, A> && piecewise_gelu<A>());
}

// v[j] = x[j] + b[i0 + j] (or + bc) as float32, for j < m: a chunk's pre-activations.
template <class L, int CB>
FRT_INLINE void pre_chunk(const typename L::T* x, const void* bias, int64_t i0, float bc, float* v,
                          int64_t m) {
  const typename L::T* be = static_cast<const typename L::T*>(bias);
  const float* b32 = static_cast<const float*>(bias);
#pragma omp simd
  for (int64_t j = 0; j < m; ++j)
    v[j] = L::load(x[j]) + (CB == kCbElem ? L::load(be[i0 + j]) : CB == kCbF32 ? b32[i0 + j] : bc);
}

// y = g * act(x + b) over n contiguous elements.
template <class L, Act A, int CB>
FRT_INLINE void fwd_chunked(const typename L::T* x, typename L::T* y, const void* bias, float bc,
                            float g, int64_t n) {
  alignas(64) float v[kChunk];
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t m = std::min(kChunk, n - i0);
    pre_chunk<L, CB>(x + i0, bias, i0, bc, v, m);
#ifdef FRT_GELU_AVX512
    if (piecewise_gelu<A>()) {
      gelu512::gelu_inplace(v, m, g);
    } else
#endif
    {
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) v[j] = g * act_fwd<A>(v[j]);
    }
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) y[i0 + j] = L::store(v[j]);
  }
}

// sum(v[0:n]): Acc partial sums over blocks of kChunk elements, added in float64.
template <class Acc>
FRT_INLINE double blocked_sum(const Acc* v, int64_t n) {
  double total = 0.0;
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t i1 = std::min(n, i0 + kChunk);
    Acc s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = i0; i < i1; ++i) s += v[i];
    total += double(s);
  }
  return total;
}

// dx = g * act'(x + b) * dy over n contiguous elements (dx may alias dy: each chunk of dy
// is read before that chunk of dx is written). ACC: kAccVec adds dx (float32, before
// rounding) to acc[i]; kAccSum / kAccRow return the sum (float32 per chunk, the chunks'
// sums added in float64); with `keep`, the float32 dx also goes to keep[i] (the flat loop's
// dbias pass).
template <class L, Act A, int CB, int ACC>
FRT_INLINE double bwd_chunked(const typename L::T* x, const typename L::T* dy, typename L::T* dx,
                             const void* bias, float bc, float g, float* acc, float* keep,
                             int64_t n) {
  alignas(64) float v[kChunk];
  alignas(64) float d[kChunk];
  double total = 0.0;
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t m = std::min(kChunk, n - i0);
    float s = 0;
    pre_chunk<L, CB>(x + i0, bias, i0, bc, v, m);
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) d[j] = L::load(dy[i0 + j]);
#ifdef FRT_GELU_AVX512
    if (piecewise_gelu<A>()) {
      gelu512::gelu_grad_mul(v, d, m, g);
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < m; ++j) {
        if (ACC == kAccVec) acc[i0 + j] += v[j];
        if (ACC == kAccSum || ACC == kAccRow) s += v[j];
      }
    } else
#endif
    {
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < m; ++j) {
        const float gx = g * act_grad<A>(v[j]) * d[j];
        v[j] = gx;
        if (ACC == kAccVec) acc[i0 + j] += gx;
        if (ACC == kAccSum || ACC == kAccRow) s += gx;
      }
    }
    if (keep != nullptr) std::memcpy(keep + i0, v, size_t(m) * sizeof(float));
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) dx[i0 + j] = L::store(v[j]);
    total += double(s);
  }
  return total;
}

// One row: the innermost loop, vectorized when every operand has unit stride.
// FAST: the caller guarantees unit strides, so only the vector loop is compiled.
// kAccSum / kAccRow: returns the row's sum of dx, accumulated in Acc over blocks of kChunk
// elements and the blocks' sums added in float64 (a float32 sum of a whole row of 2^20
// elements lost 6.6e-6 of its value with AVX2's 8 lanes).
template <class L, Act A, bool BVEC, int ACC, bool FAST>
FRT_INLINE double bwd_row(const typename L::T* x, int64_t sx, const typename L::T* dy,
                          int64_t sdy, typename L::T* dx, int64_t so,
                          const typename L::T* b, int64_t sb, typename L::Acc bc,
                          typename L::Acc g, typename L::Acc* acc, int64_t n,
                          bool contig) {
  using Acc = typename L::Acc;
  if constexpr (kMayChunk<L, A>) {
    if ((FAST || contig) && chunked<L, A>())
      return bwd_chunked<L, A, BVEC ? kCbElem : kCbConst, ACC>(x, dy, dx, b, bc, g, acc, nullptr, n);
  }
  double total = 0.0;
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t i1 = std::min(n, i0 + kChunk);
    Acc s = 0;
    if (FAST || contig) {
#pragma omp simd reduction(+ : s)
      for (int64_t i = i0; i < i1; ++i) {
        const Acc v = L::load(x[i]) + (BVEC ? L::load(b[i]) : bc);
        const Acc gx = g * act_grad<A>(v) * L::load(dy[i]);
        dx[i] = L::store(gx);
        if (ACC == kAccVec) acc[i] += gx;
        if (ACC == kAccSum || ACC == kAccRow) s += gx;
      }
    } else {
      for (int64_t i = i0; i < i1; ++i) {
        const Acc v = L::load(x[i * sx]) + (BVEC ? L::load(b[i * sb]) : bc);
        const Acc gx = g * act_grad<A>(v) * L::load(dy[i * sdy]);
        dx[i * so] = L::store(gx);
        if (ACC == kAccVec) acc[i] += gx;
        if (ACC == kAccSum || ACC == kAccRow) s += gx;
      }
    }
    total += double(s);
  }
  return total;
}

template <class L, Act A, bool BVEC, bool FAST>
FRT_INLINE void fwd_row(const typename L::T* x, int64_t sx, typename L::T* y, int64_t so,
                        const typename L::T* b, int64_t sb, typename L::Acc bc,
                        typename L::Acc g, int64_t n, bool contig) {
  using Acc = typename L::Acc;
  if constexpr (kMayChunk<L, A>) {
    if ((FAST || contig) && chunked<L, A>()) {
      fwd_chunked<L, A, BVEC ? kCbElem : kCbConst>(x, y, b, bc, g, n);
      return;
    }
  }
  if (FAST || contig) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const Acc v = L::load(x[i]) + (BVEC ? L::load(b[i]) : bc);
      y[i] = L::store(g * act_fwd<A>(v));
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const Acc v = L::load(x[i * sx]) + (BVEC ? L::load(b[i * sb]) : bc);
      y[i * so] = L::store(g * act_fwd<A>(v));
    }
  }
}

template <class L, Act A, bool FAST>
FRT_INLINE void fwd_run_t(const Run& r) {
  using T = typename L::T;
  using Acc = typename L::Acc;
  const T* x = static_cast<const T*>(r.x);
  const T* b = static_cast<const T*>(r.bias);
  T* y = static_cast<T*>(r.out);
  const Acc g = Acc(r.gamma);
  if (FAST && r.flat) {
    const int64_t n = r.rows * r.len;
    if (r.bias_mode == kBiasConst) {
      fwd_row<L, A, false, FAST>(x, 1, y, 1, nullptr, 0, Acc(r.bconst), g, n, true);
      return;
    }
    Acc* bs = static_cast<Acc*>(r.sbias);
    expand_bias<L>(r, bs);
    if constexpr (kMayChunk<L, A>) {
      if (chunked<L, A>()) {
        fwd_chunked<L, A, kCbF32>(x, y, bs, 0.0f, g, n);
        return;
      }
    }
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = L::store(g * act_fwd<A>(L::load(x[i]) + bs[i]));
    return;
  }
  const bool bvec = r.bias_mode == kBiasInner;
  const bool contig = r.sx == 1 && r.so == 1 && (!bvec || r.sb == 1);
  for (int64_t k = 0; k < r.rows; ++k) {
    const T* xk = x + k * r.rsx;
    T* yk = y + k * r.rso;
    if (bvec) {
      fwd_row<L, A, true, FAST>(xk, r.sx, yk, r.so, b, r.sb, Acc(0), g, r.len, contig);
    } else {
      const Acc bc = r.bias_mode == kBiasRow ? L::load(b[k * r.rsb]) : Acc(r.bconst);
      fwd_row<L, A, false, FAST>(xk, r.sx, yk, r.so, nullptr, 0, bc, g, r.len, contig);
    }
  }
}

template <class L, Act A, int ACC, bool FAST>
FRT_INLINE double bwd_run_acc(const Run& r) {
  using T = typename L::T;
  using Acc = typename L::Acc;
  const T* x = static_cast<const T*>(r.x);
  const T* dy = static_cast<const T*>(r.dy);
  const T* b = static_cast<const T*>(r.bias);
  T* dx = static_cast<T*>(r.out);
  Acc* acc = static_cast<Acc*>(r.acc);
  const Acc g = Acc(r.gamma);
  if (FAST && r.flat) {
    const int64_t n = r.rows * r.len;
    const bool hasb = r.bias_mode != kBiasConst;
    Acc* bs = static_cast<Acc*>(r.sbias);
    Acc* gs = static_cast<Acc*>(r.sgrad);
    if (hasb) expand_bias<L>(r, bs);
    const Acc bc = Acc(r.bconst);
    bool done = false;
    if constexpr (kMayChunk<L, A>) {
      if (chunked<L, A>()) {
        Acc* keep = ACC != kAccNone ? gs : nullptr;
        if (hasb)
          bwd_chunked<L, A, kCbF32, kAccNone>(x, dy, dx, bs, 0.0f, g, nullptr, keep, n);
        else
          bwd_chunked<L, A, kCbConst, kAccNone>(x, dy, dx, nullptr, bc, g, nullptr, keep, n);
        done = true;
      }
    }
    if (!done) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const Acc v = L::load(x[i]) + (hasb ? bs[i] : bc);
        const Acc gx = g * act_grad<A>(v) * L::load(dy[i]);
        dx[i] = L::store(gx);
        if (ACC != kAccNone) gs[i] = gx;
      }
    }
    double total = 0.0;
    if (ACC == kAccVec) {
      for (int64_t k = 0; k < r.rows; ++k)
#pragma omp simd
        for (int64_t j = 0; j < r.len; ++j) acc[j] += gs[k * r.len + j];
    } else if (ACC == kAccRow) {
      for (int64_t k = 0; k < r.rows; ++k) acc[k] = Acc(blocked_sum(gs + k * r.len, r.len));
    } else if (ACC == kAccSum) {
      total = blocked_sum(gs, n);
    }
    return total;
  }
  const bool bvec = r.bias_mode == kBiasInner;
  const bool contig = r.sx == 1 && r.sdy == 1 && r.so == 1 && (!bvec || r.sb == 1);
  double total = 0.0;
  for (int64_t k = 0; k < r.rows; ++k) {
    const T* xk = x + k * r.rsx;
    const T* dyk = dy + k * r.rsdy;
    T* dxk = dx + k * r.rso;
    double s;
    if (bvec) {
      s = bwd_row<L, A, true, ACC, FAST>(xk, r.sx, dyk, r.sdy, dxk, r.so, b, r.sb, Acc(0), g, acc,
                                   r.len, contig);
    } else {
      const Acc bc = r.bias_mode == kBiasRow ? L::load(b[k * r.rsb]) : Acc(r.bconst);
      s = bwd_row<L, A, false, ACC, FAST>(xk, r.sx, dyk, r.sdy, dxk, r.so, nullptr, 0, bc, g, acc,
                                    r.len, contig);
    }
    if (ACC == kAccRow) acc[k] = Acc(s);
    if (ACC == kAccSum) total += s;
  }
  return total;
}

template <class L, Act A, bool FAST>
FRT_INLINE double bwd_run_t(const Run& r) {
  switch (r.acc_mode) {
    case kAccSum: return bwd_run_acc<L, A, kAccSum, FAST>(r);
    case kAccVec: return bwd_run_acc<L, A, kAccVec, FAST>(r);
    case kAccRow: return bwd_run_acc<L, A, kAccRow, FAST>(r);
    default: return bwd_run_acc<L, A, kAccNone, FAST>(r);
  }
}

template <class L, bool FAST>
FRT_INLINE void fwd_run_l(const Run& r) {
  switch (r.act) {
    case Act::kRelu: fwd_run_t<L, Act::kRelu, FAST>(r); break;
    case Act::kSilu: fwd_run_t<L, Act::kSilu, FAST>(r); break;
    default: fwd_run_t<L, Act::kGelu, FAST>(r); break;
  }
}

template <class L, bool FAST>
FRT_INLINE double bwd_run_l(const Run& r) {
  switch (r.act) {
    case Act::kRelu: return bwd_run_t<L, Act::kRelu, FAST>(r);
    case Act::kSilu: return bwd_run_t<L, Act::kSilu, FAST>(r);
    default: return bwd_run_t<L, Act::kGelu, FAST>(r);
  }
}

// Vector paths (float32 / bfloat16 with unit strides or the flat loop), compiled per
// ISA; everything above is force-inlined into them.
FRT_CLONES void fwd_run_fast(const Run& r) {
  if (r.dtype == DType::kBFloat16)
    fwd_run_l<BF16, true>(r);
  else
    fwd_run_l<F32, true>(r);
}

FRT_CLONES double bwd_run_fast(const Run& r) {
  if (r.dtype == DType::kBFloat16) return bwd_run_l<BF16, true>(r);
  return bwd_run_l<F32, true>(r);
}

// Everything else (strided runs, float64) compiled once, for the baseline ISA: these
// loops gain little from wide vectors and would triple the build time.
void fwd_run_generic(const Run& r) {
  if (r.dtype == DType::kBFloat16)
    fwd_run_l<BF16, false>(r);
  else if (r.dtype == DType::kFloat64)
    fwd_run_l<F64, false>(r);
  else
    fwd_run_l<F32, false>(r);
}

double bwd_run_generic(const Run& r) {
  if (r.dtype == DType::kBFloat16) return bwd_run_l<BF16, false>(r);
  if (r.dtype == DType::kFloat64) return bwd_run_l<F64, false>(r);
  return bwd_run_l<F32, false>(r);
}

// ------------------------------------------------------------------ bfloat16 tables

// A bfloat16 x without bias has 65536 possible values, so y = gamma * act(x) is a table of
// 65536 bfloat16 results (128 KB, mostly read from L1/L2: activations cluster in a few
// exponents): one load per element instead of ~40 vector operations of GELU / SiLU math.
// The table is made by the same vectorized code as the computed path (the AVX-512 clone
// where the CPU has it) run over every bit pattern, so looking up gives the bits the
// computed contiguous path gives.
constexpr int64_t kTableMinElems = 1 << 16;  // smaller tensors compute (a table costs ~0.1 ms once)
constexpr int kMaxTables = 64;              // (act, gamma) pairs kept: 8 MB at most

FRT_CLONES void make_table(Act act, double gamma, uint16_t* table) {
  std::vector<uint16_t> all(65536);
  for (int i = 0; i < 65536; ++i) all[i] = uint16_t(i);
  Run r{};
  r.dtype = DType::kBFloat16;
  r.act = act;
  r.gamma = gamma;
  r.rows = 1;
  r.len = 65536;
  r.x = all.data();
  r.sx = 1;
  r.out = table;
  r.so = 1;
  r.bias_mode = kBiasConst;
  r.bconst = 0.0;
  r.flat = false;
  fwd_run_l<BF16, true>(r);
}

// The table of (act, gamma), made on first use; nullptr when kMaxTables are already kept.
const uint16_t* act_table(Act act, double gamma) {
  struct Entry {
    Act act;
    double gamma;
    std::unique_ptr<uint16_t[]> table;
  };
  static std::mutex mu;
  static std::vector<Entry> tables;
  std::lock_guard<std::mutex> lock(mu);
  for (const Entry& e : tables)
    if (e.act == act && std::memcmp(&e.gamma, &gamma, sizeof(double)) == 0) return e.table.get();
  if (static_cast<int>(tables.size()) >= kMaxTables) return nullptr;
  std::unique_ptr<uint16_t[]> t(new uint16_t[65536]);
  make_table(act, gamma, t.get());
  tables.push_back(Entry{act, gamma, std::move(t)});
  return tables.back().table.get();
}

// y = table[x] over a run (rows x len, any strides; the flat case is one contiguous row).
FRT_CLONES void table_run(const Run& r, const uint16_t* table) {
  const uint16_t* x = static_cast<const uint16_t*>(r.x);
  uint16_t* y = static_cast<uint16_t*>(r.out);
  if (r.flat) {
    const int64_t n = r.rows * r.len;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = table[x[i]];
    return;
  }
  for (int64_t k = 0; k < r.rows; ++k) {
    const uint16_t* xk = x + k * r.rsx;
    uint16_t* yk = y + k * r.rso;
    if (r.sx == 1 && r.so == 1) {
#pragma omp simd
      for (int64_t i = 0; i < r.len; ++i) yk[i] = table[xk[i]];
    } else {
      for (int64_t i = 0; i < r.len; ++i) yk[i * r.so] = table[xk[i * r.sx]];
    }
  }
}

inline bool run_is_fast(const Run& r, bool backward) {
  if (r.dtype == DType::kFloat64) return false;
  if (r.flat) return true;
  return r.sx == 1 && r.so == 1 && (!backward || r.sdy == 1) &&
         (r.bias_mode != kBiasInner || r.sb == 1);
}

void fwd_run(const Run& r) {
  if (run_is_fast(r, false))
    fwd_run_fast(r);
  else
    fwd_run_generic(r);
}

double bwd_run(const Run& r) {
  return run_is_fast(r, true) ? bwd_run_fast(r) : bwd_run_generic(r);
}

// ------------------------------------------------------------------ layout plan

// Plan, make_plan: layout_plan.h; the tasks below are blocks of rows x chunks of the
// innermost dim, so every plan here has at least two dims.
using layout::Plan;

template <int K>
Plan<K> make_plan(const int64_t sizes[4], const int64_t* const strides[K]) {
  return layout::make_plan<K>(sizes, strides, 2);
}

constexpr int64_t kTaskElems = 16384;      // target elements per task
constexpr int64_t kParallelMin = 1 << 15;  // below this many elements: one thread

// How the tensor is cut into tasks: the dims above the row dim ("outer", at most two),
// the row dim (nd - 2) in blocks of `rb` rows, the inner dim (nd - 1) in chunks of `cw`.
template <int K>
struct Tiling {
  int64_t outer = 1;   // product of dims [0, nd - 2)
  int64_t R = 1;       // size of the row dim
  int64_t L = 1;       // size of the inner dim
  int64_t rb = 1;      // rows per task
  int64_t nrb = 1;     // row blocks
  int64_t cw = 1;      // inner elements per task
  int64_t nch = 1;     // inner chunks
  int64_t tasks = 0;
};

template <int K>
Tiling<K> make_tiling(const Plan<K>& pl) {
  Tiling<K> t;
  const int inner = pl.nd - 1, rowd = pl.nd - 2;
  for (int d = 0; d < rowd; ++d) t.outer *= pl.size[d];
  t.R = pl.size[rowd];
  t.L = pl.size[inner];
  t.cw = std::min(t.L, kTaskElems);
  t.nch = (t.L + t.cw - 1) / t.cw;
  t.rb = std::max<int64_t>(1, std::min(t.R, kTaskElems / t.cw));
  t.nrb = (t.R + t.rb - 1) / t.rb;
  t.tasks = t.outer * t.nrb * t.nch;
  return t;
}

// Decomposes task id -> (outer index o, first row r0, rows, inner offset j0, length),
// the per-operand base offsets, and the channel of the task when it is an outer dim.
template <int K>
struct TaskPos {
  int64_t o, r0, rows, j0, len;
  int64_t off[K];
  int64_t c;  // channel index when the channel is an outer dim (else 0)
};

template <int K>
inline TaskPos<K> task_pos(const Plan<K>& pl, const Tiling<K>& t, int64_t id) {
  TaskPos<K> p;
  const int inner = pl.nd - 1, rowd = pl.nd - 2;
  const int64_t ch = id % t.nch;
  id /= t.nch;
  const int64_t blk = id % t.nrb;
  p.o = id / t.nrb;
  p.r0 = blk * t.rb;
  p.rows = std::min(t.rb, t.R - p.r0);
  p.j0 = ch * t.cw;
  p.len = std::min(t.cw, t.L - p.j0);
  p.c = 0;
  for (int k = 0; k < K; ++k)
    p.off[k] = p.r0 * pl.stride[k][rowd] + p.j0 * pl.stride[k][inner];
  int64_t rem = p.o;
  for (int d = rowd - 1; d >= 0; --d) {
    const int64_t i = rem % pl.size[d];
    rem /= pl.size[d];
    for (int k = 0; k < K; ++k) p.off[k] += i * pl.stride[k][d];
    if (d == pl.cpos) p.c = i;
  }
  return p;
}

inline size_t elem_size(DType d) {
  return d == DType::kFloat64 ? 8 : d == DType::kFloat32 ? 4 : 2;
}

inline double load_scalar(DType d, const void* base, int64_t idx) {
  if (d == DType::kBFloat16) return BF16::load(static_cast<const uint16_t*>(base)[idx]);
  if (d == DType::kFloat64) return static_cast<const double*>(base)[idx];
  return static_cast<const float*>(base)[idx];
}
inline void store_scalar(DType d, void* base, int64_t idx, double v) {
  if (d == DType::kBFloat16)
    static_cast<uint16_t*>(base)[idx] = BF16::store(float(v));
  else if (d == DType::kFloat64)
    static_cast<double*>(base)[idx] = v;
  else
    static_cast<float*>(base)[idx] = float(v);
}

inline const void* advance(const void* p, int64_t elems, size_t esz) {
  return static_cast<const char*>(p) + elems * int64_t(esz);
}
inline void* advance(void* p, int64_t elems, size_t esz) {
  return static_cast<char*>(p) + elems * int64_t(esz);
}

inline bool valid_act(Act a) {
  return a == Act::kGelu || a == Act::kRelu || a == Act::kSilu;
}

inline Status check_common(DType dtype, Act act, const int64_t sizes[4]) {
  if (dtype != DType::kFloat32 && dtype != DType::kBFloat16 && dtype != DType::kFloat64)
    return Status::kUnsupportedDtype;
  if (!valid_act(act)) return Status::kInvalidArgument;
  for (int d = 0; d < 4; ++d)
    if (sizes[d] < 0) return Status::kInvalidArgument;
  return Status::kOk;
}

// Whether the runs of a plan can use the flat loop: short rows, unit inner strides
// and rows back to back in every operand.
template <int K>
inline bool flat_ok(const Plan<K>& pl) {
  const int inner = pl.nd - 1, rowd = pl.nd - 2;
  const int64_t len = pl.size[inner];
  if (len >= kShortRow || pl.size[rowd] == 1) return false;
  for (int k = 0; k < K; ++k)
    if (pl.stride[k][inner] != 1 || pl.stride[k][rowd] != len) return false;
  return true;
}

// Bias source of a task: along the run (channel innermost), per row (channel is the row
// dim) or one value (channel among the outer dims, C == 1, or no bias).
template <int K>
inline void set_bias(Run& r, const Plan<K>& pl, const TaskPos<K>& tp, const void* bias,
                     int64_t bias_stride, DType dt) {
  const size_t esz = elem_size(dt);
  r.bias = nullptr;
  r.sb = r.rsb = 0;
  r.bconst = 0.0;
  r.bias_mode = kBiasConst;
  if (bias == nullptr) return;
  if (pl.cpos == pl.nd - 1) {
    r.bias_mode = kBiasInner;
    r.bias = advance(bias, tp.j0 * bias_stride, esz);
    r.sb = bias_stride;
  } else if (pl.cpos == pl.nd - 2) {
    r.bias_mode = kBiasRow;
    r.bias = advance(bias, tp.r0 * bias_stride, esz);
    r.rsb = bias_stride;
  } else {
    r.bconst = load_scalar(dt, bias, tp.c * bias_stride);
  }
}

}  // namespace

// ------------------------------------------------------------------ forward

Status bias_gamma_act_cpu(const BiasGammaActParams& p) {
  Status st = check_common(p.dtype, p.act, p.sizes);
  if (st != Status::kOk) return st;
  const int64_t numel = p.sizes[0] * p.sizes[1] * p.sizes[2] * p.sizes[3];
  if (numel == 0) return Status::kOk;
  if (p.x == nullptr || p.y == nullptr) return Status::kInvalidArgument;

  const int64_t* strides[2] = {p.x_strides, p.y_strides};
  const Plan<2> pl = make_plan<2>(p.sizes, strides);
  const Tiling<2> tl = make_tiling(pl);
  const int inner = pl.nd - 1, rowd = pl.nd - 2;
  const size_t esz = elem_size(p.dtype);
  const bool flat = flat_ok(pl);
  const size_t scratch = flat ? size_t(tl.rb * tl.cw) : 0;  // elements of L::Acc
  // bfloat16 GELU / SiLU without bias: a table lookup (see act_table)
  const uint16_t* table = nullptr;
  if (p.dtype == DType::kBFloat16 && p.bias == nullptr && p.act != Act::kRelu && numel >= kTableMinElems)
    table = act_table(p.act, p.gamma);

#pragma omp parallel if (numel >= kParallelMin)
  {
  std::vector<double> sbias(scratch);  // double storage also holds float32 Acc values
#pragma omp for schedule(static)
  for (int64_t t = 0; t < tl.tasks; ++t) {
    const TaskPos<2> tp = task_pos(pl, tl, t);
    Run r;
    r.dtype = p.dtype;
    r.act = p.act;
    r.gamma = p.gamma;
    r.rows = tp.rows;
    r.len = tp.len;
    r.x = advance(p.x, tp.off[0], esz);
    r.sx = pl.stride[0][inner];
    r.rsx = pl.stride[0][rowd];
    r.dy = nullptr;
    r.sdy = r.rsdy = 0;
    r.out = advance(p.y, tp.off[1], esz);
    r.so = pl.stride[1][inner];
    r.rso = pl.stride[1][rowd];
    set_bias(r, pl, tp, p.bias, p.bias_stride, p.dtype);
    r.acc_mode = kAccNone;
    r.acc = nullptr;
    r.flat = flat;
    r.sbias = sbias.data();
    r.sgrad = nullptr;
    if (table != nullptr)
      table_run(r, table);
    else
      fwd_run(r);
  }
  }
  return Status::kOk;
}

// ------------------------------------------------------------------ backward

Status bias_gamma_act_backward_cpu(const BiasGammaActBackwardParams& p) {
  Status st = check_common(p.dtype, p.act, p.sizes);
  if (st != Status::kOk) return st;
  const int64_t C = p.sizes[1];
  const int64_t numel = p.sizes[0] * C * p.sizes[2] * p.sizes[3];
  if (numel == 0) {
    if (p.grad_bias != nullptr)
      for (int64_t c = 0; c < C; ++c)
        store_scalar(p.dtype, p.grad_bias, c * p.grad_bias_stride, 0.0);
    return Status::kOk;
  }
  if (p.x == nullptr || p.grad_out == nullptr || p.grad_x == nullptr)
    return Status::kInvalidArgument;

  // Operand 0 is x (it decides the loop order), then grad_out, then grad_x.
  const int64_t* strides[3] = {p.x_strides, p.grad_out_strides, p.grad_x_strides};
  const Plan<3> pl = make_plan<3>(p.sizes, strides);
  const Tiling<3> tl = make_tiling(pl);
  const int inner = pl.nd - 1, rowd = pl.nd - 2;
  const size_t esz = elem_size(p.dtype);
  const bool want_db = p.grad_bias != nullptr;
  const bool f64 = p.dtype == DType::kFloat64;

  // dbias partials, each written by exactly one task, reduced in a fixed order below:
  //   channel innermost: a vector of L per task      -> part[t][j]
  //   channel = row dim: one value per (o, row, chunk) -> part[(o * R + row) * nch + ch]
  //   otherwise:         one value per task          -> part[t] (channel tp.c)
  // float32 partial vectors for float32 / bfloat16 (float64 for float64); the scalar
  // partials are float64.
  int acc_mode = kAccNone;
  size_t nvec = 0, nscalar = 0;
  if (want_db) {
    if (pl.cpos == inner) {
      acc_mode = kAccVec;
      nvec = size_t(tl.tasks * tl.L);
    } else if (pl.cpos == rowd) {
      acc_mode = kAccRow;
      nvec = size_t(tl.outer * tl.R * tl.nch);
    } else {
      acc_mode = kAccSum;
      nscalar = size_t(tl.tasks);
    }
  }
  std::vector<float> part32(!f64 ? nvec : 0, 0.0f);
  std::vector<double> part64(f64 ? nvec : 0, 0.0);
  std::vector<double> sums(nscalar, 0.0);
  std::vector<int64_t> chan(nscalar, 0);
  // kAccRow: a run writes its row sums to per-thread scratch, copied to part below.
  const bool row_acc = acc_mode == kAccRow;

  const bool flat = flat_ok(pl);
  const size_t scratch = flat ? size_t(tl.rb * tl.cw) : 0;  // elements of L::Acc

#pragma omp parallel if (numel >= kParallelMin)
  {
    std::vector<float> row32(row_acc && !f64 ? size_t(tl.rb) : 0);
    std::vector<double> row64(row_acc && f64 ? size_t(tl.rb) : 0);
    std::vector<double> sbias(scratch), sgrad(scratch);  // double storage fits either Acc
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tl.tasks; ++t) {
      const TaskPos<3> tp = task_pos(pl, tl, t);
      Run r;
      r.dtype = p.dtype;
      r.act = p.act;
      r.gamma = p.gamma;
      r.rows = tp.rows;
      r.len = tp.len;
      r.x = advance(p.x, tp.off[0], esz);
      r.sx = pl.stride[0][inner];
      r.rsx = pl.stride[0][rowd];
      r.dy = advance(p.grad_out, tp.off[1], esz);
      r.sdy = pl.stride[1][inner];
      r.rsdy = pl.stride[1][rowd];
      r.out = advance(p.grad_x, tp.off[2], esz);
      r.so = pl.stride[2][inner];
      r.rso = pl.stride[2][rowd];
      set_bias(r, pl, tp, p.bias, p.bias_stride, p.dtype);
      r.acc_mode = acc_mode;
      r.acc = nullptr;
      r.flat = flat;
      r.sbias = sbias.data();
      r.sgrad = sgrad.data();
      if (acc_mode == kAccVec) {
        r.acc = f64 ? static_cast<void*>(part64.data() + t * tl.L + tp.j0)
                    : static_cast<void*>(part32.data() + t * tl.L + tp.j0);
      } else if (row_acc) {
        r.acc = f64 ? static_cast<void*>(row64.data()) : static_cast<void*>(row32.data());
      }
      const double s = bwd_run(r);
      if (acc_mode == kAccSum) {
        sums[size_t(t)] = s;
        chan[size_t(t)] = tp.c;
      } else if (row_acc) {
        const int64_t ch = tp.j0 / tl.cw;
        for (int64_t k = 0; k < tp.rows; ++k) {
          const size_t idx = size_t((tp.o * tl.R + tp.r0 + k) * tl.nch + ch);
          if (f64)
            part64[idx] = row64[size_t(k)];
          else
            part32[idx] = row32[size_t(k)];
        }
      }
    }
  }
  if (!want_db) return Status::kOk;

  if (acc_mode == kAccVec) {  // channel c = inner index j
#pragma omp parallel for schedule(static) if (tl.tasks * tl.L >= kParallelMin)
    for (int64_t c = 0; c < tl.L; ++c) {
      double s = 0.0;
      for (int64_t t = 0; t < tl.tasks; ++t)
        s += f64 ? part64[size_t(t * tl.L + c)] : double(part32[size_t(t * tl.L + c)]);
      store_scalar(p.dtype, p.grad_bias, c * p.grad_bias_stride, s);
    }
  } else if (row_acc) {  // channel c = row index
#pragma omp parallel for schedule(static) if (tl.outer * tl.R * tl.nch >= kParallelMin)
    for (int64_t c = 0; c < tl.R; ++c) {
      double s = 0.0;
      for (int64_t o = 0; o < tl.outer; ++o)
        for (int64_t ch = 0; ch < tl.nch; ++ch) {
          const size_t idx = size_t((o * tl.R + c) * tl.nch + ch);
          s += f64 ? part64[idx] : double(part32[idx]);
        }
      store_scalar(p.dtype, p.grad_bias, c * p.grad_bias_stride, s);
    }
  } else {  // one channel per task (C == 1: all tasks are channel 0)
    std::vector<double> acc(size_t(C), 0.0);
    for (int64_t t = 0; t < tl.tasks; ++t) acc[size_t(chan[size_t(t)])] += sums[size_t(t)];
    for (int64_t c = 0; c < C; ++c)
      store_scalar(p.dtype, p.grad_bias, c * p.grad_bias_stride, acc[size_t(c)]);
  }
  return Status::kOk;
}

}  // namespace flamingo_rt
