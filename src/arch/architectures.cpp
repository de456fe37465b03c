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

const std::vector<std::string> kLlamaIgnored = {"model.layers.{layer}.self_attn.rotary_emb.inv_freq"};

std::vector<ArchSpec> make_registry() {
  std::vector<ArchSpec> r;
  {
    ArchSpec a;
    a.name = "LlamaForCausalLM";
    a.tensors = llama_tensors();
    a.ignored = kLlamaIgnored;
    a.knob_keys = {{"qkv_bias", "attention_bias"}, {"o_bias", "attention_bias"},
                   {"mlp_bias", "mlp_bias"}};
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
