// UTF-8 per RFC 3629 / Unicode 3.9 (Table 3-7, well-formed byte sequences).
#include "utf8.h"

#include <cstdio>

#include "flamingo_rt/tokenizer.h"

namespace flamingo_rt {
namespace tokenizer_detail {

namespace {

const char kReplacement[] = "\xEF\xBF\xBD";  // U+FFFD

// For a lead byte: the number of continuation bytes and the range of the first one;
// false for bytes that cannot start a character.
bool lead_info(unsigned char b, int* need, unsigned char* lo, unsigned char* hi) {
  *lo = 0x80;
  *hi = 0xBF;
  if (b >= 0xC2 && b <= 0xDF) {
    *need = 1;
  } else if (b >= 0xE0 && b <= 0xEF) {
    *need = 2;
    if (b == 0xE0) *lo = 0xA0;
    if (b == 0xED) *hi = 0x9F;
  } else if (b >= 0xF0 && b <= 0xF4) {
    *need = 3;
    if (b == 0xF0) *lo = 0x90;
    if (b == 0xF4) *hi = 0x8F;
  } else {
    return false;
  }
  return true;
}

enum class Step { kChar, kInvalid, kIncomplete };

// Classifies the sequence at s[pos]: a well-formed character (*len bytes), an ill-formed
// maximal subpart (*len bytes, to replace by one U+FFFD), or a well-formed but truncated
// prefix that runs to the end of s.
Step step(const std::string& s, size_t pos, size_t* len) {
  const unsigned char b = static_cast<unsigned char>(s[pos]);
  if (b < 0x80) {
    *len = 1;
    return Step::kChar;
  }
  int need;
  unsigned char lo, hi;
  if (!lead_info(b, &need, &lo, &hi)) {
    *len = 1;
    return Step::kInvalid;
  }
  size_t j = pos + 1;
  for (int k = 0; k < need; ++k, ++j) {
    if (j >= s.size()) {
      *len = j - pos;
      return Step::kIncomplete;
    }
    const unsigned char c = static_cast<unsigned char>(s[j]);
    if (c < (k == 0 ? lo : 0x80) || c > (k == 0 ? hi : 0xBF)) {
      *len = j - pos;
      return Step::kInvalid;
    }
  }
  *len = j - pos;
  return Step::kChar;
}

}  // namespace

void utf8_append(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

size_t utf8_valid_prefix_length(const std::string& s, size_t pos) {
  size_t len;
  return step(s, pos, &len) == Step::kChar ? len : 0;
}

void utf8_validate(const std::string& s, const char* what) {
  size_t pos = 0, len;
  while (pos < s.size()) {
    const Step st = step(s, pos, &len);
    if (st != Step::kChar) {
      char buf[160];
      std::snprintf(buf, sizeof buf,
                    "%s: expected UTF-8 text, found %s at byte offset %zu (byte 0x%02X)", what,
                    st == Step::kIncomplete ? "a truncated multi-byte sequence" : "an invalid byte sequence",
                    pos,
                    static_cast<unsigned char>(s[pos]));
      throw TokenizerError(TokenizerError::Kind::kBadInput, buf);
    }
    pos += len;
  }
}

uint32_t utf8_decode(const std::string& s, size_t pos, size_t* len) {
  const unsigned char b = static_cast<unsigned char>(s[pos]);
  if (b < 0x80) {
    *len = 1;
    return b;
  }
  auto cont = [&](size_t k) { return static_cast<uint32_t>(static_cast<unsigned char>(s[pos + k]) & 0x3F); };
  if (b < 0xE0) {
    *len = 2;
    return ((b & 0x1Fu) << 6) | cont(1);
  }
  if (b < 0xF0) {
    *len = 3;
    return ((b & 0x0Fu) << 12) | (cont(1) << 6) | cont(2);
  }
  *len = 4;
  return ((b & 0x07u) << 18) | (cont(1) << 12) | (cont(2) << 6) | cont(3);
}

std::string utf8_lossy(const std::string& bytes) {
  std::string pending = bytes;
  return utf8_lossy_stream(pending, /*final=*/true);
}

std::string utf8_lossy_stream(std::string& pending, bool final) {
  std::string out;
  out.reserve(pending.size());
  size_t pos = 0, len;
  while (pos < pending.size()) {
    const Step st = step(pending, pos, &len);
    if (st == Step::kChar) {
      out.append(pending, pos, len);
    } else if (st == Step::kInvalid) {
      out += kReplacement;
    } else {  // incomplete: runs to the end
      if (!final) break;
      out += kReplacement;
    }
    pos += len;
  }
  pending.erase(0, pos);
  return out;
}

}  // namespace tokenizer_detail
}  // namespace flamingo_rt
