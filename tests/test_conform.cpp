// The five Hugging Face / timm / torch fixtures, through the same code as `psa conform`.
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <functional>
#include <map>

#include "autograd/ops.h"
#include "nn/checkpoint.h"
#include "nn/conform.h"

namespace psa {
namespace {

class Conform : public ::testing::TestWithParam<const char*> {};

// The fixtures expect fp32 rounding only (their README: around 1e-6); the worst here is 1.8e-6 (c_abstractor), so
// 1e-5, tighter than the command's default of 1e-4.
TEST_P(Conform, MatchesReferenceWithin1e5) {
  nn::ConformReport r = nn::conform(std::string("tests/data/hf/") + GetParam(), Device::cpu, 1e-5);
  EXPECT_GT(r.entries.size(), 5u);
  for (const nn::ConformEntry& e : r.entries) EXPECT_TRUE(e.ok) << e.name << " relative error " << e.rel_err;
  EXPECT_LT(r.worst(), 1e-5);
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

namespace fs = std::filesystem;

// A copy of the mha fixture in a temporary folder (removed with the object) whose io.safetensors `edit` changed.
struct EditedFixture {
  fs::path dir;
  EditedFixture(const std::string& tag, const std::function<void(nn::StateDict&)>& edit)
      : dir(fs::path(::testing::TempDir()) / ("psa_conform_" + tag + "_" + std::to_string(::getpid()))) {
    fs::remove_all(dir);
    fs::copy("tests/data/hf/mha", dir, fs::copy_options::recursive);
    std::map<std::string, std::string> meta;
    nn::StateDict io = nn::read_tensors((dir / "io.safetensors").string(), &meta);
    edit(io);
    nn::write_tensors((dir / "io.safetensors").string(), io, meta);
  }
  ~EditedFixture() { fs::remove_all(dir); }
};

// An output of the right size in the wrong layout ([2, 7, 64] stored as [14, 64]) is a mismatch, not a pass:
// the comparison used to look at element counts only.
TEST(ConformErrors, AnOutputOfAnotherShapeIsRefused) {
  EditedFixture f("shape", [](nn::StateDict& io) { io["y"] = reshape(io.at("y"), {14, 64}); });
  try {
    nn::conform(f.dir.string());
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), "conform: 'y': ours [2,7,64] vs [14,64]");
  }
}

// A stored tensor the run does not compare (here a gradient naming no parameter; likewise a hidden state past the
// model's layers) fails the run instead of shrinking it.
TEST(ConformErrors, AStoredTensorLeftUncomparedFails) {
  EditedFixture f("extra", [](nn::StateDict& io) { io["grad.extra_proj.weight"] = io.at("y"); });
  const nn::ConformReport r = nn::conform(f.dir.string());
  EXPECT_FALSE(r.ok());
  int unchecked = 0;
  for (const nn::ConformEntry& e : r.entries) {
    const bool extra = e.name == "unchecked.grad.extra_proj.weight";
    unchecked += extra;
    EXPECT_EQ(e.ok, !extra) << e.name;
  }
  EXPECT_EQ(unchecked, 1);
}

}  // namespace
}  // namespace psa
