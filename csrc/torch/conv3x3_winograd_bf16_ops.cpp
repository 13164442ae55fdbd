// torch ops over the bfloat16 F(2x2, 3x3) Winograd convolution (csrc/cpu/conv3x3_winograd_bf16.cpp):
//
//   flamingo_rt_C::conv3x3_winograd_bf16_weight(Tensor w, int groups, bool transposed=False) -> Tensor
//       # w (C_out, C_in/groups, 3, 3) float32 or bfloat16 -> U (16 * groups, C_in/groups/2,
//       # C_out/groups, 2) bfloat16: G w G^T in float64, rounded once, input channels in pairs;
//       # transposed: U' (16 * groups, C_out/groups/2, C_in/groups, 2) of the input gradient's
//       # convolution (in / out channels swapped per group, kernels flipped)
//   flamingo_rt_C::conv3x3_winograd_bf16(Tensor x, Tensor u, Tensor? bias, int groups, str act,
//                                        float gamma, int chunk_tiles=0, str products='auto') -> Tensor
//       # gamma * act(conv3x3(x, w, padding=1) + bias), act "none" | "gelu" | "relu" | "silu";
//       # x (N, C_in, H, W) bfloat16, any layout (channels-last is read in place); bias float32 or
//       # bfloat16; the result (N, C_out, H, W) bfloat16 channels-last.
//       # chunk_tiles: 2x2 tiles per chunk (0: chosen here); products: "auto" (AVX-512 BF16 where
//       # the CPU has it and C_out/groups is a multiple of 16, else the portable loop), "ours"
//       # (the same), "plain" (the portable code of every stage: for tests)
//   flamingo_rt_C::conv3x3_winograd_bf16_weight_grad(Tensor x, Tensor dy, int groups, int chunk_tiles=0,
//                                                    str products='auto') -> Tensor
//       # dL/dw (C_out, C_in/groups, 3, 3) float32 of that convolution (no bias) for dy, x and dy
//       # bfloat16 (N, C, H, W) any layout: the products on bfloat16 transforms, float32 sums
//   flamingo_rt_C::winograd_bf16_cpu_supported() -> bool   # the CPU runs the AVX-512 BF16 products
//
// CPU only, no autograd (inference: flamingo_rt.ops.winograd_conv wires it into the frozen
// NFNet); fakes in flamingo_rt/_cpp_fakes.py.
#include <torch/library.h>

#include <ATen/ops/empty.h>

#include <algorithm>
#include <string>
#include <vector>

#include "common.h"
#include "flamingo_rt/conv3x3_winograd_bf16.h"
#include "winograd_scratch.h"

namespace flamingo_rt {
namespace torch_ops {
namespace {

constexpr const char* kOp = "flamingo_rt_C::conv3x3_winograd_bf16";
constexpr const char* kOpW = "flamingo_rt_C::conv3x3_winograd_bf16_weight";

// Tiles per chunk when the caller leaves it to us: V (bf16) and M (float32) of a chunk take
// about kChunkBytes, with at least kMinChunkTiles tiles (rows of each product).
constexpr int64_t kChunkBytes = int64_t(2) << 20;
constexpr int64_t kMinChunkTiles = 96;

at::Tensor weight_impl(const at::Tensor& w, int64_t groups, bool transposed) {
  TORCH_CHECK(groups >= 1, kOpW, ": expected groups >= 1, got ", groups);
  TORCH_CHECK(w.dim() == 4 && w.size(2) == 3 && w.size(3) == 3, kOpW,
              ": expected a weight of shape (C_out, C_in/groups, 3, 3), got ", w.sizes());
  TORCH_CHECK(w.size(0) % groups == 0, kOpW, ": expected C_out ", w.size(0), " to be a multiple of groups ", groups);
  const int64_t co = w.size(0), ci = w.size(1), paired = transposed ? co / groups : ci;
  TORCH_CHECK(paired % 2 == 0, kOpW, ": expected an even ", transposed ? "C_out/groups" : "C_in/groups",
              " (the products take the convolution's input channels in pairs), got ", paired);
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, kOpW,
              ": expected a float32 or bfloat16 weight, got ", w.scalar_type());
  const at::Tensor wc = w.contiguous();
  const int64_t k_out = transposed ? ci : co / groups;
  at::Tensor u = at::empty({kWinogradF23Points * groups, paired / 2, k_out, 2}, w.options().dtype(at::kBFloat16));
  uint16_t* up = reinterpret_cast<uint16_t*>(u.data_ptr<at::BFloat16>());
  if (wc.scalar_type() == at::kBFloat16) {  // read in place (the training path's standardized weights)
    check_status(kOpW, "CPU",
                 winograd_f23_weight_bf16_cpu(reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>()), co, ci,
                                              groups, up, transposed));
  } else {
    check_status(kOpW, "CPU", winograd_f23_weight_bf16_cpu(wc.data_ptr<float>(), co, ci, groups, up, transposed));
  }
  return u;
}

at::Tensor conv_impl(const at::Tensor& x, const at::Tensor& u, const c10::optional<at::Tensor>& bias, int64_t groups,
                     c10::string_view act, double gamma, int64_t chunk_tiles, c10::string_view products) {
  TORCH_CHECK(chunk_tiles >= 0, kOp, ": expected chunk_tiles >= 0 (0: chosen here), got ", chunk_tiles);
  const std::string prod(products.data(), products.size());
  TORCH_CHECK(prod == "auto" || prod == "ours" || prod == "plain", kOp,
              ": expected products 'auto', 'ours' or 'plain', got '", prod, "'");
  TORCH_CHECK(x.dim() == 4, kOp, ": expected x of shape (N, C_in, H, W), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && u.scalar_type() == at::kBFloat16, kOp,
              ": expected bfloat16 x and u, got ", x.scalar_type(), " and ", u.scalar_type());
  TORCH_CHECK(groups >= 1 && x.size(1) >= groups && x.size(1) % groups == 0, kOp, ": expected C_in ", x.size(1),
              " to be a positive multiple of groups ", groups);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), cg = C / groups;
  TORCH_CHECK(cg % 2 == 0, kOp, ": expected an even C_in/groups (the products take input channels in pairs), got ",
              cg);
  TORCH_CHECK(u.dim() == 4 && u.size(0) == kWinogradF23Points * groups && u.size(1) == cg / 2 && u.size(3) == 2, kOp,
              ": expected u of shape (", kWinogradF23Points * groups, ", ", cg / 2,
              ", C_out/groups, 2) (conv3x3_winograd_bf16_weight of the weight, groups ", groups, "), got ", u.sizes());
  const int64_t cog = u.size(2), CO = cog * groups;
  std::vector<float> bias32;  // the bias widened here (an ATen cast cost ~25 us per call)
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == CO &&
                    (bias->scalar_type() == at::kFloat || bias->scalar_type() == at::kBFloat16),
                kOp, ": expected a float32 or bfloat16 bias of shape (", CO, ",), got ", bias->scalar_type(), " ",
                bias->sizes());
    bias32.resize(static_cast<size_t>(CO));
    const at::Tensor bc = bias->contiguous();
    if (bc.scalar_type() == at::kFloat) {
      std::copy(bc.data_ptr<float>(), bc.data_ptr<float>() + CO, bias32.begin());
    } else {
      const at::BFloat16* b16 = bc.data_ptr<at::BFloat16>();
      for (int64_t i = 0; i < CO; ++i) bias32[i] = static_cast<float>(b16[i]);
    }
  }
  const std::string a(act.data(), act.size());
  Conv3x3WinogradBf16Params p;
  if (a != "none") {
    p.has_act = true;
    p.act = parse_act(kOp, act);
  }
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor y = at::empty({N, CO, H, W}, x.options(), at::MemoryFormat::ChannelsLast);
  if (y.numel() == 0) return y;
  const int64_t T = N * winograd_f23_tiles(H) * winograd_f23_tiles(W);
  p.n = N, p.h = H, p.w = W, p.c_in = C, p.c_out = CO, p.groups = groups;
  const int64_t P = kWinogradF23Points * groups;
  int64_t chunk = winograd_chunk_tiles(T, P * (cg * 2 + cog * 4), kChunkBytes, kMinChunkTiles, chunk_tiles);
  if (chunk_tiles == 0) {
    const std::initializer_list<int64_t> row_bytes = {groups * cg * 2, groups * cog * 4};  // V, M
    chunk = winograd_unaliased_chunk(chunk, T, 1, row_bytes);
    // one aliased range of at least 64 tiles: two ranges instead (F0's 7x7 convs, 64 tiles of
    // 6 groups of 128 channels: 0.61 -> 0.57 ms)
    if (chunk >= T && T >= 64 && winograd_aliased(T, row_bytes))
      chunk = winograd_unaliased_chunk((T + 1) / 2, T, 1, row_bytes);
  }
  // V (bf16) then M (float32), each on whole cache lines of the per-thread scratch
  const int64_t v_bytes = winograd_lines(P * chunk * cg * 2);
  uint8_t* ws = winograd_scratch(v_bytes + P * chunk * cog * 4).data_ptr<uint8_t>();
  p.v = ws;
  p.m = ws + v_bytes;
  p.x = xc.data_ptr<at::BFloat16>();
  p.sx_n = xc.stride(0), p.sx_h = xc.stride(2), p.sx_w = xc.stride(3);
  p.bias = bias.has_value() ? bias32.data() : nullptr;
  p.gamma = gamma;
  p.y = y.data_ptr<at::BFloat16>();
  p.sy_n = y.stride(0), p.sy_h = y.stride(2), p.sy_w = y.stride(3);
  const at::Tensor uc = u.contiguous();
  p.u = uc.data_ptr<at::BFloat16>();
  const bool plain = prod == "plain";
  p.portable = plain;
  for (int64_t t0 = 0; t0 < T; t0 += chunk) {
    p.tile_begin = t0, p.tile_count = std::min(chunk, T - t0);
    check_status(kOp, "CPU", conv3x3_winograd_bf16_input_cpu(p));
    check_status(kOp, "CPU", conv3x3_winograd_bf16_products_cpu(p, plain));
    check_status(kOp, "CPU", conv3x3_winograd_bf16_output_cpu(p));
  }
  return y;
}

at::Tensor weight_grad_impl(const at::Tensor& x, const at::Tensor& dy, int64_t groups, int64_t chunk_tiles,
                            c10::string_view products, bool bf16_out) {
  constexpr const char* kOpG = "flamingo_rt_C::conv3x3_winograd_bf16_weight_grad";
  const std::string prod(products.data(), products.size());
  TORCH_CHECK(prod == "auto" || prod == "ours" || prod == "plain", kOpG,
              ": expected products 'auto', 'ours' or 'plain', got '", prod, "'");
  TORCH_CHECK(x.dim() == 4 && dy.dim() == 4, kOpG, ": expected x (N, C_in, H, W) and dy (N, C_out, H, W), got ",
              x.sizes(), " and ", dy.sizes());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && dy.scalar_type() == at::kBFloat16, kOpG,
              ": expected bfloat16 x and dy, got ", x.scalar_type(), " and ", dy.scalar_type());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), CO = dy.size(1);
  TORCH_CHECK(dy.size(0) == N && dy.size(2) == H && dy.size(3) == W, kOpG, ": expected dy of shape (", N,
              ", C_out, ", H, ", ", W, ") for x of shape ", x.sizes(), ", got ", dy.sizes());
  TORCH_CHECK(groups >= 1 && C >= groups && C % groups == 0 && CO % groups == 0, kOpG, ": expected C_in ", C,
              " and C_out ", CO, " to be positive multiples of groups ", groups);
  const int64_t cg = C / groups, cog = CO / groups, P = kWinogradF23Points * groups;
  TORCH_CHECK(cg % 2 == 0, kOpG, ": expected an even C_in/groups, got ", cg);
  TORCH_CHECK(chunk_tiles >= 0, kOpG, ": expected chunk_tiles >= 0 (0: chosen here), got ", chunk_tiles);
  at::Tensor dw = at::empty({CO, cg, 3, 3}, x.options().dtype(bf16_out ? at::kBFloat16 : at::kFloat));
  const int64_t T = N * winograd_f23_tiles(H) * winograd_f23_tiles(W);
  if (T == 0) return dw.zero_();
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor dyc = dy.contiguous(at::MemoryFormat::ChannelsLast);
  // tiles per chunk: even (the products take them in pairs); Vp and Yp at least 4 MiB and
  // twice dL/dU
  int64_t chunk = winograd_weight_grad_chunk_tiles(T, P * (cg + cog) * 2, P * cg * cog * 4, kMinChunkTiles, chunk_tiles);
  chunk = std::min<int64_t>(T, (chunk + 1) / 2 * 2);
  if (chunk_tiles == 0) chunk = winograd_unaliased_chunk(chunk, T, 2, {groups * cg * 2, groups * cog * 2});
  const int64_t npairs = (chunk + 1) / 2;
  // Vp, Yp (bf16) and dL/dU (float32), each on whole cache lines of the per-thread scratch; no
  // dL/dU when one range holds all tiles (the last range's products go straight to dw)
  const int64_t vp_bytes = winograd_lines(P * npairs * cg * 4), yp_bytes = winograd_lines(P * npairs * cog * 4);
  const bool need_du = chunk < T;
  uint8_t* wa = winograd_scratch(vp_bytes + yp_bytes + (need_du ? P * cg * cog * 4 : 0)).data_ptr<uint8_t>();
  Conv3x3WinogradBf16Params p;
  p.n = N, p.h = H, p.w = W, p.c_in = C, p.c_out = CO, p.groups = groups;
  p.x = xc.data_ptr<at::BFloat16>();
  p.sx_n = xc.stride(0), p.sx_h = xc.stride(2), p.sx_w = xc.stride(3);
  p.dy = dyc.data_ptr<at::BFloat16>();
  p.sdy_n = dyc.stride(0), p.sdy_h = dyc.stride(2), p.sdy_w = dyc.stride(3);
  p.v = wa;
  p.m = wa + vp_bytes;
  p.du = need_du ? reinterpret_cast<float*>(wa + vp_bytes + yp_bytes) : nullptr;
  const bool plain = prod == "plain";
  p.portable = plain;
  for (int64_t t0 = 0; t0 < T; t0 += chunk) {
    p.tile_begin = t0, p.tile_count = std::min(chunk, T - t0);
    p.du_accumulate = t0 > 0;
    check_status(kOpG, "CPU", conv3x3_winograd_bf16_input_pairs_cpu(p));
    check_status(kOpG, "CPU", conv3x3_winograd_bf16_grad_output_pairs_cpu(p));
    if (t0 + p.tile_count < T) {
      check_status(kOpG, "CPU", conv3x3_winograd_bf16_weight_grad_products_cpu(p, plain));
    } else if (bf16_out) {  // the last range: products and the inverse transform into dw
      check_status(kOpG, "CPU", conv3x3_winograd_bf16_weight_grad_last_cpu(
                                    p, reinterpret_cast<uint16_t*>(dw.data_ptr<at::BFloat16>()), plain));
    } else {
      check_status(kOpG, "CPU", conv3x3_winograd_bf16_weight_grad_last_cpu(p, dw.data_ptr<float>(), plain));
    }
  }
  return dw;
}

bool supported_impl() { return winograd_bf16_cpu_supported(); }

constexpr const char* kOpT = "flamingo_rt_C::conv3x3_winograd_bf16_weight_transpose";

at::Tensor weight_transpose_impl(const at::Tensor& u, int64_t groups) {
  TORCH_CHECK(groups >= 1, kOpT, ": expected groups >= 1, got ", groups);
  TORCH_CHECK(u.scalar_type() == at::kBFloat16 && u.dim() == 4 && u.size(0) == kWinogradF23Points * groups &&
                  u.size(3) == 2,
              kOpT, ": expected a bfloat16 u of shape (", kWinogradF23Points * groups,
              ", k_in/2, k_out, 2) (conv3x3_winograd_bf16_weight of the weight, groups ", groups, "), got ",
              u.scalar_type(), " ", u.sizes());
  const int64_t k_in = u.size(1) * 2, k_out = u.size(2);
  TORCH_CHECK(k_out % 2 == 0, kOpT, ": expected an even C_out/groups (the input gradient's products take it in ",
              "pairs), got ", k_out);
  const at::Tensor uc = u.contiguous();
  at::Tensor ut = at::empty({kWinogradF23Points * groups, k_out / 2, k_in, 2}, u.options());
  check_status(kOpT, "CPU",
               winograd_f23_weight_bf16_transpose_cpu(reinterpret_cast<const uint16_t*>(uc.data_ptr<at::BFloat16>()),
                                                      k_in, k_out, groups,
                                                      reinterpret_cast<uint16_t*>(ut.data_ptr<at::BFloat16>())));
  return ut;
}

}  // namespace
}  // namespace torch_ops
}  // namespace flamingo_rt

TORCH_LIBRARY_FRAGMENT(flamingo_rt_C, m) {
  m.def("conv3x3_winograd_bf16_weight_transpose(Tensor u, int groups) -> Tensor");
  m.def("conv3x3_winograd_bf16_weight(Tensor w, int groups, bool transposed=False) -> Tensor");
  m.def("conv3x3_winograd_bf16(Tensor x, Tensor u, Tensor? bias, int groups, str act, float gamma, "
        "int chunk_tiles=0, str products='auto') -> Tensor");
  m.def("conv3x3_winograd_bf16_weight_grad(Tensor x, Tensor dy, int groups, int chunk_tiles=0, "
        "str products='auto', bool bf16_out=False) -> Tensor");
  m.def("winograd_bf16_cpu_supported() -> bool", &flamingo_rt::torch_ops::supported_impl);
}

TORCH_LIBRARY_IMPL(flamingo_rt_C, CPU, m) {
  m.impl("conv3x3_winograd_bf16_weight", &flamingo_rt::torch_ops::weight_impl);
  m.impl("conv3x3_winograd_bf16_weight_transpose", &flamingo_rt::torch_ops::weight_transpose_impl);
  m.impl("conv3x3_winograd_bf16", &flamingo_rt::torch_ops::conv_impl);
  m.impl("conv3x3_winograd_bf16_weight_grad", &flamingo_rt::torch_ops::weight_grad_impl);
}
