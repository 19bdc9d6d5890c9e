// Kernel profile: wall time per kernel, split by forward and backward, for `psa bench-step --profile`.
// Every kernel call goes through PSA_KERNEL (tensor/dispatch.h); while a profile is on, that call is timed and
// added to its kernel's row. Off (the default), the cost is one branch per kernel call. Kernels that call
// other kernels directly (attention calls sgemm) count as one. CUDA kernels run asynchronously: a CUDA profile
// passes start() a function that waits for the device (cuda::synchronize), called before and after every
// kernel, so each row holds its kernel's device time (and the steps run without overlap of host and device).
#pragma once
#include <chrono>
#include <string>
#include <utility>
#include <vector>

namespace psa::profile {

struct Row {
  std::string kernel;  // "matmul", "rms_norm_backward", ...; " (backward)" added when Tensor::backward ran a
                       // kernel whose name does not say so (matmul, binary, ...)
  int64_t calls = 0;
  double seconds = 0;
};

void start(void (*wait_for_device)() = nullptr);  // clears the rows and starts timing
std::vector<Row> stop();   // stops timing; rows sorted by time, largest first
bool on();                 // a profile is being taken
void add(const char* kernel, double seconds);
void wait_for_device();  // the function given to start(), if any

// GEMM-class floating-point operations (2 per multiply-add) run so far by matmul, attention and patch_conv,
// forward and backward, counted always (one addition per op call, profile on or off): `psa bench-step` divides
// a step's count by its time for the model FLOP utilisation. Attention counts its two products forward and four
// backward (dV, dP, dQ, dK) over the whole T x S rectangle: causal masking is not subtracted and the flash
// backward's recomputation of P not added, the usual convention for model FLOPs.
void add_flops(double flops);
double flops();

// Tensor::backward sets this while it runs, so a kernel used by both passes (matmul) gets one row for each.
class BackwardScope {
 public:
  BackwardScope();
  ~BackwardScope();
  BackwardScope(const BackwardScope&) = delete;
  BackwardScope& operator=(const BackwardScope&) = delete;

 private:
  bool previous_;
};

// What PSA_KERNEL returns: the kernel, timed while a profile is on.
template <typename Fn>
struct Timed {
  const char* kernel;
  Fn fn;
  template <typename... Args>
  decltype(auto) operator()(Args&&... args) const {
    if (!on()) return fn(std::forward<Args>(args)...);
    wait_for_device();
    struct Clock {
      const char* kernel;
      std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
      ~Clock() {
        wait_for_device();
        add(kernel, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
    } clock{kernel};
    return fn(std::forward<Args>(args)...);
  }
};

// For the few kernels called by name rather than through PSA_KERNEL (attention, whose two devices save
// different tensors).
template <typename Fn>
Timed<Fn> timed(const char* kernel, Fn fn) {
  return {kernel, fn};
}

}  // namespace psa::profile
