// torch ops over the csrc kernels, namespace `flamingo_rt_C` (the Python package owns
// `flamingo_rt`). Schemas and CPU kernels here (fake/meta kernels: flamingo_rt/_cpp_fakes.py); CUDA kernels in ops_cuda.cpp.
//
//   flamingo_rt_C::bias_gamma_act(Tensor x, Tensor? bias, str act, float gamma) -> Tensor
//   flamingo_rt_C::bias_gamma_act_backward(Tensor grad_out, Tensor x, Tensor? bias, str act,
//                                          float gamma) -> (Tensor, Tensor)   # dx, dbias (C,)
//
// Outputs are dense in x's memory format (NCHW or channels-last). No autograd here:
// flamingo_rt.ops wires the backward.

#include <torch/library.h>

#include "common.h"

namespace flamingo_rt {
namespace torch_ops {
namespace {

constexpr const char* kFwd = "flamingo_rt_C::bias_gamma_act";
constexpr const char* kBwd = "flamingo_rt_C::bias_gamma_act_backward";

at::Tensor bias_gamma_act_cpu_impl(const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                                   c10::string_view act, double gamma) {
  check_args(kFwd, x, bias, nullptr);
  const Act a = parse_act(kFwd, act);
  const DType dt = to_dtype(kFwd, x, /*allow_half=*/false, "CPU");
  at::Tensor y = empty_like_format(x);
  check_status(kFwd, "CPU", bias_gamma_act_cpu(fwd_params(dt, a, gamma, x, bias, y)));
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gamma_act_backward_cpu_impl(
    const at::Tensor& grad_out, const at::Tensor& x, const c10::optional<at::Tensor>& bias,
    c10::string_view act, double gamma) {
  const int64_t C = check_args(kBwd, x, bias, &grad_out);
  const Act a = parse_act(kBwd, act);
  const DType dt = to_dtype(kBwd, x, /*allow_half=*/false, "CPU");
  at::Tensor dx = empty_like_format(x);
  at::Tensor dbias = at::empty({C}, x.options());
  check_status(kBwd, "CPU",
               bias_gamma_act_backward_cpu(bwd_params(dt, a, gamma, grad_out, x, bias, dx, dbias)));
  return {dx, dbias};
}

}  // namespace
}  // namespace torch_ops
}  // namespace flamingo_rt

TORCH_LIBRARY(flamingo_rt_C, m) {
  m.def("bias_gamma_act(Tensor x, Tensor? bias, str act, float gamma) -> Tensor");
  m.def(
      "bias_gamma_act_backward(Tensor grad_out, Tensor x, Tensor? bias, str act, float gamma) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(flamingo_rt_C, CPU, m) {
  m.impl("bias_gamma_act", &flamingo_rt::torch_ops::bias_gamma_act_cpu_impl);
  m.impl("bias_gamma_act_backward", &flamingo_rt::torch_ops::bias_gamma_act_backward_cpu_impl);
}
