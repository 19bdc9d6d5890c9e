// Small helpers shared by the test suites.
#pragma once
#include <string>

#include "tensor/error.h"

namespace psa::test {

// Message of the psa::Error thrown by f, or "" (so a missing throw fails the caller's EXPECT).
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const psa::Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace psa::test
