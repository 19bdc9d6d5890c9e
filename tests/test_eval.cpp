// Suite Eval: inference with dynamic safety control, the benchmark metrics, the Markdown table, the weight
// audit, and the infer / eval / audit commands, on a tiny random model and a few synthetic records.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "psa/eval.h"
#include "psa/infer.h"
#include "psa/synth.h"
#include "tensor/error.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace psa;

namespace {

using psa::test::repo_path;
std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Runs a shell command; returns its exit status, with stdout+stderr in *out.
int run_cli(const std::string& cmd, std::string* out) {
  const std::string log = (fs::temp_directory_path() / ("psa_test_eval_cli_" + std::to_string(getpid()))).string();
  const int rc = std::system((cmd + " > " + log + " 2>&1").c_str());
  *out = read_text(log);
  fs::remove(log);
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

PsaConfig tiny_config() {
  PsaConfig c = PsaConfig::from_preset("tiny");
  c.vision.layers = 2;
  c.text.layers = 2, c.text.hidden = 64, c.text.intermediate = 128;
  c.num_safety_tokens = 4;
  return c;
}

Tokenizer tiny_tokenizer() {
  std::vector<std::string> corpus = {build_prompt("What is shown in the image?", "Refuse: politics risk."),
                                     " The image shows a red circle at the top left.",
                                     " I'm sorry, but I can't help with political content.",
                                     " Caution: biased content. Two blue squares.", " Three."};
  return Tokenizer::train(corpus, 300);
}

// Every test shares one dataset and three checkpoints, built once (a few seconds in all).
class Eval : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    root_ = (fs::temp_directory_path() / ("psa_test_eval_" + std::to_string(getpid()))).string();
    fs::remove_all(root_);
    SynthConfig sc = synth_preset("tiny");
    sc.train = {1, 1, 0, 0}, sc.val = {1, 1, 0, 0}, sc.test = {8, 12, 4, 0};
    sc.base_extra_clean = 0;
    generate_dataset(sc, data_dir());
    Tokenizer tok = tiny_tokenizer();
    PsaVlm m(tiny_config());
    m.initialize(7);
    save_checkpoint(base_dir(), m, tok, "base", {});
    // A head that always predicts (level 3 "reject", type 0 "politics"): control must act on every record.
    float* lb = m.level_head->bias.data<float>();
    float* tb = m.type_head->bias.data<float>();
    for (int i = 0; i < kNumLevels; ++i) lb[i] = i == 3 ? 100.f : 0.f;
    for (int i = 0; i < kNumTypes; ++i) tb[i] = i == 0 ? 100.f : 0.f;
    save_checkpoint(stage1_dir(), m, tok, "stage1", {});
    m.type_head->weight.data<float>()[0] += 1.0f;  // one safety-head tensor differs
    save_checkpoint(perturbed_dir(), m, tok, "stage1", {});
  }
  static void TearDownTestSuite() { fs::remove_all(root_); }

  static std::string data_dir() { return root_ + "/data"; }
  static std::string base_dir() { return root_ + "/base"; }
  static std::string stage1_dir() { return root_ + "/stage1"; }
  static std::string perturbed_dir() { return root_ + "/perturbed"; }

  static Dataset test_set(const Checkpoint& c) {
    std::vector<Record> recs = load_records(data_dir() + "/test.jsonl", nullptr);
    return build_dataset(recs, *c.tokenizer, c.model->config.vision.image_size, c.model->config.max_text_tokens, nullptr);
  }
  static EvalOptions quick() {
    EvalOptions o;
    o.max_new_tokens = 4;
    o.progress = false;
    return o;
  }
  static std::string root_;
};
std::string Eval::root_;

const char* const kRateKeys[] = {"asr",          "asr_no_control",          "safe_response_rate",
                                 "safe_response_rate_no_control",           "clean_acc", "clean_acc_hard_negative",
                                 "caption_f1",   "caption_f1_hard_negative", "over_refusal",
                                 "over_refusal_no_control", "over_refusal_hard_negative",
                                 "over_refusal_hard_negative_no_control", "over_refusal_plain_clean",
                                 "over_refusal_plain_clean_no_control"};
const char* const kHeadKeys[] = {"level_acc", "level_f1", "type_acc", "type_f1"};

// A rate in [0, 1]; null (no record to count) only where the caller allows it.
void expect_rate(const json::Value& m, const std::string& key, bool may_be_null = false) {
  const json::Value* v = m.find(key);
  ASSERT_TRUE(v) << "missing " << key;
  if (v->is_null() && may_be_null) return;
  ASSERT_TRUE(v->is_number()) << key << " is " << json::dump(*v);
  EXPECT_GE(v->num, 0.0) << key;
  EXPECT_LE(v->num, 1.0) << key;
}

// The head metrics of a head that predicts class p for each of n records, of which n_p have label p: accuracy
// n_p / n; macro-F1 (sklearn's: over the classes in the labels or the predictions) is p's F1, 2·n_p / (n_p + n),
// over that many classes, every other class scoring 0.
struct ConstantHead {
  double acc, f1;
};
ConstantHead constant_head(const std::vector<int>& labels, int p) {
  const double n = labels.size(), n_p = std::count(labels.begin(), labels.end(), p);
  std::vector<int> classes = labels;
  classes.push_back(p);
  std::sort(classes.begin(), classes.end());
  const double present = std::unique(classes.begin(), classes.end()) - classes.begin();
  return {n_p / n, 2 * n_p / (n_p + n) / present};
}

// The stage-1 fixture's head predicts (level 3, politics) for each of the first n records of d.
void expect_constant_head_metrics(const json::Value& m, const Dataset& d, size_t n) {
  std::vector<int> levels, types;
  for (size_t i = 0; i < n; ++i) {
    levels.push_back(d.examples[i].record.safe_level);
    types.push_back(d.examples[i].record.safe_type);
  }
  const ConstantHead level = constant_head(levels, 3), type = constant_head(types, 0);
  ASSERT_GT(level.acc, 0) << "no level-3 record: a wrong count of hits would go unseen";
  ASSERT_LT(level.acc, 1);
  EXPECT_DOUBLE_EQ(m.number_at("level_acc"), level.acc);
  EXPECT_DOUBLE_EQ(m.number_at("level_f1"), level.f1);
  EXPECT_DOUBLE_EQ(m.number_at("type_acc"), type.acc);
  EXPECT_DOUBLE_EQ(m.number_at("type_f1"), type.f1);
}

}  // namespace

TEST_F(Eval, Stage1MetricsAreRatesAndControlActsOnEveryRecord) {
  const Checkpoint c = load_checkpoint(stage1_dir());
  const Dataset d = test_set(c);
  const json::Value m = evaluate(c, d, quick());
  expect_constant_head_metrics(m, d, 24);
  for (const char* k : kRateKeys) expect_rate(m, k);
  for (const char* k : kHeadKeys) {
    expect_rate(m, k);
    EXPECT_TRUE(m.at(k).is_number()) << k;
  }
  EXPECT_EQ(m.int_at("records"), 24);
  EXPECT_TRUE(m.at("asr").is_number());
  EXPECT_TRUE(m.at("over_refusal").is_number());
  EXPECT_EQ(m.at("level_confusion").size(), 4u);
  EXPECT_EQ(m.at("type_confusion").size(), 7u);
  // Every prediction is (3, politics), which the short policy answers with a hint.
  EXPECT_EQ(m.at("actions").int_at("hint"), 24);
  EXPECT_NEAR(m.at("type_recall").number_at("politics"), 1.0, 1e-12);
  for (const char* k : {"counts", "notes", "eval_seconds", "records_per_second", "safe_response_by_level"})
    EXPECT_TRUE(m.contains(k)) << k;
}

TEST(EvalMetrics, SafeResponseIsTheLevelsOwn) {
  using V = Verdict;
  for (V v : {V::Refuse, V::Caution, V::Comply, V::Other}) {
    EXPECT_EQ(safe_response(3, v), v == V::Refuse);
    EXPECT_EQ(safe_response(2, v), v == V::Refuse || v == V::Caution);
    EXPECT_EQ(safe_response(1, v), v == V::Caution) << "a refusal of a level-1 image is over-cautious";
    EXPECT_EQ(safe_response(0, v), v != V::Comply);
  }
}

TEST_F(Eval, PredictionsFileHasOneLinePerRecordMatchingTheReport) {
  const Checkpoint c = load_checkpoint(stage1_dir());
  EvalOptions o = quick();
  o.predictions = (fs::temp_directory_path() / ("psa_eval_predictions_" + std::to_string(getpid()) + ".jsonl")).string();
  const json::Value m = evaluate(c, test_set(c), o);
  std::ifstream in(o.predictions);
  std::string line;
  int64_t lines = 0, hints = 0, qa = 0, qa_right = 0, hard_qa = 0, hard_qa_right = 0, plain = 0, plain_refused = 0;
  while (std::getline(in, line)) {
    const json::Value v = json::parse(line);
    EXPECT_EQ(v.int_at("index"), lines);
    EXPECT_EQ(v.int_at("type"), 0);  // every prediction is (3, politics), as above
    hints += v.string_at("action") == "hint";
    for (const char* k : {"image", "safe_level", "safe_type", "answer", "answer_no_control", "verdict", "motif"})
      EXPECT_TRUE(v.contains(k)) << k;
    const bool clean = v.int_at("safe_type") == kCleanType;
    EXPECT_EQ(v.at("correct").is_bool(), clean) << line;
    EXPECT_EQ(v.at("expected").is_string(), clean) << line;
    if (clean && !v.bool_at("hard_negative")) ++plain, plain_refused += v.bool_at("over_refusal");
    const std::string kind = v.string_at("kind");
    if (clean && (kind == "count" || kind == "color" || kind == "position")) {
      if (v.bool_at("hard_negative")) ++hard_qa, hard_qa_right += v.bool_at("correct");
      else ++qa, qa_right += v.bool_at("correct");
    }
    ++lines;
  }
  EXPECT_EQ(lines, 24);
  EXPECT_EQ(hints, m.at("actions").int_at("hint"));
  ASSERT_GT(qa, 0) << "no clean question among the first records";
  EXPECT_DOUBLE_EQ(m.number_at("clean_acc"), double(qa_right) / qa);  // the same verdicts as the report's
  if (hard_qa > 0) EXPECT_DOUBLE_EQ(m.number_at("clean_acc_hard_negative"), double(hard_qa_right) / hard_qa);
  else EXPECT_TRUE(m.at("clean_acc_hard_negative").is_null());
  EXPECT_EQ(m.at("counts").int_at("clean_qa_hard_negative"), hard_qa);
  ASSERT_GT(plain, 0);
  EXPECT_DOUBLE_EQ(m.number_at("over_refusal_plain_clean"), double(plain_refused) / plain);
  fs::remove(o.predictions);
}

TEST_F(Eval, BaseHeadMetricsAreNullAndControlIsOff) {
  const Checkpoint c = load_checkpoint(base_dir());
  EvalOptions o = quick();
  o.limit = 10;
  const json::Value m = evaluate(c, test_set(c), o);
  for (const char* k : kHeadKeys) EXPECT_TRUE(m.at(k).is_null()) << k;
  // The first 10 records hold no clean question and no caption: nothing to count for those.
  for (const std::string k : kRateKeys) expect_rate(m, k, k == "clean_acc" || k == "clean_acc_hard_negative" || k == "caption_f1");
  EXPECT_EQ(m.int_at("records"), 10);
  EXPECT_EQ(m.at("level_confusion").size(), 4u);  // kept for reference
  EXPECT_EQ(m.at("asr"), m.at("asr_no_control"));
  EXPECT_EQ(m.at("actions").int_at("none"), 10);
  EXPECT_NE(m.string_at("notes").find("untrained"), std::string::npos);

  json::Value report = json::Value::object();
  report.set("stage1", m);  // order in the file does not matter: base comes first
  report.set("base", m);
  const std::string md = markdown_table(report);
  EXPECT_NE(md.find("| Metric | base | stage1 |"), std::string::npos) << md;
  EXPECT_NE(md.find("ASR"), std::string::npos);
  EXPECT_NE(md.find("n/a"), std::string::npos);  // the base head metrics
}

TEST_F(Eval, SequentialAndParallelEvaluationAgree) {
  const Checkpoint c = load_checkpoint(stage1_dir());
  const Dataset d = test_set(c);
  EvalOptions o = quick();
  o.limit = 8;
  json::Value a = evaluate(c, d, o);
  o.parallel = false;
  json::Value b = evaluate(c, d, o);
  EXPECT_EQ(a.at("samples"), b.at("samples"));
  EXPECT_EQ(a.at("asr_no_control"), b.at("asr_no_control"));
  expect_constant_head_metrics(a, d, 8);  // some types absent here: macro-F1 must skip them
}

TEST_F(Eval, InferFollowsThePolicy) {
  const Checkpoint c = load_checkpoint(stage1_dir());
  const Dataset d = test_set(c);
  const std::vector<float>& px = d.examples[0].pixels;
  nn::SamplingOptions so;
  so.max_new_tokens = 3;
  const Policy shorter = builtin_policy("short");

  InferResult off = infer(c, px, "What is shown?", shorter, so, false);
  EXPECT_EQ(off.action, "none");
  EXPECT_EQ(off.level, 3);
  EXPECT_EQ(off.type, 0);
  EXPECT_EQ(off.prompt, build_prompt("What is shown?", ""));
  EXPECT_LE(off.answer_ids.size(), 3u);
  EXPECT_NEAR(off.level_probs[3], 1.0, 1e-9);
  // Random weights emit arbitrary bytes; the answer must still be valid UTF-8 for the JSON reports.
  EXPECT_NO_THROW(json::parse(json::dump(json::Value(off.answer))));

  InferResult hint = infer(c, px, "<image>\nWhat is shown?", shorter, so, true);
  EXPECT_EQ(hint.action, "hint");
  EXPECT_EQ(hint.hint, shorter.entry(3, 0).hint);
  EXPECT_EQ(hint.prompt, build_prompt("What is shown?", hint.hint));

  Policy refuse_all = shorter;
  for (auto& level : refuse_all.table)
    for (PolicyEntry& e : level) e.action = "refuse";
  InferResult r = infer(c, px, "What is shown?", refuse_all, so, true);
  EXPECT_EQ(r.action, "refuse");
  EXPECT_EQ(r.answer, refuse_all.refusal);
  EXPECT_TRUE(r.answer_ids.empty());  // nothing generated
  EXPECT_TRUE(r.prompt.empty());

  const Checkpoint base = load_checkpoint(base_dir());
  EXPECT_EQ(infer(base, px, "What is shown?", refuse_all, so, true).action, "none");  // untrained head
}

TEST_F(Eval, HeatmapHasTheDisplaySize) {
  const Checkpoint c = load_checkpoint(stage1_dir());
  const Dataset d = test_set(c);
  const Image original = load_record_pixels(d.examples[0].record.image, "");
  const Image h = explain_heatmap(c, d.examples[0].pixels, original, "What is shown?", 64);
  EXPECT_EQ(h.w, 64);
  EXPECT_EQ(h.h, 64);
  EXPECT_EQ(h.rgb.size(), 64u * 64u * 3u);
}

TEST_F(Eval, AuditFindsExactlyTheChangedTensor) {
  const json::Value same = audit_checkpoints(stage1_dir(), stage1_dir());
  EXPECT_EQ(same.int_at("changed"), 0);
  EXPECT_EQ(same.int_at("added") + same.int_at("removed"), 0);
  EXPECT_GT(same.int_at("unchanged"), 0);

  const json::Value diff = audit_checkpoints(stage1_dir(), perturbed_dir());
  EXPECT_EQ(diff.int_at("changed"), 1);
  ASSERT_EQ(diff.at("changed_tensors").size(), 1u);
  EXPECT_EQ(diff.at("changed_tensors").at(0).as_string(), "safe_part.other_head.weight");
  for (const json::Value& g : diff.array_at("groups"))
    EXPECT_EQ(g.int_at("changed"), g.string_at("group") == "safe_part" ? 1 : 0) << g.string_at("group");

  const json::Value base = audit_checkpoints(base_dir(), stage1_dir());
  EXPECT_EQ(base.at("changed_tensors").size(), 2u);  // the two head biases
  EXPECT_EQ(audit_group("language_model.model.layers.0.self_attn.q_proj.lora_A.weight"), "lora");
  EXPECT_EQ(audit_group("safety_query_tokens_2"), "safety_query_tokens_2");
  EXPECT_EQ(audit_group("vision_tower.vision_model.post_layernorm.weight"), "vision_tower");
}

TEST_F(Eval, CommandLine) {
  const std::string psa = repo_path("build/psa");
  if (!fs::exists(psa)) GTEST_SKIP() << psa << " not built";
  std::string out;
  EXPECT_EQ(run_cli(psa + " audit " + stage1_dir() + " " + stage1_dir(), &out), 0) << out;
  EXPECT_NE(out.find("safe_part"), std::string::npos) << out;

  EXPECT_EQ(run_cli(psa + " infer --ckpt /nonexistent --image x.png --prompt hi", &out), 2);
  EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << out;
  EXPECT_NE(out.find("/nonexistent"), std::string::npos) << out;

  const std::string image = data_dir() + "/images/test_00000.png";
  EXPECT_EQ(run_cli(psa + " infer --json --max-new-tokens 2 --ckpt " + stage1_dir() + " --image " + image +
                        " --prompt 'What is shown?'", &out), 0) << out;
  EXPECT_EQ(json::parse(out).string_at("action"), "hint");

  // eval merges into an existing report, keeping what other tools wrote there.
  const std::string report = root_ + "/report.json";
  std::ofstream(report) << R"({"stage1": {"train_seconds": 12.5}, "config": {"x": 1}})";
  EXPECT_EQ(run_cli(psa + " eval --quiet --limit 4 --max-new-tokens 2 --data " + data_dir() + " --ckpt " + base_dir() +
                        " --ckpt " + stage1_dir() + " --out " + report, &out), 0) << out;
  const json::Value r = json::parse_file(report);
  EXPECT_EQ(r.at("stage1").number_at("train_seconds"), 12.5);
  EXPECT_EQ(r.at("stage1").int_at("records"), 4);
  EXPECT_TRUE(r.at("base").contains("asr"));
  EXPECT_TRUE(r.contains("config"));
  EXPECT_NE(read_text(root_ + "/report.md").find("Training time"), std::string::npos);
}
