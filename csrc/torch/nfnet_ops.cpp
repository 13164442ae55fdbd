// torch ops over the NFNet kernels (csrc/cpu/ws_standardize.cpp, csrc/cpu/se_residual.cpp,
// csrc/cpu/spatial_mean.cpp):
//
//   flamingo_rt_C::ws_standardize(Tensor weight, Tensor gain, float eps) -> Tensor
//   flamingo_rt_C::ws_standardize_backward(Tensor grad_out, Tensor weight, Tensor gain,
//                                          float eps) -> (Tensor, Tensor)  # d_weight, d_gain
//   flamingo_rt_C::ws_standardize_bf16(Tensor weight, Tensor gain, float eps) -> Tensor
//       # a float32 weight standardized into bf16 (rounded once; CPU only). ws_standardize_backward
//       # takes a bf16 grad_out beside a float32 weight (its gradients float32)
//   flamingo_rt_C::se_residual(Tensor x, Tensor gate_logits, Tensor shortcut, Tensor scale)
//                                          -> Tensor
//   flamingo_rt_C::se_residual_backward(Tensor grad_out, Tensor x, Tensor gate_logits,
//                                       Tensor scale) -> (Tensor, Tensor, Tensor)  # dx, dgate, dscale
//   flamingo_rt_C::spatial_mean(Tensor x) -> Tensor  # (N, C) float32 (float64 for float64)
//
// ws_standardize: weight (O, ...) any layout, gain with O elements; the standardized weight
// and the weight gradient in the weight's layout (channels-last stays channels-last, anything
// else is made contiguous: ws_format), gain gradient in gain's shape. se_residual: x, shortcut
// (N, C, H, W) any strides, gate (N, C), scale one element (x's dtype, or float32 beside
// bfloat16: dscale is in scale's dtype); outputs dense in x's memory format. spatial_mean:
// x (N, C, H, W) float32 / bfloat16 / float64, any strides, CPU only, inference (no autograd).
// CPU kernels here, CUDA (forward) in nfnet_cuda_ops.cpp; fakes in
// flamingo_rt/ops/_cpp_backends.py. No autograd here (flamingo_rt.ops.nfconv wires it).
#include <torch/library.h>

#include <ATen/ops/empty.h>

#include "common.h"
#include "flamingo_rt/nfnet.h"
#include "nfnet_common.h"

namespace flamingo_rt {
namespace torch_ops {
namespace {

at::Tensor ws_standardize_cpu_impl(const at::Tensor& weight, const at::Tensor& gain, double eps) {
  const DType dt = nf_check_ws(kWsFwd, weight, gain, nullptr, "CPU");
  const at::MemoryFormat fmt = ws_format(weight);
  const at::Tensor w = weight.contiguous(fmt);
  const at::Tensor g = gain.contiguous();
  at::Tensor out = at::empty(weight.sizes(), weight.options(), fmt);
  WsStandardizeParams p = nf_ws_params(dt, w, g, eps, out);
  check_status(kWsFwd, "CPU", ws_standardize_cpu(p));
  return out;
}

// A float32 weight standardized into bfloat16 (rounded once): the bf16 autocast training path.
at::Tensor ws_standardize_bf16_cpu_impl(const at::Tensor& weight, const at::Tensor& gain, double eps) {
  const DType dt = nf_check_ws(kWsFwdBf16, weight, gain, nullptr, "CPU");
  TORCH_CHECK(dt == DType::kFloat32, kWsFwdBf16, ": expected a float32 weight, got ", weight.scalar_type());
  const at::MemoryFormat fmt = ws_format(weight);
  const at::Tensor w = weight.contiguous(fmt);
  const at::Tensor g = gain.contiguous();
  at::Tensor out = at::empty(weight.sizes(), weight.options().dtype(at::kBFloat16), fmt);
  WsStandardizeParams p = nf_ws_params(dt, w, g, eps, out);
  p.out_bfloat16 = true;
  check_status(kWsFwdBf16, "CPU", ws_standardize_cpu(p));
  return out;
}

std::tuple<at::Tensor, at::Tensor> ws_standardize_backward_cpu_impl(const at::Tensor& grad_out,
                                                                     const at::Tensor& weight,
                                                                     const at::Tensor& gain,
                                                                     double eps) {
  const DType dt = nf_check_ws(kWsBwd, weight, gain, &grad_out, "CPU", false, true);
  const at::MemoryFormat fmt = ws_format(weight);
  const at::Tensor w = weight.contiguous(fmt);
  const at::Tensor g = gain.contiguous();
  const at::Tensor go = grad_out.contiguous(fmt);
  at::Tensor dw = at::empty(weight.sizes(), weight.options(), fmt);
  at::Tensor dg = at::empty(gain.sizes(), gain.options());
  WsStandardizeBackwardParams p;
  p.dtype = dt;
  p.rows = w.size(0);
  p.fan_in = p.rows > 0 ? w.numel() / p.rows : 0;
  p.eps = eps;
  p.grad_out = go.data_ptr();
  p.grad_out_row_stride = p.fan_in;
  p.grad_out_bfloat16 = go.scalar_type() == at::kBFloat16 && dt == DType::kFloat32;
  p.weight = w.data_ptr();
  p.weight_row_stride = p.fan_in;
  p.gain = g.data_ptr();
  p.gain_stride = 1;
  p.grad_weight = dw.data_ptr();
  p.grad_weight_row_stride = p.fan_in;
  p.grad_gain = dg.data_ptr();
  p.grad_gain_stride = 1;
  check_status(kWsBwd, "CPU", ws_standardize_backward_cpu(p));
  return {dw, dg};
}

at::Tensor se_residual_cpu_impl(const at::Tensor& x, const at::Tensor& gate,
                                const at::Tensor& shortcut, const at::Tensor& scale) {
  const DType dt = nf_check_se(kSeFwd, x, gate, &shortcut, scale, nullptr, "CPU", false, true);
  at::Tensor y = empty_like_format(x);
  const at::Tensor sc = scale.contiguous();
  SeResidualParams p = nf_se_params(dt, x, gate, shortcut, sc, y);
  check_status(kSeFwd, "CPU", se_residual_cpu(p));
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> se_residual_backward_cpu_impl(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& gate,
    const at::Tensor& scale) {
  const DType dt = nf_check_se(kSeBwd, x, gate, nullptr, scale, &grad_out, "CPU", false, true);
  at::Tensor dx = empty_like_format(x);
  at::Tensor dgate = at::empty({x.size(0), x.size(1)}, x.options());
  at::Tensor dscale = at::empty(scale.sizes(), scale.options());
  const at::Tensor sc = scale.contiguous();
  SeResidualBackwardParams p;
  p.dtype = dt;
  copy4(p.sizes, x.sizes());
  p.grad_out = grad_out.data_ptr();
  copy4(p.grad_out_strides, grad_out.strides());
  p.x = x.data_ptr();
  copy4(p.x_strides, x.strides());
  p.gate = gate.data_ptr();
  p.gate_strides[0] = gate.stride(0);
  p.gate_strides[1] = gate.stride(1);
  p.scale = sc.data_ptr();
  p.scale_float32 = sc.scalar_type() == at::kFloat && x.scalar_type() != at::kFloat;
  p.grad_x = dx.data_ptr();
  copy4(p.grad_x_strides, dx.strides());
  p.grad_gate = dgate.data_ptr();
  p.grad_scale = dscale.data_ptr();
  check_status(kSeBwd, "CPU", se_residual_backward_cpu(p));
  return {dx, dgate, dscale};
}

constexpr const char* kSpatialMean = "flamingo_rt_C::spatial_mean";

at::Tensor spatial_mean_cpu_impl(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, kSpatialMean, ": expected x of shape (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), kSpatialMean, ": expected a CPU tensor, got ", x.device());
  const DType dt = nf_dtype(kSpatialMean, x, "CPU", /*allow_half=*/false);
  at::Tensor out = at::empty({x.size(0), x.size(1)},
                             x.options().dtype(dt == DType::kFloat64 ? at::kDouble : at::kFloat));
  SpatialMeanParams p;
  p.dtype = dt;
  copy4(p.sizes, x.sizes());
  p.x = x.data_ptr();
  copy4(p.x_strides, x.strides());
  p.out = out.data_ptr();
  check_status(kSpatialMean, "CPU", spatial_mean_cpu(p));
  return out;
}

}  // namespace
}  // namespace torch_ops
}  // namespace flamingo_rt

TORCH_LIBRARY_FRAGMENT(flamingo_rt_C, m) {
  m.def("ws_standardize(Tensor weight, Tensor gain, float eps) -> Tensor");
  m.def("ws_standardize_bf16(Tensor weight, Tensor gain, float eps) -> Tensor");
  m.def("ws_standardize_backward(Tensor grad_out, Tensor weight, Tensor gain, float eps) "
        "-> (Tensor, Tensor)");
  m.def("se_residual(Tensor x, Tensor gate_logits, Tensor shortcut, Tensor scale) -> Tensor");
  m.def("se_residual_backward(Tensor grad_out, Tensor x, Tensor gate_logits, Tensor scale) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("spatial_mean(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(flamingo_rt_C, CPU, m) {
  m.impl("ws_standardize", &flamingo_rt::torch_ops::ws_standardize_cpu_impl);
  m.impl("ws_standardize_bf16", &flamingo_rt::torch_ops::ws_standardize_bf16_cpu_impl);
  m.impl("ws_standardize_backward", &flamingo_rt::torch_ops::ws_standardize_backward_cpu_impl);
  m.impl("se_residual", &flamingo_rt::torch_ops::se_residual_cpu_impl);
  m.impl("se_residual_backward", &flamingo_rt::torch_ops::se_residual_backward_cpu_impl);
  m.impl("spatial_mean", &flamingo_rt::torch_ops::spatial_mean_cpu_impl);
}
