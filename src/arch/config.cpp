// config.json / generation_config.json -> ModelConfig, and the size and value checks a build and
// a load share (the manifest's JSON is manifest_json.cpp's).
#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "arch/registry.h"
#include "core/error.h"

namespace kiln {

using json = nlohmann::json;

namespace {

template <typename T>
const char* type_name() {
  if constexpr (std::is_same_v<T, std::string>) return "a string";
  if constexpr (std::is_same_v<T, std::vector<std::string>>) return "a list of strings";
  if constexpr (std::is_same_v<T, std::vector<double>>) return "a list of numbers";
  if constexpr (std::is_same_v<T, std::vector<int64_t>>) return "a list of integers";
  if constexpr (std::is_same_v<T, int64_t>) return "an integer";
  return "a number";
}

// v as T, or an Error naming the file and field (never json's own exception text).
template <typename T>
T typed(const json& v, const std::string& file, const std::string& field) {
  try {
    return v.get<T>();
  } catch (const json::exception&) {
    throw Error(cat(file, ": field '", field, "' must be ", type_name<T>()));
  }
}

// Reads typed config fields and names the file and key in every error.
struct Reader {
  const json& c;
  const std::string& file;
  std::set<std::string>* used = nullptr;  // keys consulted that the config has

  void mark(const std::string& k) const {
    if (used && c.contains(k)) used->insert(k);
  }
  const json* find(const std::vector<std::string>& keys) const {
    for (const auto& k : keys) mark(k);
    for (const auto& k : keys)
      if (c.contains(k) && !c[k].is_null()) return &c[k];
    return nullptr;
  }
  int64_t integer(const std::vector<std::string>& keys) const {
    const json* v = find(keys);
    if (!v) throw Error(cat(file, ": missing config field '", keys[0], "'"));
    if (!v->is_number_integer() || v->get<int64_t>() < 0)
      throw Error(cat(file, ": field '", keys[0], "' must be a non-negative integer"));
    return v->get<int64_t>();
  }
  int64_t integer(const std::vector<std::string>& keys, int64_t dflt) const {
    return find(keys) ? integer(keys) : dflt;
  }
  double number(const std::vector<std::string>& keys, double dflt) const {
    const json* v = find(keys);
    if (!v) return dflt;
    if (!v->is_number()) throw Error(cat(file, ": field '", keys[0], "' must be a number"));
    return v->get<double>();
  }
  bool boolean(const std::string& key, bool dflt) const {
    mark(key);
    if (!c.contains(key) || c[key].is_null()) return dflt;
    if (!c[key].is_boolean()) throw Error(cat(file, ": field '", key, "' must be true or false"));
    return c[key].get<bool>();
  }
};

// One rope description: `p` is a transformers-5 rope_parameters object or a transformers-4
// rope_scaling object (possibly null), `theta` the base when `p` does not carry rope_theta.
RopeConfig parse_rope(const json& p, double theta, double partial, int64_t max_pos,
                      const std::string& file) {
  RopeConfig r;
  r.theta = theta;
  r.partial_rotary_factor = partial;
  if (p.is_null()) return r;
  if (!p.is_object()) throw Error(cat(file, ": rope parameters must be an object"));
  Reader rd{p, file};
  auto opt_number = [&](const json& j, const char* k, std::optional<double>& v) {
    if (j.contains(k) && !j[k].is_null()) v = typed<double>(j[k], file, k);
  };
  std::string type = "default";
  if (p.contains("rope_type") && p["rope_type"].is_string())
    type = p["rope_type"];
  else if (p.contains("type") && p["type"].is_string())
    type = p["type"];
  r.theta = rd.number({"rope_theta"}, theta);
  r.partial_rotary_factor = rd.number({"partial_rotary_factor"}, partial);
  r.factor = rd.number({"factor"}, 1.0);
  r.original_max_position_embeddings = rd.integer({"original_max_position_embeddings"}, max_pos);
  if (type == "default") {
    r.type = RopeType::Default;
  } else if (type == "linear") {
    r.type = RopeType::Linear;
  } else if (type == "dynamic") {
    r.type = RopeType::Dynamic;
  } else if (type == "llama3") {
    r.type = RopeType::Llama3;
    r.low_freq_factor = rd.number({"low_freq_factor"}, 1.0);
    r.high_freq_factor = rd.number({"high_freq_factor"}, 4.0);
    if (!p.contains("original_max_position_embeddings"))
      throw Error(cat(file, ": llama3 rope needs 'original_max_position_embeddings'"));
  } else if (type == "yarn") {
    r.type = RopeType::Yarn;
    r.beta_fast = rd.number({"beta_fast"}, 32.0);
    r.beta_slow = rd.number({"beta_slow"}, 1.0);
    if (p.contains("truncate") && p["truncate"].is_boolean()) r.truncate = p["truncate"];
    opt_number(p, "attention_factor", r.attention_factor);
    opt_number(p, "mscale", r.mscale);
    opt_number(p, "mscale_all_dim", r.mscale_all_dim);
  } else if (type == "longrope" || type == "su") {
    r.type = RopeType::LongRope;
    if (!p.contains("short_factor") || !p.contains("long_factor"))
      throw Error(cat(file, ": longrope needs 'short_factor' and 'long_factor'"));
    r.short_factor = typed<std::vector<double>>(p["short_factor"], file, "short_factor");
    r.long_factor = typed<std::vector<double>>(p["long_factor"], file, "long_factor");
    opt_number(p, "attention_factor", r.attention_factor);
  } else {
    throw Error(cat(file, ": unsupported rope type '", type, "'"));
  }
  return r;
}

}  // namespace

// Sizes whose products overflow or whose allocations are absurd: refused before anything is
// sized from them (the per-layer tables included), naming the field.
void check_sizes(const ModelConfig& m, const std::string& file) {
  auto fail = [&](const std::string& field, const std::string& why) {
    throw Error(cat(file, ": ", field, " ", why));
  };
  auto limit = [&](int64_t v, int64_t most, const char* field) {
    if (v > most) fail(field, cat("= ", v, " is beyond kiln's limit of ", most));
  };
  // The build's reader refuses these first; an edited manifest reaches here unchecked.
  for (const auto& [v, field] :
       {std::pair{m.vocab_size, "vocab_size"}, std::pair{m.hidden_size, "hidden_size"},
        std::pair{m.num_layers, "num_hidden_layers"}, std::pair{m.num_heads, "num_attention_heads"},
        std::pair{m.num_kv_heads, "num_key_value_heads"}, std::pair{m.head_dim, "head_dim"},
        std::pair{m.max_position_embeddings, "max_position_embeddings"}})
    if (v < 1) fail(field, cat("= ", v, " must be > 0"));
  for (const auto& [v, field] :
       {std::pair{m.intermediate_size, "intermediate_size"},
        std::pair{m.moe_intermediate_size, "moe_intermediate_size"},
        std::pair{m.shared_expert_intermediate_size, "shared_expert_intermediate_size"},
        std::pair{m.num_experts, "num_experts"},
        std::pair{m.experts_per_token, "experts_per_token"}})
    if (v < 0) fail(field, cat("= ", v, " must not be negative"));
  if (m.num_heads % m.num_kv_heads != 0)
    fail("num_attention_heads",
         cat("(", m.num_heads, ") must be a multiple of num_key_value_heads (", m.num_kv_heads,
             ")"));
  if (m.knobs.routing != Routing::None &&
      (m.experts_per_token < 1 || m.experts_per_token > m.num_experts || m.moe_groups < 1 ||
       m.num_experts % m.moe_groups != 0 || m.moe_topk_groups < 1 ||
       m.moe_topk_groups > m.moe_groups))
    fail("num_experts_per_tok", cat("(", m.experts_per_token, " of ", m.num_experts, " experts in ",
                                    m.moe_groups, " groups, choosing ", m.moe_topk_groups,
                                    ") must be 1 to the number of experts, in "
                                    "groups that divide the experts"));
  limit(m.vocab_size, (int64_t(1) << 31) - 1, "vocab_size");  // token ids are int32
  limit(m.hidden_size, int64_t(1) << 20, "hidden_size");
  limit(m.num_layers, int64_t(1) << 14, "num_hidden_layers");
  limit(m.num_heads, int64_t(1) << 14, "num_attention_heads");
  limit(m.head_dim, int64_t(1) << 14, "head_dim");
  limit(m.intermediate_size, int64_t(1) << 24, "intermediate_size");
  limit(m.moe_intermediate_size, int64_t(1) << 24, "moe_intermediate_size");
  limit(m.shared_expert_intermediate_size, int64_t(1) << 24, "shared_expert_intermediate_size");
  limit(m.num_experts, int64_t(1) << 12, "num_experts");
  // Positions are int32 and RoPE tables grow with them (16M: past the longest context shipped).
  limit(m.max_position_embeddings, int64_t(1) << 24, "max_position_embeddings");
  if (m.intermediate_size == 0 && m.knobs.routing == Routing::None)
    fail("intermediate_size", "must be > 0");
  // Parameters, in floating point (the products of limited fields stay exact enough and cannot
  // wrap): the whole model must stay under 2^41 (2.2 trillion).
  const double h = double(m.hidden_size),
               attn = 2.0 * h * double(m.q_dim()) + 2.0 * h * double(m.kv_dim());
  double per_layer = attn + 3.0 * h * double(m.intermediate_size);
  if (m.knobs.routing != Routing::None)
    per_layer =
        attn + 3.0 * h *
                   (double(m.num_experts) * double(m.moe_intermediate_size) +
                    double(m.shared_expert_intermediate_size) + double(m.intermediate_size));
  const double params = double(m.num_layers) * per_layer + 2.0 * double(m.vocab_size) * h;
  if (params > double(int64_t(1) << 41))
    fail("sizes", cat("(num_hidden_layers ", m.num_layers, ", hidden_size ", m.hidden_size,
                      ", intermediate_size ", m.intermediate_size, ", vocab_size ", m.vocab_size,
                      ", num_experts ", m.num_experts, ") make ", params, " parameters (",
                      params * 2 / 1e12, " TB in BF16): more than kiln's limit of 2^41"));
}

// Values that parse but would make every logit NaN or the model degenerate: refused at build and
// at load, naming the field.
void check_values(const ModelConfig& m, const std::string& file) {
  auto fail = [&](const std::string& field, const std::string& why) {
    throw Error(cat(file, ": ", field, " ", why));
  };
  auto positive = [&](double v, const std::string& field) {
    if (!std::isfinite(v) || v <= 0) fail(field, cat("must be a finite number > 0 (got ", v, ")"));
  };
  positive(m.norm_eps, "rms_norm_eps / layer_norm_eps");
  if (m.norm_eps > 1) fail("rms_norm_eps / layer_norm_eps", cat("= ", m.norm_eps, " is above 1"));
  positive(m.attn_scale, "query_pre_attn_scalar (the attention scale)");
  for (const auto& [v, field] : {std::pair{m.embed_multiplier, "embedding_multiplier"},
                                 std::pair{m.residual_multiplier, "residual_multiplier"},
                                 std::pair{m.logit_multiplier, "logit_scale / logits_scaling"}})
    positive(v, field);
  // Soft-caps: 0 is off; a cap below 1 squashes every logit into (-cap, cap): degenerate.
  for (const auto& [v, field] : {std::pair{m.attn_softcap, "attn_logit_softcapping"},
                                 std::pair{m.final_softcap, "final_logit_softcapping"}})
    if (!std::isfinite(v) || v < 0 || (v > 0 && v < 1))
      fail(field, cat("must be 0 (off) or a finite number >= 1 (got ", v, ")"));
  for (const RopeConfig& r : m.ropes) {
    if (r.type == RopeType::None) continue;
    if (!std::isfinite(r.theta) || r.theta <= 1)
      fail("rope_theta", cat("must be a finite number > 1 (got ", r.theta, ")"));
    if (!std::isfinite(r.partial_rotary_factor) || r.partial_rotary_factor <= 0 ||
        r.partial_rotary_factor > 1)
      fail("partial_rotary_factor", cat("must be in (0, 1] (got ", r.partial_rotary_factor, ")"));
    positive(r.factor, "rope scaling factor");
    if (r.type == RopeType::Llama3) {
      positive(r.low_freq_factor, "rope low_freq_factor");
      positive(r.high_freq_factor, "rope high_freq_factor");
      if (r.high_freq_factor <= r.low_freq_factor)
        fail("rope high_freq_factor",
             cat("(", r.high_freq_factor, ") must be above low_freq_factor (", r.low_freq_factor,
                 ")"));
      positive(double(r.original_max_position_embeddings), "original_max_position_embeddings");
    }
    if (r.type == RopeType::Yarn) {
      if (!std::isfinite(r.beta_fast) || !std::isfinite(r.beta_slow) || r.beta_fast <= r.beta_slow)
        fail("rope beta_fast",
             cat("(", r.beta_fast, ") must be finite and above beta_slow (", r.beta_slow, ")"));
      for (const auto& [o, field] : {std::pair{&r.attention_factor, "rope attention_factor"},
                                     std::pair{&r.mscale, "rope mscale"},
                                     std::pair{&r.mscale_all_dim, "rope mscale_all_dim"}})
        if (*o) positive(**o, field);
    }
    if (r.type == RopeType::LongRope) {
      for (const double f : r.short_factor) positive(f, "rope short_factor entries");
      for (const double f : r.long_factor) positive(f, "rope long_factor entries");
      if (r.attention_factor) positive(*r.attention_factor, "rope attention_factor");
    }
  }
}

Activation parse_activation(const std::string& s, const std::string& file) {
  if (s == "silu" || s == "swish") return Activation::SiLU;
  if (s == "gelu_pytorch_tanh" || s == "gelu_new" || s == "gelu_fast" || s == "gelu_tanh")
    return Activation::GeluTanh;
  if (s == "gelu") return Activation::GeluErf;
  if (s == "relu") return Activation::ReLU;
  if (s == "swiglu_oai" || s == "swigluoai") return Activation::SwiGLUOai;
  throw Error(cat(file, ": unsupported activation '", s, "'"));
}

static ModelConfig resolve_fields(const ArchSpec& spec, const json& c, const std::string& file,
                                  std::set<std::string>* used) {
  if (!c.is_object()) throw Error(cat(file, ": config is not a JSON object"));
  Reader rd{c, file, used};
  // Read directly below, for every family.
  for (const char* k : {"architectures", "rope_parameters", "rope_scaling", "layer_types",
                        "use_sliding_window", "mlp_only_layers", "quantization_config"})
    rd.mark(k);
  auto keys = [&](const std::string& canon, std::vector<std::string> dflt) {
    auto it = spec.keys.find(canon);
    return it == spec.keys.end() ? dflt : it->second;
  };
  ModelConfig m;
  m.architecture = spec.name;
  m.knobs = spec.knobs;
  for (const auto& [knob, key] : spec.knob_keys) {
    bool* k = knob == "qkv_bias"           ? &m.knobs.qkv_bias
              : knob == "o_bias"           ? &m.knobs.o_bias
              : knob == "mlp_bias"         ? &m.knobs.mlp_bias
              : knob == "norm_bias"        ? &m.knobs.norm_bias
              : knob == "parallel_block"   ? &m.knobs.parallel_block
              : knob == "qk_norm"          ? &m.knobs.qk_norm
              : knob == "rope_interleaved" ? &m.knobs.rope_interleaved
                                           : nullptr;
    if (!k) throw Error(cat("architecture table ", spec.name, ": unknown knob '", knob, "'"));
    *k = rd.boolean(key, *k);
  }
  m.vocab_size = rd.integer(keys("vocab_size", {"vocab_size"}));
  m.hidden_size = rd.integer(keys("hidden_size", {"hidden_size"}));
  m.num_layers = rd.integer(keys("num_layers", {"num_hidden_layers"}));
  m.num_heads = rd.integer(keys("num_heads", {"num_attention_heads"}));
  m.num_kv_heads = rd.integer(keys("num_kv_heads", {"num_key_value_heads"}), m.num_heads);
  if (const auto it = spec.constants.find("num_kv_heads"); it != spec.constants.end())
    m.num_kv_heads = it->second;
  if (m.num_heads == 0 || m.hidden_size == 0 || m.num_layers == 0 || m.vocab_size == 0)
    throw Error(cat(file, ": hidden_size, vocab_size and the layer and head counts must be > 0"));
  // transformers itself falls back to hidden_size / num_attention_heads when head_dim is absent.
  m.head_dim = rd.integer(keys("head_dim", {"head_dim"}), m.hidden_size / m.num_heads);
  if (m.num_kv_heads == 0 || m.num_heads % m.num_kv_heads != 0)
    throw Error(cat(file, ": num_attention_heads (", m.num_heads,
                    ") must be a multiple of num_key_value_heads (", m.num_kv_heads, ")"));
  if (m.knobs.mla) {
    // The attention op sees one latent KV head of kv_lora_rank + qk_rope_head_dim (Knobs::mla).
    m.q_lora_rank = rd.integer({"q_lora_rank"}, 0);
    m.kv_lora_rank = rd.integer({"kv_lora_rank"});
    m.qk_nope_head_dim = rd.integer({"qk_nope_head_dim"});
    m.qk_rope_head_dim = rd.integer({"qk_rope_head_dim"});
    m.v_head_dim = rd.integer({"v_head_dim"});
    rd.mark("qk_head_dim");  // written by transformers 5: qk_nope_head_dim + qk_rope_head_dim
    if (m.kv_lora_rank < 1 || m.qk_rope_head_dim < 2 || m.qk_rope_head_dim % 2 ||
        m.v_head_dim < 1 || m.kv_lora_rank > (1 << 16) || m.qk_nope_head_dim > (1 << 16) ||
        m.qk_rope_head_dim > (1 << 16) || m.v_head_dim > (1 << 16) || m.q_lora_rank > (1 << 20))
      throw Error(cat(file, ": MLA sizes kv_lora_rank ", m.kv_lora_rank, ", qk_rope_head_dim ",
                      m.qk_rope_head_dim, ", v_head_dim ", m.v_head_dim,
                      " must be >= 1 (the rope part even, >= 2) and at most 65536"));
    m.num_kv_heads = 1;
    m.head_dim = m.kv_lora_rank + m.qk_rope_head_dim;
  }
  if (spec.intermediate_mult > 0 && !rd.find(keys("intermediate_size", {"intermediate_size"})))
    m.intermediate_size = spec.intermediate_mult * m.hidden_size;
  else
    m.intermediate_size = rd.integer(keys("intermediate_size", {"intermediate_size"}));
  m.max_position_embeddings =
      rd.integer(keys("max_position_embeddings", {"max_position_embeddings"}));
  m.norm_eps = rd.number(keys("norm_eps", {"rms_norm_eps", "layer_norm_eps"}), 1e-6);
  std::string act = spec.default_act;
  if (const json* v = rd.find(keys("act", {"hidden_act"})))
    act = typed<std::string>(*v, file, "hidden_act");
  m.act = parse_activation(act, file);
  if (m.act == Activation::SwiGLUOai && !m.knobs.gated_mlp)
    throw Error(cat(file, ": the swiglu_oai activation needs a gated MLP"));
  m.tie_word_embeddings = rd.boolean("tie_word_embeddings", spec.knobs.tied_embeddings_default);
  m.attn_scale = 1.0 / std::sqrt(double(m.head_dim));
  // Gemma 2/3 scale queries by query_pre_attn_scalar instead of head_dim.
  if (rd.find({"query_pre_attn_scalar"}))
    m.attn_scale = 1.0 / std::sqrt(rd.number({"query_pre_attn_scalar"}, double(m.head_dim)));
  if (const auto it = spec.keys.find("attn_multiplier");
      it != spec.keys.end() && rd.find(it->second))
    m.attn_scale = rd.number(it->second, m.attn_scale);
  m.embed_multiplier = rd.number(keys("embed_multiplier", {}), 1.0);
  m.residual_multiplier = rd.number(keys("residual_multiplier", {}), 1.0);
  m.logit_multiplier = rd.number(keys("logit_multiplier", {}), 1.0);
  // Granite divides its logits by logits_scaling.
  if (const auto it = spec.keys.find("logit_divisor");
      it != spec.keys.end() && rd.find(it->second)) {
    const double d = rd.number(it->second, 1.0);
    if (!std::isfinite(d) || d <= 0)
      throw Error(cat(file, ": field '", it->second[0], "' must be a finite number > 0"));
    m.logit_multiplier = 1.0 / d;
  }
  m.attn_softcap = rd.number({"attn_logit_softcapping"}, 0.0);
  m.final_softcap = rd.number({"final_logit_softcapping"}, 0.0);

  if (m.knobs.routing != Routing::None) {
    // transformers 5 renamed Qwen-MoE's num_experts to num_local_experts (Mixtral's name).
    m.num_experts = rd.integer(keys("num_experts", {"num_experts", "num_local_experts"}));
    m.experts_per_token = rd.integer({"num_experts_per_tok"});
    m.moe_intermediate_size = rd.integer(keys("moe_intermediate_size", {"moe_intermediate_size"}));
    // DeepSeek counts its shared experts (each of moe_intermediate_size) instead.
    if (m.knobs.shared_expert && spec.keys.count("shared_experts"))
      m.shared_expert_intermediate_size =
          rd.integer(spec.keys.at("shared_experts")) * m.moe_intermediate_size;
    else if (m.knobs.shared_expert)
      m.shared_expert_intermediate_size = rd.integer({"shared_expert_intermediate_size"});
    m.moe_groups = rd.integer(keys("moe_groups", {}), 1);
    m.unused_layers = rd.integer(keys("unused_layers", {}), 0);
    m.moe_topk_groups = rd.integer(keys("moe_topk_groups", {}), 1);
    m.routed_scaling = rd.number(keys("routed_scaling", {}), 1.0);
    if (m.moe_groups < 1 || m.num_experts % m.moe_groups != 0 || m.moe_topk_groups < 1 ||
        m.moe_topk_groups > m.moe_groups)
      throw Error(cat(file, ": ", m.num_experts, " experts in ", m.moe_groups, " groups, choosing ",
                      m.moe_topk_groups,
                      " of them: the groups must divide the experts and 1 <= chosen <= groups"));
    if (m.moe_topk_groups * (m.num_experts / m.moe_groups) < m.experts_per_token)
      throw Error(cat(file, ": ", m.moe_topk_groups, " groups of ", m.num_experts / m.moe_groups,
                      " experts cannot hold num_experts_per_tok = ", m.experts_per_token));
    if (!std::isfinite(m.routed_scaling) || m.routed_scaling <= 0)
      throw Error(cat(file, ": routed_scaling_factor must be a finite number > 0"));
    m.norm_topk_prob = rd.boolean("norm_topk_prob", spec.norm_topk_default);
    if (m.experts_per_token < 1 || m.experts_per_token > m.num_experts)
      throw Error(cat(file, ": num_experts_per_tok (", m.experts_per_token,
                      ") must be between 1 and the number of experts (", m.num_experts, ")"));
  }

  check_sizes(m, file);

  // RoPE: transformers-5 rope_parameters (one object, or one per layer type), else
  // transformers-4 rope_theta + rope_scaling.
  const double partial = rd.number({"partial_rotary_factor"}, 1.0);
  // Phi-3 keeps original_max_position_embeddings at the top level, not in rope_scaling.
  const int64_t orig_max =
      rd.integer({"original_max_position_embeddings"}, m.max_position_embeddings);
  std::vector<std::string> rope_types;  // layer type per rope entry, when keyed by layer type
  for (const char* k : {"rope_parameters", "rope_scaling"})
    if (c.contains(k) && !c[k].is_null() && !c[k].is_object())
      throw Error(cat(file, ": field '", k, "' must be an object, not ", c[k].type_name()));
  if (c.contains("rope_parameters") && c["rope_parameters"].is_object()) {
    const json& rp = c["rope_parameters"];
    bool keyed = !rp.empty();
    for (auto& [k, v] : rp.items()) keyed = keyed && v.is_object();
    if (keyed) {
      for (auto& [k, v] : rp.items()) {
        rope_types.push_back(k);
        m.ropes.push_back(parse_rope(v, 10000.0, partial, orig_max, file));
      }
    } else {
      m.ropes.push_back(
          parse_rope(rp, rd.number({"rope_theta"}, 10000.0), partial, orig_max, file));
    }
  } else {
    const json null;
    const json& scaling = c.contains("rope_scaling") ? c["rope_scaling"] : null;
    m.ropes.push_back(
        parse_rope(scaling, rd.number({"rope_theta"}, 10000.0), partial, orig_max, file));
    // Gemma 3 (transformers 4): sliding layers use plain RoPE with rope_local_base_freq.
    if (rd.find({"rope_local_base_freq"})) {
      rope_types = {"full_attention", "sliding_attention"};
      m.ropes.push_back(parse_rope(json(), rd.number({"rope_local_base_freq"}, 10000.0), partial,
                                   orig_max, file));
    }
  }
  if (!m.knobs.rope) {
    m.ropes.assign(1, RopeConfig{});
    m.ropes[0].type = RopeType::None;
    rope_types.clear();
  }
  if (m.knobs.mla) {
    // Scores scale by the query's own width (nope + rope), times DeepSeek's yarn mscale squared
    // when the rope parameters carry mscale_all_dim (transformers' yarn_apply_mscale).
    m.attn_scale = 1.0 / std::sqrt(double(m.qk_head_dim()));
    const RopeConfig& r = m.ropes[0];
    if (r.type != RopeType::Default && r.type != RopeType::None && r.mscale_all_dim &&
        *r.mscale_all_dim != 0 && r.factor > 1) {
      const double ms = 0.1 * *r.mscale_all_dim * std::log(r.factor) + 1.0;
      m.attn_scale *= ms * ms;
    }
  }

  // Per-layer attention pattern.
  const int64_t window = rd.integer({"sliding_window"}, 0);
  std::vector<std::string> types;
  if (c.contains("layer_types") && c["layer_types"].is_array()) {
    types = typed<std::vector<std::string>>(c["layer_types"], file, "layer_types");
    if (int64_t(types.size()) != m.num_layers)
      throw Error(cat(file, ": layer_types has ", types.size(),
                      " entries but num_hidden_layers is ", m.num_layers));
  } else {
    const bool use_sw = rd.boolean("use_sliding_window", true);
    const int64_t first_sw =
        c.contains("use_sliding_window") ? rd.integer({"max_window_layers"}, 0) : 0;
    const int64_t period = rd.integer({"sliding_window_pattern"}, spec.sliding_period);
    for (int64_t i = 0; i < m.num_layers; ++i) {
      bool sw = use_sw && window > 0 && i >= first_sw && (period == 0 || (i + 1) % period != 0);
      types.push_back(sw ? "sliding_attention" : "full_attention");
    }
  }
  for (int64_t i = 0; i < m.num_layers; ++i) {
    LayerConfig l;
    const std::string& t = types[size_t(i)];
    if (t == "sliding_attention") {
      if (window <= 0)
        throw Error(
            cat(file, ": layer ", i, " is sliding_attention but sliding_window is not set"));
      l.sliding_window = window;
    } else if (t != "full_attention") {
      throw Error(cat(file, ": layer_types[", i, "] = '", t, "' is not supported"));
    }
    if (!rope_types.empty()) {
      auto it = std::find(rope_types.begin(), rope_types.end(), t);
      if (it == rope_types.end())
        throw Error(cat(file, ": rope_parameters has no entry for layer type '", t, "'"));
      l.rope = int(it - rope_types.begin());
    }
    m.layers.push_back(l);
  }
  // Layers without rope by a per-layer list (SmolLM3's no_rope_layers: 1 = rope, 0 = none), or
  // every interval-th layer when only the interval is given (what transformers derives).
  const auto rope_list = spec.keys.find("rope_layers");
  const auto rope_every = spec.keys.find("rope_layer_interval");
  if (m.knobs.rope && (rope_list != spec.keys.end() || rope_every != spec.keys.end())) {
    std::vector<int64_t> use(size_t(m.num_layers), 1);
    const json* v = rope_list != spec.keys.end() ? rd.find(rope_list->second) : nullptr;
    if (v) {
      const std::string field = rope_list->second[0];
      use = typed<std::vector<int64_t>>(*v, file, field);
      if (int64_t(use.size()) != m.num_layers)
        throw Error(cat(file, ": ", field, " has ", use.size(),
                        " entries but num_hidden_layers is ", m.num_layers));
      for (const int64_t u : use)
        if (u != 0 && u != 1) throw Error(cat(file, ": ", field, " entries must be 0 or 1"));
    } else if (rope_every != spec.keys.end() && rd.find(rope_every->second)) {
      const int64_t every = rd.integer(rope_every->second);
      if (every < 1) throw Error(cat(file, ": field '", rope_every->second[0], "' must be >= 1"));
      for (int64_t i = 0; i < m.num_layers; ++i) use[size_t(i)] = (i + 1) % every != 0;
    }
    if (rope_every != spec.keys.end()) rd.find(rope_every->second);  // read: explained
    if (std::find(use.begin(), use.end(), 0) != use.end()) {
      RopeConfig nope;
      nope.type = RopeType::None;
      m.ropes.push_back(nope);
      for (int64_t i = 0; i < m.num_layers; ++i)
        if (!use[size_t(i)]) m.layers[size_t(i)].rope = int(m.ropes.size() - 1);
    }
  }
  if (m.knobs.rope_sliding_only && m.knobs.rope) {
    RopeConfig nope;
    nope.type = RopeType::None;
    m.ropes.push_back(nope);
    for (LayerConfig& l : m.layers)
      if (l.sliding_window == 0) l.rope = int(m.ropes.size() - 1);
  }
  if (m.knobs.routing != Routing::None) {
    const int64_t step = rd.integer({"decoder_sparse_step"}, 1);
    std::vector<int64_t> dense;
    if (c.contains("mlp_only_layers") && c["mlp_only_layers"].is_array())
      dense = typed<std::vector<int64_t>>(c["mlp_only_layers"], file, "mlp_only_layers");
    // DeepSeek: the first first_k_dense_replace layers keep a dense MLP.
    const int64_t first_moe = rd.integer({"first_k_dense_replace"}, 0);
    for (int64_t i = 0; i < m.num_layers; ++i)
      m.layers[size_t(i)].moe = std::find(dense.begin(), dense.end(), i) == dense.end() &&
                                step > 0 && (i + 1) % step == 0 && i >= first_moe;
  }

  if (const json* v = rd.find({"bos_token_id"}); v && v->is_number_integer())
    m.bos_token_id = v->get<int64_t>();
  if (const json* v = rd.find({"eos_token_id"})) {
    if (v->is_number_integer())
      m.eos_token_ids = {v->get<int64_t>()};
    else if (v->is_array())
      m.eos_token_ids = typed<std::vector<int64_t>>(*v, file, "eos_token_id");
    else
      throw Error(cat(file, ": field 'eos_token_id' must be an integer or a list of integers"));
  }
  check_values(m, file);
  // The folds of residual_multiplier / logit_multiplier (ModelConfig) are exact only where the
  // scaled weights feed the residual add / the logits linearly.
  if (m.knobs.parallel_block && !m.knobs.pre_norm)
    throw Error(cat(file, ": a parallel attention / FFN block needs input norms"));
  if (m.residual_multiplier != 1 && (m.knobs.post_attn_norm || m.knobs.post_ffn_norm))
    throw Error(cat(file,
                    ": residual_multiplier with post-attention / post-FFN norms is not "
                    "supported"));
  if (m.logit_multiplier != 1 && (m.knobs.norm == NormKind::RMSPlusOne || m.final_softcap > 0))
    throw Error(cat(file, ": a logit scale with ",
                    m.final_softcap > 0 ? "final_logit_softcapping" : "(1 + w) norms",
                    " is not supported"));
  for (size_t i = 0; i < m.ropes.size(); ++i) {
    const RopeConfig& r = m.ropes[i];
    const int64_t dim = m.rotary_dim(int(i));
    if (r.type != RopeType::None && (dim <= 0 || dim > m.head_dim))
      throw Error(cat(file, ": partial_rotary_factor gives an invalid rotary dimension"));
    // One factor per rotated pair, as transformers divides inv_freq by them elementwise.
    if (r.type == RopeType::LongRope &&
        (int64_t(r.short_factor.size()) != dim / 2 || int64_t(r.long_factor.size()) != dim / 2))
      throw Error(cat(file, ": longrope short_factor and long_factor have ", r.short_factor.size(),
                      " and ", r.long_factor.size(), " entries; the rotary dimension ", dim,
                      " needs ", dim / 2, " each"));
  }
  return m;
}

ModelConfig resolve_config(const ArchSpec& spec, const json& c, const std::string& file,
                           std::set<std::string>* used_keys) {
  try {
    return resolve_fields(spec, c, file, used_keys);
  } catch (const json::exception& e) {  // a field of a type no typed reader checked
    throw Error(cat(file, ": a field has the wrong type: ", e.what()));
  }
}

void check_generation_defaults(const json& d, const std::string& where) {
  if (!d.is_object()) throw Error(cat(where, ": not a JSON object"));
  const auto number = [&](const char* k, double lo, bool lo_open, double hi) {
    if (!d.contains(k)) return;
    const json& v = d[k];
    const double x = v.is_number() ? v.get<double>() : std::nan("");
    if (!(std::isfinite(x) && (lo_open ? x > lo : x >= lo) && x <= hi))
      throw Error(cat(where, ": ", k, " must be a number ", lo_open ? "above " : "of at least ", lo,
                      hi < 1e300 ? cat(" and at most ", hi) : std::string(), ", not ", v.dump()));
  };
  if (d.contains("do_sample") && !d["do_sample"].is_boolean())
    throw Error(cat(where, ": do_sample must be true or false, not ", d["do_sample"].dump()));
  number("temperature", 0.0, false, 1e308);
  number("top_p", 0.0, true, 1.0);
  number("min_p", 0.0, false, 1.0);
  number("repetition_penalty", 0.0, true, 1e308);
  if (d.contains("top_k") && !(d["top_k"].is_number_integer() && d["top_k"].get<int64_t>() >= 0 &&
                               d["top_k"].get<int64_t>() <= INT32_MAX))
    throw Error(cat(where, ": top_k must be a non-negative integer, not ", d["top_k"].dump()));
}

json apply_generation_config(ModelConfig& m, const json& g, const std::string& file) {
  if (!g.is_object()) throw Error(cat(file, ": not a JSON object"));
  if (g.contains("eos_token_id")) {
    const json& v = g["eos_token_id"];
    // Ids past the vocabulary are kept, as HF keeps them (tiny test checkpoints carry their
    // family's eos): they never come up.
    const auto id = [&](const json& e) {
      if (!e.is_number_integer() || e.get<int64_t>() < 0 || e.get<int64_t>() > INT32_MAX)
        throw Error(cat(file, ": eos_token_id ", e.dump(), " is not a token id"));
      return e.get<int64_t>();
    };
    if (v.is_number_integer()) {
      m.eos_token_ids = {id(v)};
    } else if (v.is_array()) {
      m.eos_token_ids.clear();
      for (const json& e : v) m.eos_token_ids.push_back(id(e));
    } else if (!v.is_null()) {
      throw Error(cat(file, ": eos_token_id must be an integer or a list"));
    }
  }
  if (g.contains("bos_token_id") && g["bos_token_id"].is_number_integer())
    m.bos_token_id = g["bos_token_id"].get<int64_t>();
  json d = json::object();
  for (const char* k :
       {"temperature", "top_k", "top_p", "min_p", "repetition_penalty", "do_sample"})
    if (g.contains(k) && !g[k].is_null()) d[k] = g[k];
  check_generation_defaults(d, file);
  return d;
}

}  // namespace kiln
