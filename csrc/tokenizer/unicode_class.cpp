// Binary search over the generated range tables, with an ASCII fast path.
#include "unicode_class.h"

#include <algorithm>
#include <iterator>

#include "unicode_tables.h"

namespace flamingo_rt {
namespace tokenizer_detail {

namespace {

template <size_t N>
bool in_ranges(const CodePointRange (&table)[N], uint32_t cp) {
  // First range whose upper end is >= cp.
  const CodePointRange* it = std::lower_bound(
      std::begin(table), std::end(table), cp,
      [](const CodePointRange& r, uint32_t c) { return r.hi < c; });
  return it != std::end(table) && it->lo <= cp;
}

}  // namespace

bool is_letter(uint32_t cp) {
  if (cp < 0x80) return (cp | 0x20) >= 'a' && (cp | 0x20) <= 'z';
  return in_ranges(kLetterRanges, cp);
}

bool is_number(uint32_t cp) {
  if (cp < 0x80) return cp >= '0' && cp <= '9';
  return in_ranges(kNumberRanges, cp);
}

bool is_whitespace(uint32_t cp) {
  if (cp < 0x80) return cp == ' ' || (cp >= 0x09 && cp <= 0x0D);
  return in_ranges(kWhitespaceRanges, cp);
}

}  // namespace tokenizer_detail
}  // namespace flamingo_rt
