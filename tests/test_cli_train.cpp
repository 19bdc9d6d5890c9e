// `psa train` as a user meets it when something is off: option values out of range, a run folder that already
// holds a run, a resume with other options, a checkpoint folder whose files do not belong together, leftovers
// of a killed run and a damaged dataset.json. Bad input: one line on stderr, exit status 2, nothing written.
// Runs $PSA_BIN (default ./build/psa) on a 1%-scale tiny dataset with 2-step stages: about a second a run.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>

#include "nn/checkpoint.h"
#include "nn/json.h"
#include "psa/checkpoint.h"
#include "tests/test_util.h"
#include "tests/cli_util.h"

namespace {
namespace fs = std::filesystem;

using psa::test::expect_one_line_error;
using psa::test::run_psa;
using psa::test::slurp;
using Result = psa::test::CliResult;
const char* const kPsa = psa::test::psa_binary();

using Options = std::map<std::string, std::string>;  // flag -> value ("" for a switch)

// A 2-step run of every stage; `extra` replaces or adds options (a flag mapped to "\x01" is left out).
std::vector<std::string> train_args(const std::string& data, const std::string& out, const Options& extra = {}) {
  Options o = {{"--data", data}, {"--out", out},         {"--steps-vision", "0"}, {"--steps-base", "2"},
               {"--steps-1", "2"}, {"--steps-2", "2"},  {"--batch", "2"},        {"--no-eval", ""},
               {"--quiet", ""}};
  for (const auto& [k, v] : extra) o[k] = v;
  std::vector<std::string> args{"train"};
  for (const auto& [k, v] : o) {
    if (v == "\x01") continue;
    args.push_back(k);
    if (!v.empty() || k == "--data" || k == "--out") args.push_back(v);
  }
  return args;
}

std::map<std::string, std::string> files_of(const fs::path& dir) {  // name -> contents
  std::map<std::string, std::string> out;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file()) out[e.path().filename().string()] = slurp(e.path());
  return out;
}

class TrainCli : public ::testing::Test {
 protected:
  static fs::path root_;
  static std::string data_, other_, run_;
  static void SetUpTestSuite() {
    root_ = fs::temp_directory_path() / ("psa_cli_train_test_" + std::to_string(::getpid()));
    data_ = (root_ / "data").string();
    other_ = (root_ / "other").string();
    run_ = (root_ / "run").string();
    fs::create_directories(root_);
    if (!fs::exists(kPsa)) return;
    run_psa({"data", "--preset", "tiny", "--scale", "0.01", "--out", data_});
    run_psa({"data", "--preset", "tiny", "--scale", "0.01", "--seed", "7", "--out", other_});
    run_psa(train_args(data_, run_));
  }
  static void TearDownTestSuite() { fs::remove_all(root_); }
  void SetUp() override {
    if (!fs::exists(kPsa)) GTEST_SKIP() << kPsa << " not built (make all)";
    ASSERT_TRUE(fs::exists(run_ + "/stage2/model.safetensors")) << "the fixture run failed";
  }
  // A copy of the trained run, to be changed by one test.
  static std::string copy_of_run(const std::string& name) {
    const fs::path to = root_ / name;
    fs::remove_all(to);
    fs::copy(run_, to, fs::copy_options::recursive);
    return to.string();
  }
};
fs::path TrainCli::root_;
std::string TrainCli::data_, TrainCli::other_, TrainCli::run_;

// ---- option values: refused before anything is generated, loaded or written

struct BadOption {
  Options extra;
  const char* message;
};

TEST_F(TrainCli, OutOfRangeOptionsAreRefusedBeforeAnyWork) {
  const BadOption cases[] = {
      {{{"--batch", "99999999999"}}, "--batch: 99999999999 is out of range [1, 4096]"},
      {{{"--batch", "0"}}, "--batch: 0 is out of range"},
      {{{"--batch", "-1"}}, "--batch: -1 is out of range"},
      {{{"--batch-vision", "99999999999"}}, "--batch-vision: 99999999999 is out of range"},
      {{{"--steps-base", "0"}}, "--steps-base: 0 is out of range [1, "},
      {{{"--steps-1", "-1"}}, "--steps-1: -1 is out of range"},
      {{{"--steps-2", "0"}}, "--steps-2: 0 is out of range"},
      {{{"--steps-vision", "-1"}}, "--steps-vision: -1 is out of range [0, "},
      {{{"--warmup", "-1"}}, "--warmup: -1 is out of range"},
      {{{"--warmup", "5"}}, "--warmup: 5 steps is longer than the base stage (--steps-base 2)"},
      {{{"--save-every", "-1"}}, "--save-every: -1 is out of range"},
      {{{"--max-bad-steps", "0"}}, "--max-bad-steps: 0 is out of range"},
      {{{"--eval-limit", "-1"}}, "--eval-limit: -1 is out of range"},
      {{{"--seed", "-1"}}, "--seed: -1 is out of range"},
      {{{"--lora-rank", "100000"}}, "--lora-rank: 100000 is out of range [0, 128]"},
      {{{"--lora-rank", "-1"}}, "--lora-rank: -1 is out of range"},
      {{{"--lora-dropout", "1"}}, "--lora-dropout: 1 is out of range [0, 1)"},
      {{{"--lora-dropout", "-0.1"}}, "--lora-dropout: -0.1 is out of range"},
      {{{"--lora-dropout", "nan"}}, "--lora-dropout: expected a finite number"},
      {{{"--lora-alpha", "nan"}}, "--lora-alpha: expected a finite number"},
      {{{"--lora-alpha", "0"}}, "--lora-alpha: expected > 0"},
      {{{"--lr-base", "1e30"}}, "--lr-base: 1e30 is out of range [0, 10]"},
      {{{"--lr-2", "-1"}}, "--lr-2: -1 is out of range"},
      {{{"--vision-lr-scale", "inf"}}, "--vision-lr-scale: expected a finite number"},
      {{{"--full-ft", ""}, {"--lora-rank", "4"}}, "--lora-rank: not with --full-ft"},
      {{{"--data", ""}}, "--data: expected a path, got an empty string"},
      {{{"--out", ""}}, "--out: expected a path, got an empty string"},
      {{{"--resume", ""}, {"--overwrite", ""}}, "--resume and --overwrite: choose one"},
  };
  const std::string out = (root_ / "bad").string();
  for (const BadOption& c : cases) {
    SCOPED_TRACE(c.message);
    expect_one_line_error(run_psa(train_args(data_, out, c.extra)), c.message);
    EXPECT_FALSE(fs::exists(out)) << "a refused run wrote " << out;
  }
}

// The default: every stage, then the benchmark, in one process that holds the run folder's lock all along (the
// evaluation once refused its own parent as "another psa process").
TEST_F(TrainCli, TrainingEndsWithTheEvaluationItsReportHolds) {
  const std::string out = (root_ / "with_eval").string();
  fs::remove_all(out);
  Result r = run_psa(train_args(data_, out, {{"--no-eval", "\x01"}, {"--eval-limit", "3"}}));
  ASSERT_EQ(r.status, 0) << r.err;
  const psa::json::Value report = psa::json::parse_file(out + "/report.json");
  for (const char* stage : {"base", "stage1", "stage2"}) EXPECT_EQ(report.at(stage).int_at("records"), 3) << stage;
  EXPECT_TRUE(fs::exists(out + "/report.md"));
}

TEST_F(TrainCli, LoraRankZeroStillMeansFullFineTuning) {
  const std::string out = copy_of_run("rank0");
  Result r = run_psa(train_args(data_, out, {{"--stage", "2"}, {"--lora-rank", "0"}, {"--overwrite", ""}}));
  ASSERT_EQ(r.status, 0) << r.err;
  psa::Checkpoint c = psa::load_checkpoint(out + "/stage2");
  EXPECT_EQ(c.lora.rank, 0);
}

// dataset.md's real-data path: one records file trains every stage, without the folder's other files.
TEST_F(TrainCli, OneRecordsFileTrainsEveryStage) {
  const fs::path dir = root_ / "one_file";
  fs::remove_all(dir);
  fs::create_directories(dir);
  fs::copy(fs::path(data_) / "images", dir / "images", fs::copy_options::recursive);
  fs::copy_file(fs::path(data_) / "train.jsonl", dir / "records.jsonl");
  const std::string out = (root_ / "one_file_run").string();
  Result r = run_psa(train_args((dir / "records.jsonl").string(), out, {{"--no-eval", "\x01"}}));
  ASSERT_EQ(r.status, 0) << r.err;
  for (const char* stage : {"base", "stage1", "stage2"}) EXPECT_TRUE(fs::exists(out + "/" + stage + "/model.safetensors")) << stage;
  EXPECT_NE(r.out.find("no test.jsonl beside"), std::string::npos) << r.out;
  expect_one_line_error(run_psa(train_args((dir / "missing.jsonl").string(), out + "2")), "is not a readable file");
  // A folder without train.jsonl fails after --out was made and locked: the new folder is gone again.
  fs::create_directories(dir / "no_train");
  fs::copy_file(fs::path(data_) / "train.jsonl", dir / "no_train" / "other.jsonl");
  expect_one_line_error(run_psa(train_args((dir / "no_train").string(), out + "3")), "no train.jsonl");
  EXPECT_FALSE(fs::exists(out + "3")) << "a failed run left its --out folder behind";
  // A file that is not .jsonl (a dataset.json) or a checkpoint folder: said so, not "generate one with psa data".
  expect_one_line_error(run_psa(train_args(data_ + "/dataset.json", out + "4")), "neither a dataset folder nor");
  expect_one_line_error(run_psa(train_args(run_ + "/stage2", out + "4")), "a checkpoint folder, not a dataset folder");
  EXPECT_FALSE(fs::exists(out + "4"));
}

// ---- a stage started from a checkpoint takes the tokenizer stored with it

TEST_F(TrainCli, StageFromACopiedCheckpointUsesThatCheckpointsTokenizer) {
  const fs::path x = root_ / "copied";
  fs::remove_all(x);
  fs::create_directories(x);
  fs::copy(run_ + "/base", x / "base", fs::copy_options::recursive);
  Result r = run_psa(train_args(other_, x.string(), {{"--stage", "1"}}));
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(slurp(x / "stage1/tokenizer.json"), slurp(x / "base/tokenizer.json"));
  EXPECT_FALSE(fs::exists(x / "tokenizer.json")) << "a new tokenizer was trained on the other data";
}

TEST_F(TrainCli, CheckpointWithAnotherTokenizerIsRefusedNamingTheFolder) {
  const std::string dir = copy_of_run("swapped") + "/stage1";
  // A different tokenizer with the same small vocabulary rule (BPE on other text).
  psa::Tokenizer::train({"completely different words here", "and more of them"}, 264).save(dir + "/tokenizer.json");
  const std::string err = psa::test::error_of([&] { psa::load_checkpoint(dir); });
  EXPECT_EQ(err.rfind(dir + ": tokenizer.json", 0), 0u) << err;
  EXPECT_NE(err.find("is not the tokenizer the model was saved with"), std::string::npos) << err;
}

// A config whose <image> id is not the tokenizer's failed only at the image splice, naming no file.
TEST_F(TrainCli, ConfigSpecialIdsDisagreeingWithTheTokenizerAreRefusedNamingTheFile) {
  const std::string dir = copy_of_run("special_ids") + "/stage1", file = dir + "/model.safetensors";
  std::map<std::string, std::string> meta;
  psa::nn::StateDict t = psa::nn::read_tensors(file, &meta);
  psa::json::Value cfg = psa::json::parse(meta.at("config"), "config");
  cfg.set("image_token_index", psa::json::Value(int64_t(5)));
  meta["config"] = psa::json::dump(cfg);
  meta.erase("xxh64.__metadata__");
  psa::nn::write_tensors(file, t, meta);
  const std::string err = psa::test::error_of([&] { psa::load_checkpoint(dir); });
  EXPECT_EQ(err.rfind(file + ": metadata 'config' has <image> 5, ", 0), 0u) << err;
  EXPECT_NE(err.find("a mixed or edited checkpoint folder"), std::string::npos) << err;
}

// ---- checkpoint writes: all or nothing

TEST_F(TrainCli, FailedCheckpointWriteLeavesTheFolderAsItWas) {
  const std::string dir = copy_of_run("failed_save") + "/stage2";
  psa::Checkpoint c = psa::load_checkpoint(dir);
  const auto before = files_of(dir);
  struct stat st_before {};
  ASSERT_EQ(::stat((dir + "/tokenizer.json").c_str(), &st_before), 0);
  psa::LoraSettings bad = c.lora;
  bad.alpha = NAN;  // cannot be written to JSON: fails after the tokenizer and config were written, before
  EXPECT_NE(psa::test::error_of([&] { psa::save_checkpoint(dir, *c.model, *c.tokenizer, "stage2", bad); }), "");
  EXPECT_EQ(files_of(dir), before);
  struct stat st_after {};
  ASSERT_EQ(::stat((dir + "/tokenizer.json").c_str(), &st_after), 0);
  EXPECT_EQ(st_after.st_ino, st_before.st_ino) << "tokenizer.json was replaced";
  for (const auto& e : fs::directory_iterator(dir)) EXPECT_FALSE(e.is_directory()) << e.path() << " left behind";

  const std::string fresh = (root_ / "failed_fresh").string();
  EXPECT_NE(psa::test::error_of([&] { psa::save_checkpoint(fresh, *c.model, *c.tokenizer, "stage2", bad); }), "");
  EXPECT_TRUE(!fs::exists(fresh) || fs::is_empty(fresh)) << "a half checkpoint in " << fresh;
}

TEST_F(TrainCli, SavedCheckpointLoadsAndAnIdenticalTokenizerIsNotReplaced) {
  const std::string dir = copy_of_run("resave") + "/stage1";
  psa::Checkpoint c = psa::load_checkpoint(dir);
  struct stat a {}, b {};
  ASSERT_EQ(::stat((dir + "/tokenizer.json").c_str(), &a), 0);
  psa::save_checkpoint(dir, *c.model, *c.tokenizer, "stage1", {});
  ASSERT_EQ(::stat((dir + "/tokenizer.json").c_str(), &b), 0);
  EXPECT_EQ(a.st_ino, b.st_ino);
  EXPECT_EQ(psa::load_checkpoint(dir).stage, "stage1");
}

// ---- a run folder that already holds a run

TEST_F(TrainCli, RetrainingAFinishedStageNeedsResumeOrOverwrite) {
  const std::string out = copy_of_run("again");
  const std::string model = slurp(out + "/base/model.safetensors");
  expect_one_line_error(run_psa(train_args(data_, out, {{"--stage", "base"}})),
                        out + "/base already holds a checkpoint: pass --resume");
  expect_one_line_error(run_psa(train_args(data_, out)), "already holds a checkpoint");
  EXPECT_EQ(slurp(out + "/base/model.safetensors"), model);

  // Only stage 2 removed: retraining base would leave stage1 behind.
  fs::remove_all(out + "/stage2");
  fs::remove_all(out + "/base");
  expect_one_line_error(run_psa(train_args(data_, out, {{"--stage", "base"}})),
                        out + "/stage1 was trained from the base checkpoint this run replaces");
}

TEST_F(TrainCli, OverwriteRetrainsAndRemovesTheLaterStages) {
  const std::string out = copy_of_run("overwrite");
  // What an evaluated run also holds: the table and the predictions of every stage.
  fs::create_directories(out + "/predictions");
  for (const char* f : {"/report.md", "/predictions/base.jsonl", "/predictions/stage2.jsonl"})
    std::ofstream(out + f) << "| Metric | old |";
  Result r = run_psa(train_args(data_, out, {{"--stage", "base"}, {"--overwrite", ""}, {"--seed", "5"}}));
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("--overwrite: removed"), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(out + "/stage1"));
  EXPECT_FALSE(fs::exists(out + "/stage2"));
  for (const char* f : {"/report.md", "/predictions/base.jsonl", "/predictions/stage2.jsonl"})
    EXPECT_FALSE(fs::exists(out + f)) << f << " of the replaced run is left";
  const psa::json::Value report = psa::json::parse_file(out + "/report.json");
  EXPECT_FALSE(report.find("stage1") || report.find("stage2")) << psa::json::dump(report);
  EXPECT_NE(slurp(out + "/base/model.safetensors"), slurp(run_ + "/base/model.safetensors"));
  // Every stage again into the same folder, as a second `make train` does.
  Result all = run_psa(train_args(data_, out, {{"--overwrite", ""}}));
  ASSERT_EQ(all.status, 0) << all.err;
  EXPECT_TRUE(fs::exists(out + "/stage2/model.safetensors"));
}

// A stage folder holding anything psa train does not write (here a dataset generated into it, and a note) is
// neither written into nor removed by --overwrite: the whole folder used to go.
TEST_F(TrainCli, StageFoldersHoldingOtherFilesAreNeverRemoved) {
  const std::string out = copy_of_run("foreign");
  std::ofstream(out + "/stage2/notes.txt") << "keep";
  expect_one_line_error(run_psa(train_args(data_, out, {{"--stage", "1"}, {"--overwrite", ""}})),
                        out + "/stage2: holds notes.txt, which psa train does not write");
  EXPECT_EQ(slurp(out + "/stage2/notes.txt"), "keep");
  EXPECT_TRUE(fs::exists(out + "/stage2/model.safetensors"));
  fs::remove(out + "/stage2/notes.txt");
  fs::create_directories(out + "/stage1/images");
  expect_one_line_error(run_psa(train_args(data_, out, {{"--stage", "1"}, {"--overwrite", ""}})),
                        out + "/stage1: holds images");
}

// OUT/stage1 holding a copy of the base checkpoint: Stage II would train a safety head that was never trained.
TEST_F(TrainCli, AStageStartingFromAnotherStagesCheckpointIsRefused) {
  const std::string out = copy_of_run("mixed_stages");
  fs::copy_file(out + "/base/model.safetensors", out + "/stage1/model.safetensors",
                fs::copy_options::overwrite_existing);
  expect_one_line_error(run_psa(train_args(data_, out, {{"--stage", "2"}, {"--overwrite", ""}})),
                        out + "/stage1: holds a base checkpoint, but the stage2 stage starts from a stage1 one");
}

// --overwrite deletes the stages it replaces only once the new stage's data is there and usable: a folder
// without base_train.jsonl, or one whose records all fail to load, used to cost the trained later stages.
TEST_F(TrainCli, OverwriteKeepsTheRunWhenTheNewDataIsMissingOrUnusable) {
  const std::string out = copy_of_run("overwrite_bad_data");
  const fs::path bad = root_ / "bad_data";
  fs::remove_all(bad);
  fs::create_directories(bad);
  fs::copy_file(data_ + "/train.jsonl", bad / "train.jsonl");
  expect_one_line_error(run_psa(train_args(bad.string(), out, {{"--stage", "base"}, {"--overwrite", ""}})),
                        (bad / "base_train.jsonl").string() + ": no such file");
  // Every record names an image that is not there.
  std::ofstream(bad / "base_train.jsonl")
      << R"({"safe_level":0,"safe_type":0,"image":"missing.png","conversations":[{"from":"USER","value":)"
      << R"("<image>\nq"},{"from":"ASSISTANT","value":"a"}]})" << "\n";
  Result r = run_psa(train_args(bad.string(), out, {{"--stage", "base"}, {"--overwrite", ""}}));
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.err.find("skipped " + (bad / "base_train.jsonl").string() + ":1:"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("error: " + (bad / "base_train.jsonl").string() + ": no usable training examples"),
            std::string::npos) << r.err;
  for (const char* stage : {"/base", "/stage1", "/stage2"})
    EXPECT_EQ(slurp(out + stage + "/model.safetensors"), slurp(run_ + stage + "/model.safetensors")) << stage;
  // The benchmark's test.jsonl is looked for before training, not after every stage has trained.
  fs::copy_file(data_ + "/base_train.jsonl", bad / "base_train.jsonl", fs::copy_options::overwrite_existing);
  expect_one_line_error(run_psa(train_args(bad.string(), (root_ / "no_test").string(), {{"--no-eval", "\x01"}})),
                        (bad / "test.jsonl").string() + ": no such file");
  EXPECT_FALSE(fs::exists(root_ / "no_test" / "base"));
}

// A fresh run whose data cannot train leaves nothing behind: the tokenizer it trained from the records' text
// used to stay in OUT/tokenizer.json, and the next run on good data took it (a vocabulary of bad data).
TEST_F(TrainCli, FailedRunLeavesNoTokenizerForTheNext) {
  const fs::path bad = root_ / "bad_images";
  fs::remove_all(bad);
  fs::create_directories(bad);
  fs::copy_file(data_ + "/train.jsonl", bad / "train.jsonl");
  std::ofstream(bad / "base_train.jsonl")
      << R"({"safe_level":0,"safe_type":0,"image":"missing.png","conversations":[{"from":"USER","value":)"
      << R"("<image>\nq"},{"from":"ASSISTANT","value":"a"}]})" << "\n";
  const fs::path out = root_ / "tok_left";
  fs::remove_all(out);
  Result r = run_psa(train_args(bad.string(), out.string(), {{"--stage", "base"}, {"--no-eval", "\x01"}}));
  EXPECT_EQ(r.status, 2) << r.err;
  EXPECT_NE(r.err.find("no usable training examples"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(out)) << "a failed first run left its folder (and its tokenizer)";
  std::ofstream(bad / "records.jsonl") << R"({"a":1})" << "\n";  // not one record: no tokenizer either
  expect_one_line_error(run_psa(train_args((bad / "records.jsonl").string(), out.string(), {{"--no-eval", "\x01"}})),
                        "no usable records to train the tokenizer on");
  EXPECT_FALSE(fs::exists(out));
}

// ---- --resume with other options

TEST_F(TrainCli, ResumeWithOtherOptionsIsRefusedNamingTheOptionAndBothValues) {
  const std::string out = copy_of_run("resume");
  const std::pair<Options, std::string> cases[] = {
      {{{"--batch", "3"}}, "made with --batch 2, this run has --batch 3"},
      {{{"--seed", "1"}}, "made with --seed 42, this run has --seed 1"},
      {{{"--steps-base", "3"}}, "made with --steps-base 2, this run has --steps-base 3"},
      {{{"--lr-base", "0.001"}}, "made with --lr-base 0.002"},
      {{{"--warmup", "2"}}, "made with --warmup 1, this run has --warmup 2"},
      {{{"--lora-alpha", "8"}}, "made with --lora-alpha 16, this run has --lora-alpha 8"},
      // A resume does not repeat the vision pretraining: another amount of it is another run.
      {{{"--steps-vision", "3"}}, "made with --steps-vision 0, this run has --steps-vision 3"},
      {{{"--batch-vision", "5"}}, "made with --batch-vision 32, this run has --batch-vision 5"},
  };
  for (const auto& [extra, message] : cases) {
    SCOPED_TRACE(message);
    Options o = extra;
    o["--resume"] = "";
    expect_one_line_error(run_psa(train_args(data_, out, o)), message);
  }
  // A learning rate is shown in the fewest digits that read back (it was 0.0030000000000000001).
  expect_one_line_error(run_psa(train_args(data_, out, {{"--resume", ""}, {"--lr-1", "0.001"}})),
                        "made with --lr-1 0.003, this run has --lr-1 0.001");
  // Stage I's state copied into stage2/: named as what it is.
  fs::copy_file(out + "/stage1/train_state.safetensors", out + "/stage2/train_state.safetensors",
                fs::copy_options::overwrite_existing);
  expect_one_line_error(run_psa(train_args(data_, out, {{"--resume", ""}, {"--stage", "2"}})),
                        "a training state of the stage1 stage, not of stage2");
  fs::copy_file(run_ + "/stage2/train_state.safetensors", out + "/stage2/train_state.safetensors",
                fs::copy_options::overwrite_existing);
  // Other records (another seed's dataset) would mix two datasets in one run; the state names the first by hash.
  Result other = run_psa(train_args(other_, out, {{"--resume", ""}}));
  expect_one_line_error(other, "made with --data records with xxh64 ");
  EXPECT_NE(other.err.find("this run has --data records with xxh64 "), std::string::npos) << other.err;
  // A tokenizer replaced after a kill would give the rest of the stage other token ids.
  const std::string tok = out + "/tokenizer.json", kept = slurp(tok);
  ASSERT_EQ(run_psa({"tokenizer", "train", "--data", other_, "--vocab", "300", "--out", tok}).status, 0);
  Result retok = run_psa(train_args(data_, out, {{"--resume", ""}, {"--stage", "base"}}));
  expect_one_line_error(retok, "made with tokenizer vocabulary with xxh64 ");
  std::ofstream(tok, std::ios::binary) << kept;
  Result same = run_psa(train_args(data_, out, {{"--resume", ""}}));
  EXPECT_EQ(same.status, 0) << same.err;
  EXPECT_EQ(same.err, "");
}

// The log lost lines the state kept (cut after a kill, or by a power loss before its lines reached the disk):
// said once, not left as a silent gap.
TEST_F(TrainCli, ResumeOverALogMissingStepsWarns) {
  const std::string out = copy_of_run("short_log");
  const std::string log = out + "/base/log.jsonl", text = slurp(log);
  std::ofstream(log, std::ios::binary) << text.substr(0, text.find('\n') + 1);
  Result r = run_psa(train_args(data_, out, {{"--resume", ""}, {"--stage", "base"}}));
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.err, "warning: " + log + " has lines for 1 of the 2 steps before the resumed step 2 (the rest were "
                   "lost); the training state holds every step's losses\n");
  // A finished stage resumed runs nothing, and says so (it printed "in 0.0 s (0 tokens/s)").
  EXPECT_NE(r.out.find("[base] 2 steps (0 skipped, all done before: nothing left to run), loss "), std::string::npos)
      << r.out;
}

TEST_F(TrainCli, ResumeFromAStateWithoutTheRecordWarnsOnce) {
  const std::string out = copy_of_run("old_state");
  const std::string state = out + "/base/train_state.safetensors";
  std::map<std::string, std::string> meta;
  psa::nn::StateDict t = psa::nn::read_tensors(state, &meta);
  std::map<std::string, std::string> old;
  for (const auto& [k, v] : meta)
    if (k != "options" && k.rfind("xxh64.", 0) != 0) old[k] = v;
  psa::nn::write_tensors(state, t, old);
  Result r = run_psa(train_args(data_, out, {{"--resume", ""}, {"--stage", "base"}, {"--batch", "3"}}));
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.err.find("warning: " + state + " has no record of the options"), 0u) << r.err;
  EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << r.err;
}

// ---- leftovers of a killed run

TEST_F(TrainCli, StaleTempFilesOfKilledWritersAreRemovedWhenAStageStarts) {
  const std::string out = copy_of_run("stale");
  const fs::path base = fs::path(out) / "base";
  const std::string dead = "999999999";  // above any pid_max: no such process
  const std::vector<std::string> files = {".train_state.safetensors.tmp." + dead + ".123",
                                          ".model.safetensors.tmp." + dead + ".7",
                                          ".train_state.safetensors.tmp.1.5",  // pid 1 is alive: so may its writer be
                                          ".config.json.tmp." + dead + ".4"};
  for (const std::string& name : files) std::ofstream(base / name) << "x";
  const fs::path not_ours = fs::path(out) / ("notes.tmp." + dead + ".1");  // not the pattern
  std::ofstream(not_ours) << "x";
  fs::create_directories(base / (".checkpoint.tmp." + dead + ".0"));
  const fs::path report_temp = fs::path(out) / (".report.json.tmp." + dead + ".3");
  std::ofstream(report_temp) << "{";
  Result r = run_psa(train_args(data_, out, {{"--resume", ""}, {"--stage", "base"}}));
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_FALSE(fs::exists(base / files[0]));
  EXPECT_FALSE(fs::exists(base / files[1]));
  EXPECT_FALSE(fs::exists(base / files[3]));
  EXPECT_FALSE(fs::exists(report_temp));
  EXPECT_FALSE(fs::exists(base / (".checkpoint.tmp." + dead + ".0")));
  EXPECT_TRUE(fs::exists(base / files[2]));
  EXPECT_TRUE(fs::exists(not_ours));
}

// ---- two runs, one folder

// The lock is what a running `psa train` holds; taken here by the test itself, as a second run would meet it.
TEST_F(TrainCli, ASecondRunInTheSameFolderIsRefused) {
  const std::string out = copy_of_run("locked");
  const std::string lock = out + "/.psa.lock";
  const int fd = ::open(lock.c_str(), O_RDWR | O_CREAT, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::flock(fd, LOCK_EX | LOCK_NB), 0);
  const std::string pid = std::to_string(::getpid());
  ASSERT_EQ(::ftruncate(fd, 0), 0);  // the copied run holds its own writer's pid
  ASSERT_EQ(::pwrite(fd, pid.data(), pid.size(), 0), ssize_t(pid.size()));
  const auto before = files_of(fs::path(out) / "stage2");
  Result r = run_psa(train_args(data_, out, {{"--resume", ""}}));
  expect_one_line_error(r, "in use by another psa process (pid " + pid + ")");
  EXPECT_EQ(files_of(fs::path(out) / "stage2"), before);
  ::close(fd);  // the holder is gone: the folder is free again
  r = run_psa(train_args(data_, out, {{"--overwrite", ""}, {"--stage", "2"}}));
  EXPECT_EQ(r.status, 0) << r.err;
}

// The pid used to be written through a symlink planted as the lock, over whatever it pointed to.
TEST_F(TrainCli, ALockThatIsASymlinkIsRefusedAndItsTargetKept) {
  const fs::path out = root_ / "lock_link", victim = root_ / "victim.txt";
  fs::remove_all(out);
  fs::create_directories(out);
  std::ofstream(victim) << "keep";
  fs::create_symlink(victim, out / ".psa.lock");
  expect_one_line_error(run_psa(train_args(data_, out.string())), "is a symbolic link");
  EXPECT_EQ(slurp(victim), "keep");
}

// Each found only after every stage had trained, or never: the data inside the run (which --overwrite removed),
// a report output that is a folder, and a tokenizer in OUT too large for the model (an index error mid-run).
TEST_F(TrainCli, RunOutputsAndInputsAreCheckedBeforeTraining) {
  const fs::path out = root_ / "checked";
  fs::remove_all(out);
  fs::create_directories(out / "stage2");
  fs::copy_file(data_ + "/train.jsonl", out / "stage2" / "mine.jsonl");
  expect_one_line_error(run_psa(train_args((out / "stage2" / "mine.jsonl").string(), out.string())),
                        "inside the run folder");
  EXPECT_TRUE(fs::exists(out / "stage2" / "mine.jsonl"));
  fs::remove_all(out);
  fs::create_directories(out / "report.md");
  Result r = run_psa(train_args(data_, out.string(), {{"--no-eval", "\x01"}}));
  expect_one_line_error(r, "report.md is a folder");
  EXPECT_FALSE(fs::exists(out / "base")) << "a stage trained before the outputs were checked";
  fs::remove_all(out);
  fs::create_directories(out);
  ASSERT_EQ(run_psa({"tokenizer", "train", "--data", data_, "--vocab", "1000", "--out", (out / "tokenizer.json").string()}).status, 0);
  expect_one_line_error(run_psa(train_args(data_, out.string())), " tokens, more than the model's vocabulary of 512");
}

TEST_F(TrainCli, AReportMdThatIsNotAPsaTableIsRefusedBeforeTraining) {
  const fs::path out = root_ / "foreign_md";
  fs::remove_all(out);
  fs::create_directories(out);
  std::ofstream(out / "report.md") << "# notes\n";
  expect_one_line_error(run_psa(train_args(data_, out.string())), "report.md: not a psa benchmark table");
  EXPECT_FALSE(fs::exists(out / "base"));
  EXPECT_EQ(slurp(out / "report.md"), "# notes\n");
}

TEST_F(TrainCli, RunFolderMustBeAFolderOutsideTheData) {
  const fs::path file = root_ / "a_file";
  std::ofstream(file) << "x";
  expect_one_line_error(run_psa(train_args(data_, file.string())), "--out: " + file.string() + " is not a folder");
  expect_one_line_error(run_psa(train_args(data_, data_ + "/runs")), "inside the dataset folder");
  EXPECT_FALSE(fs::exists(data_ + "/runs"));
}

// ---- dataset.json

TEST_F(TrainCli, BadDatasetJsonIsRefusedNamingTheFile) {
  const fs::path d = root_ / "bad_info";
  fs::remove_all(d);
  fs::copy(data_, d, fs::copy_options::recursive);
  const std::string info = (d / "dataset.json").string();
  psa::json::Value good = psa::json::parse_file(info);
  auto with_config = [&](const char* key, psa::json::Value v) {
    psa::json::Value j = good, c = good.at("config");
    c.set(key, std::move(v));
    j.set("config", c);
    return psa::json::dump(j);
  };
  const std::pair<std::string, std::string> cases[] = {
      {"[]", "expected an object"},
      {"{}", "missing key 'config'"},
      {with_config("seed", "one"), "seed"},
      {with_config("image_size", 8), "image_size 8"},
      {with_config("image_size", 100000), "image_size 100000"},
  };
  const std::string out = (root_ / "bad_info_run").string();
  for (const auto& [text, reason] : cases) {
    SCOPED_TRACE(text.substr(0, 40));
    std::ofstream(info, std::ios::trunc) << text;
    Result r = run_psa(train_args(d.string(), out, {{"--stage", "base"}, {"--steps-vision", "1"}}));
    expect_one_line_error(r, info + ": ");
    EXPECT_NE(r.err.find(reason), std::string::npos) << r.err;
    EXPECT_FALSE(fs::exists(out + "/base")) << "training started";
  }
}

// ---- psa export --merge-lora and psa inspect on the trained run


// W' = W + (alpha/r)·B·A, recomputed here in f64 for one adapted layer, and no adapter tensor left.
TEST_F(TrainCli, ExportFoldsTheAdaptersIntoThePlainWeights) {
  const std::string out = (root_ / "merged").string();
  fs::remove_all(out);
  Result r = run_psa({"export", "--merge-lora", run_ + "/stage2", "--out", out});
  ASSERT_EQ(r.status, 0) << r.err;
  const psa::Checkpoint lora = psa::load_checkpoint(run_ + "/stage2"), plain = psa::load_checkpoint(out);
  EXPECT_EQ(plain.lora.rank, 0);
  EXPECT_EQ(plain.stage, "stage2");
  const auto before = lora.model->state_dict(), after = plain.model->state_dict();
  for (const auto& [name, t] : after) EXPECT_EQ(name.find("lora_"), std::string::npos) << name;
  const std::string layer = "language_model.model.layers.1.self_attn.q_proj";
  const std::vector<double> w = before.at(layer + ".weight").to_vector(), a = before.at(layer + ".lora_A.weight").to_vector(),
                            b = before.at(layer + ".lora_B.weight").to_vector(), merged = after.at(layer + ".weight").to_vector();
  const int64_t rank = lora.lora.rank, in = before.at(layer + ".lora_A.weight").size(1);
  const int64_t outs = before.at(layer + ".lora_B.weight").size(0);
  double worst = 0, delta = 0;
  for (int64_t o = 0; o < outs; ++o)
    for (int64_t i = 0; i < in; ++i) {
      double ba = 0;
      for (int64_t k = 0; k < rank; ++k) ba += b[o * rank + k] * a[k * in + i];
      const double expected = w[o * in + i] + lora.lora.alpha / rank * ba;
      worst = std::max(worst, psa::abs_error(merged[o * in + i], expected));
      delta = std::max(delta, std::fabs(ba));
    }
  EXPECT_GT(delta, 1e-4) << "the adapters did not train: the test would not see a missing merge";
  EXPECT_LT(worst, 1e-6);
  // Everything outside the language model's linears is copied unchanged.
  EXPECT_EQ(after.at("safe_part.safety_head.weight").to_vector(), before.at("safe_part.safety_head.weight").to_vector());
}

TEST_F(TrainCli, ExportRefusesWhatItCannotDoInOneLine) {
  const std::string out = (root_ / "merged_bad").string();
  fs::remove_all(out);
  expect_one_line_error(run_psa({"export", "--merge-lora", run_ + "/base", "--out", out}), "has no LoRA adapters");
  expect_one_line_error(run_psa({"export", run_ + "/stage2", "--out", out}), "--merge-lora is required");
  expect_one_line_error(run_psa({"export", "--merge-lora", run_ + "/stage2", "--out", run_ + "/stage2/m"}),
                        "overlaps the checkpoint folder");
  expect_one_line_error(run_psa({"export", "--merge-lora", run_ + "/stage2", "--out", run_}), "overlaps");
  // Refused before the folder is made, and never inside another checkpoint.
  EXPECT_FALSE(fs::exists(out)) << "a failed export left its folder";
  expect_one_line_error(run_psa({"export", "--merge-lora", run_ + "/stage2", "--out", run_ + "/base/merged"}),
                        "inside the checkpoint folder");
  EXPECT_FALSE(fs::exists(run_ + "/base/merged"));
  fs::create_directories(out);
  std::ofstream(out + "/notes.txt") << "mine";
  expect_one_line_error(run_psa({"export", "--merge-lora", run_ + "/stage2", "--out", out}), "not empty");
  EXPECT_EQ(slurp(out + "/notes.txt"), "mine");
  EXPECT_FALSE(fs::exists(out + "/model.safetensors"));
}

// A killed export leaves its staging folder and lock; a retry takes the folder (the dead writer's temps go). A
// failed write (file-size limit, as a full disk) takes the folder it made with it.
TEST_F(TrainCli, ExportRetriesAfterAKilledOrFailedExport) {
  const std::string out = (root_ / "merged_retry").string();
  fs::remove_all(out);
  fs::create_directories(out + "/.checkpoint.tmp.999999999.0");  // above any pid_max: a dead writer's
  std::ofstream(out + "/.checkpoint.tmp.999999999.0/model.safetensors") << "half";
  std::ofstream(out + "/.psa.lock") << "999999999";
  Result r = run_psa({"export", "--merge-lora", run_ + "/stage2", "--out", out});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_FALSE(fs::exists(out + "/.checkpoint.tmp.999999999.0"));
  EXPECT_EQ(run_psa({"inspect", out}).status, 0);
  fs::remove_all(out);
  r = psa::test::run_psa_file_limit("export --merge-lora " + run_ + "/stage2 --out " + out, 64);
  expect_one_line_error(r, "File too large");
  EXPECT_FALSE(fs::exists(out));
}

TEST_F(TrainCli, InspectDescribesACheckpointAndAFile) {
  Result r = run_psa({"inspect", run_ + "/stage2"});
  ASSERT_EQ(r.status, 0) << r.err;
  for (const char* line : {"stage stage2, preset tiny", "LoRA:      rank 16, alpha 16", "lora ", "model.safetensors"})
    EXPECT_NE(r.out.find(line), std::string::npos) << line << " missing from:\n" << r.out;
  r = run_psa({"inspect", run_ + "/stage2", "--json"});
  ASSERT_EQ(r.status, 0) << r.err;
  const psa::json::Value j = psa::json::parse(r.out);
  int64_t sum = 0;
  for (const auto& [group, n] : j.at("parameters_by_group").as_object()) sum += n.as_int();
  EXPECT_EQ(sum, j.int_at("parameters"));
  r = run_psa({"inspect", run_ + "/base/train_state.safetensors", "--json"});
  ASSERT_EQ(r.status, 0) << r.err;
  const psa::json::Value f = psa::json::parse(r.out);
  EXPECT_EQ(f.int_at("tensor_count"), static_cast<int64_t>(f.array_at("tensors").size()));
  EXPECT_TRUE(f.at("metadata_keys").size() > 0);
}

TEST_F(TrainCli, InspectRefusesADamagedFileInOneLine) {
  const fs::path d = root_ / "inspect_bad";
  fs::remove_all(d);
  fs::create_directories(d);
  const std::string weights = slurp(run_ + "/base/model.safetensors");
  std::ofstream((d / "cut.safetensors").string(), std::ios::binary) << weights.substr(0, weights.size() / 2);
  expect_one_line_error(run_psa({"inspect", (d / "cut.safetensors").string()}), "cut.safetensors");
  std::ofstream((d / "notes.txt").string()) << "x";
  expect_one_line_error(run_psa({"inspect", (d / "notes.txt").string()}), "expected a checkpoint folder, a .safetensors file or a .jsonl");
  expect_one_line_error(run_psa({"inspect", d.string()}), "no model.safetensors");
  expect_one_line_error(run_psa({"inspect", (d / "missing").string()}), "no such file or folder");
}

// A tensor name with control bytes (NUL cut the listing short, ESC would drive the terminal) is listed escaped.
TEST_F(TrainCli, InspectEscapesControlBytesInNames) {
  const fs::path d = root_ / "inspect_names";
  fs::create_directories(d);
  const std::string name = std::string("a") + '\0' + "b\x1b[31m";
  psa::nn::write_tensors((d / "odd.safetensors").string(), {{name, psa::Tensor::zeros({1})}}, {});
  Result r = run_psa({"inspect", (d / "odd.safetensors").string()});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("a\\x00b\\x1b[31m"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find('\x1b'), std::string::npos);
}


}  // namespace

