// Running the `psa` binary from a test, as a user meets it: exit status 0 on success, 2 with a one-line message
// on bad input. The binary is ./build/psa (or $PSA_BIN, e.g. a sanitizer build's), run from the repository root
// where the tests run; CliTest skips when it has not been built.
#pragma once
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace psa::test {

inline const char* psa_binary() { return std::getenv("PSA_BIN") ? std::getenv("PSA_BIN") : "./build/psa"; }

struct CliResult {
  int status = -1;  // exit status, -1 when killed by a signal
  std::string out, err;
};

inline std::string slurp(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// `psa ARGS` through the shell, on one thread: ARGS may hold redirections, ENV more variable settings
// ("OMP_NUM_THREADS=4" overrides the default).
inline CliResult run_psa(const std::string& args, const std::string& env = "") {
  std::string err_path = ::testing::TempDir() + "psa_cli_stderr_" + std::to_string(::getpid());
  std::string cmd = "OMP_NUM_THREADS=1 " + env + " " + psa_binary() + " " + args + " 2>" + err_path;
  CliResult r;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return r;
  char buf[4096];
  for (size_t n; (n = std::fread(buf, 1, sizeof buf, p)) > 0;) r.out.append(buf, n);
  int status = ::pclose(p);
  r.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.err = slurp(err_path);
  std::remove(err_path.c_str());
  return r;
}

// `psa ARGS` under a file-size limit of `blocks` 512-byte blocks (ulimit -f): every write past it fails with
// EFBIG, as on a full disk.
inline CliResult run_psa_file_limit(const std::string& args, int blocks) {
  const std::string err_path = ::testing::TempDir() + "psa_cli_fsize_" + std::to_string(::getpid());
  const std::string cmd = "ulimit -f " + std::to_string(blocks) + "; OMP_NUM_THREADS=1 " + psa_binary() + " " +
                          args + " >/dev/null 2>" + err_path;
  CliResult r;
  const int status = std::system(cmd.c_str());
  r.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.err = slurp(err_path);
  std::remove(err_path.c_str());
  return r;
}

// fork + exec of `psa args...` on one thread, no shell: arguments pass as they are (empty ones and invalid UTF-8
// included); stdout and stderr captured.
inline CliResult run_psa(const std::vector<std::string>& args) {
  const std::string base = ::testing::TempDir() + "psa_cli_" + std::to_string(::getpid());
  const std::string out_path = base + ".out", err_path = base + ".err";
  std::fflush(nullptr);  // else the child's freopen writes out a copy of what this process has buffered
  pid_t pid = ::fork();
  if (pid == 0) {
    ::setenv("OMP_NUM_THREADS", "1", 1);
    if (!std::freopen(out_path.c_str(), "w", stdout) || !std::freopen(err_path.c_str(), "w", stderr)) ::_exit(126);
    std::vector<char*> argv{const_cast<char*>(psa_binary())};
    for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv(psa_binary(), argv.data());
    ::_exit(127);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  CliResult r;
  r.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.out = slurp(out_path);
  r.err = slurp(err_path);
  std::filesystem::remove(out_path);
  std::filesystem::remove(err_path);
  return r;
}

// A failure is reported as exactly one line on stderr (the command line's contract), mentioning `what`.
inline void expect_one_line_error(const CliResult& r, const std::string& what) {
  EXPECT_EQ(r.status, 2) << r.err;
  ASSERT_FALSE(r.err.empty());
  EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << "stderr: " << r.err;
  EXPECT_NE(r.err.find(what), std::string::npos) << "stderr: " << r.err;
}

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!std::filesystem::exists(psa_binary())) GTEST_SKIP() << psa_binary() << " not built (make all)";
  }
};

}  // namespace psa::test
