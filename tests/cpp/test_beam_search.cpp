// ctest `beam_search` (driven by tests/cpp/run_beam_search_test.py): the C API's beam search
// (csrc/capi/beam_search.cpp) on scripted next-token distributions, each a fixed function of a
// beam's tokens so far, where the end of chunk is likely enough to finish hypotheses. The
// driver computes the same searches with the Python runtime's beam search (itself pinned to
// Hugging Face's) and compares the answers.
//
// stdin, one search a line: SEED K LENGTH_PENALTY EARLY_STOPPING MAX_NEW STOP_BIAS
// LATE_STOP_BIAS V EOC EOS (EOS -1: the end of chunk is the only stop token)
// stdout, a line each: the best hypothesis' tokens, space-separated (its stop token included).
#include <ATen/ATen.h>

#include <cstdint>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "beam_search.h"

namespace {

// logits (V,) of a beam whose tokens so far are `h`: tokens 10..15 and the stop tokens (plus
// `bias` at the first step, `late` after it) get values in [-3, 3) from a hash of (seed, h, token)
// (FNV-1a, then MurmurHash3's finalizer); the rest -12.
// run_beam_search_test.py's scripted_logits is the same function.
void scripted(uint64_t seed, const std::vector<int32_t>& h, double bias, double late, int64_t V,
              const std::vector<int32_t>& stops, float* out) {
  for (int64_t v = 0; v < V; ++v) out[v] = -12.f;
  auto value = [&](int64_t v) {
    uint64_t x = 1469598103934665603ull;
    auto mix = [&](uint64_t y) { x = (x ^ y) * 1099511628211ull; };
    mix(seed);
    for (int32_t t : h) mix(static_cast<uint64_t>(t));
    mix(static_cast<uint64_t>(v));
    // MurmurHash3's finalizer: FNV-1a alone moves the high bits little with the last token,
    // which made the tokens of one beam nearly tied
    x = (x ^ (x >> 33)) * 0xff51afd7ed558ccdull;
    x = (x ^ (x >> 33)) * 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return static_cast<double>(x >> 40) / 16777216.0 * 6.0 - 3.0;
  };
  for (int64_t v = 10; v < 16; ++v) out[v] = static_cast<float>(value(v));
  for (int32_t s : stops) out[s] = static_cast<float>(value(s) + (h.empty() ? bias : late));
}

}  // namespace

int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    uint64_t seed;
    int K, es, max_new, eoc, eos;
    double lp, bias, late;
    int64_t V;
    if (!(in >> seed >> K >> lp >> es >> max_new >> bias >> late >> V >> eoc >> eos)) {
      std::cerr << "test_beam_search: bad line: " << line << "\n";
      return 2;
    }
    flamingo_rt::capi::BeamSearchParams p;
    p.num_beams = K;
    p.length_penalty = lp;
    p.early_stopping = es;
    p.max_new_tokens = max_new;
    p.stop_ids = {eoc};
    if (eos >= 0) p.stop_ids.push_back(eos);
    p.banned_ids = {0, 2};  // the world tokenizer's <image> and <pad>
    p.vocab_size = V;
    std::vector<std::vector<int32_t>> hist(K);
    at::Tensor first = at::empty({V}, at::kFloat);
    scripted(seed, {}, bias, late, V, p.stop_ids, first.data_ptr<float>());
    const auto step = [&](const std::vector<int64_t>& rows, const std::vector<int32_t>& toks) {
      std::vector<std::vector<int32_t>> next(K);
      at::Tensor logits = at::empty({K, V}, at::kFloat);
      for (int j = 0; j < K; ++j) {
        next[j] = hist[rows[j]];
        next[j].push_back(toks[j]);
        scripted(seed, next[j], bias, late, V, p.stop_ids, logits.data_ptr<float>() + j * V);
      }
      hist = std::move(next);
      return logits;
    };
    const std::vector<int32_t> best = flamingo_rt::capi::beam_search(first, p, step);
    for (size_t i = 0; i < best.size(); ++i) std::cout << (i ? " " : "") << best[i];
    std::cout << "\n";
  }
  return 0;
}
