// Code point classes of the GPT-2 pre-tokenization regex: \p{L}, \p{N}, \s, exactly as the
// `tokenizers` library's regex engine has them (tables from tools/gen_unicode_tables.py).
#pragma once

#include <cstdint>

namespace flamingo_rt {
namespace tokenizer_detail {

bool is_letter(uint32_t cp);      // \p{L}
bool is_number(uint32_t cp);      // \p{N}
bool is_whitespace(uint32_t cp);  // \s (Unicode White_Space)

}  // namespace tokenizer_detail
}  // namespace flamingo_rt
