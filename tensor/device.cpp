// CPU-only builds: every GPU request fails with one clear message instead of a link error.
#ifndef PSA_CUDA
#include "tensor/device.h"

#include "tensor/error.h"

namespace psa::gpu {
namespace {
[[noreturn]] void no_cuda() { fail("this build has no CUDA support (rebuild with nvcc present and CUDA!=0)"); }
}  // namespace
bool available() { return false; }
std::string describe() { return "no CUDA in this build"; }
void* alloc(size_t) { no_cuda(); }
void free(void*, size_t) {}
void copy_to_device(void*, const void*, size_t) { no_cuda(); }
void copy_to_host(void*, const void*, size_t) { no_cuda(); }
void copy_on_device(void*, const void*, size_t) { no_cuda(); }
int64_t host_copies() { return 0; }
int64_t launches() { return 0; }
void memset_zero(void*, size_t) { no_cuda(); }
size_t peak_bytes() { return 0; }
size_t peak_reserved_bytes() { return 0; }
void set_guard_mode(bool) {}
std::vector<std::string> check_guards() { return {}; }
Stream::Stream() { no_cuda(); }
Stream::~Stream() {}
void Stream::synchronize() const { no_cuda(); }
void Stream::wait(const Event&) const { no_cuda(); }
Event::Event() { no_cuda(); }
Event::~Event() {}
void Event::record() { no_cuda(); }
void Event::record(const Stream&) { no_cuda(); }
void Event::synchronize() const { no_cuda(); }
bool Event::done() const { no_cuda(); }
float Event::ms_since(const Event&) const { no_cuda(); }
StreamGuard::StreamGuard(const Stream&) : previous_(nullptr) { no_cuda(); }
StreamGuard::~StreamGuard() {}
void* current_stream() { return nullptr; }
}  // namespace psa::gpu
#endif
