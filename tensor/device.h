// The few calls the core needs from a GPU backend. Implemented in tensor/cuda/runtime.cu when the build has
// CUDA; otherwise tensor/device.cpp provides versions that fail with a clear message.
#pragma once
#include <cstddef>
#include <string>

namespace psa::gpu {
bool available();                  // built with CUDA and a device is present
std::string describe();            // one line: name, memory, or why there is none
void* alloc(size_t nbytes);        // through the caching allocator
void free(void* p, size_t nbytes);
void copy_to_device(void* dst, const void* src, size_t nbytes);
void copy_to_host(void* dst, const void* src, size_t nbytes);
void copy_on_device(void* dst, const void* src, size_t nbytes);
void memset_zero(void* p, size_t nbytes);
size_t peak_bytes();
}  // namespace psa::gpu
