// kiln's one exception type.
#pragma once

#include <stdexcept>
#include <string>

namespace kiln {

// Thrown for every user-facing failure (bad file, bad config, limit exceeded). The message names
// the file, field or limit and fits on one line; the CLI prints it as "kiln: error: <what()>".
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

}  // namespace kiln
