// Shared by csrc/torch/ops.cpp (CPU, Meta, schema) and csrc/torch/ops_cuda.cpp (CUDA):
// argument checks and the translation from at::Tensor to the kernel params structs.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <string>

#include "flamingo_rt/kernels.h"

namespace flamingo_rt {
namespace torch_ops {

inline Act parse_act(const char* op, c10::string_view act) {
  const std::string s(act.data(), act.size());
  Act a;
  TORCH_CHECK(act_from_string(s.c_str(), &a), op,
              ": expected act to be one of 'gelu', 'relu', 'silu', got '", s, "'");
  return a;
}

// float32 / bfloat16 / float64 everywhere, float16 where the backend has it (CUDA, Meta).
inline DType to_dtype(const char* op, const at::Tensor& x, bool allow_half, const char* where) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf:
      if (allow_half) return DType::kFloat16;
      break;
    default: break;
  }
  TORCH_CHECK(false, op, ": expected x of dtype ",
              allow_half ? "float32, bfloat16, float16 or float64" : "float32, bfloat16 or float64",
              " on ", where,
              ", got ", x.scalar_type());
}

// Shape/dtype/device checks common to every backend. Returns C.
inline int64_t check_args(const char* op, const at::Tensor& x,
                          const c10::optional<at::Tensor>& bias, const at::Tensor* grad_out) {
  TORCH_CHECK(x.dim() == 4, op, ": expected x of shape (N, C, H, W), got ", x.sizes());
  const int64_t C = x.size(1);
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == C, op, ": expected bias of shape (C,) = (", C,
                ",) for x of shape ", x.sizes(), ", got ", b.sizes());
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), op, ": expected bias of dtype ",
                x.scalar_type(), " (the dtype of x), got ", b.scalar_type());
    TORCH_CHECK(b.device() == x.device(), op, ": expected bias on ", x.device(),
                " (the device of x), got ", b.device());
  }
  if (grad_out != nullptr) {
    TORCH_CHECK(grad_out->sizes() == x.sizes(), op, ": expected grad_out of shape ", x.sizes(),
                " (the shape of x), got ", grad_out->sizes());
    TORCH_CHECK(grad_out->scalar_type() == x.scalar_type(), op, ": expected grad_out of dtype ",
                x.scalar_type(), " (the dtype of x), got ", grad_out->scalar_type());
    TORCH_CHECK(grad_out->device() == x.device(), op, ": expected grad_out on ", x.device(),
                " (the device of x), got ", grad_out->device());
  }
  return C;
}

// An output with x's shape, dense: channels-last when x is channels-last and not also
// plain-contiguous, else NCHW -- the rule of the ops' fake kernels (_cpp_fakes._fmt). It
// must be the same rule: compiled graphs (AOTInductor) lay out their buffers by the fake
// kernels' strides. suggest_memory_format() calls an ambiguous x channels-last (C = 1, or
// H = W = 1, with channels-last strides: both layouts at once), and an AOTInductor package
// of a stem with one channel then read every later activation with the wrong strides.
inline at::Tensor empty_like_format(const at::Tensor& x) {
  const bool cl = x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  return at::empty(x.sizes(), x.options(), cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

inline void copy4(int64_t dst[4], c10::IntArrayRef src) {
  for (int d = 0; d < 4; ++d) dst[d] = src[d];
}

inline BiasGammaActParams fwd_params(DType dt, Act act, double gamma, const at::Tensor& x,
                                     const c10::optional<at::Tensor>& bias, at::Tensor& y) {
  BiasGammaActParams p;
  p.dtype = dt;
  p.act = act;
  p.gamma = gamma;
  copy4(p.sizes, x.sizes());
  p.x = x.data_ptr();
  copy4(p.x_strides, x.strides());
  if (bias.has_value()) {
    p.bias = bias->data_ptr();
    p.bias_stride = bias->stride(0);
  }
  p.y = y.data_ptr();
  copy4(p.y_strides, y.strides());
  return p;
}

inline BiasGammaActBackwardParams bwd_params(DType dt, Act act, double gamma,
                                             const at::Tensor& grad_out, const at::Tensor& x,
                                             const c10::optional<at::Tensor>& bias,
                                             at::Tensor& dx, at::Tensor& dbias) {
  BiasGammaActBackwardParams p;
  p.dtype = dt;
  p.act = act;
  p.gamma = gamma;
  copy4(p.sizes, x.sizes());
  p.grad_out = grad_out.data_ptr();
  copy4(p.grad_out_strides, grad_out.strides());
  p.x = x.data_ptr();
  copy4(p.x_strides, x.strides());
  if (bias.has_value()) {
    p.bias = bias->data_ptr();
    p.bias_stride = bias->stride(0);
  }
  p.grad_x = dx.data_ptr();
  copy4(p.grad_x_strides, dx.strides());
  p.grad_bias = dbias.data_ptr();
  p.grad_bias_stride = dbias.stride(0);
  return p;
}

inline void check_status(const char* op, const char* backend, Status st) {
  TORCH_CHECK(st == Status::kOk, op, ": ", backend, " kernel failed: ", status_string(st),
              st == Status::kCudaError ? std::string(" (") + last_cuda_error() + ")" : std::string());
}

}  // namespace torch_ops
}  // namespace flamingo_rt
