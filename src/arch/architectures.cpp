// The architecture tables. Keep entries declarative: names, knobs and key spellings only.
#include <algorithm>

#include "arch/registry.h"
#include "core/error.h"

namespace kiln {

namespace {

// The tensor names shared by Llama-style checkpoints ("model.layers.N.self_attn.q_proj" ...).
std::vector<TensorRule> llama_tensors() {
  const std::string L = "model.layers.{layer}.";
  const std::string C = "layers.{layer}.";
  return {
      {"model.embed_tokens.weight", "embed"},
      {"model.norm.weight", "final_norm"},
      {"lm_head.weight", "lm_head"},
      {L + "input_layernorm.weight", C + "attn_norm"},
      {L + "self_attn.q_proj.weight", C + "wq"},
      {L + "self_attn.k_proj.weight", C + "wk"},
      {L + "self_attn.v_proj.weight", C + "wv"},
      {L + "self_attn.q_proj.bias", C + "bq"},
      {L + "self_attn.k_proj.bias", C + "bk"},
      {L + "self_attn.v_proj.bias", C + "bv"},
      {L + "self_attn.o_proj.weight", C + "wo"},
      {L + "self_attn.o_proj.bias", C + "bo"},
      {L + "self_attn.q_norm.weight", C + "q_norm"},
      {L + "self_attn.k_norm.weight", C + "k_norm"},
      {L + "post_attention_layernorm.weight", C + "ffn_norm"},
      {L + "mlp.gate_proj.weight", C + "w_gate"},
      {L + "mlp.up_proj.weight", C + "w_up"},
      {L + "mlp.down_proj.weight", C + "w_down"},
      {L + "mlp.up_proj.bias", C + "b_up"},
      {L + "mlp.gate_proj.bias", C + "b_gate"},
      {L + "mlp.down_proj.bias", C + "b_down"},
  };
}

// Replaces (or adds) the rules for the given HF names.
std::vector<TensorRule> with(std::vector<TensorRule> rules, const std::vector<TensorRule>& over) {
  for (const auto& o : over) {
    auto it =
        std::find_if(rules.begin(), rules.end(), [&](const TensorRule& r) { return r.hf == o.hf; });
    if (it != rules.end())
      *it = o;
    else
      rules.push_back(o);
  }
  return rules;
}

// Gemma 2/3 sandwich norms: HF's post_attention_layernorm is a real post-attention norm there.
std::vector<TensorRule> gemma2_tensors() {
  const std::string L = "model.layers.{layer}.";
  const std::string C = "layers.{layer}.";
  return with(llama_tensors(), {{L + "post_attention_layernorm.weight", C + "post_attn_norm"},
                                {L + "pre_feedforward_layernorm.weight", C + "ffn_norm"},
                                {L + "post_feedforward_layernorm.weight", C + "post_ffn_norm"}});
}

// MoE experts under `block` ("block_sparse_moe" / "mlp") with the given projection names.
std::vector<TensorRule> moe_tensors(const std::string& block, const std::string& router,
                                    const std::string& gate, const std::string& up,
                                    const std::string& down) {
  const std::string L = "model.layers.{layer}." + block + ".";
  const std::string C = "layers.{layer}.";
  return {{L + router + ".weight", C + "router"},
          {L + "experts.{expert}." + gate + ".weight", C + "experts.{expert}.w_gate"},
          {L + "experts.{expert}." + up + ".weight", C + "experts.{expert}.w_up"},
          {L + "experts.{expert}." + down + ".weight", C + "experts.{expert}.w_down"}};
}

// GPT-2 (with and without the "transformer." prefix of older checkpoints); Conv1D weights are
// stored [in, out].
std::vector<TensorRule> gpt2_tensors() {
  std::vector<TensorRule> r;
  for (const std::string P : {"transformer.", ""}) {
    const std::string L = P + "h.{layer}.";
    const std::string C = "layers.{layer}.";
    std::vector<TensorRule> t = {
        {P + "wte.weight", "embed"},
        {P + "wpe.weight", "pos_embed"},
        {P + "ln_f.weight", "final_norm"},
        {P + "ln_f.bias", "final_norm.bias"},
        {L + "ln_1.weight", C + "attn_norm"},
        {L + "ln_1.bias", C + "attn_norm.bias"},
        {L + "attn.c_attn.weight", C + "wqkv", true},
        {L + "attn.c_attn.bias", C + "bqkv"},
        {L + "attn.c_proj.weight", C + "wo", true},
        {L + "attn.c_proj.bias", C + "bo"},
        {L + "ln_2.weight", C + "ffn_norm"},
        {L + "ln_2.bias", C + "ffn_norm.bias"},
        {L + "mlp.c_fc.weight", C + "w_up", true},
        {L + "mlp.c_fc.bias", C + "b_up"},
        {L + "mlp.c_proj.weight", C + "w_down", true},
        {L + "mlp.c_proj.bias", C + "b_down"},
    };
    r.insert(r.end(), t.begin(), t.end());
  }
  r.push_back({"lm_head.weight", "lm_head"});
  return r;
}

const std::vector<std::string> kLlamaIgnored = {
    "model.layers.{layer}.self_attn.rotary_emb.inv_freq"};

std::vector<ArchSpec> make_registry() {
  std::vector<ArchSpec> r;
  {
    ArchSpec a;
    a.name = "LlamaForCausalLM";
    a.tensors = llama_tensors();
    a.ignored = kLlamaIgnored;
    a.knob_keys = {
        {"qkv_bias", "attention_bias"}, {"o_bias", "attention_bias"}, {"mlp_bias", "mlp_bias"}};
    r.push_back(a);
  }
  {
    ArchSpec a;
    a.name = "MistralForCausalLM";
    a.tensors = llama_tensors();
    a.ignored = kLlamaIgnored;
    r.push_back(a);
  }
  {
    ArchSpec a;
    a.name = "Qwen2ForCausalLM";
    a.tensors = llama_tensors();
    a.ignored = kLlamaIgnored;
    a.knobs.qkv_bias = true;
    r.push_back(a);
  }
  {
    ArchSpec a;
    a.name = "Qwen3ForCausalLM";
    a.tensors = llama_tensors();
    a.ignored = kLlamaIgnored;
    a.knobs.qk_norm = true;
    a.knob_keys = {{"qkv_bias", "attention_bias"}, {"o_bias", "attention_bias"}};
    r.push_back(a);
  }
  ArchSpec gemma;
  gemma.tensors = llama_tensors();
  gemma.ignored = kLlamaIgnored;
  gemma.knobs.norm = NormKind::RMSPlusOne;
  gemma.knobs.embed_scale_sqrt_hidden = true;
  gemma.knobs.tied_embeddings_default = true;
  gemma.keys = {{"act", {"hidden_activation"}}};  // Gemma ignores hidden_act
  gemma.default_act = "gelu_pytorch_tanh";
  gemma.knob_keys = {{"qkv_bias", "attention_bias"}, {"o_bias", "attention_bias"}};
  {
    ArchSpec a = gemma;
    a.name = "GemmaForCausalLM";
    r.push_back(a);
  }
  {
    ArchSpec a = gemma;
    a.name = "Gemma2ForCausalLM";
    a.tensors = gemma2_tensors();
    a.knobs.post_attn_norm = a.knobs.post_ffn_norm = true;
    a.sliding_period = 2;
    r.push_back(a);
  }
  {
    ArchSpec a = gemma;
    a.name = "Gemma3ForCausalLM";
    a.tensors = gemma2_tensors();
    a.knobs.post_attn_norm = a.knobs.post_ffn_norm = a.knobs.qk_norm = true;
    a.sliding_period = 6;
    r.push_back(a);
  }
  {
    ArchSpec a;
    a.name = "Phi3ForCausalLM";
    const std::string L = "model.layers.{layer}.", C = "layers.{layer}.";
    a.tensors = with(llama_tensors(), {{L + "self_attn.qkv_proj.weight", C + "wqkv"},
                                       {L + "mlp.gate_up_proj.weight", C + "w_gate_up"}});
    a.ignored = kLlamaIgnored;
    r.push_back(a);
  }
  {
    ArchSpec a;
    a.name = "GPT2LMHeadModel";
    a.tensors = gpt2_tensors();
    a.ignored = {"transformer.h.{layer}.attn.bias", "transformer.h.{layer}.attn.masked_bias",
                 "h.{layer}.attn.bias", "h.{layer}.attn.masked_bias"};
    a.knobs.norm = NormKind::Layer;
    a.knobs.norm_bias = a.knobs.qkv_bias = a.knobs.o_bias = a.knobs.mlp_bias = true;
    a.knobs.gated_mlp = false;
    a.knobs.learned_positions = true;
    a.knobs.rope = false;
    a.knobs.tied_embeddings_default = true;
    a.keys = {{"hidden_size", {"n_embd"}},        {"num_layers", {"n_layer"}},
              {"num_heads", {"n_head"}},          {"max_position_embeddings", {"n_positions"}},
              {"intermediate_size", {"n_inner"}}, {"norm_eps", {"layer_norm_epsilon"}},
              {"act", {"activation_function"}}};
    a.default_act = "gelu_new";
    a.intermediate_mult = 4;
    r.push_back(a);
  }
  {
    ArchSpec a;
    a.name = "MixtralForCausalLM";
    a.tensors = llama_tensors();
    auto moe = moe_tensors("block_sparse_moe", "gate", "w1", "w3", "w2");
    a.tensors.insert(a.tensors.end(), moe.begin(), moe.end());
    a.ignored = kLlamaIgnored;
    a.knobs.routing = Routing::SoftmaxTopK;
    a.keys = {{"num_experts", {"num_local_experts"}},
              {"moe_intermediate_size", {"intermediate_size"}}};
    r.push_back(a);
  }
  {
    ArchSpec a;
    a.name = "Qwen2MoeForCausalLM";
    const std::string L = "model.layers.{layer}.mlp.", C = "layers.{layer}.";
    a.tensors = llama_tensors();
    auto moe = moe_tensors("mlp", "gate", "gate_proj", "up_proj", "down_proj");
    a.tensors.insert(a.tensors.end(), moe.begin(), moe.end());
    a.tensors = with(a.tensors, {{L + "shared_expert.gate_proj.weight", C + "shared.w_gate"},
                                 {L + "shared_expert.up_proj.weight", C + "shared.w_up"},
                                 {L + "shared_expert.down_proj.weight", C + "shared.w_down"},
                                 {L + "shared_expert_gate.weight", C + "shared_gate"}});
    a.ignored = kLlamaIgnored;
    a.knobs.qkv_bias = true;
    a.knob_keys = {{"qkv_bias", "qkv_bias"}};
    a.knobs.routing = Routing::SoftmaxTopK;
    a.knobs.shared_expert = true;
    a.norm_topk_default = false;
    r.push_back(a);
  }
  {
    ArchSpec a;
    a.name = "Qwen3MoeForCausalLM";
    a.tensors = llama_tensors();
    auto moe = moe_tensors("mlp", "gate", "gate_proj", "up_proj", "down_proj");
    a.tensors.insert(a.tensors.end(), moe.begin(), moe.end());
    a.ignored = kLlamaIgnored;
    a.knobs.qk_norm = true;
    a.knob_keys = {{"qkv_bias", "attention_bias"}, {"o_bias", "attention_bias"}};
    a.knobs.routing = Routing::SoftmaxTopK;
    r.push_back(a);
  }
  {
    ArchSpec a;
    a.name = "Starcoder2ForCausalLM";
    const std::string L = "model.layers.{layer}.", C = "layers.{layer}.";
    a.tensors = with(llama_tensors(), {{L + "mlp.c_fc.weight", C + "w_up"},
                                       {L + "mlp.c_fc.bias", C + "b_up"},
                                       {L + "mlp.c_proj.weight", C + "w_down"},
                                       {L + "mlp.c_proj.bias", C + "b_down"},
                                       {L + "input_layernorm.bias", C + "attn_norm.bias"},
                                       {L + "post_attention_layernorm.bias", C + "ffn_norm.bias"},
                                       {"model.norm.bias", "final_norm.bias"}});
    a.ignored = kLlamaIgnored;
    a.knobs.norm = NormKind::Layer;
    a.knobs.norm_bias = a.knobs.qkv_bias = a.knobs.o_bias = a.knobs.mlp_bias = true;
    a.knob_keys = {{"qkv_bias", "use_bias"}, {"o_bias", "use_bias"}, {"mlp_bias", "use_bias"}};
    a.knobs.gated_mlp = false;
    a.knobs.tied_embeddings_default = true;
    a.keys = {{"norm_eps", {"norm_epsilon"}}};
    a.default_act = "gelu_pytorch_tanh";
    r.push_back(a);
  }
  {
    // Llama with four scalars (config keys below).
    ArchSpec a;
    a.name = "GraniteForCausalLM";
    a.tensors = llama_tensors();
    a.ignored = kLlamaIgnored;
    a.knob_keys = {
        {"qkv_bias", "attention_bias"}, {"o_bias", "attention_bias"}, {"mlp_bias", "mlp_bias"}};
    a.keys = {{"embed_multiplier", {"embedding_multiplier"}},
              {"residual_multiplier", {"residual_multiplier"}},
              {"attn_multiplier", {"attention_multiplier"}},
              {"logit_divisor", {"logits_scaling"}}};
    r.push_back(a);
  }
  {
    ArchSpec a;
    a.name = "PhiForCausalLM";
    const std::string L = "model.layers.{layer}.", C = "layers.{layer}.";
    a.tensors = with(llama_tensors(), {{L + "input_layernorm.bias", C + "attn_norm.bias"},
                                       {L + "self_attn.dense.weight", C + "wo"},
                                       {L + "self_attn.dense.bias", C + "bo"},
                                       {L + "self_attn.q_layernorm.weight", C + "q_norm"},
                                       {L + "self_attn.q_layernorm.bias", C + "q_norm.bias"},
                                       {L + "self_attn.k_layernorm.weight", C + "k_norm"},
                                       {L + "self_attn.k_layernorm.bias", C + "k_norm.bias"},
                                       {L + "mlp.fc1.weight", C + "w_up"},
                                       {L + "mlp.fc1.bias", C + "b_up"},
                                       {L + "mlp.fc2.weight", C + "w_down"},
                                       {L + "mlp.fc2.bias", C + "b_down"},
                                       {"model.final_layernorm.weight", "final_norm"},
                                       {"model.final_layernorm.bias", "final_norm.bias"},
                                       {"lm_head.bias", "lm_head.bias"}});
    a.ignored = kLlamaIgnored;
    a.knobs.norm = NormKind::Layer;
    a.knobs.norm_bias = a.knobs.qkv_bias = a.knobs.o_bias = a.knobs.mlp_bias = true;
    a.knobs.gated_mlp = false;
    a.knobs.parallel_block = a.knobs.shared_block_norm = true;
    a.knobs.lm_head_bias = true;
    a.knob_keys = {{"qk_norm", "qk_layernorm"}};
    a.default_act = "gelu_new";
    r.push_back(a);
  }
  {
    ArchSpec a;
    a.name = "GPTNeoXForCausalLM";
    const std::string L = "gpt_neox.layers.{layer}.", C = "layers.{layer}.";
    a.tensors = {{"gpt_neox.embed_in.weight", "embed"},
                 {"gpt_neox.final_layer_norm.weight", "final_norm"},
                 {"gpt_neox.final_layer_norm.bias", "final_norm.bias"},
                 {"embed_out.weight", "lm_head"},
                 {L + "input_layernorm.weight", C + "attn_norm"},
                 {L + "input_layernorm.bias", C + "attn_norm.bias"},
                 {L + "attention.query_key_value.weight", C + "wqkv", false, true},
                 {L + "attention.query_key_value.bias", C + "bqkv", false, true},
                 {L + "attention.dense.weight", C + "wo"},
                 {L + "attention.dense.bias", C + "bo"},
                 {L + "post_attention_layernorm.weight", C + "ffn_norm"},
                 {L + "post_attention_layernorm.bias", C + "ffn_norm.bias"},
                 {L + "mlp.dense_h_to_4h.weight", C + "w_up"},
                 {L + "mlp.dense_h_to_4h.bias", C + "b_up"},
                 {L + "mlp.dense_4h_to_h.weight", C + "w_down"},
                 {L + "mlp.dense_4h_to_h.bias", C + "b_down"}};
    a.ignored = {"gpt_neox.layers.{layer}.attention.rotary_emb.inv_freq",
                 "gpt_neox.layers.{layer}.attention.bias",
                 "gpt_neox.layers.{layer}.attention.masked_bias"};
    a.knobs.norm = NormKind::Layer;
    a.knobs.norm_bias = a.knobs.qkv_bias = a.knobs.o_bias = a.knobs.mlp_bias = true;
    a.knob_keys = {{"qkv_bias", "attention_bias"},
                   {"o_bias", "attention_bias"},
                   {"parallel_block", "use_parallel_residual"}};
    a.knobs.gated_mlp = false;
    a.knobs.parallel_block = true;
    a.keys = {{"norm_eps", {"layer_norm_eps"}}};
    a.default_act = "gelu";
    r.push_back(a);
  }
  {
    ArchSpec a;
    a.name = "CohereForCausalLM";
    const std::string L = "model.layers.{layer}.", C = "layers.{layer}.";
    a.tensors = with(llama_tensors(), {{L + "self_attn.q_norm.weight", C + "q_norm"},
                                       {L + "self_attn.k_norm.weight", C + "k_norm"}});
    a.ignored = kLlamaIgnored;
    a.knobs.norm = NormKind::Layer;  // mean-centred, weight only
    a.knobs.parallel_block = a.knobs.shared_block_norm = true;
    a.knobs.rope_interleaved = true;
    a.knobs.tied_embeddings_default = true;
    a.knob_keys = {
        {"qkv_bias", "attention_bias"}, {"o_bias", "attention_bias"}, {"qk_norm", "use_qk_norm"}};
    a.keys = {{"logit_multiplier", {"logit_scale"}}};
    r.push_back(a);
  }
  {
    ArchSpec a;
    a.name = "Olmo2ForCausalLM";
    a.tensors = gemma2_tensors();  // post_attention_layernorm is a post norm here too
    a.ignored = kLlamaIgnored;
    a.knobs.pre_norm = false;
    a.knobs.post_attn_norm = a.knobs.post_ffn_norm = true;
    a.knobs.qk_norm = a.knobs.qk_norm_full = true;
    a.knob_keys = {{"qkv_bias", "attention_bias"}, {"o_bias", "attention_bias"}};
    r.push_back(a);
  }
  return r;
}

const std::vector<ArchSpec>& registry() {
  static const std::vector<ArchSpec> r = make_registry();
  return r;
}

}  // namespace

std::vector<std::string> supported_architectures() {
  std::vector<std::string> r;
  for (const auto& a : registry()) r.push_back(a.name);
  return r;
}

const ArchSpec& find_arch(const std::string& name) {
  for (const auto& a : registry())
    if (a.name == name) return a;
  std::string list;
  for (const auto& n : supported_architectures()) list += (list.empty() ? "" : ", ") + n;
  throw Error(cat("unsupported architecture '", name, "' (supported: ", list, ")"));
}

}  // namespace kiln
