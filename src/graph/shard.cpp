#include "graph/shard.h"

#include <cstring>
#include <map>

#include "core/error.h"
#include "graph/layout.h"

namespace kiln {

void check_shardable(const ModelConfig& c, int tp, int pp) {
  KILN_CHECK(tp >= 1 && tp <= 256, "--tp ", tp, " must be between 1 and 256");
  KILN_CHECK(pp >= 1 && pp <= 256, "--pp ", pp, " must be between 1 and 256");
  KILN_CHECK(c.num_layers >= pp, "--pp ", pp, ": the model has only ", c.num_layers, " layers");
  if (tp == 1) return;
  KILN_CHECK(c.num_heads % tp == 0, "--tp ", tp, ": num_attention_heads ", c.num_heads,
             " does not divide over ", tp, " ranks");
  const int64_t kv = c.num_kv_heads;
  KILN_CHECK(kv % tp == 0 || tp % kv == 0, "--tp ", tp, ": num_key_value_heads ", kv,
             " neither divides over ", tp, " ranks nor replicates evenly on them");
  bool dense = false, moe = false;
  for (const LayerConfig& l : c.layers) (l.moe ? moe : dense) = true;
  KILN_CHECK(!dense || c.intermediate_size % tp == 0, "--tp ", tp, ": intermediate_size ",
             c.intermediate_size, " does not divide over ", tp, " ranks");
  KILN_CHECK(!moe || c.moe_intermediate_size % tp == 0, "--tp ", tp, ": moe_intermediate_size ",
             c.moe_intermediate_size, " does not divide over ", tp, " ranks");
  KILN_CHECK(!moe || !c.knobs.shared_expert || c.shared_expert_intermediate_size % tp == 0, "--tp ",
             tp, ": shared_expert_intermediate_size ", c.shared_expert_intermediate_size,
             " does not divide over ", tp, " ranks");
}

ModelConfig rank_config(const ModelConfig& c, const Shard& s) {
  ModelConfig r = c;
  const int64_t tp = s.tp;
  r.num_heads = c.num_heads / tp;
  r.num_kv_heads = c.num_kv_heads >= tp ? c.num_kv_heads / tp : 1;
  r.intermediate_size = c.intermediate_size / tp;
  r.moe_intermediate_size = c.moe_intermediate_size / tp;
  r.shared_expert_intermediate_size = c.shared_expert_intermediate_size / tp;
  return r;
}

std::pair<int64_t, int64_t> stage_layers(const ModelConfig& c, const Shard& s) {
  return {c.num_layers * s.pp_rank / s.pp, c.num_layers * (s.pp_rank + 1) / s.pp};
}

int64_t vocab_slice(int64_t vocab, int tp) {
  return (vocab + tp - 1) / tp;
}

namespace {

struct Range {
  int64_t start, len;
};

// What rank r takes along a split axis of `extent` elements: ranges, and the slice's length
// (more than the ranges cover where the vocabulary is padded).
std::vector<Range> pick(const TpSplit& sp, int64_t extent, int r, int tp, int64_t& total,
                        const std::string& name) {
  std::vector<Range> out;
  int64_t off = 0;
  total = 0;
  for (const TpSplit::Part& p : sp.parts) {
    if (sp.pad) {
      const int64_t per = (p.units + tp - 1) / tp;
      const int64_t a = std::min<int64_t>(r * per, p.units), b = std::min(a + per, p.units);
      if (b > a) out.push_back({off + a * p.unit, (b - a) * p.unit});
      total += per * p.unit;
    } else if (p.units >= tp) {
      KILN_CHECK(p.units % tp == 0, name, ": ", p.units, " units do not divide over ", tp,
                 " ranks");
      out.push_back({off + r * (p.units / tp) * p.unit, p.units / tp * p.unit});
      total += p.units / tp * p.unit;
    } else {
      KILN_CHECK(tp % p.units == 0, name, ": ", p.units, " units do not replicate evenly on ", tp,
                 " ranks");
      out.push_back({off + int64_t(r) * p.units / tp * p.unit, p.unit});
      total += p.unit;
    }
    off += p.units * p.unit;
  }
  KILN_CHECK(off == extent, name, ": its tensor-parallel split covers ", off, " of ", extent,
             " features");
  return out;
}

// Rows `ranges` of t (a row: everything after dimension 0), padded with zero rows to `total`.
Tensor take_rows(const Tensor& t, const std::vector<Range>& ranges, int64_t total) {
  Shape shape = t.shape;
  shape[0] = total;
  Tensor o = Tensor::zeros(t.dtype, shape);
  const size_t row = t.nbytes() / size_t(t.shape[0]);
  char* dst = static_cast<char*>(o.data);
  for (const Range& r : ranges) {
    std::memcpy(dst, static_cast<const char*>(t.data) + size_t(r.start) * row, size_t(r.len) * row);
    dst += size_t(r.len) * row;
  }
  return o;
}

// Columns of a [rows, cols] tensor, `ranges` given in `extent` input features that its `cols`
// stored columns hold (int4 codes: two a byte; int4 scales: one a group).
Tensor take_cols(const Tensor& t, const std::vector<Range>& ranges, int64_t total, int64_t extent,
                 const std::string& name) {
  KILN_CHECK(t.shape.size() == 2, name, ": splits by input features but is not a matrix");
  const int64_t rows = t.shape[0], cols = t.shape[1];
  auto map = [&](int64_t x) {
    KILN_CHECK(x * cols % extent == 0, name, ": a slice of ", x, " of its ", extent,
               " input features is not whole stored columns (", cols,
               "); int4 groups must divide over the ranks");
    return x * cols / extent;
  };
  const int64_t oc = map(total);
  Tensor o = Tensor::zeros(t.dtype, {rows, oc});
  const size_t es = dtype_size(t.dtype);
  for (int64_t i = 0; i < rows; ++i) {
    char* dst = static_cast<char*>(o.data) + size_t(i * oc) * es;
    for (const Range& r : ranges) {
      const int64_t a = map(r.start), n = map(r.len);
      std::memcpy(dst, static_cast<const char*>(t.data) + size_t(i * cols + a) * es,
                  size_t(n) * es);
      dst += size_t(n) * es;
    }
  }
  return o;
}

// A split by input features keeps whole stored columns: int4 groups (or packed code bytes) of
// in / cols inputs each must not straddle two ranks' slices of `total` inputs.
void check_groups(const std::string& name, int64_t in, int64_t cols, int tp, int64_t total) {
  KILN_CHECK(total * cols % in == 0, name, ": its int4 groups of ", in / std::max<int64_t>(1, cols),
             " inputs do not divide over ", tp, " ranks of ", total,
             " input features; quantize with groups of at most ", total, " or use fewer ranks");
}

Tensor shard_tensor(const Tensor& t, const WeightSpec& spec, const Shard& s) {
  const TpSplit& sp = spec.split;
  if (sp.rank0) return s.tp_rank == 0 ? t : Tensor::zeros(t.dtype, t.shape);
  if (sp.axis == TpSplit::Axis::None || s.tp == 1) return t;
  int64_t total = 0;
  if (sp.axis == TpSplit::Axis::Rows) {
    const auto ranges = pick(sp, t.shape[0], s.tp_rank, s.tp, total, spec.name);
    Tensor o = take_rows(t, ranges, total);
    o.quant = t.quant;
    if (t.scales) o.scales = std::make_shared<Tensor>(take_rows(*t.scales, ranges, total));
    if (t.zero_points)
      o.zero_points = std::make_shared<Tensor>(take_rows(*t.zero_points, ranges, total));
    o.input_perm = t.input_perm;
    return o;
  }
  const int64_t in = t.in_features();
  const auto ranges = pick(sp, in, s.tp_rank, s.tp, total, spec.name);
  KILN_CHECK(!t.input_perm, spec.name,
             ": act-order int4 weights (an input order) do not split by input features under "
             "--tp; build it with --tp 1 or from a checkpoint without desc_act");
  if (t.quant == WeightQuant::Int4 && t.scales && t.scales->shape.size() == 2)
    check_groups(spec.name, in, t.scales->shape[1], s.tp, total);
  Tensor o = take_cols(t, ranges, total, in, spec.name);
  o.quant = t.quant;
  if (t.scales)  // per-channel scales stay whole; int4 group scales split with their inputs
    o.scales = t.quant == WeightQuant::Int4
                   ? std::make_shared<Tensor>(take_cols(*t.scales, ranges, total, in, spec.name))
                   : t.scales;
  if (t.zero_points)
    o.zero_points =
        std::make_shared<Tensor>(take_cols(*t.zero_points, ranges, total, in, spec.name));
  return o;
}

}  // namespace

std::vector<std::pair<int64_t, int64_t>> tp_ranges(const TpSplit& split, int64_t extent,
                                                   int tp_rank, int tp, int64_t& total,
                                                   const std::string& name) {
  std::vector<std::pair<int64_t, int64_t>> r;
  for (const Range& x : pick(split, extent, tp_rank, tp, total, name))
    r.push_back({x.start, x.len});
  return r;
}

bool stage_holds(const ModelConfig& c, const std::string& name, const Shard& s) {
  if (name.rfind("layers.", 0) == 0) {
    const auto [first, last] = stage_layers(c, s);
    const int64_t l = std::stoll(name.substr(7));
    return l >= first && l < last;
  }
  const std::string base = name.substr(0, name.find('.'));
  if (base == "embed") return s.first_stage() || (s.last_stage() && c.tie_word_embeddings);
  if (base == "pos_embed") return s.first_stage();
  if (base == "lm_head") return s.last_stage();
  return true;  // final_norm: every stage (a stand-in for norms that read no weight)
}

std::vector<WeightSpec> sharded_layout(const ModelConfig& c, const QuantScheme& q, const Shard& s) {
  check_shardable(c, s.tp, s.pp);
  const auto layout = engine_layout(c, q);
  std::map<std::string, const WeightSpec*> by_name;
  for (const WeightSpec& w : layout) by_name[w.name] = &w;
  std::vector<WeightSpec> out;
  for (const WeightSpec& w : layout) {
    if (!stage_holds(c, w.name, s)) continue;
    WeightSpec r = w;
    const TpSplit& sp = w.split;
    if (sp.axis == TpSplit::Axis::Rows && s.tp > 1) {
      tp_ranges(sp, w.shape[0], s.tp_rank, s.tp, r.shape[0], w.name);
    } else if (sp.axis == TpSplit::Axis::Cols && s.tp > 1) {
      // Input features of the weight (of the weight a scale or zero slot belongs to).
      const size_t dot = w.name.rfind('.');
      const bool slot =
          w.role == WeightRole::Scale || w.role == WeightRole::Zero || w.role == WeightRole::Perm;
      const WeightSpec& parent = slot ? *by_name.at(w.name.substr(0, dot)) : w;
      const int64_t in = parent.quant == WeightQuant::Int4 ? 2 * parent.shape[1] : parent.shape[1];
      KILN_CHECK(w.role != WeightRole::Perm, parent.name,
                 ": act-order int4 weights (an input order) do not split by input features "
                 "under --tp");
      int64_t total = 0;
      tp_ranges(sp, in, s.tp_rank, s.tp, total, w.name);
      check_groups(parent.name, in, w.shape[1], s.tp, total);
      r.shape[1] = total * w.shape[1] / in;
    }
    out.push_back(r);
  }
  return out;
}

std::vector<std::pair<std::string, Tensor>> shard_weights(
    const ModelConfig& c, const std::vector<std::pair<std::string, Tensor>>& full,
    const QuantScheme& q, const Shard& s) {
  check_shardable(c, s.tp, s.pp);
  std::map<std::string, const WeightSpec*> spec;
  const auto layout = engine_layout(c, q);
  for (const WeightSpec& w : layout) spec[w.name] = &w;
  std::vector<std::pair<std::string, Tensor>> out;
  for (const auto& [name, t] : full) {
    auto it = spec.find(name);
    KILN_CHECK(it != spec.end(), "shard: '", name, "' is not in the engine layout");
    if (!stage_holds(c, name, s)) continue;
    out.emplace_back(name, shard_tensor(t, *it->second, s));
  }
  return out;
}

}  // namespace kiln
