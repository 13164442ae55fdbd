// The C++ tokenizer (csrc/tokenizer, flamingo_rt/tokenizer.h) as torch custom classes, so
// Python (and TorchScript) can call it:
//
//   tok = torch.classes.flamingo_rt_C.Tokenizer(path_or_json: str, is_json: bool)
//   tok.encode(text) -> List[int]            tok.decode(ids, skip_special_tokens) -> str
//   tok.pre_tokenize(text) -> List[str]      tok.token_bytes(id) -> List[int] (byte values)
//   tok.token_to_id(token) -> Optional[int]  tok.id_to_token(id) -> Optional[str]
//   tok.vocab_size() / num_added_tokens() / image_token_id() / eoc_token_id() /
//   pad_token_id() / eos_token_id() -> int;  special_token_ids() -> List[int];
//   is_special(id) -> bool
//   dec = torch.classes.flamingo_rt_C.IncrementalDecoder(tok, skip_special_tokens: bool)
//   dec.push(id) -> str    dec.flush() -> str    dec.reset()
//
// TokenizerError messages reach Python as RuntimeError with the same text.
#include <torch/custom_class.h>
#include <torch/library.h>

#include <limits>
#include <string>
#include <vector>

#include "flamingo_rt/tokenizer.h"

namespace flamingo_rt {
namespace torch_ops {
namespace {

int32_t to_id(int64_t id, const char* what) {
  TORCH_CHECK(id >= std::numeric_limits<int32_t>::min() && id <= std::numeric_limits<int32_t>::max(),
              what, ": expected a token id in int32 range, got ", id);
  return static_cast<int32_t>(id);
}

std::vector<int64_t> widen(const std::vector<int32_t>& v) { return std::vector<int64_t>(v.begin(), v.end()); }

struct TokenizerHolder : torch::CustomClassHolder {
  Tokenizer tok;
  explicit TokenizerHolder(Tokenizer t) : tok(std::move(t)) {}
};

struct IncrementalDecoderHolder : torch::CustomClassHolder {
  IncrementalDecoder dec;
  IncrementalDecoderHolder(const Tokenizer& t, bool skip) : dec(t, skip) {}
};

}  // namespace
}  // namespace torch_ops
}  // namespace flamingo_rt

TORCH_LIBRARY_FRAGMENT(flamingo_rt_C, m) {
  using flamingo_rt::Tokenizer;
  using flamingo_rt::torch_ops::IncrementalDecoderHolder;
  using flamingo_rt::torch_ops::to_id;
  using flamingo_rt::torch_ops::TokenizerHolder;
  using flamingo_rt::torch_ops::widen;
  using Self = c10::intrusive_ptr<TokenizerHolder>;

  m.class_<TokenizerHolder>("Tokenizer")
      .def(torch::init([](std::string source, bool is_json) {
        return c10::make_intrusive<TokenizerHolder>(is_json ? Tokenizer::from_json(source)
                                                            : Tokenizer::from_file(source));
      }))
      .def("encode", [](const Self& self, std::string text) { return widen(self->tok.encode(text)); })
      .def("decode",
           [](const Self& self, std::vector<int64_t> ids, bool skip_special_tokens) {
             std::vector<int32_t> v;
             v.reserve(ids.size());
             for (int64_t id : ids) v.push_back(to_id(id, "decode"));
             return self->tok.decode(v, skip_special_tokens);
           })
      .def("pre_tokenize", [](const Self& self, std::string text) { return self->tok.pre_tokenize(text); })
      .def("token_bytes",
           [](const Self& self, int64_t id) {
             const std::string& b = self->tok.token_bytes(to_id(id, "token_bytes"));
             std::vector<int64_t> out;
             for (unsigned char c : b) out.push_back(c);
             return out;
           })
      .def("token_to_id",
           [](const Self& self, std::string token) -> c10::optional<int64_t> {
             auto id = self->tok.token_to_id(token);
             if (!id) return c10::nullopt;
             return static_cast<int64_t>(*id);
           })
      .def("id_to_token",
           [](const Self& self, int64_t id) -> c10::optional<std::string> {
             if (id < 0 || id > std::numeric_limits<int32_t>::max()) return c10::nullopt;
             auto t = self->tok.id_to_token(static_cast<int32_t>(id));
             if (!t) return c10::nullopt;
             return *t;
           })
      .def("vocab_size", [](const Self& self) { return static_cast<int64_t>(self->tok.vocab_size()); })
      .def("num_added_tokens", [](const Self& self) { return static_cast<int64_t>(self->tok.num_added_tokens()); })
      .def("special_token_ids", [](const Self& self) { return widen(self->tok.special_token_ids()); })
      .def("is_special", [](const Self& self, int64_t id) { return self->tok.is_special(to_id(id, "is_special")); })
      .def("image_token_id", [](const Self& self) { return static_cast<int64_t>(self->tok.image_token_id()); })
      .def("eoc_token_id", [](const Self& self) { return static_cast<int64_t>(self->tok.eoc_token_id()); })
      .def("pad_token_id", [](const Self& self) { return static_cast<int64_t>(self->tok.pad_token_id()); })
      .def("eos_token_id", [](const Self& self) { return static_cast<int64_t>(self->tok.eos_token_id()); });

  using Dec = c10::intrusive_ptr<IncrementalDecoderHolder>;
  m.class_<IncrementalDecoderHolder>("IncrementalDecoder")
      .def(torch::init([](const Self& tok, bool skip_special_tokens) {
        return c10::make_intrusive<IncrementalDecoderHolder>(tok->tok, skip_special_tokens);
      }))
      .def("push", [](const Dec& self, int64_t id) { return self->dec.push(to_id(id, "IncrementalDecoder.push")); })
      .def("flush", [](const Dec& self) { return self->dec.flush(); })
      .def("reset", [](const Dec& self) { self->dec.reset(); });
}
