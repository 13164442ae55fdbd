// tokenizers' ByteLevel pre-tokenizer, before its byte-level mapping: an optional prefix
// space, then the GPT-2 regex
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// as Oniguruma matches it (alternatives tried in order at each position, greedy runs,
// backtracking for the lookahead). Every character matches one alternative, so the pieces
// cover the text.
#pragma once

#include <cstddef>
#include <string>
#include <utility>
#include <vector>

namespace flamingo_rt {
namespace tokenizer_detail {

struct PreTokenizerConfig {
  bool add_prefix_space = false;  // prepend ' ' to a piece that does not start with one
  bool use_regex = true;          // false: the (prefixed) piece is one word
};

// Splits the valid UTF-8 text `s` by the GPT-2 regex into [begin, end) byte ranges.
void gpt2_split(const std::string& s, std::vector<std::pair<size_t, size_t>>& out);

// The words of one piece of text (a part of the input between added tokens), appended to
// `out`. `piece` must be valid UTF-8 and not empty.
void pre_tokenize_piece(const std::string& piece, const PreTokenizerConfig& cfg,
                        std::vector<std::string>& out);

}  // namespace tokenizer_detail
}  // namespace flamingo_rt
