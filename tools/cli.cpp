#include "tools/cli.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <set>

#include "nn/json.h"
#include "tensor/error.h"

namespace psa::cli {

std::string Args::get(const std::string& f, const std::string& def) const {
  auto it = flags.find(f);
  return it == flags.end() ? def : it->second;
}

std::string Args::get_path(const std::string& f, const std::string& def) const {
  std::string p = get(f, def);
  PSA_CHECK(!p.empty(), f, ": expected a path, got an empty string");
  return p;
}

int64_t Args::get_int(const std::string& f, int64_t def, int64_t lo, int64_t hi) const {
  if (!has(f)) return def;
  const std::string& s = flags.at(f);
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(s.c_str(), &end, 10);
  // strtoll skips leading blanks but stops at trailing ones: neither is part of a number.
  PSA_CHECK(!s.empty() && !std::isspace((unsigned char)s[0]) && *end == 0, f, ": expected an integer, got '", s, "'");
  PSA_CHECK(errno != ERANGE, f, ": ", s, " does not fit a 64-bit integer");
  PSA_CHECK(v >= lo && v <= hi, f, ": ", s, " is out of range [", lo, ", ", hi, "]");
  return v;
}

double Args::get_double(const std::string& f, double def, double lo, double hi) const {
  if (!has(f)) return def;
  const std::string& s = flags.at(f);
  char* end = nullptr;
  double v = std::strtod(s.c_str(), &end);
  PSA_CHECK(!s.empty() && !std::isspace((unsigned char)s[0]) && *end == 0, f, ": expected a number, got '", s, "'");
  PSA_CHECK(std::isfinite(v), f, ": expected a finite number, got '", s, "'");
  PSA_CHECK(v >= lo && v <= hi, f, ": ", s, " is out of range [", lo, ", ", hi, "]");
  return v;
}

bool parse(int argc, char** argv, const Spec& spec, Args* out) {
  auto contains = [](const std::vector<std::string>& v, const std::string& s) {
    return std::find(v.begin(), v.end(), s) != v.end();
  };
  for (int i = 0; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::printf("%s\n", spec.usage.c_str());
      return false;
    }
    if (a.rfind("--", 0) != 0 || a == "--") {
      out->positional.push_back(a);
      continue;
    }
    std::string name = a, value;
    bool inline_value = false;
    if (size_t eq = a.find('='); eq != std::string::npos) {
      name = a.substr(0, eq);
      value = a.substr(eq + 1);
      inline_value = true;
    }
    const bool is_switch = contains(spec.switches, name);
    PSA_CHECK(is_switch || contains(spec.options, name), "unknown option ", name, " (see --help)");
    PSA_CHECK(!out->has(name), name, ": given twice");
    if (is_switch) {
      PSA_CHECK(!inline_value, name, ": a switch takes no value, got '", value, "'");
      out->flags[name] = "1";
      continue;
    }
    if (!inline_value) {
      PSA_CHECK(i + 1 < argc, name, ": missing value (see --help)");
      value = argv[++i];
    }
    out->flags[name] = value;
  }
  return true;
}

// ---- output paths, checked before any long work ----

namespace {

// Absolute, symlinks resolved as far as the path exists, no trailing separator: comparable with ==.
std::filesystem::path canonical_form(const std::string& p) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path c = fs::weakly_canonical(fs::absolute(p), ec);
  if (ec) c = fs::absolute(p).lexically_normal();
  if (!c.has_filename() && c.has_parent_path()) c = c.parent_path();
  return c;
}

}  // namespace

bool same_path(const std::string& a, const std::string& b) {
  std::error_code ec;
  if (std::filesystem::equivalent(a, b, ec)) return true;  // hard links too
  return canonical_form(a) == canonical_form(b);
}

bool path_inside(const std::string& path, const std::string& dir) {
  const std::filesystem::path p = canonical_form(path), d = canonical_form(dir);
  auto pi = p.begin();
  for (auto di = d.begin(); di != d.end(); ++di, ++pi)
    if (pi == p.end() || *pi != *di) return false;
  return true;
}

void make_output_dir(const std::string& what, const std::string& dir) {
  namespace fs = std::filesystem;
  PSA_CHECK(!dir.empty(), what, ": expected a folder, got an empty path");
  std::error_code ec;
  PSA_CHECK(!fs::exists(dir, ec) || fs::is_directory(dir, ec), what, ": ", dir, " is not a folder");
  fs::create_directories(dir, ec);
  PSA_CHECK(!ec, what, ": cannot create the folder ", dir, ": ", ec.message());
}

void check_output_dir(const std::string& what, const std::string& dir) {
  namespace fs = std::filesystem;
  make_output_dir(what, dir);
  // Permissions, read-only mounts and quotas are only known by trying: a probe file, removed at once.
  const std::string probe = (fs::path(dir) / (".psa-write-probe-" + std::to_string(::getpid()))).string();
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0600);
  PSA_CHECK(fd >= 0, what, ": cannot write in the folder ", dir, ": ", std::strerror(errno));
  ::close(fd);
  ::unlink(probe.c_str());
}

// The pid a lock file records (lock_output_dir writes it), or 0 when it cannot be read.
static long recorded_pid(int fd) {
  char buf[32] = {0};
  const ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
  return n > 0 ? std::strtol(buf, nullptr, 10) : 0;
}

// The pid in `lock` (a .psa.lock) when another process holds it, -1 when that pid is unreadable, else 0: free,
// missing, or held by this process (psa train running its benchmark into its own folder).
static long lock_holder(const std::string& lock) {
  const int fd = ::open(lock.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) return 0;
  long pid = 0;
  if (::flock(fd, LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK) {
    pid = recorded_pid(fd);
    pid = pid == ::getpid() ? 0 : pid > 0 ? pid : -1;
  }
  ::close(fd);  // also drops the shared lock just taken
  return pid;
}

void check_output_location(const std::string& what, const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  for (fs::path dir = canonical_form(path).parent_path(); !dir.empty(); dir = dir.parent_path()) {
    PSA_CHECK(!(fs::exists(dir / "model.safetensors", ec) && fs::exists(dir / "config.json", ec)), what, " ", path,
              ": inside the checkpoint folder ", dir.string(), " (a checkpoint holds only what psa train writes; "
              "choose another folder)");
    const long holder = lock_holder((dir / json::kLockFileName).string());
    PSA_CHECK(holder == 0, what, " ", path, ": inside ", dir.string(), ", which a running psa process is writing",
              holder > 0 ? " (pid " + std::to_string(holder) + ")" : std::string(), "; wait for it to end");
    if (dir == dir.root_path()) break;
  }
}

void check_output_file(const std::string& what, const std::string& path) {
  namespace fs = std::filesystem;
  PSA_CHECK(!path.empty(), what, ": expected a file path, got an empty string");
  std::error_code ec;
  PSA_CHECK(!fs::is_directory(path, ec), what, ": ", path, " is a folder, expected a file path");
  PSA_CHECK(!fs::exists(path, ec) || fs::is_regular_file(path, ec), what, ": ", path, " is not a regular file");
  const fs::path parent = fs::path(path).parent_path(), folder = parent.empty() ? "." : parent;
  check_output_location(what, path);
  check_output_dir(what + " " + path, folder.string());
  // The writer's own temp name, tried once: a name that only just fits NAME_MAX fails there, not after the work.
  try {
    const json::TempFile probe = json::create_temp_beside(path);
    std::fclose(probe.f);
    ::unlink(probe.path.c_str());
  } catch (const Error& e) {
    fail(what, " ", e.what());
  }
}

void lock_output_dir(const std::string& what, const std::string& dir) {
  const std::string path = (std::filesystem::path(dir) / json::kLockFileName).string();
  // O_NOFOLLOW: a symlink planted as the lock would have the pid written over whatever it points to.
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
  PSA_CHECK(fd >= 0, what, " ", dir, ": cannot open the lock file ", path, ": ",
            errno == ELOOP ? "it is a symbolic link (remove it)" : std::strerror(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(what, " ", dir, ": the lock file ", path, " is not a regular file (remove it)");
  }
  // Held already by this process (psa train runs its evaluation, which locks the run folder it writes to, in
  // process): a second flock on a new descriptor would conflict with our own first one.
  static std::set<std::pair<dev_t, ino_t>> held;
  if (held.count({st.st_dev, st.st_ino})) {
    ::close(fd);
    return;
  }
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    const long pid = recorded_pid(fd);
    ::close(fd);
    PSA_CHECK(err != EWOULDBLOCK, what, " ", dir, ": in use by another psa process",
              pid > 0 ? " (pid " + std::to_string(pid) + ")" : std::string(), "; wait for it or choose another folder");
    fail(what, " ", dir, ": cannot lock ", path, ": ", std::strerror(err));
  }
  const std::string pid = std::to_string(::getpid()) + "\n";
  // Only a note for the message above: the lock itself is the flock, so a failed write changes nothing.
  const bool noted = ::ftruncate(fd, 0) == 0 && ::pwrite(fd, pid.data(), pid.size(), 0) == ssize_t(pid.size());
  (void)noted;
  held.insert({st.st_dev, st.st_ino});
  // fd stays open (and locked) for the rest of the process.
}

void remove_lock_file(const std::string& dir) {
  std::error_code ec;
  std::filesystem::remove(std::filesystem::path(dir) / json::kLockFileName, ec);
}

std::string first_missing_folder(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path missing;
  for (fs::path p = fs::absolute(dir, ec).lexically_normal(); !p.empty() && !fs::exists(p, ec); p = p.parent_path()) {
    missing = p;
    if (p == p.parent_path()) break;
  }
  return missing.string();
}

void discard_filled_folder(const std::string& dir, const std::string& first_made) {
  namespace fs = std::filesystem;
  std::error_code ec;
  std::vector<fs::path> written;  // collected first: no removal while the folder is read
  for (const auto& e : fs::directory_iterator(dir, ec))
    if (e.path().filename() != json::kLockFileName) written.push_back(e.path());
  for (const auto& p : written) fs::remove_all(p, ec);
  remove_lock_file(dir);
  if (first_made.empty()) return;
  for (fs::path p = fs::absolute(dir, ec).lexically_normal();; p = p.parent_path()) {
    if (!fs::remove(p, ec)) break;  // only an empty folder goes
    if (p == fs::path(first_made) || p == p.parent_path()) break;
  }
}

void print_progress(const char* tag, int64_t done, int64_t total, const char* unit) {
  static const bool tty = ::isatty(2);
  const int64_t step = std::max<int64_t>(1, total / (tty ? 100 : 10));
  if (done != total && done % step != 0) return;
  std::fprintf(stderr, "%s[%s] %ld/%ld %s%s", tty ? "\r" : "", tag, (long)done, (long)total, unit,
               tty && done != total ? "" : "\n");
}

std::string printable(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c >= 0x20 && c != 0x7f) {
      out += char(c);
      continue;
    }
    char hex[5];
    std::snprintf(hex, sizeof hex, "\\x%02x", c);
    out += hex;
  }
  return out;
}

std::string lower_extension(const std::string& path) {
  std::string ext = std::filesystem::path(path).extension().string();
  for (char& ch : ext) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return ext;
}

}  // namespace psa::cli
