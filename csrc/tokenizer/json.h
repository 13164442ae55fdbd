// A small strict JSON reader (RFC 8259) for tokenizer.json: UTF-8 only, no comments, no
// trailing commas, no duplicate object keys, no lone surrogates in \u escapes, nesting depth
// at most 512. Errors are TokenizerError(kJson) with line and column.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace flamingo_rt {
namespace tokenizer_detail {

class JsonValue {
 public:
  enum class Type { kNull, kBool, kNumber, kString, kArray, kObject };

  Type type = Type::kNull;
  bool boolean = false;
  double number = 0.0;
  bool is_integer = false;  // a number written without fraction or exponent that fits int64
  int64_t integer = 0;
  std::string string;
  std::vector<JsonValue> array;
  std::vector<std::pair<std::string, JsonValue>> object;  // in file order, keys unique
  size_t line = 0, column = 0;  // where the value starts (1-based)

  // The member `key` of an object, or nullptr.
  const JsonValue* find(const std::string& key) const;
  // "line L, column C"
  std::string where() const;
};

// "null", "a boolean", "a number", "a string", "an array", "an object"
const char* json_type_name(JsonValue::Type t);

// Parses `text`; `source` (a path, "<json>") prefixes error messages.
JsonValue parse_json(const std::string& text, const std::string& source);

}  // namespace tokenizer_detail
}  // namespace flamingo_rt
