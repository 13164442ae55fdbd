// Strict JSON reader: recursive descent over the bytes, with line/column tracking.
#include "json.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <locale>
#include <sstream>

#include "flamingo_rt/tokenizer.h"
#include "utf8.h"

namespace flamingo_rt {
namespace tokenizer_detail {

namespace {

constexpr int kMaxDepth = 512;

class Parser {
 public:
  Parser(const std::string& text, const std::string& source) : s_(text), source_(source) {}

  JsonValue parse_document() {
    // A UTF-8 byte order mark is not JSON text (RFC 8259 8.1): refuse it by name.
    if (s_.size() >= 3 && s_.compare(0, 3, "\xEF\xBB\xBF") == 0) fail("a JSON value", "a UTF-8 byte order mark");
    skip_ws();
    JsonValue v = parse_value(0);
    skip_ws();
    if (pos_ != s_.size()) fail("end of input after the top-level value", describe_here());
    return v;
  }

 private:
  const std::string& s_;
  const std::string& source_;
  size_t pos_ = 0, line_ = 1, line_start_ = 0;

  [[noreturn]] void fail(const std::string& expected, const std::string& found) const {
    std::ostringstream os;
    os << source_ << ": invalid JSON at line " << line_ << ", column " << (pos_ - line_start_ + 1)
       << ": expected " << expected << ", found " << found;
    throw TokenizerError(TokenizerError::Kind::kJson, os.str());
  }

  std::string describe_here() const {
    if (pos_ >= s_.size()) return "end of input";
    const unsigned char c = static_cast<unsigned char>(s_[pos_]);
    char buf[32];
    if (c >= 0x20 && c < 0x7F) {
      std::snprintf(buf, sizeof buf, "'%c'", c);
    } else {
      std::snprintf(buf, sizeof buf, "byte 0x%02X", c);
    }
    return buf;
  }

  void skip_ws() {
    while (pos_ < s_.size()) {
      const char c = s_[pos_];
      if (c == '\n') {
        ++pos_;
        ++line_;
        line_start_ = pos_;
      } else if (c == ' ' || c == '\t' || c == '\r') {
        ++pos_;
      } else {
        break;
      }
    }
  }

  JsonValue start_value(JsonValue::Type t) const {
    JsonValue v;
    v.type = t;
    v.line = line_;
    v.column = pos_ - line_start_ + 1;
    return v;
  }

  JsonValue parse_value(int depth) {
    if (pos_ >= s_.size()) fail("a JSON value", "end of input");
    const char c = s_[pos_];
    switch (c) {
      case '{': return parse_object(depth);
      case '[': return parse_array(depth);
      case '"': {
        JsonValue v = start_value(JsonValue::Type::kString);
        v.string = parse_string();
        return v;
      }
      case 't': return parse_literal("true", JsonValue::Type::kBool, true);
      case 'f': return parse_literal("false", JsonValue::Type::kBool, false);
      case 'n': return parse_literal("null", JsonValue::Type::kNull, false);
      default:
        if (c == '-' || (c >= '0' && c <= '9')) return parse_number();
        fail("a JSON value", describe_here());
    }
  }

  JsonValue parse_literal(const char* word, JsonValue::Type t, bool b) {
    JsonValue v = start_value(t);
    const std::string w(word);
    if (s_.compare(pos_, w.size(), w) != 0) fail("'" + w + "'", describe_here());
    pos_ += w.size();
    v.boolean = b;
    return v;
  }

  JsonValue parse_number() {
    JsonValue v = start_value(JsonValue::Type::kNumber);
    const size_t begin = pos_;
    auto digit = [&](size_t p) { return p < s_.size() && s_[p] >= '0' && s_[p] <= '9'; };
    if (s_[pos_] == '-') ++pos_;
    if (!digit(pos_)) fail("a digit", describe_here());
    if (s_[pos_] == '0') {
      ++pos_;
      if (digit(pos_)) fail("'.', 'e' or the end of a number after a leading 0", describe_here());
    } else {
      while (digit(pos_)) ++pos_;
    }
    bool integral = true;
    if (pos_ < s_.size() && s_[pos_] == '.') {
      integral = false;
      ++pos_;
      if (!digit(pos_)) fail("a digit after '.'", describe_here());
      while (digit(pos_)) ++pos_;
    }
    if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      integral = false;
      ++pos_;
      if (pos_ < s_.size() && (s_[pos_] == '+' || s_[pos_] == '-')) ++pos_;
      if (!digit(pos_)) fail("a digit in the exponent", describe_here());
      while (digit(pos_)) ++pos_;
    }
    const std::string text = s_.substr(begin, pos_ - begin);
    std::istringstream is(text);
    is.imbue(std::locale::classic());
    is >> v.number;  // overflow leaves +-max / inf: fine for a number nobody reads exactly
    if (integral) {
      errno = 0;
      char* end = nullptr;
      const long long x = std::strtoll(text.c_str(), &end, 10);
      if (errno == 0 && end == text.c_str() + text.size()) {
        v.is_integer = true;
        v.integer = x;
      }
    }
    return v;
  }

  uint32_t parse_hex4() {
    uint32_t x = 0;
    for (int i = 0; i < 4; ++i) {
      if (pos_ >= s_.size()) fail("4 hex digits after \\u", "end of input");
      const char c = s_[pos_];
      uint32_t d;
      if (c >= '0' && c <= '9') d = c - '0';
      else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
      else fail("4 hex digits after \\u", describe_here());
      x = x * 16 + d;
      ++pos_;
    }
    return x;
  }

  std::string parse_string() {
    ++pos_;  // opening quote
    std::string out;
    while (true) {
      if (pos_ >= s_.size()) fail("'\"' closing a string", "end of input");
      const unsigned char c = static_cast<unsigned char>(s_[pos_]);
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (c < 0x20) fail("a character or an escape in a string (control characters must be escaped)", describe_here());
      if (c == '\\') {
        ++pos_;
        if (pos_ >= s_.size()) fail("an escape after '\\'", "end of input");
        const char e = s_[pos_++];
        switch (e) {
          case '"': out += '"'; break;
          case '\\': out += '\\'; break;
          case '/': out += '/'; break;
          case 'b': out += '\b'; break;
          case 'f': out += '\f'; break;
          case 'n': out += '\n'; break;
          case 'r': out += '\r'; break;
          case 't': out += '\t'; break;
          case 'u': {
            uint32_t cp = parse_hex4();
            if (cp >= 0xDC00 && cp <= 0xDFFF) {
              pos_ -= 6;
              fail("a code point or a high surrogate in \\u escape", "a lone low surrogate");
            }
            if (cp >= 0xD800 && cp <= 0xDBFF) {
              if (s_.compare(pos_, 2, "\\u") != 0) fail("a \\u low surrogate after a high surrogate", describe_here());
              pos_ += 2;
              const uint32_t lo = parse_hex4();
              if (lo < 0xDC00 || lo > 0xDFFF) {
                pos_ -= 6;
                fail("a low surrogate (\\uDC00..\\uDFFF) after a high surrogate", "another code point");
              }
              cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            utf8_append(out, cp);
            break;
          }
          default:
            --pos_;
            fail("one of \\\" \\\\ \\/ \\b \\f \\n \\r \\t \\u", describe_here());
        }
        continue;
      }
      if (c < 0x80) {
        out += static_cast<char>(c);
        ++pos_;
        continue;
      }
      // A multi-byte UTF-8 character: copy it whole, if valid.
      const size_t n = utf8_valid_prefix_length(s_, pos_);
      if (n == 0) fail("valid UTF-8 in a string", describe_here());
      out.append(s_, pos_, n);
      pos_ += n;
    }
  }

  JsonValue parse_array(int depth) {
    if (depth >= kMaxDepth) fail("nesting depth at most 512", "deeper nesting");
    JsonValue v = start_value(JsonValue::Type::kArray);
    ++pos_;
    skip_ws();
    if (pos_ < s_.size() && s_[pos_] == ']') {
      ++pos_;
      return v;
    }
    while (true) {
      skip_ws();
      v.array.push_back(parse_value(depth + 1));
      skip_ws();
      if (pos_ < s_.size() && s_[pos_] == ',') {
        ++pos_;
        continue;
      }
      if (pos_ < s_.size() && s_[pos_] == ']') {
        ++pos_;
        return v;
      }
      fail("',' or ']' in an array", describe_here());
    }
  }

  JsonValue parse_object(int depth) {
    if (depth >= kMaxDepth) fail("nesting depth at most 512", "deeper nesting");
    JsonValue v = start_value(JsonValue::Type::kObject);
    ++pos_;
    skip_ws();
    if (pos_ < s_.size() && s_[pos_] == '}') {
      ++pos_;
      return v;
    }
    // Duplicate keys: checked through a sorted copy of the keys at the end (objects like a
    // 50k-token vocabulary make a per-member linear search quadratic).
    while (true) {
      skip_ws();
      if (pos_ >= s_.size() || s_[pos_] != '"') fail("a string key in an object", describe_here());
      std::string key = parse_string();
      skip_ws();
      if (pos_ >= s_.size() || s_[pos_] != ':') fail("':' after an object key", describe_here());
      ++pos_;
      skip_ws();
      JsonValue member = parse_value(depth + 1);
      v.object.emplace_back(std::move(key), std::move(member));
      skip_ws();
      if (pos_ < s_.size() && s_[pos_] == ',') {
        ++pos_;
        continue;
      }
      if (pos_ < s_.size() && s_[pos_] == '}') {
        ++pos_;
        break;
      }
      fail("',' or '}' in an object", describe_here());
    }
    check_unique_keys(v);
    return v;
  }

  void check_unique_keys(const JsonValue& v) const {
    std::vector<const std::pair<std::string, JsonValue>*> members;
    members.reserve(v.object.size());
    for (const auto& m : v.object) members.push_back(&m);
    std::sort(members.begin(), members.end(),
              [](const auto* a, const auto* b) { return a->first < b->first; });
    for (size_t i = 1; i < members.size(); ++i) {
      if (members[i]->first == members[i - 1]->first) {
        std::ostringstream os;
        os << source_ << ": invalid JSON: the object at " << v.where() << " has the key \""
           << members[i]->first << "\" twice (at " << members[i - 1]->second.where() << " and "
           << members[i]->second.where() << "); expected unique keys";
        throw TokenizerError(TokenizerError::Kind::kJson, os.str());
      }
    }
  }
};

}  // namespace

const JsonValue* JsonValue::find(const std::string& key) const {
  for (const auto& m : object) {
    if (m.first == key) return &m.second;
  }
  return nullptr;
}

std::string JsonValue::where() const {
  return "line " + std::to_string(line) + ", column " + std::to_string(column);
}

const char* json_type_name(JsonValue::Type t) {
  switch (t) {
    case JsonValue::Type::kNull: return "null";
    case JsonValue::Type::kBool: return "a boolean";
    case JsonValue::Type::kNumber: return "a number";
    case JsonValue::Type::kString: return "a string";
    case JsonValue::Type::kArray: return "an array";
    case JsonValue::Type::kObject: return "an object";
  }
  return "?";
}

JsonValue parse_json(const std::string& text, const std::string& source) {
  return Parser(text, source).parse_document();
}

}  // namespace tokenizer_detail
}  // namespace flamingo_rt
