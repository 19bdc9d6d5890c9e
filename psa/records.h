// Reference-format training records (dataset.md "Records", psa-vlm.md §6.2): one JSON object per line,
// {"safe_level", "safe_type", "image", "conversations": [{"from": "USER", ...}, {"from": "ASSISTANT", ...}]}.
// Bad lines are reported and skipped so that a large real dataset with a few broken rows still trains. A key
// outside those, our "meta" and LLaVA's "id" (or a turn key other than "from" / "value") makes a line bad.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "nn/json.h"

namespace psa {

struct Record {
  int safe_level = 0, safe_type = 6;
  std::string image;        // resolved: relative parts joined to the JSONL file's folder; pairs keep "<split>"
  std::string question;     // first USER value, <image> tag removed, trimmed (may carry "\nSafe Hint: ...")
  std::string answer;       // first ASSISTANT value after it
  bool image_first = true;  // the tag stood at the start of the user turn (else at the end)
  json::Value meta;         // optional "meta" field, kept as is (the synthetic benchmark's ground truth)
  std::string source;       // "file:line"
};

struct LoadReport {
  int64_t lines = 0;  // non-blank lines, so lines == loaded + skipped
  int64_t loaded = 0, skipped = 0;
  std::vector<std::string> messages;  // one "file:line: reason" per skipped line
};

// `s` without leading and trailing ASCII whitespace (isspace's six characters).
std::string trim(const std::string& s);
// The first special token other than <image> ("<s>", "</s>", "<pad>", "<unk>") written in `s`, "" when none.
// The tokenizer encodes those texts as the special ids (as the reference's does), so a question or answer that
// holds one would put an end of sequence or a pad into the middle of a turn: records and prompts refuse them.
std::string special_token_in(const std::string& s);
// True when s holds nothing visible: only ASCII or Unicode white space (NBSP, ideographic space, ...).
bool is_blank(const std::string& s);

// Never throws for a bad record, only when the file itself cannot be read. `report` may be null.
// check_images verifies every image part's header (exists, decodable format, size limit) without decoding.
std::vector<Record> load_records(const std::string& jsonl_path, LoadReport* report, bool check_images = true);

// Prints the skipped lines of `rep` (read from `jsonl_path`) from message `from` on to stderr, "skipped
// FILE:LINE: reason": the first 10, then how many more there are and the command that lists the file's bad
// lines (psa inspect FILE.jsonl; with no path, skips the file itself cannot show, only the count).
void print_skipped(const LoadReport& rep, const std::string& jsonl_path, size_t from = 0);

// Validates one parsed line; throws psa::Error with the reason (no location) when it is not a usable record.
Record parse_record(const json::Value& v, const std::string& base_dir, bool check_images);

// A benign look-alike of a risky motif, as the synthetic generator marks it in "meta" (false for real data).
inline bool is_hard_negative(const Record& r) { return r.meta.is_object() && r.meta.bool_or("hard_negative", false); }

// The reference record for a question without the tag: the user turn becomes "<image>\n" + question.
// A null meta is left out.
json::Value record_to_json(int safe_level, int safe_type, const std::string& image, const std::string& question,
                           const std::string& answer, const json::Value& meta = json::Value());

}  // namespace psa
