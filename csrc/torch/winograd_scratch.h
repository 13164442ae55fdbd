// Shared by the Winograd convolutions' bindings (conv3x3_winograd_ops.cpp, float32, and
// conv3x3_winograd_bf16_ops.cpp, bfloat16): the per-thread scratch for their transforms and
// the choice of tiles per chunk.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

namespace flamingo_rt {
namespace torch_ops {

// The calling thread's scratch of at least `bytes` bytes (uint8, 64-byte aligned like every CPU
// tensor): one buffer per thread shared by every Winograd op (float32 and bfloat16, forward and
// weight gradient: they never run nested), grown to the largest size met and kept, so no call
// pays page faults for its transforms (fresh buffers made dm_nfnet_f0's convolutions up to 2x
// slower inside the model). A multiple of 64 bytes, so it can be viewed as float32.
inline const at::Tensor& winograd_scratch(int64_t bytes) {
  static thread_local at::Tensor ws;
  bytes = (bytes + 63) / 64 * 64;
  if (!ws.defined() || ws.numel() < bytes) ws = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
  return ws;
}

// `n` bytes rounded up to whole 64-byte lines (offsets of the scratch's parts stay aligned).
inline int64_t winograd_lines(int64_t n) { return (n + 63) / 64 * 64; }

// Tiles per chunk of T tiles whose transforms take tile_bytes a tile: chunk_tiles when the
// caller gives one (> 0), else about chunk_bytes of them but at least min_tiles (each product
// has that many rows: fewer run far below the kernel's peak); at most T.
inline int64_t winograd_chunk_tiles(int64_t T, int64_t tile_bytes, int64_t chunk_bytes, int64_t min_tiles,
                                    int64_t chunk_tiles) {
  return std::min<int64_t>(T, chunk_tiles > 0 ? chunk_tiles : std::max<int64_t>(min_tiles, chunk_bytes / tile_bytes));
}

// `chunk` tiles nudged up by `step` tiles (at most 8 times, never past T) until no
// part of the chunk's transforms has its points a multiple of 4 KiB apart: a part whose points
// take `row_bytes` a tile (e.g. groups * C_in/groups * 2 for bf16 V in (points, groups, tiles,
// channels)) has them chunk * row_bytes apart, and at a multiple of 4 KiB each tile's points
// share one L1 set (and few L2 sets), which the transforms' stores thrash. Measured on
// dm_nfnet_f0's bf16 convs (2-core Zen 4), forward at 14x14 96 -> 98 tiles 1.91 -> 1.76 ms, at
// 28x28 2.60 -> 2.40, at 56x56 256 -> 258 tiles 5.22 -> 4.84 ms. A chunk given by the caller is
// theirs: callers apply this to the one they choose. winograd_aliased: whether chunk is such a one.
inline bool winograd_aliased(int64_t chunk, std::initializer_list<int64_t> row_bytes) {
  for (int64_t b : row_bytes)
    if ((chunk * b) % 4096 == 0) return true;
  return false;
}
inline int64_t winograd_unaliased_chunk(int64_t chunk, int64_t T, int64_t step, std::initializer_list<int64_t> row_bytes) {
  for (int i = 0; i < 8 && winograd_aliased(chunk, row_bytes); ++i) {
    if (chunk + step > T) break;
    chunk += step;
  }
  return chunk;
}

// Tiles per chunk for a weight gradient, whose ranges but the last each add a pass over
// dL/dU (du_bytes, read and written; the last range's products go straight to dw): the
// chunk's transforms take at least 4 MiB and twice du_bytes, so that pass costs at most half
// of what the transforms move; where twice du_bytes exceeds all tiles' transforms, one range
// takes them all and no dL/dU is made (dm_nfnet_f0's bf16 14x14 convs: 6 MiB). Measured on F0's gradients (2-core Zen 4, old / new ms):
// bf16 14x14 2.01 / 1.75, 28x28 2.45 / 2.33, 56x56 4.83 / 4.56; float32 28x28 2.87 / 2.71,
// 56x56 5.63 / 5.35 (2 MiB chunks before).
inline int64_t winograd_weight_grad_chunk_tiles(int64_t T, int64_t tile_bytes, int64_t du_bytes, int64_t min_tiles,
                                                int64_t chunk_tiles) {
  const int64_t chunk_bytes = std::max<int64_t>(int64_t(4) << 20, 2 * du_bytes);
  return winograd_chunk_tiles(T, tile_bytes, chunk_bytes, min_tiles, chunk_tiles);
}

}  // namespace torch_ops
}  // namespace flamingo_rt
