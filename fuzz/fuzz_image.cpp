// Fuzzes the image-loading wrapper: header check, decode (stb_image behind our size limits) and the CLIP
// preprocessing the data pipeline runs on every decoded image.
#include <cstdint>

#include "fuzz/fuzz_util.h"
#include "psa/image.h"
#include "tensor/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& path = psa::fuzz::scratch_file(data, size, ".img");
  try {
    psa::check_image(path);
    psa::Image img = psa::load_image(path);
    if (img.w <= 0 || img.h <= 0 || img.rgb.size() != static_cast<size_t>(img.w) * img.h * 3) std::abort();
    // Bicubic resize cost grows with the input; keep the fuzzer fast on the (valid) large ones.
    if (static_cast<int64_t>(img.w) * img.h <= 256 * 256) psa::preprocess(img, 8);
  } catch (const psa::Error&) {
  }
  return 0;
}
