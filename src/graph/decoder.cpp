#include "graph/decoder.h"

#include <cmath>

#include "core/error.h"
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
                 int64_t max_seq_len)
    : be_(be),
      c_(c),
      w_(w),
      cache_(cache),
      max_seq_len_(max_seq_len),
      bt_stride_((max_seq_len + cache.block_size() - 1) / cache.block_size()),
      graphs_(be.graphs()) {}

Decoder::~Decoder() {
  graphs_by_shape_.clear();
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

void Decoder::reserve_blocks(Sequence& seq, int64_t end) {
  KILN_CHECK(end <= max_seq_len_, "sequence of ", end,
             " tokens exceeds the engine's max_seq_len of ", max_seq_len_);
  const int64_t need =
      (end + cache_.block_size() - 1) / cache_.block_size() - int64_t(seq.blocks.size());
  if (need > 0) {
    auto more = cache_.take(need);
    seq.blocks.insert(seq.blocks.end(), more.begin(), more.end());
  }
}

void Decoder::build_norm(const std::string& name, const void* x, int64_t n, void* y,
                         bool residual_in) {
  be_.norm(x, n, c_.hidden_size, c_.hidden_size, w_.at(name), w_.find(name + ".bias"),
           c_.knobs.norm, float(c_.norm_eps), y, c_.hidden_size, residual_in);
}

void Decoder::build_attn(int64_t l, int64_t n) {
  const std::string p = "layers." + std::to_string(l) + ".";
  const int64_t qd = c_.q_dim(), kvd = c_.kv_dim(), ld = qd + 2 * kvd, hd = c_.head_dim;
  const size_t a = dtype_size(be_.act_dtype());
  void* h = bufs_["h"].first;
  void* qkv = buf("qkv", size_t(n * ld) * a);
  be_.linear(h, n, c_.hidden_size, w_.at(p + "wqkv"), w_.find(p + "bqkv"), qkv, ld);
  void* k = at(qkv, qd);
  void* v = at(qkv, qd + kvd);
  if (c_.knobs.qk_norm) {
    be_.head_norm(qkv, n, ld, c_.num_heads, hd, w_.at(p + "q_norm"), c_.knobs.norm,
                  float(c_.norm_eps));
    be_.head_norm(k, n, ld, c_.num_kv_heads, hd, w_.at(p + "k_norm"), c_.knobs.norm,
                  float(c_.norm_eps));
  }
  const LayerConfig& lc = c_.layers[size_t(l)];
  const int r = lc.rope;
  if (c_.ropes[size_t(r)].type != RopeType::None) {
    const int64_t rot = c_.rotary_dim(r);
    be_.rope(qkv, n, ld, c_.num_heads, hd, rot, d_cos_[size_t(r)], d_sin_[size_t(r)]);
    be_.rope(k, n, ld, c_.num_kv_heads, hd, rot, d_cos_[size_t(r)], d_sin_[size_t(r)]);
  }
  KVLayerView kv{
      cache_.k_pool(l), cache_.v_pool(l),       d_blocks_, cache_.block_size(), kvd, kv_len_,
      d_seq_,           d_seq_ ? bt_stride_ : 0};
  be_.kv_write(kv, k, v, ld, d_pos_, n);
  void* att = buf("att", size_t(n * qd) * a);
  AttnParams ap{c_.num_heads,         c_.num_kv_heads,        hd,
                float(c_.attn_scale), float(c_.attn_softcap), lc.sliding_window};
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
  Backend::MoeWeights mw{&w_.at(p + "router"),
                         gu.data(),
                         dn.data(),
                         w_.find(p + "shared.w_gate_up"),
                         w_.find(p + "shared.w_down"),
                         w_.find(p + "shared_gate")};
  void* f = buf("o", size_t(n * c_.hidden_size) * dtype_size(be_.act_dtype()));
  be_.moe_ffn(bufs_["h"].first, n, c_.hidden_size, mw, c_.num_experts, c_.experts_per_token,
              c_.norm_topk_prob, c_.act, f);
}

void Decoder::build_forward(const int32_t* d_tok, int64_t n, int64_t first, int64_t rows) {
  const int64_t H = c_.hidden_size, V = c_.vocab_size;
  const size_t a = dtype_size(be_.act_dtype());
  void* x = buf("x", size_t(n * H) * 4);  // the residual stream: F32 on every backend
  void* h = buf("h", size_t(n * H) * a);
  const float escale = c_.knobs.embed_scale_sqrt_hidden ? std::sqrt(float(H)) : 1.0f;
  be_.embed(w_.at("embed"), d_tok, n, escale, x);
  if (c_.knobs.learned_positions) be_.add_rows(w_.at("pos_embed"), d_pos_, n, x);
  build_norm("layers.0.attn_norm", x, n, h, true);
  for (int64_t l = 0; l < c_.num_layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    build_attn(l, n);
    const std::string ffn_norm = p + "ffn_norm";
    be_.add_norm(x, bufs_["o"].first, n, H, w_.at(ffn_norm), w_.find(ffn_norm + ".bias"),
                 c_.knobs.norm, float(c_.norm_eps), h);
    if (!c_.layers[size_t(l)].moe)
      build_ffn(l, n);
    else
      build_moe_ffn(l, n);
    void* f = bufs_["o"].first;
    if (c_.knobs.post_ffn_norm) build_norm(p + "post_ffn_norm", f, n, f);
    const std::string next =
        l + 1 < c_.num_layers ? "layers." + std::to_string(l + 1) + ".attn_norm" : "final_norm";
    be_.add_norm(x, f, n, H, w_.at(next), w_.find(next + ".bias"), c_.knobs.norm,
                 float(c_.norm_eps), h);
  }
  // The LM head reads the final norm of the F32 residual in F32 (not the rounded h): for 16-bit
  // engines that is one rounding less right where it moves logits most.
  auto* hf = static_cast<float*>(buf("h_f32", size_t(rows * H) * 4));
  be_.norm(static_cast<float*>(x) + first * H, rows, H, H, w_.at("final_norm"),
           w_.find("final_norm.bias"), c_.knobs.norm, float(c_.norm_eps), hf, H, true, true);
  auto* logits = static_cast<float*>(buf("logits", size_t(rows * V) * 4));
  be_.logits(hf, rows, H, c_.tie_word_embeddings ? w_.at("embed") : w_.at("lm_head"),
             float(c_.final_softcap), logits, true);
}

namespace {

void check_tokens(const int32_t* tokens, int64_t n, int64_t V) {
  for (int64_t i = 0; i < n; ++i)
    KILN_CHECK(tokens[i] >= 0 && tokens[i] < V, "token id ", tokens[i],
               " is outside the vocabulary [0, ", V, ")");
}

}  // namespace

const float* Decoder::extend(const int32_t* tokens, int64_t n, Sequence& seq, bool all_logits) {
  KILN_CHECK(n > 0, "forward needs at least one token");
  check_tokens(tokens, n, c_.vocab_size);
  const int64_t end = seq.length + n;
  reserve_blocks(seq, end);
  kv_len_ = end;
  d_seq_ = nullptr;

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
    rope_tables(c_.ropes[r], 2 * half, c_.max_position_embeddings, pos.data(), n, cs.data(),
                sn.data());
    d_cos_[r] = static_cast<const float*>(up("cos" + std::to_string(r), cs.data(), cs.size() * 4));
    d_sin_[r] = static_cast<const float*>(up("sin" + std::to_string(r), sn.data(), sn.size() * 4));
  }
  build_forward(d_tok, n, all_logits ? 0 : n - 1, all_logits ? n : 1);
  seq.length = end;
  return static_cast<const float*>(bufs_["logits"].first);
}

const float* Decoder::decode(const int32_t* tokens, Sequence* const* seqs, int64_t B) {
  KILN_CHECK(B > 0, "decode needs at least one sequence");
  if (tokens) check_tokens(tokens, B, c_.vocab_size);
  int64_t Bp = 1;
  while (Bp < B) Bp *= 2;
  // The token buffer: zeros where no token was ever written, so padding rows embed token 0.
  const bool fresh = bufs_["decode_tok"].second < size_t(Bp) * 4;
  KILN_CHECK(tokens || !fresh, "decode: no tokens given and none sampled for this batch");
  auto* d_tok = static_cast<int32_t*>(buf("decode_tok", size_t(Bp) * 4));
  if (tokens || fresh) {
    std::vector<int32_t> t(static_cast<size_t>(Bp), 0);
    if (tokens) std::copy(tokens, tokens + B, t.begin());
    be_.to_device(d_tok, t.data(), t.size() * 4);
  }
  int64_t longest = 0;
  for (int64_t i = 0; i < B; ++i) {
    for (int64_t j = 0; j < i; ++j)
      KILN_CHECK(seqs[j] != seqs[i], "decode: a sequence appears twice in one step");
    reserve_blocks(*seqs[i], seqs[i]->length + 1);
    longest = std::max(longest, seqs[i]->length + 1);
  }
  // Attention sizes its split over keys from the cache length; a captured graph keeps the
  // length it saw, so steps share graphs per power-of-two bucket of it (an upper bound is
  // enough for attention), and eager steps use the same bucket so both give the same results.
  int64_t bucket = 32;
  while (bucket < longest) bucket *= 2;
  kv_len_ = std::min(bucket, max_seq_len_);

  // All other inputs in one staging buffer and one copy: positions, sequence rows, block
  // tables [Bp, bt_stride], then per rope cos and sin [Bp, half]. Padding rows: position 0 of
  // the reserved block 0 (a zero table row).
  std::vector<size_t> halves;
  size_t words = size_t(2 * Bp + Bp * bt_stride_);
  for (size_t r = 0; r < c_.ropes.size(); ++r) {
    const int64_t half = c_.ropes[r].type == RopeType::None ? 0 : c_.rotary_dim(int(r)) / 2;
    halves.push_back(size_t(half));
    words += 2 * size_t(Bp * half);
  }
  std::vector<int32_t> in(words, 0);
  int32_t* pos = in.data();
  int32_t* seq = pos + Bp;
  int32_t* bt = seq + Bp;
  for (int64_t i = 0; i < Bp; ++i) seq[i] = int32_t(i);
  for (int64_t i = 0; i < B; ++i) {
    pos[i] = int32_t(seqs[i]->length);
    std::copy(seqs[i]->blocks.begin(), seqs[i]->blocks.end(), bt + i * bt_stride_);
  }
  char* dev = static_cast<char*>(buf("decode_in", words * 4));
  size_t off = size_t(2 * Bp + Bp * bt_stride_) * 4;
  d_cos_.assign(c_.ropes.size(), nullptr);
  d_sin_.assign(c_.ropes.size(), nullptr);
  for (size_t r = 0; r < c_.ropes.size(); ++r) {
    const int64_t half = int64_t(halves[r]);
    if (!half) continue;
    auto* cs = reinterpret_cast<float*>(reinterpret_cast<char*>(in.data()) + off);
    auto* sn = cs + Bp * half;
    // Row by row: dynamic rope scaling depends on each sequence's own length.
    for (int64_t i = 0; i < Bp; ++i)
      rope_tables(c_.ropes[r], 2 * half, c_.max_position_embeddings, pos + i, 1, cs + i * half,
                  sn + i * half);
    d_cos_[r] = reinterpret_cast<const float*>(dev + off);
    d_sin_[r] = reinterpret_cast<const float*>(dev + off + size_t(Bp * half) * 4);
    off += 2 * size_t(Bp * half) * 4;
  }
  be_.to_device(dev, in.data(), words * 4);
  d_pos_ = reinterpret_cast<const int32_t*>(dev);
  d_seq_ = d_pos_ + Bp;
  d_blocks_ = d_seq_ + Bp;

  auto run = [&] { build_forward(d_tok, Bp, 0, Bp); };
  if (!graphs_) {
    run();
  } else {
    Graph& g = graphs_by_shape_[{Bp, kv_len_}];
    if (g.g && g.gen == gen_ && g.be_gen == be_.generation()) {
      be_.replay(*g.g);
    } else {
      // First step of this shape (or its buffers moved): run it eagerly, which also sizes every
      // buffer and workspace, then record the same work for the steps that follow.
      g.g.reset();
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
      g.g = be_.capture_end();
      g.gen = gen_;
      g.be_gen = be_.generation();
      ++captures_;
    }
  }
  for (int64_t i = 0; i < B; ++i) seqs[i]->length += 1;
  d_seq_ = nullptr;
  return static_cast<const float*>(bufs_["logits"].first);
}

}  // namespace kiln
