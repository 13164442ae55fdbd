// CUDA kernels of the flamingo_rt_C ops (schemas in ops.cpp). Compiled into every build,
// but empty unless the build has CUDA (FLAMINGO_RT_WITH_CUDA, set by setup.py).
#ifdef FLAMINGO_RT_WITH_CUDA

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common.h"

namespace flamingo_rt {
namespace torch_ops {
namespace {

constexpr const char* kFwd = "flamingo_rt_C::bias_gamma_act";
constexpr const char* kBwd = "flamingo_rt_C::bias_gamma_act_backward";

at::Tensor bias_gamma_act_cuda_impl(const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                                    c10::string_view act, double gamma) {
  check_args(kFwd, x, bias, nullptr);
  const Act a = parse_act(kFwd, act);
  const DType dt = to_dtype(kFwd, x, /*allow_half=*/true, "CUDA");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = empty_like_format(x);
  BiasGammaActParams p = fwd_params(dt, a, gamma, x, bias, y);
  p.stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  check_status(kFwd, "CUDA", bias_gamma_act_cuda(p));
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gamma_act_backward_cuda_impl(
    const at::Tensor& grad_out, const at::Tensor& x, const c10::optional<at::Tensor>& bias,
    c10::string_view act, double gamma) {
  const int64_t C = check_args(kBwd, x, bias, &grad_out);
  const Act a = parse_act(kBwd, act);
  const DType dt = to_dtype(kBwd, x, /*allow_half=*/true, "CUDA");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = empty_like_format(x);
  at::Tensor dbias = at::empty({C}, x.options());
  BiasGammaActBackwardParams p = bwd_params(dt, a, gamma, grad_out, x, bias, dx, dbias);
  p.stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const size_t ws_bytes = bias_gamma_act_backward_cuda_workspace_bytes(p);
  at::Tensor ws;  // from the caching allocator, on the current stream
  if (ws_bytes > 0) {
    ws = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
    p.workspace = ws.data_ptr();
    p.workspace_bytes = ws_bytes;
  }
  check_status(kBwd, "CUDA", bias_gamma_act_backward_cuda(p));
  return {dx, dbias};
}

}  // namespace
}  // namespace torch_ops
}  // namespace flamingo_rt

TORCH_LIBRARY_IMPL(flamingo_rt_C, CUDA, m) {
  m.impl("bias_gamma_act", &flamingo_rt::torch_ops::bias_gamma_act_cuda_impl);
  m.impl("bias_gamma_act_backward", &flamingo_rt::torch_ops::bias_gamma_act_backward_cuda_impl);
}

#endif  // FLAMINGO_RT_WITH_CUDA
