// Error helpers for implementation files: kiln::Error plus message formatting.
#pragma once

#include <kiln/error.h>

#include <sstream>
#include <string>

namespace kiln {

// Concatenates the arguments with operator<< (g++ 12 has no <format>).
template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

}  // namespace kiln

#define KILN_CHECK(cond, ...)                                   \
  do {                                                          \
    if (!(cond)) throw ::kiln::Error(::kiln::cat(__VA_ARGS__)); \
  } while (0)
