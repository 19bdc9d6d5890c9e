// A small JSON value, strict parser and printer: configs, tokenizer files, JSONL datasets, safetensors headers.
// Numbers are doubles (integers exact up to 2^53); objects keep insertion order so dumps are stable.
#pragma once
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "tensor/error.h"

namespace psa::json {

struct Value {
  enum class Kind { Null, Bool, Number, String, Array, Object };
  Kind kind = Kind::Null;
  bool b = false;
  double num = 0;
  std::string str;
  std::vector<Value> arr;
  std::vector<std::pair<std::string, Value>> obj;  // insertion order kept

  Value() = default;
  Value(std::nullptr_t) {}
  Value(double v) : kind(Kind::Number), num(v) {}
  Value(int64_t v) : kind(Kind::Number), num(static_cast<double>(v)) {}
  Value(uint64_t v) : kind(Kind::Number), num(static_cast<double>(v)) {}
  Value(int v) : kind(Kind::Number), num(v) {}
  Value(unsigned v) : kind(Kind::Number), num(v) {}
  Value(long long v) : kind(Kind::Number), num(static_cast<double>(v)) {}
  Value(unsigned long long v) : kind(Kind::Number), num(static_cast<double>(v)) {}
  Value(bool v) : kind(Kind::Bool), b(v) {}
  Value(std::string v) : kind(Kind::String), str(std::move(v)) {}
  Value(const char* v) : kind(Kind::String), str(v) {}
  static Value object();
  static Value array();

  bool is_null() const { return kind == Kind::Null; }
  bool is_bool() const { return kind == Kind::Bool; }
  bool is_number() const { return kind == Kind::Number; }
  bool is_string() const { return kind == Kind::String; }
  bool is_array() const { return kind == Kind::Array; }
  bool is_object() const { return kind == Kind::Object; }
  bool is_int() const;  // a number with an integral value in int64 range

  // Typed access; a wrong kind throws "expected <kind>, got <kind>".
  double as_number() const;
  int64_t as_int() const;  // also throws when the number is not integral
  const std::string& as_string() const;
  bool as_bool() const;
  const std::vector<Value>& as_array() const;
  const std::vector<std::pair<std::string, Value>>& as_object() const;
  size_t size() const;  // elements of an array or members of an object

  // Object members: at() throws "missing key 'x'"; find() returns nullptr.
  const Value& at(const std::string& key) const;
  const Value* find(const std::string& key) const;
  bool contains(const std::string& key) const { return find(key) != nullptr; }
  const Value& at(size_t i) const;  // array element, bounds-checked

  // Member access that names the key on a kind error: "key 'x': expected number, got string".
  double number_at(const std::string& key) const;
  int64_t int_at(const std::string& key) const;
  const std::string& string_at(const std::string& key) const;
  bool bool_at(const std::string& key) const;
  const std::vector<Value>& array_at(const std::string& key) const;
  // An integer in [lo, hi]: configs use it so that a hostile or mistyped size is refused before anything is
  // allocated from it (and a zero never reaches a division). "key 'x': 0 out of range [1, 65536]".
  int64_t int_in(const std::string& key, int64_t lo, int64_t hi) const;
  int64_t int_in_or(const std::string& key, int64_t def, int64_t lo, int64_t hi) const;
  // A finite number in [lo, hi]: a negative epsilon or a zero RoPE base would otherwise run and give NaN far
  // from the config. "key 'rms_norm_eps': -1 out of range [1e-30, 1]".
  double number_in(const std::string& key, double lo, double hi) const;
  double number_in_or(const std::string& key, double def, double lo, double hi) const;
  // Same, with a default when the key is missing or null (HF configs often write null for "unset").
  double number_or(const std::string& key, double def) const;
  int64_t int_or(const std::string& key, int64_t def) const;
  std::string string_or(const std::string& key, const std::string& def) const;
  bool bool_or(const std::string& key, bool def) const;

  Value& set(const std::string& key, Value v);  // replaces an existing key in place
  void push(Value v);

  bool operator==(const Value& o) const;
  bool operator!=(const Value& o) const { return !(*this == o); }
};

const char* kind_name(Value::Kind k);

// Refuses a key of `obj` outside `allowed` (a misspelt key would otherwise read as a missing one):
// "<where>: unknown key 'x'" ("unknown key 'x'" when `where` is empty).
void check_keys(const Value& obj, std::initializer_list<const char*> allowed, const std::string& where);

// Runs read(); a psa::Error from it is rethrown as "json: key '<key>': <reason>" (the reason's own "json: "
// dropped), so a reader of a nested object names the whole path: "key 'vision_config': key 'patch_size': ...".
template <typename F>
auto with_key(const std::string& key, F&& read) -> decltype(read());
// Runs read() on a parsed file; a psa::Error from it is rethrown with the file in front (the "json: " dropped):
// "dir/config.json: key 'num_heads': expected number, got string". One call per file instead of a prefix at
// every accessor.
template <typename F>
auto in_file(const std::string& path, F&& read) -> decltype(read());

// Errors read "source:line:col: reason". Rejects duplicate keys, trailing garbage, invalid UTF-8,
// lone surrogates, control characters in strings, and nesting deeper than 512.
Value parse(const std::string& text, const std::string& source = "<json>");
// Compact when indent < 0, else pretty with `indent` spaces. Integral numbers print without ".0";
// other doubles print with the fewest digits that round-trip. Non-finite numbers throw.
std::string dump(const Value& v, int indent = -1);
// UTF-8 as the parser accepts it: no overlong forms, encoded surrogates or code points past U+10FFFF.
bool is_valid_utf8(const std::string& s);
// `s` with each byte that does not start a valid sequence replaced by U+FFFD. dump() writes every string so.
std::string valid_utf8(const std::string& s);
// Errors name the path; an unreadable file gives "path: cannot open: <strerror>".
Value parse_file(const std::string& path);
// Whole file as bytes, same error wording; shared with the JSONL and safetensors readers.
std::string read_file(const std::string& path);
// Writes `text` atomically: a temp file beside `path`, flushed and fsynced, then renamed over it, so a crash
// leaves either the old file or the new one, and of two concurrent writers one whole file wins. Errors name the
// path. A symbolic link is written through (see write_target), not replaced by a file.
void write_file(const std::string& path, const std::string& text);
// The file an atomic write to `path` replaces: `path` itself, or for a symbolic link (a chain of them) its final
// target, as a shell's `>` writes, so the link survives; a relative target is relative to the link's folder.
std::string write_target(const std::string& path);
// A new, empty file beside `path` named ".<name>.tmp.<pid>.<n>" (n counts within the process), created
// exclusively, so concurrent writers of one path never share a temp file; renamed over `path` to publish.
struct TempFile {
  std::string path;
  FILE* f;
};
TempFile create_temp_beside(const std::string& path);
// fsync of the folder holding `path`, so that a rename into it survives a power cut.
void sync_dir_of(const std::string& path);
// The file whose flock marks a folder's one writer (tools/cli.h lock_output_dir).
constexpr const char* kLockFileName = ".psa.lock";
// Whether folder `dir` holds nothing but (possibly) its lock file: "empty" for a writer that locked it first.
bool holds_only_lock(const std::string& dir);

// ---- implementation of the templates above

// "json: reason" -> "reason": the prefix says nothing once a key or a file is in front.
std::string strip_json_prefix(const std::string& msg);

template <typename F>
auto with_key(const std::string& key, F&& read) -> decltype(read()) {
  try {
    return read();
  } catch (const Error& e) {
    fail("json: key '", key, "': ", strip_json_prefix(e.what()));
  }
}

template <typename F>
auto in_file(const std::string& path, F&& read) -> decltype(read()) {
  try {
    return read();
  } catch (const Error& e) {
    fail(path, ": ", strip_json_prefix(e.what()));
  }
}

}  // namespace psa::json
