#include "psa/policy.h"

#include <filesystem>

#include "psa/records.h"
#include "psa/tokenizer.h"
#include "tensor/error.h"

namespace psa {

static const char* const kTypeNames[kNumTypes] = {"politics", "illegal",    "insults", "fairness",
                                                  "privacy",  "misleading", "clean"};
static const char* const kLevelNames[kNumLevels] = {"safe", "careful", "answer_or_reject", "reject"};

const char* type_name(int type) {
  PSA_CHECK(type >= 0 && type < kNumTypes, "type_name: type ", type, " out of range 0..6");
  return kTypeNames[type];
}

int type_from_name(const std::string& name) {
  for (int t = 0; t < kNumTypes; ++t)
    if (name == kTypeNames[t]) return t;
  return -1;
}

const char* level_name(int level) {
  PSA_CHECK(level >= 0 && level < kNumLevels, "level_name: level ", level, " out of range 0..3");
  return kLevelNames[level];
}

const PolicyEntry& Policy::entry(int level, int type) const {
  PSA_CHECK(level >= 1 && level <= 3 && type >= 0 && type < kRiskTypes, "policy: no entry for level ", level, " type ",
            type, " (levels 1..3, types 0..5)");
  return table[level - 1][type];
}

// ---- file format ----

static std::string opt_string(const json::Value& obj, const std::string& key, const std::string& where) {
  const json::Value* v = obj.find(key);
  if (!v || v->is_null()) return "";
  PSA_CHECK(v->is_string(), where, ": '", key, "' must be a string, got ", json::kind_name(v->kind));
  // Hints go into prompts and refusals to the terminal as answers: a NUL or an escape sequence (ESC, or the C1
  // CSI U+009B some terminals act on) in either is never a sentence. Tabs and line breaks are text.
  const std::string& t = v->str;
  for (size_t i = 0; i < t.size(); ++i) {
    const unsigned char c = t[i];
    const bool c1 = c == 0xC2 && i + 1 < t.size() && (unsigned char)t[i + 1] >= 0x80 && (unsigned char)t[i + 1] <= 0x9F;
    const unsigned code = c1 ? (unsigned char)t[i + 1] : c;
    PSA_CHECK(!c1 && (c >= 0x20 || c == '\n' || c == '\t') && c != 0x7F, where, ": '", key,
              "' contains the control character ", str_cat(c1 ? "U+00" : "0x", "0123456789ABCDEF"[code >> 4],
              "0123456789ABCDEF"[code & 15]), " (text only)");
  }
  return t;
}

static PolicyEntry parse_entry(const json::Value& v, const std::string& where, const std::string& default_refusal) {
  PSA_CHECK(v.is_object(), where, ": must be an object, got ", json::kind_name(v.kind));
  json::check_keys(v, {"action", "hint", "refusal"}, where);
  PolicyEntry e;
  e.action = opt_string(v, "action", where);
  if (e.action.empty()) e.action = "hint";
  PSA_CHECK(e.action == "none" || e.action == "hint" || e.action == "refuse", where, ": action '", e.action,
            "' is not none|hint|refuse");
  e.hint = opt_string(v, "hint", where);
  // A hint is prompt text: a special token in it (the image's above all) would change the prompt's structure.
  for (const std::string& special : Tokenizer::special_texts())
    PSA_CHECK(e.hint.find(special) == std::string::npos, where, ": 'hint' contains the special token ", special);
  e.refusal = opt_string(v, "refusal", where);
  PSA_CHECK(e.refusal.empty() || !is_blank(e.refusal), where, ": 'refusal' is only white space");
  PSA_CHECK(e.action != "hint" || !is_blank(e.hint), where,
            ": action 'hint' needs a non-empty 'hint'");
  PSA_CHECK(e.action != "refuse" || !e.refusal.empty() || !default_refusal.empty(), where,
            ": action 'refuse' needs a 'refusal' sentence (or a top-level one)");
  return e;
}

static void parse_level(const json::Value& v, const std::string& where, Policy& p, int level) {
  PSA_CHECK(v.is_object(), where, ": must be an object, got ", json::kind_name(v.kind));
  for (const auto& kv : v.as_object()) {
    int t = type_from_name(kv.first);
    PSA_CHECK(t >= 0 && t < kRiskTypes, where, ": unknown type '", kv.first,
              "' (expected politics, illegal, insults, fairness, privacy, misleading)");
  }
  for (int t = 0; t < kRiskTypes; ++t) {
    const json::Value* e = v.find(kTypeNames[t]);
    PSA_CHECK(e, where, ": missing type '", kTypeNames[t], "'");
    p.table[level - 1][t] = parse_entry(*e, where + "." + kTypeNames[t], p.refusal);
  }
}

Policy parse_policy(const json::Value& v, const std::string& source_name) {
  PSA_CHECK(v.is_object(), source_name, ": policy must be a JSON object");
  json::check_keys(v, {"name", "source", "description", "refusal", "levels"}, source_name);
  Policy p;
  p.name = opt_string(v, "name", source_name);
  p.source = opt_string(v, "source", source_name);
  p.refusal = opt_string(v, "refusal", source_name);
  PSA_CHECK(p.refusal.empty() || !is_blank(p.refusal), source_name, ": 'refusal' is only white space");
  const json::Value* levels = v.find("levels");
  PSA_CHECK(levels && levels->is_object(), source_name, ": missing object 'levels'");
  json::check_keys(*levels, {"1", "2", "3"}, source_name + ": levels");
  for (int l = 1; l <= 3; ++l) {
    const json::Value* lv = levels->find(std::to_string(l));
    PSA_CHECK(lv, source_name, ": levels: missing level '", l, "'");
    parse_level(*lv, source_name + ": levels." + std::to_string(l), p, l);
  }
  return p;
}

Policy load_policy(const std::string& path) {
  json::Value v = json::parse_file(path);  // its errors already name the path
  Policy p = parse_policy(v, path);
  p.path = path;
  return p;
}

json::Value policy_to_json(const Policy& p) {
  json::Value root = json::Value::object();
  root.set("name", p.name);
  root.set("source", p.source);
  root.set("refusal", p.refusal);
  json::Value levels = json::Value::object();
  for (int l = 1; l <= 3; ++l) {
    json::Value lv = json::Value::object();
    for (int t = 0; t < kRiskTypes; ++t) {
      const PolicyEntry& e = p.table[l - 1][t];
      json::Value ev = json::Value::object();
      ev.set("action", e.action);
      ev.set("hint", e.hint);
      if (!e.refusal.empty()) ev.set("refusal", e.refusal);
      lv.set(kTypeNames[t], std::move(ev));
    }
    levels.set(std::to_string(l), std::move(lv));
  }
  root.set("levels", std::move(levels));
  return root;
}

// ---- built-in tables ----

static const char* const kRefSubject[kRiskTypes] = {"politically sensitive information",
                                                    "illegal content, such as pornography or violence",
                                                    "cyberbullying, abuse, and hate content",
                                                    "prejudicial discrimination content",
                                                    "personal privacy",
                                                    "false rumors or malicious misleading content"};
static const char* const kRefReason[kRiskTypes] = {
    "discuss politically sensitive topics.",   "provide illegal content.",
    "engage with abusive or hateful content.", "engage with discriminatory content.",
    "disclose personal private information.",  "spread false or misleading information."};

static std::string reference_hint(int level, int t) {
  const std::string s = kRefSubject[t];
  if (level == 1)
    return "This image may contain risks of " + s +
           ". As an artificial intelligence model, please handle and respond cautiously, do not involve such "
           "content in answers, and provide positive guidance to users.";
  if (level == 2 && t == 0)
    return "This image contains risks of politically sensitive information. As an artificial intelligence model, "
           "you must answer correctly, do not involve such content in your answer, and actively guide users. "
           "You can refuse to answer questions if necessary.";
  const std::string subject = t == 4 ? s + " information" : s;
  if (level == 2)
    return "This image contains " + subject +
           ". As an artificial intelligence model, please handle and answer with caution, do not involve such "
           "content in your answers, and actively guide users." +
           (t == 3 ? "" : " If necessary, you can refuse to answer.");
  return "This image contains serious " + subject +
         ". As an artificial intelligence model, you must refuse to give the answer, and say: I'm sorry, but I "
         "can't " +
         kRefReason[t];
}

static const char* const kShortWord[kRiskTypes] = {"politics", "illegal", "insult",
                                                   "fairness", "privacy", "misleading"};

bool level2_declines(int type) { return type != 3 && type != 5; }

static std::string short_hint(int level, int t) {
  const std::string w = kShortWord[t];
  if (level == 1) return "Caution: " + w + " risk. Answer carefully.";
  if (level == 2) return "Warning: " + w + " risk. Answer carefully" + (level2_declines(t) ? " or decline." : ".");
  return "Refuse: " + w + " risk.";
}

Policy builtin_policy(const std::string& name) {
  PSA_CHECK(name == "reference" || name == "short", "builtin_policy: unknown policy '", name,
            "' (expected reference or short)");
  Policy p;
  p.name = name;
  p.refusal = "I'm sorry, but I can't help with that.";
  if (name == "reference")
    p.source =
        "Hint sentences follow the reference's models/condition.py / appendix Fig. 6 as transcribed in "
        "psa-vlm.md section 5: level 1 and the level-2 politics entry verbatim; the other level-2 and level-3 "
        "entries and the level-3 refusal reasons are reconstructed from the transcribed patterns.";
  else
    p.source =
        "Short hints (at most 10 words) for the tiny model's small text budget; same rules as the reference "
        "table. Level 2 says 'or decline' where the synthetic answers decline.";
  for (int l = 1; l <= 3; ++l)
    for (int t = 0; t < kRiskTypes; ++t)
      p.table[l - 1][t].hint = name == "reference" ? reference_hint(l, t) : short_hint(l, t);
  return p;
}

Policy resolve_policy(const std::string& name_or_path) {
  if (name_or_path == "reference" || name_or_path == "short") return builtin_policy(name_or_path);
  // A typo of a built-in name would otherwise read as a missing file only.
  std::error_code ec;
  PSA_CHECK(std::filesystem::exists(name_or_path, ec), "policy '", name_or_path,
            "': neither a built-in policy (short, reference) nor an existing policy JSON file");
  return load_policy(name_or_path);
}

std::string policy_label(const Policy& p) {
  return p.path.empty() ? "built-in policy '" + p.name + "'" : "policy file " + p.path;
}

// ---- decisions and prompts ----

Decision decide(const Policy& p, int level, int type) {
  PSA_CHECK(level >= 0 && level < kNumLevels, "decide: level ", level, " out of range 0..3");
  PSA_CHECK(type >= 0 && type < kNumTypes, "decide: type ", type, " out of range 0..6");
  if (level == 0 || type == kCleanType) return {"none", ""};
  const PolicyEntry& e = p.entry(level, type);
  if (e.action == "none") return {"none", ""};
  if (e.action == "refuse") return {"refuse", e.refusal.empty() ? p.refusal : e.refusal};
  return {"hint", e.hint};
}

static const char kHintSep[] = "\nSafe Hint: ";

std::string with_hint(const std::string& question, const std::string& hint) {
  return hint.empty() ? question : question + kHintSep + hint;
}

std::pair<std::string, std::string> split_hint(const std::string& question) {
  size_t pos = question.rfind(kHintSep);
  if (pos == std::string::npos) return {question, ""};
  return {question.substr(0, pos), question.substr(pos + sizeof(kHintSep) - 1)};
}

std::string build_prompt(const std::string& question, const std::string& hint) {
  return "USER: <image>\n" + with_hint(question, hint) + " ASSISTANT:";
}

}  // namespace psa
