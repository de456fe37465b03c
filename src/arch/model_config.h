// The resolved description of one decoder model: the builder knobs an architecture table fixes,
// and the hyper-parameters read from config.json. Every architecture is expressed with these same
// fields; nothing here is specific to one model family.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace kiln {

// RMSPlusOne: Gemma's x * (1 + w). None: no norm (y = x), for blocks without an input norm
// (OLMo 2); its weight and bias are not read.
enum class NormKind { RMS, RMSPlusOne, Layer, None };
// SwiGLUOai (GPT-OSS, gated only): g = min(gate, 7), u = clamp(up, -7, 7),
// act = (u + 1) * g * sigmoid(1.702 g). transformers fixes alpha 1.702 and limit 7 in code (the
// config's swiglu_limit is not read there), and so does kiln.
enum class Activation { SiLU, GeluTanh, GeluErf, ReLU, SwiGLUOai };
enum class RopeType { None, Default, Linear, Dynamic, Llama3, Yarn, LongRope };
// MoE router scores: softmax over the experts (Mixtral, Qwen, DeepSeek V2), or a sigmoid per
// expert whose top-k is chosen on score + a correction bias (DeepSeek V3,
// layers.L.router.score_bias).
enum class Routing { None, SoftmaxTopK, SigmoidTopK };

// Builder knobs: orthogonal switches of the one shared decoder graph.
struct Knobs {
  NormKind norm = NormKind::RMS;
  bool norm_bias = false;  // LayerNorm with bias
  bool qkv_bias = false;
  bool o_bias = false;
  bool mlp_bias = false;
  bool gated_mlp = true;        // act(gate) * up, else act(up)
  bool qk_norm = false;         // per-head norm of q and k before RoPE
  bool post_attn_norm = false;  // norm of the attention output before the residual add
  bool post_ffn_norm = false;   // norm of the FFN output before the residual add
  bool embed_scale_sqrt_hidden = false;
  bool learned_positions = false;  // absolute position embeddings added to the input
  bool rope = true;                // rotary embeddings on q and k
  bool tied_embeddings_default = false;
  Routing routing = Routing::None;
  bool shared_expert = false;  // always-on expert with a sigmoid gate
  // Attention and FFN read normed inputs (attn_norm, ffn_norm). Off: both read the residual
  // stream itself and only the post norms exist (OLMo 2).
  bool pre_norm = true;
  // Attention and FFN both read the block's input and their sum is added once (GPT-J style:
  // Phi, GPT-NeoX, Cohere, Falcon); `shared_block_norm`: the FFN reads the attention's normed
  // input (no ffn_norm), else its own ffn_norm of the block input (GPT-NeoX).
  bool parallel_block = false;
  bool shared_block_norm = false;
  bool qk_norm_full = false;  // q/k norms over the whole projection, not per head (OLMo 2)
  // q/k norms per head with weights of their own, [heads, head_dim] (Cohere's use_qk_norm); off:
  // one [head_dim] weight shared by the heads. With norm_bias the q/k norms have biases too (Phi).
  bool qk_norm_per_head = false;
  bool lm_head_bias = false;  // Phi
  // RoPE rotates adjacent pairs (2i, 2i + 1) instead of (i, i + rot / 2) (Cohere). The build
  // permutes q and k rows into the half-split order, so the graph's rope is unchanged (scores
  // q.k do not depend on the order of head dimensions as long as q and k share it).
  bool rope_interleaved = false;
  // Only sliding-window layers rotate q and k; full-attention layers use no positional
  // encoding (Cohere 2).
  bool rope_sliding_only = false;
  // A learned logit per query head joins every softmax over keys and takes its share of the
  // probability mass without contributing a value (GPT-OSS's attention sinks, layers.L.sinks).
  bool attn_sinks = false;
  bool router_bias = false;         // the MoE router has a bias (layers.L.router.bias)
  bool shared_expert_gated = true;  // the shared expert's output is scaled by sigmoid(shared_gate)
  // Multi-head latent attention (DeepSeek V2 / V3): the cache holds one latent vector per token
  // (ModelConfig::kv_lora_rank + qk_rope_head_dim), queries are absorbed into it. See mla().
  bool mla = false;
};

struct RopeConfig {
  RopeType type = RopeType::Default;
  double theta = 10000.0;
  double partial_rotary_factor = 1.0;
  double factor = 1.0;
  double low_freq_factor = 1.0, high_freq_factor = 4.0;  // llama3
  int64_t original_max_position_embeddings = 0;
  double beta_fast = 32.0, beta_slow = 1.0;       // yarn
  std::optional<double> attention_factor;         // yarn / longrope
  std::optional<double> mscale, mscale_all_dim;   // yarn
  bool truncate = true;                           // yarn
  std::vector<double> short_factor, long_factor;  // longrope
};

struct LayerConfig {
  int64_t sliding_window = 0;  // 0: full attention; else attend to the last `sliding_window` keys
  int rope = 0;                // index into ModelConfig::ropes
  bool moe = false;            // routed experts instead of the dense FFN
};

struct ModelConfig {
  std::string architecture;
  Knobs knobs;
  int64_t vocab_size = 0, hidden_size = 0, num_layers = 0, num_heads = 0, num_kv_heads = 0,
          head_dim = 0, intermediate_size = 0, max_position_embeddings = 0;
  double norm_eps = 1e-6;
  Activation act = Activation::SiLU;
  bool tie_word_embeddings = false;
  std::vector<RopeConfig> ropes;
  std::vector<LayerConfig> layers;
  double attn_scale = 0;  // multiplies q.k; default 1/sqrt(head_dim)
  // Granite / Cohere scalars. embed_multiplier scales the token embeddings as they are read.
  // residual_multiplier (what each block adds to the residual stream) and logit_multiplier
  // (what the logits are multiplied by) are folded into the weights at build (wo, bo, w_down,
  // b_down; the final norm), so an engine stores the products and these record the values.
  double embed_multiplier = 1, residual_multiplier = 1, logit_multiplier = 1;
  double attn_softcap = 0;   // 0: off
  double final_softcap = 0;  // 0: off
  int64_t num_experts = 0, experts_per_token = 0, moe_intermediate_size = 0,
          shared_expert_intermediate_size = 0;
  bool norm_topk_prob = true;
  // Group-limited routing (DeepSeek): experts in moe_groups equal groups; only the experts of the
  // moe_topk_groups best groups (softmax: a group's best score; sigmoid: its two best biased
  // scores summed) are eligible. 1 / 1: plain top-k. The chosen weights are then multiplied by
  // routed_scaling (after any renormalisation).
  int64_t moe_groups = 1, moe_topk_groups = 1;
  double routed_scaling = 1.0;
  // MLA sizes (Knobs::mla). Under MLA, num_kv_heads is 1 and head_dim is the latent head
  // kv_lora_rank + qk_rope_head_dim: the attention op runs as MQA over the latent cache, whose
  // rows are [rotated k_pe (qk_rope_head_dim) | normed latent (kv_lora_rank)]. q_lora_rank 0: no
  // query LoRA (DeepSeek V2-Lite).
  int64_t q_lora_rank = 0, kv_lora_rank = 0, qk_nope_head_dim = 0, qk_rope_head_dim = 0,
          v_head_dim = 0;
  // Layers a checkpoint stores past num_layers that the forward does not run (DeepSeek V3's
  // multi-token-prediction modules): the build skips their tensors. Build time only.
  int64_t unused_layers = 0;
  std::optional<int64_t> bos_token_id;
  std::vector<int64_t> eos_token_ids;

  int64_t q_dim() const { return num_heads * head_dim; }
  int64_t kv_dim() const { return num_kv_heads * head_dim; }
  int64_t rotary_dim(int rope) const {
    if (knobs.mla) return qk_rope_head_dim;
    return int64_t(double(head_dim) * ropes[size_t(rope)].partial_rotary_factor) / 2 * 2;
  }
  // MLA: the query projection's width per head, and the attention output's per head.
  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
};

nlohmann::json to_json(const ModelConfig& c);
ModelConfig model_config_from_json(const nlohmann::json& j);

}  // namespace kiln
