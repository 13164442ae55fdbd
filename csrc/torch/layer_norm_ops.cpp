// torch op over the row LayerNorm kernel (csrc/cpu/layer_norm.cpp):
//
//   flamingo_rt_C::layer_norm_rows(Tensor x, Tensor? weight, Tensor? bias, float eps,
//                                  ScalarType out_dtype) -> (Tensor y, Tensor mean, Tensor rstd)
//
// x (R, D) float32 / bfloat16 on the CPU with unit element stride; weight / bias (D,) any
// float dtype (used in float32), both or neither; y (R, D) in out_dtype (float32 or
// bfloat16), mean and rstd (R, 1) float32, as native_layer_norm returns them. No autograd
// here (callers are custom-op implementations); fake kernel in flamingo_rt/_cpp_fakes.py.
#include <torch/library.h>

#include <ATen/ops/empty.h>

#include "common.h"

namespace flamingo_rt {
namespace torch_ops {
namespace {

constexpr const char* kLN = "flamingo_rt_C::layer_norm_rows";

DType ln_dtype(at::ScalarType t, const char* what) {
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16, kLN, ": expected ", what, " float32 or bfloat16, got ", t);
  return t == at::kFloat ? DType::kFloat32 : DType::kBFloat16;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_rows_cpu_impl(const at::Tensor& x,
                                                                         const c10::optional<at::Tensor>& weight,
                                                                         const c10::optional<at::Tensor>& bias,
                                                                         double eps, at::ScalarType out_dtype) {
  TORCH_CHECK(x.dim() == 2, kLN, ": expected x (R, D), got shape ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), kLN, ": expected a CPU tensor, got ", x.device());
  TORCH_CHECK(eps >= 0.0, kLN, ": expected eps >= 0, got ", eps);
  const int64_t R = x.size(0), D = x.size(1);
  const bool has_w = weight.has_value() && weight->defined(), has_b = bias.has_value() && bias->defined();
  TORCH_CHECK(has_w == has_b, kLN, ": expected both weight and bias or neither");
  at::Tensor xc = x.stride(1) == 1 || D <= 1 ? x : x.contiguous();
  at::Tensor w, b;
  if (has_w) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == D && bias->dim() == 1 && bias->size(0) == D, kLN,
                ": expected weight and bias of shape (", D, "), got ", weight->sizes(), " and ", bias->sizes());
    w = weight->to(at::kFloat).contiguous();
    b = bias->to(at::kFloat).contiguous();
  }
  at::Tensor y = at::empty({R, D}, x.options().dtype(out_dtype));
  at::Tensor mean = at::empty({R, 1}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({R, 1}, x.options().dtype(at::kFloat));
  LayerNormRowsParams p;
  p.x = xc.data_ptr();
  p.x_dtype = ln_dtype(x.scalar_type(), "x");
  p.x_stride = xc.stride(0);
  p.weight = has_w ? w.data_ptr<float>() : nullptr;
  p.bias = has_b ? b.data_ptr<float>() : nullptr;
  p.y = y.data_ptr();
  p.y_dtype = ln_dtype(out_dtype, "out_dtype");
  p.y_stride = D;
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.R = R;
  p.D = D;
  p.eps = eps;
  if (R > 0 && D > 0) {
    const Status s = layer_norm_rows_cpu(p);
    TORCH_CHECK(s == Status::kOk, kLN, ": kernel failed: ", status_string(s));
  }
  return {y, mean, rstd};
}

}  // namespace
}  // namespace torch_ops
}  // namespace flamingo_rt

TORCH_LIBRARY_FRAGMENT(flamingo_rt_C, m) {
  m.def("layer_norm_rows(Tensor x, Tensor? weight, Tensor? bias, float eps, ScalarType out_dtype) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(flamingo_rt_C, CPU, m) {
  m.impl("layer_norm_rows", &flamingo_rt::torch_ops::layer_norm_rows_cpu_impl);
}
