// flamingo_rt_C::resampler_attention: the CUDA C++ forward of the Perceiver Resampler
// attention (csrc/cuda/resampler.cu), the `cuda` backend of
// flamingo_rt.ops.resampler_attention. The schema and the CPU implementation are in
// csrc/torch/xattn_ops.cpp (every build, also the C++ hosts' library); this file adds the
// CUDA implementation when the build has CUDA.
#include <torch/library.h>

#ifdef FLAMINGO_RT_WITH_CUDA

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <string>

#include "flamingo_rt/resampler_cuda.h"

namespace flamingo_rt {
namespace torch_ops {
namespace {

constexpr const char* kOp = "flamingo_rt_C::resampler_attention";

void copy_strides(int64_t dst[4], const at::Tensor& t) {
  for (int d = 0; d < 4; ++d) dst[d] = t.stride(d);
}

at::Tensor resampler_attention_cuda_impl(const at::Tensor& q, const at::Tensor& k_x,
                                         const at::Tensor& v_x, const at::Tensor& k_l,
                                         const at::Tensor& v_l, double scale) {
  TORCH_CHECK(q.dim() == 4, kOp, ": expected q of shape (N, L, H, dh), got ", q.sizes());
  const int64_t n = q.size(0), L = q.size(1), H = q.size(2), dh = q.size(3);
  TORCH_CHECK(k_x.dim() == 4 && k_x.size(0) == n && k_x.size(2) == H && k_x.size(3) == dh, kOp,
              ": expected k_x of shape (", n, ", S, ", H, ", ", dh, "), got ", k_x.sizes());
  const int64_t S = k_x.size(1);
  TORCH_CHECK(v_x.sizes() == k_x.sizes(), kOp, ": expected v_x of shape ", k_x.sizes(),
              " (the shape of k_x), got ", v_x.sizes());
  TORCH_CHECK(k_l.sizes() == q.sizes() && v_l.sizes() == q.sizes(), kOp,
              ": expected k_l and v_l of shape ", q.sizes(), " (the shape of q), got ",
              k_l.sizes(), " and ", v_l.sizes());
  DType dt;
  switch (q.scalar_type()) {
    case at::kFloat: dt = DType::kFloat32; break;
    case at::kBFloat16: dt = DType::kBFloat16; break;
    case at::kHalf: dt = DType::kFloat16; break;
    default:
      TORCH_CHECK(false, kOp, ": expected q of dtype float32, bfloat16 or float16 on CUDA, got ",
                  q.scalar_type());
  }
  for (const at::Tensor* t : {&k_x, &v_x, &k_l, &v_l}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), kOp, ": expected every input of dtype ",
                q.scalar_type(), " (the dtype of q), got ", t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), kOp, ": expected every input on ", q.device(),
                " (the device of q), got ", t->device());
  }
  TORCH_CHECK(dh >= 1 && dh <= kResamplerCudaMaxHeadDim, kOp, ": expected head dim in [1, ",
              kResamplerCudaMaxHeadDim, "], got ", dh);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options());
  ResamplerAttentionParams p;
  p.dtype = dt;
  p.n = n;
  p.L = L;
  p.S = S;
  p.H = H;
  p.dh = dh;
  p.q = q.data_ptr();
  p.k_x = k_x.data_ptr();
  p.v_x = v_x.data_ptr();
  p.k_l = k_l.data_ptr();
  p.v_l = v_l.data_ptr();
  p.out = out.data_ptr();
  copy_strides(p.q_strides, q);
  copy_strides(p.k_x_strides, k_x);
  copy_strides(p.v_x_strides, v_x);
  copy_strides(p.k_l_strides, k_l);
  copy_strides(p.v_l_strides, v_l);
  copy_strides(p.out_strides, out);
  p.scale = scale;
  p.stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  const Status st = resampler_attention_cuda(p);
  TORCH_CHECK(st == Status::kOk, kOp, ": CUDA kernel failed: ", status_string(st),
              st == Status::kCudaError
                  ? std::string(" (") + resampler_attention_cuda_last_error() + ")"
                  : std::string());
  return out;
}

}  // namespace
}  // namespace torch_ops
}  // namespace flamingo_rt

#endif  // FLAMINGO_RT_WITH_CUDA

#ifdef FLAMINGO_RT_WITH_CUDA
TORCH_LIBRARY_IMPL(flamingo_rt_C, CUDA, m) {
  m.impl("resampler_attention", &flamingo_rt::torch_ops::resampler_attention_cuda_impl);
}
#endif  // FLAMINGO_RT_WITH_CUDA
