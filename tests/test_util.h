// Shared helpers for kiln tests: fixture paths, temporary folders, reference files.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/safetensors.h"

namespace kiln::test {

namespace fs = std::filesystem;

inline fs::path data(const std::string& rel) { return fs::path(KILN_TEST_DATA) / rel; }
inline fs::path hf(const std::string& arch) { return data("hf/" + arch); }

// A fresh temporary folder removed when the object goes away.
struct TempDir {
  fs::path path;
  TempDir() {
    std::string t = (fs::temp_directory_path() / "kiln-test-XXXXXX").string();
    path = mkdtemp(t.data());
  }
  ~TempDir() { fs::remove_all(path); }
  fs::path operator/(const std::string& s) const { return path / s; }
};

inline nlohmann::json read_json(const fs::path& p) {
  std::ifstream in(p);
  return nlohmann::json::parse(in);
}

inline void write_json(const fs::path& p, const nlohmann::json& j) { std::ofstream(p) << j.dump(2); }

// Copies an HF fixture folder into `dst`.
inline void copy_dir(const fs::path& src, const fs::path& dst) {
  fs::create_directories(dst);
  for (const auto& e : fs::directory_iterator(src))
    fs::copy_file(e.path(), dst / e.path().filename(), fs::copy_options::overwrite_existing);
}

// ||a - b|| / ||b|| over one row.
inline double rel_err(const float* a, const float* b, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

struct Reference {
  std::vector<std::vector<int32_t>> prompts, greedy;
  std::vector<Tensor> logits;  // [len, vocab] per prompt
  std::shared_ptr<SafetensorsFile> file;
};

inline Reference load_reference(const std::string& arch) {
  Reference r;
  auto j = read_json(hf(arch) / "reference.json");
  r.prompts = j["prompts"].get<std::vector<std::vector<int32_t>>>();
  r.greedy = j["greedy"].get<std::vector<std::vector<int32_t>>>();
  r.file = SafetensorsFile::open(hf(arch) / "reference.safetensors");
  for (size_t i = 0; i < r.prompts.size(); ++i) r.logits.push_back(r.file->get("logits_" + std::to_string(i)));
  return r;
}

// Runs the kiln CLI; returns exit status, stdout+stderr in `out`.
inline int run_cli(const std::string& args, std::string* out) {
  std::string cmd = std::string(KILN_CLI) + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  char buf[4096];
  out->clear();
  while (size_t n = fread(buf, 1, sizeof buf, p)) out->append(buf, n);
  int st = pclose(p);
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

}  // namespace kiln::test
