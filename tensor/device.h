// The few calls the core needs from a GPU backend. Implemented in tensor/cuda/runtime.cu when the build has
// CUDA; otherwise tensor/device.cpp provides versions that fail with a clear message.
#pragma once
#include <cstddef>
#include <cstdint>
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
// Device-to-host copies so far. Each one waits for the stream to drain, which leaves the GPU idle until the host
// queues more work: `psa bench-step` reports them per step.
int64_t host_copies();
// Stream operations so far (kernels, cuBLAS calls, host-to-device and on-device copies, memsets): on a GPU each
// costs the host a few microseconds, so a step made of many small ones is bound by the host, not the device
// (`psa bench-step` reports them per step).
int64_t launches();
void memset_zero(void* p, size_t nbytes);
// The most bytes held at once in live tensors (sizes rounded as the cache rounds them; torch's
// max_memory_allocated), and the most held from the driver, idle cached blocks included (max_memory_reserved).
size_t peak_bytes();
size_t peak_reserved_bytes();
// Tests: guard mode gives every new allocation guard bytes on both sides and a 0xFF-filled (NaN) body;
// check_guards() synchronises, verifies every live guarded block and returns (and clears) the violations found
// so far, including those of blocks already freed.
void set_guard_mode(bool on);
std::vector<std::string> check_guards();

// ---- streams and events. Kernels, copies, memsets and cuBLAS calls go to the calling thread's current stream:
// the legacy default stream unless a StreamGuard names another, so code that never makes a Stream runs in one
// queue, in program order. Streams are created blocking: they also order against the legacy default stream.
// The caching allocator gives a freed block back only to the stream it was allocated on, so stream order keeps
// its reuse safe. A tensor that a second stream uses must outlive that use: before it is freed, the stream that
// allocated it (where its block returns) should wait for an Event recorded on the second stream after the use
// (as with PyTorch's caching allocator without record_stream).
class Event;

class Stream {
 public:
  Stream();  // a new stream; fails with a clear message when the build or the machine has no CUDA
  ~Stream();
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  void* handle() const { return handle_; }  // the cudaStream_t
  void synchronize() const;                 // the host waits for the work queued on this stream so far
  void wait(const Event& e) const;          // work queued here from now on waits for e (the host does not)

 private:
  void* handle_ = nullptr;
};

// Marks a point in a stream's queue: to order streams, to wait for it from the host, and to time the work
// between two events on the device clock (benchmarks).
class Event {
 public:
  Event();
  ~Event();
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  void record();                             // on the current stream
  void record(const Stream& s);              // on s
  void synchronize() const;                  // the host waits until the work before the record has run
  bool done() const;                         // that work has run (never blocks)
  float ms_since(const Event& start) const;  // device time from start to this event, both recorded and done
  void* handle() const { return handle_; }   // the cudaEvent_t

 private:
  void* handle_ = nullptr;
  bool recorded_ = false;
};

// Makes `s` the current stream of this thread for its lifetime, then restores the previous one.
class StreamGuard {
 public:
  explicit StreamGuard(const Stream& s);
  ~StreamGuard();
  StreamGuard(const StreamGuard&) = delete;
  StreamGuard& operator=(const StreamGuard&) = delete;

 private:
  void* previous_;
};

void* current_stream();  // the cudaStream_t work goes to now (nullptr: the legacy default stream)
}  // namespace psa::gpu
