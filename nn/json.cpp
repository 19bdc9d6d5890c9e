// Strict recursive-descent JSON parser (RFC 8259) with line:col errors, and a deterministic printer.
#include "nn/json.h"

#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string_view>
#include <unordered_set>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tensor/error.h"

namespace psa::json {

void check_keys(const Value& obj, std::initializer_list<const char*> allowed, const std::string& where) {
  for (const auto& kv : obj.as_object()) {
    bool known = false;
    for (const char* k : allowed) known = known || kv.first == k;
    PSA_CHECK(known, where, where.empty() ? "" : ": ", "unknown key '", kv.first, "'");
  }
}

const char* kind_name(Value::Kind k) {
  switch (k) {
    case Value::Kind::Null: return "null";
    case Value::Kind::Bool: return "bool";
    case Value::Kind::Number: return "number";
    case Value::Kind::String: return "string";
    case Value::Kind::Array: return "array";
    case Value::Kind::Object: return "object";
  }
  return "?";
}

Value Value::object() {
  Value v;
  v.kind = Kind::Object;
  return v;
}

Value Value::array() {
  Value v;
  v.kind = Kind::Array;
  return v;
}

static void expect_kind(const Value& v, Value::Kind k) {
  PSA_CHECK(v.kind == k, "json: expected ", kind_name(k), ", got ", kind_name(v.kind));
}

// 2^63 as a double; int64 holds [-2^63, 2^63).
static constexpr double kTwo63 = 9223372036854775808.0;

bool Value::is_int() const {
  return kind == Kind::Number && std::isfinite(num) && num == std::floor(num) && num >= -kTwo63 && num < kTwo63;
}

double Value::as_number() const {
  expect_kind(*this, Kind::Number);
  return num;
}

int64_t Value::as_int() const {
  expect_kind(*this, Kind::Number);
  PSA_CHECK(is_int(), "json: expected integer, got ", dump(*this));
  return static_cast<int64_t>(num);
}

const std::string& Value::as_string() const {
  expect_kind(*this, Kind::String);
  return str;
}

bool Value::as_bool() const {
  expect_kind(*this, Kind::Bool);
  return b;
}

const std::vector<Value>& Value::as_array() const {
  expect_kind(*this, Kind::Array);
  return arr;
}

const std::vector<std::pair<std::string, Value>>& Value::as_object() const {
  expect_kind(*this, Kind::Object);
  return obj;
}

size_t Value::size() const {
  if (kind == Kind::Array) return arr.size();
  PSA_CHECK(kind == Kind::Object, "json: expected array or object, got ", kind_name(kind));
  return obj.size();
}

const Value* Value::find(const std::string& key) const {
  PSA_CHECK(kind == Kind::Object, "json: expected object (looking up key '", key, "'), got ", kind_name(kind));
  for (const auto& kv : obj)
    if (kv.first == key) return &kv.second;
  return nullptr;
}

const Value& Value::at(const std::string& key) const {
  const Value* v = find(key);
  PSA_CHECK(v, "json: missing key '", key, "'");
  return *v;
}

const Value& Value::at(size_t i) const {
  expect_kind(*this, Kind::Array);
  PSA_CHECK(i < arr.size(), "json: index ", i, " out of range for array of ", arr.size());
  return arr[i];
}

std::string strip_json_prefix(const std::string& msg) {
  return msg.rfind("json: ", 0) == 0 ? msg.substr(6) : msg;
}

double Value::number_at(const std::string& key) const {
  const Value& v = at(key);
  return with_key(key, [&] { return v.as_number(); });
}
int64_t Value::int_at(const std::string& key) const {
  const Value& v = at(key);
  return with_key(key, [&] { return v.as_int(); });
}
const std::string& Value::string_at(const std::string& key) const {
  const Value& v = at(key);
  return with_key(key, [&]() -> const std::string& { return v.as_string(); });
}
bool Value::bool_at(const std::string& key) const {
  const Value& v = at(key);
  return with_key(key, [&] { return v.as_bool(); });
}
const std::vector<Value>& Value::array_at(const std::string& key) const {
  const Value& v = at(key);
  return with_key(key, [&]() -> const std::vector<Value>& { return v.as_array(); });
}

int64_t Value::int_in(const std::string& key, int64_t lo, int64_t hi) const {
  const int64_t n = int_at(key);
  PSA_CHECK(n >= lo && n <= hi, "json: key '", key, "': ", n, " out of range [", lo, ", ", hi, "]");
  return n;
}
int64_t Value::int_in_or(const std::string& key, int64_t def, int64_t lo, int64_t hi) const {
  const Value* v = find(key);
  return v && !v->is_null() ? int_in(key, lo, hi) : def;
}

double Value::number_in(const std::string& key, double lo, double hi) const {
  const double x = number_at(key);
  PSA_CHECK(std::isfinite(x) && x >= lo && x <= hi, "json: key '", key, "': ", x, " out of range [", lo, ", ", hi,
            "]");
  return x;
}
double Value::number_in_or(const std::string& key, double def, double lo, double hi) const {
  const Value* v = find(key);
  return v && !v->is_null() ? number_in(key, lo, hi) : def;
}

double Value::number_or(const std::string& key, double def) const {
  const Value* v = find(key);
  return v && !v->is_null() ? number_at(key) : def;
}
int64_t Value::int_or(const std::string& key, int64_t def) const {
  const Value* v = find(key);
  return v && !v->is_null() ? int_at(key) : def;
}
std::string Value::string_or(const std::string& key, const std::string& def) const {
  const Value* v = find(key);
  return v && !v->is_null() ? string_at(key) : def;
}
bool Value::bool_or(const std::string& key, bool def) const {
  const Value* v = find(key);
  return v && !v->is_null() ? bool_at(key) : def;
}

Value& Value::set(const std::string& key, Value v) {
  PSA_CHECK(kind == Kind::Object || kind == Kind::Null, "json: set('", key, "') on ", kind_name(kind));
  kind = Kind::Object;
  for (auto& kv : obj)
    if (kv.first == key) {
      kv.second = std::move(v);
      return *this;
    }
  obj.emplace_back(key, std::move(v));
  return *this;
}

void Value::push(Value v) {
  PSA_CHECK(kind == Kind::Array || kind == Kind::Null, "json: push on ", kind_name(kind));
  kind = Kind::Array;
  arr.push_back(std::move(v));
}

bool Value::operator==(const Value& o) const {
  if (kind != o.kind) return false;
  switch (kind) {
    case Kind::Null: return true;
    case Kind::Bool: return b == o.b;
    case Kind::Number: return num == o.num;
    case Kind::String: return str == o.str;
    case Kind::Array: return arr == o.arr;
    case Kind::Object: return obj == o.obj;
  }
  return false;
}

// ---------------------------------------------------------------- parser

namespace {

constexpr int kMaxDepth = 512;

// Length of the UTF-8 sequence whose lead byte (>= 0x80) is s[at], or 0 when it is not a valid one: no
// overlongs, no encoded surrogates, nothing above U+10FFFF. *why names the defect, or stays null for a byte that
// cannot lead a sequence.
size_t utf8_length(const std::string& s, size_t at, const char** why) {
  const unsigned char c = static_cast<unsigned char>(s[at]);
  size_t n;
  unsigned cp, min;
  if (c >= 0xC2 && c <= 0xDF) {
    n = 1, cp = c & 0x1F, min = 0x80;
  } else if (c >= 0xE0 && c <= 0xEF) {
    n = 2, cp = c & 0x0F, min = 0x800;
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 3, cp = c & 0x07, min = 0x10000;
  } else {
    return 0;
  }
  if (at + n >= s.size()) return *why = "truncated sequence", 0;
  for (size_t i = 1; i <= n; ++i) {
    const unsigned char cc = static_cast<unsigned char>(s[at + i]);
    if ((cc & 0xC0) != 0x80) return *why = "bad continuation byte", 0;
    cp = (cp << 6) | (cc & 0x3F);
  }
  if (cp < min) return *why = "overlong encoding", 0;
  if (cp >= 0xD800 && cp <= 0xDFFF) return *why = "encoded surrogate", 0;
  if (cp > 0x10FFFF) return *why = "code point above U+10FFFF", 0;
  return n + 1;
}

class Parser {
 public:
  Parser(const std::string& text, const std::string& source) : s_(text), src_(source) {}

  Value parse_document() {
    skip_ws();
    Value v = parse_value(0);
    skip_ws();
    if (pos_ != s_.size()) error("trailing characters after the JSON value");
    return v;
  }

 private:
  const std::string& s_;
  const std::string& src_;
  size_t pos_ = 0;

  // Line and column (1-based, in bytes) are computed only on error, so the hot path stays a plain index.
  [[noreturn]] void error_at(size_t at, const std::string& reason) const {
    size_t line = 1, col = 1;
    for (size_t i = 0; i < at && i < s_.size(); ++i) {
      if (s_[i] == '\n') {
        ++line;
        col = 1;
      } else {
        ++col;
      }
    }
    fail(src_, ":", line, ":", col, ": ", reason);
  }
  [[noreturn]] void error(const std::string& reason) const { error_at(pos_, reason); }

  bool eof() const { return pos_ >= s_.size(); }
  char peek() const { return eof() ? '\0' : s_[pos_]; }

  static std::string describe(char c) {
    unsigned char u = static_cast<unsigned char>(c);
    if (u >= 0x20 && u < 0x7f) return std::string("'") + c + "'";
    char buf[16];
    std::snprintf(buf, sizeof buf, "byte 0x%02x", u);
    return buf;
  }

  void skip_ws() {
    while (!eof()) {
      char c = s_[pos_];
      if (c == ' ' || c == '\t' || c == '\n' || c == '\r')
        ++pos_;
      else
        break;
    }
  }

  void expect_literal(const char* lit) {
    size_t n = std::strlen(lit);
    if (s_.compare(pos_, n, lit) != 0) error(std::string("invalid literal (expected '") + lit + "')");
    pos_ += n;
  }

  Value parse_value(int depth) {
    if (eof()) error("unexpected end of input (expected a value)");
    char c = s_[pos_];
    switch (c) {
      case '{': return parse_object(depth + 1);
      case '[': return parse_array(depth + 1);
      case '"': return Value(parse_string());
      case 't': expect_literal("true"); return Value(true);
      case 'f': expect_literal("false"); return Value(false);
      case 'n': expect_literal("null"); return Value();
      default:
        if (c == '-' || (c >= '0' && c <= '9')) return parse_number();
        error("unexpected " + describe(c) + " (expected a value)");
    }
  }

  Value parse_object(int depth) {
    if (depth > kMaxDepth) error("nesting deeper than " + std::to_string(kMaxDepth));
    ++pos_;  // '{'
    Value v = Value::object();
    skip_ws();
    if (peek() == '}') {
      ++pos_;
      return v;
    }
    std::vector<size_t> key_pos;
    for (;;) {
      skip_ws();
      if (peek() != '"') error(eof() ? "unexpected end of input in object" : "expected a string key, got " + describe(peek()));
      key_pos.push_back(pos_);
      std::string key = parse_string();
      skip_ws();
      if (peek() != ':') error(eof() ? "unexpected end of input in object" : "expected ':' after key, got " + describe(peek()));
      ++pos_;
      skip_ws();
      Value item = parse_value(depth);
      v.obj.emplace_back(std::move(key), std::move(item));
      skip_ws();
      char c = peek();
      if (c == ',') {
        ++pos_;
        continue;
      }
      if (c == '}') {
        ++pos_;
        break;
      }
      error(eof() ? "unexpected end of input in object" : "expected ',' or '}' in object, got " + describe(c));
    }
    // Duplicate check by hash (tokenizer vocabularies have tens of thousands of keys), done once all
    // members are in place so the string_views into the keys stay valid.
    const auto& m = v.obj;
    if (m.size() <= 16) {
      for (size_t i = 1; i < m.size(); ++i)
        for (size_t j = 0; j < i; ++j)
          if (m[i].first == m[j].first) error_at(key_pos[i], "duplicate key '" + m[i].first + "'");
      return v;
    }
    std::unordered_set<std::string_view> seen(m.size() * 2);
    for (size_t i = 0; i < m.size(); ++i)
      if (!seen.insert(m[i].first).second) error_at(key_pos[i], "duplicate key '" + m[i].first + "'");
    return v;
  }

  Value parse_array(int depth) {
    if (depth > kMaxDepth) error("nesting deeper than " + std::to_string(kMaxDepth));
    ++pos_;  // '['
    Value v = Value::array();
    skip_ws();
    if (peek() == ']') {
      ++pos_;
      return v;
    }
    for (;;) {
      skip_ws();
      v.arr.push_back(parse_value(depth));
      skip_ws();
      char c = peek();
      if (c == ',') {
        ++pos_;
        continue;
      }
      if (c == ']') {
        ++pos_;
        break;
      }
      error(eof() ? "unexpected end of input in array" : "expected ',' or ']' in array, got " + describe(c));
    }
    return v;
  }

  Value parse_number() {
    size_t start = pos_;
    if (peek() == '-') ++pos_;
    if (peek() == '0') {
      ++pos_;
      if (peek() >= '0' && peek() <= '9') error_at(start, "invalid number (leading zero)");
    } else if (peek() >= '1' && peek() <= '9') {
      while (peek() >= '0' && peek() <= '9') ++pos_;
    } else {
      error("invalid number (expected a digit)");
    }
    if (peek() == '.') {
      ++pos_;
      if (!(peek() >= '0' && peek() <= '9')) error("invalid number (expected a digit after '.')");
      while (peek() >= '0' && peek() <= '9') ++pos_;
    }
    if (peek() == 'e' || peek() == 'E') {
      ++pos_;
      if (peek() == '+' || peek() == '-') ++pos_;
      if (!(peek() >= '0' && peek() <= '9')) error("invalid number (expected a digit in the exponent)");
      while (peek() >= '0' && peek() <= '9') ++pos_;
    }
    std::string tok = s_.substr(start, pos_ - start);
    errno = 0;
    double d = std::strtod(tok.c_str(), nullptr);
    // Overflow to infinity cannot be represented back; underflow to 0 is harmless.
    if (std::isinf(d)) error_at(start, "number out of range: " + tok);
    return Value(d);
  }

  unsigned hex4() {
    if (pos_ + 4 > s_.size()) error("unexpected end of input in \\u escape");
    unsigned v = 0;
    for (int i = 0; i < 4; ++i) {
      char c = s_[pos_ + i];
      v <<= 4;
      if (c >= '0' && c <= '9')
        v |= c - '0';
      else if (c >= 'a' && c <= 'f')
        v |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F')
        v |= c - 'A' + 10;
      else
        error_at(pos_ + i, "invalid hex digit in \\u escape: " + describe(c));
    }
    pos_ += 4;
    return v;
  }

  static void append_utf8(std::string& out, unsigned cp) {
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

  // Validates one UTF-8 sequence starting at pos_ (lead byte >= 0x80) and copies it.
  void copy_utf8(std::string& out) {
    const char* why = nullptr;
    const size_t n = utf8_length(s_, pos_, &why);
    if (!n) error_at(pos_, std::string("invalid UTF-8 in string (") + (why ? why : describe(s_[pos_])) + ")");
    out.append(s_, pos_, n);
    pos_ += n;
  }

  std::string parse_string() {
    size_t open = pos_;
    ++pos_;  // opening quote
    std::string out;
    for (;;) {
      if (eof()) error_at(open, "unterminated string");
      // Fast path: copy a run of plain ASCII at once.
      size_t run = pos_;
      while (run < s_.size()) {
        unsigned char c = static_cast<unsigned char>(s_[run]);
        if (c == '"' || c == '\\' || c < 0x20 || c >= 0x80) break;
        ++run;
      }
      out.append(s_, pos_, run - pos_);
      pos_ = run;
      if (eof()) error_at(open, "unterminated string");
      unsigned char c = static_cast<unsigned char>(s_[pos_]);
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (c < 0x20) error("control character " + describe(s_[pos_]) + " in string (must be escaped)");
      if (c >= 0x80) {
        copy_utf8(out);
        continue;
      }
      // Backslash escape.
      size_t esc = pos_;
      ++pos_;
      if (eof()) error_at(open, "unterminated string");
      char e = s_[pos_++];
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
          unsigned cp = hex4();
          if (cp >= 0xDC00 && cp <= 0xDFFF) error_at(esc, "lone low surrogate in \\u escape");
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (s_.compare(pos_, 2, "\\u") != 0) error_at(esc, "high surrogate not followed by a low surrogate");
            pos_ += 2;
            unsigned lo = hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) error_at(esc, "high surrogate not followed by a low surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          append_utf8(out, cp);
          break;
        }
        default: error_at(esc, "invalid escape '\\" + std::string(1, e) + "'");
      }
    }
  }
};

}  // namespace

Value parse(const std::string& text, const std::string& source) { return Parser(text, source).parse_document(); }

// ---------------------------------------------------------------- printer

namespace {

// Bytes that are not UTF-8 (a file name from a Latin-1 file system) become U+FFFD: the output must parse.
void dump_string(std::string& out, const std::string& text) {
  const bool valid = is_valid_utf8(text);
  const std::string repaired = valid ? std::string() : valid_utf8(text);
  const std::string& s = valid ? text : repaired;
  out += '"';
  for (char ch : s) {
    const unsigned char c = static_cast<unsigned char>(ch);
    switch (ch) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += ch;
        }
    }
  }
  out += '"';
}

void dump_number(std::string& out, double d) {
  PSA_CHECK(std::isfinite(d), "json: cannot write non-finite number ", d);
  char buf[40];
  if (d == std::floor(d) && std::fabs(d) < kTwo63) {
    if (d == 0 && std::signbit(d))
      out += "-0";
    else
      out += std::to_string(static_cast<int64_t>(d));
    return;
  }
  // Fewest digits that read back to the same double (%.17g always does, but is noisy).
  for (int prec = 15; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof buf, "%.*g", prec, d);
    if (std::strtod(buf, nullptr) == d) break;
  }
  out += buf;
}

void newline(std::string& out, int indent, int level) {
  if (indent < 0) return;
  out += '\n';
  out.append(static_cast<size_t>(indent) * level, ' ');
}

void dump_value(std::string& out, const Value& v, int indent, int level) {
  switch (v.kind) {
    case Value::Kind::Null: out += "null"; break;
    case Value::Kind::Bool: out += v.b ? "true" : "false"; break;
    case Value::Kind::Number: dump_number(out, v.num); break;
    case Value::Kind::String: dump_string(out, v.str); break;
    case Value::Kind::Array:
      out += '[';
      for (size_t i = 0; i < v.arr.size(); ++i) {
        if (i) out += ',';
        newline(out, indent, level + 1);
        dump_value(out, v.arr[i], indent, level + 1);
      }
      if (!v.arr.empty()) newline(out, indent, level);
      out += ']';
      break;
    case Value::Kind::Object:
      out += '{';
      for (size_t i = 0; i < v.obj.size(); ++i) {
        if (i) out += ',';
        newline(out, indent, level + 1);
        dump_string(out, v.obj[i].first);
        out += indent < 0 ? ":" : ": ";
        dump_value(out, v.obj[i].second, indent, level + 1);
      }
      if (!v.obj.empty()) newline(out, indent, level);
      out += '}';
      break;
  }
}

}  // namespace

bool is_valid_utf8(const std::string& s) {
  const char* why = nullptr;
  for (size_t i = 0; i < s.size(); ++i) {
    if (static_cast<unsigned char>(s[i]) < 0x80) continue;
    const size_t n = utf8_length(s, i, &why);
    if (!n) return false;
    i += n - 1;
  }
  return true;
}

std::string valid_utf8(const std::string& s) {
  if (is_valid_utf8(s)) return s;
  std::string out;
  const char* why = nullptr;
  for (size_t i = 0; i < s.size(); ++i) {
    const size_t n = static_cast<unsigned char>(s[i]) < 0x80 ? 1 : utf8_length(s, i, &why);
    out += n ? s.substr(i, n) : "\xEF\xBF\xBD";
    i += n ? n - 1 : 0;
  }
  return out;
}

std::string dump(const Value& v, int indent) {
  std::string out;
  dump_value(out, v, indent, 0);
  return out;
}

std::string read_file(const std::string& path) {
  // A FIFO or a device (a config.json symlinked to /dev/zero) would block in open() or never end: regular
  // files only, checked before opening.
  struct stat st;
  if (::stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) fail(path, ": cannot open: not a regular file");
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) fail(path, ": cannot open: ", std::strerror(errno));
  std::string data;
  char buf[1 << 16];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) data.append(buf, n);
  bool bad = std::ferror(f);
  int err = errno;
  std::fclose(f);
  if (bad) fail(path, ": read error: ", std::strerror(err));
  return data;
}

Value parse_file(const std::string& path) { return parse(read_file(path), path); }

TempFile create_temp_beside(const std::string& path) {
  static std::atomic<unsigned> counter{0};
  const size_t slash = path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "" : path.substr(0, slash + 1);
  const std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  // A leftover of an earlier process with the same pid may hold a name: the next number is tried.
  for (int attempt = 0; attempt < 64; ++attempt) {
    const std::string cand = str_cat(dir, ".", name, ".tmp.", ::getpid(), ".", counter++);
    const int fd = ::open(cand.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0 && errno == EEXIST) continue;
    if (fd < 0) fail(path, ": cannot create a temp file beside it: ", std::strerror(errno));
    FILE* f = ::fdopen(fd, "wb");
    if (!f) {
      const int err = errno;
      ::close(fd);
      ::unlink(cand.c_str());
      fail(path, ": fdopen: ", std::strerror(err));
    }
    return {cand, f};
  }
  fail(path, ": no free temp file name beside it");
}

void sync_dir_of(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) fail(path, ": cannot open directory ", dir, " to sync: ", std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  // Some filesystems refuse fsync on directories; the rename itself has still happened.
  if (rc != 0 && err != EINVAL && err != ENOTSUP) fail(path, ": fsync of directory ", dir, ": ", std::strerror(err));
}

bool holds_only_lock(const std::string& dir) {
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec))
    if (e.path().filename() != kLockFileName) return false;
  return !ec;
}

std::string write_target(const std::string& path) {
  namespace fs = std::filesystem;
  fs::path p = path;
  std::error_code ec;
  for (int hops = 0; fs::is_symlink(fs::symlink_status(p, ec)); ++hops) {
    PSA_CHECK(hops < 40, path, ": too many levels of symbolic links");
    const fs::path to = fs::read_symlink(p, ec);
    PSA_CHECK(!ec, path, ": cannot read the symbolic link: ", ec.message());
    p = to.is_absolute() ? to : p.parent_path() / to;
  }
  return p.string();
}

void write_file(const std::string& link_or_file, const std::string& text) {
  const std::string path = write_target(link_or_file);
  const TempFile tmp = create_temp_beside(path);
  bool ok = std::fwrite(text.data(), 1, text.size(), tmp.f) == text.size() && std::fflush(tmp.f) == 0 &&
            ::fsync(fileno(tmp.f)) == 0;
  int err = errno;
  ok = std::fclose(tmp.f) == 0 && ok;
  if (!ok) {
    ::unlink(tmp.path.c_str());
    fail(path, ": cannot write: ", std::strerror(err));
  }
  if (std::rename(tmp.path.c_str(), path.c_str()) != 0) {
    err = errno;
    ::unlink(tmp.path.c_str());
    fail(path, ": cannot rename ", tmp.path, ": ", std::strerror(err));
  }
  sync_dir_of(path);
}

}  // namespace psa::json
