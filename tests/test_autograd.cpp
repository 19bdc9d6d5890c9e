// The tape's contract beyond single ops' gradients: the Philox stream that dropout masks come from, NoGrad
// scopes, gradients summing into leaves across backward() calls, and the loud failure of ops without a backward.
#include <gtest/gtest.h>

#include "test_util.h"

#include "autograd/gradcheck.h"
#include "autograd/ops.h"
#include "tensor/rng.h"

namespace psa {
namespace {

using psa::test::error_of;

// Random123's words are c0..c3 and k0, k1, lowest first; philox4x32 takes them as 64-bit halves.
Philox4 philox_words(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  auto pack = [](uint32_t lo, uint32_t hi) { return (uint64_t)hi << 32 | lo; };
  return philox4x32(pack(c0, c1), pack(c2, c3), pack(k0, k1));
}

std::vector<uint32_t> words(const Philox4& r) { return {r.v[0], r.v[1], r.v[2], r.v[3]}; }

// The known-answer vectors of Random123 (kat_vectors, philox4x32 10 rounds): a stream that merely looks random
// would pass every statistical test here and still differ from other Philox implementations.
TEST(Philox, MatchesRandom123KnownAnswers) {
  EXPECT_EQ(words(philox_words(0, 0, 0, 0, 0, 0)),
            (std::vector<uint32_t>{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}));
  const uint32_t f = 0xffffffff;
  EXPECT_EQ(words(philox_words(f, f, f, f, f, f)),
            (std::vector<uint32_t>{0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}));
  EXPECT_EQ(words(philox_words(0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344, 0xa4093822, 0x299f31d0)),
            (std::vector<uint32_t>{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}));
}

TEST(Autograd, NoGradRecordsNothingAndRestoresTheOuterScope) {
  Tensor x = randn({3, 4}, 1).requires_grad_(), w = randn({4, 2}, 2).requires_grad_();
  {
    NoGrad outer;
    {
      NoGrad inner;
      EXPECT_FALSE(grad_enabled());
    }
    EXPECT_FALSE(grad_enabled()) << "an inner scope's end turned gradients back on";
    Tensor y = sum(matmul(x, w));
    EXPECT_FALSE(y.requires_grad());
    EXPECT_TRUE(y.is_leaf());
    EXPECT_TRUE(argmax(x, 1).is_leaf());  // the failing node is not attached either
    EXPECT_NE(error_of([&] { y.backward(); }).find("does not require grad"), std::string::npos);
  }
  EXPECT_TRUE(grad_enabled());
  Tensor y = sum(matmul(x, w));
  EXPECT_TRUE(y.requires_grad());
  EXPECT_FALSE(y.is_leaf());
}

// Leaves sum what every backward() brings until zero_grad: what gradient accumulation over micro-batches needs.
TEST(Autograd, BackwardCallsSumIntoTheLeafGradient) {
  Tensor x = randn({5}, 1).requires_grad_();
  sum(mul(x, x)).backward();
  const std::vector<float> once = x.grad().vec<float>();
  sum(mul(x, x)).backward();
  sum(mul_scalar(x, 3)).backward();  // another loss: its gradient, 3, is added too
  const std::vector<float> got = x.grad().vec<float>();
  ASSERT_EQ(got.size(), once.size());
  for (size_t i = 0; i < got.size(); ++i) EXPECT_EQ(got[i], (once[i] + once[i]) + 3.0f) << i;
  x.zero_grad();
  sum(mul(x, x)).backward();
  EXPECT_EQ(x.grad().vec<float>(), once);
}

// argmax is the op recorded with record_nondifferentiable: a gradient reaching it must stop the backward pass
// with its name, not pass through as zero.
TEST(Autograd, GradientReachingAnOpWithoutBackwardFailsNamingIt) {
  Tensor x = randn({1, 4}, 1).requires_grad_();
  Tensor idx = argmax(x, 1);
  ASSERT_TRUE(idx.requires_grad());
  const std::string e = error_of([&] { idx.backward(); });
  EXPECT_NE(e.find("argmax: has no backward"), std::string::npos) << e;
  EXPECT_FALSE(x.grad().defined());
}

}  // namespace
}  // namespace psa
