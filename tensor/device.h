// The few calls the core needs from a GPU backend. Implemented in tensor/cuda/runtime.cu when the build has
// CUDA; otherwise tensor/device.cpp provides versions that fail with a clear message.
#pragma once
#include <cstddef>
#include <string>
#include <vector>

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
// Tests: guard mode gives every new allocation guard bytes on both sides and a 0xFF-filled (NaN) body;
// check_guards() synchronises, verifies every live guarded block and returns (and clears) the violations found
// so far, including those of blocks already freed.
void set_guard_mode(bool on);
std::vector<std::string> check_guards();
}  // namespace psa::gpu
