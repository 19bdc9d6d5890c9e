// Fuzzes the JSONL record reader: every line is parsed and validated; bad lines must be skipped and counted,
// never thrown (only an unreadable file throws). Image checks are off: the image target covers the decoder.
#include <cstdint>

#include "fuzz/fuzz_util.h"
#include "psa/records.h"
#include "tensor/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& path = psa::fuzz::scratch_file(data, size, ".jsonl");
  psa::LoadReport rep;
  std::vector<psa::Record> recs = psa::load_records(path, &rep, false);
  if (rep.loaded + rep.skipped != rep.lines || static_cast<int64_t>(recs.size()) != rep.loaded) std::abort();
  for (const psa::Record& r : recs)
    if (r.safe_level < 0 || r.safe_level > 3 || r.safe_type < 0 || r.safe_type > 6 || r.image.empty()) std::abort();
  return 0;
}
