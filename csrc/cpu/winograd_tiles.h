// Tile ranges and task loops shared by the CPU Winograd convolutions (internal; not a public
// header): conv3x3_winograd.cpp (F(4x4, 3x3), float32) and conv3x3_winograd_bf16.cpp
// (F(2x2, 3x3), bfloat16). Tiles are numbered image-major, then tile row, tile column; a call
// works on a range of them.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

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

// The fused last stage of a Winograd weight gradient (products and the inverse transform, see
// conv3x3_winograd_weight_grad_last_cpu): tasks (group g, block of input channels [r0, r0 +
// rows)) over OpenMP threads. For each of the POINTS points, product(g, pt, r0, rows, C) writes
// the block's rows x cog sums of dU at C (row stride cog); then row(du0, ps, taps0, rows * 9)
// turns each row's points (du0 + pt * ps) into its cog kernels at taps0 + o * rows * 9, and
// the (cog, rows, 9) block is copied into dw (c_out, cg, 3, 3) of T, one run per channel.
// Blocks: up to 48 rows, a multiple of the products' 6-row register block, at least two tasks
// a thread (a task re-reads every point's Yg, so blocks are large: 18, 24, 32 and 48 rows
// measured on a 768 x 128 x 3 x 3 gradient at 14 x 14 and 7 x 7). The per-thread buffer's
// point stride ps is one cache line longer than a point's rows: 48 x 128 floats is a multiple
// of 4 KB, and with every point of a column in one L1 set the inverse ran at a third of its
// speed.
template <int POINTS, class T, class Product, class Row>
void weight_grad_blocks(int64_t groups, int64_t cg, int64_t cog, T* dw, Product product, Row row) {
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  int64_t blocks = std::max<int64_t>((cg + 47) / 48, (2 * threads + groups - 1) / groups);
  const int64_t rows_max = std::min(((cg + blocks - 1) / blocks + 5) / 6 * 6, cg);
  blocks = (cg + rows_max - 1) / rows_max;
  const int64_t ps = rows_max * cog + 16;
  const int64_t taps_floats = (cog * rows_max * 9 * int64_t(sizeof(T)) + 3) / 4;
  const int64_t buf_size = POINTS * ps + taps_floats;
#pragma omp parallel
  {
    static thread_local std::vector<float> buf;
    if (int64_t(buf.size()) < buf_size) buf.resize(size_t(buf_size));
    T* taps = reinterpret_cast<T*>(buf.data() + POINTS * ps);
#pragma omp for collapse(2) schedule(static)
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t rb = 0; rb < blocks; ++rb) {
        const int64_t r0 = rb * rows_max, rows = std::min(rows_max, cg - r0);
        for (int pt = 0; pt < POINTS; ++pt) product(g, pt, r0, rows, buf.data() + pt * ps);
        for (int64_t r = 0; r < rows; ++r) row(buf.data() + r * cog, ps, taps + r * 9, rows * 9);
        for (int64_t o = 0; o < cog; ++o)
          std::memcpy(dw + ((g * cog + o) * cg + r0) * 9, taps + o * rows * 9, size_t(rows * 9) * sizeof(T));
      }
  }
}

}  // namespace cpu
}  // namespace flamingo_rt
