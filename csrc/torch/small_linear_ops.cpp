// torch op over the small-batch linear kernel (csrc/cpu/small_linear.cpp):
//
//   flamingo_rt_C::small_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor
//
// x (B, K) with B <= 16, w (N, K), bias (N,); rows of x and w must have unit stride in K.
// x, w and bias of one dtype, or float32 x and bias with a bfloat16 w. Output (B, N)
// contiguous, in x's dtype. CPU kernel (fake kernel in flamingo_rt/_cpp_fakes.py); no autograd here.
#include <torch/library.h>

#include <ATen/ops/empty.h>

#include "common.h"

namespace flamingo_rt {
namespace torch_ops {
namespace {

constexpr const char* kSL = "flamingo_rt_C::small_linear";

void check_small_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, kSL, ": expected x (B, K) and w (N, K), got ", x.sizes(),
              " and ", w.sizes());
  TORCH_CHECK(x.size(1) == w.size(1), kSL, ": expected x with K = ", w.size(1), " columns (w is ",
              w.sizes(), "), got ", x.sizes());
  TORCH_CHECK(x.size(0) <= kSmallLinearMaxRows, kSL, ": expected at most ", kSmallLinearMaxRows,
              " rows, got ", x.size(0));
  const bool mixed = x.scalar_type() == at::kFloat && w.scalar_type() == at::kBFloat16;
  TORCH_CHECK(x.scalar_type() == w.scalar_type() || mixed, kSL,
              ": expected x and w of one dtype (or float32 x with a bfloat16 w), got ", x.scalar_type(), " and ",
              w.scalar_type());
  TORCH_CHECK(x.size(1) == 0 || (x.stride(1) == 1 && w.stride(1) == 1), kSL,
              ": expected unit stride along K, got strides ", x.strides(), " and ", w.strides());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0), kSL, ": expected bias of shape (",
                w.size(0), ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->is_contiguous(), kSL,
                ": expected a contiguous bias of dtype ", x.scalar_type(), ", got ", bias->scalar_type());
  }
}

at::Tensor small_linear_cpu_impl(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  check_small_linear(x, w, bias);
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), kSL, ": expected CPU tensors");
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
  SmallLinearParams p;
  p.x = x.data_ptr();
  p.w = w.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.B = x.size(0);
  p.K = x.size(1);
  p.N = w.size(0);
  p.x_row_stride = x.size(0) > 1 ? x.stride(0) : x.size(1);
  p.w_row_stride = w.size(0) > 1 ? w.stride(0) : w.size(1);
  p.dtype = to_dtype(kSL, x, /*allow_half=*/false, "CPU");
  p.bf16_weight = x.scalar_type() != w.scalar_type();  // float32 x, bfloat16 w (checked above)
  const Status s = small_linear_cpu(p);
  TORCH_CHECK(s == Status::kOk, kSL, ": kernel failed: ", status_string(s));
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flamingo_rt_C, m) {
  m.def("small_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(flamingo_rt_C, CPU, m) { m.impl("small_linear", &small_linear_cpu_impl); }


}  // namespace torch_ops
}  // namespace flamingo_rt
