// The CPU emulator's scheduler and runtime (the design is in cuda_runtime.h here). Compiled into libpsa only in
// the CUDA=emu build.
#if !defined(__x86_64__)
#include <algorithm>
#include <utility>
#include <ucontext.h>
#endif

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "cublas_v2.h"
#include "cuda_runtime.h"

namespace cuda_emu {
namespace {

constexpr size_t kStackBytes = 128 << 10;
constexpr int kEmulatedSms = 132;  // an H100 SXM's
constexpr size_t kDefaultSmemLimit = 48 << 10, kOptinSmemLimit = 227 << 10;  // an H100's
constexpr cudaError_t kLaunchFailure = cudaError_t(719);                     // cudaErrorLaunchFailure

enum class Wait { none, block, warp, done };

// Fiber switching. glibc's swapcontext saves the signal mask with a system call at every switch, which made the
// emulator spend half its time in the kernel; on x86-64 a switch is the six callee-saved registers and rsp.
#if defined(__x86_64__)
extern "C" void cuda_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl cuda_emu_switch
  .type cuda_emu_switch, @function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch, .-cuda_emu_switch
)");
struct Context {
  void* sp = nullptr;
};
inline void switch_context(Context& from, Context& to) { cuda_emu_switch(&from.sp, to.sp); }
// A fresh stack whose first switch "returns" into entry with the alignment of a call (rsp = 8 mod 16).
inline void make_context(Context& c, char* stack, size_t bytes, void (*entry)(), Context&) {
  auto* top = reinterpret_cast<uintptr_t*>((reinterpret_cast<uintptr_t>(stack + bytes)) & ~uintptr_t(15));
  uintptr_t* sp = top - 8;  // r15 r14 r13 r12 rbx rbp, entry, a null return address for entry
  for (int i = 0; i < 6; ++i) sp[i] = 0;
  sp[6] = reinterpret_cast<uintptr_t>(entry);
  sp[7] = 0;
  c.sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void make_context(Context& c, char* stack, size_t bytes, void (*entry)(), Context& link) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = &link.uc;
  makecontext(&c.uc, entry, 0);
}
#endif

struct Fiber {
  Context ctx;
  Wait wait = Wait::none;
  unsigned shuffles = 0;  // picks the slot bank of its next shuffle
};

// The block being run (one at a time).
struct Block {
  std::vector<Fiber> fibers;
  // Shuffle exchange: two banks of one slot per thread, used by alternate shuffles. A lane reuses a bank only
  // after the next shuffle's barrier, which opens once every lane has read this one: one barrier per shuffle.
  std::vector<uint64_t> slots;
  Context scheduler;
  int current = 0;
  const std::function<void()>* body = nullptr;
};

std::mutex g_grid_mutex;  // kernels from several host threads run one grid at a time
Block g_block;
std::unique_ptr<char[]> g_stacks;
size_t g_stack_count = 0;
alignas(16) unsigned char g_smem[kOptinSmemLimit];
std::map<const void*, int> g_smem_optin;
cudaError_t g_last_error = cudaSuccess;
cudaError_t g_message_error = cudaSuccess;  // the error g_last_message explains (it outlives cudaGetLastError)
std::string g_last_message;
uint64_t g_rng = 0x9E3779B97F4A7C15ull;

cudaError_t record_error(cudaError_t e, std::string message) {
  g_last_error = g_message_error = e;
  g_last_message = std::move(message);
  return e;
}

uint3 thread_index(int linear, const dim3& d) {
  if (d.y == 1 && d.z == 1) return {unsigned(linear), 0, 0};  // the common case, without divisions
  return {unsigned(linear % d.x), unsigned(linear / d.x % d.y), unsigned(linear / (d.x * d.y))};
}

// A finished fiber hands control back for good (it is never resumed, so this never returns).
void fiber_main() {
  (*g_block.body)();
  Fiber& f = g_block.fibers[g_block.current];
  f.wait = Wait::done;
  switch_context(f.ctx, g_block.scheduler);
}

void wait_at(Wait w) {
  Fiber& f = g_block.fibers[g_block.current];
  f.wait = w;
  switch_context(f.ctx, g_block.scheduler);
}

uint64_t next_random() {
  g_rng ^= g_rng << 13, g_rng ^= g_rng >> 7, g_rng ^= g_rng << 17;
  return g_rng;
}

template <typename T>
void shuffle_order(std::vector<T>& v) {
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[(unsigned __int128)next_random() * i >> 64]);
}

// Runs the lanes of the warp starting at thread w0 until each has exited or waits at __syncthreads, opening the
// warp's barrier (shuffle, __syncwarp) whenever all its lanes wait there. Returns "" or why the warp cannot go on
// (a real GPU would hang there).
std::string run_warp(Block& b, int w0, const dim3& block) {
  const int lanes = std::min(32, (int)b.fibers.size() - w0);
  std::vector<int> order(lanes);
  for (int i = 0; i < lanes; ++i) order[i] = w0 + i;
  for (;;) {
    shuffle_order(order);  // a new order at every phase, so that a missing barrier meets an unwritten value
    for (int i : order) {
      if (b.fibers[i].wait != Wait::none) continue;
      b.current = i;
      threadIdx = thread_index(i, block);
      switch_context(b.scheduler, b.fibers[i].ctx);
    }
    int at_warp = 0, done = 0;
    for (int i = w0; i < w0 + lanes; ++i) at_warp += b.fibers[i].wait == Wait::warp, done += b.fibers[i].wait == Wait::done;
    if (at_warp == 0) return "";
    if (at_warp + done < lanes)
      return "warp " + std::to_string(w0 / 32) + ": " + std::to_string(at_warp) + " lanes wait at a shuffle/__syncwarp, " +
             std::to_string(lanes - at_warp - done) + " at __syncthreads";
    if (done > 0)
      return "warp " + std::to_string(w0 / 32) + ": " + std::to_string(done) +
             " lanes exited while the others wait at a full-mask shuffle";
    for (int i = w0; i < w0 + lanes; ++i) b.fibers[i].wait = Wait::none;
  }
}

// Runs one block to the end, one __syncthreads phase at a time (the warps in a new order each phase); "" or the
// deadlock.
std::string run_block(const dim3& block, size_t smem) {
  Block& b = g_block;
  const int n = int(block.x * block.y * block.z);
  b.fibers.assign(n, Fiber{});
  b.slots.assign(2 * n, 0);
  std::memset(g_smem, 0xFF, smem);  // NaN: reads of shared data nobody wrote show up in the results
  for (int i = 0; i < n; ++i)
    make_context(b.fibers[i].ctx, g_stacks.get() + i * kStackBytes, kStackBytes, fiber_main, b.scheduler);
  std::vector<int> warps;
  for (int w0 = 0; w0 < n; w0 += 32) warps.push_back(w0);
  for (;;) {
    shuffle_order(warps);
    for (int w0 : warps)
      if (std::string why = run_warp(b, w0, block); !why.empty()) return why;
    bool live = false;
    for (Fiber& f : b.fibers)
      if (f.wait == Wait::block) f.wait = Wait::none, live = true;
    if (!live) return "";
  }
}

struct Problem {
  cudaError_t code;
  std::string message;  // empty: the launch is valid
};

Problem launch_problem(const void* kernel, const Config& c) {
  const dim3 &g = c.grid, &b = c.block;
  uint64_t threads = uint64_t(b.x) * b.y * b.z;
  if (threads == 0 || threads > 1024 || b.z > 64 || g.x == 0 || g.y == 0 || g.z == 0 || g.x > 0x7fffffffu ||
      g.y > 65535 || g.z > 65535)
    return {cudaErrorInvalidConfiguration, "invalid configuration: grid (" + std::to_string(g.x) + ", " + std::to_string(g.y) + ", " +
           std::to_string(g.z) + "), block (" + std::to_string(b.x) + ", " + std::to_string(b.y) + ", " +
           std::to_string(b.z) + ")"};
  if (c.smem > kDefaultSmemLimit) {
    auto it = g_smem_optin.find(kernel);
    int optin = it == g_smem_optin.end() ? 0 : it->second;
    if (c.smem > kOptinSmemLimit || (int64_t)c.smem > optin)
      return {cudaErrorInvalidValue, "invalid argument: " + std::to_string(c.smem) +
                                         " bytes of dynamic shared memory (opt-in for this kernel: " +
                                         std::to_string(optin) + ")"};
  }
  return {cudaSuccess, ""};
}

}  // namespace

void set_max_dynamic_smem(const void* kernel, int bytes) { g_smem_optin[kernel] = bytes; }

size_t g_max_pitch = 2147483647;  // an H100's cudaDeviceProp::memPitch
size_t set_max_pitch(size_t bytes) { return std::exchange(g_max_pitch, bytes); }
unsigned char* dynamic_smem() { return g_smem; }
void block_barrier() { wait_at(Wait::block); }
int lane_id() { return g_block.current % 32; }  // current: the running thread's linear index in the block
uint64_t* next_shuffle_slots() {
  Fiber& f = g_block.fibers[g_block.current];
  size_t bank = f.shuffles++ & 1;
  return g_block.slots.data() + bank * g_block.fibers.size() + (g_block.current & ~31);
}
void warp_barrier(unsigned mask) {
  if (mask != 0xffffffffu) {
    std::fprintf(stderr, "cuda_emu: partial warp masks (0x%08x) are not emulated\n", mask);
    std::abort();
  }
  wait_at(Wait::warp);
}

namespace {

// CUDA_EMU_LAUNCH_LOG=FILE: at exit, one line per launch site (file:line) with its launches, the blocks of
// its smallest and largest grid, threads per block, the seconds the emulator spent in it and the part of
// them spent in grids of fewer blocks than the emulated device's SMs. The seconds are the work the threads did,
// roughly (barriers cost extra here): much work in small grids is work that would leave most of a GPU idle.
struct SiteStats {
  int64_t launches = 0, min_blocks = INT64_MAX, max_blocks = 0, threads = 0;
  double seconds = 0, seconds_below_sms = 0;
};

struct LaunchLog {
  const char* path = std::getenv("CUDA_EMU_LAUNCH_LOG");
  std::map<std::string, SiteStats> sites;
  ~LaunchLog() {
    if (!path) return;
    FILE* f = std::fopen(path, "w");
    if (!f) return;
    std::fprintf(f, "site\tlaunches\tmin_blocks\tmax_blocks\tthreads_per_block\temulated_s\temulated_s_below_%d_blocks\n",
                 kEmulatedSms);
    for (const auto& [site, s] : sites)
      std::fprintf(f, "%s\t%ld\t%ld\t%ld\t%ld\t%.4f\t%.4f\n", site.c_str(), (long)s.launches, (long)s.min_blocks,
                   (long)s.max_blocks, (long)s.threads, s.seconds, s.seconds_below_sms);
    std::fclose(f);
  }
};

LaunchLog g_launch_log;

void log_launch(const Config& c, double seconds) {
  SiteStats& s = g_launch_log.sites[std::string(c.file) + ":" + std::to_string(c.line)];
  const int64_t blocks = int64_t(c.grid.x) * c.grid.y * c.grid.z;
  ++s.launches;
  s.min_blocks = std::min(s.min_blocks, blocks);
  s.max_blocks = std::max(s.max_blocks, blocks);
  s.threads = int64_t(c.block.x) * c.block.y * c.block.z;
  s.seconds += seconds;
  if (blocks < kEmulatedSms) s.seconds_below_sms += seconds;
}

}  // namespace

void run_grid(const void* kernel, const Config& c, const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(g_grid_mutex);
  const auto t0 = std::chrono::steady_clock::now();
  struct Logged {  // on every way out of the launch
    const Config& c;
    std::chrono::steady_clock::time_point t0;
    ~Logged() {
      if (g_launch_log.path)
        log_launch(c, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
  } logged{c, t0};
  Problem problem = launch_problem(kernel, c);
  if (problem.code != cudaSuccess) {
    record_error(problem.code, "cuda_emu: " + problem.message);
    return;
  }
  const size_t threads = size_t(c.block.x) * c.block.y * c.block.z;
  if (g_stack_count < threads) {
    g_stacks.reset(new char[threads * kStackBytes]);
    g_stack_count = threads;
  }
  g_block.body = &body;
  blockDim = c.block;
  gridDim = c.grid;
  for (unsigned z = 0; z < c.grid.z; ++z)
    for (unsigned y = 0; y < c.grid.y; ++y)
      for (unsigned x = 0; x < c.grid.x; ++x) {
        blockIdx = {x, y, z};
        std::string why = run_block(c.block, c.smem);
        if (!why.empty()) {
          record_error(kLaunchFailure, "cuda_emu: deadlock in block (" + std::to_string(x) + ", " + std::to_string(y) +
                                           ", " + std::to_string(z) + "): " + why);
          return;
        }
      }
}

}  // namespace cuda_emu

using namespace cuda_emu;

// ---- runtime API
namespace {
std::mutex g_mem_mutex;
std::map<void*, size_t> g_allocations;
size_t g_allocated = 0;
size_t capacity() {
  static size_t bytes = [] {
    const char* mib = std::getenv("CUDA_EMU_MEMORY_MIB");
    return size_t(mib ? std::atoll(mib) : 16384) << 20;
  }();
  return bytes;
}
struct EmuEvent {
  std::chrono::steady_clock::time_point at = std::chrono::steady_clock::now();
};
}  // namespace

cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int) {
  *p = cudaDeviceProp{};
  std::snprintf(p->name, sizeof p->name, "CUDA emulator on the CPU (tests/cuda_emu)");
  p->totalGlobalMem = capacity();
  p->memPitch = g_max_pitch;
  p->sharedMemPerBlock = kDefaultSmemLimit;
  p->sharedMemPerBlockOptin = kOptinSmemLimit;
  p->l2CacheSize = 50 << 20;
  p->major = 9, p->minor = 0, p->multiProcessorCount = kEmulatedSms, p->maxThreadsPerBlock = 1024, p->warpSize = 32;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMaxPitch) return record_error(cudaErrorInvalidValue, "cuda_emu: attribute not emulated");
  *value = (int)std::min<size_t>(g_max_pitch, 2147483647);
  return cudaSuccess;
}
const char* cudaGetErrorString(cudaError_t e) {
  if (e == cudaSuccess) return "no error";
  if (e == g_message_error && !g_last_message.empty()) return g_last_message.c_str();
  switch (e) {
    case cudaErrorMemoryAllocation: return "out of memory (cuda_emu: CUDA_EMU_MEMORY_MIB)";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNotReady: return "device not ready";
    default: return "unspecified launch failure";
  }
}
cudaError_t cudaPeekAtLastError() { return g_last_error; }
cudaError_t cudaGetLastError() {
  cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;  // the message stays for cudaGetErrorString(e)
  return e;
}
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

cudaError_t cudaMalloc(void** p, size_t n) {
  std::lock_guard<std::mutex> lock(g_mem_mutex);
  size_t rounded = (std::max<size_t>(n, 1) + 255) / 256 * 256;
  if (g_allocated + rounded > capacity()) return record_error(cudaErrorMemoryAllocation, "");
  *p = std::aligned_alloc(256, rounded);
  if (!*p) return record_error(cudaErrorMemoryAllocation, "");
  g_allocations[*p] = rounded;
  g_allocated += rounded;
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  if (!p) return cudaSuccess;
  std::lock_guard<std::mutex> lock(g_mem_mutex);
  auto it = g_allocations.find(p);
  if (it == g_allocations.end()) return record_error(cudaErrorInvalidValue, "cuda_emu: cudaFree of a pointer cudaMalloc did not return");
  g_allocated -= it->second;
  g_allocations.erase(it);
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  std::lock_guard<std::mutex> lock(g_mem_mutex);
  *total_bytes = capacity();
  *free_bytes = capacity() - g_allocated;
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind) {
  if (n) std::memmove(dst, src, n);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind kind, cudaStream_t) {
  return cudaMemcpy(dst, src, n, kind);
}
cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height,
                              cudaMemcpyKind, cudaStream_t) {
  if (width > dpitch || width > spitch) return record_error(cudaErrorInvalidValue, "cuda_emu: cudaMemcpy2D width > pitch");
  if (dpitch > g_max_pitch || spitch > g_max_pitch)
    return record_error(cudaErrorInvalidPitchValue, "cuda_emu: cudaMemcpy2D pitch above cudaDevAttrMaxPitch");
  for (size_t r = 0; r < height; ++r)
    std::memmove(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch, width);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* p, int value, size_t n) {
  if (n) std::memset(p, value, n);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t n, cudaStream_t) { return cudaMemset(p, value, n); }

cudaError_t cudaStreamCreate(cudaStream_t* s) {
  *s = reinterpret_cast<cudaStream_t>(new char(0));
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t s) {
  delete reinterpret_cast<char*>(s);
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned) { return cudaSuccess; }
cudaError_t cudaEventCreate(cudaEvent_t* e) {
  *e = reinterpret_cast<cudaEvent_t>(new EmuEvent);
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete reinterpret_cast<EmuEvent*>(e);
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t) {
  reinterpret_cast<EmuEvent*>(e)->at = std::chrono::steady_clock::now();
  return cudaSuccess;
}
cudaError_t cudaEventQuery(cudaEvent_t) { return cudaSuccess; }
cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  auto d = reinterpret_cast<EmuEvent*>(end)->at - reinterpret_cast<EmuEvent*>(start)->at;
  *ms = std::chrono::duration<float, std::milli>(d).count();
  return cudaSuccess;
}

// ---- cuBLAS: C = alpha·op(A)·op(B) + beta·C, column-major, per batch entry; beta == 0 never reads C.
namespace {
template <typename T>
cublasStatus_t reference_gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, T alpha, const T* A,
                              int lda, long long sa, const T* B, int ldb, long long sb, T beta, T* C, int ldc,
                              long long sc, int batch) {
  if (m < 0 || n < 0 || k < 0 || batch < 0 || ldc < std::max(1, m)) return CUBLAS_STATUS_INVALID_VALUE;
  // op(A) by rows and op(B) by rows, in double; each row of C accumulates over l in order in a double row, so
  // the inner loop runs along contiguous j (vectorised) and a training step of the `small` model stays minutes.
  std::vector<double> a_rows(size_t(m) * k), b_rows(size_t(k) * n);
  for (int e = 0; e < batch; ++e) {
    const T *a = A + e * sa, *b = B + e * sb;
    T* c = C + e * sc;
    for (int i = 0; i < m; ++i)
      for (int l = 0; l < k; ++l) a_rows[size_t(i) * k + l] = ta == CUBLAS_OP_N ? a[i + size_t(l) * lda] : a[l + size_t(i) * lda];
    for (int l = 0; l < k; ++l)
      for (int j = 0; j < n; ++j) b_rows[size_t(l) * n + j] = tb == CUBLAS_OP_N ? b[l + size_t(j) * ldb] : b[j + size_t(l) * ldb];
#pragma omp parallel for if (double(m) * n * k > 1e6)
    for (int i = 0; i < m; ++i) {
      std::vector<double> acc(n, 0.0);
      const double* ar = &a_rows[size_t(i) * k];
      for (int l = 0; l < k; ++l) {
        const double ail = ar[l], *br = &b_rows[size_t(l) * n];
        for (int j = 0; j < n; ++j) acc[j] += ail * br[j];
      }
      for (int j = 0; j < n; ++j) {
        T& out = c[i + size_t(j) * ldc];
        out = beta == T(0) ? T(alpha * acc[j]) : T(alpha * acc[j] + beta * out);
      }
    }
  }
  return CUBLAS_STATUS_SUCCESS;
}
}  // namespace

cublasStatus_t cublasCreate(cublasHandle_t* h) {
  *h = reinterpret_cast<cublasHandle_t>(new char(0));
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDestroy(cublasHandle_t h) {
  delete reinterpret_cast<char*>(h);
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetStream(cublasHandle_t, cudaStream_t) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasSetMathMode(cublasHandle_t, cublasMath_t) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                                         int k, const float* alpha, const float* A, int lda, long long sa,
                                         const float* B, int ldb, long long sb, const float* beta, float* C, int ldc,
                                         long long sc, int batch) {
  return reference_gemm(ta, tb, m, n, k, *alpha, A, lda, sa, B, ldb, sb, *beta, C, ldc, sc, batch);
}
cublasStatus_t cublasDgemmStridedBatched(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                                         int k, const double* alpha, const double* A, int lda, long long sa,
                                         const double* B, int ldb, long long sb, const double* beta, double* C,
                                         int ldc, long long sc, int batch) {
  return reference_gemm(ta, tb, m, n, k, *alpha, A, lda, sa, B, ldb, sb, *beta, C, ldc, sc, batch);
}
