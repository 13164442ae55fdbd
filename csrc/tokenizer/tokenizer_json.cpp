// tokenizer.json -> Tokenizer::Impl: checks every field this library honours, refuses
// every other (by name), and adds the Flamingo special tokens as FlamingoTokenizer does.
#include <algorithm>
#include <initializer_list>
#include <locale>
#include <sstream>
#include <unordered_map>

#include "byte_level.h"
#include "tokenizer_impl.h"

namespace flamingo_rt {

using tokenizer_detail::AddedToken;
using tokenizer_detail::JsonValue;
using Kind = TokenizerError::Kind;
using Type = JsonValue::Type;

namespace {

// Ids above this are refused: the per-id tables would be huge (no real vocabulary is close).
constexpr int64_t kMaxId = (int64_t{1} << 24) - 1;

const char* const kFlamingoSpecial[] = {"<image>", "<|endofchunk|>", "<pad>", "<|endoftext|>"};

class Loader {
 public:
  explicit Loader(const std::string& source) : source_(source) {}

  [[noreturn]] void fail(Kind kind, const std::string& path, const std::string& expected,
                         const std::string& found) const {
    throw TokenizerError(kind, source_ + ": " + path + ": expected " + expected + ", found " + found);
  }

  static std::string found(const JsonValue& v) {
    if (v.type == Type::kString) {
      std::string s = v.string.size() > 40 ? v.string.substr(0, 40) + "..." : v.string;
      return "the string \"" + s + "\"";
    }
    if (v.type == Type::kNumber) {
      std::ostringstream os;
      os.imbue(std::locale::classic());
      if (v.is_integer) os << v.integer; else os << v.number;
      return "the number " + os.str();
    }
    if (v.type == Type::kBool) return v.boolean ? "true" : "false";
    return json_type_name(v.type);
  }

  void expect_type(const JsonValue& v, Type t, const std::string& path) const {
    if (v.type != t) fail(Kind::kInvalid, path + " (" + v.where() + ")", json_type_name(t), found(v));
  }

  // Every key of `obj` must be one of `allowed`.
  void check_keys(const JsonValue& obj, const std::string& path,
                  std::initializer_list<const char*> allowed) const {
    for (const auto& m : obj.object) {
      bool ok = false;
      for (const char* a : allowed) ok = ok || m.first == a;
      if (!ok) {
        std::string list;
        for (const char* a : allowed) list += std::string(list.empty() ? "" : ", ") + "\"" + a + "\"";
        fail(Kind::kUnsupported, path + " (" + obj.where() + ")", "only the keys " + list,
             "the key \"" + m.first + "\"");
      }
    }
  }

  const JsonValue& required(const JsonValue& obj, const char* key, const std::string& path) const {
    const JsonValue* v = obj.find(key);
    if (v == nullptr) fail(Kind::kInvalid, path + " (" + obj.where() + ")", std::string("the key \"") + key + "\"", "none");
    return *v;
  }

  bool get_bool(const JsonValue& obj, const char* key, const std::string& path, bool dflt,
                bool must_exist = false) const {
    const JsonValue* v = must_exist ? &required(obj, key, path) : obj.find(key);
    if (v == nullptr) return dflt;
    expect_type(*v, Type::kBool, path + "." + key);
    return v->boolean;
  }

  std::optional<std::string> get_opt_string(const JsonValue& obj, const char* key,
                                            const std::string& path) const {
    const JsonValue* v = obj.find(key);
    if (v == nullptr || v->type == Type::kNull) return std::nullopt;
    if (v->type != Type::kString) fail(Kind::kInvalid, path + "." + key + " (" + v->where() + ")", "a string or null", found(*v));
    return v->string;
  }

  // `obj` is null/absent (when allowed) or an object whose "type" is `type`.
  bool is_typed(const JsonValue* obj, const std::string& path, const char* type, bool null_ok,
                const char* what) const {
    if (obj == nullptr || obj->type == Type::kNull) {
      if (null_ok) return false;
      fail(Kind::kUnsupported, path, std::string("a ") + type + " " + what, obj ? "null" : "no \"" + path + "\" key");
    }
    if (obj->type != Type::kObject) {
      fail(Kind::kInvalid, path + " (" + obj->where() + ")", std::string(null_ok ? "null or " : "") + "an object", found(*obj));
    }
    const JsonValue* t = obj->find("type");
    if (t == nullptr || t->type != Type::kString || t->string != type) {
      fail(Kind::kUnsupported, path + ".type (" + obj->where() + ")",
           std::string(null_ok ? "null or " : "") + "\"" + type + "\" (the only " + what + " this tokenizer implements)",
           t ? found(*t) : "no type");
    }
    return true;
  }

  void load_byte_level_fields(const JsonValue& obj, const std::string& path,
                              tokenizer_detail::PreTokenizerConfig* cfg) const {
    check_keys(obj, path, {"type", "add_prefix_space", "trim_offsets", "use_regex"});
    const bool prefix = get_bool(obj, "add_prefix_space", path, true);
    get_bool(obj, "trim_offsets", path, true);  // offsets only: no effect on ids or text
    const bool regex = get_bool(obj, "use_regex", path, true);
    if (cfg != nullptr) {
      cfg->add_prefix_space = prefix;
      cfg->use_regex = regex;
    }
  }

  AddedToken load_added_token(const JsonValue& t, const std::string& path, int32_t* id) const {
    expect_type(t, Type::kObject, path);
    check_keys(t, path, {"id", "content", "single_word", "lstrip", "rstrip", "normalized", "special"});
    const JsonValue& idv = required(t, "id", path);
    if (idv.type != Type::kNumber || !idv.is_integer || idv.integer < 0 || idv.integer > kMaxId) {
      fail(Kind::kInvalid, path + ".id (" + idv.where() + ")", "an integer id in [0, 2^24)", found(idv));
    }
    *id = static_cast<int32_t>(idv.integer);
    AddedToken tok;
    const JsonValue& content = required(t, "content", path);
    expect_type(content, Type::kString, path + ".content");
    if (content.string.empty()) fail(Kind::kInvalid, path + ".content (" + content.where() + ")", "a non-empty token", "\"\"");
    tok.content = content.string;
    tok.single_word = get_bool(t, "single_word", path, false, true);
    tok.lstrip = get_bool(t, "lstrip", path, false, true);
    tok.rstrip = get_bool(t, "rstrip", path, false, true);
    tok.normalized = get_bool(t, "normalized", path, false, true);
    tok.special = get_bool(t, "special", path, false, true);
    if (tok.single_word) {
      fail(Kind::kUnsupported, path + ".single_word (" + t.where() + ")",
           "false (single-word added tokens are not implemented)", "true");
    }
    return tok;
  }

  std::unique_ptr<tokenizer_detail::Bpe> load_model(const JsonValue& model) const {
    const std::string path = "model";
    if (model.type != Type::kObject) fail(Kind::kInvalid, path + " (" + model.where() + ")", "an object", found(model));
    if (const JsonValue* t = model.find("type")) {
      if (t->type != Type::kString || t->string != "BPE") {
        fail(Kind::kUnsupported, "model.type (" + t->where() + ")", "\"BPE\" (the only model this tokenizer implements)", found(*t));
      }
    }
    check_keys(model, path, {"type", "dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix",
                             "fuse_unk", "byte_fallback", "ignore_merges", "vocab", "merges"});
    if (const JsonValue* d = model.find("dropout")) {
      if (d->type == Type::kNumber) {
        if (d->number != 0.0) {
          fail(Kind::kUnsupported, "model.dropout (" + d->where() + ")", "null or 0 (BPE dropout is random)", found(*d));
        }
      } else if (d->type != Type::kNull) {
        fail(Kind::kInvalid, "model.dropout (" + d->where() + ")", "null or a number", found(*d));
      }
    }
    tokenizer_detail::BpeOptions opt;
    opt.unk_token = get_opt_string(model, "unk_token", path);
    opt.continuing_subword_prefix = get_opt_string(model, "continuing_subword_prefix", path);
    opt.end_of_word_suffix = get_opt_string(model, "end_of_word_suffix", path);
    opt.fuse_unk = get_bool(model, "fuse_unk", path, false);
    opt.byte_fallback = get_bool(model, "byte_fallback", path, false);
    opt.ignore_merges = get_bool(model, "ignore_merges", path, false);

    const JsonValue& vocab = required(model, "vocab", path);
    expect_type(vocab, Type::kObject, "model.vocab");
    std::unordered_map<std::string, int32_t> v;
    std::unordered_map<int32_t, const std::string*> seen;
    v.reserve(vocab.object.size());
    seen.reserve(vocab.object.size());
    for (const auto& m : vocab.object) {
      const JsonValue& idv = m.second;
      if (idv.type != Type::kNumber || !idv.is_integer || idv.integer < 0 || idv.integer > kMaxId) {
        fail(Kind::kInvalid, "model.vocab[\"" + m.first + "\"] (" + idv.where() + ")", "an integer id in [0, 2^24)", found(idv));
      }
      const int32_t id = static_cast<int32_t>(idv.integer);
      auto ins = seen.emplace(id, &m.first);
      if (!ins.second) {
        fail(Kind::kInvalid, "model.vocab[\"" + m.first + "\"] (" + idv.where() + ")",
             "ids used once", "id " + std::to_string(id) + " also used by \"" + *ins.first->second + "\"");
      }
      v.emplace(m.first, id);
    }

    const JsonValue& merges = required(model, "merges", path);
    expect_type(merges, Type::kArray, "model.merges");
    std::vector<std::pair<std::string, std::string>> pairs;
    pairs.reserve(merges.array.size());
    for (size_t i = 0; i < merges.array.size(); ++i) {
      const JsonValue& e = merges.array[i];
      const std::string p = "model.merges[" + std::to_string(i) + "] (" + e.where() + ")";
      if (e.type == Type::kString) {
        const size_t sp = e.string.find(' ');
        if (sp == std::string::npos || e.string.find(' ', sp + 1) != std::string::npos) {
          fail(Kind::kInvalid, p, "\"A B\" (two tokens separated by one space)", found(e));
        }
        pairs.emplace_back(e.string.substr(0, sp), e.string.substr(sp + 1));
      } else if (e.type == Type::kArray && e.array.size() == 2 && e.array[0].type == Type::kString &&
                 e.array[1].type == Type::kString) {
        pairs.emplace_back(e.array[0].string, e.array[1].string);
      } else {
        fail(Kind::kInvalid, p, "a merge: \"A B\" or [\"A\", \"B\"]", found(e));
      }
    }
    return std::make_unique<tokenizer_detail::Bpe>(std::move(v), pairs, std::move(opt), source_ + ": model");
  }

  std::shared_ptr<const Tokenizer::Impl> load(const JsonValue& root) const {
    auto impl = std::make_shared<Tokenizer::Impl>();
    impl->source = source_;
    if (root.type != Type::kObject) fail(Kind::kInvalid, "the top level", "an object", found(root));
    check_keys(root, "the top level", {"version", "truncation", "padding", "added_tokens", "normalizer",
                                       "pre_tokenizer", "post_processor", "decoder", "model"});
    if (const JsonValue* v = root.find("version")) {
      if (v->type != Type::kString || v->string != "1.0") fail(Kind::kUnsupported, "version (" + v->where() + ")", "\"1.0\"", found(*v));
    }
    // Padding and truncation are ignored, as FlamingoTokenizer turns them off.
    for (const char* k : {"truncation", "padding"}) {
      const JsonValue* v = root.find(k);
      if (v != nullptr && v->type != Type::kNull && v->type != Type::kObject) {
        fail(Kind::kInvalid, std::string(k) + " (" + v->where() + ")", "null or an object", found(*v));
      }
    }
    if (const JsonValue* n = root.find("normalizer")) {
      if (n->type != Type::kNull) {
        const JsonValue* t = n->type == Type::kObject ? n->find("type") : nullptr;
        fail(Kind::kUnsupported, "normalizer (" + n->where() + ")", "null (normalizers are not implemented)",
             t && t->type == Type::kString ? "a normalizer of type \"" + t->string + "\"" : found(*n));
      }
    }
    const JsonValue* pre = root.find("pre_tokenizer");
    is_typed(pre, "pre_tokenizer", "ByteLevel", false, "pre-tokenizer");
    load_byte_level_fields(*pre, "pre_tokenizer", &impl->pre);
    const JsonValue* post = root.find("post_processor");
    if (is_typed(post, "post_processor", "ByteLevel", true, "post-processor")) {
      load_byte_level_fields(*post, "post_processor", nullptr);  // offsets only
    }
    const JsonValue* dec = root.find("decoder");
    is_typed(dec, "decoder", "ByteLevel", false, "decoder");
    load_byte_level_fields(*dec, "decoder", nullptr);  // its fields do not change decoding

    impl->bpe = load_model(required(root, "model", "the top level"));
    const auto& vocab = impl->bpe->vocab();
    const auto model_id = [&vocab](const std::string& s) -> std::optional<int32_t> {
      auto it = vocab.find(s);
      if (it == vocab.end()) return std::nullopt;
      return it->second;
    };

    // Added tokens, in file order, as tokenizers loads them; the id each one gets must be
    // the id the file gives it (tokenizers only warns; ids that moved would break a model).
    if (const JsonValue* added = root.find("added_tokens")) {
      expect_type(*added, Type::kArray, "added_tokens");
      for (size_t i = 0; i < added->array.size(); ++i) {
        const std::string path = "added_tokens[" + std::to_string(i) + "]";
        int32_t file_id;
        const AddedToken tok = load_added_token(added->array[i], path, &file_id);
        impl->added.add(tok, model_id, vocab.size());
        const int32_t got = *impl->added.token_to_id(tok.content);
        if (got != file_id) {
          fail(Kind::kInvalid, path + " (" + added->array[i].where() + ")",
               "\"" + tok.content + "\" to have the id the file gives it, " + std::to_string(file_id),
               "it gets id " + std::to_string(got) + " (from model.vocab or an earlier added token)");
        }
      }
    }

    auto max_id = [&]() {
      int64_t m = -1;
      for (const auto& kv : vocab) m = std::max<int64_t>(m, kv.second);
      for (const auto& kv : impl->added.by_id()) m = std::max<int64_t>(m, kv.first);
      return m;
    };
    // The Flamingo special tokens, added like FlamingoTokenizer adds them.
    const int64_t before = max_id() + 1;
    int added_count = 0;
    for (const char* content : kFlamingoSpecial) {
      AddedToken t;
      t.content = content;
      t.normalized = false;
      t.special = true;
      added_count += impl->added.add(t, model_id, vocab.size()) ? 1 : 0;
    }
    impl->added.build();
    const int64_t after = max_id() + 1;
    if (after - 1 > kMaxId) fail(Kind::kUnsupported, "the vocabulary", "ids below 2^24", "id " + std::to_string(after - 1));
    impl->vocab_size = static_cast<int32_t>(after);
    impl->num_added_tokens = added_count > 0 ? static_cast<int32_t>(std::max<int64_t>(0, after - before)) : 0;

    // Per-id tables: the token (an added token shadows a model token with its id).
    const size_t n = static_cast<size_t>(impl->vocab_size);
    impl->has_token.assign(n, 0);
    impl->token.assign(n, std::string());
    impl->bytes.assign(n, std::string());
    impl->special.assign(n, 0);
    for (const auto& kv : vocab) {
      impl->has_token[kv.second] = 1;
      impl->token[kv.second] = kv.first;
    }
    for (const auto& kv : impl->added.by_id()) {
      impl->has_token[kv.first] = 1;
      impl->token[kv.first] = kv.second.content;
    }
    for (size_t id = 0; id < n; ++id) {
      if (!impl->has_token[id]) continue;
      impl->bytes[id] = tokenizer_detail::symbols_to_bytes(impl->token[id]);
      impl->special[id] = impl->added.is_special_content(impl->token[id]) ? 1 : 0;
    }
    impl->image_id = *impl->added.token_to_id(kFlamingoSpecial[0]);
    impl->eoc_id = *impl->added.token_to_id(kFlamingoSpecial[1]);
    impl->pad_id = *impl->added.token_to_id(kFlamingoSpecial[2]);
    impl->eos_id = *impl->added.token_to_id(kFlamingoSpecial[3]);
    return impl;
  }

 private:
  const std::string& source_;
};

}  // namespace

std::shared_ptr<const Tokenizer::Impl> Tokenizer::Impl::load(const JsonValue& root,
                                                             const std::string& source) {
  return Loader(source).load(root);
}

}  // namespace flamingo_rt
