// flamingo_rt Winograd convolution (C++17, no torch): a 3x3, stride-1 convolution with one
// pixel of zero padding on every side (SAME for stride 1), grouped or not, computed as
// Winograd's minimal filtering F(4x4, 3x3) (Lavin & Gray 2016): each 4x4 output tile from a
// 6x6 input tile with 36 multiplies per input/output channel pair instead of 144.
//
//   y = A^T [ (G w G^T) . (B^T d B) ] A      per 4x4 output tile, summed over input channels
//
// Three stages, the middle one a batch of matrix products:
//   1. input transform (this file): x (N, H, W, C_in) channels-last -> V (36, G, T, C_in/G),
//      T = N * ceil(H/4) * ceil(W/4) tiles (or a range of them);
//   2. M[p, g] = V[p, g] @ U[p, g] for the 36 * G pairs, U (36, G, C_in/G, C_out/G) the
//      transformed weight (G w G^T, made once per weight; see winograd_f43_weight_cpu):
//      conv3x3_winograd_products_cpu or any batched GEMM;
//   3. output transform (this file): M (36, G, T, C_out/G) -> y (N, H, W, C_out), with
//      y = gamma * act(conv + bias) fused (act optional), rows and columns past H, W dropped.
// The weight gradient runs the same algebra backwards (declared below). float32 only; the
// rounding differs from a direct convolution (the transforms add and scale by up to 5 / 8):
// about 10x a direct float32 conv's relative error (~2e-6).
// Same conventions as kernels.h: a params struct of raw pointers, sizes and strides (in
// elements), a Status result.
#pragma once

#include <cstdint>

#include "flamingo_rt/kernels.h"

namespace flamingo_rt {

constexpr int kWinogradTile = 4;     // output tile edge (F(4x4, 3x3))
constexpr int kWinogradPoints = 36;  // 6x6 transform points

// Tiles along an edge of `size` pixels: ceil(size / 4).
inline int64_t winograd_tiles(int64_t size) { return (size + kWinogradTile - 1) / kWinogradTile; }

struct Conv3x3WinogradParams {
  DType dtype = DType::kFloat32;  // float32 only
  int64_t n = 0, h = 0, w = 0;    // batch and spatial size (input and output)
  int64_t c_in = 0, c_out = 0, groups = 1;
  // x: (n, h, w, c_in) with unit channel stride; strides of n, h, w in elements
  const void* x = nullptr;
  int64_t sx_n = 0, sx_h = 0, sx_w = 0;
  // The tiles this call transforms: tile_begin, tile_begin + 1, ..., of the n * winograd_tiles(h)
  // * winograd_tiles(w) tiles (image-major, then tile row, tile column); tile_count < 0: all
  // from tile_begin on. A caller bounds the size of V and M (and keeps them in cache) by running
  // the three stages over successive ranges.
  int64_t tile_begin = 0, tile_count = -1;
  // V: (36, groups, tiles, c_in / groups) contiguous, `tiles` the number of tiles of the range
  void* v = nullptr;
  // M: (36, groups, tiles, c_out / groups) contiguous (written by stage 2, read by stage 3)
  void* m = nullptr;
  // U: (36, groups, c_in / groups, c_out / groups) contiguous (stage 2 only)
  const void* u = nullptr;
  const void* bias = nullptr;  // (c_out,) or null
  bool has_act = false;        // y = gamma * act(conv + bias) when set, else gamma * (conv + bias)
  Act act = Act::kGelu;
  double gamma = 1.0;
  // y: (n, h, w, c_out) with unit channel stride; strides of n, h, w in elements
  void* y = nullptr;
  int64_t sy_n = 0, sy_h = 0, sy_w = 0;
  // Weight gradient only. dy: the output's gradient (n, h, w, c_out), unit channel stride;
  // du: dL/dU (36, groups, c_in / groups, c_out / groups) float32, overwritten by the range's
  // sum, or with du_accumulate added to (the first range of a call writes, the others add)
  const void* dy = nullptr;
  int64_t sdy_n = 0, sdy_h = 0, sdy_w = 0;
  void* du = nullptr;
  bool du_accumulate = false;
};

// Stage 1: x -> V. Needs x, v and the sizes.
Status conv3x3_winograd_input_cpu(const Conv3x3WinogradParams& p);
// Stage 2: M[p, g] = V[p, g] @ U[p, g] for the range's tiles, float32 products with float32
// accumulation. Register-blocked AVX-512 kernels where conv3x3_winograd_products_vectorized(p)
// (an AVX-512 CPU and c_out / groups a multiple of 16), a plain loop otherwise (a caller with
// a BLAS should use its batched product there instead).
Status conv3x3_winograd_products_cpu(const Conv3x3WinogradParams& p);
bool conv3x3_winograd_products_vectorized(const Conv3x3WinogradParams& p);
// Stage 3: M -> y (bias, activation, gamma fused). Needs m, y, the sizes and the tail.
Status conv3x3_winograd_output_cpu(const Conv3x3WinogradParams& p);

// The weight gradient, from the same algebra read backwards (y = A^T [U . V] A per tile):
//   dL/dU[p, g] = sum over tiles of V[p, g]^T @ Yg[p, g],   Yg = A dy A^T (4x4 -> 6x6 per tile)
//   dL/dw = G^T (dL/dU) G                                  (6x6 -> 3x3 per channel pair)
// Over successive tile ranges: stage 1 (x -> V), conv3x3_winograd_grad_output_transform_cpu
// (dy -> Yg, written to m), conv3x3_winograd_weight_grad_products_cpu (du = V^T @ Yg for the
// first range, du += V^T @ Yg with du_accumulate for the others), then
// winograd_f43_weight_grad_cpu (du -> dw).
Status conv3x3_winograd_grad_output_transform_cpu(const Conv3x3WinogradParams& p);
Status conv3x3_winograd_weight_grad_products_cpu(const Conv3x3WinogradParams& p);
// dw (c_out, c_in/groups, 3, 3) contiguous from du (36, groups, c_in/groups, c_out/groups):
// float32 math on AVX-512 CPUs where c_out/groups is a multiple of 16, float64 elsewhere.
Status winograd_f43_weight_grad_cpu(const float* du, int64_t c_out, int64_t c_in_per_group, int64_t groups,
                                    float* dw);
// The last range's products and the inverse transform in one stage: bit for bit
// conv3x3_winograd_weight_grad_products_cpu(p) then winograd_f43_weight_grad_cpu(p.du, ...),
// but each task (a group, a block of its input channels) forms its rows of du for the 36
// points in a per-thread buffer (with du_accumulate: starting from p.du's sums of the earlier
// ranges) and turns them straight into dw, so du is neither written nor read back (for a
// 768 x 128 x 3 x 3 weight it is 14 MB; the separate inverse pass took 0.7-1 ms of a 14x14
// or 7x7 map's 1.5-5 ms gradient). Needs v, m, dw, and du when du_accumulate.
Status conv3x3_winograd_weight_grad_last_cpu(const Conv3x3WinogradParams& p, float* dw);

// The transformed weight U (36, groups, c_in/groups, c_out/groups) of w (c_out, c_in/groups,
// 3, 3) (contiguous), computed in float64 and rounded once to float32. flipped_transposed:
// instead the transformed weight of the input gradient's convolution (each group's in and
// out channels swapped, every kernel flipped): U' (36, groups, c_out/groups, c_in/groups).
Status winograd_f43_weight_cpu(const float* w, int64_t c_out, int64_t c_in_per_group,
                               int64_t groups, float* u, bool flipped_transposed = false);

}  // namespace flamingo_rt
