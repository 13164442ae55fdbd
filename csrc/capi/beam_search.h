// Beam search for one prompt, with the rules of Hugging Face's (transformers 4.36, the version
// open_flamingo's generate runs), as flamingo_rt/runtime/generate.py's _beam_search and
// flamingo_rt/runtime/beams.py: the C API's answers equal the Python runtime's.
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <functional>
#include <vector>

namespace flamingo_rt::capi {

struct BeamSearchParams {
  int num_beams = 2;               // K >= 2
  double length_penalty = 1.0;     // a hypothesis scores sum(logprob) / length ** length_penalty
  int early_stopping = 0;          // 0: HF's default (False), 1: True, 2: "never"
  int max_new_tokens = 32;
  std::vector<int32_t> stop_ids;   // a candidate ending in one finishes its hypothesis
  std::vector<int32_t> banned_ids; // never generated (<image>, <pad>)
  int64_t vocab_size = 0;          // LM rows at and past it are never generated
};

// Continues each beam by one token: rows[j] is the beam that beam j continues (its cache is
// copied first when rows[j] != j), tokens[j] the token it appends. Returns (K, V) float32 logits.
using BeamStep = std::function<at::Tensor(const std::vector<int64_t>& rows, const std::vector<int32_t>& tokens)>;

// The best hypothesis' tokens (its stop token included when it ended with one). `first`: (V,)
// float32 logits after the prompt. Throws ApiError(FLAMINGO_ERR_RUNTIME) on NaN logits.
std::vector<int32_t> beam_search(const at::Tensor& first, const BeamSearchParams& p, const BeamStep& step);

}  // namespace flamingo_rt::capi
