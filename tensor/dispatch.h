// Kernel dispatch: PSA_KERNEL(device, name) is cpu::name or cuda::name (same signature) for a tensor's device,
// so every call site stays one line:   PSA_KERNEL(out.device(), layer_norm)(x, w, b, eps, out, mean, rstd);
// CPU-only builds never reference the cuda:: symbols; a CUDA tensor there fails with the kernel's name (it
// cannot normally exist, since allocating one already fails). The call is timed while a kernel profile is
// on (tensor/profile.h).
#pragma once
#include "tensor/cpu/kernels.h"
#include "tensor/cuda/kernels.h"
#include "tensor/profile.h"

namespace psa {
[[noreturn]] void no_cuda_kernel(const char* name);
inline void require_host(Device d, const char* name) {
  if (d != Device::cpu) no_cuda_kernel(name);
}
}  // namespace psa

#ifdef PSA_CUDA
#define PSA_KERNEL(device, name)                                                          \
  (::psa::profile::Timed<decltype(&::psa::cpu::name)>{                                     \
      #name, (device) == ::psa::Device::cuda ? &::psa::cuda::name : &::psa::cpu::name})
#else
#define PSA_KERNEL(device, name) \
  (::psa::require_host((device), #name), ::psa::profile::Timed<decltype(&::psa::cpu::name)>{#name, &::psa::cpu::name})
#endif
