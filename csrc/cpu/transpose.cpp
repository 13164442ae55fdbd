// Transposed copy of a matrix in tiles: see csrc/include/flamingo_rt/transpose.h.
//
// Each task copies one 64 x 64 tile: reads src rows of the tile (unit stride when the source
// is row-major), writes dst rows of the tile (always unit stride), so each cache line and
// page is touched once per tile instead of once per element. The element type only matters
// by its size (bits are copied), so one template per size.
#include <cstring>

#include "cpu_math.h"
#include "flamingo_rt/kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace flamingo_rt {
namespace {

constexpr int64_t kTile = 64;

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
#pragma omp parallel for schedule(static) if (par)
  for (int64_t t = 0; t < ntile; ++t) {
    const int64_t r0 = (t / tc) * kTile, c0 = (t % tc) * kTile;
    const int64_t r1 = r0 + kTile < p.R ? r0 + kTile : p.R, c1 = c0 + kTile < p.C ? c0 + kTile : p.C;
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
