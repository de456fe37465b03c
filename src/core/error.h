// Error helpers for implementation files: kiln::Error plus message formatting.
#pragma once

#include <kiln/error.h>

#include <sstream>
#include <string>
#include <vector>

namespace kiln {

// Concatenates the arguments with operator<< (g++ 12 has no <format>).
template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

// The first `most` items joined by `sep`, then "<sep>... and N more": lists of problems in
// one-line errors stay readable however many there are.
inline std::string join_limited(const std::vector<std::string>& items, size_t most = 12,
                                const char* sep = ", ") {
  std::string r;
  for (size_t i = 0; i < items.size() && i < most; ++i) r += (i ? sep : "") + items[i];
  if (items.size() > most) r += cat(sep, "... and ", items.size() - most, " more");
  return r;
}

}  // namespace kiln

#define KILN_CHECK(cond, ...)                                   \
  do {                                                          \
    if (!(cond)) throw ::kiln::Error(::kiln::cat(__VA_ARGS__)); \
  } while (0)
