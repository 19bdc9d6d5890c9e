#include "psa/data.h"

#include <algorithm>
#include <exception>
#include <random>

#include "psa/image.h"
#include "psa/policy.h"

namespace psa {

std::vector<int32_t> prompt_tokens(const Tokenizer& tok, const std::string& question, const std::string& hint) {
  std::vector<int32_t> ids{tok.bos_id()};
  std::vector<int32_t> p = tok.encode(build_prompt(question, hint));
  ids.insert(ids.end(), p.begin(), p.end());
  return ids;
}

int64_t question_start(const Tokenizer& tok, const std::vector<int32_t>& prompt) {
  auto image = std::find(prompt.begin(), prompt.end(), tok.image_id());
  PSA_CHECK(image != prompt.end(), "question_start: the prompt has no image token");
  int64_t p = image - prompt.begin() + 1, n = prompt.size();
  while (p + 1 < n && is_blank(tok.decode({prompt[p]}))) ++p;
  return std::min(p, n - 1);
}

// One record -> one example; returns why the record is skipped ("" when it is kept). Only an unreadable image
// or a prompt without room for the answer skips a record; anything else (out of memory) propagates.
static std::string load_example(const Record& r, const Tokenizer& tok, int64_t image_size, int64_t max_text_tokens,
                                Example& e) {
  try {
    e.pixels = load_record_image(r.image, "", image_size);
  } catch (const std::exception& ex) {
    return r.source + ": " + ex.what();
  }
  e.record = r;
  e.level = r.safe_level;
  e.type = r.safe_type;
  e.prompt_ids = prompt_tokens(tok, r.question, "");
  e.question_start = question_start(tok, e.prompt_ids);
  e.answer_ids = tok.encode(" " + r.answer);
  e.answer_ids.push_back(tok.eos_id());
  int64_t room = max_text_tokens - (int64_t)e.prompt_ids.size();
  if (room < 1)
    return r.source + ": prompt of " + std::to_string(e.prompt_ids.size()) +
           " tokens leaves no room for the answer (max_text_tokens " + std::to_string(max_text_tokens) + ")";
  if ((int64_t)e.answer_ids.size() > room) e.answer_ids.resize(room);
  return "";
}

Dataset build_dataset(const std::vector<Record>& records, const Tokenizer& tok, int64_t image_size,
                      int64_t max_text_tokens, LoadReport* report) {
  Dataset d;
  d.image_size = image_size;
  d.examples.resize(records.size());
  std::vector<std::string> errors(records.size());
  FirstError err;
  // Decoding images dominates; records are independent, so they are loaded in parallel and kept in order.
#pragma omp parallel for schedule(dynamic, 16)
  for (int64_t i = 0; i < (int64_t)records.size(); ++i)
    err.run([&] { errors[i] = load_example(records[i], tok, image_size, max_text_tokens, d.examples[i]); });
  err.rethrow();
  std::vector<Example> kept;
  for (size_t i = 0; i < records.size(); ++i) {
    if (errors[i].empty()) kept.push_back(std::move(d.examples[i]));
    else if (report) {
      report->messages.push_back(errors[i]);
      report->skipped++;
      report->loaded--;
    }
  }
  d.examples = std::move(kept);
  return d;
}

PsaBatch collate(const Dataset& d, const std::vector<int64_t>& idx, int64_t pad_id, bool with_answer) {
  int64_t B = idx.size(), S = d.image_size, L = 0;
  for (int64_t i : idx) {
    const Example& e = d.examples.at(i);
    L = std::max<int64_t>(L, e.prompt_ids.size() + (with_answer ? e.answer_ids.size() : 0));
  }
  std::vector<int64_t> ids(B * L, pad_id), labels(B * L, -100), level(B), type(B);
  std::vector<float> px(B * 3 * S * S);
  PsaBatch b;
  for (int64_t r = 0; r < B; ++r) {
    const Example& e = d.examples[idx[r]];
    int64_t t = 0;
    for (int32_t id : e.prompt_ids) ids[r * L + t++] = id;
    if (with_answer)
      for (int32_t id : e.answer_ids) {
        ids[r * L + t] = id;
        labels[r * L + t++] = id;
      }
    std::copy(e.pixels.begin(), e.pixels.end(), px.begin() + r * 3 * S * S);
    level[r] = e.level;
    type[r] = e.type;
    b.prompt_len.push_back(e.prompt_ids.size());
    b.question_start.push_back(e.question_start);
  }
  b.ids = Tensor::from(ids, {B, L}, DType::i64);
  b.labels = Tensor::from(labels, {B, L}, DType::i64);
  b.level = Tensor::from(level, {B}, DType::i64);
  b.type = Tensor::from(type, {B}, DType::i64);
  b.pixels = Tensor::from(px, {B, 3, S, S}, DType::f32);
  return b;
}

std::vector<std::string> corpus_of(const std::vector<Record>& records) {
  std::vector<std::string> c;
  for (const Record& r : records) {
    c.push_back(build_prompt(r.question, ""));
    c.push_back(" " + r.answer);
  }
  return c;
}

// Rows of L tokens: BOS, the image token, random ids; the last third is the answer (the rest -100), as in
// tools/psa_reference.py bench_batch. Pixels are N(0, 1), the head's labels uniform over their classes.
PsaBatch random_batch(const PsaConfig& c, int64_t B, int64_t L, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int64_t> ids(B * L), labels(B * L), level(B), type(B);
  const int64_t answer_from = L - L / 3;
  for (int64_t r = 0; r < B; ++r) {
    for (int64_t t = 0; t < L; ++t) {
      int64_t id = 4 + int64_t(rng() % uint64_t(c.text.vocab - 4));
      if (id == c.image_token) id = 4;
      if (t == 0) id = c.text.bos_id;
      if (t == 1) id = c.image_token;
      ids[r * L + t] = id;
      labels[r * L + t] = t < answer_from ? -100 : id;
    }
    level[r] = int64_t(rng() % 4);
    type[r] = int64_t(rng() % 7);
  }
  int64_t S = c.vision.image_size;
  std::vector<float> pixels(B * 3 * S * S);
  std::normal_distribution<float> normal(0, 1);
  for (float& p : pixels) p = normal(rng);
  PsaBatch b;
  b.pixels = Tensor::from(pixels, {B, 3, S, S});
  b.ids = Tensor::from(ids, {B, L}, DType::i64);
  b.labels = Tensor::from(labels, {B, L}, DType::i64);
  b.level = Tensor::from(level, {B}, DType::i64);
  b.type = Tensor::from(type, {B}, DType::i64);
  b.prompt_len.assign(B, answer_from);
  b.question_start.assign(B, 2);  // after BOS and the image token
  return b;
}

}  // namespace psa
