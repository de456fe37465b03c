#include "build/row_transform.h"

#include <algorithm>

#include "core/error.h"

namespace kiln {

namespace {

// The layer index of a canonical "layers.L...." name, else -1.
int64_t layer_of(const std::string& canon) {
  if (canon.rfind("layers.", 0) != 0) return -1;
  return std::stoll(canon.substr(7, canon.find('.', 7) - 7));
}

}  // namespace

RowTransform row_transform(const ModelConfig& c, const std::string& canon, bool qkv_per_head,
                           const std::string& file, bool interleaved_gate_up) {
  RowTransform t;
  const std::string base = canon.substr(canon.rfind('.') + 1);
  if (interleaved_gate_up) {
    KILN_CHECK(base == "w_gate_up" || base == "b_gate_up", file, ": ", canon,
               ": interleaved gate/up order is for a fused gate_up weight or bias");
    const int64_t I = canon.find(".experts.") != std::string::npos ? c.moe_intermediate_size
                      : canon.find(".shared.") != std::string::npos
                          ? c.shared_expert_intermediate_size
                          : c.intermediate_size;
    for (int64_t j = 0; j < 2 * I; ++j) t.perm.push_back(j < I ? 2 * j : 2 * (j - I) + 1);
    return t;
  }
  const bool final_bias = canon == "final_norm.bias" || canon == "lm_head.bias";
  if (c.residual_multiplier != 1 &&
      (base == "wo" || base == "bo" || base == "w_down" || base == "b_down"))
    t.scale = float(c.residual_multiplier);
  if (c.logit_multiplier != 1 && (canon == "final_norm" || final_bias))
    t.scale = float(c.logit_multiplier);
  if (c.knobs.mla && (base == "wkv_a" || base == "bkv_a")) {
    // HF's [latent | k_rope] to the cache row [k_rope | latent], the rope pairs de-interleaved
    // under rope_interleaved (DeepSeek).
    const int64_t R = c.qk_rope_head_dim, L = c.kv_lora_rank;
    for (int64_t j = 0; j < R; ++j)
      t.perm.push_back(L + (!c.knobs.rope_interleaved ? j
                            : j < R / 2               ? 2 * j
                                                      : 2 * (j - R / 2) + 1));
    for (int64_t j = 0; j < L; ++j) t.perm.push_back(j);
    return t;
  }
  const int64_t hd = c.head_dim, qd = c.q_dim(), kvd = c.kv_dim();
  const bool fused = base == "wqkv" || base == "bqkv";
  std::vector<int64_t> qkv;  // kiln row -> source row
  if (qkv_per_head) {
    // Grouped per KV head: [kv heads][g query heads, k, v][hd] with g = heads / kv heads (g = 1:
    // GPT-NeoX's [heads][q, k, v][hd]; Falcon's new decoder architecture).
    KILN_CHECK(fused, file, ": ", canon, ": per-head QKV order is for a fused QKV weight or bias");
    const int64_t g = c.num_heads / c.num_kv_heads, block = (g + 2) * hd;
    for (int64_t e = 0; e < qd + 2 * kvd; ++e) {
      const int64_t d = e % hd;
      if (e < qd) {
        const int64_t h = e / hd;
        qkv.push_back(h / g * block + h % g * hd + d);
      } else {
        const int64_t j = (e - qd) % kvd / hd, part = e < qd + kvd ? g : g + 1;
        qkv.push_back(j * block + part * hd + d);
      }
    }
  }
  std::vector<int64_t> rope;  // engine row -> kiln row
  const bool q_norm = canon.ends_with(".q_norm") || canon.ends_with(".q_norm.bias");
  const bool k_norm = canon.ends_with(".k_norm") || canon.ends_with(".k_norm.bias");
  const bool qk =
      base == "wq" || base == "wk" || base == "bq" || base == "bk" || fused || q_norm || k_norm;
  if (c.knobs.rope_interleaved && qk) {
    const int64_t l = std::max<int64_t>(layer_of(canon), 0);
    const int64_t rot = c.rotary_dim(c.layers[size_t(l)].rope);
    auto heads = [&](int64_t from, int64_t count) {
      for (int64_t h = 0; h < count; ++h)
        for (int64_t j = 0; j < hd; ++j)
          rope[size_t(from + h * hd + j)] = from + h * hd +
                                            (j >= rot      ? j
                                             : j < rot / 2 ? 2 * j
                                                           : 2 * (j - rot / 2) + 1);
    };
    KILN_CHECK(!c.knobs.qk_norm_full, file,
               ": interleaved rope with whole-projection q/k norms "
               "is not supported");
    const bool per_head = c.knobs.qk_norm_per_head;
    const int64_t rows = fused                                                  ? qd + 2 * kvd
                         : base == "wq" || base == "bq" || (q_norm && per_head) ? qd
                         : base == "wk" || base == "bk" || (k_norm && per_head) ? kvd
                                                                                : hd;
    rope.resize(size_t(rows));
    for (int64_t i = 0; i < rows; ++i) rope[size_t(i)] = i;  // v rows stay
    if (fused) {
      heads(0, c.num_heads);
      heads(qd, c.num_kv_heads);
    } else {
      heads(0, rows / hd);
    }
  }
  if (!rope.empty() && !qkv.empty()) {
    for (auto& r : rope) r = qkv[size_t(r)];
    t.perm = std::move(rope);
  } else {
    t.perm = !rope.empty() ? std::move(rope) : std::move(qkv);
  }
  return t;
}

}  // namespace kiln
