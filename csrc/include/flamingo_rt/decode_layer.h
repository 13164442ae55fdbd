// Fused decode steps on the CPU: a whole layer for one token per sequence in one call.
//
// At decode time (one new token per row, B <= kSmallLinearMaxRows rows) a layer is a
// handful of matrix-vector products (their cost: reading the weights once, see
// small_linear.h) and a few dozen small elementwise ops, which run eagerly as separate
// torch ops cost more, in op dispatch and Python, than their arithmetic. These kernels run
// a layer's whole sequence in one call: the products through small_linear_cpu, the cached
// attention through decode_attention_cpu, the rest in plain loops over (B, D).
//
// Numerics are those of the eager modules: the result of every step the eager code rounds
// to the activation dtype (bfloat16) is rounded here at the same place (RMSNorm's
// normalized x before its weight, each product's output, each rotary term, silu(g) before
// the product with u, each residual add, ...), with float32 math between (float64 for
// float64). The eager path's element-wise ops and sums may differ in their last bits
// (summation order, exp / erf approximations).
//
// h (B, D) is the residual stream, contiguous, updated in place. Weights are (N, K) with
// contiguous rows (nn.Linear's layout); every tensor is of `dtype` except where noted.
#pragma once

#include <cstdint>

namespace flamingo_rt {

// One LLaMA decoder layer (pre-norm RMSNorm, rotary self-attention with grouped-query heads
// against a static KV cache, SwiGLU MLP):
//   x = rms(h) * ln1;  q, k, v = x Wq^T (+bq), x Wk^T (+bk), x Wv^T (+bv)
//   q, k = rope(q), rope(k) (rotate-half, tables cos / sin);  k, v -> cache[:, :, slot]
//   h += attend(q, cache[:, :, :E], mask) Wo^T (+bo)
//   x = rms(h) * ln2;  h += (silu(x Wg^T) * (x Wu^T)) Wd^T (+ biases)
struct DecoderLayerStepParams {
  void* h = nullptr;  // (B, D), updated in place
  int64_t B = 0, D = 0, H = 0, Hkv = 0, Dh = 0, F = 0;
  DType dtype = DType::kFloat32;
  const void* ln1_w = nullptr;  // (D,)
  const void* ln2_w = nullptr;  // (D,)
  float eps1 = 1e-5f, eps2 = 1e-5f;
  const void* q_w = nullptr;  // (H * Dh, D)
  const void* k_w = nullptr;  // (Hkv * Dh, D)
  const void* v_w = nullptr;  // (Hkv * Dh, D)
  const void* o_w = nullptr;  // (D, H * Dh)
  const void* gate_w = nullptr;  // (F, D)
  const void* up_w = nullptr;    // (F, D)
  const void* down_w = nullptr;  // (D, F)
  // optional biases (nullptr: none), of the products' output sizes
  const void* q_b = nullptr;
  const void* k_b = nullptr;
  const void* v_b = nullptr;
  const void* o_b = nullptr;
  const void* gate_b = nullptr;
  const void* up_b = nullptr;
  const void* down_b = nullptr;
  const float* cos = nullptr;  // (B, Dh) float32 rotary tables of this token's position
  const float* sin = nullptr;
  // static cache (B, Hkv, S, Dh): strides in elements, unit along Dh
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  int64_t S = 0;
  int64_t k_sb = 0, k_sh = 0, k_ss = 0;
  int64_t v_sb = 0, v_sh = 0, v_ss = 0;
  int64_t slot = 0;                // cache slot of this token, 0 <= slot < E
  const uint8_t* mask = nullptr;   // (B, E) 1 = visible slot, row stride mask_sb, unit slot stride
  int64_t E = 0, mask_sb = 0;      // the attention reads slots [0, E), E <= S
  float scale = 1.0f;              // of the attention scores (Dh ** -0.5)
};

Status decoder_layer_step_cpu(const DecoderLayerStepParams& p);

// One GATED XATTN-DENSE block (OpenFlamingo's):
//   h += tanh(attn_gate) * attend(LN_a(h) Wq^T, media K/V of the row's image) Wout^T
//   h += tanh(ff_gate) * act(LN_f(h) W1^T) W2^T
// act: GELU (exact) or squared ReLU; no gates (null): a factor of 1. A row's image is
// media_index[b] (-1: none, the attention then contributes exactly 0); with all_previous
// the row attends the tokens of images 0 .. media_index[b].
struct XattnBlockStepParams {
  void* h = nullptr;  // (B, D), updated in place
  int64_t B = 0, D = 0, H = 0, Dh = 0, F = 0;
  DType dtype = DType::kFloat32;
  const void* attn_ln_w = nullptr;  // (D,) LayerNorm weight and bias
  const void* attn_ln_b = nullptr;
  float attn_eps = 1e-5f;
  const void* q_w = nullptr;    // (H * Dh, D)
  const void* out_w = nullptr;  // (D, H * Dh)
  // media keys / values (B, M, N, H, Dh), strides in elements, unit along Dh; with
  // all_previous the images must be evenly spaced (k_sm == N * k_sn, the same for v)
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t M = 0, N = 0;
  int64_t k_sb = 0, k_sm = 0, k_sn = 0, k_sh = 0;
  int64_t v_sb = 0, v_sm = 0, v_sn = 0, v_sh = 0;
  const int32_t* media_index = nullptr;  // (B,)
  bool all_previous = false;
  const void* attn_gate = nullptr;  // (1,) or nullptr
  const void* ff_gate = nullptr;    // (1,) or nullptr
  const void* ff_ln_w = nullptr;    // (D,)
  const void* ff_ln_b = nullptr;
  float ff_eps = 1e-5f;
  const void* fc1_w = nullptr;  // (F, D)
  const void* fc2_w = nullptr;  // (D, F)
  bool squared_relu = false;    // the FF's activation: false GELU, true relu(x)^2
  float scale = 1.0f;           // of the attention scores (Dh ** -0.5)
};

Status xattn_block_step_cpu(const XattnBlockStepParams& p);

}  // namespace flamingo_rt
