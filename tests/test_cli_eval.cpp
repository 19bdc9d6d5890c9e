// `psa eval` and `psa infer` when something is off: output paths that collide with each other, with inputs or
// with a checkpoint; output folders that cannot be written (found before any model is loaded); numeric options
// out of range; unknown policies; prompts and policy hints too long for the model; invalid --prompt text; an
// --explain path that would overwrite the input or has the wrong extension; a checkpoint with NaN weights. Also
// the image reader's top-down BMPs, extreme aspect ratios and pixel-count limit. Bad input: one line on stderr,
// exit status 2, nothing overwritten. Runs $PSA_BIN (default ./build/psa) on a 1%-scale tiny dataset and a
// 2-step run (about a second to make); each eval here is limited to a few records.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>

#include "nn/json.h"
#include "psa/checkpoint.h"
#include "psa/eval.h"
#include "psa/image.h"
#include "psa/infer.h"
#include "psa/policy.h"
#include "psa/records.h"
#include "tests/test_util.h"
#include "tests/cli_util.h"

namespace {
namespace fs = std::filesystem;
using psa::test::error_of;

using psa::test::expect_one_line_error;
using psa::test::run_psa;
using psa::test::slurp;
using Result = psa::test::CliResult;
const char* const kPsa = psa::test::psa_binary();

void spit(const fs::path& path, const std::string& bytes) { std::ofstream(path, std::ios::binary) << bytes; }

// A policy file: the built-in short table with every hint replaced by `hint`.
void write_policy(const fs::path& path, const std::string& hint) {
  psa::Policy p = psa::builtin_policy("short");
  for (auto& level : p.table)
    for (auto& e : level) e.hint = hint;
  psa::json::write_file(path.string(), psa::json::dump(psa::policy_to_json(p), 2));
}

std::string words(int n) {
  std::string s;
  for (int i = 0; i < n; ++i) s += i ? " careful" : "careful";
  return s;
}

class EvalCli : public ::testing::Test {
 protected:
  static fs::path root_;
  static std::string data_, run_, ckpt_, image_;
  static void SetUpTestSuite() {
    root_ = fs::temp_directory_path() / ("psa_cli_eval_test_" + std::to_string(::getpid()));
    data_ = (root_ / "data").string();
    run_ = (root_ / "run").string();
    ckpt_ = run_ + "/stage2";
    fs::create_directories(root_);
    if (!fs::exists(kPsa)) return;
    run_psa({"data", "--preset", "tiny", "--scale", "0.01", "--out", data_});
    run_psa({"train", "--data", data_, "--out", run_, "--steps-vision", "0", "--steps-base", "2", "--steps-1", "2",
             "--steps-2", "2", "--batch", "2", "--no-eval", "--quiet"});
    image_ = (root_ / "victim.png").string();
    psa::save_png(image_, psa::Image(40, 30, 90));
  }
  static void TearDownTestSuite() { fs::remove_all(root_); }
  void SetUp() override {
    if (!fs::exists(kPsa)) GTEST_SKIP() << kPsa << " not built (make all)";
    ASSERT_TRUE(fs::exists(ckpt_ + "/model.safetensors")) << "the fixture run failed";
  }
  // eval on two records with two-token answers (well under a second); `extra` is appended.
  static Result eval(const std::vector<std::string>& extra) {
    std::vector<std::string> args{"eval", "--data", data_, "--ckpt", ckpt_, "--limit", "2", "--max-new-tokens", "2",
                                  "--quiet"};
    args.insert(args.end(), extra.begin(), extra.end());
    return run_psa(args);
  }
  static Result infer(const std::vector<std::string>& extra) {
    std::vector<std::string> args{"infer", "--ckpt", ckpt_, "--image", image_, "--max-new-tokens", "2"};
    args.insert(args.end(), extra.begin(), extra.end());
    return run_psa(args);
  }
  static fs::path dir(const std::string& name) {
    const fs::path d = root_ / name;
    fs::remove_all(d);
    fs::create_directories(d);
    return d;
  }
};
fs::path EvalCli::root_;
std::string EvalCli::data_, EvalCli::run_, EvalCli::ckpt_, EvalCli::image_;

// ---- problem 1: output paths that collide ----

TEST_F(EvalCli, OutputsCarryTheirOwnExtension) {
  const fs::path d = dir("extensions");
  Result r = eval({"--out", (d / "r.json").string()});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_TRUE(fs::exists(d / "r.md")) << "the default Markdown path is the report's with .md";
  // Another run's weights or records are not a report: without the extension check they were replaced.
  const std::string weights = (d / "model.safetensors").string();
  spit(weights, "weights");
  expect_one_line_error(eval({"--out", weights}), "expected a .json file");
  expect_one_line_error(eval({"--out", (d / "r.md").string()}), "expected a .json file");
  expect_one_line_error(eval({"--out", (d / "r.json").string(), "--md", (d / "r.json2").string()}),
                        "expected a .md file");
  EXPECT_EQ(slurp(weights), "weights");
  EXPECT_FALSE(fs::exists(d / "r.json2"));
}

TEST_F(EvalCli, MarkdownEqualToTheReportIsRefused) {
  const fs::path d = dir("md_same");
  const std::string out = (d / "a.json").string();
  spit(out, "{}\n");
  expect_one_line_error(eval({"--out", out, "--md", out}), "--md");
  fs::create_symlink(out, d / "b.md");  // a .md name that is the report itself
  expect_one_line_error(eval({"--out", out, "--md", (d / "b.md").string()}), "same file as --out");
  EXPECT_EQ(slurp(out), "{}\n");
}

TEST_F(EvalCli, OutputsInsideACheckpointOrOverAnInputAreRefused) {
  const std::string weights = ckpt_ + "/model.safetensors", before = slurp(weights);
  expect_one_line_error(eval({"--md", weights}), "expected a .md file");
  expect_one_line_error(eval({"--md", ckpt_ + "/report.md"}), "inside the checkpoint folder");
  expect_one_line_error(eval({"--out", ckpt_ + "/report.json"}), "inside the checkpoint folder");
  expect_one_line_error(eval({"--predictions", ckpt_}), "inside the checkpoint folder");
  EXPECT_EQ(slurp(weights), before);
  EXPECT_FALSE(fs::exists(ckpt_ + "/report.json"));
  const std::string split = data_ + "/test.jsonl", records = slurp(split);
  expect_one_line_error(eval({"--out", root_.string() + "/x.json", "--md", data_ + "/dataset.md"}),
                        "inside the dataset folder");
  expect_one_line_error(eval({"--out", data_ + "/dataset.json"}), "inside the dataset folder");
  expect_one_line_error(eval({"--predictions", data_ + "/images"}), "inside the dataset folder");
  EXPECT_EQ(slurp(split), records);
  EXPECT_FALSE(fs::exists(data_ + "/dataset.md"));
}

// A report merged into another tool's JSON destroyed it (a checkpoint's tokenizer.json, not given with --ckpt);
// a --split with folders escaped --data; a name too long for the temp file failed only after the benchmark.
TEST_F(EvalCli, OutputsThatAreNotReportsOrDoNotFitAreRefused) {
  const fs::path d = dir("not_reports");
  fs::create_directories(d / "other_ckpt");
  std::ofstream((d / "other_ckpt" / "model.safetensors").string()) << "x";
  std::ofstream((d / "other_ckpt" / "config.json").string()) << "{}";
  expect_one_line_error(eval({"--out", (d / "other_ckpt" / "tokenizer.json").string()}), "inside the checkpoint folder");
  expect_one_line_error(eval({"--out", (d / "other_ckpt" / "sub" / "r.json").string()}), "inside the checkpoint folder");
  expect_one_line_error(eval({"--out", (d / "r.json").string(), "--predictions", (d / "other_ckpt" / "p").string()}),
                        "inside the checkpoint folder");
  EXPECT_FALSE(fs::exists(d / "other_ckpt" / "sub"));
  spit(d / "tool.json", "{\"version\": \"1.0\", \"model\": {}}");
  expect_one_line_error(eval({"--out", (d / "tool.json").string()}), "not a psa report (key 'version' holds string");
  EXPECT_EQ(slurp(d / "tool.json"), "{\"version\": \"1.0\", \"model\": {}}");
  EXPECT_FALSE(fs::exists(d / "tool.md"));
  expect_one_line_error(eval({"--split", "../data/test"}), "--split: expected the name of a records file");
  const std::string long_name = (d / (std::string(245, 'r') + ".json")).string();
  expect_one_line_error(eval({"--out", long_name}), "cannot create a temp file beside it: File name too long");
}

// The table's path is derived from --out (README.json -> README.md) or given: a Markdown file that is not a psa
// table was replaced by one. A table eval wrote is replaced, as a rerun should.
TEST_F(EvalCli, MarkdownThatIsNotAPsaTableIsNotReplaced) {
  const fs::path d = dir("not_tables");
  spit(d / "README.md", "# My project\n");
  expect_one_line_error(eval({"--out", (d / "README.json").string()}), "README.md: not a psa benchmark table");
  EXPECT_EQ(slurp(d / "README.md"), "# My project\n");
  EXPECT_FALSE(fs::exists(d / "README.json"));
  expect_one_line_error(eval({"--out", (d / "r.json").string(), "--md", (d / "README.md").string()}),
                        "not a psa benchmark table");
  ASSERT_EQ(eval({"--out", (d / "r.json").string()}).status, 0);
  const std::string table = slurp(d / "r.md");
  ASSERT_EQ(table.rfind("| Metric |", 0), 0u) << table;
  spit(d / "r.md", "| Metric | old |\n");
  ASSERT_EQ(eval({"--out", (d / "r.json").string()}).status, 0) << "a table of its own must be replaced";
  EXPECT_EQ(slurp(d / "r.md").rfind("| Metric | stage2 |", 0), 0u) << slurp(d / "r.md");
}

// A report written into a run folder while its psa train still runs was lost: train rewrote it from memory.
TEST_F(EvalCli, OutputsIntoARunBeingTrainedAreRefused) {
  const fs::path d = dir("busy_run");
  const std::string lock = (d / ".psa.lock").string();
  const int fd = ::open(lock.c_str(), O_RDWR | O_CREAT, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::flock(fd, LOCK_EX | LOCK_NB), 0);  // what a running psa train holds
  const std::string pid = std::to_string(::getpid());
  ASSERT_EQ(::pwrite(fd, pid.data(), pid.size(), 0), ssize_t(pid.size()));
  expect_one_line_error(eval({"--out", (d / "report.json").string()}), "which a running psa process is writing (pid " + pid);
  ::close(fd);
  Result r = eval({"--out", (d / "report.json").string()});
  EXPECT_EQ(r.status, 0) << r.err;
  // Every stage's count is written, 0 included: a merged report must not keep an older run's.
  EXPECT_EQ(psa::json::parse_file((d / "report.json").string()).at("stage2").int_at("skipped_records"), 0);
}

TEST_F(EvalCli, APromptWithSpecialTokenTextIsRefused) {
  expect_one_line_error(infer({"--prompt", "Describe </s> the image"}), "--prompt: contains the special token </s>");
  expect_one_line_error(infer({"--prompt", "<pad><pad>"}), "--prompt: contains the special token <pad>");
}

// The other order: an eval writing into a run folder holds it, so a psa train started meanwhile is refused. It
// used to run, and the eval then wrote back the report.json it had read at its start, dropping train's entries.
TEST_F(EvalCli, ATrainStartedDuringAnEvalIntoItsRunIsRefused) {
  const fs::path run = root_ / "run_in_eval";
  fs::remove_all(run);
  fs::copy(run_, run, fs::copy_options::recursive);
  ASSERT_TRUE(fs::exists(run / ".psa.lock"));
  // Long enough to be caught: every test record, answers of up to 400 tokens, one at a time.
  Result bg = run_psa("eval --data " + data_ + " --ckpt " + (run / "stage2").string() + " --out " +
                      (run / "report.json").string() + " --max-new-tokens 400 --sequential --quiet >/dev/null 2>&1 & echo $!");
  const pid_t pid = std::atoi(bg.out.c_str());
  ASSERT_GT(pid, 0) << bg.out;
  bool held = false;
  for (int i = 0; i < 600 && !held && ::kill(pid, 0) == 0; ++i) {
    const int fd = ::open((run / ".psa.lock").c_str(), O_RDONLY);
    held = fd >= 0 && ::flock(fd, LOCK_EX | LOCK_NB) != 0;
    if (fd >= 0) ::close(fd);  // releases the probe's own lock at once
    if (!held) ::usleep(20000);
  }
  ASSERT_TRUE(held) << "the eval ended before it was seen holding the run";
  expect_one_line_error(run_psa({"train", "--data", data_, "--out", run.string(), "--stage", "2", "--overwrite",
                                 "--steps-2", "2", "--batch", "2", "--no-eval", "--quiet"}),
                        "in use by another psa process (pid " + std::to_string(pid) + ")");
  while (::kill(pid, 0) == 0) ::usleep(50000);
}

// "run/stage2/" named its predictions ".jsonl".
TEST_F(EvalCli, PredictionFilesTakeTheFolderNameAlsoWithATrailingSlash) {
  const fs::path d = dir("pred_names");
  Result r = eval({"--ckpt", ckpt_ + "/", "--predictions", d.string(), "--out", (d / "r.json").string()});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_TRUE(fs::exists(d / (fs::path(ckpt_).filename().string() + ".jsonl"))) << r.out;
  EXPECT_FALSE(fs::exists(d / ".jsonl"));
}

TEST_F(EvalCli, PredictionFileEqualToTheReportIsRefused) {
  const fs::path d = dir("pred_same");
  spit(d / "stage2.jsonl", "");
  fs::create_symlink(d / "stage2.jsonl", d / "r.json");  // a .json name that is the prediction file
  expect_one_line_error(eval({"--predictions", d.string(), "--out", (d / "r.json").string()}), "same file");
}

// A file of that name that is not a predictions file (another dataset's records, here also through a symbolic
// link) is left as it is; a predictions file from an earlier run is replaced.
TEST_F(EvalCli, PredictionsNeverReplaceAnotherFile) {
  const fs::path d = dir("pred_other"), links = dir("pred_links");
  const std::string name = fs::path(ckpt_).filename().string() + ".jsonl";
  const std::string records = "{\"image\":\"a.png\",\"conversations\":[]}\n";
  spit(d / name, records);
  expect_one_line_error(eval({"--predictions", d.string(), "--out", (d / "r.json").string()}),
                        "not a psa predictions file");
  EXPECT_EQ(slurp(d / name), records);
  fs::create_symlink(fs::absolute(d / name), links / name);
  expect_one_line_error(eval({"--predictions", links.string(), "--out", (links / "r.json").string()}),
                        "not a psa predictions file");
  EXPECT_EQ(slurp(d / name), records);
  const fs::path ok = dir("pred_rerun");
  for (int run = 0; run < 2; ++run) {
    Result r = eval({"--predictions", ok.string(), "--out", (ok / "r.json").string()});
    ASSERT_EQ(r.status, 0) << "run " << run << ": " << r.err;
  }
}

// ---- problem 2: unwritable outputs found before the benchmark runs ----

TEST_F(EvalCli, UnwritableOutputFolderFailsBeforeAnythingIsWritten) {
  const fs::path d = dir("unwritable");
  spit(d / "file", "x");
  const std::string out = (d / "r.json").string();
  Result r = eval({"--out", out, "--md", (d / "file" / "sub" / "r.md").string()});
  expect_one_line_error(r, "--md");
  EXPECT_NE(r.err.find("cannot create the folder"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(out)) << "the report was written although the Markdown table could not be";
  expect_one_line_error(eval({"--out", "/proc/psa_cli_eval_test/r.json"}), "--out");
}

TEST_F(EvalCli, BadPredictionsFolderIsOneClearLine) {
  const fs::path d = dir("pred_bad");
  spit(d / "file", "x");
  expect_one_line_error(eval({"--predictions", ""}), "--predictions: expected a path");
  expect_one_line_error(eval({"--predictions", (d / "file").string()}), "not a folder");
  expect_one_line_error(eval({"--out", (d / "r.json").string(), "--predictions", (d / "file" / "sub").string()}),
                        "--predictions");
  EXPECT_FALSE(fs::exists(d / "r.json"));
}

// ---- problems 3 and 4: options checked up front (a missing checkpoint shows nothing was loaded first) ----

TEST_F(EvalCli, NumericOptionsAreCheckedBeforeTheCheckpoint) {
  for (const auto& [flag, value] : std::vector<std::pair<std::string, std::string>>{
           {"--batch", "0"}, {"--max-new-tokens", "0"}, {"--limit", "-1"}, {"--batch", "x"}, {"--batch", "100000"}})
    expect_one_line_error(run_psa({"eval", "--data", data_, "--ckpt", "no/such/ckpt", flag, value}), flag);
  expect_one_line_error(run_psa({"eval", "--data", data_, "--ckpt", "no/such/ckpt"}), "no/such/ckpt");
  expect_one_line_error(run_psa({"eval", "--data", data_, "--ckpt", ckpt_, "--ckpt", ""}), "--ckpt");
}

TEST_F(EvalCli, UnknownPolicyNamesTheChoices) {
  Result r = eval({"--policy", "bogus"});
  expect_one_line_error(r, "bogus");
  EXPECT_NE(r.err.find("short, reference"), std::string::npos) << r.err;
  expect_one_line_error(infer({"--prompt", "What is it?", "--policy", "bogus"}), "short, reference");
}

// ---- problem 5: prompts and hints too long for the model ----

TEST_F(EvalCli, PolicyHintThatCanNeverFitIsRefusedNamingIt) {
  const fs::path d = dir("long_hint");
  const std::string policy = (d / "long.json").string();
  write_policy(policy, words(700));
  Result r = eval({"--policy", policy, "--out", (d / "r.json").string()});
  expect_one_line_error(r, "policy file " + policy + ": level 1");
  EXPECT_NE(r.err.find("max_position_embeddings"), std::string::npos) << r.err;
  expect_one_line_error(infer({"--prompt", "What is it?", "--policy", policy}), "policy file " + policy);
  // Control off never uses a hint.
  EXPECT_EQ(infer({"--prompt", "What is it?", "--policy", policy, "--no-control"}).status, 0);
}

TEST_F(EvalCli, TooLongPromptNamesThePromptOption) {
  expect_one_line_error(infer({"--prompt", words(700)}), "--prompt: the prompt needs");
}

// Training's text budget (max_text_tokens, 96 in tiny) is not eval's: a long question that fits the model's
// positions is asked, as infer asks it, not skipped.
TEST_F(EvalCli, AQuestionPastTheTrainingBudgetIsStillEvaluated) {
  std::ifstream in(data_ + "/test.jsonl");
  std::string line;
  std::getline(in, line);
  const std::string image = psa::json::parse(line, "record").string_at("image");
  std::string question;
  for (int i = 0; i < 20; ++i) question += "What color is the circle? ";
  psa::json::Value rec = psa::json::parse(R"({"safe_level": 0, "safe_type": 6, "conversations": [
      {"from": "USER", "value": ""}, {"from": "ASSISTANT", "value": "Red."}]})", "record");
  rec.set("image", psa::json::Value(image));
  rec.obj[2].second.arr[0].set("value", psa::json::Value("<image>\n" + question));
  spit(fs::path(data_) / "long_question.jsonl", psa::json::dump(rec) + "\n");
  const fs::path d = dir("long_question");
  Result r = eval({"--split", "long_question", "--out", (d / "r.json").string()});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.err.find("leaves no room"), std::string::npos) << r.err;
  const psa::json::Value report = psa::json::parse_file((d / "r.json").string());
  EXPECT_EQ(report.at("stage2").at("skipped_records").as_int(), 0) << psa::json::dump(report);
  fs::remove(fs::path(data_) / "long_question.jsonl");
}

// Records whose prompt with the hint picked for them cannot fit are skipped and counted, the rest evaluated.
TEST_F(EvalCli, RecordsTooLongWithTheirHintAreSkippedAndCounted) {
  const psa::Checkpoint c = psa::load_checkpoint(ckpt_);
  c.model->eval();
  const std::vector<psa::Record> records = psa::load_records(data_ + "/test.jsonl", nullptr, true);
  const psa::Dataset d = psa::build_dataset(records, *c.tokenizer, c.model->config.vision.image_size,
                                            c.model->config.max_text_tokens, nullptr);
  const int64_t n = std::min<int64_t>(12, d.size()), limit = c.model->config.text.max_positions;
  std::vector<const std::vector<float>*> px;
  std::vector<std::string> qs;
  for (int64_t i = 0; i < n; ++i) {
    px.push_back(&d.examples[i].pixels);
    qs.push_back(psa::split_hint(d.examples[i].record.question).first);
  }
  // Every entry hints (the untrained head predicts a risk for most records); the hint is the longest that still
  // fits with the shortest of those questions, so longer questions push their prompts past the limit.
  const std::vector<psa::HeadPrediction> heads = psa::classify_images(c, px, qs);
  auto hinted = [&](int64_t i) { return heads[i].level != 0 && heads[i].type != psa::kCleanType; };
  std::string shortest;
  for (int64_t i = 0; i < n; ++i)
    if (hinted(i) && (shortest.empty() || psa::prompt_positions(c, qs[i], "") < psa::prompt_positions(c, shortest, "")))
      shortest = qs[i];
  std::string hint = "careful";
  for (int k = 2; psa::prompt_positions(c, shortest, words(k)) <= limit; ++k) hint = words(k);
  int64_t expected = 0;
  for (int64_t i = 0; i < n; ++i) expected += hinted(i) && psa::prompt_positions(c, qs[i], hint) > limit;
  const std::string policy = (dir("tight_hint") / "tight.json").string();
  write_policy(policy, hint);
  psa::EvalOptions opt;
  opt.policy = policy;
  opt.max_new_tokens = 2;
  opt.limit = n;
  opt.progress = false;
  psa::LoadReport skipped;
  const psa::json::Value m = psa::evaluate(c, d, opt, &skipped);
  EXPECT_GT(expected, 0) << "the fixture exercises no skip";
  EXPECT_EQ(skipped.skipped, expected);
  EXPECT_EQ(m.int_at("records"), n - expected);
  ASSERT_EQ(skipped.messages.size(), size_t(expected));
  if (expected) {
    EXPECT_NE(skipped.messages[0].find("policy file " + policy + "'s level"), std::string::npos) << skipped.messages[0];
    EXPECT_NE(skipped.messages[0].find(data_), std::string::npos) << "names the record: " << skipped.messages[0];
    EXPECT_NE(skipped.messages[0].find("max_position_embeddings"), std::string::npos) << skipped.messages[0];
  }
}

// ---- problem 6: --explain ----

TEST_F(EvalCli, ExplainRefusesTheInputImageAndOtherFormats) {
  const std::string before = slurp(image_);
  expect_one_line_error(infer({"--prompt", "What is it?", "--explain", image_}), "same file as the input image");
  EXPECT_EQ(slurp(image_), before);
  const fs::path d = dir("explain");
  spit(d / "file", "x");
  expect_one_line_error(infer({"--prompt", "What is it?", "--explain", (d / "heat.jpg").string()}), ".png");
  expect_one_line_error(infer({"--prompt", "What is it?", "--explain", ckpt_ + "/heat.png"}),
                        "inside the checkpoint folder");
  // Another of the dataset's images (not the input): it was replaced by the heat map. Also a copy of it in a
  // folder without dataset.json (real data's layout), and a run's plot: no existing file but an earlier heat map
  // is replaced.
  const std::string other = data_ + "/images/" + fs::directory_iterator(data_ + "/images")->path().filename().string();
  const std::string pixels = slurp(other);
  const fs::path loose = dir("explain_loose");
  fs::copy_file(other, loose / "photo.png");
  psa::save_png((loose / "plot.png").string(), psa::Image(8, 8, 10));
  for (const std::string& existing : {other, (loose / "photo.png").string(), (loose / "plot.png").string()}) {
    const std::string before = slurp(existing);
    expect_one_line_error(infer({"--prompt", "What is it?", "--explain", existing}), "is not a heat map psa wrote");
    EXPECT_EQ(slurp(existing), before) << existing;
  }
  EXPECT_FALSE(fs::exists(ckpt_ + "/heat.png"));
  expect_one_line_error(infer({"--prompt", "What is it?", "--explain", ""}), "--explain: expected a path");
  fs::create_directories(d / "dir.png");
  expect_one_line_error(infer({"--prompt", "What is it?", "--explain", (d / "dir.png").string()}), "is a folder");
  expect_one_line_error(infer({"--prompt", "What is it?", "--explain", (d / "file" / "h.png").string()}),
                        "not a folder");
  Result r = infer({"--prompt", "What is it?", "--explain", (d / "heat.PNG").string()});
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(psa::load_image((d / "heat.PNG").string()).w, 256);
  r = infer({"--prompt", "What is it?", "--explain", (d / "heat.PNG").string()});  // an earlier heat map: replaced
  EXPECT_EQ(r.status, 0) << r.err;
}

// A long strip the model accepts used to fail in the heat map's display resize (256 px on the short side).
TEST_F(EvalCli, ExplainHandlesAWideImage) {
  const fs::path d = dir("explain_wide");
  const std::string strip = (d / "strip.png").string();
  psa::save_png(strip, psa::Image(600, 3, 200));
  Result r = run_psa({"infer", "--ckpt", ckpt_, "--image", strip, "--prompt", "What is it?", "--max-new-tokens", "2",
                      "--explain", (d / "heat.png").string()});
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_TRUE(fs::exists(d / "heat.png"));
}

// ---- problem 7: NaN weights ----

TEST_F(EvalCli, NonFiniteOutputsAreAClearErrorInEveryMode) {
  const psa::Checkpoint c = psa::load_checkpoint(ckpt_);
  for (auto& [name, t] : c.model->named_parameters()) {
    std::vector<float> nan(t.numel(), std::numeric_limits<float>::quiet_NaN());
    t.contiguous_copy_from(psa::Tensor::from(nan, t.shape(), t.dtype()));
  }
  const std::string bad = (dir("nan") / "ckpt").string();
  psa::save_checkpoint(bad, *c.model, *c.tokenizer, c.stage, c.lora);
  // The loader's warning about the NaN weights comes first; the error is the last line.
  auto expect_not_finite = [](const Result& r) {
    EXPECT_EQ(r.status, 2) << r.err;
    const size_t last = r.err.rfind('\n', r.err.size() - 2);
    const std::string line = r.err.substr(last == std::string::npos ? 0 : last + 1);
    EXPECT_NE(line.find("the model's outputs are not finite"), std::string::npos) << r.err;
    EXPECT_EQ(r.out.find("nan"), std::string::npos) << r.out;
  };
  const std::vector<std::string> args{"infer", "--ckpt", bad, "--image", image_, "--prompt", "What is it?"};
  expect_not_finite(run_psa(args));
  std::vector<std::string> json = args;
  json.push_back("--json");
  expect_not_finite(run_psa(json));
  expect_not_finite(run_psa({"eval", "--data", data_, "--ckpt", bad, "--limit", "2", "--quiet", "--out",
                             (root_ / "nan" / "r.json").string()}));
  EXPECT_FALSE(fs::exists(root_ / "nan" / "r.json"));
}

// ---- problem 9: --prompt text ----

TEST_F(EvalCli, InvalidOrEmptyPromptIsRefused) {
  expect_one_line_error(infer({"--prompt", "what \xff is it"}), "--prompt: not valid UTF-8");
  expect_one_line_error(infer({"--prompt", "caf\xc3"}), "--prompt: not valid UTF-8");
  expect_one_line_error(infer({"--prompt", ""}), "--prompt: empty question");
  expect_one_line_error(infer({"--prompt", " <image> "}), "--prompt: empty question");
  expect_one_line_error(infer({"--prompt", "\v\f"}), "--prompt: empty question");
  expect_one_line_error(infer({"--prompt", "\xc2\xa0"}), "--prompt: empty question");                 // NBSP
  expect_one_line_error(infer({"--prompt", "<image>\xe3\x80\x80\xe2\x80\x8b"}), "--prompt: empty question");
  Result r = infer({"--prompt", "caf\xc3\xa9?", "--json"});
  EXPECT_EQ(r.status, 0) << r.err;
}

TEST_F(EvalCli, InferOptionsAreCheckedBeforeTheCheckpoint) {
  for (const auto& [flag, value] : std::vector<std::pair<std::string, std::string>>{
           {"--max-new-tokens", "0"}, {"--top-p", "0"}, {"--top-p", "1.5"}, {"--top-k", "-1"}, {"--seed", "-3"},
           {"--temperature", "-1"}, {"--temperature", "nan"}})
    expect_one_line_error(run_psa({"infer", "--ckpt", "no/such/ckpt", "--image", image_, "--prompt", "q", flag, value}),
                          flag);
}

// ---- problem 8: images ----

// A 2x2 24-bit BMP; a negative height stores the rows top-down.
std::string bmp_2x2(bool top_down) {
  const uint8_t top[2][3] = {{0, 0, 255}, {0, 255, 0}}, bottom[2][3] = {{255, 0, 0}, {255, 255, 255}};  // BGR
  std::string s = "BM";
  auto u32 = [&](uint32_t v) { for (int i = 0; i < 4; ++i) s += char(v >> (8 * i)); };
  auto u16 = [&](uint16_t v) { s += char(v), s += char(v >> 8); };
  u32(14 + 40 + 16), u32(0), u32(14 + 40);
  u32(40), u32(2), u32(top_down ? uint32_t(-2) : 2u), u16(1), u16(24), u32(0), u32(16), u32(2835), u32(2835), u32(0),
      u32(0);
  auto row = [&](const uint8_t (&r)[2][3]) {
    s.append(reinterpret_cast<const char*>(r), 6);
    s += std::string(2, '\0');  // rows are padded to 4 bytes
  };
  if (top_down) row(top), row(bottom);
  else row(bottom), row(top);
  return s;
}

TEST(ImageLimits, TopDownBmpDecodesLikeBottomUp) {
  const fs::path d = fs::temp_directory_path() / ("psa_cli_eval_bmp_" + std::to_string(::getpid()));
  fs::create_directories(d);
  spit(d / "down.bmp", bmp_2x2(true));
  spit(d / "up.bmp", bmp_2x2(false));
  psa::Image down, up;
  EXPECT_EQ(error_of([&] { down = psa::load_image((d / "down.bmp").string()); }), "");
  up = psa::load_image((d / "up.bmp").string());
  EXPECT_EQ(down.w, 2);
  EXPECT_EQ(down.h, 2);
  EXPECT_EQ(down.rgb, up.rgb);
  EXPECT_EQ(down.at(0, 0)[0], 255);  // top-left is red
  EXPECT_EQ(error_of([&] { psa::check_image((d / "down.bmp").string()); }), "");
  fs::remove_all(d);
}

// A BMP cut short of its pixel rows (down to the header alone) is refused: stb_image read the missing rows as
// black. The whole file, and one cut inside its padding-free part, both ways up.
TEST(ImageLimits, TruncatedBmpIsRefused) {
  const fs::path d = fs::temp_directory_path() / ("psa_cli_eval_bmp_cut_" + std::to_string(::getpid()));
  fs::create_directories(d);
  for (bool top_down : {false, true}) {
    const std::string whole = bmp_2x2(top_down);
    for (size_t keep : {whole.size() - 1, size_t(14 + 40 + 8), size_t(14 + 40)}) {
      spit(d / "cut.bmp", whole.substr(0, keep));
      EXPECT_NE(error_of([&] { psa::load_image((d / "cut.bmp").string()); }).find("truncated BMP"), std::string::npos)
          << keep << " bytes";
      EXPECT_NE(error_of([&] { psa::check_image((d / "cut.bmp").string()); }).find("truncated BMP"), std::string::npos);
    }
  }
  fs::remove_all(d);
}

// A PNG signature and IHDR are all stb_image's header reader looks at.
std::string png_header(uint32_t w, uint32_t h) {
  std::string s = "\x89PNG\r\n\x1a\n";
  auto be32 = [&](uint32_t v) { for (int i = 3; i >= 0; --i) s += char(v >> (8 * i)); };
  be32(13);
  s += "IHDR";
  be32(w), be32(h);
  s += std::string("\x08\x02\x00\x00\x00", 5);
  be32(0);  // CRC (not checked by the header reader)
  return s;
}

TEST(ImageLimits, TotalPixelCountIsLimitedFromTheHeader) {
  const fs::path d = fs::temp_directory_path() / ("psa_cli_eval_px_" + std::to_string(::getpid()));
  fs::create_directories(d);
  const std::string big = (d / "big.png").string(), ok = (d / "ok.png").string();
  spit(big, png_header(16384, 16384));
  spit(ok, png_header(8192, 8192));
  const std::string e = error_of([&] { psa::check_image(big); });
  EXPECT_EQ(e.rfind(big + ": image too large: 16384x16384", 0), 0u) << e;
  EXPECT_NE(e.find("pixels"), std::string::npos) << e;
  // Not refused for its size (a bare header without pixel data fails later: its chunks are incomplete).
  const std::string e_ok = error_of([&] { psa::check_image(ok); });
  EXPECT_EQ(e_ok.find("too large"), std::string::npos) << e_ok;
  EXPECT_NE(e_ok.find("fails its CRC"), std::string::npos) << e_ok;
  fs::remove_all(d);
}

TEST(ImageLimits, ExtremeAspectRatioIsRefusedNamingTheFile) {
  const fs::path d = fs::temp_directory_path() / ("psa_cli_eval_aspect_" + std::to_string(::getpid()));
  fs::create_directories(d);
  const std::string strip = (d / "strip.png").string();
  psa::save_png(strip, psa::Image(4000, 3, 10));
  const std::string e = error_of([&] { psa::load_record_image(strip, "", 32); });
  EXPECT_EQ(e.rfind(strip + ": aspect ratio of 4000x3", 0), 0u) << e;
  EXPECT_EQ(psa::load_record_image(strip, "", 2).size(), 3u * 2 * 2);  // fine at a small enough size
  fs::remove_all(d);
}

TEST(ImageLimits, SavePngNamesThePathAndTheReason) {
  const std::string e = error_of([] { psa::save_png("/no/such/dir/x.png", psa::Image(2, 2)); });
  EXPECT_EQ(e, "/no/such/dir/x.png: cannot write png: No such file or directory");
  // A full disk shows in fclose (a small PNG is only buffered before): its errno, not a stale one.
  if (::access("/dev/full", W_OK) == 0) {
    EXPECT_EQ(error_of([] { psa::save_png("/dev/full", psa::Image(2, 2)); }),
              "/dev/full: cannot write png: No space left on device");
  }
}

}  // namespace
