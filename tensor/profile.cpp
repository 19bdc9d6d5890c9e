#include "tensor/profile.h"

#include <algorithm>
#include <map>

namespace psa::profile {
namespace {
// Kernels run on the calling thread (their OpenMP teams are inside the call), so one table suffices.
bool g_on = false;
thread_local bool g_backward = false;
std::map<std::pair<const char*, bool>, Row> g_rows;  // keyed by the kernel's name literal and the pass
}  // namespace

void start() {
  g_rows.clear();
  g_on = true;
}

std::vector<Row> stop() {
  g_on = false;
  std::map<std::string, Row> merged;  // the same name may be spelled by more than one literal
  for (const auto& [key, r] : g_rows) {
    Row& m = merged[r.kernel];
    m.kernel = r.kernel;
    m.calls += r.calls;
    m.seconds += r.seconds;
  }
  std::vector<Row> rows;
  for (auto& [name, r] : merged) rows.push_back(r);
  std::sort(rows.begin(), rows.end(), [](const Row& a, const Row& b) { return a.seconds > b.seconds; });
  return rows;
}

bool on() { return g_on; }

void add(const char* kernel, double seconds) {
  Row& r = g_rows[{kernel, g_backward}];
  if (r.calls == 0) {
    r.kernel = kernel;
    const std::string suffix = "_backward";
    bool named_backward = r.kernel.size() > suffix.size() &&
                          r.kernel.compare(r.kernel.size() - suffix.size(), suffix.size(), suffix) == 0;
    if (g_backward && !named_backward) r.kernel += " (backward)";
  }
  ++r.calls;
  r.seconds += seconds;
}

BackwardScope::BackwardScope() : previous_(g_backward) { g_backward = true; }
BackwardScope::~BackwardScope() { g_backward = previous_; }

}  // namespace psa::profile
