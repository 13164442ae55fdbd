// The byte-level alphabet of GPT-2 BPE: each of the 256 byte values is written as one
// printable character. Printable Latin-1 bytes ('!'..'~', U+00A1..U+00AC, U+00AE..U+00FF)
// stand for themselves; the other 68 bytes map, in increasing order, to U+0100, U+0101, ...
#pragma once

#include <cstdint>
#include <string>

namespace flamingo_rt {
namespace tokenizer_detail {

// The character (as UTF-8) that stands for byte `b`.
const std::string& byte_to_symbol(unsigned char b);

// `bytes` written in the byte-level alphabet (what BPE sees).
std::string bytes_to_symbols(const std::string& bytes);

// The bytes a token string stands for, the way tokenizers' ByteLevel decoder reads it: when
// every character of the token is in the byte-level alphabet, the bytes they stand for;
// otherwise the token's own UTF-8 bytes. `token` must be valid UTF-8.
std::string symbols_to_bytes(const std::string& token);

}  // namespace tokenizer_detail
}  // namespace flamingo_rt
