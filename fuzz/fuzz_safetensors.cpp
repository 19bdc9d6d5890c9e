// Fuzzes the safetensors reader: open + validation (header length, JSON header, dtypes, shapes, offsets,
// overlaps, xxh64 metadata), then touches every byte of every view so that a range that escaped the checks
// shows up as an ASan read overflow. Any psa::Error is an accepted refusal; anything else is a bug.
#include <cstdint>

#include "fuzz/fuzz_util.h"
#include "nn/safetensors.h"
#include "tensor/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& path = psa::fuzz::scratch_file(data, size, ".safetensors");
  try {
    psa::st::File f = psa::st::File::open(path);
    uint64_t sum = 0;
    for (const auto& t : f.tensors()) {
      if (t.numel() * static_cast<int64_t>(psa::st::dtype_size(t.dtype)) != static_cast<int64_t>(t.nbytes)) std::abort();
      for (size_t i = 0; i < t.nbytes; ++i) sum += t.data[i];
    }
    volatile uint64_t sink = sum;
    (void)sink;
  } catch (const psa::Error&) {
  }
  return 0;
}
