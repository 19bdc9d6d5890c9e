// Minimal command-line parsing shared by the `psa` subcommands: --flag value / --flag=value / --switch,
// positional arguments, and a usage text printed by --help. Unknown flags are errors (exit code 2).
#pragma once
#include <map>
#include <string>
#include <vector>

namespace psa::cli {

struct Args {
  std::vector<std::string> positional;
  std::map<std::string, std::string> flags;  // switches map to "1"
  bool has(const std::string& f) const { return flags.count(f) > 0; }
  std::string get(const std::string& f, const std::string& def = "") const;
  int64_t get_int(const std::string& f, int64_t def) const;
  double get_double(const std::string& f, double def) const;
};

struct Spec {
  std::string usage;                 // printed for --help and on errors
  std::vector<std::string> options;  // flags that take a value, e.g. "--device"
  std::vector<std::string> switches; // flags without a value, e.g. "--json"
};

// Throws psa::Error for unknown flags or a missing value. Returns false when --help was printed.
bool parse(int argc, char** argv, const Spec& spec, Args* out);

using Command = int (*)(int argc, char** argv);

}  // namespace psa::cli
