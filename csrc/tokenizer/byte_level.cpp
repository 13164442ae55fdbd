// Tables built once from the rule in byte_level.h.
#include "byte_level.h"

#include <array>

#include "utf8.h"

namespace flamingo_rt {
namespace tokenizer_detail {

namespace {

bool printable(int b) { return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF); }

struct Tables {
  std::array<std::string, 256> symbol;  // byte -> UTF-8 of its character
  std::array<int, 512> byte_of;         // code point (< 0x200) -> byte, -1 when none
  Tables() {
    byte_of.fill(-1);
    uint32_t extra = 0;
    for (int b = 0; b < 256; ++b) {
      const uint32_t cp = printable(b) ? static_cast<uint32_t>(b) : 256 + extra++;
      utf8_append(symbol[b], cp);
      byte_of[cp] = b;
    }
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

}  // namespace

const std::string& byte_to_symbol(unsigned char b) { return tables().symbol[b]; }

std::string bytes_to_symbols(const std::string& bytes) {
  const Tables& t = tables();
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char b : bytes) out += t.symbol[b];
  return out;
}

std::string symbols_to_bytes(const std::string& token) {
  const Tables& t = tables();
  std::string out;
  out.reserve(token.size());
  size_t pos = 0, len;
  while (pos < token.size()) {
    const uint32_t cp = utf8_decode(token, pos, &len);
    if (cp >= t.byte_of.size() || t.byte_of[cp] < 0) return token;
    out += static_cast<char>(t.byte_of[cp]);
    pos += len;
  }
  return out;
}

}  // namespace tokenizer_detail
}  // namespace flamingo_rt
