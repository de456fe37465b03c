// Helpers shared by the libFuzzer targets (see docs/fuzzing.md).
#pragma once

#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>

namespace kiln::fuzz {

// A private scratch folder for this process (tmpfs when there is one: the readers under test take
// paths, so every input goes through a file). Removed at exit; a crash leaves it behind, so those
// of processes that are gone are removed at start.
inline const std::filesystem::path& scratch_dir() {
  static const std::filesystem::path dir = [] {
    namespace fs = std::filesystem;
    const fs::path base =
        fs::is_directory("/dev/shm") ? fs::path("/dev/shm") : fs::temp_directory_path();
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(base, ec)) {
      const std::string n = e.path().filename().string();
      if (n.rfind("kiln_fuzz_", 0) != 0) continue;
      const long pid = std::strtol(n.c_str() + 10, nullptr, 10);
      if (pid > 0 && kill(pid_t(pid), 0) != 0 && errno == ESRCH) fs::remove_all(e.path(), ec);
    }
    fs::path d = base / ("kiln_fuzz_" + std::to_string(getpid()));
    fs::create_directories(d);
    std::atexit([] {
      std::error_code ec;
      fs::remove_all(scratch_dir(), ec);
    });
    return d;
  }();
  return dir;
}

// Writes `bytes` to scratch_dir()/name (truncating) and returns the path.
inline std::filesystem::path write_file(const std::string& name, std::string_view bytes) {
  const std::filesystem::path p = scratch_dir() / name;
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  out.close();
  if (!out) {
    std::fprintf(stderr, "fuzz: cannot write %s\n", p.c_str());
    std::abort();
  }
  return p;
}

// An invariant of the code under test does not hold: a finding (libFuzzer saves the input).
[[noreturn]] inline void invariant_failed(const char* what) {
  std::fprintf(stderr, "fuzz: invariant failed: %s\n", what);
  std::abort();
}

// Splits `data` at the first `sep`: {before, after} (after is empty when there is none).
inline std::pair<std::string_view, std::string_view> split_once(std::string_view data, char sep) {
  const size_t at = data.find(sep);
  if (at == std::string_view::npos) return {data, {}};
  return {data.substr(0, at), data.substr(at + 1)};
}

}  // namespace kiln::fuzz

#define KILN_FUZZ_ASSERT(cond)                          \
  do {                                                  \
    if (!(cond)) ::kiln::fuzz::invariant_failed(#cond); \
  } while (0)
