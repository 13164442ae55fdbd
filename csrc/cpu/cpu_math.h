// Element types and scalar math shared by the CPU kernels (internal; not a public header).
//
// FRT_CLONES compiles a function per ISA level (AVX-512, AVX2, baseline) with GCC
// target_clones, the loader picking one for the running CPU; FRT_INLINE forces inlining.
// F32 / BF16 / F64 say how an element is stored and in which type it is computed
// (bfloat16: the top half of a float32, stored with round-to-nearest-even).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && \
    !defined(FLAMINGO_RT_NO_CLONES)
#define FRT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FRT_CLONES
#endif

// FRT_SIMD / FRT_SIMD_RED(op : var): `omp simd` (with a reduction) before a loop.
#define FRT_PRAGMA(x) _Pragma(#x)
#define FRT_SIMD FRT_PRAGMA(omp simd)
#define FRT_SIMD_RED(...) FRT_PRAGMA(omp simd reduction(__VA_ARGS__))

#if defined(__GNUC__)
#define FRT_INLINE inline __attribute__((always_inline))
#else
#define FRT_INLINE inline
#endif

namespace flamingo_rt {
namespace cpu {

FRT_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
FRT_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// Element access (T: storage, Acc: math type): float32 as is, bfloat16 as the top half
// of a float32, float64 in float64.
struct F32 {
  using T = float;
  using Acc = float;
  FRT_INLINE static float load(T v) { return v; }
  FRT_INLINE static T store(float v) { return v; }
};
struct BF16 {
  using T = uint16_t;
  using Acc = float;
  FRT_INLINE static float load(T v) { return bits_to_float(uint32_t(v) << 16); }
  // Round to nearest even; NaN stays a (quiet) NaN.
  FRT_INLINE static T store(float v) {
    const uint32_t u = float_to_bits(v);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t quiet = (u >> 16) | 0x0040u;
    return T(((u & 0x7fffffffu) > 0x7f800000u) ? quiet : rounded);
  }
};
struct F64 {
  using T = double;
  using Acc = double;
  FRT_INLINE static double load(T v) { return v; }
  FRT_INLINE static T store(double v) { return v; }
};

// c ? if_true : if_false for floats, through bit masks: GCC (12) keeps a float `?:` whose
// comparison may trap (-ftrapping-math, the default) as control flow, which AVX-512 masks
// vectorize but AVX2 does not (such loops stayed scalar on AVX2-only CPUs). The mask
// form vectorizes on every ISA.
FRT_INLINE float select_f32(bool c, float if_true, float if_false) {
  const uint32_t m = 0u - uint32_t(c);  // all ones or 0
  return bits_to_float((float_to_bits(if_true) & m) | (float_to_bits(if_false) & ~m));
}

// exp(a) for float32: ~2 ulp; 0 for a < -87.33 (below the smallest normal), +inf for
// a > 88, NaN for NaN. Branch-free (the clamps and the out-of-range results through
// select_f32), so loops around it vectorize on every ISA.
FRT_INLINE float exp_f32(float a) {
  const float lo = -87.33f, hi = 88.0f;
  const bool below = a < lo, above = a > hi;
  const float ac = select_f32(below, lo, select_f32(above, hi, a));
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float k = ac * 1.44269504088896341f + shifter;
  const int32_t n = int32_t(float_to_bits(k) - float_to_bits(shifter));
  const float kf = k - shifter;
  float r = ac - kf * 0.693145751953125f;  // ln2 split in a 15-bit high part (exact product)
  r = r - kf * 1.428606765330187e-06f;     // and the rest
  // Taylor degree 7 on |r| <= ln2/2: truncation < 6e-9 relative.
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float scale = bits_to_float(uint32_t(n + 127) << 23);
  return select_f32(below, 0.0f, select_f32(above, std::numeric_limits<float>::infinity(), p * scale));
}

}  // namespace cpu
}  // namespace flamingo_rt
