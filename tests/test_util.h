// Shared helpers for kiln tests: fixture paths, temporary folders, reference files.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "io/safetensors.h"
#include "kiln/error.h"

namespace kiln::test {

namespace fs = std::filesystem;

inline fs::path data(const std::string& rel) {
  return fs::path(KILN_TEST_DATA) / rel;
}
// The demo model in models/demo (the README's default).
inline fs::path demo() {
  return fs::path(KILN_TEST_DATA).parent_path().parent_path() / "models/demo";
}
// Every architecture fixture with transformers' reference logits (tests/fixtures/hf), as the
// parity tests run them.
inline const std::vector<std::string> kHfParityFixtures = {
    "llama",       "llama31_rope", "mistral_swa",  "qwen2",      "qwen3",      "gemma",
    "gemma2",      "gemma3_text",  "phi3",         "gpt2",       "mixtral",    "qwen2_moe",
    "gemma_tied",  "gemma2_tied",  "gemma3_tied",  "qwen3_moe",  "starcoder2", "granite",
    "phi",         "gpt_neox",     "gpt_neox_seq", "cohere",     "olmo2",      "cohere2",
    "olmo3",       "falcon_mq",    "falcon_new",   "falcon_seq", "smollm3",    "gpt_oss",
    "deepseek_v2", "cohere_qk",    "phi_qk",       "deepseek_v3"};

inline fs::path hf(const std::string& arch) {
  return data("hf/" + arch);
}

// Normalized mean squared error of `a` against `ref` (1 when the sizes differ).
inline double nmse(const std::vector<float>& a, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size() && i < ref.size(); ++i)
    num += (double(a[i]) - ref[i]) * (double(a[i]) - ref[i]), den += double(ref[i]) * ref[i];
  return a.size() == ref.size() && den > 0 ? num / den : 1.0;
}

// Writes `text` to the file `p` (replacing it).
inline void write_text(const fs::path& p, const std::string& text) {
  std::ofstream(p, std::ios::binary) << text;
}

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

inline void write_json(const fs::path& p, const nlohmann::json& j) {
  std::ofstream(p) << j.dump(2);
}

// Copies an HF fixture folder into `dst`.
inline void copy_dir(const fs::path& src, const fs::path& dst) {
  fs::create_directories(dst);
  for (const auto& e : fs::directory_iterator(src))
    fs::copy_file(e.path(), dst / e.path().filename(), fs::copy_options::overwrite_existing);
}

// The message of the kiln::Error f throws, which must be one line; a failure if it throws none.
inline std::string one_line_error(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_EQ(m.find('\n'), std::string::npos) << "multi-line error: " << m;
    return m;
  }
  ADD_FAILURE() << "no kiln::Error thrown";
  return "";
}

inline bool contains_text(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
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
  for (size_t i = 0; i < r.prompts.size(); ++i)
    r.logits.push_back(r.file->get("logits_" + std::to_string(i)));
  return r;
}

// Runs the kiln CLI; returns exit status, stdout+stderr in `out`. The line a GPU run prints to
// stderr when the engine starts ("kiln: CUDA (<gpu>): weights ...; KV cache ...") is left out, so
// the same expectations hold on the CPU and on a GPU.
inline int run_cli(const std::string& args, std::string* out) {
  std::string cmd = std::string(KILN_CLI) + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  char buf[4096];
  std::string raw;
  while (size_t n = fread(buf, 1, sizeof buf, p)) raw.append(buf, n);
  int st = pclose(p);
  out->clear();
  for (size_t pos = 0; pos < raw.size();) {
    size_t end = raw.find('\n', pos);
    end = end == std::string::npos ? raw.size() : end + 1;
    const std::string_view line(raw.data() + pos, end - pos);
    const bool device_info = line.rfind("kiln: CUDA (", 0) == 0 &&
                             line.find("): weights ") != std::string_view::npos &&
                             line.find("; KV cache ") != std::string_view::npos;
    if (!device_info) out->append(line);
    pos = end;
  }
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

}  // namespace kiln::test
