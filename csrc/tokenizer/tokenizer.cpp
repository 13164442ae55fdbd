// flamingo_rt::Tokenizer: loading, and the encode pipeline of tokenizers (added tokens cut
// out, ByteLevel pre-tokenization of the rest, byte-level mapping, BPE) and its decode.
#include <fstream>
#include <sstream>
#include <sys/stat.h>

#include "byte_level.h"
#include "tokenizer_impl.h"
#include "utf8.h"

namespace flamingo_rt {

using Kind = TokenizerError::Kind;

namespace {

bool is_directory(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

}  // namespace

Tokenizer Tokenizer::from_file(const std::string& path_in) {
  std::string path = path_in;
  if (is_directory(path)) path += (path.empty() || path.back() == '/') ? "tokenizer.json" : "/tokenizer.json";
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    throw TokenizerError(Kind::kIo, path + ": expected a readable tokenizer.json file, found " +
                                        (is_directory(path) ? "a directory" : "no such readable file"));
  }
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) throw TokenizerError(Kind::kIo, path + ": read error");
  return from_json(ss.str(), path);
}

Tokenizer Tokenizer::from_json(const std::string& json, const std::string& source) {
  if (json.empty()) {
    throw TokenizerError(Kind::kJson, source + ": expected the JSON text of a tokenizer, found an empty input");
  }
  return Tokenizer(Impl::load(tokenizer_detail::parse_json(json, source), source));
}

void Tokenizer::Impl::check_id(int32_t id, const char* what) const {
  if (id < 0 || id >= vocab_size || !has_token[id]) {
    throw TokenizerError(Kind::kBadInput,
                         std::string(what) + ": expected a token id in [0, " + std::to_string(vocab_size) +
                             ") that has a token, found " + std::to_string(id));
  }
}

std::vector<int32_t> Tokenizer::encode(const std::string& text) const {
  tokenizer_detail::utf8_validate(text, "encode");
  std::vector<tokenizer_detail::Segment> segments;
  impl_->added.split(text, segments);
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  std::vector<std::string> words;
  for (const auto& seg : segments) {
    if (seg.id >= 0) {
      ids.push_back(seg.id);
      continue;
    }
    words.clear();
    tokenizer_detail::pre_tokenize_piece(text.substr(seg.begin, seg.end - seg.begin), impl_->pre, words);
    for (const std::string& w : words) impl_->bpe->tokenize(tokenizer_detail::bytes_to_symbols(w), ids);
  }
  return ids;
}

std::vector<std::string> Tokenizer::pre_tokenize(const std::string& text) const {
  tokenizer_detail::utf8_validate(text, "pre_tokenize");
  std::vector<tokenizer_detail::Segment> segments;
  impl_->added.split(text, segments);
  std::vector<std::string> out;
  for (const auto& seg : segments) {
    if (seg.id >= 0) {
      out.push_back(text.substr(seg.begin, seg.end - seg.begin));
    } else {
      tokenizer_detail::pre_tokenize_piece(text.substr(seg.begin, seg.end - seg.begin), impl_->pre, out);
    }
  }
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  std::string bytes;
  for (int32_t id : ids) {
    impl_->check_id(id, "decode");
    if (skip_special_tokens && impl_->special[id]) continue;
    bytes += impl_->bytes[id];
  }
  return tokenizer_detail::utf8_lossy(bytes);
}

const std::string& Tokenizer::token_bytes(int32_t id) const {
  impl_->check_id(id, "token_bytes");
  return impl_->bytes[id];
}

std::optional<int32_t> Tokenizer::token_to_id(const std::string& token) const {
  if (auto id = impl_->added.token_to_id(token)) return id;
  const auto& vocab = impl_->bpe->vocab();
  auto it = vocab.find(token);
  if (it == vocab.end()) return std::nullopt;
  return it->second;
}

std::optional<std::string> Tokenizer::id_to_token(int32_t id) const {
  if (id < 0 || id >= impl_->vocab_size || !impl_->has_token[id]) return std::nullopt;
  return impl_->token[id];
}

int32_t Tokenizer::vocab_size() const { return impl_->vocab_size; }
int32_t Tokenizer::num_added_tokens() const { return impl_->num_added_tokens; }

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && id < impl_->vocab_size && impl_->special[id];
}

std::vector<int32_t> Tokenizer::special_token_ids() const {
  std::vector<int32_t> out;
  for (int32_t id = 0; id < impl_->vocab_size; ++id) {
    if (impl_->special[id]) out.push_back(id);
  }
  return out;
}

int32_t Tokenizer::image_token_id() const { return impl_->image_id; }
int32_t Tokenizer::eoc_token_id() const { return impl_->eoc_id; }
int32_t Tokenizer::pad_token_id() const { return impl_->pad_id; }
int32_t Tokenizer::eos_token_id() const { return impl_->eos_id; }
int32_t Tokenizer::bos_token_id() const { return impl_->eos_id; }

}  // namespace flamingo_rt
