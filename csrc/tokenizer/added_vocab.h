// Added tokens (special tokens like <image>, and any other added_tokens of tokenizer.json),
// as tokenizers' AddedVocabulary handles them: how they get ids when added, and how they
// are cut out of the text before pre-tokenization (leftmost-longest match; first the tokens
// with normalized = false, then, in the remaining pieces, those with normalized = true;
// lstrip / rstrip take the Unicode whitespace next to a match along).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace flamingo_rt {
namespace tokenizer_detail {

struct AddedToken {
  std::string content;
  bool single_word = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = true;
  bool special = false;
  bool operator==(const AddedToken& o) const {
    return content == o.content && single_word == o.single_word && lstrip == o.lstrip &&
           rstrip == o.rstrip && normalized == o.normalized && special == o.special;
  }
};

// A piece of the input: [begin, end) bytes, and the id when it is an added token (-1: text).
struct Segment {
  size_t begin, end;
  int32_t id;
};

class AddedVocabulary {
 public:
  using ModelLookup = std::function<std::optional<int32_t>(const std::string&)>;

  // tokenizers' add_tokens for one token: nothing when an identical token is already there;
  // else the id it already has as an added token or in the model, or the next free id.
  // Returns whether it was added. Call build() after the last add.
  bool add(const AddedToken& token, const ModelLookup& model_id, size_t model_vocab_size);
  void build();

  std::optional<int32_t> token_to_id(const std::string& content) const;
  const AddedToken* token_of(int32_t id) const;  // nullptr when `id` is not an added token
  bool is_special_content(const std::string& content) const { return special_set_.count(content) > 0; }
  const std::unordered_map<int32_t, AddedToken>& by_id() const { return by_id_; }

  // Cuts the added tokens out of valid UTF-8 `text`; the segments cover it, none is empty.
  void split(const std::string& text, std::vector<Segment>& out) const;

 private:
  // Leftmost-longest matcher over a byte trie.
  struct Matcher {
    struct Node {
      std::vector<std::pair<unsigned char, int32_t>> next;  // sorted by byte
      int32_t id = -1;                                       // a pattern ends here
    };
    std::vector<Node> nodes{Node()};
    void insert(const std::string& pattern, int32_t id);
    // The longest pattern starting at text[pos]: its end, or 0 when none (*id gets its id).
    size_t longest_at(const std::string& text, size_t pos, size_t end, int32_t* id) const;
    bool empty() const { return nodes.size() == 1; }
  };

  void find_matches(const std::string& text, size_t begin, size_t end, const Matcher& m,
                    std::vector<Segment>& out) const;

  std::unordered_map<std::string, int32_t> id_of_;  // content -> id
  std::unordered_map<int32_t, AddedToken> by_id_;
  std::vector<AddedToken> special_tokens_, classic_tokens_;  // in the order they came
  std::unordered_set<std::string> special_set_;
  Matcher raw_, normalized_;
};

}  // namespace tokenizer_detail
}  // namespace flamingo_rt
