// The `psa` command line: one binary, one subcommand per task. Errors print one line and exit with status 2.
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>

#include "tensor/error.h"
#include "tools/cli.h"

namespace psa {
int cmd_conform(int argc, char** argv);
int cmd_infer(int argc, char** argv);
int cmd_eval(int argc, char** argv);
int cmd_audit(int argc, char** argv);
int cmd_export(int argc, char** argv);
int cmd_inspect(int argc, char** argv);
int cmd_data(int argc, char** argv);
int cmd_tokenizer(int argc, char** argv);
int cmd_train(int argc, char** argv);
int cmd_bench_step(int argc, char** argv);
int cmd_bench_gemm(int argc, char** argv);
}

namespace {

struct Subcommand {
  const char* name;
  int (*run)(int, char**);
  const char* help;
};

const Subcommand kCommands[] = {
    {"data", psa::cmd_data, "generate the synthetic safety dataset"},
    {"tokenizer", psa::cmd_tokenizer, "train a byte-level BPE tokenizer on a dataset"},
    {"train", psa::cmd_train, "train the base VLM, Stage I and Stage II"},
    {"infer", psa::cmd_infer, "answer one image + question with dynamic safety control"},
    {"eval", psa::cmd_eval, "run the benchmark on checkpoints; JSON report + Markdown table"},
    {"audit", psa::cmd_audit, "compare two checkpoints' weights per module group"},
    {"inspect", psa::cmd_inspect, "what a checkpoint folder or safetensors file holds (config, tensors, sizes)"},
    {"export", psa::cmd_export, "a Stage II checkpoint with its LoRA adapters merged into the weights"},
    {"conform", psa::cmd_conform, "check the engine against Hugging Face / timm / torch golden data"},
    {"bench-step", psa::cmd_bench_step, "time training steps (forward, backward, clip, AdamW); --scaling sweeps"},
    {"bench-gemm", psa::cmd_bench_gemm, "CUDA SGEMM: the hand-written kernel vs cuBLAS (validated, CUDA events)"},
};

// OMP_NUM_THREADS is read by libgomp at the first parallel region, where a huge value crashes it.
void check_thread_env() {
  const char* env = std::getenv("OMP_NUM_THREADS");
  if (!env || !*env) return;
  // A list ("4,2") is libgomp's nested form; anything else it would warn about in its own words and ignore.
  // Nested regions (eval's records, each record's kernels) run the product of the list at once.
  long long all = 1;
  for (const char* p = env;; ++p) {
    char* end = nullptr;
    errno = 0;
    const long long n = std::strtoll(p, &end, 10);
    PSA_CHECK(end != p && errno == 0 && n >= 1 && n <= psa::cli::kMaxThreads && (*end == 0 || *end == ','),
              "OMP_NUM_THREADS=", env, ": expected 1 to ", psa::cli::kMaxThreads, " (or a comma-separated list)");
    all *= n;
    PSA_CHECK(all <= psa::cli::kMaxThreads, "OMP_NUM_THREADS=", env, ": the list's levels nest, at least ", all,
              " threads in all, more than ", psa::cli::kMaxThreads);
    if (*end == 0) return;
    p = end;
  }
}

// One line on stderr, whatever the message holds: a newline in a path would otherwise start a second one.
int report_error(const char* command, const std::string& message) {
  std::string line;
  for (char ch : message) line += ch == '\n' ? std::string("\\n") : ch == '\r' ? std::string("\\r") : std::string(1, ch);
  std::fprintf(stderr, "psa %s: error: %s\n", command, line.c_str());
  return 2;
}

// Help that never reached its reader (a full disk, a closed pipe) is a failure like any other lost output.
int finish_stdout(int rc) {
  if (std::fflush(stdout) == 0 && !std::ferror(stdout)) return rc;
  std::fprintf(stderr, "psa: error: cannot write to standard output\n");
  return 2;
}

void usage(FILE* to) {
  std::fprintf(to, "usage: psa <command> [options]   (psa <command> --help for details)\n\ncommands:\n");
  for (const Subcommand& c : kCommands) std::fprintf(to, "  %-11s %s\n", c.name, c.help);
}

}  // namespace

int main(int argc, char** argv) {
  // Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning threads steal the core
  // from the one doing the work (10x slower steps were measured). Must be set before the first parallel region.
  setenv("OMP_WAIT_POLICY", "passive", 0);
  // A reader that went away (`psa inspect ... | head`) makes writes fail instead of killing the process: a
  // training run outlives its log's reader, and finish_stdout reports the lost output with status 2.
  std::signal(SIGPIPE, SIG_IGN);
  // Likewise a file-size limit (ulimit -f): the write fails with EFBIG, reported and cleaned up like a full disk.
  std::signal(SIGXFSZ, SIG_IGN);
  if (argc < 2) {  // usage as the error it is: on stderr
    usage(stderr);
    return 2;
  }
  if (!std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h") || !std::strcmp(argv[1], "help")) {
    usage(stdout);
    return finish_stdout(0);
  }
  for (const Subcommand& c : kCommands) {
    if (std::strcmp(argv[1], c.name)) continue;
    try {
      check_thread_env();
      return finish_stdout(c.run(argc - 2, argv + 2));
    } catch (const std::filesystem::filesystem_error& e) {  // a symlink loop, a name too long for the system
      const std::string path = e.path1().empty() ? "filesystem" : e.path1().string();
      return report_error(c.name, path + ": cannot access: " + e.code().message());
    } catch (const std::exception& e) {
      return report_error(c.name, e.what());
    }
  }
  std::fprintf(stderr, "psa: unknown command '%s' (psa --help lists the commands)\n", argv[1]);
  return 2;
}
