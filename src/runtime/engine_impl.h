// Engine internals shared by the runtime (engine.cpp, the scheduler): the engine's weights and
// build settings, and once started, the backend, KV cache and decoder.
#pragma once

#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "arch/model_config.h"
#include "core/error.h"
#include "core/quant.h"
#include "graph/decoder.h"
#include "graph/shard.h"
#include "kiln/kiln.h"
#include "runtime/kv_cache.h"

namespace kiln {

// The engine folder format this kiln writes and reads (kiln-engine.json "version").
constexpr int kEngineFormatVersion = 1;

// "f32", "f16" or "bf16" (ModelInfo::dtype, the manifest's build.dtype).
std::string dtype_label(DType t);
// What AWQ calibration did, in words (ModelInfo::calibration); "" without AWQ.
std::string calibration_line(const nlohmann::json& awq_info);
// Engine::info() less the parameter and byte counts (which a build counts from its plan).
ModelInfo info_without_weights(const Engine::Impl& m);

struct Engine::Impl {
  ModelConfig config;
  DType dtype = DType::F32;
  WeightQuant quant = WeightQuant::None;  // how the linear weights are stored (core/quant.h)
  int64_t quant_group = 0;                // int4 group size of a quantized checkpoint (0: rule)
  bool act_order = false;      // int4 weights carry an input order (GPTQ desc_act checkpoints)
  bool quant_lm_head = false;  // --quant-lm-head: the LM head is quantized with `quant`
  bool kv_fp8 = false;         // --kv-cache-dtype fp8
  bool awq = false;            // --quant int4-awq: int4-wo after an AWQ scale search (build/awq.h)
  std::string calib;           // its --calib file ("": the built-in text)
  nlohmann::json awq_info;     // what calibration did (manifest build.awq), null without AWQ
  int64_t max_batch = 1, max_seq_len = 0;
  nlohmann::json source;
  nlohmann::json generation_defaults = nlohmann::json::object();
  std::filesystem::path tokenizer_dir;
  // A GGUF build: the temporary folder holding its tokenizer files (removed with the last
  // owner), and what the build did with its tensor types (ModelInfo::conversion).
  std::shared_ptr<void> tokenizer_owner;
  std::string conversion;
  // Host weights in engine layout; a quantized weight carries its scales (no ".scale" entries).
  std::vector<std::pair<std::string, Tensor>> weights;
  // A sharded engine (kiln build --tp / --pp): its ranks, and each rank's weights (rank order)
  // instead of `weights`.
  int tp = 1, pp = 1;
  std::vector<std::vector<std::pair<std::string, Tensor>>> rank_weights;
  // What engine_layout needs to lay the weights out.
  QuantScheme scheme() const { return {quant, quant_group, act_order, quant_lm_head}; }
  // The weights rank s holds: its shard of `weights`, or its file's of a sharded engine.
  std::vector<std::pair<std::string, Tensor>> weights_of(const Shard& s) const {
    if (!rank_weights.empty()) return rank_weights[size_t(s.rank())];
    return shard_weights(config, weights, scheme(), s);
  }

  // Runtime, created by start(); destroyed in reverse order (the decoder's buffers and the
  // cache before the backend).
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Comm> tp_comm;  // RuntimeConfig::nccl: a group of one over `backend`
  std::unique_ptr<DeviceWeights> dweights;
  std::unique_ptr<KVCache> own_cache;
  // The executor: one Decoder over `backend`, or (--tp / --pp) ranks that own their backends,
  // weights and caches (runtime/parallel.h). `cache` is where blocks are taken from: own_cache,
  // or rank 0's.
  std::unique_ptr<Executor> decoder;
  KVCache* cache = nullptr;
  RuntimeInfo rinfo;
  int64_t max_num_seqs = 0, max_num_tokens = 0, max_logit_rows = 0;
  // Pinned host buffers for two steps' sampled ids, and the device copy of a step's sampling
  // settings (grow-only).
  int32_t* ids_host = nullptr;
  SampleParams* d_params = nullptr;
  int64_t ids_rows = 0;

  ~Impl() {
    if (ids_host) backend->host_free(ids_host);
    if (d_params) backend->release(d_params);
  }

  void decode_loop(std::span<Session* const> sessions, std::span<const int32_t> tokens,
                   int64_t steps, const std::function<bool(std::span<const int32_t>)>& on_step);

  // Device logits [B, vocab] of one decode step of `sessions` (Engine::step, Session::next).
  const float* decode_step(std::span<Session* const> sessions, std::span<const int32_t> tokens);

  // Takes blocks from the cache until `seq` covers `end` positions (KV cache full: an error).
  void reserve(Sequence& seq, int64_t end);
  // Appends tokens to one sequence in steps of at most max_num_tokens (max_logit_rows when every
  // row's logits are wanted): host logits of every row, or of the last row only.
  std::vector<float> extend(Sequence& seq, std::span<const int32_t> tokens, bool all_logits);
  // The same, returning the last row's logits in device memory (valid until the next forward).
  const float* extend_last(Sequence& seq, std::span<const int32_t> tokens);
  // One decode step of distinct sequences: tokens from the host, or (nullptr) the ids the
  // previous step sampled into the decoder's token buffer. Device logits [B, vocab].
  const float* decode_batch(std::span<Sequence* const> seqs, const int32_t* tokens);

  // Sampling settings with generation_config.json's defaults for what `sp` leaves unset.
  SampleParams sampling(const SamplingParams& sp) const {
    const nlohmann::json& g = generation_defaults;
    const bool do_sample = g.value("do_sample", false);
    SampleParams p;
    p.temperature = sp.temperature.value_or(do_sample ? g.value("temperature", 1.0f) : 0.0f);
    p.top_k = sp.top_k.value_or(do_sample ? g.value("top_k", 50) : 0);
    p.top_p = sp.top_p.value_or(do_sample ? g.value("top_p", 1.0f) : 1.0f);
    p.seed = sp.seed;
    if (!sp.temperature && do_sample && g.contains("min_p") && g["min_p"].is_number())
      p.min_p = g["min_p"].get<float>();
    return p;
  }

  void resolve_build(const BuildConfig& bc, const std::string& config_dtype) {
    std::string d = bc.dtype;
    if (d == "auto") d = config_dtype.empty() ? "f32" : config_dtype;
    dtype = parse_float_dtype(d, "build dtype");
    awq = bc.quant == "int4-awq";
    quant = parse_weight_quant(awq ? "int4-wo" : bc.quant);
    KILN_CHECK(bc.calib.empty() || awq, "--calib is for --quant int4-awq (the quantization is ",
               bc.quant, ")");
    calib = bc.calib;
    quant_lm_head = bc.quant_lm_head;
    if (quant_lm_head) (void)engine_layout(config, scheme());  // its refusals, before any work
    KILN_CHECK(bc.kv_cache_dtype == "auto" || bc.kv_cache_dtype == "fp8", "--kv-cache-dtype '",
               bc.kv_cache_dtype, "' is not one of auto, fp8");
    kv_fp8 = bc.kv_cache_dtype == "fp8";
    KILN_CHECK(!kv_fp8 || dtype != DType::F32,
               "--kv-cache-dtype fp8 dequantizes into 16-bit attention; give --dtype bf16 or f16 "
               "(the engine dtype is f32)");
    KILN_CHECK(bc.max_batch >= 1, "max_batch must be >= 1 (got ", bc.max_batch, ")");
    check_shardable(config, bc.tp, bc.pp);
    tp = bc.tp, pp = bc.pp;
    max_batch = bc.max_batch;
    max_seq_len = bc.max_seq_len ? bc.max_seq_len : config.max_position_embeddings;
    KILN_CHECK(max_seq_len >= 1 && max_seq_len <= config.max_position_embeddings, "max_seq_len ",
               max_seq_len, " must be between 1 and the model's max_position_embeddings (",
               config.max_position_embeddings, ")");
  }
};

}  // namespace kiln
