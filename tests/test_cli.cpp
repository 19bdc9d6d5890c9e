// The `psa` binary as a user meets it: exit status 0 on success, 2 with a one-line message on bad input.
// Runs ./build/psa (or $PSA_BIN, e.g. the sanitizer build's) from the repository root (where the tests run);
// skips when it has not been built.
#include "cli_util.h"

#include <filesystem>
#include <fstream>

namespace {

using psa::test::expect_one_line_error;
using psa::test::run_psa;
using Result = psa::test::CliResult;
using CliErrors = psa::test::CliTest;

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
  EXPECT_NE(r.err.find("[scaling] 15/15 patches"), std::string::npos) << "no progress line per point:\n" << r.err;
  // An earlier sweep's files are replaced; anyone else's (notes, a dataset's file behind a link) are not.
  for (const auto& f : std::filesystem::directory_iterator(dir)) {
    const std::string kept = dir + "_other";
    std::filesystem::create_directories(kept);
    const std::string theirs = kept + "/" + f.path().filename().string();
    std::ofstream(theirs) << "my notes";
    Result again = run_psa("bench-step --scaling --steps 1 --warmup 0 --threads 1 --batch 2 --out-dir " + kept);
    expect_one_line_error(again, "exists and is not a");
    EXPECT_EQ(psa::test::slurp(theirs), "my notes");
    std::filesystem::remove_all(kept);
  }
  std::filesystem::remove_all(dir);
}

// Found only after the sweep's minutes, or silently ignored without --scaling; and bench-gemm's typos were
// hidden behind "no usable GPU".
TEST_F(CliErrors, BenchOutputsAndArgumentsAreCheckedFirst) {
  const std::string file = ::testing::TempDir() + "psa_bench_file_" + std::to_string(::getpid());
  std::ofstream(file) << "x";
  Result r = run_psa("bench-step --scaling --steps 1 --warmup 0 --threads 1 --batch 2 --out-dir " + file);
  expect_one_line_error(r, "--out-dir: " + file + " is not a folder");
  EXPECT_EQ(r.out, "") << "the sweep ran before the folder was checked";
  expect_one_line_error(run_psa("bench-step --out-dir /tmp"), "--out-dir: only --scaling writes files");
  // Not into a checkpoint folder (model.safetensors + config.json), as every other command's outputs.
  const std::string ckpt = ::testing::TempDir() + "psa_bench_ckpt_" + std::to_string(::getpid());
  std::filesystem::create_directories(ckpt);
  for (const char* f : {"/model.safetensors", "/config.json"}) std::ofstream(ckpt + f) << "x";
  r = run_psa("bench-step --scaling --steps 1 --warmup 0 --threads 1 --batch 2 --out-dir " + ckpt);
  expect_one_line_error(r, "inside the checkpoint folder");
  EXPECT_EQ(r.out, "") << "the sweep ran before the folder was checked";
  r = run_psa("data --scale 0.01 --out " + ckpt + "/data");
  expect_one_line_error(r, "inside the checkpoint folder");
  EXPECT_FALSE(std::filesystem::exists(ckpt + "/data"));
  std::filesystem::remove_all(ckpt);
  expect_one_line_error(run_psa("bench-step --scaling --profile"), "--profile");
  // 4096 rows of the small model (~290 GB) would be killed by the kernel with no message, before any folder is made.
  expect_one_line_error(run_psa("bench-step --preset small --batch 4096"), "--batch 4096: a training step needs about");
  const std::string run = ::testing::TempDir() + "psa_batch_run_" + std::to_string(::getpid());
  expect_one_line_error(run_psa("train --preset small --batch 4096 --out " + run), "more than the");
  EXPECT_FALSE(std::filesystem::exists(run));
  expect_one_line_error(run_psa("bench-gemm --sizes 0"), "--sizes: 0 is out of range");
  expect_one_line_error(run_psa("bench-gemm --reps x"), "--reps");
  expect_one_line_error(run_psa("bench-gemm extra"), "unexpected argument 'extra'");
  std::remove(file.c_str());
}

// A symlink loop or an over-long name used to surface as libstdc++'s "filesystem error: status: ..."; a newline
// in a path split the error over two lines; " 5" passed as a number although "5 " did not.
TEST_F(CliErrors, PathsAndNumbersThatOnlyLookFine) {
  const std::string loop = ::testing::TempDir() + "psa_loop_" + std::to_string(::getpid());
  std::filesystem::remove(loop);
  std::filesystem::create_symlink(loop, loop);
  for (const std::string& cmd : {"eval --data " + loop + " --ckpt " + loop, "train --data " + loop + " --out " + loop + "_run",
                                 "tokenizer train --data " + loop}) {
    Result r = run_psa(cmd);
    expect_one_line_error(r, loop);
    EXPECT_EQ(r.err.find("filesystem error"), std::string::npos) << r.err;
  }
  std::filesystem::remove(loop);
  expect_one_line_error(run_psa("infer --ckpt $'no\nsuch' --image x.png --prompt q"), "no\\nsuch");
  expect_one_line_error(run_psa("data --scale ' 0.01' --out /nonexistent/x"), "--scale: expected a number");
  expect_one_line_error(run_psa("data --seed ' 5' --out /nonexistent/x"), "--seed: expected an integer");
}

TEST_F(CliErrors, UnknownCommandExitsTwo) {
  Result r = run_psa("nosuchcommand");
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.err.find("nosuchcommand"), std::string::npos) << r.err;
}

// The shared option parser (tools/cli.cpp): each refusal is one line naming the flag, before any work.
TEST_F(CliErrors, OptionParserRefusesRepeatsSwitchValuesAndOutOfRangeNumbers) {
  expect_one_line_error(run_psa("bench-step --batch 3 --batch 4"), "--batch: given twice");
  expect_one_line_error(run_psa("bench-step --json=0"), "--json: a switch takes no value");
  expect_one_line_error(run_psa("data --seed 99999999999999999999"), "--seed: 99999999999999999999 does not fit");
  expect_one_line_error(run_psa("bench-step --threads 100000"), "--threads: 100000 is out of range [1, 1024]");
  expect_one_line_error(run_psa("bench-step --batch 0"), "--batch: 0 is out of range");
  expect_one_line_error(run_psa("bench-step --scaling --json"), "not with --json");
  expect_one_line_error(run_psa("bench-step --stage 1 --steps nan"), "--steps: expected an integer");
}

TEST_F(CliErrors, HugeOmpNumThreadsIsRefusedBeforeLibgompSeesIt) {
  // libgomp segfaulted creating 100000 threads at the first parallel region.
  expect_one_line_error(run_psa("bench-step", "OMP_NUM_THREADS=100000"), "OMP_NUM_THREADS=100000: expected 1 to 1024");
  // Garbage after a number, or in a list, ran on libgomp's default after its warning. The warning itself comes
  // from libgomp's load-time constructor, before main: it stays, and the command now stops.
  for (const char* bad : {"4abc", "2,x", "2,,1", "-3"}) {
    const psa::test::CliResult r = run_psa("bench-step --help", std::string("OMP_NUM_THREADS=") + bad);
    EXPECT_EQ(r.status, 2) << bad;
    EXPECT_NE(r.err.find("OMP_NUM_THREADS=" + std::string(bad) + ": expected 1 to 1024"), std::string::npos) << r.err;
  }
  EXPECT_EQ(run_psa("bench-step --help", "OMP_NUM_THREADS=2,1").status, 0);
  // Each level within the limit, together a million threads (eval nests its records' and the kernels' loops).
  expect_one_line_error(run_psa("bench-step --help", "OMP_NUM_THREADS=1024,1024"),
                        "OMP_NUM_THREADS=1024,1024: the list's levels nest, at least 1048576 threads in all, more than 1024");
}

TEST_F(CliErrors, AFailedWriteToStdoutExitsTwo) {
  // The report went nowhere: exit 2, not 0 (stderr still carries the reason).
  expect_one_line_error(run_psa("conform tests/data/hf/mha >/dev/full"), "cannot write to standard output");
  expect_one_line_error(run_psa("--help >/dev/full"), "cannot write to standard output");
  expect_one_line_error(run_psa("train --help >/dev/full"), "cannot write to standard output");
  // A pipe whose reader is gone (`psa inspect ... | head`): the same exit 2 and line, not death by SIGPIPE. The
  // read end is closed before the child starts, so its first write fails however fast it runs.
  for (const char* command : {"--help", "conform"}) {
    int fds[2];
    ASSERT_EQ(::pipe(fds), 0);
    ::close(fds[0]);
    const std::string err_path = ::testing::TempDir() + "psa_cli_epipe_" + std::to_string(::getpid());
    std::fflush(nullptr);
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::dup2(fds[1], 1);
      if (!std::freopen(err_path.c_str(), "w", stderr)) ::_exit(126);
      const char* conform_args[] = {psa::test::psa_binary(), "conform", "tests/data/hf/mha", nullptr};
      const char* help_args[] = {psa::test::psa_binary(), "--help", nullptr};
      ::execv(psa::test::psa_binary(), const_cast<char* const*>(std::string(command) == "--help" ? help_args : conform_args));
      ::_exit(127);
    }
    ::close(fds[1]);
    int status = 0;
    ::waitpid(pid, &status, 0);
    ASSERT_TRUE(WIFEXITED(status)) << command << ": killed by signal " << (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
    EXPECT_EQ(WEXITSTATUS(status), 2) << command;
    EXPECT_EQ(psa::test::slurp(err_path), "psa: error: cannot write to standard output\n") << command;
    std::remove(err_path.c_str());
  }
}

TEST_F(CliErrors, NoCommandPrintsUsageOnStderr) {
  const psa::test::CliResult r = run_psa("");
  EXPECT_EQ(r.status, 2);
  EXPECT_EQ(r.out, "");
  EXPECT_NE(r.err.find("usage: psa <command>"), std::string::npos) << r.err;
}

}  // namespace
