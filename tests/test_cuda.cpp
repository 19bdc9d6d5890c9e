// CUDA checks. Without a GPU (or in a CPU-only build) they skip with a visible message; the CUDA sources are
// still compiled and linked whenever nvcc exists.
#include <gtest/gtest.h>

#include "tensor/device.h"
#include "tensor/tensor.h"

namespace psa {
namespace {

TEST(Cuda, HostDeviceRoundTripIsExact) {
  if (!gpu::available()) GTEST_SKIP() << "CUDA tests skipped: " << gpu::describe();
  Tensor h = Tensor::from(std::vector<float>{1.5f, -2.0f, 3.25f, 0.0f, 7.0f}, {5});
  Tensor back = h.to(Device::cuda).to(Device::cpu);
  EXPECT_EQ(back.vec<float>(), h.vec<float>());
  EXPECT_GT(gpu::peak_bytes(), 0u);
}

}  // namespace
}  // namespace psa
