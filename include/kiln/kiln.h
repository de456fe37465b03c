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
  std::string dtype = "auto";  // auto (the checkpoint's torch_dtype), f32, f16 or bf16
  // Weight quantization of the linear layers (needs a 16-bit dtype): none; int8-wo (int8 weights,
  // one scale per output channel, activations in the engine dtype); int4-wo (4-bit weights in
  // groups with scales and zeros, as AWQ/GPTQ store them); fp8 (E4M3 weights with one scale per
  // output channel and activations quantized to E4M3 per token as each linear runs); int4-awq
  // (int4-wo whose weight columns are first scaled by activation-aware scales that kiln
  // calibrates on text through the float model, AWQ; the engine is an int4-wo engine).
  std::string quant = "none";
  // The LM head quantized too, with the same scheme (TensorRT-LLM's --quantize_lm_head; llama.cpp
  // quantizes output.weight). Off by default: once the linears are quantized, the head is a
  // large share of what decode reads (the 8B shape: 1.05 GB of 4.8 under int4-wo), but its
  // rounding moves the logits directly. Needs a --quant and an untied head.
  bool quant_lm_head = false;
  // --quant int4-awq: a UTF-8 text file to calibrate on (its first 512 tokens); empty: a
  // built-in text of prose, dialogue, code and numbers.
  std::string calib;
  // KV cache element type: auto (the engine dtype) or fp8 (E4M3 codes with one scale per token
  // and KV head, computed as each token is written: half the bytes of a 16-bit cache, so twice
  // the tokens fit and decode attention reads half as much; needs a 16-bit dtype).
  std::string kv_cache_dtype = "auto";
  int64_t max_batch = 1;    // concurrent sequences the runtime plans for
  int64_t max_seq_len = 0;  // 0: the model's max_position_embeddings
  // Architecture spec files (docs/architectures.md) to add to kiln's tables before the
  // checkpoint is read, each adding a family or replacing the one of the same name
  // (--arch-spec FILE).
  std::vector<std::string> arch_specs;
  // kiln build --tp / --pp: the engine folder holds one weight file per rank, each with that
  // rank's shard (as TensorRT-LLM's per-rank checkpoints), and runs with these ranks. Only for
  // building to a folder (build_to, build_dummy_to).
  int tp = 1, pp = 1;
};

// Run-time choices.
struct RuntimeConfig {
  std::string device = "auto";     // auto (CUDA when a GPU is present), cpu or cuda
  int threads = 0;                 // CPU threads, 0: all cores
  double kv_cache_fraction = 0.9;  // CUDA: share of free memory after weights for the KV cache
  // KV cache size in tokens, shared by all sessions; 0: CUDA sizes it from kv_cache_fraction
  // (at most 256 sequences of max_seq_len), the CPU holds max_batch sequences of max_seq_len.
  int64_t kv_cache_tokens = 0;
  bool cuda_graphs = true;  // replay decode steps from CUDA graphs (env KILN_CUDA_GRAPHS=0: off)
  // Step limits, fixed at start (buffers and decode graphs are sized for them once): sequences
  // per step (0: 256 on a GPU, max(16, max_batch) on the CPU) and tokens per step, the
  // chunked-prefill budget (0: 8192 on a GPU, 2048 on the CPU; at least max_num_seqs).
  int64_t max_num_seqs = 0;
  int64_t max_num_tokens = 0;
  // Tensor- and pipeline-parallel ranks (weights sharded at start). On the CPU the ranks are
  // threads of this process, the emulation of a multi-GPU node; on GPUs, one process per GPU.
  int tp = 1, pp = 1;
  // CUDA, one rank: issue the tensor-parallel collectives through NCCL anyway (a group of one,
  // every all-reduce and all-gather real), so one GPU checks the NCCL path.
  bool nccl = false;
  // Ranks as processes (always on GPUs: one per GPU; on CPUs when this is set): "host:port"
  // where rank 0 (this process) listens for the others, port 0 for any free one. Unless this
  // process was started by mpirun (which starts the others), kiln starts ranks 1 .. tp * pp - 1
  // on this machine from rank_exe ("": this executable, which must be kiln). "": on CPUs the
  // ranks are threads; on GPUs 127.0.0.1:0.
  std::string dist_init;
  std::string rank_exe;
};

// When this process was started as a rank > 0 of a multi-process engine (KILN_RANK, or mpirun's
// OMPI_COMM_WORLD_RANK, in the environment with KILN_DIST_INIT): serves rank 0's steps until it
// stops, then returns true (the process should exit). False for any other process.
bool serve_as_rank();

// How far a streaming build (or a verify) is: weight bytes and tensors done of the totals.
struct BuildProgress {
  uint64_t bytes_done = 0, bytes_total = 0;
  size_t tensors_done = 0, tensors_total = 0;
};
using ProgressFn = std::function<void(const BuildProgress&)>;

// What this kiln binary is: `kiln --version`.
struct BuildInfo {
  std::string version;    // kiln's (CMake project version)
  std::string commit;     // git commit at configure time ("unknown" outside a checkout)
  std::string cuda;       // CUDA runtime, driver and cuBLASLt versions; empty without CUDA
  int engine_format = 0;  // the engine folder format it writes and reads
};
BuildInfo build_info();

// What start() set up, for display.
struct RuntimeInfo {
  std::string device;
  int64_t weight_bytes = 0;     // resident on the device
  int64_t kv_cache_tokens = 0;  // tokens the shared KV cache holds
  int64_t kv_cache_bytes = 0;
  int64_t free_bytes_before_kv = 0;  // device memory free after the weights (0: not known)
  double kv_cache_fraction = 0;      // what was asked for (0 when sized by tokens)
  bool cuda_graphs = false;
  int64_t max_num_seqs = 0, max_num_tokens = 0;
  int64_t max_logit_rows = 0;   // rows of logits one step may return
  int64_t kv_block_size = 0;    // tokens per KV block
  int64_t graphs_captured = 0;  // decode graphs captured at start
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
  std::string quant = "none";           // weight quantization (BuildConfig::quant)
  bool quant_lm_head = false;           // the LM head quantized too (BuildConfig::quant_lm_head)
  std::string kv_cache_dtype = "auto";  // BuildConfig::kv_cache_dtype
  // int4-awq builds: what the scales were calibrated on and what they gained, e.g. "AWQ on 512
  // tokens of the built-in text: 20 of 24 linears scaled, sample output error 0.71x plain int4";
  // empty otherwise.
  std::string calibration;
  // Builds from a GGUF file: its architecture and what became of each tensor type, e.g. "GGUF
  // llama: Q4_1 x210, Q8_0 x1 dequantized (no kiln kernel for them); F32 x61 as stored". Builds
  // of an architecture not in kiln's tables: which known family it was built as, and why.
  // Empty otherwise.
  std::string conversion;
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
  // From a Hugging Face folder (config.json, *.safetensors, tokenizer files) or a GGUF file
  // (llama.cpp's format: its metadata, tensors and tokenizer mapped onto the same build).
  static Engine build(const std::filesystem::path& hf_dir, const BuildConfig& bc = {});
  // Seeded random weights of the shape a config.json describes (speed work).
  static Engine build_dummy(const std::filesystem::path& config_json, const BuildConfig& bc,
                            uint64_t seed = 0);
  // Build straight into an engine folder without holding the model in memory: each tensor is
  // converted and written a chunk of rows at a time (peak memory stays at a few staging buffers
  // of 64 MB whatever the model size) and checksummed into the manifest. Refuses early when the
  // disk or memory is short (with both figures); SIGINT/SIGTERM or an error leaves nothing
  // behind; rebuilding over an engine touches only files kiln wrote. A tokenizer in the source
  // folder must load. Returns what was built.
  static ModelInfo build_to(const std::filesystem::path& hf_dir,
                            const std::filesystem::path& engine_dir, const BuildConfig& bc = {},
                            const ProgressFn& progress = {});
  static ModelInfo build_dummy_to(const std::filesystem::path& config_json,
                                  const std::filesystem::path& engine_dir, const BuildConfig& bc,
                                  uint64_t seed = 0, const ProgressFn& progress = {});
  // Checks an engine folder: the manifest, every tensor's name, dtype and shape (exactly the
  // engine's layout: missing or extra tensors are errors) and every tensor's checksum. Throws
  // kiln::Error naming what differs; returns the bytes checked.
  static uint64_t verify(const std::filesystem::path& engine_dir, const ProgressFn& progress = {});
  // From an engine folder written by save() or build_to() (names, dtypes and shapes checked).
  static Engine load(const std::filesystem::path& engine_dir);
  // An engine folder or a Hugging Face folder (built in memory with `bc`; for an engine folder,
  // a `bc` other than the default is an error: it is built already).
  static Engine open(const std::filesystem::path& dir, const BuildConfig& bc = {});
  static bool is_engine_dir(const std::filesystem::path& dir);

  // Writes the engine folder as build_to() does, from the weights in memory.
  void save(const std::filesystem::path& engine_dir) const;

  ModelInfo info() const;
  // Folder holding tokenizer files (the source HF folder or the engine folder), if any.
  std::filesystem::path tokenizer_dir() const;

  // Prepares weights and the KV cache on a device. Called implicitly with defaults by the
  // methods below. Throws kiln::Error when the KV cache cannot hold one full sequence.
  void start(const RuntimeConfig& rc = {});
  std::string device_name() const;
  RuntimeInfo runtime_info() const;

  // Greedy/sampled continuation of `prompt`; `on_token` may return false to stop early.
  std::vector<int32_t> generate(std::span<const int32_t> prompt, const SamplingParams& sp,
                                const std::function<bool(int32_t)>& on_token = {});
  // Logits [prompt.size() * vocab] of every position, from one prefill.
  std::vector<float> logits(std::span<const int32_t> prompt);
  // A new sequence in the shared KV cache, sampling with generation_config.json's defaults.
  // `capacity` (0: max_seq_len) is checked against max_seq_len and the cache's size; blocks
  // are taken as tokens arrive. Sessions must not outlive their engine.
  Session session(int64_t capacity = 0);
  // One batched decode step: appends tokens[i] to *sessions[i] (distinct sessions of this
  // engine) and returns the token each picks next with its sampling settings (on the device).
  std::vector<int32_t> step(std::span<Session* const> sessions, std::span<const int32_t> tokens);
  // `steps` batched decode steps: the first feeds tokens[i] to *sessions[i], each later one the
  // tokens the step before picked. on_step(ids) gets each step's picks (ids[i] for
  // sessions[i]) and returns false to stop. The device runs one step ahead of the host: the
  // next step is queued before this one's tokens are read back (a step queued past a stop is
  // discarded: lengths and sampling streams are as if it never ran).
  void decode(std::span<Session* const> sessions, std::span<const int32_t> tokens, int64_t steps,
              const std::function<bool(std::span<const int32_t>)>& on_step);
  // The same step, returning F32 logits [sessions.size(), vocab] instead.
  std::vector<float> step_logits(std::span<Session* const> sessions,
                                 std::span<const int32_t> tokens);

  Engine(Engine&&) noexcept;
  Engine& operator=(Engine&&) noexcept;
  ~Engine();

  struct Impl;

 private:
  explicit Engine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  friend class Session;
  friend class Scheduler;
};

// One sequence with its own KV cache: feed tokens, read logits (prefill and decode steps).
class Session {
 public:
  // Appends tokens and returns their logits: [n, vocab] if all_logits, else the last row.
  std::vector<float> forward(std::span<const int32_t> tokens, bool all_logits = false);
  // Appends tokens and returns the next token, picked on the device with this session's
  // sampling settings (one token: a decode step, replayed from a CUDA graph on the GPU).
  int32_t next(std::span<const int32_t> tokens);
  // Sampling for next() and Engine::step(); unset fields take generation_config.json's values.
  void set_sampling(const SamplingParams& sp);
  int64_t length() const;
  Session(Session&&) noexcept;
  ~Session();
  struct State;

 private:
  explicit Session(std::unique_ptr<State> s);
  std::unique_ptr<State> s_;
  friend class Engine;
  friend struct Engine::Impl;
};

// Picks the next token from F32 logits (greedy when temperature is 0).
class Sampler {
 public:
  Sampler(float temperature, int top_k, float top_p, uint64_t seed);
  int32_t sample(const float* logits, int64_t vocab);

 private:
  float temperature_, top_p_;
  int top_k_;
  uint64_t seed_;
  uint64_t step_ = 0;  // index of the next draw in the seed's stream
};

}  // namespace kiln
