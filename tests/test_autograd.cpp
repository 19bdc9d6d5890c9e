// The tape's contract beyond single ops' gradients: the Philox stream that dropout masks come from, NoGrad
// scopes, gradients summing into leaves across backward() calls, and the loud failure of ops without a backward.
#include <gtest/gtest.h>

#include "test_util.h"

#include "autograd/gradcheck.h"
#include "autograd/ops.h"
#include "nn/optim.h"
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

// A seed of another shape or dtype than the output is refused (the rules would read it past its end).
TEST(Autograd, BackwardSeedMustMatchTheOutput) {
  Tensor a = Tensor::zeros({4, 4}).requires_grad_();
  EXPECT_EQ(error_of([&] { exp(a).backward(Tensor::ones({4})); }),
            "backward(): gradient [4] f32 for a tensor [4,4] f32");
  EXPECT_NE(error_of([&] { exp(a).backward(Tensor::ones({4, 4}, DType::f64)); }), "");
  EXPECT_NE(error_of([&] { a.backward(Tensor::ones({5})); }), "");  // on the leaf itself
  EXPECT_FALSE(a.grad().defined());
}

// A leaf's .grad is its own buffer: not the caller's seed, not another leaf's (add hands both inputs one
// gradient), so scaling one (clipping) or writing it changes nothing else.
TEST(Autograd, LeafGradientsShareNoMemory) {
  Tensor p1 = randn({3}, 1).requires_grad_(), p2 = randn({3}, 2).requires_grad_();
  const Tensor seed = Tensor::full({3}, 10.0);
  add(p1, p2).backward(seed);
  EXPECT_NE(p1.grad().raw(), p2.grad().raw());
  EXPECT_NE(p1.grad().raw(), seed.raw());
  EXPECT_NE(p2.grad().raw(), seed.raw());
  EXPECT_EQ(p1.grad().vec<float>(), seed.vec<float>());
  Tensor leaf = randn({3}, 3).requires_grad_();
  leaf.backward(seed);
  EXPECT_NE(leaf.grad().raw(), seed.raw());
}

// A tensor a backward rule saved, written in place between forward and backward (here by an optimizer step and
// by a copy), stops backward naming the op, instead of giving the gradient of the new values.
TEST(Autograd, SavedTensorWrittenInPlaceStopsBackward) {
  Tensor w = Tensor::from(std::vector<float>{2, 3}, {2}).requires_grad_();
  Tensor x = Tensor::from(std::vector<float>{5, 7}, {2}).requires_grad_();
  Tensor loss = sum(mul(w, x));
  Tensor(w).contiguous_copy_from(Tensor::from(std::vector<float>{100, 100}, {2}));
  const std::string e = error_of([&] { loss.backward(); });
  EXPECT_NE(e.find("backward(): mul: a tensor [2] its backward saved was written in place"), std::string::npos) << e;
  EXPECT_FALSE(x.grad().defined());

  Tensor p = randn({3, 4}, 6).requires_grad_(), y = randn({2, 3}, 7).requires_grad_();
  Tensor l2 = sum(matmul(y, p));  // saves p for y's gradient
  p.set_grad(Tensor::ones({3, 4}));
  nn::SGD({{"p", p}}, 0.1).update();
  EXPECT_NE(error_of([&] { l2.backward(); }).find("matmul: a tensor [3,4]"), std::string::npos);
  // A write to a tensor no rule saved (add keeps neither input) is no error.
  Tensor a = randn({2}, 8).requires_grad_(), b = randn({2}, 9).requires_grad_();
  Tensor l3 = sum(add(a, b));
  Tensor(a).contiguous_copy_from(Tensor::zeros({2}));
  EXPECT_EQ(error_of([&] { l3.backward(); }), "");
}

// Sizes whose byte count passes what a pointer can address are refused before allocating.
TEST(Autograd, TensorWhoseByteSizeOverflowsIsRefused) {
  EXPECT_NE(error_of([] { Tensor::empty({int64_t(1) << 61}, DType::f64); }).find("overflow a byte size"),
            std::string::npos);
}

// Empty operands as torch: a product over K = 0 is zeros, M or N = 0 an empty result; the mean of nothing is NaN.
TEST(Autograd, EmptyProductsAndMeans) {
  for (DType dt : {DType::f32, DType::f64}) {
    Tensor c = matmul(Tensor::zeros({3, 0}, dt), Tensor::zeros({0, 4}, dt));
    EXPECT_EQ(c.shape(), (Shape{3, 4}));
    for (double v : c.to_vector()) EXPECT_EQ(v, 0.0);
    EXPECT_EQ(matmul(Tensor::zeros({3, 5}, dt), Tensor::zeros({5, 0}, dt)).shape(), (Shape{3, 0}));
    EXPECT_EQ(matmul(Tensor::zeros({0, 5}, dt), Tensor::zeros({5, 2}, dt)).shape(), (Shape{0, 2}));
  }
  EXPECT_TRUE(std::isnan(mean(Tensor::zeros({0})).item()));
  EXPECT_TRUE(std::isnan(mean(Tensor::zeros({2, 0}), 1).to_vector()[0]));
}

// max and argmax as torch's: the first NaN of a row wins wherever it sits, else the first maximum.
TEST(Autograd, MaxAndArgmaxPickTheFirstNaN) {
  Tensor a = Tensor::from(std::vector<float>{1, NAN, 3, NAN, 5, 2, 4, 4, NAN}, {3, 3});
  std::vector<float> m = max(a, 1).vec<float>();
  EXPECT_TRUE(std::isnan(m[0]) && std::isnan(m[1]) && std::isnan(m[2]));
  EXPECT_EQ(argmax(a, 1).vec<int64_t>(), (std::vector<int64_t>{1, 0, 2}));
}

}  // namespace
}  // namespace psa
