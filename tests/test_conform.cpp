// The five Hugging Face / timm / torch fixtures, through the same code as `psa conform`.
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <map>

#include "autograd/ops.h"
#include "nn/checkpoint.h"
#include "nn/conform.h"

namespace psa {
namespace {

class Conform : public ::testing::TestWithParam<const char*> {};

TEST_P(Conform, MatchesReferenceWithin1e4) {
  nn::ConformReport r = nn::conform(std::string("tests/data/hf/") + GetParam());
  EXPECT_GT(r.entries.size(), 5u);
  for (const nn::ConformEntry& e : r.entries) EXPECT_TRUE(e.ok) << e.name << " relative error " << e.rel_err;
  EXPECT_LT(r.worst(), 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Conform, ::testing::Values("clip_vision", "llama", "llava", "c_abstractor", "mha"));

TEST(ConformErrors, UnknownKindNamesTheFile) {
  try {
    nn::detect_kind("tests/data/bad");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tests/data/bad/config.json"), std::string::npos) << e.what();
  }
}

// An output of the right size in the wrong layout ([2, 7, 64] stored as [14, 64]) is a mismatch, not a pass:
// the comparison used to look at element counts only.
TEST(ConformErrors, AnOutputOfAnotherShapeIsRefused) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::path(::testing::TempDir()) / ("psa_conform_shape_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::copy("tests/data/hf/mha", dir, fs::copy_options::recursive);
  std::map<std::string, std::string> meta;
  nn::StateDict io = nn::read_tensors((dir / "io.safetensors").string(), &meta);
  io["y"] = reshape(io.at("y"), {14, 64});
  nn::write_tensors((dir / "io.safetensors").string(), io, meta);
  try {
    nn::conform(dir.string());
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), "conform: 'y': ours [2,7,64] vs [14,64]");
  }
  fs::remove_all(dir);
}

}  // namespace
}  // namespace psa
