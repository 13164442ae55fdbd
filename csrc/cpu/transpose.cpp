// Transposed copy of a matrix in tiles: see csrc/include/flamingo_rt/transpose.h.
//
// Each task copies one 64 x 64 tile: reads src rows of the tile (unit stride when the source
// is row-major), writes dst rows of the tile (always unit stride), so each cache line and
// page is touched once per tile instead of once per element. The element type only matters
// by its size (bits are copied), so one template per size.
//
// With AVX-512 and a row-major source, 4- and 2-byte tiles go through register transposes
// of 16 x 16 32-bit words (unpack 32 / unpack 64 / two 128-bit lane shuffles): 16 rows of
// 4-byte elements, or 32 rows of 2-byte ones whose pairs of rows are first interleaved into
// 32-bit words (row 2i in the low half, row 2i+1 in the high half), so that the transposed
// word rows are the destination's rows. The element-wise gather it replaces moved 2-byte
// elements at ~2 GB/s (an 8192 x 1024 bf16 block: 8.6 ms).
#include <cstring>

#include "cpu_isa.h"
#include "cpu_math.h"
#include "flamingo_rt/kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include "avx512_transpose16.h"
#define FRT_HAVE_AVX512_TRANSPOSE 1
#endif

namespace flamingo_rt {
namespace {

constexpr int64_t kTile = 64;

#ifdef FRT_HAVE_AVX512_TRANSPOSE
#define FRT_AVX512 __attribute__((target("avx512f")))

using cpu::transpose16x16;  // avx512_transpose16.h

// 4-byte elements: src rows [r0, r0 + 16) x columns [c0, c0 + 16) -> dst (ld R).
FRT_AVX512 inline void block32(const uint32_t* src, uint32_t* dst, int64_t R, int64_t r0, int64_t c0, int64_t sr) {
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + (r0 + i) * sr + c0);
  transpose16x16(r);
  for (int c = 0; c < 16; ++c) _mm512_storeu_si512(dst + (c0 + c) * R + r0, r[c]);
}

// 2-byte elements: src rows [r0, r0 + 32) x columns [c0, c0 + 16) -> dst (ld R).
FRT_AVX512 inline void block16(const uint16_t* src, uint16_t* dst, int64_t R, int64_t r0, int64_t c0, int64_t sr) {
  __m512i r[16];
  for (int i = 0; i < 16; ++i) {
    const __m512i lo = _mm512_cvtepu16_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + (r0 + 2 * i) * sr + c0)));
    const __m512i hi = _mm512_cvtepu16_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + (r0 + 2 * i + 1) * sr + c0)));
    r[i] = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
  }
  transpose16x16(r);
  for (int c = 0; c < 16; ++c) _mm512_storeu_si512(dst + (c0 + c) * R + r0, r[c]);
}

// The tile's whole blocks through the register transpose; returns the rows and columns it
// covered from (r0, c0) (the rest goes element-wise).
template <typename T>
FRT_AVX512 void tile_avx512(const T* src, T* dst, int64_t R, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                            int64_t sr, int64_t& r_end, int64_t& c_end) {
  constexpr int64_t BR = sizeof(T) == 2 ? 32 : 16, BC = 16;
  r_end = r0 + (r1 - r0) / BR * BR;
  c_end = c0 + (c1 - c0) / BC * BC;
  for (int64_t r = r0; r < r_end; r += BR)
    for (int64_t c = c0; c < c_end; c += BC) {
      if constexpr (sizeof(T) == 2)
        block16(reinterpret_cast<const uint16_t*>(src), reinterpret_cast<uint16_t*>(dst), R, r, c, sr);
      else
        block32(reinterpret_cast<const uint32_t*>(src), reinterpret_cast<uint32_t*>(dst), R, r, c, sr);
    }
}

inline bool have_avx512() {
  return cpu::isa::avx512();
}
#endif

template <typename T>
FRT_CLONES void tile(const T* src, T* dst, int64_t R, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                     int64_t sr, int64_t sc) {
  if (sc == 1) {
    // Walk src rows in strips of kStrip rows: each dst row of the strip gets kStrip
    // contiguous elements (a whole 64-byte line for float32), gathered from kStrip src rows.
    constexpr int64_t kStrip = 64 / sizeof(T);
    int64_t r = r0;
    for (; r + kStrip <= r1; r += kStrip) {
      const T* s = src + r * sr;
      for (int64_t c = c0; c < c1; ++c) {
        T buf[kStrip];
        for (int64_t i = 0; i < kStrip; ++i) buf[i] = s[i * sr + c];
        std::memcpy(dst + c * R + r, buf, sizeof(buf));
      }
    }
    for (; r < r1; ++r)
      for (int64_t c = c0; c < c1; ++c) dst[c * R + r] = src[r * sr + c];
    return;
  }
  for (int64_t c = c0; c < c1; ++c) {
    T* d = dst + c * R;
    for (int64_t r = r0; r < r1; ++r) d[r] = src[r * sr + c * sc];
  }
}

template <typename T>
void run(const Transpose2dParams& p) {
  const T* src = static_cast<const T*>(p.src);
  T* dst = static_cast<T*>(p.dst);
  const int64_t tr = (p.R + kTile - 1) / kTile, tc = (p.C + kTile - 1) / kTile;
  const int64_t ntile = tr * tc;
  // Threads only for more than ~256 KB: below that the copy is microseconds.
  const bool par = p.R * p.C * int64_t(sizeof(T)) > (int64_t(1) << 18);
#ifdef FRT_HAVE_AVX512_TRANSPOSE
  const bool fast = sizeof(T) <= 4 && p.src_stride_c == 1 && have_avx512();
#endif
#pragma omp parallel for schedule(static) if (par)
  for (int64_t t = 0; t < ntile; ++t) {
    const int64_t r0 = (t / tc) * kTile, c0 = (t % tc) * kTile;
    const int64_t r1 = r0 + kTile < p.R ? r0 + kTile : p.R, c1 = c0 + kTile < p.C ? c0 + kTile : p.C;
#ifdef FRT_HAVE_AVX512_TRANSPOSE
    if (fast) {
      int64_t re = r0, ce = c0;
      tile_avx512<T>(src, dst, p.R, r0, r1, c0, c1, p.src_stride_r, re, ce);
      // the ragged edges element-wise: rows past the whole blocks, then their columns' rest
      if (re < r1) tile<T>(src, dst, p.R, re, r1, c0, c1, p.src_stride_r, 1);
      if (ce < c1) tile<T>(src, dst, p.R, r0, re, ce, c1, p.src_stride_r, 1);
      continue;
    }
#endif
    tile<T>(src, dst, p.R, r0, r1, c0, c1, p.src_stride_r, p.src_stride_c);
  }
}

}  // namespace

Status transpose_2d_cpu(const Transpose2dParams& p) {
  if (p.R < 0 || p.C < 0) return Status::kInvalidArgument;
  if (p.R == 0 || p.C == 0) return Status::kOk;
  if (p.src == nullptr || p.dst == nullptr) return Status::kInvalidArgument;
  switch (p.elem_size) {
    case 2: run<uint16_t>(p); break;
    case 4: run<uint32_t>(p); break;
    case 8: run<uint64_t>(p); break;
    default: return Status::kUnsupportedDtype;
  }
  return Status::kOk;
}

}  // namespace flamingo_rt
