// torch ops over the image-causal cross-attention kernels (csrc/cpu/xattn.cpp):
//
//   flamingo_rt_C::image_causal_attention(Tensor q, Tensor k, Tensor v, Tensor media_index,
//                                         bool all_previous, float scale) -> Tensor
//   flamingo_rt_C::image_causal_attention_backward(Tensor grad_out, Tensor q, Tensor k,
//       Tensor v, Tensor media_index, bool all_previous, float scale) -> (Tensor, Tensor, Tensor)
//
//   flamingo_rt_C::resampler_attention(Tensor q, Tensor k_x, Tensor v_x, Tensor k_l, Tensor v_l,
//                                      float scale) -> Tensor
//   flamingo_rt_C::resampler_attention_backward(Tensor grad_out, Tensor q, Tensor k_x,
//       Tensor v_x, Tensor k_l, Tensor v_l, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)
//   flamingo_rt_C::resampler_attention_backward_kvpacked(...the same...) -> (Tensor dq,
//       Tensor dkv_x (N, S, 2, H, dh), Tensor dkv_l (N, L', 2, H, dh))
//
// The resampler ops: q (N, L, H, dh) latent queries of N media, each against the keys
// [k_x; k_l] of its own medium, k_x/v_x (N, S, H, dh) from the features and k_l/v_l
// (N, L', H, dh) from the latents, read in place (the kernel's n_tail source: no
// concatenation). The image-causal ops:
// q (B, T, H, dh), k/v (B, M, N, H, dh), media_index (B, T) int32/int64 with values in
// [-1, M). Inputs may be any strided views (no copies); outputs are contiguous. CPU kernels
// (fake kernels in flamingo_rt/_cpp_fakes.py, the resampler ops' in flamingo_rt/ops/resampler.py);
// no autograd here (flamingo_rt.ops.xattn and .resampler wire the backward).
#include <torch/library.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "common.h"
#include "cpu_block_cache.h"

// fresh_outputs: every CPU op below makes its outputs inside a bounded block-cache scope
// (cpu_block_cache.h): a freed output's block serves the next call's, so outputs land on
// memory that stays mapped instead of fresh pages (first-touch page faults: the resampler's
// bf16 backward at issue 4's 32 images, 42 MiB of gradients, 34 -> 19.6 ms a call on the
// AMX guest), while the cache's footprint stays within the peak of its live bytes.

namespace flamingo_rt {
namespace torch_ops {
namespace {

constexpr const char* kXFwd = "flamingo_rt_C::image_causal_attention";
constexpr const char* kXBwd = "flamingo_rt_C::image_causal_attention_backward";

struct XShape {
  int64_t B, T, H, dh, M, N;
};

XShape check_xattn(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& mi, const at::Tensor* grad_out) {
  TORCH_CHECK(q.dim() == 4, op, ": expected q of shape (B, T, H, dh), got ", q.sizes());
  XShape s{q.size(0), q.size(1), q.size(2), q.size(3), 0, 0};
  TORCH_CHECK(k.dim() == 5 && k.size(0) == s.B && k.size(3) == s.H && k.size(4) == s.dh, op,
              ": expected k of shape (B, M, N, H, dh) = (", s.B, ", M, N, ", s.H, ", ", s.dh,
              "), got ", k.sizes());
  s.M = k.size(1);
  s.N = k.size(2);
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": expected v of the shape of k ", k.sizes(), ", got ",
              v.sizes());
  TORCH_CHECK(mi.dim() == 2 && mi.size(0) == s.B && mi.size(1) == s.T, op,
              ": expected media_index of shape (B, T) = (", s.B, ", ", s.T, "), got ", mi.sizes());
  TORCH_CHECK(mi.scalar_type() == at::kInt || mi.scalar_type() == at::kLong, op,
              ": expected media_index of dtype int32 or int64, got ", mi.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": expected q, k, v of one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  for (const at::Tensor* t : {&k, &v, &mi})
    TORCH_CHECK(t->device() == q.device(), op, ": expected every tensor on ", q.device(),
                " (the device of q), got one on ", t->device());
  if (grad_out != nullptr) {
    TORCH_CHECK(grad_out->sizes() == q.sizes(), op, ": expected grad_out of shape ", q.sizes(),
                " (the shape of q), got ", grad_out->sizes());
    TORCH_CHECK(grad_out->scalar_type() == q.scalar_type(), op, ": expected grad_out of dtype ",
                q.scalar_type(), " (the dtype of q), got ", grad_out->scalar_type());
    TORCH_CHECK(grad_out->device() == q.device(), op, ": expected grad_out on ", q.device(),
                ", got ", grad_out->device());
  }
  return s;
}

template <int D>
void copy_strides(int64_t (&dst)[D], const at::Tensor& t) {
  for (int d = 0; d < D; ++d) dst[d] = t.stride(d);
}

void check_index_status(const char* op, Status st, const at::Tensor& mi, int64_t M) {
  if (st == Status::kInvalidArgument) {
    const auto lo = mi.numel() ? mi.min().item<int64_t>() : 0;
    const auto hi = mi.numel() ? mi.max().item<int64_t>() : 0;
    TORCH_CHECK(false, op, ": CPU kernel failed: invalid argument (expected media_index values in [-1, ",
                M, ") and at least one visual token per image, got values in [", lo, ", ", hi, "])");
  }
  check_status(op, "CPU", st);
}

at::Tensor xattn_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& media_index, bool all_previous, double scale) {
  const CpuBlockCacheScope cached(/*bounded=*/true);  // outputs on mapped blocks (fresh_outputs)
  const XShape s = check_xattn(kXFwd, q, k, v, media_index, nullptr);
  const DType dt = to_dtype(kXFwd, q, /*allow_half=*/false, "CPU");
  const at::Tensor mi = media_index.to(at::kInt);
  at::Tensor out = at::empty(q.sizes(), q.options());
  ImageCausalAttnParams p;
  p.dtype = dt;
  p.B = s.B; p.T = s.T; p.H = s.H; p.dh = s.dh; p.M = s.M; p.N = s.N;
  p.all_previous = all_previous;
  p.scale = scale;
  p.q = q.data_ptr(); copy_strides(p.q_strides, q);
  p.k = k.data_ptr(); copy_strides(p.k_strides, k);
  p.v = v.data_ptr(); copy_strides(p.v_strides, v);
  p.media_index = mi.data_ptr<int32_t>(); copy_strides(p.media_index_strides, mi);
  p.out = out.data_ptr(); copy_strides(p.out_strides, out);
  check_index_status(kXFwd, image_causal_attention_fwd_cpu(p), mi, s.M);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> xattn_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& media_index, bool all_previous, double scale) {
  const CpuBlockCacheScope cached(/*bounded=*/true);  // outputs on mapped blocks (fresh_outputs)
  const XShape s = check_xattn(kXBwd, q, k, v, media_index, &grad_out);
  const DType dt = to_dtype(kXBwd, q, /*allow_half=*/false, "CPU");
  const at::Tensor mi = media_index.to(at::kInt);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  ImageCausalAttnBackwardParams p;
  p.dtype = dt;
  p.B = s.B; p.T = s.T; p.H = s.H; p.dh = s.dh; p.M = s.M; p.N = s.N;
  p.all_previous = all_previous;
  p.scale = scale;
  p.grad_out = grad_out.data_ptr(); copy_strides(p.grad_out_strides, grad_out);
  p.q = q.data_ptr(); copy_strides(p.q_strides, q);
  p.k = k.data_ptr(); copy_strides(p.k_strides, k);
  p.v = v.data_ptr(); copy_strides(p.v_strides, v);
  p.media_index = mi.data_ptr<int32_t>(); copy_strides(p.media_index_strides, mi);
  p.dq = dq.data_ptr(); copy_strides(p.dq_strides, dq);
  p.dk = dk.data_ptr(); copy_strides(p.dk_strides, dk);
  p.dv = dv.data_ptr(); copy_strides(p.dv_strides, dv);
  check_index_status(kXBwd, image_causal_attention_bwd_cpu(p), mi, s.M);
  return {dq, dk, dv};
}

constexpr const char* kRFwd = "flamingo_rt_C::resampler_attention";
constexpr const char* kRBwd = "flamingo_rt_C::resampler_attention_backward";
constexpr const char* kRBwdPacked = "flamingo_rt_C::resampler_attention_backward_kvpacked";

void check_resampler(const char* op, const at::Tensor& q, const at::Tensor& k_x, const at::Tensor& v_x,
                     const at::Tensor& k_l, const at::Tensor& v_l, const at::Tensor* grad_out) {
  TORCH_CHECK(q.dim() == 4, op, ": expected q of shape (N, L, H, dh), got ", q.sizes());
  const int64_t n = q.size(0), H = q.size(2), dh = q.size(3);
  for (const at::Tensor* t : {&k_x, &k_l}) {
    TORCH_CHECK(t->dim() == 4 && t->size(0) == n && t->size(2) == H && t->size(3) == dh, op,
                ": expected k_x and k_l of shape (N, S, H, dh) = (", n, ", S, ", H, ", ", dh, "), got ",
                k_x.sizes(), " and ", k_l.sizes());
  }
  TORCH_CHECK(v_x.sizes() == k_x.sizes() && v_l.sizes() == k_l.sizes(), op,
              ": expected v_x, v_l of the shapes of k_x, k_l ", k_x.sizes(), ", ", k_l.sizes(), ", got ",
              v_x.sizes(), ", ", v_l.sizes());
  for (const at::Tensor* t : {&k_x, &v_x, &k_l, &v_l}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": expected q, k_x, v_x, k_l, v_l of one dtype, got ",
                q.scalar_type(), " and ", t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), op, ": expected every tensor on ", q.device(), ", got one on ",
                t->device());
  }
  TORCH_CHECK(k_x.size(1) + k_l.size(1) > 0, op, ": expected at least one key (S + L' > 0)");
  if (grad_out != nullptr) {
    TORCH_CHECK(grad_out->sizes() == q.sizes() && grad_out->scalar_type() == q.scalar_type(), op,
                ": expected grad_out of the shape and dtype of q (", q.sizes(), ", ", q.scalar_type(), "), got ",
                grad_out->sizes(), ", ", grad_out->scalar_type());
  }
}

// (N, S, H, dh) strides -> the kernel's (B, M = 1, N, H, dh).
void media_strides(int64_t (&dst)[5], const at::Tensor& t) {
  dst[0] = t.stride(0);
  dst[1] = 0;
  dst[2] = t.stride(1);
  dst[3] = t.stride(2);
  dst[4] = t.stride(3);
}

// The fields the resampler's forward and backward params share: one medium per batch row,
// one "image" of S + L' keys (k_x/v_x, then k_l/v_l as the n_tail source), media_index 0.
template <class P>
void fill_resampler(P& p, DType dt, const at::Tensor& q, const at::Tensor& k_x, const at::Tensor& v_x,
                    const at::Tensor& k_l, const at::Tensor& v_l, const at::Tensor& mi, double scale) {
  p.dtype = dt;
  p.B = q.size(0); p.T = q.size(1); p.H = q.size(2); p.dh = q.size(3); p.M = 1;
  p.N = k_x.size(1) + k_l.size(1);
  p.n_tail = k_l.size(1);
  p.scale = scale;
  p.q = q.data_ptr(); copy_strides(p.q_strides, q);
  p.k = k_x.data_ptr(); media_strides(p.k_strides, k_x);
  p.v = v_x.data_ptr(); media_strides(p.v_strides, v_x);
  p.k_tail = k_l.data_ptr(); media_strides(p.k_tail_strides, k_l);
  p.v_tail = v_l.data_ptr(); media_strides(p.v_tail_strides, v_l);
  p.media_index = mi.data_ptr<int32_t>(); copy_strides(p.media_index_strides, mi);
}

at::Tensor resampler_cpu(const at::Tensor& q, const at::Tensor& k_x, const at::Tensor& v_x,
                         const at::Tensor& k_l, const at::Tensor& v_l, double scale) {
  const CpuBlockCacheScope cached(/*bounded=*/true);  // outputs on mapped blocks (fresh_outputs)
  check_resampler(kRFwd, q, k_x, v_x, k_l, v_l, nullptr);
  const DType dt = to_dtype(kRFwd, q, /*allow_half=*/false, "CPU");
  const at::Tensor mi = at::zeros({q.size(0), q.size(1)}, q.options().dtype(at::kInt));
  at::Tensor out = at::empty(q.sizes(), q.options());
  ImageCausalAttnParams p;
  fill_resampler(p, dt, q, k_x, v_x, k_l, v_l, mi, scale);
  p.out = out.data_ptr(); copy_strides(p.out_strides, out);
  check_status(kRFwd, "CPU", image_causal_attention_fwd_cpu(p));
  return out;
}

// The resampler's backward into the given gradient tensors (any strides: views of packed
// (N, S, 2, H, dh) buffers for the kv-packed op).
void resampler_bwd_into(const char* op, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k_x,
                        const at::Tensor& v_x, const at::Tensor& k_l, const at::Tensor& v_l, double scale,
                        const at::Tensor& dq, const at::Tensor& dk_x, const at::Tensor& dv_x,
                        const at::Tensor& dk_l, const at::Tensor& dv_l) {
  check_resampler(op, q, k_x, v_x, k_l, v_l, &grad_out);
  const DType dt = to_dtype(op, q, /*allow_half=*/false, "CPU");
  const at::Tensor mi = at::zeros({q.size(0), q.size(1)}, q.options().dtype(at::kInt));
  ImageCausalAttnBackwardParams p;
  fill_resampler(p, dt, q, k_x, v_x, k_l, v_l, mi, scale);
  p.grad_out = grad_out.data_ptr(); copy_strides(p.grad_out_strides, grad_out);
  p.dq = dq.data_ptr(); copy_strides(p.dq_strides, dq);
  p.dk = dk_x.data_ptr(); media_strides(p.dk_strides, dk_x);
  p.dv = dv_x.data_ptr(); media_strides(p.dv_strides, dv_x);
  p.dk_tail = dk_l.data_ptr(); media_strides(p.dk_tail_strides, dk_l);
  p.dv_tail = dv_l.data_ptr(); media_strides(p.dv_tail_strides, dv_l);
  check_status(op, "CPU", image_causal_attention_bwd_cpu(p));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> resampler_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k_x, const at::Tensor& v_x,
    const at::Tensor& k_l, const at::Tensor& v_l, double scale) {
  const CpuBlockCacheScope cached(/*bounded=*/true);  // outputs on mapped blocks (fresh_outputs)
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk_x = at::empty(k_x.sizes(), k_x.options()), dv_x = at::empty(v_x.sizes(), v_x.options());
  at::Tensor dk_l = at::empty(k_l.sizes(), k_l.options()), dv_l = at::empty(v_l.sizes(), v_l.options());
  resampler_bwd_into(kRBwd, grad_out, q, k_x, v_x, k_l, v_l, scale, dq, dk_x, dv_x, dk_l, dv_l);
  return {dq, dk_x, dv_x, dk_l, dv_l};
}

// (dq, d[k_x | v_x] (N, S, 2, H, dh), d[k_l | v_l] (N, L', 2, H, dh)): the keys' and values'
// gradients written side by side, as the packed [K | V] projection that made k and v wants
// them (no stack of two separate gradients afterwards).
std::tuple<at::Tensor, at::Tensor, at::Tensor> resampler_bwd_kvpacked_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k_x, const at::Tensor& v_x,
    const at::Tensor& k_l, const at::Tensor& v_l, double scale) {
  const CpuBlockCacheScope cached(/*bounded=*/true);  // outputs on mapped blocks (fresh_outputs)
  TORCH_CHECK(k_x.dim() == 4 && k_l.dim() == 4, kRBwdPacked, ": expected k_x, k_l of shape (N, S, H, dh), got ",
              k_x.sizes(), " and ", k_l.sizes());
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dkv_x = at::empty({k_x.size(0), k_x.size(1), 2, k_x.size(2), k_x.size(3)}, k_x.options());
  at::Tensor dkv_l = at::empty({k_l.size(0), k_l.size(1), 2, k_l.size(2), k_l.size(3)}, k_l.options());
  resampler_bwd_into(kRBwdPacked, grad_out, q, k_x, v_x, k_l, v_l, scale, dq, dkv_x.select(2, 0),
                     dkv_x.select(2, 1), dkv_l.select(2, 0), dkv_l.select(2, 1));
  return {dq, dkv_x, dkv_l};
}

}  // namespace
}  // namespace torch_ops
}  // namespace flamingo_rt

TORCH_LIBRARY_FRAGMENT(flamingo_rt_C, m) {
  m.def(
      "image_causal_attention(Tensor q, Tensor k, Tensor v, Tensor media_index, bool all_previous, "
      "float scale) -> Tensor");
  m.def(
      "image_causal_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
      "Tensor media_index, bool all_previous, float scale) -> (Tensor, Tensor, Tensor)");
  // resampler_attention: CPU impl here, CUDA impl in csrc/torch/resampler_cuda_ops.cpp
  m.def("resampler_attention(Tensor q, Tensor k_x, Tensor v_x, Tensor k_l, Tensor v_l, float scale) -> Tensor");
  m.def(
      "resampler_attention_backward(Tensor grad_out, Tensor q, Tensor k_x, Tensor v_x, Tensor k_l, "
      "Tensor v_l, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "resampler_attention_backward_kvpacked(Tensor grad_out, Tensor q, Tensor k_x, Tensor v_x, "
      "Tensor k_l, Tensor v_l, float scale) -> (Tensor, Tensor, Tensor)");
  // whether the bfloat16 attention forwards above run on AMX tiles (flamingo_rt::cpu_amx_enabled)
  m.def("cpu_amx_enabled() -> bool", [] { return flamingo_rt::cpu_amx_enabled(); });
}

TORCH_LIBRARY_IMPL(flamingo_rt_C, CPU, m) {
  m.impl("image_causal_attention", &flamingo_rt::torch_ops::xattn_cpu);
  m.impl("image_causal_attention_backward", &flamingo_rt::torch_ops::xattn_bwd_cpu);
  m.impl("resampler_attention", &flamingo_rt::torch_ops::resampler_cpu);
  m.impl("resampler_attention_backward", &flamingo_rt::torch_ops::resampler_bwd_cpu);
  m.impl("resampler_attention_backward_kvpacked", &flamingo_rt::torch_ops::resampler_bwd_kvpacked_cpu);
}

