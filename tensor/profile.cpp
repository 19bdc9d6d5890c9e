#include "tensor/profile.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>

namespace psa::profile {
namespace {
// Kernels run on the calling thread (their OpenMP teams are inside the call), but a caller may itself run ops on
// several threads (eval's parallel generation): the table is locked.
bool g_on = false;
std::mutex g_rows_mutex;
void (*g_wait)() = nullptr;
thread_local bool g_backward = false;
std::map<std::string, Row> g_rows;  // by label: the kernel's name, with " (backward)" where the name lacks it
std::atomic<uint64_t> g_flops{0};   // atomic: cheap, and a second host thread running ops stays counted

std::string label(const char* kernel) {
  std::string name = kernel;
  const std::string suffix = "_backward";
  bool named_backward =
      name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  return g_backward && !named_backward ? name + " (backward)" : name;
}
}  // namespace

void start(void (*wait)()) {
  std::lock_guard<std::mutex> lock(g_rows_mutex);
  g_rows.clear();
  g_wait = wait;
  g_on = true;
}

void wait_for_device() {
  if (g_wait) g_wait();
}

std::vector<Row> stop() {
  g_on = false;
  g_wait = nullptr;
  std::vector<Row> rows;
  std::lock_guard<std::mutex> lock(g_rows_mutex);
  for (const auto& [name, r] : g_rows) rows.push_back(r);
  std::sort(rows.begin(), rows.end(), [](const Row& a, const Row& b) { return a.seconds > b.seconds; });
  return rows;
}

bool on() { return g_on; }

void add(const char* kernel, double seconds) {
  std::string name = label(kernel);
  std::lock_guard<std::mutex> lock(g_rows_mutex);
  Row& r = g_rows[name];
  r.kernel = name;
  ++r.calls;
  r.seconds += seconds;
}

void add_flops(double flops) { g_flops.fetch_add((uint64_t)flops, std::memory_order_relaxed); }
double flops() { return (double)g_flops.load(std::memory_order_relaxed); }

BackwardScope::BackwardScope() : previous_(g_backward) { g_backward = true; }
BackwardScope::~BackwardScope() { g_backward = previous_; }

}  // namespace psa::profile
