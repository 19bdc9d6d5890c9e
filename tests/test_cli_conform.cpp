// `psa conform` and `psa audit` on bad input: a fixture config.json with a zero, negative, mistyped, absurd or
// unsupported value, bad --tol / --device values, a file that is not safetensors, a symlink loop. Each is refused
// before any work with one line on stderr naming the file (and the key or option), exit status 2.
// Runs ./build/psa (or $PSA_BIN) from the repository root; the binary tests skip when it has not been built.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <sstream>

#include "nn/conform.h"
#include "nn/json.h"
#include "nn/safetensors.h"
#include "tensor/device.h"
#include "tests/test_util.h"
#include "tests/cli_util.h"

namespace {

namespace fs = std::filesystem;
using psa::json::Value;

using psa::test::expect_one_line_error;
using psa::test::run_psa;
using psa::test::slurp;
using Result = psa::test::CliResult;
const char* const kPsa = psa::test::psa_binary();

class ConformCli : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(kPsa)) GTEST_SKIP() << kPsa << " not built (make all)";
    dir_ = ::testing::TempDir() + "psa_conform_cli_" + std::to_string(::getpid());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    if (!dir_.empty()) fs::remove_all(dir_);
  }

  // A copy of tests/data/hf/<kind> whose config.json has `path` (keys, outermost first) set to `v`.
  std::string mutated(const std::string& kind, std::initializer_list<const char*> path, const Value& v) {
    const std::string out = dir_ + "/" + kind + std::to_string(copies_++);
    fs::copy("tests/data/hf/" + kind, out, fs::copy_options::recursive);
    Value c = psa::json::parse_file(out + "/config.json");
    Value* at = &c;
    for (auto it = path.begin(); it + 1 != path.end(); ++it)
      for (auto& kv : at->obj)
        if (kv.first == *it) at = &kv.second;
    at->set(*(path.end() - 1), v);
    psa::json::write_file(out + "/config.json", psa::json::dump(c, 1));
    return out;
  }

  // `psa conform` on the mutated copy: refused with one line that starts with its config.json and holds `what`.
  void expect_refused(const std::string& kind, std::initializer_list<const char*> path, const Value& v,
                      const std::string& what) {
    const std::string fixture = mutated(kind, path, v);
    Result r = run_psa("conform --quiet " + fixture);
    expect_one_line_error(r, fixture + "/config.json: " + what);
    EXPECT_EQ(r.out, "");
  }

  std::string dir_;
  int copies_ = 0;
};

// ---- problem 1: head counts and sizes of the MHA and C-Abstractor configs

TEST_F(ConformCli, MhaZeroOrNegativeHeadsAreRefusedNotADivisionByZero) {
  expect_refused("mha", {"num_heads"}, Value(0), "key 'num_heads': 0 out of range [1, 64]");
  expect_refused("mha", {"num_heads"}, Value(-8), "key 'num_heads': -8 out of range [1, 64]");
  expect_refused("mha", {"num_heads"}, Value(7), "key 'num_heads': embed_dim 64 not divisible by 7 heads");
  expect_refused("mha", {"embed_dim"}, Value(0), "key 'embed_dim': 0 out of range");
  expect_refused("mha", {"batch_first"}, Value(false), "key 'batch_first': false is not supported");
}

TEST_F(ConformCli, CAbstractorSizesAreCheckedWhenRead) {
  expect_refused("c_abstractor", {"num_queries"}, Value(0), "key 'num_queries': 0 out of range");
  expect_refused("c_abstractor", {"hidden_size"}, Value(-72), "key 'hidden_size': -72 out of range");
  expect_refused("c_abstractor", {"depth"}, Value(0), "key 'depth': 0 out of range");
  expect_refused("c_abstractor", {"se_ratio"}, Value(-0.25), "key 'se_ratio': -0.25 out of range [0, 1]");
  expect_refused("c_abstractor", {"eps"}, Value(0), "key 'eps': 0 out of range");
  expect_refused("c_abstractor", {"act"}, Value("relu"), "key 'act': 'relu' is not supported");
}

// ---- problem 2: the key and the file in every config error; absurd sizes before allocating; NaN-making values

TEST_F(ConformCli, MistypedValueNamesTheFileAndTheKey) {
  expect_refused("mha", {"num_heads"}, Value("8"), "key 'num_heads': expected number, got string");
  expect_refused("clip_vision", {"patch_size"}, Value(0), "key 'patch_size': 0 out of range");
  expect_refused("llama", {"tie_word_embeddings"}, Value(1), "key 'tie_word_embeddings': expected bool, got number");
  expect_refused("mha", {"kind"}, Value(3), "key 'kind': expected string, got number");
}

TEST_F(ConformCli, UnparsableConfigNamesTheFileOnce) {
  const std::string fixture = dir_ + "/mha";
  fs::copy("tests/data/hf/mha", fixture, fs::copy_options::recursive);
  std::ofstream(fixture + "/config.json") << "{\"kind\": ";
  Result r = run_psa("conform " + fixture);
  expect_one_line_error(r, fixture + "/config.json:1:");
  EXPECT_EQ(r.err.find("config.json: " + fixture), std::string::npos) << r.err;
}

TEST_F(ConformCli, NestedConfigErrorsNameTheWholePath) {
  expect_refused("llava", {"vision_config", "num_attention_heads"}, Value(0),
                 "key 'vision_config': key 'num_attention_heads': 0 out of range");
  expect_refused("llava", {"text_config", "rope_parameters", "rope_theta"}, Value(0),
                 "key 'text_config': key 'rope_parameters': key 'rope_theta': 0 out of range");
  expect_refused("llava", {"image_token_index"}, Value(97), "key 'image_token_index': 97 out of range [0, 96]");
  expect_refused("llava", {"projector_hidden_act"}, Value("gelu_new"),
                 "key 'projector_hidden_act': activation: unknown activation 'gelu_new'");
}

TEST_F(ConformCli, AbsurdSizesAreRefusedBeforeAllocating) {
  expect_refused("mha", {"embed_dim"}, Value(1e9), "key 'embed_dim': 1000000000 out of range [1, 65536]");
  // Every dimension within its range, the product far beyond the 30 kB of weights the folder holds.
  const std::string big = mutated("llama", {"intermediate_size"}, Value(1 << 20));
  Result r = run_psa("conform --quiet " + big);
  expect_one_line_error(r, big + "/config.json: describes a model of at least ");
  EXPECT_NE(r.err.find("but the weights hold"), std::string::npos) << r.err;
}

TEST_F(ConformCli, ValuesThatWouldRunIntoNaNOrBeIgnoredAreRefused) {
  expect_refused("llama", {"rms_norm_eps"}, Value(-1), "key 'rms_norm_eps': -1 out of range [1e-30, 1]");
  expect_refused("llama", {"rope_parameters", "rope_theta"}, Value(0),
                 "key 'rope_parameters': key 'rope_theta': 0 out of range");
  expect_refused("llama", {"rope_parameters", "rope_type"}, Value("yarn"),
                 "key 'rope_parameters': key 'rope_type': 'yarn' is not supported");
  expect_refused("llama", {"hidden_act"}, Value("relu"), "key 'hidden_act': 'relu' is not supported");
  expect_refused("llama", {"head_dim"}, Value(0), "key 'head_dim': 0 out of range");
  expect_refused("llama", {"head_dim"}, Value(15), "llama config: head dimension 15 is odd");
  expect_refused("clip_vision", {"layer_norm_eps"}, Value(0), "key 'layer_norm_eps': 0 out of range");
  expect_refused("clip_vision", {"hidden_act"}, Value("gelu_new"), "key 'hidden_act': activation: unknown activation");
}

TEST(ConformReport, ANaNErrorIsTheWorstNeverZero) {
  psa::nn::ConformReport r;
  r.entries = {{"y", 1e-6, true}, {"loss", std::nan(""), false}, {"grad.w", 2e-6, true}};
  EXPECT_TRUE(std::isnan(r.worst()));
  EXPECT_FALSE(r.ok());
  r.entries = {{"y", 1e-6, true}, {"loss", 3e-6, true}};
  EXPECT_EQ(r.worst(), 3e-6);
}

TEST_F(ConformCli, GoodFixturesStillPass) {
  Result r = run_psa("conform --quiet tests/data/hf/mha tests/data/hf/c_abstractor");
  EXPECT_EQ(r.status, 0) << r.out << r.err;
  EXPECT_EQ(r.err, "");
}

// ---- problem 3: --tol and --device

TEST_F(ConformCli, ToleranceMustBeAPositiveFiniteNumber) {
  for (const char* tol : {"-1", "nan", "0", "inf", "2", "abc"})
    expect_one_line_error(run_psa(std::string("conform --quiet --tol ") + tol + " tests/data/hf/mha"), "--tol");
  Result ok = run_psa("conform --quiet --tol 1e-3 tests/data/hf/mha");
  EXPECT_EQ(ok.status, 0) << ok.err;
}

TEST_F(ConformCli, DeviceWithoutAGpu) {
  if (psa::gpu::available()) GTEST_SKIP() << "this machine has a GPU";
  expect_one_line_error(run_psa("conform --quiet --device cuda tests/data/hf/mha"),
                        "conform --device cuda: no usable GPU (");
  Result all = run_psa("conform --quiet --device all tests/data/hf/mha");
  EXPECT_EQ(all.status, 0) << all.err;
  EXPECT_NE(all.out.find("CUDA skipped, no usable GPU"), std::string::npos) << all.out;
  EXPECT_NE(all.out.find("[mha, cpu]"), std::string::npos) << all.out;
  expect_one_line_error(run_psa("conform --device gpu tests/data/hf/mha"), "--device: expected cpu, cuda or all");
}

// ---- problem 4: not a safetensors file; filesystem errors

TEST_F(ConformCli, AuditOfATokenizerFileSaysItIsNotSafetensors) {
  const std::string tok = "tests/data/bad/tokenizer_unknown_key.json";
  expect_one_line_error(run_psa("audit " + tok + " " + tok), tok + ": not a safetensors file");
}

TEST(SafetensorsNotAFile, JsonAndTextAreNotSafetensors) {
  const std::string dir = ::testing::TempDir() + "psa_not_st_" + std::to_string(::getpid());
  fs::create_directories(dir);
  const std::string json_file = dir + "/tokenizer.json", small = dir + "/small.txt";
  std::ofstream(json_file) << "{\"version\": \"1.0\", \"model\": {\"type\": \"BPE\", \"vocab\": {}}}";
  // Eight bytes that decode to a small header length, then text.
  std::ofstream(small) << std::string("\x10\0\0\0\0\0\0\0", 8) << "hello, world!!!!";
  for (const std::string& f : {json_file, small}) {
    const std::string e = psa::test::error_of([&] { psa::st::File::open(f); });
    EXPECT_EQ(e.rfind(f + ": not a safetensors file", 0), 0u) << e;
  }
  fs::remove_all(dir);
}

TEST_F(ConformCli, SymlinkLoopGivesOneLineNamingThePath) {
  const std::string loop = dir_ + "/loop";
  fs::create_symlink(loop, loop);
  Result a = run_psa("audit " + loop + " " + loop);
  expect_one_line_error(a, loop + ": cannot access: Too many levels of symbolic links");
  EXPECT_EQ(a.err.find("filesystem error"), std::string::npos) << a.err;
  expect_one_line_error(run_psa("conform " + loop), loop + ": cannot access: Too many levels of symbolic links");
}

// ---- problem 5: other arguments

TEST_F(ConformCli, EmptyPathsAreRefused) {
  expect_one_line_error(run_psa("conform ''"), "conform: empty fixture folder name");
  expect_one_line_error(run_psa("audit '' tests/data/hf/mha/model.safetensors"), "audit: empty checkpoint path");
}

TEST_F(ConformCli, EveryFolderIsCheckedBeforeTheFirstRuns) {
  Result r = run_psa("conform --quiet tests/data/hf/mha " + dir_ + "/missing");
  expect_one_line_error(r, dir_ + "/missing: not a fixture folder (no such directory)");
  EXPECT_EQ(r.out, "");  // the good folder did not run first
}

}  // namespace
