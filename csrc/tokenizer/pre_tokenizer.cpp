// The GPT-2 split as a hand-written matcher over decoded code points (see pre_tokenizer.h).
#include "pre_tokenizer.h"

#include <cstdint>

#include "unicode_class.h"
#include "utf8.h"

namespace flamingo_rt {
namespace tokenizer_detail {

namespace {

enum class Cls : uint8_t { kLetter, kNumber, kSpace, kOther };

Cls classify(uint32_t cp) {
  if (is_letter(cp)) return Cls::kLetter;
  if (is_number(cp)) return Cls::kNumber;
  if (is_whitespace(cp)) return Cls::kSpace;
  return Cls::kOther;  // [^\s\p{L}\p{N}]
}

}  // namespace

void gpt2_split(const std::string& s, std::vector<std::pair<size_t, size_t>>& out) {
  // Decode once: code point, class, byte offset of each character (+ the end offset).
  std::vector<uint32_t> cp;
  std::vector<Cls> cls;
  std::vector<size_t> off;
  cp.reserve(s.size());
  cls.reserve(s.size());
  off.reserve(s.size() + 1);
  for (size_t pos = 0, len; pos < s.size(); pos += len) {
    off.push_back(pos);
    cp.push_back(utf8_decode(s, pos, &len));
    cls.push_back(classify(cp.back()));
  }
  const size_t n = cp.size();
  off.push_back(s.size());

  size_t i = 0;
  auto emit = [&](size_t end) {
    out.emplace_back(off[i], off[end]);
    i = end;
  };
  auto run_end = [&](size_t from, Cls c) {
    while (from < n && cls[from] == c) ++from;
    return from;
  };
  while (i < n) {
    const uint32_t c = cp[i];
    // 's|'t|'re|'ve|'m|'ll|'d
    if (c == '\'' && i + 1 < n) {
      const uint32_t c1 = cp[i + 1];
      if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') {
        emit(i + 2);
        continue;
      }
      if (i + 2 < n) {
        const uint32_t c2 = cp[i + 2];
        if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) {
          emit(i + 3);
          continue;
        }
      }
    }
    // ' ?\p{L}+', ' ?\p{N}+', ' ?[^\s\p{L}\p{N}]+', in this order: the optional space is
    // taken when a run of the class follows it, else the run must start here.
    bool matched = false;
    for (Cls k : {Cls::kLetter, Cls::kNumber, Cls::kOther}) {
      if (c == ' ' && i + 1 < n && cls[i + 1] == k) {
        emit(run_end(i + 1, k));
        matched = true;
        break;
      }
      if (cls[i] == k) {
        emit(run_end(i, k));
        matched = true;
        break;
      }
    }
    if (matched) continue;
    // Here cp[i] is whitespace. '\s+(?!\S)': the whole run when it ends the text, else the
    // run less its last character (which then precedes the non-space) if that leaves one;
    // otherwise '\s+': the single whitespace character.
    const size_t j = run_end(i, Cls::kSpace);
    if (j == n || j - i == 1) {
      emit(j);
    } else {
      emit(j - 1);
    }
  }
}

void pre_tokenize_piece(const std::string& piece, const PreTokenizerConfig& cfg,
                        std::vector<std::string>& out) {
  const std::string* text = &piece;
  std::string prefixed;
  if (cfg.add_prefix_space && (piece.empty() || piece[0] != ' ')) {
    prefixed.reserve(piece.size() + 1);
    prefixed += ' ';
    prefixed += piece;
    text = &prefixed;
  }
  if (!cfg.use_regex) {
    out.push_back(*text);
    return;
  }
  std::vector<std::pair<size_t, size_t>> spans;
  gpt2_split(*text, spans);
  for (const auto& sp : spans) out.emplace_back(*text, sp.first, sp.second - sp.first);
}

}  // namespace tokenizer_detail
}  // namespace flamingo_rt
