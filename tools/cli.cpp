#include "tools/cli.h"

#include <algorithm>
#include <cstdio>

#include "tensor/error.h"

namespace psa::cli {

std::string Args::get(const std::string& f, const std::string& def) const {
  auto it = flags.find(f);
  return it == flags.end() ? def : it->second;
}

int64_t Args::get_int(const std::string& f, int64_t def) const {
  if (!has(f)) return def;
  const std::string& s = flags.at(f);
  char* end = nullptr;
  long long v = std::strtoll(s.c_str(), &end, 10);
  PSA_CHECK(!s.empty() && *end == 0, f, ": expected an integer, got '", s, "'");
  return v;
}

double Args::get_double(const std::string& f, double def) const {
  if (!has(f)) return def;
  const std::string& s = flags.at(f);
  char* end = nullptr;
  double v = std::strtod(s.c_str(), &end);
  PSA_CHECK(!s.empty() && *end == 0, f, ": expected a number, got '", s, "'");
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
    if (contains(spec.switches, name)) {
      out->flags[name] = inline_value ? value : "1";
    } else if (contains(spec.options, name)) {
      if (!inline_value) {
        PSA_CHECK(i + 1 < argc, name, ": missing value (see --help)");
        value = argv[++i];
      }
      out->flags[name] = value;
    } else {
      fail("unknown option ", name, " (see --help)");
    }
  }
  return true;
}

}  // namespace psa::cli
