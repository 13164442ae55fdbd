#include "beam_search.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>

#include "api_error.h"

namespace flamingo_rt::capi {
namespace {

constexpr double kNinf = -std::numeric_limits<double>::infinity();

// The best num_beams finished hypotheses (runtime/beams.py's BeamHypotheses).
class Hypotheses {
 public:
  explicit Hypotheses(const BeamSearchParams& p) : p_(p) {}

  size_t size() const { return items_.size(); }

  double worst() const {
    double w = std::numeric_limits<double>::infinity();
    for (const auto& it : items_) w = std::min(w, it.first);
    return w;
  }

  void add(const std::vector<int32_t>& tokens, double sum_logprobs) {
    const double score = sum_logprobs / std::pow(static_cast<double>(tokens.size()), p_.length_penalty);
    if (items_.size() < static_cast<size_t>(p_.num_beams) || score > worst()) {
      items_.emplace_back(score, tokens);
      if (items_.size() > static_cast<size_t>(p_.num_beams)) {  // drop the worst (the first of equal ones)
        size_t at = 0;
        for (size_t i = 1; i < items_.size(); ++i)
          if (items_[i].first < items_[at].first) at = i;
        items_.erase(items_.begin() + static_cast<std::ptrdiff_t>(at));
      }
    }
  }

  // Whether no live beam can still beat the worst kept hypothesis (early_stopping's rule).
  bool is_done(double best_sum_logprobs, int generated) const {
    if (items_.size() < static_cast<size_t>(p_.num_beams)) return false;
    if (p_.early_stopping == 1) return true;
    double length = generated;
    if (p_.early_stopping == 2 && p_.length_penalty > 0.0) length = p_.max_new_tokens;
    return worst() >= best_sum_logprobs / std::pow(length, p_.length_penalty);
  }

  // Of equal scores, the one added last (as HF's sort-and-pop).
  const std::vector<int32_t>& best() const {
    size_t at = items_.size() - 1;
    for (size_t i = items_.size(); i-- > 0;)
      if (items_[i].first > items_[at].first) at = i;
    return items_[at].second;
  }

 private:
  const BeamSearchParams& p_;
  std::vector<std::pair<double, std::vector<int32_t>>> items_;
};

// log_softmax of (K, V) float32 logits, then the banned tokens at -inf (a beam's score is its
// log-likelihood: banned tokens are not renormalized away, as HF and the Python runtime).
at::Tensor log_probs(const at::Tensor& logits, const BeamSearchParams& p, int step) {
  at::Tensor lp = at::log_softmax(logits.to(at::kFloat), -1).contiguous();
  if (at::isnan(lp).any().item<bool>()) {
    throw ApiError(FLAMINGO_ERR_RUNTIME, "the model's logits are NaN at generated token " + std::to_string(step) +
                                             " (non-finite weights, or an overflow in a half dtype); reset the session");
  }
  const int64_t K = lp.size(0), V = lp.size(1);
  float* d = lp.data_ptr<float>();
  for (int64_t j = 0; j < K; ++j) {
    float* row = d + j * V;
    for (int32_t t : p.banned_ids)
      if (t >= 0 && t < V) row[t] = -INFINITY;
    for (int64_t v = std::max<int64_t>(p.vocab_size, 0); v < V; ++v) row[v] = -INFINITY;
  }
  return lp;
}

}  // namespace

std::vector<int32_t> beam_search(const at::Tensor& first, const BeamSearchParams& p, const BeamStep& step) {
  const int K = p.num_beams;
  const auto is_stop = [&](int32_t t) { return std::find(p.stop_ids.begin(), p.stop_ids.end(), t) != p.stop_ids.end(); };
  std::vector<double> scores(K, kNinf);
  scores[0] = 0.0;  // the K beams start equal: only the first counts at the first step
  std::vector<std::vector<int32_t>> seqs(K);
  Hypotheses finished(p);
  at::Tensor logits = first.reshape({1, -1}).expand({K, first.numel()});
  // when the search ends: the live beams, this step's continuations, and whether those count
  std::vector<double> live_scores, new_scores;
  std::vector<std::vector<int32_t>> live_seqs, new_seqs;
  bool add_live = false;
  for (int s = 0; s < p.max_new_tokens; ++s) {
    at::Tensor lp = log_probs(logits, p, s);  // (K, V)
    const int64_t V = lp.size(1);
    lp += at::tensor(std::vector<float>(scores.begin(), scores.end())).view({K, 1});
    auto [top_t, flat_t] = lp.view({1, K * V}).topk(2 * K, -1);
    const at::Tensor top_d = top_t.to(at::kDouble).contiguous(), flat_l = flat_t.to(at::kLong).contiguous();
    const double* top = top_d.data_ptr<double>();
    const int64_t* flat = flat_l.data_ptr<int64_t>();
    std::vector<int64_t> rows;
    std::vector<int32_t> toks;
    new_scores.clear();
    new_seqs.clear();
    for (int rank = 0; rank < 2 * K; ++rank) {
      const double sc = top[rank];
      if (sc == kNinf) break;
      const int64_t row = flat[rank] / V;
      const int32_t tok = static_cast<int32_t>(flat[rank] % V);
      std::vector<int32_t> seq = seqs[row];
      seq.push_back(tok);
      if (is_stop(tok)) {
        if (rank < K) finished.add(seq, sc);  // (HF: a stop ranked below the K best is dropped)
      } else {
        rows.push_back(row);
        toks.push_back(tok);
        new_scores.push_back(sc);
        new_seqs.push_back(std::move(seq));
      }
      if (static_cast<int>(rows.size()) == K) break;
    }
    const bool done = finished.is_done(top[0], s + 1);
    if (done || rows.empty() || s == p.max_new_tokens - 1) {
      live_scores = scores;
      live_seqs = seqs;
      add_live = !done;
      break;
    }
    while (static_cast<int>(rows.size()) < K) {  // keep K beams; extra ones are dead
      rows.push_back(rows[0]);
      toks.push_back(toks[0]);
      new_scores.push_back(kNinf);
      new_seqs.push_back(new_seqs[0]);
    }
    scores = new_scores;
    seqs = new_seqs;
    logits = step(rows, toks);
  }
  if (add_live)  // max_new_tokens reached, not done: the beams alive at the end are hypotheses too
    for (size_t j = 0; j < new_scores.size(); ++j)
      if (new_scores[j] > kNinf) finished.add(new_seqs[j], new_scores[j]);
  if (finished.size() == 0)  // no candidate at all: the live beams, as a last resort
    for (size_t j = 0; j < live_scores.size(); ++j)
      if (live_scores[j] > kNinf && !live_seqs[j].empty()) finished.add(live_seqs[j], live_scores[j]);
  return finished.size() ? finished.best() : std::vector<int32_t>{};
}

}  // namespace flamingo_rt::capi
