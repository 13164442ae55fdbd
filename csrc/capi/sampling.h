// The next token from a row of logits: greedy, or temperature / top-k / top-p sampling.
#pragma once

#include <cstdint>
#include <random>

namespace flamingo_rt::capi {

struct SamplingParams {
  float temperature = 0.f;  // 0: greedy
  int top_k = 0;            // 0: off
  float top_p = 1.f;        // 1: off
};

// logits: `n` float32 values. Greedy takes the first maximum (as torch.argmax).
int32_t choose_token(const float* logits, int64_t n, const SamplingParams& p, std::mt19937_64& rng);

}  // namespace flamingo_rt::capi
