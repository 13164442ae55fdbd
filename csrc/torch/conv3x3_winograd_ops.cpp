// torch ops over the Winograd convolution (csrc/cpu/conv3x3_winograd.cpp):
//
//   flamingo_rt_C::conv3x3_winograd_weight(Tensor w, int groups, bool transposed=False) -> Tensor
//       # w (C_out, C_in/groups, 3, 3) float32 -> U (36 * groups, C_in/groups, C_out/groups);
//       # transposed: U' (36 * groups, C_out/groups, C_in/groups) of the input gradient's
//       # convolution (in / out channels swapped per group, kernels flipped)
//   flamingo_rt_C::conv3x3_winograd(Tensor x, Tensor u, Tensor? bias, int groups, str act,
//                                   float gamma) -> Tensor
//       # gamma * act(conv3x3(x, w, padding=1) + bias), act "none" | "gelu" | "relu" | "silu";
//       # x (N, C_in, H, W) float32, any layout (channels-last is read in place, anything else
//       # is made channels-last first); the result (N, C_out, H, W) channels-last.
//       # chunk_tiles: tiles per chunk (0: about 2 MiB of V and M, at least 64 tiles);
//       # products: "auto" (our AVX-512 kernels where they run, else at::bmm), "ours", "blas"
//   flamingo_rt_C::conv3x3_winograd_weight_grad(Tensor x, Tensor dy, int groups, int chunk_tiles=0,
//                                               str products='auto')
//       -> Tensor  # dL/dw (C_out, C_in/groups, 3, 3) of that convolution (no bias) for dy;
//       # chunk_tiles 0: at least 4 MiB of transforms and twice dL/dU's size, at least 64 tiles
//
// The convolution is the header's three stages over chunks of tiles: the input transform into
// V, the 36 * groups products M = V @ U of (tiles, C_in/groups) by (C_in/groups, C_out/groups)
// (conv3x3_winograd_products_cpu, or at::bmm: torch's BLAS, on CPUs without AVX-512), the
// output transform with the tail fused. CPU only, float32,
// no autograd here (flamingo_rt.ops.winograd_conv wires it); fakes in flamingo_rt/_cpp_fakes.py.
#include <torch/library.h>

#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <string>

#include "common.h"
#include "flamingo_rt/conv3x3_winograd.h"
#include "winograd_scratch.h"

namespace flamingo_rt {
namespace torch_ops {
namespace {

constexpr const char* kWino = "flamingo_rt_C::conv3x3_winograd";
constexpr const char* kWinoW = "flamingo_rt_C::conv3x3_winograd_weight";
// Tiles per chunk when the caller leaves it to us: V and M of a chunk take about kChunkBytes,
// but a chunk has at least kMinChunkTiles tiles (its products have that many rows: fewer run
// far below the GEMM's peak). Measured on dm_nfnet_f0's 3x3 convs (2-core Zen 4): whole-tensor
// V and M (up to 29 MiB) made the 56x56 convs no faster than oneDNN's direct ones; 2 MiB
// chunks 2.2-2.5x faster; 1 MiB chunks of fewer than 64 tiles lost on the 14x14 convs.
constexpr int64_t kChunkBytes = int64_t(2) << 20;
constexpr int64_t kMinChunkTiles = 64;

// Tiles per chunk of T tiles whose V and M (or Yg) rows take P * (cg + cog) floats a tile;
// chunk_tiles > 0: the caller's.
int64_t chunk_size(int64_t T, int64_t P, int64_t cg, int64_t cog, int64_t chunk_tiles) {
  return winograd_chunk_tiles(T, P * (cg + cog) * int64_t(sizeof(float)), kChunkBytes, kMinChunkTiles, chunk_tiles);
}

// The calling thread's scratch (winograd_scratch) as at least `floats` float32 elements.
at::Tensor workspace(int64_t floats) { return winograd_scratch(floats * int64_t(sizeof(float))).view(at::kFloat); }

// Whether our products run: `products` "ours", or "auto" where they are vectorized.
bool own_products(const char* op, c10::string_view products, const Conv3x3WinogradParams& p) {
  const std::string prod(products.data(), products.size());
  TORCH_CHECK(prod == "auto" || prod == "ours" || prod == "blas", op,
              ": expected products 'auto', 'ours' or 'blas', got '", prod, "'");
  return prod == "ours" || (prod == "auto" && conv3x3_winograd_products_vectorized(p));
}

at::Tensor winograd_weight_cpu_impl(const at::Tensor& w, int64_t groups, bool transposed) {
  TORCH_CHECK(groups >= 1, kWinoW, ": expected groups >= 1, got ", groups);
  TORCH_CHECK(w.dim() == 4 && w.size(2) == 3 && w.size(3) == 3, kWinoW,
              ": expected a weight of shape (C_out, C_in/groups, 3, 3), got ", w.sizes());
  TORCH_CHECK(w.size(0) % groups == 0, kWinoW, ": expected C_out ", w.size(0), " to be a multiple of groups ",
              groups);
  TORCH_CHECK(w.scalar_type() == at::kFloat, kWinoW, ": expected a float32 weight, got ", w.scalar_type());
  const at::Tensor wc = w.contiguous();
  const int64_t co = w.size(0), ci = w.size(1);
  at::Tensor u = transposed ? at::empty({kWinogradPoints * groups, co / groups, ci}, w.options())
                            : at::empty({kWinogradPoints * groups, ci, co / groups}, w.options());
  check_status(kWinoW, "CPU",
               winograd_f43_weight_cpu(wc.data_ptr<float>(), co, ci, groups, u.data_ptr<float>(), transposed));
  return u;
}

at::Tensor winograd_cpu_impl(const at::Tensor& x, const at::Tensor& u, const c10::optional<at::Tensor>& bias,
                             int64_t groups, c10::string_view act, double gamma, int64_t chunk_tiles,
                             c10::string_view products) {
  TORCH_CHECK(chunk_tiles >= 0, kWino, ": expected chunk_tiles >= 0 (0: chosen here), got ", chunk_tiles);
  TORCH_CHECK(x.dim() == 4, kWino, ": expected x of shape (N, C_in, H, W), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && u.scalar_type() == at::kFloat, kWino,
              ": expected float32 x and u, got ", x.scalar_type(), " and ", u.scalar_type());
  TORCH_CHECK(groups >= 1 && x.size(1) >= groups && x.size(1) % groups == 0, kWino, ": expected C_in ",
              x.size(1), " to be a positive multiple of groups ", groups);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), cg = C / groups;
  TORCH_CHECK(u.dim() == 3 && u.size(0) == kWinogradPoints * groups && u.size(1) == cg, kWino,
              ": expected u of shape (", kWinogradPoints * groups, ", ", cg,
              ", C_out/groups) (conv3x3_winograd_weight of the weight, groups ", groups, "), got ", u.sizes());
  const int64_t cog = u.size(2), CO = cog * groups;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == CO && bias->scalar_type() == at::kFloat, kWino,
                ": expected a float32 bias of shape (", CO, ",), got ", bias->scalar_type(), " ", bias->sizes());
  }
  const std::string a(act.data(), act.size());
  Conv3x3WinogradParams p;
  if (a != "none") {
    p.has_act = true;
    p.act = parse_act(kWino, act);
  }
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor y = at::empty({N, CO, H, W}, x.options(), at::MemoryFormat::ChannelsLast);
  const int64_t T = N * winograd_tiles(H) * winograd_tiles(W);
  p.n = N, p.h = H, p.w = W, p.c_in = C, p.c_out = CO, p.groups = groups;
  const bool ours = own_products(kWino, products, p);
  if (y.numel() == 0) return y;
  // V and M of a chunk of tiles (F0: at most ~14 MiB)
  const int64_t P = kWinogradPoints * groups;
  const int64_t chunk = chunk_size(T, P, cg, cog, chunk_tiles);
  const at::Tensor ws = workspace(P * chunk * (cg + cog));
  const at::Tensor v = ws.narrow(0, 0, P * chunk * cg);
  const at::Tensor m = ws.narrow(0, P * chunk * cg, P * chunk * cog);
  p.x = xc.data_ptr<float>();
  p.sx_n = xc.stride(0), p.sx_h = xc.stride(2), p.sx_w = xc.stride(3);
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  p.bias = bias.has_value() ? bc.data_ptr<float>() : nullptr;
  p.gamma = gamma;
  p.y = y.data_ptr<float>();
  p.sy_n = y.stride(0), p.sy_h = y.stride(2), p.sy_w = y.stride(3);
  const at::Tensor uc = u.contiguous();
  p.u = uc.data_ptr<float>();
  for (int64_t t0 = 0; t0 < T; t0 += chunk) {
    const int64_t n = std::min(chunk, T - t0);
    at::Tensor vc = v.narrow(0, 0, P * n * cg).view({P, n, cg});
    at::Tensor mc = m.narrow(0, 0, P * n * cog).view({P, n, cog});
    p.tile_begin = t0, p.tile_count = n;
    p.v = vc.data_ptr<float>();
    p.m = mc.data_ptr<float>();
    check_status(kWino, "CPU", conv3x3_winograd_input_cpu(p));
    if (ours) {
      check_status(kWino, "CPU", conv3x3_winograd_products_cpu(p));
    } else {
      at::bmm_out(mc, vc, uc);  // torch's BLAS
    }
    check_status(kWino, "CPU", conv3x3_winograd_output_cpu(p));
  }
  return y;
}

// dL/dw of y = conv3x3(x, w, padding 1, groups) for the output gradient dy: (C_out, C_in/groups,
// 3, 3) float32 contiguous.
at::Tensor winograd_weight_grad_cpu_impl(const at::Tensor& x, const at::Tensor& dy, int64_t groups,
                                         int64_t chunk_tiles, c10::string_view products) {
  constexpr const char* kOp = "flamingo_rt_C::conv3x3_winograd_weight_grad";
  TORCH_CHECK(x.dim() == 4 && dy.dim() == 4, kOp, ": expected x (N, C_in, H, W) and dy (N, C_out, H, W), got ",
              x.sizes(), " and ", dy.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && dy.scalar_type() == at::kFloat, kOp,
              ": expected float32 x and dy, got ", x.scalar_type(), " and ", dy.scalar_type());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), CO = dy.size(1);
  TORCH_CHECK(dy.size(0) == N && dy.size(2) == H && dy.size(3) == W, kOp, ": expected dy of shape (", N,
              ", C_out, ", H, ", ", W, ") for x of shape ", x.sizes(), ", got ", dy.sizes());
  TORCH_CHECK(groups >= 1 && C >= groups && C % groups == 0 && CO % groups == 0, kOp, ": expected C_in ", C,
              " and C_out ", CO, " to be positive multiples of groups ", groups);
  TORCH_CHECK(chunk_tiles >= 0, kOp, ": expected chunk_tiles >= 0 (0: chosen here), got ", chunk_tiles);
  const int64_t cg = C / groups, cog = CO / groups, P = kWinogradPoints * groups;
  Conv3x3WinogradParams p;
  p.n = N, p.h = H, p.w = W, p.c_in = C, p.c_out = CO, p.groups = groups;
  const bool ours = own_products(kOp, products, p);
  at::Tensor dw = at::empty({CO, cg, 3, 3}, x.options());
  const int64_t T = N * winograd_tiles(H) * winograd_tiles(W);
  if (T == 0) return dw.zero_();
  {  // (a scope: the workspace pointers below)
    const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor dyc = dy.contiguous(at::MemoryFormat::ChannelsLast);
    const int64_t chunk = winograd_weight_grad_chunk_tiles(T, P * (cg + cog) * int64_t(sizeof(float)),
                                                           P * cg * cog * int64_t(sizeof(float)), kMinChunkTiles,
                                                           chunk_tiles);
    // V, Yg and dL/dU (F0: at most ~14 MiB; no dL/dU when our products take all tiles in one
    // range: their last range goes straight to dw)
    const bool need_du = !ours || chunk < T;
    const at::Tensor ws = workspace(P * chunk * (cg + cog) + (need_du ? P * cg * cog : 0));
    p.x = xc.data_ptr<float>();
    p.sx_n = xc.stride(0), p.sx_h = xc.stride(2), p.sx_w = xc.stride(3);
    p.dy = dyc.data_ptr<float>();
    p.sdy_n = dyc.stride(0), p.sdy_h = dyc.stride(2), p.sdy_w = dyc.stride(3);
    p.v = ws.data_ptr<float>();
    p.m = ws.data_ptr<float>() + P * chunk * cg;
    p.du = need_du ? ws.data_ptr<float>() + P * chunk * (cg + cog) : nullptr;
    for (int64_t t0 = 0; t0 < T; t0 += chunk) {
      const int64_t n = std::min(chunk, T - t0);
      p.tile_begin = t0, p.tile_count = n;
      p.du_accumulate = t0 > 0;
      check_status(kOp, "CPU", conv3x3_winograd_input_cpu(p));
      check_status(kOp, "CPU", conv3x3_winograd_grad_output_transform_cpu(p));
      if (ours && t0 + n == T) {  // the last range: products and the inverse transform into dw
        check_status(kOp, "CPU", conv3x3_winograd_weight_grad_last_cpu(p, dw.data_ptr<float>()));
      } else if (ours) {
        check_status(kOp, "CPU", conv3x3_winograd_weight_grad_products_cpu(p));
      } else {  // torch's BLAS: du (+)= V^T @ Yg
        at::Tensor du = ws.narrow(0, P * chunk * (cg + cog), P * cg * cog).view({P, cg, cog});
        const at::Tensor vt = ws.narrow(0, 0, P * n * cg).view({P, n, cg}).transpose(1, 2);
        const at::Tensor yg = ws.narrow(0, P * chunk * cg, P * n * cog).view({P, n, cog});
        if (t0 == 0) {
          at::bmm_out(du, vt, yg);
        } else {
          du.baddbmm_(vt, yg);
        }
      }
    }
    if (!ours)
      check_status(kOp, "CPU", winograd_f43_weight_grad_cpu(static_cast<const float*>(p.du), CO, cg, groups,
                                                           dw.data_ptr<float>()));
  }
  return dw;
}

}  // namespace
}  // namespace torch_ops
}  // namespace flamingo_rt

TORCH_LIBRARY_FRAGMENT(flamingo_rt_C, m) {
  m.def("conv3x3_winograd_weight(Tensor w, int groups, bool transposed=False) -> Tensor");
  m.def("conv3x3_winograd(Tensor x, Tensor u, Tensor? bias, int groups, str act, float gamma, "
        "int chunk_tiles=0, str products='auto') -> Tensor");
  m.def("conv3x3_winograd_weight_grad(Tensor x, Tensor dy, int groups, int chunk_tiles=0, "
        "str products='auto') -> Tensor");
}

TORCH_LIBRARY_IMPL(flamingo_rt_C, CPU, m) {
  m.impl("conv3x3_winograd_weight", &flamingo_rt::torch_ops::winograd_weight_cpu_impl);
  m.impl("conv3x3_winograd", &flamingo_rt::torch_ops::winograd_cpu_impl);
  m.impl("conv3x3_winograd_weight_grad", &flamingo_rt::torch_ops::winograd_weight_grad_cpu_impl);
}
