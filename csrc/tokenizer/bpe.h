// The BPE model of tokenizers (models/bpe): a word (a string of byte-level symbols) starts
// as one symbol per character, then the applicable merge of lowest rank is applied, the
// leftmost one among equals, until none applies. Results are cached per word.
#pragma once

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace flamingo_rt {
namespace tokenizer_detail {

struct BpeOptions {
  std::optional<std::string> unk_token;                  // for characters not in the vocabulary
  bool fuse_unk = false;                                 // consecutive unknowns: one unk token
  bool byte_fallback = false;                            // unknown characters as <0xXX> tokens
  std::optional<std::string> continuing_subword_prefix;  // prefixed to non-initial symbols
  std::optional<std::string> end_of_word_suffix;         // appended to the final symbol
  bool ignore_merges = false;                            // a word in the vocabulary is one token
};

class Bpe {
 public:
  // Throws TokenizerError(kInvalid) for a merge of tokens missing from `vocab` or whose
  // result is missing, and for an unk_token missing from `vocab`. `where` prefixes messages.
  Bpe(std::unordered_map<std::string, int32_t> vocab,
      const std::vector<std::pair<std::string, std::string>>& merges, BpeOptions options,
      const std::string& where);

  // Appends the ids of `word` (byte-level symbols, valid UTF-8, not empty).
  void tokenize(const std::string& word, std::vector<int32_t>& out) const;

  const std::unordered_map<std::string, int32_t>& vocab() const { return vocab_; }

 private:
  struct MergeInfo {
    int32_t rank;
    int32_t new_id;
  };
  static uint64_t pair_key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }
  void merge_word(const std::string& word, std::vector<int32_t>& out) const;

  std::unordered_map<std::string, int32_t> vocab_;
  std::unordered_map<uint64_t, MergeInfo> merges_;
  BpeOptions options_;
  std::optional<int32_t> unk_id_;

  // Word -> ids, as tokenizers' cache: at most kCacheCapacity words shorter than
  // kCacheMaxWordBytes; once full, new words are not cached.
  static constexpr size_t kCacheCapacity = 10000;
  static constexpr size_t kCacheMaxWordBytes = 256;
  mutable std::mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache_;
};

}  // namespace tokenizer_detail
}  // namespace flamingo_rt
