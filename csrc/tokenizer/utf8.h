// UTF-8 encoding, validation and lossy decoding (invalid sequences become U+FFFD the way
// Rust's String::from_utf8_lossy and Python's "replace" do it: one U+FFFD per maximal
// subpart of an ill-formed sequence).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace flamingo_rt {
namespace tokenizer_detail {

// Appends the UTF-8 bytes of the scalar value `cp` (< 0x110000, not a surrogate).
void utf8_append(std::string& out, uint32_t cp);

// Length (1..4) of the well-formed UTF-8 character starting at s[pos], 0 if it is not one.
size_t utf8_valid_prefix_length(const std::string& s, size_t pos);

// Throws TokenizerError(kBadInput) naming the byte offset of the first ill-formed sequence.
void utf8_validate(const std::string& s, const char* what);

// The code point at s[pos] of well-formed UTF-8 text; *len receives its length in bytes.
uint32_t utf8_decode(const std::string& s, size_t pos, size_t* len);

// `bytes` as valid UTF-8, ill-formed sequences replaced by U+FFFD.
std::string utf8_lossy(const std::string& bytes);

// Streaming form of utf8_lossy: decodes `pending` (the bytes not yet emitted) as far as it
// can, removing what it returns. Unless `final`, an incomplete but so far well-formed
// sequence at the end stays in `pending`; with `final` it becomes U+FFFD.
std::string utf8_lossy_stream(std::string& pending, bool final);

}  // namespace tokenizer_detail
}  // namespace flamingo_rt
