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
void memset_zero(void*, size_t) { no_cuda(); }
size_t peak_bytes() { return 0; }
void set_guard_mode(bool) {}
std::vector<std::string> check_guards() { return {}; }
}  // namespace psa::gpu
#endif
