// ModelConfig <-> an engine manifest's "model" object (and Knobs <-> a spec's "knobs"): written
// by the build, read back by every load, so a load checks what it reads as a build would.
#include <string>
#include <vector>

#include "arch/registry.h"
#include "core/error.h"

namespace kiln {

using json = nlohmann::json;

NLOHMANN_JSON_SERIALIZE_ENUM(NormKind, {{NormKind::RMS, "rms"},
                                        {NormKind::RMSPlusOne, "rms_plus_one"},
                                        {NormKind::Layer, "layer"},
                                        {NormKind::None, "none"}})
NLOHMANN_JSON_SERIALIZE_ENUM(Activation, {{Activation::SiLU, "silu"},
                                          {Activation::GeluTanh, "gelu_tanh"},
                                          {Activation::GeluErf, "gelu"},
                                          {Activation::ReLU, "relu"},
                                          {Activation::SwiGLUOai, "swiglu_oai"}})
NLOHMANN_JSON_SERIALIZE_ENUM(RopeType, {{RopeType::None, "none"},
                                        {RopeType::Default, "default"},
                                        {RopeType::Linear, "linear"},
                                        {RopeType::Dynamic, "dynamic"},
                                        {RopeType::Llama3, "llama3"},
                                        {RopeType::Yarn, "yarn"},
                                        {RopeType::LongRope, "longrope"}})
NLOHMANN_JSON_SERIALIZE_ENUM(Routing, {{Routing::None, "none"},
                                       {Routing::SoftmaxTopK, "softmax_topk"},
                                       {Routing::SigmoidTopK, "sigmoid_topk"}})

// With defaults: engines written before a knob existed load with the knob's default.
NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE_WITH_DEFAULT(Knobs, norm, norm_bias, qkv_bias, o_bias, mlp_bias,
                                                gated_mlp, qk_norm, post_attn_norm, post_ffn_norm,
                                                embed_scale_sqrt_hidden, learned_positions, rope,
                                                tied_embeddings_default, routing, shared_expert,
                                                pre_norm, parallel_block, shared_block_norm,
                                                qk_norm_full, lm_head_bias, rope_interleaved,
                                                rope_sliding_only, attn_sinks, router_bias,
                                                shared_expert_gated, mla, qk_norm_per_head)
NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE(LayerConfig, sliding_window, rope, moe)

namespace {

template <typename T>
void put_opt(json& j, const char* k, const std::optional<T>& v) {
  if (v) j[k] = *v;
}
template <typename T>
void get_opt(const json& j, const char* k, std::optional<T>& v) {
  if (j.contains(k) && !j[k].is_null()) v = j[k].get<T>();
}

json rope_to_json(const RopeConfig& r) {
  json j = {{"type", r.type},
            {"theta", r.theta},
            {"partial_rotary_factor", r.partial_rotary_factor},
            {"factor", r.factor},
            {"low_freq_factor", r.low_freq_factor},
            {"high_freq_factor", r.high_freq_factor},
            {"original_max_position_embeddings", r.original_max_position_embeddings},
            {"beta_fast", r.beta_fast},
            {"beta_slow", r.beta_slow},
            {"truncate", r.truncate},
            {"short_factor", r.short_factor},
            {"long_factor", r.long_factor}};
  put_opt(j, "attention_factor", r.attention_factor);
  put_opt(j, "mscale", r.mscale);
  put_opt(j, "mscale_all_dim", r.mscale_all_dim);
  return j;
}

RopeConfig rope_from_json(const json& j) {
  RopeConfig r;
  j.at("type").get_to(r.type);
  j.at("theta").get_to(r.theta);
  j.at("partial_rotary_factor").get_to(r.partial_rotary_factor);
  j.at("factor").get_to(r.factor);
  j.at("low_freq_factor").get_to(r.low_freq_factor);
  j.at("high_freq_factor").get_to(r.high_freq_factor);
  j.at("original_max_position_embeddings").get_to(r.original_max_position_embeddings);
  j.at("beta_fast").get_to(r.beta_fast);
  j.at("beta_slow").get_to(r.beta_slow);
  j.at("truncate").get_to(r.truncate);
  j.at("short_factor").get_to(r.short_factor);
  j.at("long_factor").get_to(r.long_factor);
  get_opt(j, "attention_factor", r.attention_factor);
  get_opt(j, "mscale", r.mscale);
  get_opt(j, "mscale_all_dim", r.mscale_all_dim);
  return r;
}

}  // namespace

json to_json(const ModelConfig& m) {
  json ropes = json::array();
  for (const auto& r : m.ropes) ropes.push_back(rope_to_json(r));
  json j = {{"architecture", m.architecture},
            {"knobs", m.knobs},
            {"vocab_size", m.vocab_size},
            {"hidden_size", m.hidden_size},
            {"num_layers", m.num_layers},
            {"num_heads", m.num_heads},
            {"num_kv_heads", m.num_kv_heads},
            {"head_dim", m.head_dim},
            {"intermediate_size", m.intermediate_size},
            {"max_position_embeddings", m.max_position_embeddings},
            {"norm_eps", m.norm_eps},
            {"act", m.act},
            {"tie_word_embeddings", m.tie_word_embeddings},
            {"ropes", ropes},
            {"layers", m.layers},
            {"attn_scale", m.attn_scale},
            {"attn_softcap", m.attn_softcap},
            {"final_softcap", m.final_softcap},
            {"embed_multiplier", m.embed_multiplier},
            {"residual_multiplier", m.residual_multiplier},
            {"logit_multiplier", m.logit_multiplier},
            {"num_experts", m.num_experts},
            {"experts_per_token", m.experts_per_token},
            {"moe_intermediate_size", m.moe_intermediate_size},
            {"shared_expert_intermediate_size", m.shared_expert_intermediate_size},
            {"norm_topk_prob", m.norm_topk_prob},
            {"moe_groups", m.moe_groups},
            {"moe_topk_groups", m.moe_topk_groups},
            {"routed_scaling", m.routed_scaling},
            {"q_lora_rank", m.q_lora_rank},
            {"kv_lora_rank", m.kv_lora_rank},
            {"qk_nope_head_dim", m.qk_nope_head_dim},
            {"qk_rope_head_dim", m.qk_rope_head_dim},
            {"v_head_dim", m.v_head_dim},
            {"eos_token_ids", m.eos_token_ids}};
  put_opt(j, "bos_token_id", m.bos_token_id);
  return j;
}

namespace {

// Where `written` (a manifest's) and `read` (what kiln makes of it, written back) differ: a key
// path, or "" where every value reads back as written. Keys absent from `read` are old engines'
// optional fields; a null is an absent optional.
std::string first_difference(const json& written, const json& read, const std::string& at) {
  if (written.is_object() && read.is_object()) {
    for (const auto& [k, v] : written.items()) {
      if (!read.contains(k)) {
        if (v.is_null()) continue;
        return cat(at, ".", k);
      }
      if (std::string d = first_difference(v, read[k], cat(at, ".", k)); !d.empty()) return d;
    }
    return "";
  }
  if (written.is_array() && read.is_array() && written.size() == read.size()) {
    for (size_t i = 0; i < written.size(); ++i)
      if (std::string d = first_difference(written[i], read[i], cat(at, "[", i, "]")); !d.empty())
        return d;
    return "";
  }
  return written == read ? "" : at;  // numbers compare by value (1 == 1.0)
}

}  // namespace

ModelConfig model_config_from_json(const json& j) {
  if (!j.is_object()) throw Error("model is not a JSON object");
  ModelConfig m;
  j.at("architecture").get_to(m.architecture);
  j.at("knobs").get_to(m.knobs);
  j.at("vocab_size").get_to(m.vocab_size);
  j.at("hidden_size").get_to(m.hidden_size);
  j.at("num_layers").get_to(m.num_layers);
  j.at("num_heads").get_to(m.num_heads);
  j.at("num_kv_heads").get_to(m.num_kv_heads);
  j.at("head_dim").get_to(m.head_dim);
  j.at("intermediate_size").get_to(m.intermediate_size);
  j.at("max_position_embeddings").get_to(m.max_position_embeddings);
  j.at("norm_eps").get_to(m.norm_eps);
  j.at("act").get_to(m.act);
  j.at("tie_word_embeddings").get_to(m.tie_word_embeddings);
  for (const auto& r : j.at("ropes")) m.ropes.push_back(rope_from_json(r));
  j.at("layers").get_to(m.layers);
  j.at("attn_scale").get_to(m.attn_scale);
  j.at("attn_softcap").get_to(m.attn_softcap);
  j.at("final_softcap").get_to(m.final_softcap);
  // Absent from engines written before these existed: 1.
  m.embed_multiplier = j.value("embed_multiplier", 1.0);
  m.residual_multiplier = j.value("residual_multiplier", 1.0);
  m.logit_multiplier = j.value("logit_multiplier", 1.0);
  j.at("num_experts").get_to(m.num_experts);
  j.at("experts_per_token").get_to(m.experts_per_token);
  j.at("moe_intermediate_size").get_to(m.moe_intermediate_size);
  j.at("shared_expert_intermediate_size").get_to(m.shared_expert_intermediate_size);
  j.at("norm_topk_prob").get_to(m.norm_topk_prob);
  // Absent from engines written before group-limited routing and MLA: their defaults.
  m.moe_groups = j.value("moe_groups", int64_t{1});
  m.moe_topk_groups = j.value("moe_topk_groups", int64_t{1});
  m.routed_scaling = j.value("routed_scaling", 1.0);
  m.q_lora_rank = j.value("q_lora_rank", int64_t{0});
  m.kv_lora_rank = j.value("kv_lora_rank", int64_t{0});
  m.qk_nope_head_dim = j.value("qk_nope_head_dim", int64_t{0});
  m.qk_rope_head_dim = j.value("qk_rope_head_dim", int64_t{0});
  m.v_head_dim = j.value("v_head_dim", int64_t{0});
  j.at("eos_token_ids").get_to(m.eos_token_ids);
  get_opt(j, "bos_token_id", m.bos_token_id);
  // What the decoder indexes by: a layer entry per layer, each naming a rope of the table.
  if (m.num_layers < 1 || int64_t(m.layers.size()) != m.num_layers)
    throw Error(
        cat("model.layers has ", m.layers.size(), " entries for num_layers ", m.num_layers));
  for (size_t l = 0; l < m.layers.size(); ++l)
    if (m.layers[l].rope < 0 || size_t(m.layers[l].rope) >= m.ropes.size())
      throw Error(cat("model.layers[", l, "].rope is ", m.layers[l].rope, ", not one of the ",
                      m.ropes.size(), " entries of model.ropes"));
  // nlohmann reads an unknown enum name (a rope type, an activation, a norm) as the enum's first
  // value: every field must read back as it was written.
  if (const std::string d = first_difference(j, to_json(m), "model"); !d.empty())
    throw Error(cat(d, " is not a value this kiln reads"));
  // What a build refuses, a load refuses too (an edited manifest is a config never checked).
  check_sizes(m, "model");
  check_values(m, "model");
  return m;
}

json to_json_knobs(const Knobs& k) {
  return json(k);
}

Knobs knobs_from_json(const json& j, const std::string& file) {
  if (!j.is_object()) throw Error(cat(file, ": 'knobs' must be an object"));
  const json all = json(Knobs{});
  for (const auto& [name, v] : j.items()) {
    if (!all.contains(name)) throw Error(cat(file, ": unknown knob '", name, "'"));
    if (all[name].is_boolean() && !v.is_boolean())
      throw Error(cat(file, ": knob '", name, "' must be true or false"));
  }
  // Enum knobs: only their names (nlohmann maps an unknown string to the first value).
  const std::pair<const char*, std::vector<std::string>> enums[] = {
      {"norm", {"rms", "rms_plus_one", "layer", "none"}},
      {"routing", {"none", "softmax_topk", "sigmoid_topk"}}};
  for (const auto& [name, values] : enums)
    if (j.contains(name) &&
        (!j[name].is_string() ||
         std::find(values.begin(), values.end(), j[name].get<std::string>()) == values.end()))
      throw Error(cat(file, ": knob '", name, "' must be one of ", json(values).dump()));
  json merged = all;
  for (const auto& [name, v] : j.items()) merged[name] = v;
  return merged.get<Knobs>();
}

}  // namespace kiln
