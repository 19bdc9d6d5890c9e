// Fuzzes the strict JSON parser, and checks that whatever it accepts prints and parses back to the same value.
#include <cstdint>
#include <string>

#include "nn/json.h"
#include "tensor/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  psa::json::Value v;
  try {
    v = psa::json::parse(text, "<fuzz>");
  } catch (const psa::Error&) {
    return 0;
  }
  // A value the parser accepted must survive a round trip through both printers.
  for (int indent : {-1, 2}) {
    const std::string out = psa::json::dump(v, indent);
    if (psa::json::parse(out, "<dump>") != v) std::abort();
  }
  return 0;
}
