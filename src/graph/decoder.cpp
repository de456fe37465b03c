#include "graph/decoder.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "graph/layout.h"
#include "graph/rope.h"

namespace kiln {

DeviceWeights::DeviceWeights(const std::vector<std::pair<std::string, Tensor>>& host,
                             std::vector<Tensor> resident) {
  KILN_CHECK(host.size() == resident.size(), "upload returned ", resident.size(), " of ",
             host.size(), " weights");
  for (size_t i = 0; i < host.size(); ++i) t_[host[i].first] = std::move(resident[i]);
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

Decoder::Decoder(Backend& be, const ModelConfig& c, const DeviceWeights& w, KVCache& cache,
                 int64_t max_seq_len, const Parallel& par)
    : be_(be),
      c_(c),
      par_(par),
      first_layer_(stage_layers(c, par.shard).first),
      last_layer_(stage_layers(c, par.shard).second),
      w_(w),
      cache_(cache),
      max_seq_len_(max_seq_len),
      bt_stride_((max_seq_len + cache.block_size() - 1) / cache.block_size()),
      graphs_(be.graphs()) {}

Decoder::~Decoder() {
  graphs_by_batch_.clear();
  for (auto& [n, b] : bufs_) be_.release(b.first);
}

void* Decoder::buf(const std::string& name, size_t bytes) {
  auto& b = bufs_[name];
  if (b.second < bytes) {
    if (b.first) be_.release(b.first);
    b.first = nullptr;
    b.second = 0;
    b.first = be_.alloc(bytes);
    b.second = bytes;
    ++gen_;
  }
  return b.first;
}

void* Decoder::at(void* p, int64_t elems) const {
  return static_cast<char*>(p) + size_t(elems) * dtype_size(be_.act_dtype());
}

void Decoder::build_norm(const std::string& name, const void* x, int64_t n, void* y,
                         bool residual_in) {
  be_.norm(x, n, c_.hidden_size, c_.hidden_size, w_.at(name), w_.find(name + ".bias"),
           c_.knobs.norm, float(c_.norm_eps), y, c_.hidden_size, residual_in);
}

// Layer l's cache as this step's attention sees it (rows of kv_dim, heads of head_dim).
KVLayerView Decoder::cache_view(int64_t l, int64_t kv_dim, int64_t head_dim) const {
  KVLayerView kv{cache_.k_pool(l), cache_.v_pool(l), d_blocks_, cache_.block_size(),
                 kv_dim,           kv_len_,          d_seq_,    bt_stride_};
  kv.seq_start = d_seq_start_;
  kv.num_seqs = num_seqs_, kv.num_decode = num_decode_, kv.max_q = max_q_;
  kv.k_scale = cache_.k_scales(l), kv.v_scale = cache_.v_scales(l), kv.head_dim = head_dim;
  return kv;
}

// Multi-head latent attention (Knobs::mla) over the latent cache, queries absorbed:
//   q = wq_b(q_a_norm(wq_a(h))) (or wq_b(h)), per head [nope | rope];
//   Q_h = w_q_absorb_h . q_h = [q_rope_h | W_UK_h^T q_nope_h]   (the build's absorbed matrix);
//   kv = wkv_a(h) = [k_rope | latent], latent normed (kv_a_norm); rope on Q's and kv's first
//   qk_rope_head_dim dims; the cache stores kv (V reads the same pool: the cache is compressed);
//   attention as MQA of head_dim rope + latent: each head's output [. | sum p latent];
//   o_h = w_o_absorb_h . out_h = W_UV_h (sum p latent); wo(o).
// Scores are q_rope.k_rope + q_nope.(W_UK latent) as in transformers' expanded form.
void Decoder::build_attn_mla(int64_t l, int64_t n) {
  const std::string p = "layers." + std::to_string(l) + ".";
  const int64_t H = c_.hidden_size, heads = c_.num_heads, D = c_.head_dim, QK = c_.qk_head_dim();
  const int64_t R = c_.qk_rope_head_dim, L = c_.kv_lora_rank, V = c_.v_head_dim;
  const size_t a = dtype_size(be_.act_dtype());
  // transformers' q_a_layernorm and kv_a_layernorm are RMSNorms with their default eps, 1e-6.
  constexpr float kLatentEps = 1e-6f;
  void* h = bufs_["h"].first;
  const void* qin = h;
  int64_t in = H;
  if (c_.q_lora_rank > 0) {
    in = c_.q_lora_rank;
    void* qa = buf("mla_qa", size_t(n * in) * a);
    be_.linear(h, n, H, w_.at(p + "wq_a"), w_.find(p + "bq_a"), qa, in);
    be_.head_norm(qa, n, in, 1, in, w_.at(p + "q_a_norm"), NormKind::RMS, kLatentEps);
    qin = qa;
  }
  void* q = buf("mla_q", size_t(n * heads * QK) * a);
  be_.linear(qin, n, in, w_.at(p + "wq_b"), nullptr, q, heads * QK);
  void* Q = buf("qkv", size_t(n * heads * D) * a);
  be_.head_linear(q, n, heads * QK, heads, w_.at(p + "w_q_absorb"), Q, heads * D);
  void* kv = buf("mla_kv", size_t(n * D) * a);
  be_.linear(h, n, H, w_.at(p + "wkv_a"), w_.find(p + "bkv_a"), kv, D);
  be_.head_norm(at(kv, R), n, D, 1, L, w_.at(p + "kv_a_norm"), NormKind::RMS, kLatentEps);
  const LayerConfig& lc = c_.layers[size_t(l)];
  const int r = lc.rope;
  if (c_.ropes[size_t(r)].type != RopeType::None) {
    be_.rope(Q, n, heads * D, heads, D, R, d_cos_[size_t(r)], d_sin_[size_t(r)]);
    be_.rope(kv, n, D, 1, D, R, d_cos_[size_t(r)], d_sin_[size_t(r)]);
  }
  const KVLayerView cache = cache_view(l, D, D);
  be_.kv_write(cache, kv, kv, D, d_pos_, n);
  void* att = buf("att", size_t(n * heads * D) * a);
  AttnParams ap{heads, 1, D, float(c_.attn_scale), float(c_.attn_softcap), lc.sliding_window};
  be_.attention(Q, heads * D, n, d_pos_, cache, ap, att, heads * D);
  void* oh = buf("mla_o", size_t(n * heads * V) * a);
  be_.head_linear(att, n, heads * D, heads, w_.at(p + "w_o_absorb"), oh, heads * V);
  void* o = buf("o", size_t(n * H) * a);
  be_.linear(oh, n, heads * V, w_.at(p + "wo"), w_.find(p + "bo"), o, H);
  all_reduce(o, n * H, be_.act_dtype());
  if (c_.knobs.post_attn_norm) build_norm(p + "post_attn_norm", o, n, o);
}

void Decoder::build_attn(int64_t l, int64_t n) {
  if (c_.knobs.mla) return build_attn_mla(l, n);
  const std::string p = "layers." + std::to_string(l) + ".";
  const int64_t qd = c_.q_dim(), kvd = c_.kv_dim(), ld = qd + 2 * kvd, hd = c_.head_dim;
  const size_t a = dtype_size(be_.act_dtype());
  void* h = bufs_["h"].first;
  void* qkv = buf("qkv", size_t(n * ld) * a);
  be_.linear(h, n, c_.hidden_size, w_.at(p + "wqkv"), w_.find(p + "bqkv"), qkv, ld);
  void* k = at(qkv, qd);
  void* v = at(qkv, qd + kvd);
  if (c_.knobs.qk_norm && c_.knobs.qk_norm_full && par_.tp) {
    // Over all heads at once, and the heads are spread over the ranks: the norms are whole
    // (the model's KV heads: k_norm's width over head_dim; fewer than ranks are replicated).
    const Tensor& kn = w_.at(p + "k_norm");
    const int64_t kv_all = kn.numel() / hd, tp = par_.shard.tp;
    gather_norm(qkv, n, ld, qd, 1, w_.at(p + "q_norm"), w_.find(p + "q_norm.bias"));
    gather_norm(k, n, ld, kvd, kv_all < tp ? int(tp / kv_all) : 1, kn, w_.find(p + "k_norm.bias"));
  } else if (c_.knobs.qk_norm && c_.knobs.qk_norm_full) {  // all heads at once: one "head"
    be_.head_norm(qkv, n, ld, 1, qd, w_.at(p + "q_norm"), c_.knobs.norm, float(c_.norm_eps),
                  w_.find(p + "q_norm.bias"));
    be_.head_norm(k, n, ld, 1, kvd, w_.at(p + "k_norm"), c_.knobs.norm, float(c_.norm_eps),
                  w_.find(p + "k_norm.bias"));
  } else if (c_.knobs.qk_norm) {
    be_.qk_norm(qkv, n, ld, c_.num_heads, c_.num_kv_heads, hd, w_.at(p + "q_norm"),
                w_.at(p + "k_norm"), c_.knobs.norm, float(c_.norm_eps), w_.find(p + "q_norm.bias"),
                w_.find(p + "k_norm.bias"));
  }
  const LayerConfig& lc = c_.layers[size_t(l)];
  const int r = lc.rope;
  const KVLayerView kv = cache_view(l, kvd, hd);
  if (c_.ropes[size_t(r)].type != RopeType::None)
    be_.rope_kv_write(qkv, n, ld, c_.num_heads, c_.num_kv_heads, hd, c_.rotary_dim(r),
                      d_cos_[size_t(r)], d_sin_[size_t(r)], kv, d_pos_);
  else
    be_.kv_write(kv, k, v, ld, d_pos_, n);
  void* att = buf("att", size_t(n * qd) * a);
  AttnParams ap{c_.num_heads,         c_.num_kv_heads,        hd,
                float(c_.attn_scale), float(c_.attn_softcap), lc.sliding_window};
  if (c_.knobs.attn_sinks) ap.sinks = static_cast<const float*>(w_.at(p + "sinks").data);
  be_.attention(qkv, ld, n, d_pos_, kv, ap, att, qd);
  void* o = buf("o", size_t(n * c_.hidden_size) * a);
  be_.linear(att, n, qd, w_.at(p + "wo"), w_.find(p + "bo"), o, c_.hidden_size);
  all_reduce(o, n * c_.hidden_size, be_.act_dtype());
  if (c_.knobs.post_attn_norm) build_norm(p + "post_attn_norm", o, n, o);
}

void Decoder::build_ffn(int64_t l, int64_t n, const void* h, void* f) {
  const std::string p = "layers." + std::to_string(l) + ".";
  const int64_t I = c_.intermediate_size, H = c_.hidden_size;
  const size_t a = dtype_size(be_.act_dtype());
  void* act = buf("act", size_t(n * I) * a);
  if (c_.knobs.gated_mlp) {
    void* gu = buf("gu", size_t(n * 2 * I) * a);
    be_.linear_gated_act(h, n, H, w_.at(p + "w_gate_up"), w_.find(p + "b_gate_up"), gu, I, c_.act,
                         act);
  } else {
    be_.linear(h, n, H, w_.at(p + "w_up"), w_.find(p + "b_up"), act, I);
    be_.act(act, n * I, c_.act);
  }
  be_.linear(act, n, I, w_.at(p + "w_down"), w_.find(p + "b_down"), f, H);
  all_reduce(f, n * H, be_.act_dtype());
}

void Decoder::build_moe_ffn(int64_t l, int64_t n, const void* h, void* f) {
  const std::string p = "layers." + std::to_string(l) + ".";
  std::vector<const Tensor*> gu, dn, bgu, bdn;
  for (int64_t e = 0; e < c_.num_experts; ++e) {
    const std::string x = p + "experts." + std::to_string(e) + ".";
    gu.push_back(&w_.at(x + "w_gate_up"));
    dn.push_back(&w_.at(x + "w_down"));
    if (c_.knobs.mlp_bias) {
      bgu.push_back(&w_.at(x + "b_gate_up"));
      bdn.push_back(&w_.at(x + "b_down"));
    }
  }
  Backend::MoeWeights mw{&w_.at(p + "router"),
                         gu.data(),
                         dn.data(),
                         w_.find(p + "shared.w_gate_up"),
                         w_.find(p + "shared.w_down"),
                         w_.find(p + "shared_gate"),
                         c_.knobs.router_bias ? &w_.at(p + "router.bias") : nullptr,
                         bgu.empty() ? nullptr : bgu.data(),
                         bdn.empty() ? nullptr : bdn.data(),
                         w_.find(p + "router.score_bias")};
  Backend::MoeParams mp;
  mp.num_experts = c_.num_experts, mp.top_k = c_.experts_per_token, mp.renorm = c_.norm_topk_prob;
  mp.scoring = c_.knobs.routing, mp.groups = c_.moe_groups, mp.topk_groups = c_.moe_topk_groups;
  mp.scaling = float(c_.routed_scaling), mp.shared_gated = c_.knobs.shared_expert_gated;
  be_.moe_ffn(h, n, c_.hidden_size, mw, mp, c_.act, f);
  all_reduce(f, n * c_.hidden_size, be_.act_dtype());
}

const float* Decoder::logits_out() {
  // A stage before the last has no logits: its output went on to the next stage.
  return par_.shard.last_stage() ? static_cast<const float*>(bufs_["logits"].first) : nullptr;
}

void Decoder::all_reduce(void* x, int64_t count, DType t) {
  if (par_.tp) par_.tp->all_reduce_sum(x, count, t);
}

void Decoder::gather_norm(void* x, int64_t n, int64_t ld, int64_t local_w, int reps,
                          const Tensor& w, const Tensor* b) {
  const int tp = par_.tp->size(), r = par_.tp->rank();
  const int64_t full_w = w.numel();
  KILN_CHECK(full_w * reps == local_w * tp, "qk_norm over ", full_w, " features, ", tp,
             " ranks of ", local_w);
  const size_t a = dtype_size(be_.act_dtype()), row = size_t(local_w) * a;
  void* part = buf("tp_part", size_t(n) * row);
  be_.copy_2d(part, row, x, size_t(ld) * a, row, size_t(n));
  void* all = buf("tp_all", size_t(tp * n) * row);
  par_.tp->all_gather(part, all, size_t(n) * row);
  void* whole = buf("tp_whole", size_t(n * full_w) * a);
  for (int64_t j = 0; j * local_w < full_w; ++j)  // slice j: the first of the ranks holding it
    be_.copy_2d(at(whole, j * local_w), size_t(full_w) * a, at(all, j * reps * n * local_w), row,
                row, size_t(n));
  be_.head_norm(whole, n, full_w, 1, full_w, w, c_.knobs.norm, float(c_.norm_eps), b);
  be_.copy_2d(x, size_t(ld) * a, at(whole, (r / reps) * local_w), size_t(full_w) * a, row,
              size_t(n));
}

void Decoder::gather_logits(const float* part, int64_t rows, float* out) {
  const int tp = par_.tp->size();
  const int64_t V = c_.vocab_size, Vs = vocab_slice(V, tp);
  auto* all = static_cast<float*>(buf("logits_all", size_t(tp * rows * Vs) * 4));
  par_.tp->all_gather(part, all, size_t(rows * Vs) * 4);
  for (int64_t r = 0; r < tp; ++r) {
    const int64_t width = std::min(Vs, V - r * Vs);  // the last slice's padding stays behind
    if (width > 0)
      be_.copy_2d(out + r * Vs, size_t(V) * 4, all + r * rows * Vs, size_t(Vs) * 4,
                  size_t(width) * 4, size_t(rows));
  }
}

void Decoder::add_in_norm(void* residual, const void* delta, int64_t n, const std::string& name,
                          void* y) {
  // "": no norm, the layers read the residual stream itself (NormKind::None: the norm weight
  // is not read; final_norm stands in as a valid F32 tensor).
  const bool none = name.empty();
  be_.add_norm(residual, delta, n, c_.hidden_size, w_.at(none ? "final_norm" : name),
               none ? nullptr : w_.find(name + ".bias"), none ? NormKind::None : c_.knobs.norm,
               float(c_.norm_eps), y);
}

void Decoder::build_forward(const int32_t* d_tok, int64_t n, int64_t first, int64_t rows,
                            const int32_t* d_rows) {
  const int64_t H = c_.hidden_size, V = c_.vocab_size;
  const size_t a = dtype_size(be_.act_dtype());
  void* x = buf("x", size_t(n * H) * 4);  // the residual stream: F32 on every backend
  void* h = buf("h", size_t(n * H) * a);
  const Shard& sh = par_.shard;
  if (sh.first_stage()) {
    const float escale = float((c_.knobs.embed_scale_sqrt_hidden ? std::sqrt(double(H)) : 1.0) *
                               c_.embed_multiplier);
    // Tensor parallel: each rank looks up its slice of the vocabulary (zeros elsewhere).
    be_.embed(w_.at("embed"), d_tok, n, escale, x,
              par_.tp ? sh.tp_rank * vocab_slice(V, sh.tp) : 0);
    all_reduce(x, n * H, DType::F32);
    if (c_.knobs.learned_positions) be_.add_rows(w_.at("pos_embed"), d_pos_, n, x);
  } else {
    par_.pp->recv(x, size_t(n * H) * 4, sh.pp_rank - 1);
  }
  if (c_.knobs.pre_norm)
    build_norm("layers." + std::to_string(first_layer_) + ".attn_norm", x, n, h, true);
  else  // h = x in the activation dtype
    be_.norm(x, n, H, H, w_.at("final_norm"), nullptr, NormKind::None, float(c_.norm_eps), h, H,
             true);
  for (int64_t l = first_layer_; l < last_layer_; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    // The last layer of a stage before the last hands the residual on unnormed.
    const std::string next = l + 1 == c_.num_layers ? "final_norm"
                             : c_.knobs.pre_norm && l + 1 < last_layer_
                                 ? "layers." + std::to_string(l + 1) + ".attn_norm"
                                 : "";
    const bool moe = c_.layers[size_t(l)].moe;
    if (c_.knobs.parallel_block) {
      // x += attn(norm(x)) + ffn(norm'(x)); norm' is the same norm under shared_block_norm.
      void* f = buf("f", size_t(n * H) * a);
      const void* fin = h;
      if (!c_.knobs.shared_block_norm) {
        void* h2 = buf("h2", size_t(n * H) * a);
        build_norm(p + "ffn_norm", x, n, h2, true);
        fin = h2;
      }
      if (!moe)
        build_ffn(l, n, fin, f);
      else
        build_moe_ffn(l, n, fin, f);
      build_attn(l, n);
      void* o = bufs_["o"].first;
      be_.add(o, f, n * H);
      add_in_norm(x, o, n, next, h);
      continue;
    }
    build_attn(l, n);
    add_in_norm(x, bufs_["o"].first, n, has_ffn_norm(c_) ? p + "ffn_norm" : "", h);
    void* f = buf("o", size_t(n * H) * a);
    if (!moe)
      build_ffn(l, n, h, f);
    else
      build_moe_ffn(l, n, h, f);
    if (c_.knobs.post_ffn_norm) build_norm(p + "post_ffn_norm", f, n, f);
    add_in_norm(x, f, n, next, h);
  }
  if (!sh.last_stage()) {
    par_.pp->send(x, size_t(n * H) * 4, sh.pp_rank + 1);
    return;
  }
  // The LM head reads the final norm of the F32 residual in F32 (not the rounded h): for 16-bit
  // engines that is one rounding less right where it moves logits most.
  auto* hf = static_cast<float*>(buf("h_f32", size_t(rows * H) * 4));
  const float* xr = static_cast<float*>(x) + first * H;
  if (d_rows) {
    // Gather the wanted rows of the F32 residual (an embedding lookup with x as the table).
    auto* xg = static_cast<float*>(buf("x_rows", size_t(rows * H) * 4));
    be_.embed(Tensor::view(DType::F32, {n, H}, nullptr, x), d_rows, rows, 1.0f, xg);
    xr = xg;
  }
  be_.norm(xr, rows, H, H, w_.at("final_norm"), w_.find("final_norm.bias"), c_.knobs.norm,
           float(c_.norm_eps), hf, H, true, true);
  auto* logits = static_cast<float*>(buf("logits", size_t(rows * V) * 4));
  const Tensor& head = c_.tie_word_embeddings ? w_.at("embed") : w_.at("lm_head");
  if (!par_.tp) {
    be_.logits(hf, rows, H, head, w_.find("lm_head.bias"), float(c_.final_softcap), logits, true);
    return;
  }
  // Tensor parallel: each rank's vocabulary slice, then whole rows.
  auto* part = static_cast<float*>(buf("logits_part", size_t(rows * head.shape[0]) * 4));
  be_.logits(hf, rows, H, head, w_.find("lm_head.bias"), float(c_.final_softcap), part, true);
  gather_logits(part, rows, logits);
}

namespace {

void check_tokens(const int32_t* tokens, int64_t n, int64_t V) {
  for (int64_t i = 0; i < n; ++i)
    KILN_CHECK(tokens[i] >= 0 && tokens[i] < V, "token id ", tokens[i],
               " is outside the vocabulary [0, ", V, ")");
}

}  // namespace

void Decoder::stage_inputs(const Batch& b, int64_t rows, int64_t seqs) {
  // Layout (int32 words): pos [rows], seq [rows], seq_start [seqs + 1], block tables
  // [seqs, bt_stride], logit rows [R], then per rope cos and sin [rows, half] as floats. Rows and
  // sequences past the batch's (padding of a graph step) read position 0 of block 0.
  const int64_t R = int64_t(b.logit_rows.size());
  const size_t head = size_t(2 * rows + (seqs + 1) + seqs * bt_stride_ + R);
  size_t words = head;
  for (size_t r = 0; r < c_.ropes.size(); ++r)
    if (c_.ropes[r].type != RopeType::None) words += 2 * size_t(rows * (c_.rotary_dim(int(r)) / 2));
  staging_.assign(words, 0);
  int32_t* pos = staging_.data();
  int32_t* seq = pos + rows;
  int32_t* start = seq + rows;
  int32_t* bt = start + seqs + 1;
  int32_t* lrows = bt + seqs * bt_stride_;
  int64_t row = 0;
  for (int64_t s = 0; s < seqs; ++s) {
    start[s] = int32_t(row);
    if (s < int64_t(b.seqs.size())) {
      const BatchSeq& q = b.seqs[size_t(s)];
      std::copy(q.blocks.begin(), q.blocks.end(), bt + s * bt_stride_);
      for (int64_t i = 0; i < q.n; ++i, ++row)
        pos[row] = int32_t(q.start + i), seq[row] = int32_t(s);
    } else {
      seq[row++] = int32_t(s);  // padding: one row, position 0 of the zero table row
    }
  }
  start[seqs] = int32_t(row);
  std::copy(b.logit_rows.begin(), b.logit_rows.end(), lrows);

  char* dev = static_cast<char*>(buf("step_in", words * 4));
  size_t off = head * 4;
  d_cos_.assign(c_.ropes.size(), nullptr);
  d_sin_.assign(c_.ropes.size(), nullptr);
  for (size_t r = 0; r < c_.ropes.size(); ++r) {
    if (c_.ropes[r].type == RopeType::None) continue;
    const int64_t half = c_.rotary_dim(int(r)) / 2;
    auto* cs = reinterpret_cast<float*>(reinterpret_cast<char*>(staging_.data()) + off);
    auto* sn = cs + rows * half;
    // Per sequence: dynamic NTK and longrope depend on the longest position of the sequence's
    // own chunk (as one transformers forward over it); padding rows get position 0.
    const RopeType ty = c_.ropes[r].type;
    if (ty != RopeType::Dynamic && ty != RopeType::LongRope) {
      // Tables that do not depend on the sequence length: rows cached per position.
      auto& cache = rope_cache_[r];
      int64_t top = 0;
      for (int64_t i = 0; i < rows; ++i) top = std::max<int64_t>(top, pos[i] + 1);
      const int64_t have = int64_t(cache.first.size()) / half;
      if (top > have) {
        const int64_t grow = std::max(top, std::min<int64_t>(2 * have + 64, max_seq_len_));
        std::vector<int32_t> p(static_cast<size_t>(grow - have));
        for (size_t i = 0; i < p.size(); ++i) p[i] = int32_t(have + int64_t(i));
        cache.first.resize(size_t(grow * half));
        cache.second.resize(size_t(grow * half));
        rope_tables(c_.ropes[r], 2 * half, c_.max_position_embeddings, p.data(), int64_t(p.size()),
                    cache.first.data() + have * half, cache.second.data() + have * half);
      }
      for (int64_t i = 0; i < rows; ++i) {
        std::copy_n(cache.first.data() + pos[i] * half, half, cs + i * half);
        std::copy_n(cache.second.data() + pos[i] * half, half, sn + i * half);
      }
    } else {
      int64_t r0 = 0;
      for (int64_t s = 0; s < seqs; ++s) {
        const int64_t n = s < int64_t(b.seqs.size()) ? b.seqs[size_t(s)].n : 1;
        rope_tables(c_.ropes[r], 2 * half, c_.max_position_embeddings, pos + r0, n, cs + r0 * half,
                    sn + r0 * half);
        r0 += n;
      }
    }
    d_cos_[r] = reinterpret_cast<const float*>(dev + off);
    d_sin_[r] = reinterpret_cast<const float*>(dev + off + size_t(rows * half) * 4);
    off += 2 * size_t(rows * half) * 4;
  }
  be_.to_device(dev, staging_.data(), words * 4);
  d_pos_ = reinterpret_cast<const int32_t*>(dev);
  d_seq_ = d_pos_ + rows;
  d_seq_start_ = d_seq_ + rows;
  d_blocks_ = d_seq_start_ + seqs + 1;
  d_logit_rows_ = d_blocks_ + seqs * bt_stride_;
}

const float* Decoder::forward(const Batch& b, bool tokens_on_device) {
  const int64_t S = int64_t(b.seqs.size()), n = b.num_tokens();
  KILN_CHECK(S > 0, "forward needs at least one sequence");
  const int64_t D = b.num_decode();
  int64_t total = 0, longest = 0, max_q = 0;
  for (int64_t s = 0; s < S; ++s) {
    const BatchSeq& q = b.seqs[size_t(s)];
    KILN_CHECK(q.n >= 1, "forward: sequence ", s, " has no new tokens");
    KILN_CHECK(q.start >= 0 && q.start + q.n <= max_seq_len_, "sequence of ", q.start + q.n,
               " tokens exceeds the engine's max_seq_len of ", max_seq_len_);
    KILN_CHECK(int64_t(q.blocks.size()) * cache_.block_size() >= q.start + q.n &&
                   int64_t(q.blocks.size()) <= bt_stride_,
               "forward: the block table of sequence ", s, " does not cover its positions");
    for (int32_t blk : q.blocks)
      KILN_CHECK((blk > 0 || warmup_) && blk < cache_.num_blocks() && blk >= 0, "forward: block ",
                 blk, " is not a block of the cache");
    total += q.n;
    longest = std::max(longest, q.start + q.n);
    if (s >= D) max_q = std::max(max_q, q.n);
  }
  const bool decode_only = D == S;
  KILN_CHECK(tokens_on_device || total == n, "forward: ", n, " tokens for sequences of ", total);
  KILN_CHECK(!tokens_on_device || decode_only, "forward: tokens on the device need a decode step");
  if (!tokens_on_device) check_tokens(b.tokens.data(), n, c_.vocab_size);
  const int64_t R = int64_t(b.logit_rows.size());
  for (int64_t r = 0; r < R; ++r)
    KILN_CHECK(b.logit_rows[size_t(r)] >= 0 && b.logit_rows[size_t(r)] < total &&
                   (r == 0 || b.logit_rows[size_t(r)] > b.logit_rows[size_t(r - 1)]),
               "forward: logit rows must be ascending rows of the batch");

  const bool all_rows = R == total;
  if (decode_only && all_rows && graphs_ && !warmup_) {
    // A captured decode step: pad to the graph's batch, copy the inputs in, replay.
    auto it = std::lower_bound(graph_sizes_.begin(), graph_sizes_.end(), S);
    auto g = it == graph_sizes_.end() ? graphs_by_batch_.end() : graphs_by_batch_.find(*it);
    if (g != graphs_by_batch_.end() && g->second.g && g->second.gen == gen_ &&
        g->second.be_gen == be_.generation()) {
      const int64_t Bp = *it;
      if (!tokens_on_device) {
        std::vector<int32_t> t(static_cast<size_t>(Bp), 0);
        std::copy(b.tokens.begin(), b.tokens.end(), t.begin());
        be_.to_device(token_buffer(), t.data(), t.size() * 4);
      }
      Batch padded;
      padded.seqs = b.seqs;
      for (int64_t r = 0; r < Bp; ++r) padded.logit_rows.push_back(int32_t(r));
      stage_inputs(padded, Bp, Bp);
      be_.replay(*g->second.g);
      ++replays_;
      return logits_out();
    }
    if (g != graphs_by_batch_.end()) ++stale_;  // a buffer moved since capture: run eagerly
  }
  int32_t* d_tok = nullptr;
  if (tokens_on_device) {
    d_tok = token_buffer();
    KILN_CHECK(bufs_["decode_tok"].second >= size_t(n) * 4, "forward: no sampled tokens for ", n,
               " rows on the device");
  } else {
    d_tok = static_cast<int32_t*>(buf("tokens", size_t(std::max<int64_t>(n, 1)) * 4));
    be_.to_device(d_tok, b.tokens.data(), size_t(n) * 4);
  }
  stage_inputs(b, n, S);
  num_seqs_ = S, num_decode_ = D, max_q_ = max_q;
  // Decode steps tell attention the engine's bound, as a captured graph does, so eager and
  // replayed steps launch the same work and give the same logits.
  kv_len_ = decode_only ? max_seq_len_ : longest;
  // The logits of a contiguous run of rows need no gather.
  const bool run = R > 0 && b.logit_rows.back() - b.logit_rows.front() == R - 1;
  if (R == 0) {
    build_forward(d_tok, n, 0, 0);
  } else {
    build_forward(d_tok, n, run ? b.logit_rows.front() : 0, R, run ? nullptr : d_logit_rows_);
  }
  return logits_out();
}

void Decoder::prepare(int64_t max_tokens, int64_t max_seqs, int64_t max_logit_rows) {
  KILN_CHECK(max_seqs >= 1 && max_tokens >= max_seqs && max_logit_rows >= max_seqs,
             "prepare: need max_tokens >= max_seqs >= 1 and max_logit_rows >= max_seqs");
  max_logit_rows = std::min(max_logit_rows, max_tokens);
  // Graph batch sizes: powers of two below max_seqs, then max_seqs.
  graph_sizes_.clear();
  for (int64_t b = 1; b < max_seqs; b *= 2) graph_sizes_.push_back(b);
  graph_sizes_.push_back(max_seqs);
  graphs_by_batch_.clear();
  // Every buffer at its largest first, so none moves after a graph is captured: the staging
  // buffer for max_tokens rows of max_seqs sequences, the decode token buffer.
  size_t words = size_t(2 * max_tokens + (max_seqs + 1) + max_seqs * bt_stride_ + max_logit_rows);
  for (size_t r = 0; r < c_.ropes.size(); ++r)
    if (c_.ropes[r].type != RopeType::None)
      words += 2 * size_t(max_tokens * (c_.rotary_dim(int(r)) / 2));
  buf("step_in", words * 4);
  {
    // Zeros: padding rows of a graph step embed these (valid ids) until real picks land.
    const std::vector<int32_t> z(static_cast<size_t>(max_seqs), 0);
    be_.to_device(buf("decode_tok", z.size() * 4), z.data(), z.size() * 4);
  }
  buf("tokens", size_t(max_tokens) * 4);
  // Then the largest prefill step (sizing the activations and backend workspaces) and the
  // largest decode step. Their tokens write only the reserved block 0: positions past its 16
  // slots wrap inside it, and no real sequence ever reads it.
  // Without graphs nothing holds on to a buffer: the rest may grow on demand (on the CPU a
  // warm-up prefill of max_tokens would only cost start-up time).
  if (!graphs_) return;
  const std::vector<int32_t> zeros(static_cast<size_t>(std::max(max_tokens, bt_stride_)), 0);
  const int64_t bs = cache_.block_size();
  warmup_ = true;
  try {
    {
      Batch b;
      for (int64_t left = max_tokens; left > 0;) {
        const int64_t len = std::min(left, max_seq_len_);
        b.add(std::span<const int32_t>(zeros).first(size_t(len)), 0,
              std::span<const int32_t>(zeros).first(size_t((len + bs - 1) / bs)), false);
        left -= len;
      }
      b.logit_rows.clear();
      for (int64_t r = max_tokens - max_logit_rows; r < max_tokens; ++r)
        b.logit_rows.push_back(int32_t(r));
      forward(b);
    }
    {
      Batch b;
      for (int64_t s = 0; s < max_seqs; ++s)
        b.add(std::span<const int32_t>(zeros).first(1), 0, std::span<const int32_t>(zeros).first(1),
              true);
      forward(b);
    }
    be_.synchronize();
    // Decode graphs, captured once here: each run eagerly first (sizing what it uses), then
    // recorded; a replay only copies the step's inputs in.
    for (int64_t Bp : graphs_ ? graph_sizes_ : std::vector<int64_t>{}) {
      Batch b;
      for (int64_t s = 0; s < Bp; ++s)
        b.add(std::span<const int32_t>(zeros).first(1), 0, std::span<const int32_t>(zeros).first(1),
              true);
      auto run = [&] {
        stage_inputs(b, Bp, Bp);
        num_seqs_ = Bp, num_decode_ = Bp, max_q_ = 0;
        kv_len_ = max_seq_len_;  // lengths change between replays: attention gets the bound
        build_forward(token_buffer(), Bp, 0, Bp);
      };
      run();
      be_.capture_begin();
      try {
        run();
      } catch (...) {
        try {
          be_.capture_end();
        } catch (const Error&) {
        }
        throw;
      }
      Graph& g = graphs_by_batch_[Bp];
      g.g = be_.capture_end();
      g.gen = gen_;
      g.be_gen = be_.generation();
      ++captures_;
    }
    be_.synchronize();
  } catch (...) {
    warmup_ = false;
    throw;
  }
  warmup_ = false;
  // Warm-up rows may have filled block 0 with anything; padding rows write there too, and no
  // attention of a real sequence reads it.
}

}  // namespace kiln
