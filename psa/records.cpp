#include "psa/records.h"

#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "psa/image.h"
#include "psa/tokenizer.h"
#include "tensor/error.h"

namespace psa {

static const char kImageTag[] = "<image>";

std::string trim(const std::string& s) {
  const char* ws = " \t\r\n\v\f";
  size_t b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(ws) - b + 1);
}

// Unicode's White_Space characters (and the zero-width space and BOM, which print nothing either), in UTF-8.
bool is_blank(const std::string& s) {
  static const char* const kSpaces[] = {"\xc2\x85", "\xc2\xa0", "\xe1\x9a\x80", "\xe2\x80\xa8", "\xe2\x80\xa9",
                                        "\xe2\x80\xaf", "\xe2\x81\x9f", "\xe3\x80\x80", "\xef\xbb\xbf"};
  for (size_t i = 0; i < s.size();) {
    if (s[i] != 0 && std::strchr(" \t\r\n\v\f", s[i])) {
      ++i;
      continue;
    }
    // U+2000..U+200B: en quad .. zero-width space
    if (i + 2 < s.size() && s.compare(i, 2, "\xe2\x80") == 0 && (unsigned char)s[i + 2] >= 0x80 &&
        (unsigned char)s[i + 2] <= 0x8b) {
      i += 3;
      continue;
    }
    size_t matched = 0;
    for (const char* sp : kSpaces)
      if (s.compare(i, std::strlen(sp), sp) == 0) matched = std::strlen(sp);
    if (!matched) return false;
    i += matched;
  }
  return true;
}

static int int_field(const json::Value& v, const char* key, int lo, int hi) {
  const json::Value* f = v.find(key);
  PSA_CHECK(f, "missing field '", key, "'");
  PSA_CHECK(f->is_int(), "field '", key, "' must be an integer, got ",
            f->is_number() ? std::string("a non-integer number") : std::string(json::kind_name(f->kind)));
  PSA_CHECK(f->num >= lo && f->num <= hi, key, " ", f->as_int(), " out of range ", lo, "..", hi);
  return static_cast<int>(f->num);
}

static bool role_is(const std::string& from, bool user) {
  std::string r;
  for (char c : from) r += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  // LLaVA's own files say human/gpt; accepting them costs nothing and avoids a silent whole-file skip.
  return user ? (r == "user" || r == "human") : (r == "assistant" || r == "gpt");
}

struct Turns {
  std::string user, assistant;
};

static Turns first_exchange(const json::Value& v) {
  const json::Value* conv = v.find("conversations");
  PSA_CHECK(conv, "missing field 'conversations'");
  PSA_CHECK(conv->is_array(), "field 'conversations' must be an array, got ", json::kind_name(conv->kind));
  Turns t;
  bool have_user = false, have_answer = false;
  // Every turn is checked, also those after the first exchange (which is all a record uses).
  for (size_t i = 0; i < conv->arr.size(); ++i) {
    const json::Value& turn = conv->arr[i];
    PSA_CHECK(turn.is_object(), "conversations[", i, "] must be an object");
    json::check_keys(turn, {"from", "value"}, "conversations[" + std::to_string(i) + "]");
    const json::Value* from = turn.find("from");
    const json::Value* value = turn.find("value");
    PSA_CHECK(from && from->is_string() && value && value->is_string(), "conversations[", i,
              "] needs string fields 'from' and 'value'");
    if (!have_user && role_is(from->str, true)) {
      t.user = value->str;
      have_user = true;
    } else if (have_user && !have_answer && role_is(from->str, false)) {
      t.assistant = value->str;
      have_answer = true;
    }
  }
  if (!have_answer) fail(have_user ? "no ASSISTANT turn after the first USER turn" : "no USER turn");
  return t;
}

std::string special_token_in(const std::string& s) {
  for (const std::string& special : Tokenizer::special_texts())
    if (special != kImageTag && s.find(special) != std::string::npos) return special;
  return "";
}

static std::string remove_tags(std::string s) {
  for (size_t pos; (pos = s.find(kImageTag)) != std::string::npos;) s.erase(pos, sizeof(kImageTag) - 1);
  return trim(s);
}

static std::string resolve_field(const std::string& field, const std::string& base_dir, bool check_images) {
  std::string out;
  const std::vector<std::string> parts = split_image_field(field);
  PSA_CHECK(parts.size() <= size_t(kMaxImageParts), "image field has ", parts.size(), " parts (at most ",
            kMaxImageParts, ")");
  for (const std::string& part : parts) {
    PSA_CHECK(!trim(part).empty(), "image field '", field, "' has an empty part");
    std::string path = resolve_image_path(part, base_dir);
    if (check_images) check_image(path);
    out += (out.empty() ? "" : "<split>") + path;
  }
  return out;
}

Record parse_record(const json::Value& v, const std::string& base_dir, bool check_images) {
  PSA_CHECK(v.is_object(), "record must be a JSON object, got ", json::kind_name(v.kind));
  // Unknown keys are refused (json::check_keys: a misspelt "safe_levle" would otherwise look like a missing field,
  // and a record from another format would pass half-read). Besides the reference fields (psa-vlm.md §6.2) a
  // record may carry our "meta" and LLaVA's "id", which its own training files have on every record.
  json::check_keys(v, {"safe_level", "safe_type", "image", "conversations", "meta", "id"}, "");
  Record r;
  r.safe_level = int_field(v, "safe_level", 0, 3);
  r.safe_type = int_field(v, "safe_type", 0, 6);
  const json::Value* image = v.find("image");
  PSA_CHECK(image, "missing field 'image'");
  PSA_CHECK(image->is_string() && !image->str.empty(), "field 'image' must be a non-empty string");
  // "\u0000" is valid JSON, but a path cut at the NUL would name another file.
  PSA_CHECK(image->str.find('\0') == std::string::npos, "field 'image' contains a NUL character");
  Turns t = first_exchange(v);
  PSA_CHECK(t.user.find(kImageTag) != std::string::npos, "first USER turn has no <image> tag");
  r.image_first = trim(t.user).rfind(kImageTag, 0) == 0;
  r.question = remove_tags(t.user);
  // The tag is the image's token: in an answer it would ask for a second image the record does not have.
  PSA_CHECK(t.assistant.find(kImageTag) == std::string::npos, "the ASSISTANT answer contains the <image> tag "
            "(only the USER turn holds the image)");
  r.answer = t.assistant;
  for (const auto& [turn, text] : {std::pair<const char*, const std::string*>{"USER turn", &r.question},
                                   {"ASSISTANT answer", &r.answer}}) {
    const std::string special = special_token_in(*text);
    PSA_CHECK(special.empty(), "the ", turn, " contains the special token ", special,
              " (it would be encoded as that token, not as text)");
  }
  if (const json::Value* meta = v.find("meta")) r.meta = *meta;
  r.image = resolve_field(image->str, base_dir, check_images);
  return r;
}

// The JSON parser reports "<record>:1:COL: reason"; the line is already in our prefix.
static std::string json_reason(const std::string& what) {
  static const std::string prefix = "<record>:1:";
  if (what.rfind(prefix, 0) != 0) return "invalid JSON: " + what;
  size_t colon = what.find(": ", prefix.size());
  if (colon == std::string::npos) return "invalid JSON: " + what;
  return "invalid JSON at column " + what.substr(prefix.size(), colon - prefix.size()) + ": " + what.substr(colon + 2);
}

static std::string line_reason(const std::string& line, const std::string& base_dir, bool check_images, Record* out) {
  json::Value v;
  try {
    v = json::parse(line, "<record>");
  } catch (const std::exception& e) {
    return json_reason(e.what());
  }
  try {
    *out = parse_record(v, base_dir, check_images);
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

std::vector<Record> load_records(const std::string& jsonl_path, LoadReport* report, bool check_images) {
  // A FIFO or device would block or never end: regular files only, as json::read_file.
  PSA_CHECK(!std::filesystem::exists(jsonl_path) || std::filesystem::is_regular_file(jsonl_path), jsonl_path,
            ": cannot open: not a regular file");
  std::ifstream in(jsonl_path, std::ios::binary);
  if (!in) fail(jsonl_path, ": cannot open: ", std::strerror(errno));
  LoadReport local;
  LoadReport& rep = report ? *report : local;
  rep = LoadReport();
  const std::string base_dir = std::filesystem::path(jsonl_path).parent_path().string();
  std::vector<Record> records;
  std::string line;
  for (int64_t lineno = 1; std::getline(in, line); ++lineno) {
    if (lineno == 1 && line.rfind("\xEF\xBB\xBF", 0) == 0) line.erase(0, 3);  // UTF-8 BOM from editors
    if (trim(line).empty()) continue;
    ++rep.lines;
    Record r;
    std::string reason = line_reason(line, base_dir, check_images, &r);
    std::string where = jsonl_path + ":" + std::to_string(lineno);
    if (reason.empty()) {
      r.source = where;
      records.push_back(std::move(r));
      ++rep.loaded;
    } else {
      rep.messages.push_back(where + ": " + reason);
      ++rep.skipped;
    }
  }
  if (in.bad()) fail(jsonl_path, ": read error: ", std::strerror(errno));
  return records;
}

void print_skipped(const LoadReport& rep, const std::string& jsonl_path, size_t from) {
  constexpr size_t kShown = 10;
  const size_t n = rep.messages.size() > from ? rep.messages.size() - from : 0;
  for (size_t i = 0; i < n && i < kShown; ++i) std::fprintf(stderr, "skipped %s\n", rep.messages[from + i].c_str());
  if (n <= kShown) return;
  if (jsonl_path.empty()) std::fprintf(stderr, "... and %zu more skipped records\n", n - kShown);
  else
    std::fprintf(stderr, "... and %zu more skipped lines (psa inspect '%s' lists the file's bad records)\n", n - kShown,
                 jsonl_path.c_str());
}

json::Value record_to_json(int safe_level, int safe_type, const std::string& image, const std::string& question,
                           const std::string& answer, const json::Value& meta) {
  json::Value user = json::Value::object();
  user.set("from", "USER");
  user.set("value", "<image>\n" + question);
  json::Value assistant = json::Value::object();
  assistant.set("from", "ASSISTANT");
  assistant.set("value", answer);
  json::Value conv = json::Value::array();
  conv.push(std::move(user));
  conv.push(std::move(assistant));
  json::Value r = json::Value::object();
  r.set("safe_level", safe_level);
  r.set("safe_type", safe_type);
  r.set("image", image);
  r.set("conversations", std::move(conv));
  if (!meta.is_null()) r.set("meta", meta);
  return r;
}

}  // namespace psa
