// Shared by the libFuzzer targets: the readers under test take file paths (they mmap or stream real files),
// so each input is written to one scratch file per process first.
#pragma once
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace psa::fuzz {

// Writes the input to a per-process file under $TMPDIR (or /tmp) and returns its path.
inline const std::string& scratch_file(const uint8_t* data, size_t size, const char* suffix) {
  static std::string path;
  const char* tmp = std::getenv("TMPDIR");
  path = std::string(tmp && *tmp ? tmp : "/tmp") + "/psa_fuzz_" + std::to_string(::getpid()) + suffix;
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) std::abort();  // the harness itself is broken, not the reader
  if (size && std::fwrite(data, 1, size, f) != size) std::abort();
  std::fclose(f);
  return path;
}

}  // namespace psa::fuzz
