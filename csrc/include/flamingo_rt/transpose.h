// Transposed copy of a matrix (the row-major operand of a weight gradient dy^T x).
//
// dst (C, R) contiguous = src (R, C)^T, src with any element strides. A plain strided copy
// of a large row-major matrix into its transpose walks one of the two with a stride of a
// row (one TLB page per element at 1024 float32 columns): ~1 GB/s on the CPUs we run on.
// The kernel copies 64 x 64 tiles (16 KB of float32, both tiles in L1), OpenMP over tiles.
// 2-, 4- and 8-byte elements (bfloat16/float16, float32, float64): bits are copied as is.
#pragma once

#include <cstdint>

namespace flamingo_rt {

struct Transpose2dParams {
  const void* src = nullptr;  // (R, C), element strides src_stride_r, src_stride_c
  void* dst = nullptr;        // (C, R), contiguous
  int64_t R = 0, C = 0;
  int64_t src_stride_r = 0, src_stride_c = 1;
  int64_t elem_size = 4;      // bytes: 2, 4 or 8
};

Status transpose_2d_cpu(const Transpose2dParams& p);

}  // namespace flamingo_rt
