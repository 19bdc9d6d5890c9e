// The `psa` binary as a user meets it: exit status 0 on success, 2 with a one-line message on bad input.
// Runs ./build/psa (or $PSA_BIN, e.g. the sanitizer build's) from the repository root (where the tests run);
// skips when it has not been built.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace {

const char* const kPsa = std::getenv("PSA_BIN") ? std::getenv("PSA_BIN") : "./build/psa";

struct Result {
  int status = -1;  // exit status, -1 when killed by a signal
  std::string out, err;
};

Result run_psa(const std::string& args) {
  std::string err_path = ::testing::TempDir() + "psa_cli_stderr_" + std::to_string(::getpid());
  std::string cmd = std::string(kPsa) + " " + args + " 2>" + err_path;
  Result r;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return r;
  char buf[4096];
  for (size_t n; (n = std::fread(buf, 1, sizeof buf, p)) > 0;) r.out.append(buf, n);
  int status = ::pclose(p);
  r.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::stringstream ss;
  ss << std::ifstream(err_path).rdbuf();
  r.err = ss.str();
  std::remove(err_path.c_str());
  return r;
}

// A failure is reported as exactly one line on stderr (the command line's contract), mentioning `what`.
void expect_one_line_error(const Result& r, const std::string& what) {
  EXPECT_EQ(r.status, 2) << r.err;
  ASSERT_FALSE(r.err.empty());
  EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << "stderr: " << r.err;
  EXPECT_NE(r.err.find(what), std::string::npos) << "stderr: " << r.err;
}

class CliErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!std::filesystem::exists(kPsa)) GTEST_SKIP() << kPsa << " not built (make all)";
  }
};

TEST_F(CliErrors, ConformHelpExitsZeroAndDescribesTheFixtures) {
  Result r = run_psa("conform --help");
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("io.safetensors"), std::string::npos) << r.out;
}

TEST_F(CliErrors, TruncatedWeightsExitTwoNamingTheFile) {
  Result r = run_psa("conform tests/data/bad_ckpt/truncated");
  expect_one_line_error(r, "tests/data/bad_ckpt/truncated/model.safetensors");
}

TEST_F(CliErrors, MissingFolderExitsTwo) {
  Result r = run_psa("conform tests/data/no_such_folder");
  expect_one_line_error(r, "tests/data/no_such_folder");
}

TEST_F(CliErrors, UnknownOptionExitsTwo) {
  Result r = run_psa("conform --no-such-option tests/data/hf/mha");
  expect_one_line_error(r, "--no-such-option");
}

TEST_F(CliErrors, ConformOnAGoodFixtureExitsZero) {
  Result r = run_psa("conform --quiet tests/data/hf/mha");
  EXPECT_EQ(r.status, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("PASS"), std::string::npos) << r.out;
  EXPECT_EQ(r.err, "");
}

TEST_F(CliErrors, BenchStepProfileRejectsJsonAndPrintsKernelRows) {
  expect_one_line_error(run_psa("bench-step --profile --json"), "--profile");
  Result r = run_psa("bench-step --profile --stage 2 --steps 1 --warmup 0 --threads 1");
  EXPECT_EQ(r.status, 0) << r.err;
  for (const char* row : {"kernel profile", "matmul (backward)", "swiglu_backward", "attention", "outside kernels"})
    EXPECT_NE(r.out.find(row), std::string::npos) << row << " missing from:\n" << r.out;
}

// The three sweeps, one step per point: every series in the table (patches at the preset's patch size, the image
// side changed), and the chart written next to it.
TEST_F(CliErrors, BenchStepScalingWritesThreeSeriesAndAChart) {
  std::string dir = ::testing::TempDir() + "psa_scaling_" + std::to_string(::getpid());
  Result r = run_psa("bench-step --scaling --steps 1 --warmup 0 --threads 1 --batch 2 --out-dir " + dir);
  EXPECT_EQ(r.status, 0) << r.err;
  for (const char* row : {"| batch | 32 | 32 | 64 |", "| text | 2 | 128 | 64 |", "| patches | 2 | 32 | 16 |",
                          "| patches | 2 | 32 | 144 |"})
    EXPECT_NE(r.out.find(row), std::string::npos) << row << " missing from:\n" << r.out;
  bool chart = false;
  for (const auto& f : std::filesystem::directory_iterator(dir)) chart |= f.path().extension() == ".png";
  EXPECT_TRUE(chart) << "no chart in " << dir;
  std::filesystem::remove_all(dir);
}

TEST_F(CliErrors, UnknownCommandExitsTwo) {
  Result r = run_psa("nosuchcommand");
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.err.find("nosuchcommand"), std::string::npos) << r.err;
}

}  // namespace
