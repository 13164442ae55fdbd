// See added_vocab.h; mirrors tokenizers/src/tokenizer/added_vocabulary.rs.
#include "added_vocab.h"

#include <algorithm>

#include "unicode_class.h"
#include "utf8.h"

namespace flamingo_rt {
namespace tokenizer_detail {

bool AddedVocabulary::add(const AddedToken& token, const ModelLookup& model_id,
                          size_t model_vocab_size) {
  if (token.special && !token.content.empty() && !special_set_.count(token.content)) {
    special_tokens_.push_back(token);
    special_set_.insert(token.content);
  }
  if (token.content.empty()) return false;
  for (const auto& kv : by_id_) {
    if (kv.second == token) return false;
  }
  int32_t id;
  if (auto it = id_of_.find(token.content); it != id_of_.end()) {
    id = it->second;
  } else if (auto mid = model_id(token.content)) {
    id = *mid;
  } else if (id_of_.empty()) {
    id = static_cast<int32_t>(model_vocab_size);
  } else {
    int32_t max_id = -1;
    for (const auto& kv : id_of_) max_id = std::max(max_id, kv.second);
    id = (static_cast<size_t>(max_id) >= model_vocab_size || model_vocab_size == 0)
             ? max_id + 1
             : static_cast<int32_t>(model_vocab_size);
  }
  id_of_[token.content] = id;
  by_id_[id] = token;
  if (!special_set_.count(token.content)) classic_tokens_.push_back(token);
  return true;
}

void AddedVocabulary::build() {
  raw_ = Matcher();
  normalized_ = Matcher();
  for (const auto* list : {&special_tokens_, &classic_tokens_}) {
    for (const AddedToken& t : *list) {
      (t.normalized ? normalized_ : raw_).insert(t.content, id_of_.at(t.content));
    }
  }
}

std::optional<int32_t> AddedVocabulary::token_to_id(const std::string& content) const {
  auto it = id_of_.find(content);
  if (it == id_of_.end()) return std::nullopt;
  return it->second;
}

const AddedToken* AddedVocabulary::token_of(int32_t id) const {
  auto it = by_id_.find(id);
  return it == by_id_.end() ? nullptr : &it->second;
}

void AddedVocabulary::Matcher::insert(const std::string& pattern, int32_t id) {
  int32_t node = 0;
  for (unsigned char b : pattern) {
    auto& next = nodes[node].next;
    auto it = std::lower_bound(next.begin(), next.end(), b,
                               [](const std::pair<unsigned char, int32_t>& e, unsigned char x) { return e.first < x; });
    if (it != next.end() && it->first == b) {
      node = it->second;
    } else {
      const int32_t child = static_cast<int32_t>(nodes.size());
      next.insert(it, {b, child});  // `next` may dangle after the push_back below: done with it
      nodes.emplace_back();
      node = child;
    }
  }
  if (nodes[node].id < 0) nodes[node].id = id;  // identical patterns: the first one wins
}

size_t AddedVocabulary::Matcher::longest_at(const std::string& text, size_t pos, size_t end,
                                             int32_t* id) const {
  int32_t node = 0;
  size_t best = 0;
  for (size_t p = pos; p < end; ++p) {
    const auto& next = nodes[node].next;
    const unsigned char b = static_cast<unsigned char>(text[p]);
    auto it = std::lower_bound(next.begin(), next.end(), b,
                               [](const std::pair<unsigned char, int32_t>& e, unsigned char x) { return e.first < x; });
    if (it == next.end() || it->first != b) break;
    node = it->second;
    if (nodes[node].id >= 0) {
      best = p + 1;
      *id = nodes[node].id;
    }
  }
  return best;
}

namespace {

// Start of the run of whitespace that ends at `end` (within [begin, end)).
size_t whitespace_run_before(const std::string& s, size_t begin, size_t end) {
  size_t p = end;
  while (p > begin) {
    size_t q = p - 1;
    while (q > begin && (static_cast<unsigned char>(s[q]) & 0xC0) == 0x80) --q;
    size_t len;
    if (!is_whitespace(utf8_decode(s, q, &len))) break;
    p = q;
  }
  return p;
}

// End of the run of whitespace that starts at `pos` (within [pos, end)).
size_t whitespace_run_after(const std::string& s, size_t pos, size_t end) {
  size_t len;
  while (pos < end && is_whitespace(utf8_decode(s, pos, &len))) pos += len;
  return pos;
}

}  // namespace

void AddedVocabulary::find_matches(const std::string& text, size_t begin, size_t end,
                                   const Matcher& m, std::vector<Segment>& out) const {
  size_t start_offset = begin;
  if (!m.empty()) {
    size_t pos = begin;
    while (pos < end) {
      int32_t id = -1;
      const size_t stop0 = m.longest_at(text, pos, end, &id);
      if (stop0 == 0) {
        ++pos;
        continue;
      }
      size_t start = pos, stop = stop0;
      const AddedToken& tok = by_id_.at(id);
      if (tok.lstrip) start = std::max(whitespace_run_before(text, begin, start), start_offset);
      if (tok.rstrip) stop = whitespace_run_after(text, stop, end);
      if (start_offset < start) out.push_back({start_offset, start, -1});
      out.push_back({start, stop, id});
      start_offset = stop;
      pos = stop0;  // like aho-corasick's find_iter: on after the match, not the stripped space
    }
  }
  if (start_offset < end) out.push_back({start_offset, end, -1});
}

void AddedVocabulary::split(const std::string& text, std::vector<Segment>& out) const {
  std::vector<Segment> first;
  find_matches(text, 0, text.size(), raw_, first);
  for (const Segment& s : first) {
    if (s.id >= 0) {
      out.push_back(s);
    } else {
      find_matches(text, s.begin, s.end, normalized_, out);
    }
  }
}

}  // namespace tokenizer_detail
}  // namespace flamingo_rt
