// check_spec: refuses an architecture spec whose names the builder does not know (canonical
// tensor names, hyper-parameter keys, knob keys, placeholders, the activation), naming the file.
#include <algorithm>
#include <set>
#include <string>
#include <vector>

#include "arch/registry.h"
#include "core/error.h"

namespace kiln {

using json = nlohmann::json;

void check_spec(const ArchSpec& a, const std::string& file) {
  const std::string what = cat(file, " (", a.name, ")");
  // Canonical names the builder reads (graph/layout.cpp's source_shape).
  static const std::set<std::string> kTop = {"embed",     "lm_head",    "lm_head.bias",
                                             "pos_embed", "final_norm", "final_norm.bias"};
  static const std::set<std::string> kLayer = {"wq",
                                               "wk",
                                               "wv",
                                               "wqkv",
                                               "bq",
                                               "bk",
                                               "bv",
                                               "bqkv",
                                               "wo",
                                               "bo",
                                               "q_norm",
                                               "k_norm",
                                               "q_norm.bias",
                                               "k_norm.bias",
                                               "attn_norm",
                                               "attn_norm.bias",
                                               "ffn_norm",
                                               "ffn_norm.bias",
                                               "post_attn_norm",
                                               "post_attn_norm.bias",
                                               "post_ffn_norm",
                                               "post_ffn_norm.bias",
                                               "w_gate",
                                               "w_up",
                                               "b_gate",
                                               "b_up",
                                               "w_gate_up",
                                               "b_gate_up",
                                               "w_down",
                                               "b_down",
                                               "router",
                                               "router.bias",
                                               "router.score_bias",
                                               "sinks",
                                               "wq_a",
                                               "bq_a",
                                               "q_a_norm",
                                               "wq_b",
                                               "wkv_a",
                                               "bkv_a",
                                               "kv_a_norm",
                                               "wkv_b",
                                               "shared_gate"};
  static const std::set<std::string> kFfn = {"w_gate", "w_up", "w_down", "w_gate_up",
                                             "b_gate", "b_up", "b_down", "b_gate_up"};
  auto placeholders = [](const std::string& s) {
    return std::pair{s.find("{layer}") != std::string::npos,
                     s.find("{expert}") != std::string::npos};
  };
  for (const TensorRule& r : a.tensors) {
    std::string c = r.canonical;
    bool ok = kTop.count(c) > 0;
    if (!ok && c.rfind("layers.{layer}.", 0) == 0) {
      c = c.substr(15);
      if (c.rfind("experts.{expert}.", 0) == 0)
        ok = kFfn.count(c.substr(17)) > 0;
      else if (c.rfind("shared.", 0) == 0)
        ok = kFfn.count(c.substr(7)) > 0;
      else
        ok = kLayer.count(c) > 0;
    }
    if (!ok)
      throw Error(
          cat(what, ": tensor rule ", r.hf, " -> '", r.canonical,
              "': not a canonical name kiln builds from (docs/architectures.md lists them)"));
    if (r.stacked_experts) {
      if (placeholders(r.hf) != std::pair{true, false} ||
          placeholders(r.canonical) != std::pair{true, true})
        throw Error(cat(what, ": tensor rule ", r.hf, " -> ", r.canonical,
                        ": stacked_experts needs {layer} in both names and {expert} in the "
                        "canonical name only"));
    } else if (placeholders(r.hf) != placeholders(r.canonical)) {
      throw Error(cat(what, ": tensor rule ", r.hf, " -> ", r.canonical,
                      ": the two names must use the same {layer} / {expert} placeholders"));
    }
    const std::string leaf = r.canonical.substr(r.canonical.rfind('.') + 1);
    if (r.interleaved_gate_up && leaf != "w_gate_up" && leaf != "b_gate_up")
      throw Error(cat(what, ": tensor rule ", r.hf, " -> ", r.canonical,
                      ": interleaved_gate_up is for w_gate_up / b_gate_up"));
  }
  static const std::set<std::string> kKeys = {"vocab_size",
                                              "hidden_size",
                                              "num_layers",
                                              "num_heads",
                                              "num_kv_heads",
                                              "head_dim",
                                              "intermediate_size",
                                              "max_position_embeddings",
                                              "norm_eps",
                                              "act",
                                              "num_experts",
                                              "moe_intermediate_size",
                                              "embed_multiplier",
                                              "residual_multiplier",
                                              "attn_multiplier",
                                              "logit_divisor",
                                              "logit_multiplier",
                                              "rope_layers",
                                              "rope_layer_interval",
                                              "moe_groups",
                                              "moe_topk_groups",
                                              "routed_scaling",
                                              "shared_experts",
                                              "unused_layers"};
  for (const auto& [k, v] : a.keys) {
    if (!kKeys.count(k))
      throw Error(cat(what, ": 'keys' has '", k, "', not a hyper-parameter kiln reads (",
                      json(std::vector<std::string>(kKeys.begin(), kKeys.end())).dump(), ")"));
    // An empty list for 'act': the family's activation is default_act whatever hidden_act says
    // (GPT-OSS's experts ignore it in transformers too).
    if (v.empty() && k != "act")
      throw Error(cat(what, ": 'keys' gives no config key for '", k, "'"));
  }
  static const std::set<std::string> kKnobKeys = {"qkv_bias",        "o_bias",         "mlp_bias",
                                                  "norm_bias",       "parallel_block", "qk_norm",
                                                  "rope_interleaved"};
  for (const auto& [k, v] : a.knob_keys)
    if (!kKnobKeys.count(k))
      throw Error(cat(what, ": 'knob_keys' has '", k, "'; a config key can set only ",
                      json(std::vector<std::string>(kKnobKeys.begin(), kKnobKeys.end())).dump()));
  for (const auto& [k, v] : a.constants)
    if (k != "num_kv_heads" || v < 1)
      throw Error(cat(what, ": 'constants' can fix num_kv_heads (>= 1) only, not '", k, "'"));
  parse_activation(a.default_act, what);
  if (a.sliding_period < 0) throw Error(cat(what, ": 'sliding_period' must be >= 0"));
  if (a.intermediate_mult < 0) throw Error(cat(what, ": 'intermediate_mult' must be >= 0"));
}

}  // namespace kiln
