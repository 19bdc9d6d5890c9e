// Command-line parsing shared by the `psa` subcommands (--flag value / --flag=value / --switch, positional
// arguments, a usage text printed by --help), and the checks of output paths made before any long work.
// Unknown flags, a flag given twice, a switch given a value and a number out of its range are errors
// (psa::Error naming the flag; the binary exits with status 2).
#pragma once
#include <cstdint>
#include <filesystem>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "nn/json.h"
#include "psa/checkpoint.h"
#include "tensor/error.h"

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

// ---- output paths, checked before any long work ----

// a and b name the same file, also when either does not exist yet (symlinks and ".." resolved as far as
// the path exists, then compared lexically; existing hard links by inode).
bool same_path(const std::string& a, const std::string& b);
// `path` is `dir` or lies below it (same resolution as same_path).
bool path_inside(const std::string& path, const std::string& dir);
// `dir` exists or is created, and a probe file can be created in it (then removed); else an error
// "<what>: <reason>" with errno's text. `what` names the option, e.g. "--predictions".
void check_output_dir(const std::string& what, const std::string& dir);
// The first half of check_output_dir: `dir` is a folder or is made one (no probe file written).
void make_output_dir(const std::string& what, const std::string& dir);
// No folder above `path` is a checkpoint (model.safetensors with config.json) or a run folder another process's
// psa train holds (its .psa.lock): writing there would mix another tool's file into them.
void check_output_location(const std::string& what, const std::string& path);
// `path` is not empty, not a folder or another non-regular file, passes check_output_location, and its folder
// passes check_output_dir.
void check_output_file(const std::string& what, const std::string& path);
// An exclusive lock on `dir` (flock of dir/.psa.lock, which records the holder's pid), held until the process
// exits, so that two runs never write one folder; the kernel drops it when the holder dies, so a killed run
// leaves nothing to clean. Else an error "<what> <dir>: in use by another psa process (pid N)".
void lock_output_dir(const std::string& what, const std::string& dir);
// Removes dir's lock file (the flock stays held until the process exits).
void remove_lock_file(const std::string& dir);
// The outermost folder of `dir`'s path that does not exist yet ("" when `dir` exists): what creating `dir` makes.
std::string first_missing_folder(const std::string& dir);
// Locked `dir` holds only what this process wrote into it: everything but the lock goes, and so do the folders
// from `dir` up to `first_made` that this run created ("" for none): fill_new_folder's clean-up after a failure,
// e.g. a full disk.
void discard_filled_folder(const std::string& dir, const std::string& first_made);
// f() fills `dir`, a missing or empty folder, as its one writer: the folder is made, locked (lock_output_dir),
// cleared of temp files that killed writers left (psa export's staging folder), found empty but for the lock
// (else "<what> <dir>: exists and is not empty (<why>)"), and probed for writing (check_output_dir), in that
// order, so two runs never both pass the emptiness check, nor meets one the other's probe file. The lock file is
// removed afterwards; when f throws, what it wrote goes too (and the folder, if made here), so a retry can start.
template <typename F>
auto fill_new_folder(const std::string& what, const std::string& dir, const std::string& why, F&& f) -> decltype(f()) {
  const std::string first_made = first_missing_folder(dir);
  make_output_dir(what, dir);
  lock_output_dir(what, dir);
  bool ours = false;  // past the emptiness check: whatever is in the folder from then on is this run's
  try {
    remove_stale_temps(dir);
    PSA_CHECK(json::holds_only_lock(dir), what, " ", dir, ": exists and is not empty (", why, ")");
    ours = true;
    check_output_dir(what, dir);
    auto result = f();
    remove_lock_file(dir);
    return result;
  } catch (...) {
    if (ours) discard_filled_folder(dir, first_made);
    else remove_lock_file(dir);
    throw;
  }
}
// The extension of `path`, lowercased (".PNG" -> ".png"; "" when there is none).
std::string lower_extension(const std::string& path);
// A count on stderr ("[data] 1200/9400 images"): rewritten in place on a terminal at every percent, else one
// line per tenth; the last call (done == total) ends the line.
void print_progress(const char* tag, int64_t done, int64_t total, const char* unit);
// `s` for a terminal: control bytes (NUL, ESC, newlines) as \xNN, so that a name read from a file can neither be
// cut short nor drive the terminal.
std::string printable(const std::string& s);

using Command = int (*)(int argc, char** argv);

}  // namespace psa::cli
