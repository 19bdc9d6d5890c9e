// End-to-end checks of the stage machinery on a small model: which parameters train in each stage, that a
// short run lowers the loss, that save -> load -> resume equals an uninterrupted run bit for bit, and that
// the merged LLM sequence has the layout of psa-vlm.md §2.2.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <set>
#include <unistd.h>

#include "nn/safetensors.h"
#include "psa/policy.h"
#include "psa/synth.h"
#include "psa/train.h"
#include "tests/test_util.h"

namespace psa {
namespace {
namespace fs = std::filesystem;

PsaConfig small_config(const Tokenizer& tok) {
  PsaConfig c = PsaConfig::from_preset("tiny");
  c.vision.layers = 2;
  c.vision.hidden = 32;
  c.vision.intermediate = 64;
  c.text.layers = 2;
  c.text.hidden = 64;
  c.text.intermediate = 96;
  c.text.vocab = tok.vocab_size();
  c.num_safety_tokens = 4;
  c.abstractor_depth = 1;
  c.image_token = tok.image_id();
  c.pad_id = tok.pad_id();
  return c;
}

// One small dataset and tokenizer shared by the tests (generation takes a fraction of a second).
struct World {
  std::string dir;
  std::shared_ptr<Tokenizer> tok;
  Dataset base, safety;
  PsaConfig cfg;
};

const World& world() {
  static World* w = [] {
    auto* w = new World;
    w->dir = (fs::temp_directory_path() / ("psa_train_test_" + std::to_string(::getpid()))).string();
    SynthConfig sc = synth_preset("tiny");
    sc.train = {40, 120, 10, 0};
    sc.val = {2, 6, 2, 0};
    sc.test = {2, 6, 2, 0};
    sc.base_extra_clean = 40;
    generate_dataset(sc, w->dir);
    std::vector<Record> base = load_records(w->dir + "/base_train.jsonl", nullptr);
    std::vector<Record> safety = load_records(w->dir + "/train.jsonl", nullptr);
    std::vector<Record> all = base;
    all.insert(all.end(), safety.begin(), safety.end());
    w->tok = std::make_shared<Tokenizer>(Tokenizer::train(corpus_of(all), 300));
    w->cfg = small_config(*w->tok);
    w->base = build_dataset(base, *w->tok, 32, 96, nullptr);
    w->safety = build_dataset(safety, *w->tok, 32, 96, nullptr);
    return w;
  }();
  return *w;
}

std::shared_ptr<PsaVlm> fresh_model() {
  auto m = std::make_shared<PsaVlm>(world().cfg);
  m->initialize(7);
  return m;
}

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }

bool is_safety(const std::string& n) {
  for (const std::string& p : safety_prefixes())
    if (starts_with(n, p)) return true;
  return false;
}

// Names of the parameters that received a non-zero gradient from one forward/backward of `stage`.
std::set<std::string> grads_of(PsaVlm& m, const std::string& stage) {
  LoraSettings lora{4, 8, 0, false};
  set_trainable(m, stage, lora);
  const Dataset& d = stage == "base" ? world().base : world().safety;
  PsaBatch b = collate(d, {0, 1, 2, 3}, m.config.pad_id);
  m.zero_grad();
  PsaOutput out = m.forward(b, stage != "base", true, stage != "base");
  out.loss.backward();
  std::set<std::string> names;
  for (auto& [n, t] : m.named_parameters()) {
    if (!t.grad().defined()) continue;
    for (double g : t.grad().to_vector())
      if (g != 0) {
        names.insert(n);
        break;
      }
  }
  return names;
}

TEST(PsaStages, BaseTrainsOnlyVisionProjectorAndLlm) {
  auto m = fresh_model();
  std::set<std::string> g = grads_of(*m, "base");
  EXPECT_GT(g.size(), 20u);
  for (const std::string& n : g)
    EXPECT_TRUE(starts_with(n, kVisionPrefix) || starts_with(n, kProjectorPrefix) || starts_with(n, kLmPrefix)) << n;
  EXPECT_TRUE(g.count("multi_modal_projector.linear_1.weight"));
  EXPECT_TRUE(g.count("language_model.model.layers.0.mlp.up_proj.weight"));
}

TEST(PsaStages, StageOneTrainsEverySafetyModuleAndNothingElse) {
  auto m = fresh_model();
  std::set<std::string> g = grads_of(*m, "stage1");
  for (const std::string& n : g) EXPECT_TRUE(is_safety(n)) << n << " got a gradient in Stage I";
  for (auto& [n, t] : m->named_parameters()) {
    if (is_safety(n)) {
      EXPECT_TRUE(g.count(n)) << n << " got no gradient in Stage I";
    }
  }
  EXPECT_TRUE(g.count("safety_query_tokens_2")) << "L_LLM must reach the LLM-side safety tokens";
}

TEST(PsaStages, StageTwoTrainsOnlyLora) {
  auto m = fresh_model();
  std::set<std::string> g = grads_of(*m, "stage2");
  EXPECT_FALSE(g.empty());
  for (const std::string& n : g) EXPECT_NE(n.find(".lora_"), std::string::npos) << n << " got a gradient in Stage II";
}

// Stage I keeps every risky record and clean ones in the reference 3000:11200 ratio, hard negatives first.
TEST(PsaStages, StageOneDataKeepsRiskyAndTakesHardNegativesFirst) {
  Dataset d;
  for (int i = 0; i < 400; ++i) {
    Example e;
    e.type = i < 112 ? i % 6 : kCleanType;
    e.record.meta = json::Value::object();
    e.record.meta.set("hard_negative", e.type == kCleanType && i % 20 == 0);
    d.examples.push_back(e);
  }
  const std::vector<int64_t> idx = stage_indices(d, "stage1", 7);
  ASSERT_EQ(idx.size(), 112u + 30u);  // 112 * 3000 / 11200 clean records
  int64_t risky = 0, hard = 0;
  for (int64_t i : idx) risky += d.examples[i].type != kCleanType, hard += is_hard_negative(d.examples[i].record);
  EXPECT_EQ(risky, 112);
  EXPECT_EQ(hard, 14);  // all of them (indices 120, 140, ..., 380), though a random 30 of 288 would hold ~1.5
  EXPECT_EQ(stage_indices(d, "stage2", 7).size(), 400u);
}

TEST(PsaModel, MergedSequenceLayout) {
  auto m = fresh_model();
  NoGrad ng;
  PsaBatch b = collate(world().safety, {0, 1}, m->config.pad_id);
  PsaOutput out = m->forward(b, false, true, true);
  int64_t L = b.ids.size(1), Ns = m->config.num_safety_tokens, P = m->config.vision.num_patches();
  EXPECT_EQ(out.lm_hidden.size(1), L - 1 + Ns + P);
  // Everything from the image token position to the end of the inserted block is unlabelled.
  std::vector<int64_t> ids = b.ids.vec<int64_t>(), ml = out.merged_labels.vec<int64_t>();
  int64_t at = std::find(ids.begin(), ids.begin() + L, m->config.image_token) - ids.begin();
  for (int64_t t = at; t < at + Ns + P; ++t) EXPECT_EQ(ml[t], -100);
  EXPECT_EQ(out.merged_labels.size(1), L - 1 + Ns + P);
}

// psa-vlm.md §8.4: position0 reads a fixed token (an image-only head), first_text the question's first token,
// mean_prompt every prompt token and nothing after the prompt. Each mode is probed by changing one input id.
TEST(PsaModel, HeadQueryModesReadExactlyTheirTokens) {
  const Tokenizer& tok = *world().tok;
  const Example& e = world().safety.examples[0];
  const std::string first = trim(tok.decode({e.prompt_ids[e.question_start]}));
  ASSERT_FALSE(first.empty());
  EXPECT_EQ(e.record.question.rfind(first, 0), 0u) << "'" << first << "' does not start '" << e.record.question << "'";
  NoGrad ng;
  for (const std::string mode : {"position0", "first_text", "mean_prompt"}) {
    PsaConfig c = world().cfg;
    c.head_query = mode;
    PsaVlm m(c);
    m.initialize(7);
    PsaBatch b = collate(world().safety, {0, 1}, c.pad_id);
    const int64_t L = b.ids.size(1), q = b.question_start[1], prompt = b.prompt_len[1];
    ASSERT_LT(q + 1, prompt);
    auto level_logits_with = [&](int64_t pos) {  // row 1 with the id at pos replaced
      std::vector<int64_t> ids = b.ids.vec<int64_t>();
      if (pos >= 0) ids[L + pos] = ids[L + pos] == 5 ? 6 : 5;
      PsaBatch changed = b;
      changed.ids = Tensor::from(ids, {2, L}, DType::i64);
      return m.classify(changed.pixels, m.lm->embed(changed.ids), &changed).first.to_vector();
    };
    const std::vector<double> base = level_logits_with(-1);
    auto moves = [&](int64_t pos) { return level_logits_with(pos) != base; };
    EXPECT_EQ(moves(q), mode != "position0") << mode;
    EXPECT_EQ(moves(q + 1), mode == "mean_prompt") << mode;
    EXPECT_FALSE(moves(prompt)) << mode << ": the answer's first token moved the head";
  }
}

std::vector<double> params_of(const PsaVlm& m) {
  std::vector<double> v;
  for (auto& [n, t] : m.named_parameters()) {
    std::vector<double> x = t.to_vector();
    v.insert(v.end(), x.begin(), x.end());
  }
  return v;
}

double avg(const std::vector<double>& v, size_t from, size_t to) {
  double s = 0;
  for (size_t i = from; i < to; ++i) s += v[i];
  return s / (to - from);
}

// A short run on a fixed set of 8 examples (one batch): every loss of the stage must fall by the stated margin.
StageResult short_run(const std::string& stage, const Dataset& from, int64_t steps) {
  Dataset d;
  d.image_size = from.image_size;
  for (int64_t i = 0; i < 8; ++i) d.examples.push_back(from.examples[i * 7]);  // several types and levels
  auto m = fresh_model();
  StageOptions o;
  o.stage = stage;
  o.steps = steps;
  o.batch = 8;
  o.lr = 3e-3;
  o.warmup = 2;
  o.progress = false;
  return train_stage(*m, d, o);
}

TEST(PsaTrain, ShortBaseRunLowersTheLmLoss) {
  StageResult r = short_run("base", world().base, 40);
  EXPECT_LT(avg(r.loss_lm, 35, 40), 0.6 * avg(r.loss_lm, 0, 3));
}

TEST(PsaTrain, ShortStageOneRunLowersEachLoss) {
  StageResult r = short_run("stage1", world().safety, 40);
  ASSERT_EQ(r.loss.size(), 40u);
  EXPECT_LT(avg(r.loss_type, 35, 40), 0.5 * avg(r.loss_type, 0, 3));
  EXPECT_LT(avg(r.loss_level, 35, 40), 0.5 * avg(r.loss_level, 0, 3));
  // The LLM here is untrained (near-uniform), and only the LLM-side safety tokens learn L_LLM in Stage I:
  // it can only fall a little.
  EXPECT_LT(avg(r.loss_lm, 35, 40), 0.998 * avg(r.loss_lm, 0, 3));
}

TEST(PsaTrain, ResumeEqualsUninterruptedRunBitForBit) {
  std::string dir = world().dir + "/resume";
  fs::create_directories(dir);
  StageOptions o;
  o.stage = "stage2";
  o.steps = 6;
  o.batch = 4;
  o.lr = 1e-3;
  o.warmup = 2;
  o.progress = false;
  o.lora = {4, 8, 0.1, false};  // dropout on: the masks must repeat too
  auto straight = fresh_model();
  StageResult a = train_stage(*straight, world().safety, o);

  auto first = fresh_model();
  StageOptions half = o;
  half.stop_after = 3;
  half.state_path = dir + "/state.safetensors";
  train_stage(*first, world().safety, half);
  save_checkpoint(dir + "/ckpt", *first, *world().tok, "stage2", o.lora);
  Checkpoint c = load_checkpoint(dir + "/ckpt");
  StageOptions rest = o;
  rest.resume_from = half.state_path;
  StageResult b = train_stage(*c.model, world().safety, rest);

  ASSERT_EQ(a.loss.size(), b.loss.size());
  for (size_t i = 0; i < a.loss.size(); ++i) EXPECT_EQ(a.loss[i], b.loss[i]) << "step " << i;
  EXPECT_EQ(params_of(*straight), params_of(*c.model));
  std::set<uint64_t> seeds;  // each adapter its own dropout masks, as PEFT's one nn.Dropout per module
  for (nn::Linear* l : straight->lm->linears()) seeds.insert(l->dropout_seed);
  EXPECT_EQ(seeds.size(), straight->lm->linears().size()) << "adapters share their dropout masks";
}

// config.json is not what the model is built from: one that differs from the model's own config (edited, broken,
// a folder) loads with one warning line naming it, and the model keeps its stored config.
TEST(PsaCheckpoint, ConfigJsonThatDiffersFromTheModelIsWarnedAbout) {
  const std::string dir = world().dir + "/config_json";
  auto m = fresh_model();
  save_checkpoint(dir, *m, *world().tok, "base", LoraSettings{});
  testing::internal::CaptureStderr();
  load_checkpoint(dir);
  EXPECT_EQ(testing::internal::GetCapturedStderr(), "");
  const std::string path = dir + "/config.json";
  std::string text = json::read_file(path);
  const std::string key = "\"max_position_embeddings\": ";
  const size_t at = text.find(key);
  ASSERT_NE(at, std::string::npos);
  const std::string edited_value = text.substr(0, at) + key + "7, \"was\": " + text.substr(at + key.size());
  for (const std::string& edited : {edited_value, std::string("{\"broken")}) {
    json::write_file(path, edited);
    testing::internal::CaptureStderr();
    const Checkpoint c = load_checkpoint(dir);
    const std::string err = testing::internal::GetCapturedStderr();
    EXPECT_NE(err.find("warning: " + path + " is not the model's config"), std::string::npos) << err;
    EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
    EXPECT_EQ(c.model->config.text.max_positions, m->config.text.max_positions);
  }
}

// Four base examples; the ones listed get NaN pixels, which makes the loss of any batch holding them NaN.
Dataset poisoned(const std::vector<int>& bad) {
  Dataset d;
  d.image_size = world().base.image_size;
  for (int i = 0; i < 4; ++i) d.examples.push_back(world().base.examples[i]);
  for (int i : bad) std::fill(d.examples[i].pixels.begin(), d.examples[i].pixels.end(), NAN);
  return d;
}

StageOptions guard_options(int64_t steps) {
  StageOptions o;
  o.stage = "base";
  o.steps = steps;
  o.batch = 1;
  o.warmup = 1;
  o.progress = false;
  o.max_bad_steps = 3;
  return o;
}

TEST(PsaTrain, NonFiniteStepIsSkippedAndTheRunGoesOn) {
  auto m = fresh_model();
  StageResult r = train_stage(*m, poisoned({2}), guard_options(4));  // one epoch: example 2 comes up once
  EXPECT_EQ(r.steps, 4);
  EXPECT_EQ(r.skipped, 1);
  ASSERT_EQ(r.loss.size(), 3u);
  for (double l : r.loss) EXPECT_TRUE(std::isfinite(l));
  for (double p : params_of(*m)) ASSERT_TRUE(std::isfinite(p)) << "a skipped step must not touch the weights";
}

TEST(PsaTrain, NonFiniteStepsInARowStopTheRunAndKeepTheLastGoodState) {
  std::string dir = world().dir + "/bad_steps";
  fs::create_directories(dir);
  StageOptions good = guard_options(8);
  good.state_path = dir + "/state.safetensors";
  good.stop_after = 2;
  auto m = fresh_model();
  train_stage(*m, poisoned({}), good);
  const std::string key = "xxh64.weights/multi_modal_projector.linear_1.weight";
  const st::File saved = st::File::open(good.state_path);
  const std::string before = saved.metadata().at(key);

  StageOptions rest = guard_options(8);
  rest.state_path = good.state_path;
  rest.state_every = 1;
  rest.resume_from = good.state_path;
  std::string err = test::error_of([&] { train_stage(*m, poisoned({0, 1, 2, 3}), rest); });
  EXPECT_NE(err.find("3 non-finite steps in a row (steps 3..5)"), std::string::npos) << err;
  EXPECT_NE(err.find("state.safetensors is intact"), std::string::npos) << err;
  st::File f = st::File::open(good.state_path);  // still whole: hashes verified on open
  EXPECT_EQ(f.metadata().at("step"), "2");
  EXPECT_EQ(f.metadata().at(key), before);
}

TEST(PsaTrain, StageOneLeavesEverythingButSafetyModulesBitIdentical) {
  auto m = fresh_model();
  std::map<std::string, std::string> before;
  for (auto& [n, t] : m->named_parameters()) before[n] = st::xxh64_hex(t.raw(), t.nbytes());
  StageOptions o;
  o.stage = "stage1";
  o.steps = 3;
  o.batch = 4;
  o.progress = false;
  train_stage(*m, world().safety, o);
  for (auto& [n, t] : m->named_parameters()) {
    bool changed = before[n] != st::xxh64_hex(t.raw(), t.nbytes());
    EXPECT_EQ(changed, is_safety(n)) << n;
  }
}

}  // namespace
}  // namespace psa
