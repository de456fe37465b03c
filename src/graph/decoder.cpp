#include "graph/decoder.h"

#include <cmath>

#include "core/error.h"
#include "graph/rope.h"

namespace kiln {

DeviceWeights::DeviceWeights(Backend& be, const std::vector<std::pair<std::string, Tensor>>& host) {
  for (const auto& [name, t] : host) t_[name] = be.upload(t);
}

const Tensor& DeviceWeights::at(const std::string& name) const {
  auto it = t_.find(name);
  if (it == t_.end()) throw Error(cat("engine has no weight '", name, "'"));
  return it->second;
}

const Tensor* DeviceWeights::find(const std::string& name) const {
  auto it = t_.find(name);
  return it == t_.end() ? nullptr : &it->second;
}

Decoder::Decoder(Backend& be, const ModelConfig& c, const DeviceWeights& w)
    : be_(be), c_(c), w_(w) {}

Decoder::~Decoder() {
  for (auto& [n, b] : bufs_) be_.release(b.first);
}

void* Decoder::buf(const std::string& name, size_t bytes) {
  auto& b = bufs_[name];
  if (b.second < bytes) {
    if (b.first) be_.release(b.first);
    b.first = be_.alloc(bytes);
    b.second = bytes;
  }
  return b.first;
}

void* Decoder::at(void* p, int64_t elems) const {
  return static_cast<char*>(p) + size_t(elems) * dtype_size(be_.act_dtype());
}

void Decoder::build_norm(const std::string& name, const void* x, int64_t n, void* y) {
  be_.norm(x, n, c_.hidden_size, c_.hidden_size, w_.at(name), w_.find(name + ".bias"),
           c_.knobs.norm, float(c_.norm_eps), y, c_.hidden_size);
}

void Decoder::build_attn(int64_t l, int64_t n, KVCache& cache) {
  const std::string p = "layers." + std::to_string(l) + ".";
  const int64_t qd = c_.q_dim(), kvd = c_.kv_dim(), ld = qd + 2 * kvd, hd = c_.head_dim;
  const size_t a = dtype_size(be_.act_dtype());
  void* h = bufs_["h"].first;
  void* qkv = buf("qkv", size_t(n * ld) * a);
  be_.linear(h, n, c_.hidden_size, w_.at(p + "wqkv"), w_.find(p + "bqkv"), qkv, ld);
  void* k = at(qkv, qd);
  void* v = at(qkv, qd + kvd);
  if (c_.knobs.qk_norm) {
    be_.head_norm(qkv, n, ld, c_.num_heads, hd, w_.at(p + "q_norm"), c_.knobs.norm, float(c_.norm_eps));
    be_.head_norm(k, n, ld, c_.num_kv_heads, hd, w_.at(p + "k_norm"), c_.knobs.norm, float(c_.norm_eps));
  }
  const LayerConfig& lc = c_.layers[size_t(l)];
  const int r = lc.rope;
  if (c_.ropes[size_t(r)].type != RopeType::None) {
    const int64_t rot = c_.rotary_dim(r);
    be_.rope(qkv, n, ld, c_.num_heads, hd, rot, d_cos_[size_t(r)], d_sin_[size_t(r)]);
    be_.rope(k, n, ld, c_.num_kv_heads, hd, rot, d_cos_[size_t(r)], d_sin_[size_t(r)]);
  }
  KVLayerView kv{cache.k_pool(l), cache.v_pool(l), d_blocks_, cache.block_size(), kvd, kv_len_};
  be_.kv_write(kv, k, v, ld, d_pos_, n);
  void* att = buf("att", size_t(n * qd) * a);
  AttnParams ap{c_.num_heads, c_.num_kv_heads, hd, float(c_.attn_scale), float(c_.attn_softcap),
                lc.sliding_window};
  be_.attention(qkv, ld, n, d_pos_, kv, ap, att, qd);
  void* o = buf("o", size_t(n * c_.hidden_size) * a);
  be_.linear(att, n, qd, w_.at(p + "wo"), w_.find(p + "bo"), o, c_.hidden_size);
  if (c_.knobs.post_attn_norm) build_norm(p + "post_attn_norm", o, n, o);
}

void Decoder::build_ffn(int64_t l, int64_t n) {
  const std::string p = "layers." + std::to_string(l) + ".";
  const int64_t I = c_.intermediate_size, H = c_.hidden_size;
  const size_t a = dtype_size(be_.act_dtype());
  void* h = bufs_["h"].first;
  void* f = buf("o", size_t(n * H) * a);
  void* act = buf("act", size_t(n * I) * a);
  if (c_.knobs.gated_mlp) {
    void* gu = buf("gu", size_t(n * 2 * I) * a);
    be_.linear(h, n, H, w_.at(p + "w_gate_up"), w_.find(p + "b_gate_up"), gu, 2 * I);
    be_.gated_act(gu, n, I, c_.act, act);
  } else {
    be_.linear(h, n, H, w_.at(p + "w_up"), w_.find(p + "b_up"), act, I);
    be_.act(act, n * I, c_.act);
  }
  be_.linear(act, n, I, w_.at(p + "w_down"), w_.find(p + "b_down"), f, H);
}

void Decoder::build_moe_ffn(int64_t l, int64_t n) {
  const std::string p = "layers." + std::to_string(l) + ".";
  std::vector<const Tensor*> gu, dn;
  for (int64_t e = 0; e < c_.num_experts; ++e) {
    gu.push_back(&w_.at(p + "experts." + std::to_string(e) + ".w_gate_up"));
    dn.push_back(&w_.at(p + "experts." + std::to_string(e) + ".w_down"));
  }
  Backend::MoeWeights mw{&w_.at(p + "router"), gu.data(), dn.data(),
                         w_.find(p + "shared.w_gate_up"), w_.find(p + "shared.w_down"),
                         w_.find(p + "shared_gate")};
  void* f = buf("o", size_t(n * c_.hidden_size) * dtype_size(be_.act_dtype()));
  be_.moe_ffn(bufs_["h"].first, n, c_.hidden_size, mw, c_.num_experts, c_.experts_per_token,
              c_.norm_topk_prob, c_.act, f);
}

std::vector<float> Decoder::forward(const int32_t* tokens, int64_t n, Sequence& seq,
                                    KVCache& cache, bool all_logits) {
  KILN_CHECK(n > 0, "forward needs at least one token");
  const int64_t H = c_.hidden_size, V = c_.vocab_size;
  for (int64_t i = 0; i < n; ++i)
    KILN_CHECK(tokens[i] >= 0 && tokens[i] < V, "token id ", tokens[i], " is outside the vocabulary [0, ", V, ")");
  const int64_t end = seq.length + n;
  kv_len_ = end;
  const int64_t need = (end + cache.block_size() - 1) / cache.block_size() - int64_t(seq.blocks.size());
  if (need > 0) {
    auto more = cache.take(need);
    seq.blocks.insert(seq.blocks.end(), more.begin(), more.end());
  }

  // Host-side inputs, then one copy each to the device.
  std::vector<int32_t> pos(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) pos[size_t(i)] = int32_t(seq.length + i);
  auto up = [&](const std::string& name, const void* src, size_t bytes) {
    void* d = buf(name, bytes);
    be_.to_device(d, src, bytes);
    return d;
  };
  auto* d_tok = static_cast<const int32_t*>(up("tokens", tokens, size_t(n) * 4));
  d_pos_ = static_cast<const int32_t*>(up("pos", pos.data(), size_t(n) * 4));
  d_blocks_ = static_cast<const int32_t*>(up("blocks", seq.blocks.data(), seq.blocks.size() * 4));
  d_cos_.assign(c_.ropes.size(), nullptr);
  d_sin_.assign(c_.ropes.size(), nullptr);
  for (size_t r = 0; r < c_.ropes.size(); ++r) {
    if (c_.ropes[r].type == RopeType::None) continue;
    const int64_t half = c_.rotary_dim(int(r)) / 2;
    std::vector<float> cs(size_t(n * half)), sn(size_t(n * half));
    rope_tables(c_.ropes[r], 2 * half, c_.max_position_embeddings, pos.data(), n, cs.data(), sn.data());
    d_cos_[r] = static_cast<const float*>(up("cos" + std::to_string(r), cs.data(), cs.size() * 4));
    d_sin_[r] = static_cast<const float*>(up("sin" + std::to_string(r), sn.data(), sn.size() * 4));
  }

  const size_t a = dtype_size(be_.act_dtype());
  void* x = buf("x", size_t(n * H) * a);
  void* h = buf("h", size_t(n * H) * a);
  const float escale = c_.knobs.embed_scale_sqrt_hidden ? std::sqrt(float(H)) : 1.0f;
  be_.embed(w_.at("embed"), d_tok, n, escale, x);
  if (c_.knobs.learned_positions) be_.add_rows(w_.at("pos_embed"), d_pos_, n, x);
  build_norm("layers.0.attn_norm", x, n, h);
  for (int64_t l = 0; l < c_.num_layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    build_attn(l, n, cache);
    const std::string ffn_norm = p + "ffn_norm";
    be_.add_norm(x, bufs_["o"].first, n, H, w_.at(ffn_norm), w_.find(ffn_norm + ".bias"),
                 c_.knobs.norm, float(c_.norm_eps), h);
    if (!c_.layers[size_t(l)].moe) build_ffn(l, n);
    else build_moe_ffn(l, n);
    void* f = bufs_["o"].first;
    if (c_.knobs.post_ffn_norm) build_norm(p + "post_ffn_norm", f, n, f);
    const std::string next = l + 1 < c_.num_layers ? "layers." + std::to_string(l + 1) + ".attn_norm" : "final_norm";
    be_.add_norm(x, f, n, H, w_.at(next), w_.find(next + ".bias"), c_.knobs.norm,
                 float(c_.norm_eps), h);
  }
  const int64_t rows = all_logits ? n : 1;
  const void* hs = all_logits ? h : at(h, (n - 1) * H);
  void* logits = buf("logits", size_t(rows * V) * a);
  be_.linear(hs, rows, H, c_.tie_word_embeddings ? w_.at("embed") : w_.at("lm_head"), nullptr,
             logits, V);
  if (c_.final_softcap > 0) be_.softcap(logits, rows * V, float(c_.final_softcap));
  std::vector<float> out(size_t(rows * V));
  be_.to_f32(logits, rows * V, out.data());
  seq.length = end;
  return out;
}

}  // namespace kiln
