// Dynamic safety control (psa-vlm.md §5, §8.10): the per-(level, type) table that turns the safety head's
// prediction into nothing, a "Safe Hint" sentence in the user turn, or a fixed refusal; and the one prompt
// template used by training and inference.
#pragma once
#include <string>
#include <utility>

#include "nn/json.h"

namespace psa {

constexpr int kNumLevels = 4;  // 0 safe to answer, 1 answer carefully, 2 answer or reject, 3 reject
constexpr int kNumTypes = 7;   // 0..5 risk types, 6 clean
constexpr int kRiskTypes = 6;
constexpr int kCleanType = 6;

// "politics", "illegal", "insults", "fairness", "privacy", "misleading", "clean".
const char* type_name(int type);
int type_from_name(const std::string& name);  // -1 when unknown
// "safe", "careful", "answer_or_reject", "reject".
const char* level_name(int level);

struct PolicyEntry {
  std::string action = "hint";  // "none" | "hint" | "refuse"
  std::string hint;             // the Safe Hint sentence
  std::string refusal;          // per-entry refusal; empty = the policy's default
};

struct Policy {
  std::string name, source;
  std::string path;         // the file it was read from; empty for a built-in table
  std::string refusal;      // default refusal sentence for action "refuse"
  PolicyEntry table[3][6];  // [level - 1][type], levels 1..3, types 0..5
  const PolicyEntry& entry(int level, int type) const;
};

// File format (psa/policy_reference.json): {"name", "source", "refusal",
//   "levels": {"1": {"politics": {"action": "hint", "hint": "...", "refusal"?: "..."}, ... six types}, "2": ..., "3":
//   ...}}.
// "action" defaults to "hint". Every level and type must be present; unknown keys are errors (typos would
// otherwise silently fall back to defaults). Errors read "path: reason".
Policy load_policy(const std::string& path);
Policy parse_policy(const json::Value& v, const std::string& source_name);
json::Value policy_to_json(const Policy& p);
// The synthetic data's level-2 rule: decline for politics, illegal, insults, privacy; caution for fairness
// (the reference's fairness hint has no refusal clause) and misleading. The short hints spell it out.
bool level2_declines(int type);

// Built-in copies of the shipped tables, so generators and tests need no file path: "reference" | "short".
Policy builtin_policy(const std::string& name);
// A built-in name or else a policy file path. An unknown name that is no file either is refused with the valid
// choices in the message.
Policy resolve_policy(const std::string& name_or_path);
// How errors name a policy: "policy file PATH" or "built-in policy 'short'".
std::string policy_label(const Policy& p);

// action "none": no hint. "hint": `hint` is the Safe Hint sentence to put in the prompt.
// "refuse": `hint` is the refusal sentence to output verbatim instead of generating.
struct Decision {
  std::string action;
  std::string hint;
};
// The reference rule first: level 0 or type 6 means no hint, whatever the table says.
Decision decide(const Policy& p, int level, int type);

// "USER: <image>\n{question}[\nSafe Hint: {hint}] ASSISTANT:" — the answer follows after one space and the
// caller appends the </s> token. Used identically in every training stage and at inference.
std::string build_prompt(const std::string& question, const std::string& hint);
// How a hint rides inside a stored question: question + "\nSafe Hint: " + hint, so that
// build_prompt(with_hint(q, h), "") == build_prompt(q, h).
std::string with_hint(const std::string& question, const std::string& hint);
// Inverse of with_hint: {question, hint} (hint empty when the question carries none).
std::pair<std::string, std::string> split_hint(const std::string& question);

}  // namespace psa
