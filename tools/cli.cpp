#include "tools/cli.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>

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
  PSA_CHECK(!s.empty() && *end == 0, f, ": expected an integer, got '", s, "'");
  PSA_CHECK(errno != ERANGE, f, ": ", s, " does not fit a 64-bit integer");
  PSA_CHECK(v >= lo && v <= hi, f, ": ", s, " is out of range [", lo, ", ", hi, "]");
  return v;
}

double Args::get_double(const std::string& f, double def, double lo, double hi) const {
  if (!has(f)) return def;
  const std::string& s = flags.at(f);
  char* end = nullptr;
  double v = std::strtod(s.c_str(), &end);
  PSA_CHECK(!s.empty() && *end == 0, f, ": expected a number, got '", s, "'");
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

}  // namespace psa::cli
