// Architectures as data. Each supported Hugging Face `architectures[0]` is one ArchSpec: a table
// from HF tensor-name patterns to kiln's canonical tensor names, plus the builder knobs and the
// config keys that differ from the common spelling. Adding a family means adding a table entry.
#pragma once

#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "arch/model_config.h"

namespace kiln {

// `hf` may contain `{layer}` and `{expert}` (decimal indices); `canonical` uses the same
// placeholders. `transpose`: the checkpoint stores [in, out] (GPT-2's Conv1D). `qkv_per_head`:
// a fused QKV weight or bias whose rows are grouped per head, [heads][q, k, v][head_dim]
// (GPT-NeoX), where kiln's wqkv is [q heads][k heads][v heads]. `stacked_experts`: `hf` holds
// every expert of a layer in one tensor, [num_experts, ...] (no `{expert}` in `hf`; the
// canonical name has one), expert e being slice e. `interleaved_gate_up`: a fused gate_up whose
// rows alternate gate and up (GPT-OSS), where kiln's is [gate rows][up rows].
struct TensorRule {
  std::string hf;
  std::string canonical;
  bool transpose = false;
  bool qkv_per_head = false;
  bool stacked_experts = false;
  bool interleaved_gate_up = false;
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
  // Hyper-parameters the family fixes whatever the config says (Falcon-7B's one KV head).
  std::map<std::string, int64_t> constants;
  // Non-empty: the family (or the variant of it a config selects) is refused with this reason.
  std::string unsupported;
  // Layouts one architecture name covers, told apart by config values (Falcon): each variant
  // whose `when` values all equal the config's (missing keys read as `config_defaults` says,
  // else null) applies its partial spec over this one, in order. See specialize_arch.
  struct Variant {
    nlohmann::json when;
    nlohmann::json spec;
  };
  std::vector<Variant> variants;
  nlohmann::json config_defaults = nlohmann::json::object();
  std::string cache_key;  // specialize_arch's results: which spec and variants they came from
};

// Looks up `architectures[0]`; unknown names throw kiln::Error listing the supported ones.
const ArchSpec& find_arch(const std::string& name);
const ArchSpec* try_find_arch(const std::string& name);  // nullptr when unknown
std::vector<std::string> supported_architectures();
// Every spec, in matching order (CMake's KILN_ARCH_SPECS, then those added at run time).
std::vector<const ArchSpec*> all_arch_specs();
// Adds (or, for a name already known, replaces) an architecture from a spec in the format of
// src/arch/specs/*.json (docs/architectures.md); errors name `file` and the field. The returned
// spec lives for the rest of the process. add_arch_spec_file reads the spec from `path`
// (`--arch-spec FILE`).
const ArchSpec& add_arch_spec(const std::string& text, const std::string& file);
// The same checks without adding it (its `extends` resolved against the registry).
ArchSpec parse_arch_spec(const std::string& text, const std::string& file);
const ArchSpec& add_arch_spec_file(const std::string& path);

// The spec a config selects: `a` with every matching variant applied (cached: the result lives
// for the rest of the process); `a` itself when it has no variants. Throws kiln::Error naming
// `file` when the selected spec is `unsupported`. The `when` keys are added to `used_keys`.
const ArchSpec& specialize_arch(const ArchSpec& a, const nlohmann::json& config,
                                const std::string& file, std::set<std::string>* used_keys);

// Knobs <-> the "knobs" object of a spec file and of an engine's manifest (every field, enums
// as their names). knobs_from_json refuses unknown names and wrongly typed values, naming `file`.
nlohmann::json to_json_knobs(const Knobs& k);
Knobs knobs_from_json(const nlohmann::json& j, const std::string& file);
// Refuses a spec whose names the builder does not know (canonical tensor names, key and knob
// names, placeholders, the default activation), naming `file`.
void check_spec(const ArchSpec& a, const std::string& file);

// The activation a config or spec names (`hidden_act` spellings: silu, gelu, gelu_new,
// gelu_pytorch_tanh, relu, swiglu_oai, ...); unknown names throw kiln::Error naming `file`.
Activation parse_activation(const std::string& name, const std::string& file);

// Reads config.json (both transformers-4 and -5 styles) into a ModelConfig for `spec`. Missing
// required fields throw kiln::Error naming `file` and the field. `used_keys`, when given,
// receives every top-level config key the reading consulted (for matching an unregistered
// architecture: a key no family reads may change the computation).
ModelConfig resolve_config(const ArchSpec& spec, const nlohmann::json& config,
                           const std::string& file, std::set<std::string>* used_keys = nullptr);

// A resolved config's sizes (positive where they must be, within kiln's limits, the whole model
// under 2^41 parameters) and values (finite, non-degenerate norm eps, scales, soft-caps, rope
// parameters): kiln::Error naming `file` and the field. The build runs them on config.json, the
// load on the manifest's model.
void check_sizes(const ModelConfig& m, const std::string& file);
void check_values(const ModelConfig& m, const std::string& file);

// Folds generation_config.json into `c` (eos as int or list, bos) and returns the sampling
// defaults it names (temperature, top_k, top_p, do_sample) as JSON.
nlohmann::json apply_generation_config(ModelConfig& c, const nlohmann::json& gen,
                                       const std::string& file);
// Throws a one-line kiln::Error naming `where` and the key unless the sampling defaults (what
// apply_generation_config returns, or an engine manifest's generation_defaults) have HF's types
// and ranges: do_sample a boolean, temperature >= 0, 0 < top_p <= 1, 0 <= min_p <= 1,
// repetition_penalty > 0 (all finite numbers), top_k a non-negative integer.
void check_generation_defaults(const nlohmann::json& d, const std::string& where);

}  // namespace kiln
