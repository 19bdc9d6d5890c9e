// The CPU emulator of tests/cuda_emu must behave like the hardware where the CUDA suite relies on it: barriers
// make shared writes visible (and their absence shows), shuffles move lanes' values as CUDA's do, divergent
// barriers stop the run instead of passing, and launch limits fail as the driver's do. These kernels are written
// here in the emulator's launch form (k * Config(...) * args(...)); the engine's .cu files get it from the
// Makefile's rewrite of <<<...>>>.
#include <gtest/gtest.h>

#ifdef PSA_CUDA_EMU
#include <cuda_runtime.h>

#include <cmath>
#include <string>
#include <vector>

namespace {

using cuda_emu::args;
using cuda_emu::Config;

// Each thread stores its value, then reads its mirror partner's: correct only if the barrier separates them.
template <bool kBarrier>
void mirror(const float* in, float* out) {
  float* s = reinterpret_cast<float*>(cuda_emu::dynamic_smem());
  const unsigned t = threadIdx.x, n = blockDim.x;
  s[t] = in[blockIdx.x * n + t];
  if (kBarrier) __syncthreads();
  out[blockIdx.x * n + t] = s[n - 1 - t];
}

std::vector<float> run_mirror(bool barrier) {
  const int blocks = 3, n = 64;
  std::vector<float> in(blocks * n), out(blocks * n, 0.f);
  for (int i = 0; i < blocks * n; ++i) in[i] = float(i);
  auto kernel = barrier ? mirror<true> : mirror<false>;
  kernel * Config(blocks, n, n * sizeof(float)) * args(in.data(), out.data());
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  return out;
}

TEST(CudaEmu, BarrierMakesSharedWritesVisible) {
  std::vector<float> out = run_mirror(true);
  for (int b = 0; b < 3; ++b)
    for (int t = 0; t < 64; ++t) ASSERT_EQ(out[b * 64 + t], float(b * 64 + 63 - t)) << "block " << b << " thread " << t;
}

TEST(CudaEmu, AMissingBarrierShowsInTheResult) {
  std::vector<float> out = run_mirror(false);
  int wrong = 0;
  for (int i = 0; i < 3 * 64; ++i) wrong += !(out[i] == float(i / 64 * 64 + 63 - i % 64));
  EXPECT_GT(wrong, 0) << "every thread read its partner's value although nothing ordered the write before the read";
}

void shuffles(const int* in, int* out) {
  const int w = threadIdx.x / 32, v = in[threadIdx.x];
  int sum = v;
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  out[4 * threadIdx.x + 0] = sum;
  out[4 * threadIdx.x + 1] = __shfl_sync(0xffffffffu, v, 5);            // broadcast of lane 5
  out[4 * threadIdx.x + 2] = __shfl_down_sync(0xffffffffu, v, 3);       // lanes 29..31 keep their own
  out[4 * threadIdx.x + 3] = __shfl_xor_sync(0xffffffffu, v, 1, 8) + w;  // width 8: pairs inside groups of 8
}

TEST(CudaEmu, ShufflesMoveValuesAsCudaDoes) {
  const int n = 64;
  std::vector<int> in(n), out(4 * n, -1);
  for (int i = 0; i < n; ++i) in[i] = i * i;
  shuffles * Config(1, n) * args(in.data(), out.data());
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  for (int i = 0; i < n; ++i) {
    int w = i / 32, lane = i % 32, sum = 0;
    for (int j = 0; j < 32; ++j) sum += in[w * 32 + j];
    EXPECT_EQ(out[4 * i + 0], sum) << i;
    EXPECT_EQ(out[4 * i + 1], in[w * 32 + 5]) << i;
    EXPECT_EQ(out[4 * i + 2], lane + 3 < 32 ? in[i + 3] : in[i]) << i;
    EXPECT_EQ(out[4 * i + 3], in[w * 32 + (lane ^ 1)] + w) << i;
  }
}

// Half of each warp waits at a shuffle, the other half at __syncthreads: a real GPU hangs here.
void divergent(int* out) {
  if (threadIdx.x % 32 < 16)
    out[threadIdx.x] = __shfl_sync(0xffffffffu, 1, 0);
  else
    __syncthreads();
}

TEST(CudaEmu, DivergentBarriersStopTheLaunch) {
  std::vector<int> out(64, 0);
  divergent * Config(2, 64) * args(out.data());
  cudaError_t e = cudaGetLastError();
  EXPECT_NE(e, cudaSuccess);
  std::string why = cudaGetErrorString(e);
  EXPECT_NE(why.find("deadlock in block (0, 0, 0)"), std::string::npos) << why;
  EXPECT_EQ(cudaGetLastError(), cudaSuccess) << "the error is not sticky, as for launch errors";
}

void write_index(int* out) {
  unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  unsigned thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  out[block * blockDim.x * blockDim.y * blockDim.z + thread] += 1;
}

TEST(CudaEmu, EveryThreadOfA3dGridRunsOnce) {
  dim3 grid(3, 2, 2), block(4, 3, 2);
  std::vector<int> out(12 * 24, 0);
  write_index * Config(grid, block) * args(out.data());
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  for (size_t i = 0; i < out.size(); ++i) ASSERT_EQ(out[i], 1) << i;
}

TEST(CudaEmu, LaunchLimitsFailLikeTheDriver) {
  std::vector<int> out(4096, 0);
  write_index * Config(1, 1025) * args(out.data());
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  write_index * Config(dim3(1, 65536), 32) * args(out.data());
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  for (int x : out) ASSERT_EQ(x, 0) << "a refused launch ran";

  // More than 48 KiB of dynamic shared memory needs the per-kernel opt-in first.
  std::vector<float> in(64, 1.f), res(64, 0.f);
  mirror<true> * Config(1, 64, 64 << 10) * args(in.data(), res.data());
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidValue);
  ASSERT_EQ(cudaFuncSetAttribute(mirror<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 << 10), cudaSuccess);
  mirror<true> * Config(1, 64, 64 << 10) * args(in.data(), res.data());
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_EQ(res[0], 1.f);
}

TEST(CudaEmu, Memcpy2DRefusesAPitchPastTheDeviceLimit) {
  std::vector<char> src(4 * 100, 'x'), dst(4 * 100, 0);
  int limit = 0;
  ASSERT_EQ(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxPitch, 0), cudaSuccess);
  EXPECT_EQ(limit, 2147483647) << "an H100's cudaDeviceProp::memPitch";
  size_t old = cuda_emu::set_max_pitch(64);
  EXPECT_EQ(cudaMemcpy2DAsync(dst.data(), 100, src.data(), 100, 10, 4, cudaMemcpyDeviceToDevice),
            cudaErrorInvalidPitchValue);
  EXPECT_EQ(dst[0], 0) << "a refused copy ran";
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidPitchValue);
  cuda_emu::set_max_pitch(old);
  EXPECT_EQ(cudaMemcpy2DAsync(dst.data(), 100, src.data(), 100, 10, 4, cudaMemcpyDeviceToDevice), cudaSuccess);
  EXPECT_EQ(dst[300], 'x');
}

}  // namespace

#else

TEST(CudaEmu, RunsInTheEmulatorBuild) {
  GTEST_SKIP() << "the CPU emulator's own tests run in the CUDA=emu build (make test-cuda-emu)";
}

#endif
