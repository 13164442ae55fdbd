// Shared by csrc/torch/nfnet_ops.cpp (CPU, schemas) and nfnet_cuda_ops.cpp (CUDA): argument
// checks and params structs of the NFNet ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <vector>

#include "common.h"
#include "flamingo_rt/nfnet.h"

namespace flamingo_rt {
namespace torch_ops {

constexpr const char* kWsFwd = "flamingo_rt_C::ws_standardize";
constexpr const char* kWsFwdBf16 = "flamingo_rt_C::ws_standardize_bf16";
constexpr const char* kWsBwd = "flamingo_rt_C::ws_standardize_backward";
constexpr const char* kSeFwd = "flamingo_rt_C::se_residual";
constexpr const char* kSeBwd = "flamingo_rt_C::se_residual_backward";

inline DType nf_dtype(const char* op, const at::Tensor& t, const char* where, bool allow_half) {
  if (allow_half) return to_dtype(op, t, true, where);
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default: break;
  }
  TORCH_CHECK(false, op, ": expected dtype float32, bfloat16 or float64 on ", where, ", got ",
              t.scalar_type());
}

// allow_bf16_grad: a bfloat16 grad_out beside a float32 weight is accepted (the CPU
// kernel's grad_out_bfloat16).
inline DType nf_check_ws(const char* op, const at::Tensor& weight, const at::Tensor& gain,
                         const at::Tensor* grad_out, const char* where,
                         bool allow_half = false, bool allow_bf16_grad = false) {
  TORCH_CHECK(weight.dim() >= 1 && weight.size(0) > 0 && weight.numel() > 0, op,
              ": expected a non-empty weight of shape (O, I/groups, kh, kw), got ", weight.sizes());
  TORCH_CHECK(gain.numel() == weight.size(0), op, ": expected gain with ", weight.size(0),
              " elements, got shape ", gain.sizes());
  TORCH_CHECK(gain.scalar_type() == weight.scalar_type() && gain.device() == weight.device(), op,
              ": expected gain of weight's dtype ", weight.scalar_type(), " on ", weight.device(),
              ", got ", gain.scalar_type(), " on ", gain.device());
  if (grad_out != nullptr) {
    const bool bf16_grad = allow_bf16_grad && grad_out->scalar_type() == at::kBFloat16 &&
                           weight.scalar_type() == at::kFloat;
    TORCH_CHECK(grad_out->sizes() == weight.sizes() &&
                    (grad_out->scalar_type() == weight.scalar_type() || bf16_grad) &&
                    grad_out->device() == weight.device(), op,
                ": expected grad_out like weight ", weight.sizes(), " ", weight.scalar_type(), ", got ",
                grad_out->sizes(), " ", grad_out->scalar_type());
  }
  return nf_dtype(op, weight, where, allow_half);
}

// The layout ws_standardize keeps: channels-last when the weight is (and not also plain-
// contiguous), else contiguous. Either way each output channel's fan_in elements are one
// dense row (in (I, kh, kw) or (kh, kw, I) order); standardization is per row and
// elementwise within it, so the kernels run on either unchanged, and the outputs (and a
// backward's grad_out) take the weight's layout: a channels-last model trains without
// reordering its weights.
inline at::MemoryFormat ws_format(const at::Tensor& weight) {
  if (weight.dim() == 4 && !weight.is_contiguous() &&
      weight.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

// w, g dense (w's rows in ws_format(w)), out like w.
inline WsStandardizeParams nf_ws_params(DType dt, const at::Tensor& w, const at::Tensor& g,
                                        double eps, at::Tensor& out) {
  WsStandardizeParams p;
  p.dtype = dt;
  p.rows = w.size(0);
  p.fan_in = w.numel() / p.rows;
  p.eps = eps;
  p.weight = w.data_ptr();
  p.weight_row_stride = p.fan_in;
  p.gain = g.data_ptr();
  p.gain_stride = 1;
  p.out = out.data_ptr();
  p.out_row_stride = p.fan_in;
  return p;
}

// allow_f32_scale: a float32 scale beside bfloat16 tensors is accepted (the CPU kernels'
// scale_float32).
inline DType nf_check_se(const char* op, const at::Tensor& x, const at::Tensor& gate,
                         const at::Tensor* shortcut, const at::Tensor& scale,
                         const at::Tensor* grad_out, const char* where,
                         bool allow_half = false, bool allow_f32_scale = false) {
  TORCH_CHECK(x.dim() == 4, op, ": expected x of shape (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(gate.dim() == 2 && gate.size(0) == x.size(0) && gate.size(1) == x.size(1), op,
              ": expected gate_logits of shape (N, C) = (", x.size(0), ", ", x.size(1), "), got ",
              gate.sizes());
  TORCH_CHECK(scale.numel() == 1 && scale.dim() <= 1, op,
              ": expected scale of shape () or (1,), got ", scale.sizes());
  std::vector<const at::Tensor*> others{&gate, &scale};
  if (shortcut != nullptr) {
    TORCH_CHECK(shortcut->sizes() == x.sizes(), op, ": expected shortcut of x's shape ", x.sizes(),
                ", got ", shortcut->sizes());
    others.push_back(shortcut);
  }
  if (grad_out != nullptr) {
    TORCH_CHECK(grad_out->sizes() == x.sizes(), op, ": expected grad_out of x's shape ", x.sizes(),
                ", got ", grad_out->sizes());
    others.push_back(grad_out);
  }
  for (const at::Tensor* t : others) {
    if (t == &scale && allow_f32_scale && x.scalar_type() == at::kBFloat16 &&
        scale.scalar_type() == at::kFloat && scale.device() == x.device())
      continue;
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(), op,
                ": expected every tensor of x's dtype ", x.scalar_type(), " on ", x.device(),
                ", got one of ", t->scalar_type(), " on ", t->device());
  }
  return nf_dtype(op, x, where, allow_half);
}

// sc: the scale, contiguous (kept alive by the caller).
inline SeResidualParams nf_se_params(DType dt, const at::Tensor& x, const at::Tensor& gate,
                                     const at::Tensor& shortcut, const at::Tensor& sc,
                                     at::Tensor& y) {
  SeResidualParams p;
  p.dtype = dt;
  copy4(p.sizes, x.sizes());
  p.x = x.data_ptr();
  copy4(p.x_strides, x.strides());
  p.gate = gate.data_ptr();
  p.gate_strides[0] = gate.stride(0);
  p.gate_strides[1] = gate.stride(1);
  p.shortcut = shortcut.data_ptr();
  copy4(p.shortcut_strides, shortcut.strides());
  p.scale = sc.data_ptr();
  p.scale_float32 = sc.scalar_type() == at::kFloat && x.scalar_type() != at::kFloat;
  p.y = y.data_ptr();
  copy4(p.y_strides, y.strides());
  return p;
}

}  // namespace torch_ops
}  // namespace flamingo_rt
