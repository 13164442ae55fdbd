// The layout plan of an elementwise kernel's operands, shared by the CPU and CUDA kernels of
// bias_gamma_act (csrc/cpu/bias_gamma_act.cpp, csrc/cuda/bias_gamma_act.cu): host code only.
#pragma once

#include <algorithm>
#include <cstdint>

namespace flamingo_rt::layout {

// The logical dims of K operands of the same sizes (N, C, H, W) after dropping size-1 dims,
// ordering by operand 0's strides (outermost first) and merging neighbours that are
// contiguous in every operand; the channel dim (1) is never merged, so a kernel can find it.
template <int K>
struct Plan {
  int nd = 0;
  int64_t size[4] = {1, 1, 1, 1};
  int64_t stride[K][4] = {};
  int cpos = -1;  // position of the channel dim, -1 when C == 1 (then c is always 0)
};

inline int64_t abs64(int64_t v) { return v < 0 ? -v : v; }

// `min_dims` (1 or 2): at least that many dims, outer ones of size 1 added (a kernel that
// cuts work into blocks of rows x chunks of the innermost dim asks for 2).
template <int K>
Plan<K> make_plan(const int64_t sizes[4], const int64_t* const strides[K], int min_dims = 1) {
  int order[4];
  int m = 0;
  for (int d = 0; d < 4; ++d)
    if (sizes[d] != 1) order[m++] = d;
  std::stable_sort(order, order + m, [&](int a, int b) {
    return abs64(strides[0][a]) > abs64(strides[0][b]);
  });
  Plan<K> p;
  for (int i = 0; i < m; ++i) {
    const int d = order[i];
    const bool is_c = d == 1;
    if (p.nd > 0 && !is_c && p.cpos != p.nd - 1) {
      // Merge into the previous (outer) dim when contiguous in every operand.
      bool ok = true;
      for (int k = 0; k < K; ++k) ok = ok && strides[k][d] * sizes[d] == p.stride[k][p.nd - 1];
      if (ok) {
        p.size[p.nd - 1] *= sizes[d];
        for (int k = 0; k < K; ++k) p.stride[k][p.nd - 1] = strides[k][d];
        continue;
      }
    }
    p.size[p.nd] = sizes[d];
    for (int k = 0; k < K; ++k) p.stride[k][p.nd] = strides[k][d];
    if (is_c) p.cpos = p.nd;
    ++p.nd;
  }
  if (p.nd == 0) {
    p.nd = 1;
    p.size[0] = 1;
    for (int k = 0; k < K; ++k) p.stride[k][0] = 0;
  }
  if (min_dims >= 2 && p.nd == 1) {
    p.size[1] = p.size[0];
    for (int k = 0; k < K; ++k) p.stride[k][1] = p.stride[k][0];
    p.size[0] = 1;
    for (int k = 0; k < K; ++k) p.stride[k][0] = 0;
    if (p.cpos == 0) p.cpos = 1;
    p.nd = 2;
  }
  return p;
}

}  // namespace flamingo_rt::layout
