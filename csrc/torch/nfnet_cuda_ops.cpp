// CUDA kernels of the NFNet flamingo_rt_C ops (schemas in nfnet_ops.cpp): forwards of
// ws_standardize and se_residual (csrc/cuda/nfnet.cu). The backwards have no CUDA kernel
// (the Python backend falls back to the triton / reference backward). Empty unless the
// build has CUDA (FLAMINGO_RT_WITH_CUDA).
#ifdef FLAMINGO_RT_WITH_CUDA

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <ATen/ops/empty.h>

#include "common.h"
#include "flamingo_rt/nfnet.h"
#include "nfnet_common.h"

namespace flamingo_rt {
namespace torch_ops {
namespace {

at::Tensor ws_standardize_cuda_impl(const at::Tensor& weight, const at::Tensor& gain, double eps) {
  const DType dt = nf_check_ws(kWsFwd, weight, gain, nullptr, "CUDA", /*allow_half=*/true);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::MemoryFormat fmt = ws_format(weight);
  const at::Tensor w = weight.contiguous(fmt);
  const at::Tensor g = gain.contiguous();
  at::Tensor out = at::empty(weight.sizes(), weight.options(), fmt);
  WsStandardizeParams p = nf_ws_params(dt, w, g, eps, out);
  p.stream = c10::cuda::getCurrentCUDAStream(weight.device().index()).stream();
  check_status(kWsFwd, "CUDA", ws_standardize_cuda(p));
  return out;
}

at::Tensor se_residual_cuda_impl(const at::Tensor& x, const at::Tensor& gate,
                                 const at::Tensor& shortcut, const at::Tensor& scale) {
  const DType dt = nf_check_se(kSeFwd, x, gate, &shortcut, scale, nullptr, "CUDA", true);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = empty_like_format(x);
  const at::Tensor sc = scale.contiguous();
  SeResidualParams p = nf_se_params(dt, x, gate, shortcut, sc, y);
  p.stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  check_status(kSeFwd, "CUDA", se_residual_cuda(p));
  return y;
}

}  // namespace
}  // namespace torch_ops
}  // namespace flamingo_rt

TORCH_LIBRARY_IMPL(flamingo_rt_C, CUDA, m) {
  m.impl("ws_standardize", &flamingo_rt::torch_ops::ws_standardize_cuda_impl);
  m.impl("se_residual", &flamingo_rt::torch_ops::se_residual_cuda_impl);
}

#endif  // FLAMINGO_RT_WITH_CUDA
