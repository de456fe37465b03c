// kiln's one exception type.
#pragma once

#include <stdexcept>
#include <string>

namespace kiln {

// Thrown for every user-facing failure (bad file, bad config, limit exceeded). The message names
// the file, field or limit and fits on one line; the CLI prints it as "kiln: error: <what()>".
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg) : std::runtime_error(one_line(msg)) {}

 private:
  // Control bytes a message quotes from a file (a tensor name with a NUL, a key with a newline)
  // are escaped: what() must stay one whole line.
  static std::string one_line(const std::string& s) {
    std::string r;
    r.reserve(s.size());
    for (const char c : s) {
      const auto u = static_cast<unsigned char>(c);
      if (u >= 0x20 && u != 0x7f) {
        r += c;
      } else if (c == '\n') {
        r += "\\n";
      } else {
        const char* hex = "0123456789abcdef";
        r += "\\x";
        r += hex[u >> 4];
        r += hex[u & 15];
      }
    }
    return r;
  }
};

}  // namespace kiln
