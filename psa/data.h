// Records -> tokenized examples with preprocessed images -> collated batches.
#pragma once
#include "psa/model.h"
#include "psa/records.h"
#include "psa/tokenizer.h"

namespace psa {

struct Example {
  std::vector<float> pixels;        // [3, S, S] CLIP-normalised
  std::vector<int32_t> prompt_ids;  // BOS + the prompt template (with one <image> token)
  std::vector<int32_t> answer_ids;  // " answer" + EOS (EOS dropped when truncated)
  int64_t question_start = 0;       // index of the question's first token in prompt_ids
  int level = 0, type = 6;
  Record record;
};

struct Dataset {
  std::vector<Example> examples;
  int64_t image_size = 32;
  int64_t size() const { return examples.size(); }
};

// Loads images and tokenizes. Records whose image cannot be decoded are skipped and reported in `report`.
Dataset build_dataset(const std::vector<Record>& records, const Tokenizer& tok, int64_t image_size,
                      int64_t max_text_tokens, LoadReport* report);
// Prompt ids for a question (and hint) at inference: BOS + build_prompt(question, hint).
std::vector<int32_t> prompt_tokens(const Tokenizer& tok, const std::string& question, const std::string& hint);
// Index in a prompt_tokens row of the question's first token: past BOS, "USER:", the image token and the blank
// tokens after it (the head_query "first_text" mode reads it).
int64_t question_start(const Tokenizer& tok, const std::vector<int32_t>& prompt);

// Right-pads with pad_id; labels are -100 on BOS and the prompt, the answer tokens (and EOS) otherwise.
// with_answer = false collates prompts only (classification and generation).
PsaBatch collate(const Dataset& d, const std::vector<int64_t>& indices, int64_t pad_id, bool with_answer = true);

// A random batch for benchmarks and device-parity tests: rows of L tokens (BOS, the image token, random ids;
// the last third is the answer), N(0, 1) pixels, uniform head labels. Matches tools/psa_reference.py bench_batch.
PsaBatch random_batch(const PsaConfig& c, int64_t B, int64_t L, uint64_t seed);

// Every text the tokenizer should learn from (questions with hints, answers, the prompt template).
std::vector<std::string> corpus_of(const std::vector<Record>& records);

}  // namespace psa
