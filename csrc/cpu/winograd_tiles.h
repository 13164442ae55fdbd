// Tile ranges and task loops shared by the CPU Winograd convolutions (internal; not a public
// header): conv3x3_winograd.cpp (F(4x4, 3x3), float32) and conv3x3_winograd_bf16.cpp
// (F(2x2, 3x3), bfloat16). Tiles are numbered image-major, then tile row, tile column; a call
// works on a range of them.
#pragma once

#include <algorithm>
#include <cstdint>

namespace flamingo_rt {
namespace cpu {

// The number of tiles of the range [begin, begin + count) of `all` tiles (count < 0: to the
// end), or -1 when the range is not inside them.
inline int64_t range_tile_count(int64_t all, int64_t begin, int64_t count) {
  if (begin < 0 || begin > all) return -1;
  if (count < 0) return all - begin;
  return begin + count <= all ? count : -1;
}

// Image and top-left output pixel of tile `a` (counted from the first tile of the batch) of
// TILE x TILE output tiles over h x w images.
template <int TILE>
inline void tile_origin(int64_t h, int64_t w, int64_t a, int64_t* img, int64_t* y0, int64_t* x0) {
  const int64_t th = (h + TILE - 1) / TILE, tw = (w + TILE - 1) / TILE;
  const int64_t rem = a % (th * tw);
  *img = a / (th * tw);
  *y0 = (rem / tw) * TILE;
  *x0 = (rem % tw) * TILE;
}

// fn(t, img, y0, x0) for every tile t of the range of `tiles` tiles starting at tile_begin (t
// counted from the range's start; img, y0, x0 its image and top-left output pixel plus
// origin_offset), over OpenMP threads.
template <int TILE, class Fn>
void for_each_tile(int64_t h, int64_t w, int64_t tile_begin, int64_t tiles, int64_t origin_offset, Fn fn) {
#pragma omp parallel for schedule(static) if (tiles > 1)
  for (int64_t t = 0; t < tiles; ++t) {
    int64_t img, y0, x0;
    tile_origin<TILE>(h, w, tile_begin + t, &img, &y0, &x0);
    fn(t, img, y0 + origin_offset, x0 + origin_offset);
  }
}

// fn(pg, r0, n) for every (point, group) pair pg of `pairs` and block [r0, r0 + n) of 48 of a
// product's `rows` result rows (whole register blocks of 6), over OpenMP threads; each task's
// sums run in one fixed order (deterministic).
template <class Fn>
void for_each_product_task(int64_t pairs, int64_t rows, Fn fn) {
  constexpr int64_t kRowsPerTask = 48;
  const int64_t blocks = (rows + kRowsPerTask - 1) / kRowsPerTask;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t pg = 0; pg < pairs; ++pg)
    for (int64_t rb = 0; rb < blocks; ++rb)
      fn(pg, rb * kRowsPerTask, std::min(kRowsPerTask, rows - rb * kRowsPerTask));
}

}  // namespace cpu
}  // namespace flamingo_rt
