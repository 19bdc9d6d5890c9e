// Crash safety of `psa train`, as a user would meet it: the real binary is killed with SIGKILL half-way
// through writing its training state (PSA_TEST_KILL_DURING_SAVE, see nn/safetensors.cpp); the previous state
// must still load, and `psa train --resume` must then end bit-identical (weights and logged losses) to a run
// that was never interrupted. Tiny preset on a 1%-scale dataset, a few steps of batch 2: a few seconds.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "nn/json.h"
#include "nn/safetensors.h"
#include "psa/checkpoint.h"

namespace {
namespace fs = std::filesystem;

const char* const kPsa = std::getenv("PSA_BIN") ? std::getenv("PSA_BIN") : "./build/psa";

struct Exit {
  int code = -1;    // exit status, -1 when killed
  int signal = 0;   // the killing signal
};

// fork + exec of `psa args...` with stdout/stderr to `log`; `kill_at` > 0 sets PSA_TEST_KILL_DURING_SAVE.
Exit run_psa(const std::vector<std::string>& args, const std::string& log, int kill_at = 0) {
  pid_t pid = ::fork();
  if (pid == 0) {
    if (kill_at > 0) ::setenv("PSA_TEST_KILL_DURING_SAVE", std::to_string(kill_at).c_str(), 1);
    ::setenv("OMP_NUM_THREADS", "1", 1);
    FILE* f = std::freopen(log.c_str(), "a", stdout);
    if (f) ::dup2(::fileno(stdout), 2);
    std::vector<char*> argv{const_cast<char*>(kPsa)};
    for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv(kPsa, argv.data());
    ::_exit(127);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  Exit e;
  if (WIFEXITED(status)) e.code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) e.signal = WTERMSIG(status);
  return e;
}

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

class CrashSafety : public ::testing::Test {
 protected:
  static std::string root_, data_;
  static void SetUpTestSuite() {
    root_ = (fs::temp_directory_path() / ("psa_crash_test_" + std::to_string(::getpid()))).string();
    data_ = root_ + "/data";
    fs::create_directories(root_);
    if (fs::exists(kPsa)) run_psa({"data", "--scale", "0.01", "--out", data_}, root_ + "/data.log");
  }
  static void TearDownTestSuite() { fs::remove_all(root_); }
  void SetUp() override {
    if (!fs::exists(kPsa)) GTEST_SKIP() << kPsa << " not built (make all)";
    ASSERT_TRUE(fs::exists(data_ + "/base_train.jsonl")) << slurp(root_ + "/data.log");
  }
  // Six base steps of the tiny model with a state after every step (no vision pretraining: not what is tested).
  std::vector<std::string> train_args(const std::string& out) const {
    return {"train", "--data", data_, "--out", out, "--stage", "base", "--steps-base", "6", "--batch", "2",
            "--save-every", "1", "--no-eval", "--quiet", "--steps-vision", "0"};
  }
};
std::string CrashSafety::root_, CrashSafety::data_;

std::vector<std::string> losses_of(const std::string& log) {
  std::vector<std::string> out;
  std::ifstream in(log);
  for (std::string line; std::getline(in, line);) {
    psa::json::Value v = psa::json::parse(line, log);
    out.push_back(std::to_string(v.int_at("step")) + ":" + psa::json::dump(v.at("loss")) + "/" +
                  psa::json::dump(v.at("loss_lm")) + "/" + psa::json::dump(v.at("grad_norm")));
  }
  return out;
}

std::map<std::string, std::string> tensor_hashes(const std::string& file) {
  std::map<std::string, std::string> out;
  const psa::st::File f = psa::st::File::open(file);  // the metadata lives as long as the File
  for (const auto& [k, v] : f.metadata())
    if (k.rfind("xxh64.", 0) == 0) out[k] = v;
  return out;
}

TEST_F(CrashSafety, KillDuringStateWriteKeepsThePreviousStateAndResumeIsBitIdentical) {
  const std::string straight = root_ + "/straight", killed = root_ + "/killed";
  Exit a = run_psa(train_args(straight), root_ + "/straight.log");
  ASSERT_EQ(a.code, 0) << slurp(root_ + "/straight.log");

  // Saves 1 and 2 are the states after steps 1 and 2; the third dies half-way through its data.
  Exit k = run_psa(train_args(killed), root_ + "/killed.log", 3);
  ASSERT_EQ(k.signal, SIGKILL) << "exit " << k.code << ": " << slurp(root_ + "/killed.log");
  const std::string state = killed + "/base/train_state.safetensors";
  psa::st::File f = psa::st::File::open(state);  // verifies every tensor's xxh64
  EXPECT_EQ(f.metadata().at("step"), "2");
  bool torn = false;  // the half-written temp file is there, so the kill did land inside the write
  for (const auto& e : fs::directory_iterator(killed + "/base"))
    torn |= e.path().filename().string().rfind(".train_state.safetensors.tmp.", 0) == 0;
  EXPECT_TRUE(torn);
  EXPECT_FALSE(fs::exists(killed + "/base/model.safetensors"));

  std::vector<std::string> resume = train_args(killed);
  resume.push_back("--resume");
  Exit r = run_psa(resume, root_ + "/resumed.log");
  ASSERT_EQ(r.code, 0) << slurp(root_ + "/resumed.log");
  EXPECT_NE(slurp(root_ + "/resumed.log").find("resuming from"), std::string::npos);

  EXPECT_EQ(tensor_hashes(killed + "/base/model.safetensors"), tensor_hashes(straight + "/base/model.safetensors"));
  std::vector<std::string> want = losses_of(straight + "/base/log.jsonl");
  EXPECT_EQ(want.size(), 6u);
  EXPECT_EQ(losses_of(killed + "/base/log.jsonl"), want);
}

TEST_F(CrashSafety, KillDuringCheckpointWriteKeepsThePreviousCheckpointLoadable) {
  // A finished stage, then the same run again killed while it rewrites model.safetensors at its end
  // (saves 1 and 2 are the states after steps 1 and 2, the last one the final state; 3 is the checkpoint).
  const std::string out = root_ + "/ckpt";
  std::vector<std::string> args = train_args(out);
  args[8] = "2";  // --steps-base 2
  ASSERT_EQ(run_psa(args, root_ + "/ckpt1.log").code, 0) << slurp(root_ + "/ckpt1.log");
  const auto before = tensor_hashes(out + "/base/model.safetensors");
  std::vector<std::string> again = args;
  again.push_back("--overwrite");  // training into a folder that holds a checkpoint must say so
  Exit k = run_psa(again, root_ + "/ckpt2.log", 3);
  ASSERT_EQ(k.signal, SIGKILL) << slurp(root_ + "/ckpt2.log");
  EXPECT_EQ(tensor_hashes(out + "/base/model.safetensors"), before);
  psa::Checkpoint c = psa::load_checkpoint(out + "/base");
  EXPECT_EQ(c.stage, "base");
}

}  // namespace
