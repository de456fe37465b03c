#include "graph/layout.h"

#include "core/error.h"

namespace kiln {

namespace {

using Axis = TpSplit::Axis;
TpSplit rows(std::vector<TpSplit::Part> parts) {
  return {Axis::Rows, std::move(parts)};
}
TpSplit cols(std::vector<TpSplit::Part> parts) {
  return {Axis::Cols, std::move(parts)};
}
TpSplit vocab(int64_t V) {
  return {Axis::Rows, {{V, 1}}, true};
}
const TpSplit kRank0{Axis::None, {}, false, true};

// FFN sub-block tensors with inner size I under `prefix` (dense MLP, one expert, shared expert).
// `expert`: the matrices belong to a routed expert (gathered by the MoE op).
void ffn_specs(const ModelConfig& c, const std::string& p, int64_t I, bool expert,
               std::vector<WeightSpec>& r) {
  const int64_t H = c.hidden_size;
  const bool g = c.knobs.gated_mlp;
  const WeightRole col = expert ? WeightRole::Expert : WeightRole::ColumnLinear;
  const WeightRole row = expert ? WeightRole::Expert : WeightRole::RowLinear;
  // Tensor parallel: each rank takes a slice of the inner features (of gate and of up).
  const TpSplit inner = g ? rows({{I, 1}, {I, 1}}) : rows({{I, 1}});
  r.push_back({p + (g ? "w_gate_up" : "w_up"), {g ? 2 * I : I, H}, col, {}, inner});
  if (c.knobs.mlp_bias)
    r.push_back({p + (g ? "b_gate_up" : "b_up"), {g ? 2 * I : I}, WeightRole::Vector, {}, inner});
  r.push_back({p + "w_down", {H, I}, row, {}, cols({{I, 1}})});
  if (c.knobs.mlp_bias) r.push_back({p + "b_down", {H}, WeightRole::Vector, {}, kRank0});
}

void norm_specs(const ModelConfig& c, const std::string& name, std::vector<WeightSpec>& r) {
  r.push_back({name, {c.hidden_size}, WeightRole::Vector});
  if (c.knobs.norm_bias) r.push_back({name + ".bias", {c.hidden_size}, WeightRole::Vector});
}

}  // namespace

bool has_ffn_norm(const ModelConfig& c) {
  return c.knobs.pre_norm && !(c.knobs.parallel_block && c.knobs.shared_block_norm);
}

bool quantizes(const QuantScheme& s, WeightRole r) {
  return s.q != WeightQuant::None && (r == WeightRole::ColumnLinear || r == WeightRole::RowLinear ||
                                      (s.lm_head && r == WeightRole::LmHead));
}

namespace {

std::vector<WeightSpec> plain_layout(const ModelConfig& c) {
  const int64_t H = c.hidden_size, V = c.vocab_size, hd = c.head_dim;
  const int64_t qkv = c.q_dim() + 2 * c.kv_dim();
  std::vector<WeightSpec> r;
  using R = WeightRole;
  r.push_back({"embed", {V, H}, R::Embedding, {}, vocab(V)});
  if (c.knobs.learned_positions)
    r.push_back({"pos_embed", {c.max_position_embeddings, H}, R::Embedding});
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    if (c.knobs.pre_norm) norm_specs(c, p + "attn_norm", r);
    if (c.knobs.mla) {
      // Knobs::mla; the decoder's build_attn_mla says how each is used.
      const int64_t QK = c.qk_head_dim(), D = c.head_dim, heads = c.num_heads;
      if (c.q_lora_rank > 0) {
        r.push_back({p + "wq_a", {c.q_lora_rank, H}, R::ColumnLinear});
        if (c.knobs.qkv_bias) r.push_back({p + "bq_a", {c.q_lora_rank}, R::Vector});
        r.push_back({p + "q_a_norm", {c.q_lora_rank}, R::Vector});
      }
      // Tensor parallel: heads split; the q and kv latents (one KV head) are replicated.
      const int64_t Vh = c.v_head_dim;
      r.push_back({p + "wq_b",
                   {heads * QK, c.q_lora_rank > 0 ? c.q_lora_rank : H},
                   R::ColumnLinear,
                   {},
                   rows({{heads, QK}})});
      r.push_back({p + "w_q_absorb", {heads * D, QK}, R::HeadLinear, {}, rows({{heads, D}})});
      r.push_back({p + "wkv_a", {D, H}, R::ColumnLinear});
      if (c.knobs.qkv_bias) r.push_back({p + "bkv_a", {D}, R::Vector});
      r.push_back({p + "kv_a_norm", {c.kv_lora_rank}, R::Vector});
      r.push_back({p + "w_o_absorb", {heads * Vh, D}, R::HeadLinear, {}, rows({{heads, Vh}})});
      r.push_back({p + "wo", {H, heads * Vh}, R::RowLinear, {}, cols({{heads, Vh}})});
      if (c.knobs.o_bias) r.push_back({p + "bo", {H}, R::Vector, {}, kRank0});
    } else {
      // Tensor parallel: query heads split, KV heads split or replicated.
      const int64_t nh = c.num_heads, kv = c.num_kv_heads;
      const TpSplit heads = rows({{nh, hd}, {kv, hd}, {kv, hd}});
      r.push_back({p + "wqkv", {qkv, H}, R::ColumnLinear, {}, heads});
      if (c.knobs.qkv_bias) r.push_back({p + "bqkv", {qkv}, R::Vector, {}, heads});
      if (c.knobs.qk_norm) {
        const bool wide = c.knobs.qk_norm_full || c.knobs.qk_norm_per_head;
        // Norms over the whole projection (qk_norm_full) stay whole: the decoder gathers q, k.
        const bool per_head = c.knobs.qk_norm_per_head;
        for (const char* b : {"", ".bias"}) {
          if (*b && !c.knobs.norm_bias) continue;
          r.push_back({p + "q_norm" + b,
                       {wide ? c.q_dim() : hd},
                       R::Vector,
                       {},
                       per_head ? rows({{nh, hd}}) : TpSplit{}});
          r.push_back({p + "k_norm" + b,
                       {wide ? c.kv_dim() : hd},
                       R::Vector,
                       {},
                       per_head ? rows({{kv, hd}}) : TpSplit{}});
        }
      }
      if (c.knobs.attn_sinks) r.push_back({p + "sinks", {nh}, R::Vector, {}, rows({{nh, 1}})});
      r.push_back({p + "wo", {H, c.q_dim()}, R::RowLinear, {}, cols({{nh, hd}})});
      if (c.knobs.o_bias) r.push_back({p + "bo", {H}, R::Vector, {}, kRank0});
    }
    if (c.knobs.post_attn_norm) norm_specs(c, p + "post_attn_norm", r);
    if (has_ffn_norm(c)) norm_specs(c, p + "ffn_norm", r);
    if (!c.layers[size_t(l)].moe) {
      ffn_specs(c, p, c.intermediate_size, false, r);
    } else {
      r.push_back({p + "router", {c.num_experts, H}, R::Gate});
      if (c.knobs.router_bias) r.push_back({p + "router.bias", {c.num_experts}, R::Vector});
      if (c.knobs.routing == Routing::SigmoidTopK)
        r.push_back({p + "router.score_bias", {c.num_experts}, R::Vector});
      for (int64_t e = 0; e < c.num_experts; ++e)
        ffn_specs(c, p + "experts." + std::to_string(e) + ".", c.moe_intermediate_size, true, r);
      if (c.knobs.shared_expert) {
        // The shared expert runs through linear() like a dense FFN.
        ffn_specs(c, p + "shared.", c.shared_expert_intermediate_size, false, r);
        if (c.knobs.shared_expert_gated) r.push_back({p + "shared_gate", {1, H}, R::Gate});
      }
    }
    if (c.knobs.post_ffn_norm) norm_specs(c, p + "post_ffn_norm", r);
  }
  norm_specs(c, "final_norm", r);
  if (!c.tie_word_embeddings) r.push_back({"lm_head", {V, H}, R::LmHead, {}, vocab(V)});
  if (c.knobs.lm_head_bias) r.push_back({"lm_head.bias", {V}, R::Vector, {}, vocab(V)});
  return r;
}

}  // namespace

std::vector<WeightSpec> engine_layout(const ModelConfig& c, const QuantScheme& qs) {
  const WeightQuant q = qs.q;
  const int64_t group = qs.group;
  KILN_CHECK(!qs.act_order || q == WeightQuant::Int4, "act-order input order is for int4-wo only");
  KILN_CHECK(!qs.lm_head || q != WeightQuant::None,
             "--quant-lm-head quantizes the LM head with the linears' scheme: give --quant");
  KILN_CHECK(!qs.lm_head || !c.tie_word_embeddings, "--quant-lm-head: ", c.architecture,
             " ties its LM head to the token embeddings (tie_word_embeddings), which kiln keeps "
             "in the engine dtype");
  std::vector<WeightSpec> r;
  for (WeightSpec& s : plain_layout(c)) {
    if (!quantizes(qs, s.role)) {
      r.push_back(s);
      continue;
    }
    s.quant = q;
    const int64_t rows = s.shape[0], cols = s.shape[1];
    // FP8 tensor-core products take inputs in multiples of 16 (16-byte rows).
    KILN_CHECK(q != WeightQuant::Fp8 || cols % 16 == 0, "--quant fp8: ", s.name, " has ", cols,
               " input features, not a multiple of 16");
    // Scale and zero slots split with their weight's rows; by input features only where they
    // have groups (int4), a per-channel scale staying whole.
    const TpSplit by_rows = s.split.axis == TpSplit::Axis::Rows ? s.split : TpSplit{};
    if (q == WeightQuant::Int8 || q == WeightQuant::Fp8) {  // one scale per output channel
      r.push_back(s);
      r.push_back({s.name + ".scale", {rows}, WeightRole::Scale, {}, by_rows});
      continue;
    }
    const int64_t g = group > 0 ? group : int4_group(cols);
    KILN_CHECK(g > 0 && g % 32 == 0 && cols % g == 0, "--quant ", weight_quant_name(q), ": ",
               s.name, " has ", cols, " input features, not a multiple of ", group > 0 ? group : 32,
               group > 0 ? " (the checkpoint's group size)" : " (the smallest int4 group)");
    s.shape = {rows, cols / 2};
    r.push_back(s);
    r.push_back({s.name + ".scale", {rows, cols / g}, WeightRole::Scale, {}, s.split});
    r.push_back({s.name + ".zero", {rows, cols / g}, WeightRole::Zero, {}, s.split});
    if (qs.act_order) r.push_back({s.name + ".perm", {cols}, WeightRole::Perm});
  }
  return r;
}

Shape source_shape(const ModelConfig& c, const std::string& name) {
  const int64_t H = c.hidden_size, hd = c.head_dim;
  // Split "layers.L.[experts.E.|shared.]base".
  std::string base = name;
  int64_t I = c.intermediate_size;
  bool in_layer = false;
  if (base.rfind("layers.", 0) == 0) {
    in_layer = true;
    base = base.substr(base.find('.', 7) + 1);
    if (base.rfind("experts.", 0) == 0) {
      base = base.substr(base.find('.', 8) + 1);
      I = c.moe_intermediate_size;
    } else if (base.rfind("shared.", 0) == 0) {
      base = base.substr(7);
      I = c.shared_expert_intermediate_size;
    }
  }
  const int64_t qd = c.q_dim(), kvd = c.kv_dim();
  if (!in_layer) {
    if (base == "embed" || base == "lm_head") return {c.vocab_size, H};
    if (base == "lm_head.bias") return {c.vocab_size};
    if (base == "pos_embed") return {c.max_position_embeddings, H};
    if (base == "final_norm" || base == "final_norm.bias") return {H};
    return {};
  }
  if (base == "wq") return {qd, H};
  if (base == "wk" || base == "wv") return {kvd, H};
  if (base == "wqkv") return {qd + 2 * kvd, H};
  if (base == "bq") return {qd};
  if (base == "bk" || base == "bv") return {kvd};
  if (base == "bqkv") return {qd + 2 * kvd};
  if (base == "wo") return {H, c.knobs.mla ? c.num_heads * c.v_head_dim : qd};
  if (c.knobs.mla) {  // Knobs::mla's sources (HF layouts: wkv_a is [latent | k_rope])
    const int64_t ql = c.q_lora_rank;
    if (base == "wq_a" && ql > 0) return {ql, H};
    if ((base == "bq_a" || base == "q_a_norm") && ql > 0) return {ql};
    if (base == "wq_b") return {c.num_heads * c.qk_head_dim(), ql > 0 ? ql : H};
    if (base == "wkv_a") return {hd, H};
    if (base == "bkv_a") return {hd};
    if (base == "kv_a_norm") return {c.kv_lora_rank};
    if (base == "wkv_b") return {c.num_heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank};
  }
  if (base == "bo" || base == "b_down") return {H};
  // Per-head q/k norm weights are [heads, head_dim] in checkpoints; the build reads them flat.
  const bool wide = c.knobs.qk_norm_full || c.knobs.qk_norm_per_head;
  if (base == "q_norm" || base == "q_norm.bias") return {wide ? qd : hd};
  if (base == "k_norm" || base == "k_norm.bias") return {wide ? kvd : hd};
  if (base.find("norm") != std::string::npos) return {H};
  if (base == "w_gate" || base == "w_up") return {I, H};
  if (base == "b_gate" || base == "b_up") return {I};
  if (base == "w_gate_up") return {2 * I, H};
  if (base == "b_gate_up") return {2 * I};
  if (base == "w_down") return {H, I};
  if (base == "router") return {c.num_experts, H};
  if (base == "router.bias" || base == "router.score_bias") return {c.num_experts};
  if (base == "sinks") return {c.num_heads};
  if (base == "shared_gate") return {1, H};
  return {};
}

}  // namespace kiln
