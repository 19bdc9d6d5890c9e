// Minimal command-line parsing shared by the `psa` subcommands: --flag value / --flag=value / --switch,
// positional arguments, and a usage text printed by --help. Unknown flags, a flag given twice, a switch given a
// value and a number out of its range are errors (psa::Error naming the flag; the binary exits with status 2).
#pragma once
#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <vector>

namespace psa::cli {

struct Args {
  std::vector<std::string> positional;
  std::map<std::string, std::string> flags;  // switches map to "1"
  bool has(const std::string& f) const { return flags.count(f) > 0; }
  std::string get(const std::string& f, const std::string& def = "") const;
  // A path: refuses an empty value (which would mean the current directory).
  std::string get_path(const std::string& f, const std::string& def) const;
  // Integers and finite numbers within [lo, hi] (a value past int64 is out of range, not clamped).
  int64_t get_int(const std::string& f, int64_t def, int64_t lo = std::numeric_limits<int64_t>::min(),
                  int64_t hi = std::numeric_limits<int64_t>::max()) const;
  double get_double(const std::string& f, double def, double lo = -std::numeric_limits<double>::max(),
                    double hi = std::numeric_limits<double>::max()) const;
};

struct Spec {
  std::string usage;                 // printed for --help and on errors
  std::vector<std::string> options;  // flags that take a value, e.g. "--device"
  std::vector<std::string> switches; // flags without a value, e.g. "--json"
};

// Throws psa::Error for unknown flags, a missing value, a repeated flag or a switch with a value. Returns false
// when --help was printed.
bool parse(int argc, char** argv, const Spec& spec, Args* out);

// Upper bound of --threads and OMP_NUM_THREADS: libgomp itself crashes on tens of thousands of threads, and far
// past the core count a step only slows down.
constexpr int64_t kMaxThreads = 1024;

using Command = int (*)(int argc, char** argv);

}  // namespace psa::cli
