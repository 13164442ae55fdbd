// flamingo_rt bfloat16 Winograd convolution (C++17, no torch): a 3x3, stride-1 convolution
// with one pixel of zero padding on every side (SAME for stride 1), grouped or not, on
// bfloat16 activations, computed as Winograd's minimal filtering F(2x2, 3x3): each 2x2
// output tile from a 4x4 input tile with 16 multiplies per input/output channel pair instead
// of 36 (2.25x fewer), the products on bfloat16 operands with float32 accumulation
// (AVX-512 BF16 `vdpbf16ps` where the CPU has it).
//
//   y = A^T [ (G w G^T) . (B^T d B) ] A      per 2x2 output tile, summed over input channels
//
// Why F(2x2, 3x3) and not F(4x4, 3x3) as in conv3x3_winograd.h: with bfloat16 operands the
// larger transform's coefficients (up to 5 and 8) amplify the operands' rounding (8-bit
// mantissas): measured on dm_nfnet_f0's bfloat16 features, F(4x4, 3x3) 4.4e-2 relative error
// against float64, F(3x3, 3x3) 3.3e-2, F(2x2, 3x3) 2.1e-2, oneDNN's direct bf16 convs 1.9e-2.
// The transforms of F(2x2, 3x3) only add and subtract (B^T, A^T) or halve (G), so V is the
// input's sums rounded once to bfloat16 and U the weight's rounded once.
//
// Three stages, the middle one a batch of matrix products (as conv3x3_winograd.h):
//   1. input transform: x (N, H, W, C_in) bfloat16 channels-last -> V (16, G, T, C_in/G)
//      bfloat16, T = N * ceil(H/2) * ceil(W/2) tiles (or a range of them);
//   2. M[p, g] = V[p, g] @ U[p, g] for the 16 * G pairs, float32 accumulation; U the
//      transformed weight in pairs of input channels: (16, G, C_in/G/2, C_out/G, 2) bfloat16
//      (element [p, g, k, o, e] = (G w G^T)[p] of output channel o, input channel 2k + e),
//      the layout `vdpbf16ps` multiplies (winograd_f23_weight_bf16_cpu makes it);
//   3. output transform: M (16, G, T, C_out/G) float32 -> y (N, H, W, C_out) bfloat16 with
//      y = gamma * act(conv + bias) fused in float32, rounded once.
// C_in/G must be even (the products take input channels in pairs). Same conventions as
// kernels.h: a params struct of raw pointers, sizes and strides (in elements), a Status result.
#pragma once

#include <cstdint>

#include "flamingo_rt/kernels.h"

namespace flamingo_rt {

constexpr int kWinogradF23Tile = 2;     // output tile edge (F(2x2, 3x3))
constexpr int kWinogradF23Points = 16;  // 4x4 transform points

// Tiles along an edge of `size` pixels: ceil(size / 2).
inline int64_t winograd_f23_tiles(int64_t size) { return (size + kWinogradF23Tile - 1) / kWinogradF23Tile; }

struct Conv3x3WinogradBf16Params {
  int64_t n = 0, h = 0, w = 0;  // batch and spatial size (input and output)
  int64_t c_in = 0, c_out = 0, groups = 1;  // c_in / groups even
  // x: (n, h, w, c_in) bfloat16 (uint16_t storage) with unit channel stride; strides in elements
  const void* x = nullptr;
  int64_t sx_n = 0, sx_h = 0, sx_w = 0;
  // The tiles this call works on: tile_begin, ..., of the n * winograd_f23_tiles(h) *
  // winograd_f23_tiles(w) tiles (image-major, then tile row, tile column); tile_count < 0: all
  // from tile_begin on. Run the stages over successive ranges to keep V and M in cache.
  int64_t tile_begin = 0, tile_count = -1;
  void* v = nullptr;        // V: (16, groups, tiles, c_in / groups) bfloat16, contiguous
  void* m = nullptr;        // M: (16, groups, tiles, c_out / groups) float32, contiguous
  const void* u = nullptr;  // U: (16, groups, c_in / groups / 2, c_out / groups, 2) bfloat16
  const float* bias = nullptr;  // (c_out,) float32 or null
  bool has_act = false;         // y = gamma * act(conv + bias) when set, else gamma * (conv + bias)
  Act act = Act::kGelu;
  double gamma = 1.0;
  // y: (n, h, w, c_out) bfloat16 with unit channel stride; strides in elements
  void* y = nullptr;
  int64_t sy_n = 0, sy_h = 0, sy_w = 0;
  // Weight gradient only (see below). dy: the output's gradient (n, h, w, c_out) bfloat16, unit
  // channel stride; du: dL/dU (16, groups, c_in / groups, c_out / groups) float32, overwritten
  // by the range's sum, or with du_accumulate added to.
  const void* dy = nullptr;
  int64_t sdy_n = 0, sdy_h = 0, sdy_w = 0;
  float* du = nullptr;
  bool du_accumulate = false;
  // Run the portable code of every stage even where the CPU has AVX-512 BF16 (tests).
  bool portable = false;
};

// Stage 1: x -> V. Needs x, v and the sizes.
Status conv3x3_winograd_bf16_input_cpu(const Conv3x3WinogradBf16Params& p);
// Stage 2: M[p, g] = V[p, g] @ U[p, g] for the range's tiles. AVX-512 BF16 register-blocked
// kernels where conv3x3_winograd_bf16_products_vectorized(p) (the CPU has AVX-512 BF16 and
// c_out / groups is a multiple of 16), else (or with `plain`) a portable float32 loop over
// the same bfloat16 operands (the same sums up to the order of the float32 additions).
Status conv3x3_winograd_bf16_products_cpu(const Conv3x3WinogradBf16Params& p, bool plain = false);
bool conv3x3_winograd_bf16_products_vectorized(const Conv3x3WinogradBf16Params& p);
// Whether this CPU runs the AVX-512 BF16 products at all (whatever the shapes).
bool winograd_bf16_cpu_supported();
// Stage 3: M -> y (bias, activation, gamma fused). Needs m, y and the sizes.
Status conv3x3_winograd_bf16_output_cpu(const Conv3x3WinogradBf16Params& p);

// The weight gradient, from the same algebra read backwards (y = A^T [U . V] A per tile):
//   dL/dU[p, g] = sum over tiles of V[p, g]^T @ Yg[p, g],   Yg = A dy A^T (2x2 -> 4x4 per tile)
//   dL/dw = G^T (dL/dU) G                                  (4x4 -> 3x3 per channel pair)
// the products on bfloat16 V and Yg (each rounded once) with float32 sums, so their operands
// come in pairs of tiles: Vp (16, groups, ceil(tiles / 2), c_in / groups, 2) and Yp (16, groups,
// ceil(tiles / 2), c_out / groups, 2) (element [p, g, q, c, e] of tile 2q + e; an odd range's
// last pair padded with zeros), in v and m. Over successive tile ranges of even length (but
// the last): conv3x3_winograd_bf16_input_pairs_cpu (x -> Vp), ..._grad_output_pairs_cpu
// (dy -> Yp), ..._weight_grad_products_cpu (du = Vp^T Yp, or du += with du_accumulate),
// then winograd_f23_weight_grad_cpu (du -> dw).
Status conv3x3_winograd_bf16_input_pairs_cpu(const Conv3x3WinogradBf16Params& p);
Status conv3x3_winograd_bf16_grad_output_pairs_cpu(const Conv3x3WinogradBf16Params& p);
// AVX-512 BF16 kernels where the CPU has them and c_out / groups is a multiple of 16 (else, or
// with `plain`, a portable loop).
Status conv3x3_winograd_bf16_weight_grad_products_cpu(const Conv3x3WinogradBf16Params& p, bool plain = false);
// dw (c_out, c_in/groups, 3, 3) float32 contiguous from du (16, groups, c_in/groups, c_out/groups)
// float32: float32 math on AVX-512 BF16 CPUs where c_out/groups is a multiple of 16 (whatever
// `portable`), float64 elsewhere. The uint16_t overload writes dw in bfloat16 (the float32 value rounded to
// nearest even: the bits of the float32 result cast, without its pass over memory).
Status winograd_f23_weight_grad_cpu(const float* du, int64_t c_out, int64_t c_in_per_group, int64_t groups,
                                    float* dw);
Status winograd_f23_weight_grad_cpu(const float* du, int64_t c_out, int64_t c_in_per_group, int64_t groups,
                                    uint16_t* dw);
// The last range's products and the inverse transform in one stage: bit for bit
// conv3x3_winograd_bf16_weight_grad_products_cpu(p, plain) then winograd_f23_weight_grad_cpu
// (p.du, ...), but each task (a group, a block of its input channels) forms its rows of du for
// the 16 points in a per-thread buffer (with du_accumulate: starting from p.du's sums of the
// earlier ranges) and turns them straight into dw (float32, or bfloat16 rounded to nearest
// even), so du is neither written nor read back. Needs v, m, dw, and du when du_accumulate.
Status conv3x3_winograd_bf16_weight_grad_last_cpu(const Conv3x3WinogradBf16Params& p, float* dw, bool plain = false);
Status conv3x3_winograd_bf16_weight_grad_last_cpu(const Conv3x3WinogradBf16Params& p, uint16_t* dw,
                                                  bool plain = false);

// The transformed weight U (16, groups, c_in/groups/2, c_out/groups, 2) bfloat16 (uint16_t)
// of w (c_out, c_in/groups, 3, 3) float32 contiguous: G w G^T in float64, rounded once to
// bfloat16 (nearest even). c_in/groups must be even. flipped_transposed: instead U' of the
// input gradient's convolution (dx = conv3x3(dy, w') with each group's in and out channels
// swapped and every kernel flipped): (16, groups, c_out/groups/2, c_in/groups, 2), c_out/groups even.
Status winograd_f23_weight_bf16_cpu(const float* w, int64_t c_out, int64_t c_in_per_group, int64_t groups,
                                    uint16_t* u, bool flipped_transposed = false);
// The same for a bfloat16 weight (uint16_t storage).
Status winograd_f23_weight_bf16_cpu(const uint16_t* w, int64_t c_out, int64_t c_in_per_group, int64_t groups,
                                    uint16_t* u, bool flipped_transposed = false);

// U' (the flipped_transposed weight above) from U itself, bitwise the same as transforming
// again: flipping a kernel's rows reverses G's columns, which for F(2x2, 3x3) only swaps
// G's first and last rows, so U'[p'] is U[p] with points 0 and 3 swapped along each axis
// (p = 4 r + c -> 4 s(r) + s(c), s = (3, 1, 2, 0)) and each group's channel matrix
// transposed (re-paired along the other channels). u (16, groups, k_in/2, k_out, 2) ->
// ut (16, groups, k_out/2, k_in, 2); k_in and k_out even. A transpose of 16-bit pairs:
// ~4x faster than the transform (which rounds 16 float64 values per kernel).
Status winograd_f23_weight_bf16_transpose_cpu(const uint16_t* u, int64_t k_in, int64_t k_out, int64_t groups,
                                              uint16_t* ut);

}  // namespace flamingo_rt
