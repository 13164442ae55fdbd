// torch op over the decode-attention kernel (csrc/cpu/decode_attention.cpp):
//
//   flamingo_rt_C::decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor
//
// q (B, H, 1, Dh); k, v (B, Hkv, S, Dh) (the static cache); mask (B, 1, 1, S) bool, True =
// visible. Output (B, H, 1, Dh) in q's dtype. Unit stride along Dh. CPU kernel (fake
// kernel in flamingo_rt/_cpp_fakes.py); no autograd (decode only).
#include <torch/library.h>

#include <ATen/ops/empty.h>

#include "common.h"

namespace flamingo_rt {
namespace torch_ops {
namespace {

constexpr const char* kDA = "flamingo_rt_C::decode_attention";

at::Tensor decode_attention_cpu_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, kDA, ": expected q of shape (B, H, 1, Dh), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(3) == q.size(3), kDA,
              ": expected k and v of shape (B, Hkv, S, Dh) = (", q.size(0), ", Hkv, S, ", q.size(3), "), got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, kDA, ": expected H = ", q.size(1),
              " query heads to be a multiple of Hkv = ", k.size(1));
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 4 && mask.size(0) == q.size(0) && mask.size(1) == 1 &&
                  mask.size(2) == 1 && mask.size(3) == k.size(2),
              kDA, ": expected a bool mask of shape (", q.size(0), ", 1, 1, ", k.size(2), "), got ", mask.sizes(), " ",
              mask.scalar_type());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), kDA,
              ": expected q, k, v of one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && mask.device().is_cpu(), kDA,
              ": expected CPU tensors");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, kDA,
              ": expected unit stride along Dh, got strides ", q.strides(), ", ", k.strides(), ", ", v.strides());
  const at::Tensor m = mask.size(3) > 1 && mask.stride(3) != 1 ? mask.contiguous() : mask;
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  DecodeAttentionParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.mask = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
  p.out = out.data_ptr();
  p.B = q.size(0);
  p.H = q.size(1);
  p.Hkv = k.size(1);
  p.S = k.size(2);
  p.Dh = q.size(3);
  p.q_sb = q.stride(0);
  p.q_sh = q.stride(1);
  p.k_sb = k.stride(0);
  p.k_sh = k.stride(1);
  p.k_ss = k.stride(2);
  p.v_sb = v.stride(0);
  p.v_sh = v.stride(1);
  p.v_ss = v.stride(2);
  p.mask_sb = m.stride(0);
  p.scale = static_cast<float>(scale);
  p.dtype = to_dtype(kDA, q, /*allow_half=*/false, "CPU");
  const Status s = decode_attention_cpu(p);
  TORCH_CHECK(s == Status::kOk, kDA, ": kernel failed: ", status_string(s));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flamingo_rt_C, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(flamingo_rt_C, CPU, m) { m.impl("decode_attention", &decode_attention_cpu_impl); }

}  // namespace torch_ops
}  // namespace flamingo_rt
