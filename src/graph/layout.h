// The weights the shared decoder builder reads, as a function of the model config: names, shapes
// and the role each plays. Roles decide storage (matrices in the engine dtype, vectors in F32)
// and which weights a quantization scheme rewrites: build steps read roles, never names.
#pragma once

#include <string>
#include <vector>

#include "arch/model_config.h"
#include "core/quant.h"
#include "core/tensor.h"

namespace kiln {

enum class WeightRole : uint8_t {
  Vector,        // norm weights and biases (F32)
  Embedding,     // token and position tables, read a row at a time
  ColumnLinear,  // y = x W^T whose output features split under tensor parallelism (wqkv, gate_up)
  RowLinear,     // y = x W^T whose input features split (wo, w_down)
  Gate,          // small linears with a handful of outputs (MoE router, shared-expert gate)
  Expert,        // MoE expert matrices, gathered per token by the MoE op
  HeadLinear,    // per-head matrices [heads * out, in] of head_linear (MLA's absorbed projections)
  LmHead,        // the output projection (F32 logits)
  Scale,         // dequantization scales of the quantized weight named before ".scale" (F32)
  Zero,          // int4 zero points of the quantized weight named before ".zero" (U8)
  Perm,          // act-order input order of the int4 weight named before ".perm" (I32)
};

// How a weight divides under tensor parallelism (graph/shard.h): along its rows (output
// features, or a table's entries) or its columns (input features), as consecutive parts that
// each split by whole units. wqkv's rows are three parts: q in heads of head_dim, then k and v
// in KV heads. A part of fewer units than ranks is replicated, rank r taking unit
// r * units / tp (the KV head of its query heads under GQA). The layout says it where it
// declares the weight, beside its role, so sharding reads no names.
struct TpSplit {
  enum class Axis : uint8_t { None, Rows, Cols };
  struct Part {
    int64_t units, unit;
  };
  Axis axis = Axis::None;
  std::vector<Part> parts;
  bool pad = false;    // the vocabulary: ceil(units / tp) a rank, the last padded with zeros
  bool rank0 = false;  // a bias added after a partial sum: rank 0 holds it, the others zeros
};

struct WeightSpec {
  std::string name;
  Shape shape;
  WeightRole role;
  WeightQuant quant = WeightQuant::None;  // how this weight is stored (None: engine dtype / F32)
  TpSplit split = {};                     // None: every rank holds all of it
  bool matrix() const {
    return role != WeightRole::Vector && role != WeightRole::Scale && role != WeightRole::Zero &&
           role != WeightRole::Perm;
  }
  // The tensor's dtype in an engine whose matrices are `engine` dtype.
  DType dtype(DType engine) const {
    if (quant != WeightQuant::None) return quant_storage(quant);
    if (role == WeightRole::Zero) return DType::U8;
    if (role == WeightRole::Perm) return DType::I32;
    return matrix() ? engine : DType::F32;
  }
};

// Whether the FFN reads its own norm, layers.L.ffn_norm (see Knobs::pre_norm, parallel_block).
bool has_ffn_norm(const ModelConfig& c);

// How an engine's weights are quantized: everything engine_layout needs besides the config, as
// the manifest records it. Converts from a bare scheme (default groups, no act order, plain head).
struct QuantScheme {
  WeightQuant q = WeightQuant::None;
  int64_t group = 0;       // int4-wo: a checkpoint's own group size (0: int4_group's rule)
  bool act_order = false;  // int4-wo weights carry an input order (GPTQ desc_act checkpoints)
  // The LM head too (kiln build --quant-lm-head, TensorRT-LLM's --quantize_lm_head): at decode
  // the head is a large share of the bytes left once the linears are quantized (the 8B shape's
  // 1.05 GB of 4.8 under int4-wo). Off by default: its rounding moves logits directly.
  bool lm_head = false;
  QuantScheme() = default;
  QuantScheme(WeightQuant q_, int64_t group_ = 0, bool act_order_ = false, bool lm_head_ = false)
      : q(q_), group(group_), act_order(act_order_), lm_head(lm_head_) {}
};

// Whether scheme s rewrites weights of role r. Weight-only schemes take the dense linears,
// where decode reads almost all of its bytes, and the LM head under s.lm_head; embeddings (read
// a row at a time), routers and experts (the MoE op gathers them in the engine dtype) keep the
// engine dtype.
bool quantizes(const QuantScheme& s, WeightRole r);

// Engine (runtime) layout: fused wqkv and w_gate_up, in the order they are stored. Under a
// quantization scheme, each weight it rewrites has the shape of its stored codes and is followed
// by "<name>.scale" (int8-wo, fp8: [rows]; int4-wo: [rows, groups]) and, for int4-wo,
// "<name>.zero", and under `act_order` (int4-wo from an act-order checkpoint) "<name>.perm" [in].
// Throws kiln::Error when a weight's input size does not suit the scheme (int4-wo: a multiple of
// 32, or of `group` when given: a checkpoint's own group size), naming it.
std::vector<WeightSpec> engine_layout(const ModelConfig& c, const QuantScheme& s = {});

// Shape a checkpoint's source tensor must have, for canonical source names such as
// "layers.3.wq" or "layers.0.experts.2.w_gate"; empty if the builder has no use for it.
Shape source_shape(const ModelConfig& c, const std::string& canonical);

}  // namespace kiln
