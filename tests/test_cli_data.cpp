// `psa data` and `psa tokenizer` against bad options and interrupted runs, and the generator / record checks
// behind them: a non-empty output folder is refused, the record files are written atomically after every image
// (a SIGKILLed run leaves no truncated record file and no record naming a partial image), a bad config is a
// clean error before any parallel loop, unknown record keys are refused.
// Runs ./build/psa (or $PSA_BIN) from the repository root; the binary's tests skip when it is not built.
#include <gtest/gtest.h>
#include <signal.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "nn/json.h"
#include "psa/image.h"
#include "psa/records.h"
#include "psa/synth.h"
#include "psa/tokenizer.h"
#include "psa/vision_pretrain.h"
#include "test_util.h"
#include "tests/cli_util.h"

namespace {
namespace fs = std::filesystem;
using psa::test::error_of;

using psa::test::expect_one_line_error;
using psa::test::run_psa;
using psa::test::slurp;
using Result = psa::test::CliResult;
const char* const kPsa = psa::test::psa_binary();

// A fresh folder name (not created) under /dev/shm when it is there: generation writes many small files.
std::string temp_path(const std::string& tag) {
  fs::path root = ::access("/dev/shm", W_OK) == 0 ? fs::path("/dev/shm") : fs::temp_directory_path();
  fs::path p = root / ("psa_cli_data_" + std::to_string(::getpid()) + "_" + tag);
  fs::remove_all(p);
  return p.string();
}

// Every file under dir named like an atomic write's temp file (".<name>.tmp.<pid>.<n>").
std::vector<std::string> temp_files(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.path().filename().string().find(".tmp.") != std::string::npos) out.push_back(e.path().string());
  return out;
}

class CliData : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(kPsa)) GTEST_SKIP() << kPsa << " not built (make all)";
  }
};

// Another process writing the folder (its lock held here, as a second psa data would find it): refused before
// anything is written, and the folder keeps only the lock. Two runs into one --out used to interleave images.
TEST_F(CliData, AFolderAnotherRunIsWritingIsRefused) {
  const std::string dir = temp_path("locked");
  fs::remove_all(dir);
  fs::create_directories(dir);
  const int fd = ::open((dir + "/.psa.lock").c_str(), O_RDWR | O_CREAT, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::flock(fd, LOCK_EX), 0);
  expect_one_line_error(run_psa("data --scale 0.01 --out " + dir), "which a running psa process is writing");
  int entries = 0;
  for (const auto& e : fs::directory_iterator(dir)) entries += e.path().filename() == ".psa.lock" ? 1 : 100;
  EXPECT_EQ(entries, 1);
  ::close(fd);
  // Free again: the lock file alone does not make the folder "not empty", and the finished dataset keeps none.
  const auto r = run_psa("data --scale 0.01 --out " + dir);
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_FALSE(fs::exists(dir + "/.psa.lock"));
  EXPECT_TRUE(fs::exists(dir + "/dataset.json"));
  fs::remove_all(dir);
}

// A write that fails midway (a full disk; here a file-size limit) takes what the run wrote with it, and the
// folder it made: a retry used to be refused by the half-written folder.
TEST_F(CliData, AFailedGenerationRemovesWhatItWrote) {
  const std::string dir = temp_path("fsize");
  // stderr: the progress lines, then the error.
  Result r = psa::test::run_psa_file_limit("data --scale 0.01 --out " + dir, 8);
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.err.find("psa data: error: " + dir + "/base_train.jsonl: cannot write: File too large\n"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir));
  // And the folders above it that the run made.
  EXPECT_EQ(psa::test::run_psa_file_limit("data --scale 0.01 --out '" + dir + "/a b/c'", 8).status, 2);
  EXPECT_FALSE(fs::exists(dir));
  fs::create_directories(dir);  // a folder that was there stays, empty
  EXPECT_EQ(psa::test::run_psa_file_limit("data --scale 0.01 --out " + dir, 8).status, 2);
  EXPECT_TRUE(fs::is_directory(dir));
  EXPECT_TRUE(fs::is_empty(dir));
  fs::remove_all(dir);
}

TEST_F(CliData, NonEmptyOutputFolderIsRefusedAndLeftAlone) {
  const std::string dir = temp_path("nonempty");
  fs::create_directories(dir);
  std::ofstream(dir + "/notes.txt") << "x\n";
  expect_one_line_error(run_psa("data --preset tiny --scale 0.01 --out " + dir), dir + ": exists and is not empty");
  int entries = 0;
  for (const auto& e : fs::directory_iterator(dir)) entries += e.path().filename() != "notes.txt" ? 100 : 1;
  EXPECT_EQ(entries, 1);  // nothing written beside the old file
  fs::remove_all(dir);
  const std::string file = temp_path("file");
  std::ofstream(file) << "";
  expect_one_line_error(run_psa("data --scale 0.01 --out " + file), file + " is not a folder");
  fs::remove(file);
}

TEST_F(CliData, EmptyFolderIsFilledCompletelyWithNoTempFiles) {
  const std::string dir = temp_path("empty");
  fs::create_directories(dir);
  Result r = run_psa("data --preset tiny --scale 0.01 --out " + dir);
  ASSERT_EQ(r.status, 0) << r.err;
  for (const char* f : {"base_train.jsonl", "train.jsonl", "val.jsonl", "test.jsonl", "dataset.json"}) {
    const std::string text = slurp(dir + "/" + f);
    ASSERT_FALSE(text.empty()) << f;
    EXPECT_EQ(text.back(), '\n') << f;
  }
  EXPECT_EQ(temp_files(dir), std::vector<std::string>());
  psa::LoadReport rep;
  psa::load_records(dir + "/train.jsonl", &rep);  // checks every image header
  EXPECT_EQ(rep.skipped, 0) << (rep.messages.empty() ? "" : rep.messages[0]);
  fs::remove_all(dir);
}

// SIGKILL at several points of a run: every record file on disk then is complete and names only complete
// images. Before the fix train.jsonl was written record by record and ended in half a line.
TEST_F(CliData, KilledRunLeavesOnlyCompleteFiles) {
  // Killed once so many images exist (not after a fixed delay: a binary linked with CUDA takes a second to
  // start), and (images = 0) as soon as the first record file appears.
  for (int images : {40, 600, 0}) {
    const std::string dir = temp_path("killed");
    pid_t pid = ::fork();
    if (pid == 0) {
      ::setenv("OMP_NUM_THREADS", "1", 1);
      if (!std::freopen("/dev/null", "w", stdout)) ::_exit(126);
      std::vector<std::string> args = {kPsa, "data", "--preset", "tiny", "--scale", "0.15", "--out", dir};
      std::vector<char*> argv;
      for (std::string& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(kPsa, argv.data());
      ::_exit(127);
    }
    int status = 0;
    bool exited = false;
    for (int polls = 0; polls < 6000 && !exited; ++polls) {  // at most 30 s
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      exited = ::waitpid(pid, &status, WNOHANG) == pid;
      std::error_code ec;
      if (exited || !fs::exists(dir + "/images", ec)) continue;
      if (images == 0 && fs::exists(dir + "/base_train.jsonl", ec)) break;
      int n = 0;
      for (auto it = fs::directory_iterator(dir + "/images", ec); !ec && it != fs::directory_iterator(); ++it) ++n;
      if (images > 0 && n >= images) break;
    }
    if (!exited) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
    }
    if (!fs::exists(dir)) continue;  // killed before it made the folder
    for (const char* f : {"base_train.jsonl", "train.jsonl", "val.jsonl", "test.jsonl", "dataset.json"}) {
      if (!fs::exists(dir + "/" + f)) continue;
      const std::string text = slurp(dir + "/" + f);
      EXPECT_TRUE(!text.empty() && text.back() == '\n') << f << " truncated (killed at " << images << " images)";
    }
    // Record files only once every image exists; train.jsonl (what psa train looks for) after the others;
    // dataset.json last.
    if (fs::exists(dir + "/train.jsonl")) {
      for (const char* f : {"base_train.jsonl", "val.jsonl", "test.jsonl"}) {
        EXPECT_TRUE(fs::exists(dir + "/" + f)) << f;
      }
    }
    if (fs::exists(dir + "/dataset.json")) {
      EXPECT_TRUE(fs::exists(dir + "/train.jsonl"));
    }
    // An image being written at the kill may be partial, but no record names it yet.
    for (const char* f : {"base_train.jsonl", "train.jsonl", "val.jsonl", "test.jsonl"}) {
      if (!fs::exists(dir + "/" + f)) continue;
      psa::LoadReport rep;
      for (const psa::Record& r : psa::load_records(dir + "/" + f, &rep, false))
        EXPECT_EQ(error_of([&] { psa::load_image(r.image); }), "") << r.source;
      EXPECT_EQ(rep.skipped, 0) << f;
    }
    fs::remove_all(dir);
  }
}

TEST_F(CliData, EmptyPathsAreRefused) {
  expect_one_line_error(run_psa("data --scale 0.01 --out ''"), "--out: expected a path");
  expect_one_line_error(run_psa("tokenizer train --data ''"), "--data: expected a path");
  expect_one_line_error(run_psa("tokenizer train --data tests/data --out ''"), "--out: expected a path");
}

TEST_F(CliData, NumericOptionsAreRangeChecked) {
  const std::string dir = temp_path("numeric");
  for (const char* scale : {"0", "-1", "2", "nan", "inf", "1e-400"})
    expect_one_line_error(run_psa("data --scale " + std::string(scale) + " --out " + dir), "--scale");
  for (const char* seed : {"-1", "9007199254740993", "99999999999999999999"})
    expect_one_line_error(run_psa("data --scale 0.01 --seed " + std::string(seed) + " --out " + dir), "--seed");
  EXPECT_FALSE(fs::exists(dir));  // refused before the folder is made
  fs::remove_all(dir);
}

TEST_F(CliData, TokenizerVocabIsRangeCheckedBeforeConversion) {
  const std::string dir = temp_path("tok");
  ASSERT_EQ(run_psa("data --preset tiny --scale 0.01 --out " + dir).status, 0);
  // 2^32 + 300 and 2^32 + 4 used to be truncated to int: a 300-token and a "vocab_size 4" tokenizer.
  for (const char* v : {"4294967596", "4294967300", "260", "-1", "1048577"})
    expect_one_line_error(run_psa("tokenizer train --data " + dir + " --vocab " + v), "--vocab");
  EXPECT_FALSE(fs::exists(dir + "/tokenizer.json"));
  Result r = run_psa("tokenizer train --data " + dir + " --vocab 300");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(psa::Tokenizer::load(dir + "/tokenizer.json").vocab_size(), 300);
  EXPECT_EQ(temp_files(dir), std::vector<std::string>());
  fs::remove_all(dir);
}

// The records it reads, another kind of file and a device are not a tokenizer's place (each was replaced).
TEST_F(CliData, TokenizerOutputIsAJsonFileThatIsNoInput) {
  const std::string dir = temp_path("tok_out");
  ASSERT_EQ(run_psa("data --preset tiny --scale 0.01 --out " + dir).status, 0);
  const std::string train = dir + "/train.jsonl", records = slurp(train);
  fs::create_symlink(train, dir + "/link.json");
  expect_one_line_error(run_psa("tokenizer train --data " + dir + " --out " + train), "expected a .json file");
  expect_one_line_error(run_psa("tokenizer train --data " + dir + " --out " + dir + "/link.json"),
                        "the same file as the input");
  expect_one_line_error(run_psa("tokenizer train --data " + dir + " --out " + dir + "/dataset"), "expected a .json");
  expect_one_line_error(run_psa("tokenizer train --data " + dir + " --out " + dir), "expected a .json");
  EXPECT_EQ(slurp(train), records);
  // A mistyped --data: refused before the default output's folder (DIR itself) is created.
  expect_one_line_error(run_psa("tokenizer train --data " + dir + "_typo"), "no base_train.jsonl or train.jsonl");
  EXPECT_FALSE(fs::exists(dir + "_typo"));
  fs::create_directories(dir + "/sub.json");
  expect_one_line_error(run_psa("tokenizer train --data " + dir + " --out " + dir + "/sub.json"), "is a folder");
  // Other tools' JSON: a dataset's description, a checkpoint's tokenizer (replaced, the checkpoint refused to load).
  const std::string info = slurp(dir + "/dataset.json");
  expect_one_line_error(run_psa("tokenizer train --data " + dir + " --out " + dir + "/dataset.json"),
                        "exists and is not a tokenizer file");
  EXPECT_EQ(slurp(dir + "/dataset.json"), info);
  fs::create_directories(dir + "/ckpt");
  std::ofstream(dir + "/ckpt/model.safetensors") << "x";
  std::ofstream(dir + "/ckpt/config.json") << "{}";
  expect_one_line_error(run_psa("tokenizer train --data " + dir + " --out " + dir + "/ckpt/tokenizer.json"),
                        "inside the checkpoint folder");
  expect_one_line_error(run_psa("tokenizer train --data " + dir + " --out " + dir + "/ckpt/sub/t.json"),
                        "inside the checkpoint folder");
  ASSERT_EQ(::mkfifo((dir + "/fifo.json").c_str(), 0600), 0);
  expect_one_line_error(run_psa("tokenizer train --data " + dir + " --out " + dir + "/fifo.json"),
                        "not a regular file");
  fs::remove_all(dir);
}

// The vision stream's config comes from a dataset.json; a bad image size used to throw inside the parallel scene
// loop (std::terminate, status 134).
TEST_F(CliData, BadSceneConfigIsACleanErrorNotATerminate) {
  const std::string dir = temp_path("badcfg"), run = temp_path("badcfg_run");
  ASSERT_EQ(run_psa("data --preset tiny --scale 0.01 --out " + dir).status, 0);
  psa::json::Value info = psa::json::parse_file(dir + "/dataset.json");
  for (auto& kv : info.obj)
    if (kv.first == "config") kv.second.set("image_size", 8);
  psa::json::write_file(dir + "/dataset.json", psa::json::dump(info, 2));
  expect_one_line_error(run_psa("train --data " + dir + " --out " + run +
                                " --steps-vision 2 --batch-vision 2 --steps-base 1 --batch 2 "
                                "--no-eval --quiet --stage base"),
                        "image_size 8 out of 16..1024");
  fs::remove_all(dir);
  fs::remove_all(run);
}

// ---- the library side

TEST(SynthChecks, SceneStreamChecksItsConfigBeforeAnyParallelLoop) {
  psa::SynthConfig c = psa::synth_preset("tiny");
  c.image_size = 8;
  EXPECT_NE(error_of([&] { psa::synthetic_scenes(c, 32); }).find("image_size 8 out of 16..1024"), std::string::npos);
  c = psa::synth_preset("small");
  c.font_path = "/no/such/font.ttf";
  EXPECT_NE(error_of([&] { psa::synthetic_scenes(c, 32); }).find("/no/such/font.ttf"), std::string::npos);
  c = psa::synth_preset("tiny");
  c.hint_share = std::nan("");
  EXPECT_NE(error_of([&] { psa::check_synth_config(c); }).find("hint_share"), std::string::npos);
  c = psa::synth_preset("tiny");
  c.train.clean = 2000000000, c.train.risky = 2000000000;  // the int sum would overflow
  EXPECT_NE(error_of([&] { psa::check_synth_config(c); }).find("limit"), std::string::npos);
}

TEST(SynthChecks, GeneratorRefusesANonEmptyFolder) {
  const std::string dir = temp_path("lib_nonempty");
  fs::create_directories(dir);
  std::ofstream(dir + "/old.jsonl") << "{}\n";
  psa::SynthConfig c = psa::synth_preset("tiny");
  c.train = {1, 1, 0, 0}, c.val = {1, 0, 0, 0}, c.test = {1, 0, 0, 0}, c.base_extra_clean = 0;
  EXPECT_EQ(error_of([&] { psa::generate_dataset(c, dir); }),
            dir + ": exists and is not empty (psa data writes only into a missing or empty folder)");
  EXPECT_FALSE(fs::exists(dir + "/images"));
  fs::remove_all(dir);
}

// psa inspect FILE.jsonl lists every bad line (training shows the first 10 and points here), and a file whose
// lines all load inspects with exit 0.
TEST_F(CliData, InspectListsEveryBadLineOfARecordsFile) {
  const std::string bad = psa::test::repo_path("tests/data/records/bad.jsonl");
  Result r = run_psa({"inspect", bad});
  expect_one_line_error(r, "12 of 13 non-blank lines skipped");
  EXPECT_NE(r.out.find("1 records, 12 lines skipped"), std::string::npos) << r.out;
  for (int line : {2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14})
    EXPECT_NE(r.out.find("skipped " + bad + ":" + std::to_string(line) + ": "), std::string::npos) << line;
  const std::string dir = temp_path("inspect_records");
  fs::create_directories(dir);
  std::ofstream(dir + "/good.jsonl") << slurp(bad).substr(0, slurp(bad).find('\n') + 1);
  fs::create_directories(dir + "/img");
  fs::copy_file(psa::test::repo_path("tests/data/records/img/a.png"), dir + "/img/a.png");
  r = run_psa({"inspect", dir + "/good.jsonl", "--json"});
  EXPECT_EQ(r.status, 0) << r.err;
  const psa::json::Value j = psa::json::parse(r.out);
  EXPECT_EQ(j.int_at("records"), 1);
  EXPECT_EQ(j.at("by_type").int_at("clean"), 1);
  EXPECT_TRUE(j.array_at("skipped_lines").empty());
  fs::remove_all(dir);
}

// README: records are checked for unknown keys. The reference fields, our "meta" and LLaVA's "id" pass.
TEST(RecordKeys, UnknownKeysSkipTheRecordWithLineAndReason) {
  const std::string dir = temp_path("keys");
  fs::create_directories(dir);
  const std::string conv = R"("conversations": [{"from": "USER", "value": "<image>\nHi"}, )"
                           R"({"from": "ASSISTANT", "value": "Hello."}])";
  std::ofstream(dir + "/r.jsonl") << R"({"safe_level": 0, "safe_type": 6, "image": "a.png", )" << conv << "}\n"
                                  << R"({"safe_level": 0, "safe_type": 6, "image": "a.png", "extra_key": 1, )" << conv
                                  << "}\n"
                                  << R"({"id": "x1", "safe_level": 0, "safe_type": 6, "image": "a.png", "meta": {}, )"
                                  << conv << "}\n"
                                  << R"({"safe_level": 0, "safe_type": 6, "image": "a.png", "conversations": [)"
                                  << R"({"from": "USER", "value": "<image>", "lang": "en"}, )"
                                  << R"({"from": "ASSISTANT", "value": "Hello."}]})" << "\n"
                                  << R"({"safe_level": 0, "safe_type": 6, "image": "a.png", "conversations": [)"
                                  << R"({"from": "USER", "value": "<image>"}, {"from": "ASSISTANT", "value": "A."}, )"
                                  << R"({"from": "USER", "value": "More?", "x": 0}]})" << "\n";
  psa::LoadReport rep;
  std::vector<psa::Record> recs = psa::load_records(dir + "/r.jsonl", &rep, false);
  EXPECT_EQ(recs.size(), 2u);
  ASSERT_EQ(rep.skipped, 3);
  EXPECT_EQ(rep.messages[0], dir + "/r.jsonl:2: unknown key 'extra_key'");
  EXPECT_EQ(rep.messages[1], dir + "/r.jsonl:4: conversations[0]: unknown key 'lang'");
  EXPECT_EQ(rep.messages[2], dir + "/r.jsonl:5: conversations[2]: unknown key 'x'");
  fs::remove_all(dir);
}

}  // namespace
