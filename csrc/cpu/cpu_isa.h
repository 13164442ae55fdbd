// x86 instruction-set levels of the CPU kernels' intrinsics paths (internal; not a public
// header): one place for the target attributes those functions are compiled with and for the
// run-time checks that pick them.
//
//   FRT_X86_ISA              defined where the intrinsics paths compile (x86-64, GCC / clang)
//   FRT_TARGET_AVX512        target attribute: AVX-512 F / BW / VL
//   FRT_TARGET_AVX512BF16    target attribute: the same and AVX512_BF16 (vdpbf16ps, vcvtne2ps2bf16)
//   cpu::isa::avx512()       whether this CPU runs FRT_TARGET_AVX512 code
//   cpu::isa::avx512_bf16()  whether it runs FRT_TARGET_AVX512BF16 code; false when the
//                            environment has FLAMINGO_RT_NO_AVX512_BF16=1 (read once): the
//                            kernels then run as on a CPU without it (small_linear's
//                            float32-FMA path, no bfloat16 Winograd), for tests and comparisons
//
// Every kernel keeps a portable path for CPUs without these (and for other compilers).
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && (__GNUC__ >= 10 || defined(__clang__))
#include <immintrin.h>

#define FRT_X86_ISA 1
#define FRT_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define FRT_TARGET_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace flamingo_rt {
namespace cpu {
namespace isa {

inline bool avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl");
  return ok;
}

inline bool avx512_bf16() {
  static const bool ok = [] {
    const char* off = std::getenv("FLAMINGO_RT_NO_AVX512_BF16");
    if (off && std::strcmp(off, "") != 0 && std::strcmp(off, "0") != 0) return false;
    return avx512() && __builtin_cpu_supports("avx512bf16");
  }();
  return ok;
}

}  // namespace isa
}  // namespace cpu
}  // namespace flamingo_rt

#endif
