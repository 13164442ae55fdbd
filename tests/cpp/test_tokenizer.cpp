// ctest `tokenizer`: the C++ tokenizer through its public header against ids and texts
// that the `tokenizers` library gave for the fixture tokenizer.json (tests/cpp/fixtures,
// made by tools/gen_tokenizer_fixture.py): encode, decode (with and without special tokens,
// ill-formed UTF-8), the incremental decoder, lookups, use from several threads, and the
// errors for missing, corrupted and unsupported files and bad input. Argument: the
// fixtures directory.
// Exits non-zero on failure.
#include "flamingo_rt/tokenizer.h"

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

struct EncodeCase {
  std::string text;
  std::vector<int32_t> ids;
  std::string decoded, decoded_skip;
};

struct DecodeCase {
  std::vector<int32_t> ids;
  std::string text;
};

struct NoSpecialCase {
  int32_t vocab_size, num_added_tokens;
  std::vector<int32_t> special_ids;  // <image>, <|endofchunk|>, <pad>, <|endoftext|>
  std::string text;
  std::vector<int32_t> ids;
};

#include "fixtures/tokenizer_cases.inc"

using flamingo_rt::IncrementalDecoder;
using flamingo_rt::Tokenizer;
using flamingo_rt::TokenizerError;
using Kind = TokenizerError::Kind;

int g_fail = 0;

#define CHECK(cond, ...)                                      \
  do {                                                        \
    if (!(cond)) {                                            \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                      \
      std::fprintf(stderr, "\n");                             \
      ++g_fail;                                               \
    }                                                         \
  } while (0)

std::string show(const std::vector<int32_t>& ids) {
  std::string s = "[";
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? ", " : "") + std::to_string(ids[i]);
  return s + "]";
}

bool valid_utf8_whole_chars(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char b = static_cast<unsigned char>(s[i]);
    const size_t n = b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
    if (b >= 0x80 && b < 0xC2) return false;
    if (i + n > s.size()) return false;
    for (size_t k = 1; k < n; ++k) {
      if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
    }
    i += n;
  }
  return true;
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Runs `fn`, which must throw a TokenizerError of `kind` whose message contains `needle`.
template <typename Fn>
void expect_error(Fn fn, Kind kind, const std::string& needle, const char* what) {
  try {
    fn();
    CHECK(false, "%s: expected a TokenizerError, got none", what);
  } catch (const TokenizerError& e) {
    CHECK(e.kind() == kind, "%s: wrong error kind %d: %s", what, static_cast<int>(e.kind()), e.what());
    CHECK(std::string(e.what()).find(needle) != std::string::npos, "%s: message lacks \"%s\": %s", what,
          needle.c_str(), e.what());
  }
}

void test_encode_decode(const Tokenizer& tok) {
  for (const EncodeCase& c : kEncodeCases) {
    const std::vector<int32_t> ids = tok.encode(c.text);
    CHECK(ids == c.ids, "encode(\"%s\") = %s, expected %s", c.text.c_str(), show(ids).c_str(), show(c.ids).c_str());
    const std::string d = tok.decode(c.ids);
    CHECK(d == c.decoded, "decode(%s) = \"%s\", expected \"%s\"", show(c.ids).c_str(), d.c_str(), c.decoded.c_str());
    const std::string ds = tok.decode(c.ids, /*skip_special_tokens=*/true);
    CHECK(ds == c.decoded_skip, "decode(%s, skip) = \"%s\", expected \"%s\"", show(c.ids).c_str(), ds.c_str(),
          c.decoded_skip.c_str());
    for (bool skip : {false, true}) {
      IncrementalDecoder dec(tok, skip);
      std::string all;
      for (int32_t id : c.ids) {
        const std::string piece = dec.push(id);
        CHECK(valid_utf8_whole_chars(piece), "push(%d) returned a partial character", id);
        all += piece;
      }
      all += dec.flush();
      CHECK(all == (skip ? c.decoded_skip : c.decoded), "incremental decode of %s = \"%s\"", show(c.ids).c_str(),
            all.c_str());
    }
  }
  for (const DecodeCase& c : kDecodeCases) {
    const std::string d = tok.decode(c.ids);
    CHECK(d == c.text, "decode(%s) = \"%s\", expected \"%s\"", show(c.ids).c_str(), d.c_str(), c.text.c_str());
    IncrementalDecoder dec(tok);
    std::string all;
    for (int32_t id : c.ids) all += dec.push(id);
    all += dec.flush();
    CHECK(all == c.text, "incremental decode of %s = \"%s\", expected \"%s\"", show(c.ids).c_str(), all.c_str(),
          c.text.c_str());
  }
  // A character split over tokens comes out whole, with the push that completes it.
  const std::vector<int32_t> zhong = kDecodeCases[1].ids;  // E4 | B8 | AD = U+4E2D
  IncrementalDecoder dec(tok);
  CHECK(dec.push(zhong[0]).empty() && dec.push(zhong[1]).empty(), "partial character leaked");
  CHECK(dec.push(zhong[2]) == "\xE4\xB8\xAD", "completed character not returned");
  CHECK(dec.flush().empty(), "flush after a whole character returned text");
  dec.push(zhong[0]);
  CHECK(dec.flush() == "\xEF\xBF\xBD", "flush of a truncated character: expected U+FFFD");
}

void test_lookups(const Tokenizer& tok) {
  CHECK(tok.vocab_size() == kFixtureVocabSize, "vocab_size %d, expected %d", tok.vocab_size(), kFixtureVocabSize);
  CHECK(tok.image_token_id() == 0 && tok.eoc_token_id() == 1 && tok.pad_token_id() == 2 &&
            tok.eos_token_id() == 3 && tok.bos_token_id() == 3,
        "special ids %d %d %d %d", tok.image_token_id(), tok.eoc_token_id(), tok.pad_token_id(), tok.eos_token_id());
  CHECK(tok.num_added_tokens() == 0, "num_added_tokens %d", tok.num_added_tokens());
  CHECK((tok.special_token_ids() == std::vector<int32_t>{0, 1, 2, 3}), "special_token_ids %s",
        show(tok.special_token_ids()).c_str());
  CHECK(tok.is_special(1) && !tok.is_special(68) && !tok.is_special(-1), "is_special");
  CHECK(tok.token_to_id("<|endofchunk|>") == 1, "token_to_id(<|endofchunk|>)");
  CHECK(tok.token_to_id("a") == 68, "token_to_id(a)");
  CHECK(!tok.token_to_id("no such token").has_value(), "token_to_id of an unknown token");
  CHECK(tok.id_to_token(0) == std::string("<image>"), "id_to_token(0)");
  CHECK(tok.id_to_token(224) == std::string("\xC4\xA0"), "id_to_token(224) should be U+0120 (a space)");
  CHECK(!tok.id_to_token(kFixtureVocabSize).has_value() && !tok.id_to_token(-1).has_value(), "id_to_token out of range");
  CHECK(tok.token_bytes(224) == " ", "token_bytes(224)");
}

void test_errors(const std::string& dir, const std::string& json) {
  expect_error([&] { Tokenizer::from_file(dir + "/no_such_file.json"); }, Kind::kIo, "no_such_file.json", "missing file");
  // A directory without tokenizer.json.
  expect_error([&] { Tokenizer::from_file(dir + "/.."); }, Kind::kIo, "tokenizer.json", "directory without the file");
  expect_error([&] { Tokenizer::from_json(""); }, Kind::kJson, "empty", "empty input");
  expect_error([&] { Tokenizer::from_json(json.substr(0, json.size() / 2)); }, Kind::kJson, "line ", "truncated file");
  expect_error([&] { Tokenizer::from_json("{\"model\": {\"vocab\": {}, \"merges\": [],}}"); }, Kind::kJson,
               "expected a string key", "trailing comma");
  expect_error([&] { Tokenizer::from_json("{\"a\": 1, \"a\": 2}"); }, Kind::kJson, "twice", "duplicate key");
  expect_error([&] { Tokenizer::from_json("[1, 2]"); }, Kind::kInvalid, "expected an object", "not an object");
  auto replaced = [&](const std::string& from, const std::string& to) {
    std::string s = json;
    const size_t p = s.find(from);
    CHECK(p != std::string::npos, "fixture lacks \"%s\"", from.c_str());
    return p == std::string::npos ? s : s.replace(p, from.size(), to);
  };
  expect_error([&] { Tokenizer::from_json(replaced("\"normalizer\": null", "\"normalizer\": {\"type\": \"NFC\"}")); },
               Kind::kUnsupported, "NFC", "a normalizer");
  expect_error([&] { Tokenizer::from_json(replaced("\"type\": \"BPE\"", "\"type\": \"WordPiece\"")); },
               Kind::kUnsupported, "WordPiece", "another model");
  expect_error([&] { Tokenizer::from_json(replaced("\"merges\": [", "\"merges\": [[\"no\", \"such\"], ")); },
               Kind::kInvalid, "\"no\"", "a merge of unknown tokens");
  expect_error([&] { Tokenizer::from_json(replaced("\"single_word\": false", "\"single_word\": true")); },
               Kind::kUnsupported, "single_word", "single-word added token");
  expect_error([&] { Tokenizer::from_json(replaced("\"id\": 1,", "\"id\": 7,")); }, Kind::kInvalid, "gets id 1",
               "added token with a wrong id");

  const Tokenizer tok = Tokenizer::from_json(json);
  expect_error([&] { tok.encode("bad \xC3\x28 utf-8"); }, Kind::kBadInput, "byte offset 4", "invalid UTF-8");
  expect_error([&] { tok.decode({68, kFixtureVocabSize}); }, Kind::kBadInput, std::to_string(kFixtureVocabSize),
               "unknown id");
  expect_error([&] { tok.decode({-1}); }, Kind::kBadInput, "-1", "negative id");
  IncrementalDecoder dec(tok);
  expect_error([&] { dec.push(1 << 30); }, Kind::kBadInput, "1073741824", "push of an unknown id");
}

// A file without the Flamingo special tokens gets them appended, as FlamingoTokenizer does.
void test_special_tokens_added(const std::string& dir) {
  const Tokenizer tok = Tokenizer::from_file(dir + "/tokenizer_nospecial.json");
  const NoSpecialCase& c = kNoSpecial;
  CHECK(tok.vocab_size() == c.vocab_size, "vocab_size %d, expected %d", tok.vocab_size(), c.vocab_size);
  CHECK(tok.num_added_tokens() == c.num_added_tokens, "num_added_tokens %d, expected %d", tok.num_added_tokens(),
        c.num_added_tokens);
  const std::vector<int32_t> special{tok.image_token_id(), tok.eoc_token_id(), tok.pad_token_id(), tok.eos_token_id()};
  CHECK(special == c.special_ids, "special ids %s, expected %s", show(special).c_str(), show(c.special_ids).c_str());
  CHECK(tok.special_token_ids() == c.special_ids, "special_token_ids %s", show(tok.special_token_ids()).c_str());
  CHECK(tok.encode(c.text) == c.ids, "encode(\"%s\") = %s, expected %s", c.text.c_str(), show(tok.encode(c.text)).c_str(),
        show(c.ids).c_str());
  CHECK(tok.decode(c.ids) == c.text, "decode with appended special tokens");
}

// One Tokenizer used from several threads at once (its BPE cache is shared): every thread
// gets the fixture's ids.
void test_threads(const Tokenizer& tok) {
  std::vector<int> wrong(4, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&tok, &wrong, t] {
      for (int rep = 0; rep < 50; ++rep) {
        for (const EncodeCase& c : kEncodeCases) {
          if (tok.encode(c.text) != c.ids || tok.decode(c.ids) != c.decoded) ++wrong[t];
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t) CHECK(wrong[t] == 0, "thread %d: %d wrong results", t, wrong[t]);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s FIXTURES_DIR\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  try {
    const Tokenizer tok = Tokenizer::from_file(dir + "/tokenizer.json");
    const Tokenizer by_dir = Tokenizer::from_file(dir);  // a folder holding tokenizer.json
    CHECK(by_dir.encode("a red square") == tok.encode("a red square"), "loading by directory");
    test_encode_decode(tok);
    test_lookups(tok);
    test_threads(Tokenizer::from_file(dir + "/tokenizer.json"));  // a fresh, empty cache
    const std::string json = read_file(dir + "/tokenizer.json");
    test_errors(dir, json);
    test_special_tokens_added(dir);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FAIL: unexpected exception: %s\n", e.what());
    return 1;
  }
  if (g_fail) {
    std::fprintf(stderr, "%d check(s) failed\n", g_fail);
    return 1;
  }
  std::printf("tokenizer: %zu encode cases, %zu decode cases, errors and lookups OK\n",
              sizeof(kEncodeCases) / sizeof(kEncodeCases[0]), sizeof(kDecodeCases) / sizeof(kDecodeCases[0]));
  return 0;
}
