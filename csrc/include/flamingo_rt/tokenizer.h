// flamingo_rt's tokenizer in plain C++17 (no torch, no Python, no third-party library):
// the byte-level BPE `tokenizer.json` files that flamingo_rt ships (and GPT-2 style ones),
// giving the ids of the Hugging Face `tokenizers` library, as flamingo_rt.FlamingoTokenizer
// uses it (no padding, no truncation, no post-processor special tokens).
//
//   flamingo_rt::Tokenizer tok = flamingo_rt::Tokenizer::from_file("model/tokenizer.json");
//   std::vector<int32_t> ids = tok.encode("<image>a red square<|endofchunk|>");
//   std::string text = tok.decode(ids);                        // "<image>a red square<|endofchunk|>"
//   flamingo_rt::IncrementalDecoder stream(tok);               // whole UTF-8 characters only
//   for (int32_t id : ids) std::cout << stream.push(id);
//   std::cout << stream.flush();
//
// What a file may hold: a "BPE" model (merges as "a b" strings or [a, b] pairs; unk_token,
// fuse_unk, byte_fallback, continuing_subword_prefix, end_of_word_suffix, ignore_merges;
// dropout null or 0), a "ByteLevel" pre-tokenizer (add_prefix_space, use_regex), a
// "ByteLevel" decoder, normalizer null, post_processor null or "ByteLevel", added tokens
// with lstrip / rstrip / normalized / special (not single_word). Anything else is refused
// at load time with a TokenizerError that names it.
//
// The Flamingo special tokens <image>, <|endofchunk|>, <pad>, <|endoftext|> are added as
// special tokens when the file lacks them, with the ids FlamingoTokenizer gives them.
//
// Errors are TokenizerError exceptions; what() says what was expected and what was found.
// A Tokenizer is immutable after loading (its BPE cache is internally locked): encode and
// decode may run on several threads at once. Copies share the loaded data.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace flamingo_rt {

class TokenizerError : public std::runtime_error {
 public:
  enum class Kind {
    kIo,           // the file cannot be read
    kJson,         // not valid JSON (message has line and column)
    kUnsupported,  // valid JSON, but a tokenizer this library does not implement
    kInvalid,      // a tokenizer.json that contradicts itself (merge of an unknown token, ...)
    kBadInput,     // encode of invalid UTF-8, decode of an unknown id
  };
  TokenizerError(Kind kind, const std::string& what) : std::runtime_error(what), kind_(kind) {}
  Kind kind() const noexcept { return kind_; }

 private:
  Kind kind_;
};

class Tokenizer {
 public:
  // A tokenizer.json file; a directory is taken to hold "tokenizer.json".
  static Tokenizer from_file(const std::string& path);
  // The text of a tokenizer.json; `source` names it in error messages.
  static Tokenizer from_json(const std::string& json, const std::string& source = "<json>");

  // Ids of UTF-8 `text` (special tokens written in the text become their ids). Throws
  // kBadInput for invalid UTF-8 (with the byte offset).
  std::vector<int32_t> encode(const std::string& text) const;
  // The pieces the pre-tokenizer hands to BPE (UTF-8 text, before the byte-level mapping);
  // added tokens are pieces of their own. For tests and debugging.
  std::vector<std::string> pre_tokenize(const std::string& text) const;
  // UTF-8 text of `ids`, as tokenizers' decode: invalid UTF-8 from byte-level tokens becomes
  // U+FFFD. Throws kBadInput for an id that has no token (tokenizers silently drops it).
  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens = false) const;
  // The bytes one token contributes to decode (possibly part of a UTF-8 character).
  const std::string& token_bytes(int32_t id) const;

  std::optional<int32_t> token_to_id(const std::string& token) const;
  std::optional<std::string> id_to_token(int32_t id) const;
  // Largest id + 1 (added tokens included): the embedding rows a model needs.
  int32_t vocab_size() const;
  // Special tokens the file lacked and loading appended past its vocabulary.
  int32_t num_added_tokens() const;
  bool is_special(int32_t id) const;
  std::vector<int32_t> special_token_ids() const;  // ascending

  int32_t image_token_id() const;  // <image>
  int32_t eoc_token_id() const;    // <|endofchunk|>
  int32_t pad_token_id() const;    // <pad>
  int32_t eos_token_id() const;    // <|endoftext|>
  int32_t bos_token_id() const;    // <|endoftext|> too

  struct Impl;

 private:
  explicit Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<const Impl> impl_;
  friend class IncrementalDecoder;
};

// Streaming detokenizer: push ids one at a time, get the newly completed text. Only whole
// UTF-8 characters come out; a character split over several tokens comes out with the push
// that completes it. push(i)... + flush() == Tokenizer::decode(ids) (same skip_special_tokens).
class IncrementalDecoder {
 public:
  explicit IncrementalDecoder(const Tokenizer& tokenizer, bool skip_special_tokens = false);
  std::string push(int32_t id);
  // What is pending (an incomplete character becomes U+FFFD), then reset().
  std::string flush();
  void reset();

 private:
  Tokenizer tokenizer_;
  bool skip_special_;
  std::string pending_;  // bytes of an incomplete but so far valid UTF-8 sequence
};

}  // namespace flamingo_rt
