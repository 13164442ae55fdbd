// BPE merges with a priority queue, the way tokenizers' Word::merge_all does them (so ties
// and stale queue entries resolve identically).
#include "bpe.h"

#include <cstdio>
#include <queue>

#include "flamingo_rt/tokenizer.h"
#include "utf8.h"

namespace flamingo_rt {
namespace tokenizer_detail {

Bpe::Bpe(std::unordered_map<std::string, int32_t> vocab,
         const std::vector<std::pair<std::string, std::string>>& merges, BpeOptions options,
         const std::string& where)
    : vocab_(std::move(vocab)), options_(std::move(options)) {
  const size_t prefix_len =
      options_.continuing_subword_prefix ? options_.continuing_subword_prefix->size() : 0;
  auto id_of = [&](const std::string& token, size_t rank, const char* role) {
    auto it = vocab_.find(token);
    if (it == vocab_.end()) {
      throw TokenizerError(TokenizerError::Kind::kInvalid,
                           where + ".merges[" + std::to_string(rank) + "]: expected its " + role +
                               " \"" + token + "\" in model.vocab, found no such token");
    }
    return it->second;
  };
  merges_.reserve(merges.size() * 2);
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const std::string& a = merges[rank].first;
    const std::string& b = merges[rank].second;
    const int32_t a_id = id_of(a, rank, "left token");
    const int32_t b_id = id_of(b, rank, "right token");
    if (b.size() < prefix_len) {
      throw TokenizerError(TokenizerError::Kind::kInvalid,
                           where + ".merges[" + std::to_string(rank) + "]: expected the right token \"" +
                               b + "\" to start with continuing_subword_prefix, found it shorter");
    }
    const int32_t new_id = id_of(a + b.substr(prefix_len), rank, "merged token");
    // A pair listed twice keeps its last rank (a map insert in tokenizers).
    merges_[pair_key(a_id, b_id)] = MergeInfo{static_cast<int32_t>(rank), new_id};
  }
  if (options_.unk_token) {
    auto it = vocab_.find(*options_.unk_token);
    if (it == vocab_.end()) {
      throw TokenizerError(TokenizerError::Kind::kInvalid,
                           where + ".unk_token: expected \"" + *options_.unk_token +
                               "\" in model.vocab, found no such token");
    }
    unk_id_ = it->second;
  }
}

void Bpe::tokenize(const std::string& word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (options_.ignore_merges) {
    auto it = vocab_.find(word);
    if (it != vocab_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    auto it = cache_.find(word);
    if (it != cache_.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> ids;
  merge_word(word, ids);
  out.insert(out.end(), ids.begin(), ids.end());
  if (word.size() < kCacheMaxWordBytes) {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    if (cache_.size() < kCacheCapacity) cache_.emplace(word, std::move(ids));
  }
}

namespace {

struct Symbol {
  int32_t id;
  int32_t prev, next;  // indices, -1 at the ends
  size_t len;          // bytes; 0 once merged into its left neighbour
};

struct QueuedMerge {
  int32_t rank;
  int32_t pos;
  int32_t new_id;
};

// std::priority_queue puts the "largest" on top: make that the lowest rank, then the
// leftmost position.
struct LaterMerge {
  bool operator()(const QueuedMerge& a, const QueuedMerge& b) const {
    if (a.rank != b.rank) return a.rank > b.rank;
    return a.pos > b.pos;
  }
};

}  // namespace

void Bpe::merge_word(const std::string& word, std::vector<int32_t>& out) const {
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  auto add = [&](int32_t id, size_t len) {
    const int32_t idx = static_cast<int32_t>(symbols.size());
    if (idx > 0) symbols.back().next = idx;
    symbols.push_back(Symbol{id, idx - 1, -1, len});
  };

  // Characters -> symbols (with unknown-character handling as in tokenizers' merge_word).
  struct PendingUnk {
    bool active = false;
    int32_t id = 0;
    size_t len = 0;  // bytes covered
  } unk;
  std::string s;
  for (size_t pos = 0, len; pos < word.size(); pos += len) {
    len = utf8_valid_prefix_length(word, pos);
    const bool first = pos == 0, last = pos + len == word.size();
    s.assign(word, pos, len);
    if (!first && options_.continuing_subword_prefix) s = *options_.continuing_subword_prefix + s;
    if (last && options_.end_of_word_suffix) s += *options_.end_of_word_suffix;
    auto it = vocab_.find(s);
    if (it != vocab_.end()) {
      if (unk.active) {
        add(unk.id, unk.len);
        unk.active = false;
      }
      add(it->second, len);
      continue;
    }
    if (options_.byte_fallback) {
      std::vector<int32_t> bytes;
      for (unsigned char b : s) {
        char name[8];
        std::snprintf(name, sizeof name, "<0x%02X>", b);
        auto bt = vocab_.find(name);
        if (bt == vocab_.end()) break;
        bytes.push_back(bt->second);
      }
      if (bytes.size() == s.size()) {
        for (int32_t id : bytes) add(id, 1);
        continue;
      }
    }
    if (unk_id_) {
      if (unk.active && options_.fuse_unk) {
        unk.len += len;
      } else {
        if (unk.active) add(unk.id, unk.len);
        unk = PendingUnk{true, *unk_id_, len};
      }
    }
    // No unk_token: tokenizers drops the character.
  }
  if (unk.active) add(unk.id, unk.len);

  std::priority_queue<QueuedMerge, std::vector<QueuedMerge>, LaterMerge> queue;
  auto lookup = [&](int32_t a, int32_t b) -> const MergeInfo* {
    auto it = merges_.find(pair_key(a, b));
    return it == merges_.end() ? nullptr : &it->second;
  };
  for (size_t i = 0; i + 1 < symbols.size(); ++i) {
    if (const MergeInfo* m = lookup(symbols[i].id, symbols[i + 1].id)) {
      queue.push(QueuedMerge{m->rank, static_cast<int32_t>(i), m->new_id});
    }
  }
  while (!queue.empty()) {
    const QueuedMerge top = queue.top();
    queue.pop();
    Symbol& cur = symbols[top.pos];
    if (cur.len == 0 || cur.next == -1) continue;
    const int32_t next_pos = cur.next;
    const Symbol right = symbols[next_pos];
    const MergeInfo* m = lookup(cur.id, right.id);
    if (m == nullptr || m->new_id != top.new_id) continue;  // stale entry
    cur.id = top.new_id;
    cur.len += right.len;
    cur.next = right.next;
    symbols[next_pos].len = 0;
    if (right.next >= 0) symbols[right.next].prev = top.pos;
    if (cur.prev >= 0) {
      if (const MergeInfo* pm = lookup(symbols[cur.prev].id, cur.id)) {
        queue.push(QueuedMerge{pm->rank, cur.prev, pm->new_id});
      }
    }
    if (cur.next >= 0) {
      if (const MergeInfo* nm = lookup(cur.id, symbols[cur.next].id)) {
        queue.push(QueuedMerge{nm->rank, top.pos, nm->new_id});
      }
    }
  }
  for (const Symbol& sym : symbols) {
    if (sym.len != 0) out.push_back(sym.id);
  }
}

}  // namespace tokenizer_detail
}  // namespace flamingo_rt
