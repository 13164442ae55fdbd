// Decode attention: one new query per sequence against a static self-attention KV cache.
//
// out[b, h, :] = sum_s p[b, h, s] * v[b, h / G, s, :] with
// p[b, h, :] = softmax over the visible slots s (mask[b, s] != 0) of
// scale * <q[b, h, :], k[b, h / G, s, :]>, G = H / Hkv (grouped-query attention). A row with
// no visible slot gives 0; one whose visible scores are all NaN or -inf gives NaN, as softmax
// does (a NaN among finite scores propagates through the sums). float32 and bfloat16 (float32 math and accumulation), float64 for
// checking. The cost is reading the cache once: K for the scores, then V for the sum.
// The last dimension (Dh) of q, k, v has unit stride; the other strides are in elements.
#pragma once

#include <cstdint>

namespace flamingo_rt {

struct DecodeAttentionParams {
  const void* q = nullptr;        // (B, H, Dh), strides q_sb, q_sh
  const void* k = nullptr;        // (B, Hkv, S, Dh), strides k_sb, k_sh, k_ss
  const void* v = nullptr;        // (B, Hkv, S, Dh), strides v_sb, v_sh, v_ss
  const uint8_t* mask = nullptr;  // (B, S), 1 = visible; row stride mask_sb, unit slot stride
  void* out = nullptr;            // (B, H, Dh), contiguous
  int64_t B = 0, H = 0, Hkv = 0, S = 0, Dh = 0;
  int64_t q_sb = 0, q_sh = 0;
  int64_t k_sb = 0, k_sh = 0, k_ss = 0;
  int64_t v_sb = 0, v_sh = 0, v_ss = 0;
  int64_t mask_sb = 0;
  float scale = 1.0f;
  DType dtype = DType::kFloat32;
};

Status decode_attention_cpu(const DecodeAttentionParams& p);

}  // namespace flamingo_rt
