// The five Hugging Face / timm / torch fixtures, through the same code as `psa conform`.
#include <gtest/gtest.h>

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

}  // namespace
}  // namespace psa
