// CUDA kernels of flamingo_rt_C::image_causal_attention (schema in xattn_ops.cpp; kernels in
// csrc/cuda/xattn.cu, API in csrc/include/flamingo_rt/xattn_cuda.h) and the decode entry
//
//   flamingo_rt_C::image_causal_attention_decode(Tensor q, Tensor k, Tensor v,
//       Tensor media_index, bool all_previous, float scale) -> Tensor
//
// (one new token per sequence against cached per-image K/V; any T works). Forward only: the
// `cuda` backend's backward is the triton one (flamingo_rt/ops/_cuda_xattn.py).
// Compiled into every build, but empty unless the build has CUDA (FLAMINGO_RT_WITH_CUDA).
#ifdef FLAMINGO_RT_WITH_CUDA

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <ATen/ops/empty.h>

#include "common.h"
#include "flamingo_rt/xattn_cuda.h"

namespace flamingo_rt {
namespace torch_ops {
namespace {

constexpr const char* kXcFwd = "flamingo_rt_C::image_causal_attention (CUDA)";
constexpr const char* kXcDec = "flamingo_rt_C::image_causal_attention_decode";

template <int D>
void strides_of(int64_t (&dst)[D], const at::Tensor& t) {
  for (int d = 0; d < D; ++d) dst[d] = t.stride(d);
}

at::Tensor xattn_cuda_run(const char* op, bool decode, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& media_index, bool all_previous,
                          double scale) {
  TORCH_CHECK(q.dim() == 4, op, ": expected q of shape (B, T, H, dh), got ", q.sizes());
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), dh = q.size(3);
  TORCH_CHECK(k.dim() == 5 && k.size(0) == B && k.size(3) == H && k.size(4) == dh, op,
              ": expected k of shape (B, M, N, H, dh) = (", B, ", M, N, ", H, ", ", dh, "), got ",
              k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": expected v of the shape of k ", k.sizes(), ", got ",
              v.sizes());
  TORCH_CHECK(media_index.dim() == 2 && media_index.size(0) == B && media_index.size(1) == T, op,
              ": expected media_index of shape (B, T) = (", B, ", ", T, "), got ", media_index.sizes());
  TORCH_CHECK(media_index.scalar_type() == at::kInt || media_index.scalar_type() == at::kLong, op,
              ": expected media_index of dtype int32 or int64, got ", media_index.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": expected q, k, v of one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(q.is_cuda(), op, ": expected CUDA tensors, got q on ", q.device());
  for (const at::Tensor* t : {&k, &v, &media_index})
    TORCH_CHECK(t->device() == q.device(), op, ": expected every tensor on ", q.device(),
                " (the device of q), got one on ", t->device());
  DType dt;
  switch (q.scalar_type()) {
    case at::kFloat: dt = DType::kFloat32; break;
    case at::kBFloat16: dt = DType::kBFloat16; break;
    case at::kHalf: dt = DType::kFloat16; break;
    default:
      TORCH_CHECK(false, op, ": expected q of dtype float32, bfloat16 or float16 on CUDA, got ",
                  q.scalar_type());
  }
  TORCH_CHECK(dh <= 256, op, ": expected head dim <= 256 on CUDA, got ", dh);
  TORCH_CHECK(k.size(1) == 0 || k.size(2) > 0, op,
              ": expected at least one visual token per image, got k of shape ", k.sizes());
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor mi = media_index.to(at::kInt);  // no copy when already int32
  at::Tensor out = at::empty(q.sizes(), q.options());
  ImageCausalAttnParams p;
  p.dtype = dt;
  p.B = B; p.T = T; p.H = H; p.dh = dh; p.M = k.size(1); p.N = k.size(2);
  p.all_previous = all_previous;
  p.scale = scale;
  p.q = q.data_ptr(); strides_of(p.q_strides, q);
  p.k = k.data_ptr(); strides_of(p.k_strides, k);
  p.v = v.data_ptr(); strides_of(p.v_strides, v);
  p.media_index = mi.data_ptr<int32_t>(); strides_of(p.media_index_strides, mi);
  p.out = out.data_ptr(); strides_of(p.out_strides, out);
  void* stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  const Status st = decode ? image_causal_attention_decode_cuda(p, stream)
                           : image_causal_attention_fwd_cuda(p, stream);
  TORCH_CHECK(st == Status::kOk, op, ": CUDA kernel failed: ", status_string(st),
              st == Status::kCudaError ? std::string(" (") + image_causal_attention_cuda_last_error() + ")"
                                       : std::string());
  return out;
}

at::Tensor xattn_fwd_cuda_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& media_index, bool all_previous, double scale) {
  return xattn_cuda_run(kXcFwd, false, q, k, v, media_index, all_previous, scale);
}

at::Tensor xattn_decode_cuda_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& media_index, bool all_previous, double scale) {
  return xattn_cuda_run(kXcDec, true, q, k, v, media_index, all_previous, scale);
}

}  // namespace
}  // namespace torch_ops
}  // namespace flamingo_rt

TORCH_LIBRARY_FRAGMENT(flamingo_rt_C, m) {
  m.def(
      "image_causal_attention_decode(Tensor q, Tensor k, Tensor v, Tensor media_index, "
      "bool all_previous, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(flamingo_rt_C, CUDA, m) {
  m.impl("image_causal_attention", &flamingo_rt::torch_ops::xattn_fwd_cuda_impl);
  m.impl("image_causal_attention_decode", &flamingo_rt::torch_ops::xattn_decode_cuda_impl);
}

#endif  // FLAMINGO_RT_WITH_CUDA
