// kiln public API: build a Hugging Face checkpoint into an engine, save/load it, and generate.
//
//   kiln::BuildConfig bc;                 // dtype, max batch, max sequence length
//   auto engine = kiln::Engine::build("path/to/hf-folder", bc);
//   engine.save("out.engine");            // atomic: a failed save leaves nothing behind
//   auto loaded = kiln::Engine::load("out.engine");
//   auto ids = loaded.generate({1, 2, 3}, kiln::SamplingParams{});
//
// Every failure (bad file, unknown architecture, missing weight, limit exceeded) throws
// kiln::Error (kiln/error.h) with a one-line message naming the cause.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "kiln/error.h"

namespace kiln {


// Build-time choices (what TensorRT-LLM calls the build config).
struct BuildConfig {
  std::string dtype = "auto";   // auto (the checkpoint's torch_dtype), f32, f16 or bf16
  int64_t max_batch = 1;        // concurrent sequences the runtime plans for
  int64_t max_seq_len = 0;      // 0: the model's max_position_embeddings
};

// Run-time choices.
struct RuntimeConfig {
  std::string device = "auto";     // auto (CUDA when a GPU is present), cpu or cuda
  int threads = 0;                 // CPU threads, 0: all cores
  double kv_cache_fraction = 0.9;  // CUDA: share of free memory after weights for the KV cache
};

// Sampling; unset fields take generation_config.json's defaults (else greedy).
struct SamplingParams {
  std::optional<float> temperature;  // 0: greedy
  std::optional<int> top_k;          // 0: off
  std::optional<float> top_p;        // 1: off
  uint64_t seed = 0;
  int64_t max_tokens = 16;
  bool ignore_eos = false;
  std::vector<int32_t> stop_token_ids;  // stop after any of these, besides the model's eos ids
};

// What an engine holds, for display.
struct ModelInfo {
  std::string architecture;
  std::string dtype;
  int64_t num_params = 0;
  int64_t weight_bytes = 0;
  int64_t vocab_size = 0, hidden_size = 0, num_layers = 0;
  int64_t max_seq_len = 0, max_batch = 0;
  std::vector<int64_t> eos_token_ids;
  std::optional<int64_t> bos_token_id;
};

class Session;

class Engine {
 public:
  // From a Hugging Face folder (config.json, *.safetensors, tokenizer files).
  static Engine build(const std::filesystem::path& hf_dir, const BuildConfig& bc = {});
  // Seeded random weights of the shape a config.json describes (speed work).
  static Engine build_dummy(const std::filesystem::path& config_json, const BuildConfig& bc,
                            uint64_t seed = 0);
  // From an engine folder written by save().
  static Engine load(const std::filesystem::path& engine_dir);
  // An engine folder or a Hugging Face folder (built in memory).
  static Engine open(const std::filesystem::path& dir, const BuildConfig& bc = {});
  static bool is_engine_dir(const std::filesystem::path& dir);

  // Writes the engine folder atomically (temporary folder, then rename).
  void save(const std::filesystem::path& engine_dir) const;

  ModelInfo info() const;
  // Folder holding tokenizer files (the source HF folder or the engine folder), if any.
  std::filesystem::path tokenizer_dir() const;

  // Prepares weights on a device. Called implicitly with defaults by the methods below.
  void start(const RuntimeConfig& rc = {});
  std::string device_name() const;

  // Greedy/sampled continuation of `prompt`; `on_token` may return false to stop early.
  std::vector<int32_t> generate(std::span<const int32_t> prompt, const SamplingParams& sp,
                                const std::function<bool(int32_t)>& on_token = {});
  // Logits [prompt.size() * vocab] of every position, from one prefill.
  std::vector<float> logits(std::span<const int32_t> prompt);
  // A sequence whose KV cache holds `capacity` tokens (0: max_seq_len).
  Session session(int64_t capacity = 0);

  Engine(Engine&&) noexcept;
  Engine& operator=(Engine&&) noexcept;
  ~Engine();

  struct Impl;

 private:
  explicit Engine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  friend class Session;
};

// One sequence with its own KV cache: feed tokens, read logits (prefill and decode steps).
class Session {
 public:
  // Appends tokens and returns their logits: [n, vocab] if all_logits, else the last row.
  std::vector<float> forward(std::span<const int32_t> tokens, bool all_logits = false);
  int64_t length() const;
  Session(Session&&) noexcept;
  ~Session();
  struct State;

 private:
  explicit Session(std::unique_ptr<State> s);
  std::unique_ptr<State> s_;
  friend class Engine;
};

// Picks the next token from F32 logits (greedy when temperature is 0).
class Sampler {
 public:
  Sampler(float temperature, int top_k, float top_p, uint64_t seed);
  int32_t sample(const float* logits, int64_t vocab);

 private:
  float temperature_, top_p_;
  int top_k_;
  uint64_t state_;
};

}  // namespace kiln
