// torch ops over the fused decode-step kernels (csrc/cpu/decode_layer.cpp):
//
//   flamingo_rt_C::decoder_layer_step_(Tensor(a!) h, Tensor[] weights, Tensor?[] biases,
//       Tensor cos, Tensor sin, Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor slot,
//       Tensor mask, float eps1, float eps2, float scale) -> ()
//     weights: [input_layernorm, q_proj, k_proj, v_proj, o_proj, post_attention_layernorm,
//               gate_proj, up_proj, down_proj] weights; biases: [q, k, v, o, gate, up, down]
//     (None where absent); h (B, D) contiguous; cos, sin (B, Dh) float32; caches
//     (B, Hkv, S, Dh); slot: the token's cache slot (one int64); mask (B, E) bool over the
//     first E slots.
//
//   flamingo_rt_C::xattn_block_step_(Tensor(a!) h, Tensor[] weights, Tensor?[] gates,
//       Tensor k, Tensor v, Tensor media_index, bool all_previous, bool squared_relu,
//       float attn_eps, float ff_eps) -> ()
//     weights: [attn.norm weight, attn.norm bias, to_q, to_out, ff.norm weight,
//               ff.norm bias, fc1, fc2]; gates: [attn_gate, ff_gate] (None: ungated);
//     k, v (B, M, N, H, Dh) media keys / values; media_index (B,) int32 (-1: no image).
//
// Both update h in place (one token per row, B <= 16; no autograd: inference only). CPU
// kernels; fake kernels in flamingo_rt/_cpp_fakes.py.
#include <torch/library.h>

#include "common.h"

namespace flamingo_rt {
namespace torch_ops {
namespace {

constexpr const char* kDL = "flamingo_rt_C::decoder_layer_step_";
constexpr const char* kXB = "flamingo_rt_C::xattn_block_step_";

// A weight (rows, cols) of h's dtype, on the CPU, with contiguous rows.
void check_matrix(const char* op, const char* name, const at::Tensor& w, int64_t rows, int64_t cols,
                  const at::Tensor& h) {
  TORCH_CHECK(w.dim() == 2 && w.size(0) == rows && w.size(1) == cols, op, ": expected ", name, " of shape (", rows,
              ", ", cols, "), got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == h.scalar_type() && w.device().is_cpu() && w.is_contiguous(), op, ": expected ", name,
              " a contiguous CPU tensor of dtype ", h.scalar_type(), ", got ", w.scalar_type(), " on ", w.device(),
              w.is_contiguous() ? "" : " (not contiguous)");
}

void check_vector(const char* op, const char* name, const at::Tensor& w, int64_t n, const at::Tensor& h) {
  TORCH_CHECK(w.dim() == 1 && w.size(0) == n, op, ": expected ", name, " of shape (", n, ",), got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == h.scalar_type() && w.device().is_cpu() && w.is_contiguous(), op, ": expected ", name,
              " a contiguous CPU tensor of dtype ", h.scalar_type(), ", got ", w.scalar_type(), " on ", w.device());
}

const void* optional_vector(const char* op, const char* name, const c10::optional<at::Tensor>& b, int64_t n,
                            const at::Tensor& h) {
  if (!b.has_value()) return nullptr;
  check_vector(op, name, *b, n, h);
  return b->data_ptr();
}

void check_h(const char* op, const at::Tensor& h) {
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous() && h.device().is_cpu(), op,
              ": expected h a contiguous CPU tensor (B, D), got ", h.sizes(), " on ", h.device());
  TORCH_CHECK(h.size(0) <= kSmallLinearMaxRows, op, ": expected at most ", kSmallLinearMaxRows, " rows, got ",
              h.size(0));
}

void decoder_layer_step_cpu_impl(at::Tensor& h, at::TensorList weights, const c10::List<c10::optional<at::Tensor>>& biases,
                                 const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                                 const at::Tensor& slot, const at::Tensor& mask, double eps1, double eps2, double scale) {
  check_h(kDL, h);
  TORCH_CHECK(weights.size() == 9, kDL, ": expected 9 weights (ln1, q, k, v, o, ln2, gate, up, down), got ",
              weights.size());
  TORCH_CHECK(biases.size() == 7, kDL, ": expected 7 biases (q, k, v, o, gate, up, down; None where absent), got ",
              biases.size());
  const int64_t B = h.size(0), D = h.size(1);
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == B && cos.sizes() == sin.sizes() && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous(),
              kDL, ": expected contiguous float32 cos and sin of shape (", B, ", Dh), got ", cos.sizes(), " ",
              cos.scalar_type(), " and ", sin.sizes(), " ", sin.scalar_type());
  const int64_t Dh = cos.size(1);
  TORCH_CHECK(Dh >= 2 && Dh % 2 == 0, kDL, ": expected an even head dim, got ", Dh);
  const at::Tensor& q_w = weights[1];
  const at::Tensor& k_w = weights[2];
  TORCH_CHECK(q_w.dim() == 2 && k_w.dim() == 2 && q_w.size(0) % Dh == 0 && k_w.size(0) % Dh == 0, kDL,
              ": expected q_proj / k_proj weights of H * ", Dh, " and Hkv * ", Dh, " rows, got ", q_w.sizes(), " and ",
              k_w.sizes());
  const int64_t H = q_w.size(0) / Dh, Hkv = k_w.size(0) / Dh, F = weights[6].dim() == 2 ? weights[6].size(0) : 0;
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, kDL, ": expected H = ", H, " query heads a multiple of Hkv = ", Hkv);
  check_vector(kDL, "input_layernorm.weight", weights[0], D, h);
  check_matrix(kDL, "q_proj.weight", q_w, H * Dh, D, h);
  check_matrix(kDL, "k_proj.weight", k_w, Hkv * Dh, D, h);
  check_matrix(kDL, "v_proj.weight", weights[3], Hkv * Dh, D, h);
  check_matrix(kDL, "o_proj.weight", weights[4], D, H * Dh, h);
  check_vector(kDL, "post_attention_layernorm.weight", weights[5], D, h);
  check_matrix(kDL, "gate_proj.weight", weights[6], F, D, h);
  check_matrix(kDL, "up_proj.weight", weights[7], F, D, h);
  check_matrix(kDL, "down_proj.weight", weights[8], D, F, h);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == B &&
                  k_cache.size(1) == Hkv && k_cache.size(3) == Dh,
              kDL, ": expected k and v caches of shape (", B, ", ", Hkv, ", S, ", Dh, "), got ", k_cache.sizes(),
              " and ", v_cache.sizes());
  TORCH_CHECK(k_cache.scalar_type() == h.scalar_type() && v_cache.scalar_type() == h.scalar_type() &&
                  k_cache.device().is_cpu() && v_cache.device().is_cpu() && k_cache.stride(3) == 1 &&
                  v_cache.stride(3) == 1,
              kDL, ": expected CPU caches of dtype ", h.scalar_type(), " with unit stride along Dh, got ",
              k_cache.scalar_type(), " ", k_cache.strides(), " and ", v_cache.scalar_type(), " ", v_cache.strides());
  const int64_t S = k_cache.size(2);
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == B && mask.size(1) >= 1 &&
                  mask.size(1) <= S && (mask.size(1) == 1 || mask.stride(1) == 1) && mask.device().is_cpu(),
              kDL, ": expected a bool mask (", B, ", E) with 1 <= E <= ", S, " and unit stride along E, got ",
              mask.sizes(), " ", mask.scalar_type(), " strides ", mask.strides());
  TORCH_CHECK(slot.numel() == 1 && slot.scalar_type() == at::kLong && slot.device().is_cpu(), kDL,
              ": expected slot one int64 on the CPU, got ", slot.sizes(), " ", slot.scalar_type());
  const int64_t s = slot.data_ptr<int64_t>()[0];
  TORCH_CHECK(s >= 0 && s < mask.size(1), kDL, ": expected slot in [0, ", mask.size(1), "), got ", s);
  DecoderLayerStepParams p;
  p.h = h.data_ptr();
  p.B = B;
  p.D = D;
  p.H = H;
  p.Hkv = Hkv;
  p.Dh = Dh;
  p.F = F;
  p.dtype = to_dtype(kDL, h, /*allow_half=*/false, "CPU");
  p.ln1_w = weights[0].data_ptr();
  p.q_w = q_w.data_ptr();
  p.k_w = k_w.data_ptr();
  p.v_w = weights[3].data_ptr();
  p.o_w = weights[4].data_ptr();
  p.ln2_w = weights[5].data_ptr();
  p.gate_w = weights[6].data_ptr();
  p.up_w = weights[7].data_ptr();
  p.down_w = weights[8].data_ptr();
  p.q_b = optional_vector(kDL, "q_proj.bias", biases.get(0), H * Dh, h);
  p.k_b = optional_vector(kDL, "k_proj.bias", biases.get(1), Hkv * Dh, h);
  p.v_b = optional_vector(kDL, "v_proj.bias", biases.get(2), Hkv * Dh, h);
  p.o_b = optional_vector(kDL, "o_proj.bias", biases.get(3), D, h);
  p.gate_b = optional_vector(kDL, "gate_proj.bias", biases.get(4), F, h);
  p.up_b = optional_vector(kDL, "up_proj.bias", biases.get(5), F, h);
  p.down_b = optional_vector(kDL, "down_proj.bias", biases.get(6), D, h);
  p.eps1 = static_cast<float>(eps1);
  p.eps2 = static_cast<float>(eps2);
  p.cos = cos.data_ptr<float>();
  p.sin = sin.data_ptr<float>();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.S = S;
  p.k_sb = k_cache.stride(0);
  p.k_sh = k_cache.stride(1);
  p.k_ss = k_cache.stride(2);
  p.v_sb = v_cache.stride(0);
  p.v_sh = v_cache.stride(1);
  p.v_ss = v_cache.stride(2);
  p.slot = s;
  p.mask = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  p.E = mask.size(1);
  p.mask_sb = mask.stride(0);
  p.scale = static_cast<float>(scale);
  const Status st = decoder_layer_step_cpu(p);
  TORCH_CHECK(st == Status::kOk, kDL, ": kernel failed: ", status_string(st));
}

void xattn_block_step_cpu_impl(at::Tensor& h, at::TensorList weights, const c10::List<c10::optional<at::Tensor>>& gates,
                               const at::Tensor& k, const at::Tensor& v, const at::Tensor& media_index,
                               bool all_previous, bool squared_relu, double attn_eps, double ff_eps) {
  check_h(kXB, h);
  TORCH_CHECK(weights.size() == 8, kXB,
              ": expected 8 weights (attn norm weight, bias, to_q, to_out, ff norm weight, bias, fc1, fc2), got ",
              weights.size());
  TORCH_CHECK(gates.size() == 2, kXB, ": expected 2 gates (attn, ff; None when ungated), got ", gates.size());
  const int64_t B = h.size(0), D = h.size(1);
  TORCH_CHECK(k.dim() == 5 && k.sizes() == v.sizes() && k.size(0) == B, kXB,
              ": expected media keys and values of shape (", B, ", M, N, H, Dh), got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.scalar_type() == h.scalar_type() && v.scalar_type() == h.scalar_type() && k.device().is_cpu() &&
                  v.device().is_cpu() && k.stride(4) == 1 && v.stride(4) == 1,
              kXB, ": expected CPU media keys / values of dtype ", h.scalar_type(),
              " with unit stride along Dh, got ", k.scalar_type(), " ", k.strides(), " and ", v.scalar_type(), " ",
              v.strides());
  const int64_t M = k.size(1), N = k.size(2), H = k.size(3), Dh = k.size(4), I = H * Dh;
  const at::Tensor& fc1 = weights[6];
  const int64_t F = fc1.dim() == 2 ? fc1.size(0) : 0;
  check_vector(kXB, "attn.norm.weight", weights[0], D, h);
  check_vector(kXB, "attn.norm.bias", weights[1], D, h);
  check_matrix(kXB, "attn.to_q.weight", weights[2], I, D, h);
  check_matrix(kXB, "attn.to_out.weight", weights[3], D, I, h);
  check_vector(kXB, "ff.norm.weight", weights[4], D, h);
  check_vector(kXB, "ff.norm.bias", weights[5], D, h);
  check_matrix(kXB, "ff.fc1.weight", fc1, F, D, h);
  check_matrix(kXB, "ff.fc2.weight", weights[7], D, F, h);
  TORCH_CHECK(media_index.dim() == 1 && media_index.size(0) == B && media_index.scalar_type() == at::kInt &&
                  media_index.is_contiguous() && media_index.device().is_cpu(),
              kXB, ": expected media_index a contiguous int32 CPU tensor of shape (", B, ",), got ",
              media_index.sizes(), " ", media_index.scalar_type());
  const int32_t* idx = media_index.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(idx[b] >= -1 && idx[b] < M, kXB, ": expected media_index[", b, "] in [-1, ", M, "), got ", idx[b]);
  if (all_previous && M > 1)
    TORCH_CHECK(k.stride(1) == N * k.stride(2) && v.stride(1) == N * v.stride(2), kXB,
                ": all_previous needs evenly spaced images (stride over M = N x stride over N), got ", k.strides(),
                " and ", v.strides());
  XattnBlockStepParams p;
  p.h = h.data_ptr();
  p.B = B;
  p.D = D;
  p.H = H;
  p.Dh = Dh;
  p.F = F;
  p.dtype = to_dtype(kXB, h, /*allow_half=*/false, "CPU");
  p.attn_ln_w = weights[0].data_ptr();
  p.attn_ln_b = weights[1].data_ptr();
  p.attn_eps = static_cast<float>(attn_eps);
  p.q_w = weights[2].data_ptr();
  p.out_w = weights[3].data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.M = M;
  p.N = N;
  p.k_sb = k.stride(0);
  p.k_sm = k.stride(1);
  p.k_sn = k.stride(2);
  p.k_sh = k.stride(3);
  p.v_sb = v.stride(0);
  p.v_sm = v.stride(1);
  p.v_sn = v.stride(2);
  p.v_sh = v.stride(3);
  p.media_index = idx;
  p.all_previous = all_previous;
  p.attn_gate = optional_vector(kXB, "attn_gate", gates.get(0), 1, h);
  p.ff_gate = optional_vector(kXB, "ff_gate", gates.get(1), 1, h);
  p.ff_ln_w = weights[4].data_ptr();
  p.ff_ln_b = weights[5].data_ptr();
  p.ff_eps = static_cast<float>(ff_eps);
  p.fc1_w = fc1.data_ptr();
  p.fc2_w = weights[7].data_ptr();
  p.squared_relu = squared_relu;
  p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(Dh)));
  const Status st = xattn_block_step_cpu(p);
  TORCH_CHECK(st == Status::kOk, kXB, ": kernel failed: ", status_string(st));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flamingo_rt_C, m) {
  m.def(
      "decoder_layer_step_(Tensor(a!) h, Tensor[] weights, Tensor?[] biases, Tensor cos, Tensor sin, "
      "Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor slot, Tensor mask, float eps1, float eps2, float scale) -> ()");
  m.def(
      "xattn_block_step_(Tensor(a!) h, Tensor[] weights, Tensor?[] gates, Tensor k, Tensor v, Tensor media_index, "
      "bool all_previous, bool squared_relu, float attn_eps, float ff_eps) -> ()");
}

TORCH_LIBRARY_IMPL(flamingo_rt_C, CPU, m) {
  m.impl("decoder_layer_step_", &decoder_layer_step_cpu_impl);
  m.impl("xattn_block_step_", &xattn_block_step_cpu_impl);
}

}  // namespace torch_ops
}  // namespace flamingo_rt
