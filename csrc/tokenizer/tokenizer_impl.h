// The loaded state behind flamingo_rt::Tokenizer (shared by its copies).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "added_vocab.h"
#include "bpe.h"
#include "flamingo_rt/tokenizer.h"
#include "json.h"
#include "pre_tokenizer.h"

namespace flamingo_rt {

struct Tokenizer::Impl {
  std::string source;  // the path or "<json>", for messages
  tokenizer_detail::AddedVocabulary added;
  tokenizer_detail::PreTokenizerConfig pre;
  std::unique_ptr<tokenizer_detail::Bpe> bpe;

  // Per id in [0, vocab_size): whether it has a token, its string, the bytes it decodes to,
  // whether decode(skip_special_tokens=true) drops it.
  int32_t vocab_size = 0;
  std::vector<uint8_t> has_token;
  std::vector<std::string> token;
  std::vector<std::string> bytes;
  std::vector<uint8_t> special;
  int32_t num_added_tokens = 0;
  int32_t image_id = -1, eoc_id = -1, pad_id = -1, eos_id = -1;

  // Builds everything from a parsed tokenizer.json (tokenizer_json.cpp).
  static std::shared_ptr<const Impl> load(const tokenizer_detail::JsonValue& root,
                                          const std::string& source);

  void check_id(int32_t id, const char* what) const;
};

}  // namespace flamingo_rt
