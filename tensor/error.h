// Errors of the engine: one exception type whose message names the op (or file) and the shapes.
// Every user-facing failure goes through PSA_CHECK so that the command line can print one line and exit 2.
#pragma once
#include <exception>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace psa {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {
inline void append(std::ostringstream&) {}
template <typename T, typename... Rest>
void append(std::ostringstream& os, const T& first, const Rest&... rest) {
  os << first;
  append(os, rest...);
}
}  // namespace detail

// Concatenates its arguments with operator<< into one message.
template <typename... Args>
std::string str_cat(const Args&... args) {
  std::ostringstream os;
  detail::append(os, args...);
  return os.str();
}

template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  throw Error(str_cat(args...));
}

// "[2,3,4]"
inline std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "," : "") + std::to_string(shape[i]);
  return s + "]";
}

// An exception must not leave an OpenMP parallel region (that terminates the process): each iteration runs
// through run(), which keeps the first exception thrown, and rethrow() raises it after the region.
class FirstError {
 public:
  template <typename F>
  void run(F&& body) {
    try {
      body();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!err_) err_ = std::current_exception();
    }
  }
  void rethrow() const {
    if (err_) std::rethrow_exception(err_);
  }

 private:
  std::exception_ptr err_;
  std::mutex mu_;
};

}  // namespace psa

#define PSA_CHECK(cond, ...)                  \
  do {                                        \
    if (!(cond)) ::psa::fail(__VA_ARGS__);    \
  } while (0)
