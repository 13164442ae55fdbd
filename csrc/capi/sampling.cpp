#include "sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace flamingo_rt::capi {

int32_t choose_token(const float* logits, int64_t n, const SamplingParams& p, std::mt19937_64& rng) {
  if (p.temperature <= 0.f) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; ++i)
      if (logits[i] > logits[best]) best = i;
    return static_cast<int32_t>(best);
  }
  std::vector<int32_t> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  int64_t keep = n;
  if (p.top_k > 0 && p.top_k < keep) keep = p.top_k;
  const double mx = logits[idx[0]] / p.temperature;
  std::vector<double> prob(keep);
  double sum = 0;
  for (int64_t i = 0; i < keep; ++i) sum += prob[i] = std::exp(logits[idx[i]] / p.temperature - mx);
  if (p.top_p < 1.f) {  // the smallest prefix whose mass reaches top_p
    double acc = 0;
    int64_t cut = keep;
    for (int64_t i = 0; i < keep; ++i) {
      acc += prob[i] / sum;
      if (acc >= p.top_p) {
        cut = i + 1;
        break;
      }
    }
    keep = cut;
    sum = std::accumulate(prob.begin(), prob.begin() + keep, 0.0);
  }
  std::uniform_real_distribution<double> u(0.0, sum);
  double r = u(rng), acc = 0;
  for (int64_t i = 0; i < keep; ++i) {
    acc += prob[i];
    if (r < acc) return idx[i];
  }
  return idx[keep - 1];
}

}  // namespace flamingo_rt::capi
