// CUDA runtime glue: device query, a caching allocator, copies, streams and events.
// The allocator keeps freed blocks in free lists per (stream, size) (sizes rounded up to 512 bytes, or to 2 MiB
// above 1 MiB) so that training steps after the first never call cudaMalloc/cudaFree; peak bytes are tracked.
// A block goes back to the list of the stream it was allocated on: work on that stream runs in order, so the
// next user of the block starts after the last kernel that used it, without a synchronisation.
// Guard mode (tests): every allocation gets its own cudaMalloc with 256 bytes of a known pattern on each
// side and a body filled with 0xFF bytes (NaN as f32/f64, so an output a kernel forgets to write shows up);
// the guards are verified when the block is freed and by check_guards(), catching out-of-bounds writes.
// PSA_CUDA_GUARD_BYTES=0 (bench/gpu_check.sh's compute-sanitizer run) keeps the own cudaMalloc and the NaN body
// but drops the guards: memcheck flags only accesses outside every allocation, so a read just past a tensor's
// end would land in its own guard bytes unseen, while an exact-size allocation makes it an error.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "tensor/cuda/common.cuh"
#include "tensor/device.h"
#include "tensor/error.h"

namespace psa::gpu {
namespace {
// Guard bytes on each side of a guard-mode block: 256 keeps the returned pointer 256-byte aligned like
// cudaMalloc's; 0 with PSA_CUDA_GUARD_BYTES=0 (read once).
size_t guard_bytes() {
  static const size_t n = [] {
    const char* e = std::getenv("PSA_CUDA_GUARD_BYTES");
    return e && std::strcmp(e, "0") == 0 ? size_t(0) : size_t(256);
  }();
  return n;
}
constexpr unsigned char kGuardByte = 0xA5;

thread_local cudaStream_t t_current_stream = nullptr;  // nullptr: the legacy default stream

struct Cache {
  std::mutex mu;
  std::map<std::pair<cudaStream_t, size_t>, std::vector<void*>> free_blocks;  // (stream, rounded size) -> blocks
  std::unordered_map<void*, cudaStream_t> owner;  // live block -> the stream it was allocated on
  size_t in_use = 0, peak = 0;        // bytes in live tensors (rounded), like torch's memory_allocated
  size_t reserved = 0, peak_reserved = 0;  // bytes held from cudaMalloc, cached blocks included (memory_reserved)
  bool guard = false;
  std::map<void*, size_t> guarded;  // user pointer -> user bytes
  std::vector<std::string> violations;
};
Cache& cache() {
  static Cache* c = new Cache();  // leaked on purpose: blocks must outlive static tensors at exit
  return *c;
}
size_t round_size(size_t n) {
  const size_t small = 512, big = size_t(2) << 20;
  return n < (size_t(1) << 20) ? (n + small - 1) / small * small : (n + big - 1) / big * big;
}
}  // namespace

bool available() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

std::string describe() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess || n == 0) return std::string("no CUDA device: ") + cudaGetErrorString(err);
  cudaDeviceProp p;
  cudaCheck(cudaGetDeviceProperties(&p, 0));
  char buf[640];
  snprintf(buf, sizeof buf, "%s, %.1f GiB, sm_%d%d", p.name, p.totalGlobalMem / 1073741824.0, p.major, p.minor);
  return buf;
}

namespace {

double mib(size_t n) { return n / 1048576.0; }

// Returns every cached block to the driver (called with the lock held): a request that fails while other
// sizes sit idle in the cache should get that memory before the run is declared out of memory.
size_t release_cached(Cache& c) {
  cudaDeviceSynchronize();  // a cached block may still be in use by queued work of its stream
  size_t released = 0;
  for (auto& [key, blocks] : c.free_blocks) {
    for (void* p : blocks) cudaFree(p);
    released += key.second * blocks.size();
    blocks.clear();
  }
  c.reserved -= released;
  return released;
}

// One line with what was asked for and what the device has, so the fix (smaller batch, another GPU) is obvious.
[[noreturn]] void out_of_memory(size_t requested, size_t rounded, const Cache& c, cudaError_t err) {
  cudaGetLastError();  // clear the sticky error so later calls are not blamed for it
  size_t free_b = 0, total_b = 0;
  cudaMemGetInfo(&free_b, &total_b);
  char buf[320];
  snprintf(buf, sizeof buf,
           "CUDA out of memory: cudaMalloc of %zu bytes (%.1f MiB; %zu requested) failed (%s); the device has "
           "%.1f MiB free of %.1f MiB; this process holds %.1f MiB in tensors (peak %.1f MiB)",
           rounded, mib(rounded), requested, cudaGetErrorString(err), mib(free_b), mib(total_b), mib(c.in_use),
           mib(c.peak));
  fail(buf);
}

// Appends a message to `violations` when a guard of the block at `user` (user bytes n) was overwritten.
void verify_guards(Cache& c, void* user, size_t n) {
  const size_t guard = guard_bytes();
  if (guard == 0) return;
  std::vector<unsigned char> before(guard), after(guard);
  char* base = static_cast<char*>(user) - guard;
  // No throwing here: this runs from Storage's destructor. A failed copy is reported as a violation instead.
  cudaError_t e1 = cudaMemcpy(before.data(), base, guard, cudaMemcpyDeviceToHost);
  cudaError_t e2 = cudaMemcpy(after.data(), static_cast<char*>(user) + n, guard, cudaMemcpyDeviceToHost);
  if (e1 != cudaSuccess || e2 != cudaSuccess) {
    c.violations.push_back(std::string("guard check failed: ") + cudaGetErrorString(e1 != cudaSuccess ? e1 : e2));
    return;
  }
  for (size_t i = 0; i < guard; ++i) {
    if (before[i] != kGuardByte) {
      c.violations.push_back("write " + std::to_string(guard - i) + " bytes before a " + std::to_string(n) +
                             "-byte block");
      break;
    }
  }
  for (size_t i = guard; i-- > 0;) {
    if (after[i] != kGuardByte) {
      c.violations.push_back("write " + std::to_string(i + 1) + " bytes past the end of a " + std::to_string(n) +
                             "-byte block");
      break;
    }
  }
}

// cudaMalloc of `rounded` bytes (for `requested`); when the device is full, the cached free blocks are released
// and the call retried once. Other errors (a sticky fault from an earlier kernel) are reported as themselves,
// not as out of memory.
void* device_malloc(Cache& c, size_t requested, size_t rounded) {
  void* p = nullptr;
  cudaError_t err = cudaMalloc(&p, rounded);
  if (err != cudaSuccess) {
    if (err != cudaErrorMemoryAllocation) ::psa::fail("cudaMalloc(", rounded, " bytes): ", cudaGetErrorString(err));
    cudaGetLastError();
    if (release_cached(c) == 0 || (err = cudaMalloc(&p, rounded)) != cudaSuccess)
      out_of_memory(requested, rounded, c, err);
  }
  c.reserved += rounded;
  c.peak_reserved = std::max(c.peak_reserved, c.reserved);
  return p;
}

void* guarded_alloc(Cache& c, size_t n) {
  const size_t guard = guard_bytes();
  // At least a byte: cudaMalloc(0) gives nullptr, which Storage's free would skip.
  void* base = device_malloc(c, n, std::max<size_t>(n + 2 * guard, 1));
  cudaCheck(cudaMemset(base, kGuardByte, n + 2 * guard));
  void* user = static_cast<char*>(base) + guard;
  cudaCheck(cudaMemset(user, 0xFF, n));
  c.guarded[user] = n;
  return user;
}
}  // namespace

void set_guard_mode(bool on) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.guard = on;
}

std::vector<std::string> check_guards() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  cudaCheck(cudaDeviceSynchronize());
  for (auto& [user, n] : c.guarded) verify_guards(c, user, n);
  std::vector<std::string> out;
  out.swap(c.violations);
  return out;
}

void* alloc(size_t nbytes) {
  size_t n = round_size(nbytes ? nbytes : 1);
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  if (c.guard) {
    void* p = guarded_alloc(c, nbytes);  // counted only once it exists
    c.in_use += nbytes;
    if (c.in_use > c.peak) c.peak = c.in_use;
    return p;
  }
  void* p = nullptr;
  auto it = c.free_blocks.find({t_current_stream, n});
  if (it != c.free_blocks.end() && !it->second.empty()) {
    p = it->second.back();
    it->second.pop_back();
  } else {
    p = device_malloc(c, nbytes, n);
  }
  c.owner[p] = t_current_stream;
  c.in_use += n;
  if (c.in_use > c.peak) c.peak = c.in_use;
  return p;
}

void free(void* p, size_t nbytes) {
  if (!p) return;
  size_t n = round_size(nbytes ? nbytes : 1);
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  auto g = c.guarded.find(p);
  if (g != c.guarded.end()) {  // a guard-mode block (guard mode may be off by now): verify, then release
    verify_guards(c, p, g->second);
    c.in_use -= g->second;
    c.reserved -= std::max<size_t>(g->second + 2 * guard_bytes(), 1);
    c.guarded.erase(g);
    cudaFree(static_cast<char*>(p) - guard_bytes());  // unchecked: a destructor must not throw
    return;
  }
  auto o = c.owner.find(p);
  cudaStream_t stream = o != c.owner.end() ? o->second : nullptr;
  if (o != c.owner.end()) c.owner.erase(o);
  c.free_blocks[{stream, n}].push_back(p);
  c.in_use -= n;
}

// Copies and memsets on the current stream. Host tensors are pageable, and callers free the source right
// after copy_to_device (small index and label tensors, every step): that relies on the driver staging pageable
// memory before cudaMemcpyAsync returns, as current drivers do for pageable host-to-device copies, though CUDA's
// "API synchronization behavior" page documents it only for cudaMemcpy ("might be synchronous" for the async
// form). cudaMemcpy itself would order against every blocking stream and stall the launch queue; a pinned
// staging ring is the fix if a platform ever reads pageable memory in place. To the host the copy must finish
// first.
namespace {
std::atomic<int64_t> g_host_copies{0}, g_launches{0};  // gpu::host_copies, gpu::launches
}  // namespace
void copy_to_device(void* dst, const void* src, size_t n) {
  cudaCheck(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, t_current_stream));
  ++g_launches;
}
void copy_to_host(void* dst, const void* src, size_t n) {
  cudaCheck(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, t_current_stream));
  cudaCheck(cudaStreamSynchronize(t_current_stream));
  ++g_host_copies;
}
int64_t host_copies() { return g_host_copies; }
int64_t launches() { return g_launches; }
void copy_on_device(void* dst, const void* src, size_t n) {
  cudaCheck(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, t_current_stream));
  ++g_launches;
}
void memset_zero(void* p, size_t n) {
  cudaCheck(cudaMemsetAsync(p, 0, n, t_current_stream));
  ++g_launches;
}
size_t peak_bytes() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return c.peak;
}
size_t peak_reserved_bytes() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return c.peak_reserved;
}

// ---- streams and events

void* current_stream() { return t_current_stream; }

namespace {
cudaStream_t as_stream(void* h) { return static_cast<cudaStream_t>(h); }
cudaEvent_t as_event(void* h) { return static_cast<cudaEvent_t>(h); }

// A stream about to be destroyed: once its work has run, its cached blocks and the live blocks it allocated
// belong to the legacy default stream (a later stream may get the same handle and must not inherit them).
void adopt_blocks_of(cudaStream_t s) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  for (auto it = c.free_blocks.begin(); it != c.free_blocks.end();) {
    if (it->first.first != s) {
      ++it;
      continue;
    }
    auto& dst = c.free_blocks[{nullptr, it->first.second}];
    dst.insert(dst.end(), it->second.begin(), it->second.end());
    it = c.free_blocks.erase(it);
  }
  for (auto& [p, owner] : c.owner)
    if (owner == s) owner = nullptr;
}
}  // namespace

Stream::Stream() {
  PSA_CHECK(available(), "gpu::Stream: ", describe());
  cudaStream_t s;
  cudaCheck(cudaStreamCreate(&s));  // blocking: ordered against the legacy default stream too
  handle_ = s;
}

Stream::~Stream() {
  if (!handle_) return;
  cudaStreamSynchronize(as_stream(handle_));  // unchecked: a destructor must not throw
  adopt_blocks_of(as_stream(handle_));
  cudaStreamDestroy(as_stream(handle_));
}

void Stream::synchronize() const { cudaCheck(cudaStreamSynchronize(as_stream(handle_))); }

void Stream::wait(const Event& e) const {
  PSA_CHECK(e.handle(), "gpu::Stream::wait: the event was never created");
  cudaCheck(cudaStreamWaitEvent(as_stream(handle_), as_event(e.handle()), 0));
}

Event::Event() {
  PSA_CHECK(available(), "gpu::Event: ", describe());
  cudaEvent_t e;
  cudaCheck(cudaEventCreate(&e));  // with timing: ms_since works on any pair
  handle_ = e;
}

Event::~Event() {
  if (handle_) cudaEventDestroy(as_event(handle_));
}

void Event::record() {
  cudaCheck(cudaEventRecord(as_event(handle_), t_current_stream));
  recorded_ = true;
}

void Event::record(const Stream& s) {
  cudaCheck(cudaEventRecord(as_event(handle_), as_stream(s.handle())));
  recorded_ = true;
}

void Event::synchronize() const {
  PSA_CHECK(recorded_, "gpu::Event::synchronize: the event was never recorded");
  cudaCheck(cudaEventSynchronize(as_event(handle_)));
}

bool Event::done() const {
  cudaError_t err = cudaEventQuery(as_event(handle_));
  if (err == cudaErrorNotReady) return false;
  cudaCheck(err);
  return true;
}

float Event::ms_since(const Event& start) const {
  PSA_CHECK(recorded_ && start.recorded_, "gpu::Event::ms_since: both events must be recorded first");
  float ms = 0;
  cudaCheck(cudaEventElapsedTime(&ms, as_event(start.handle_), as_event(handle_)));
  return ms;
}

StreamGuard::StreamGuard(const Stream& s) : previous_(t_current_stream) { t_current_stream = as_stream(s.handle()); }
StreamGuard::~StreamGuard() { t_current_stream = as_stream(previous_); }
}  // namespace psa::gpu

namespace psa::cuda {
void count_launch() { ++gpu::g_launches; }
}  // namespace psa::cuda
