// flamingo_rt::IncrementalDecoder: the token bytes go through a streaming lossy UTF-8
// decoder that holds back an incomplete character until its last byte arrives.
#include "tokenizer_impl.h"
#include "utf8.h"

namespace flamingo_rt {

IncrementalDecoder::IncrementalDecoder(const Tokenizer& tokenizer, bool skip_special_tokens)
    : tokenizer_(tokenizer), skip_special_(skip_special_tokens) {}

std::string IncrementalDecoder::push(int32_t id) {
  const Tokenizer::Impl& impl = *tokenizer_.impl_;
  impl.check_id(id, "IncrementalDecoder::push");
  if (skip_special_ && impl.special[id]) return std::string();
  pending_ += impl.bytes[id];
  return tokenizer_detail::utf8_lossy_stream(pending_, /*final=*/false);
}

std::string IncrementalDecoder::flush() {
  std::string out = tokenizer_detail::utf8_lossy_stream(pending_, /*final=*/true);
  reset();
  return out;
}

void IncrementalDecoder::reset() { pending_.clear(); }

}  // namespace flamingo_rt
