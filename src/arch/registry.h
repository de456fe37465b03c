// Architectures as data. Each supported Hugging Face `architectures[0]` is one ArchSpec: a table
// from HF tensor-name patterns to kiln's canonical tensor names, plus the builder knobs and the
// config keys that differ from the common spelling. Adding a family means adding a table entry.
#pragma once

#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "arch/model_config.h"

namespace kiln {

// `hf` may contain `{layer}` and `{expert}` (decimal indices); `canonical` uses the same
// placeholders. `transpose`: the checkpoint stores [in, out] (GPT-2's Conv1D). `qkv_per_head`:
// a fused QKV weight or bias whose rows are grouped per head, [heads][q, k, v][head_dim]
// (GPT-NeoX), where kiln's wqkv is [q heads][k heads][v heads].
struct TensorRule {
  std::string hf;
  std::string canonical;
  bool transpose = false;
  bool qkv_per_head = false;
};

struct ArchSpec {
  std::string name;
  Knobs knobs;
  std::vector<TensorRule> tensors;
  std::vector<std::string> ignored;  // HF entries that are buffers, not weights
  // Hyper-parameter -> config.json keys to try, where they differ from the common spelling.
  std::map<std::string, std::vector<std::string>> keys;
  // Knob -> boolean config key that may override the table's value (e.g. attention_bias).
  std::map<std::string, std::string> knob_keys;
  // Without `layer_types`: layer i uses the sliding window iff (i + 1) % period != 0 (0: all).
  int sliding_period = 0;
  std::string default_act = "silu";
  // intermediate_size = mult x hidden_size when the config has none (GPT-2's n_inner: null).
  int64_t intermediate_mult = 0;
  // MoE: renormalise the top-k routing weights when the config has no norm_topk_prob.
  bool norm_topk_default = true;
};

// Looks up `architectures[0]`; unknown names throw kiln::Error listing the supported ones.
const ArchSpec& find_arch(const std::string& name);
std::vector<std::string> supported_architectures();

// Reads config.json (both transformers-4 and -5 styles) into a ModelConfig for `spec`. Missing
// required fields throw kiln::Error naming `file` and the field.
ModelConfig resolve_config(const ArchSpec& spec, const nlohmann::json& config,
                           const std::string& file);

// Folds generation_config.json into `c` (eos as int or list, bos) and returns the sampling
// defaults it names (temperature, top_k, top_p, do_sample) as JSON.
nlohmann::json apply_generation_config(ModelConfig& c, const nlohmann::json& gen,
                                       const std::string& file);

}  // namespace kiln
