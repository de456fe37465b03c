// Build-time transforms of a checkpoint tensor's values on the way into the engine, for
// families whose layout or scalars differ from what the shared graph reads (see row_transform).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "arch/model_config.h"

namespace kiln {

// What the build does to a source tensor's values on the way into the engine (see
// row_transform): rows reordered (row i of the part is source row perm[i]) and values scaled.
struct RowTransform {
  std::vector<int64_t> perm;  // empty: identity
  float scale = 1.0f;
  bool identity() const { return perm.empty() && scale == 1.0f; }
};

// The transform of canonical source `canon` (ModelConfig and Knobs say why each exists):
//  * qkv_per_head (GPT-NeoX): [heads][q, k, v][hd] rows to kiln's [q heads][k heads][v heads];
//  * Knobs::rope_interleaved (Cohere): within each q / k head, rotary pairs (2i, 2i + 1) to
//    (i, i + rot / 2), the order the graph's rope rotates;
//  * ModelConfig::residual_multiplier into what a block adds to the residual (wo, bo, w_down,
//    b_down), ModelConfig::logit_multiplier into the final norm (and the LM head bias).
//  * interleaved_gate_up (GPT-OSS): a fused gate_up's alternating rows (gate 0, up 0, gate 1,
//    ...) to kiln's [gate rows][up rows].
// `qkv_per_head`: the source is a fused QKV grouped per KV head (TensorRule::qkv_per_head);
// `interleaved_gate_up`: TensorRule::interleaved_gate_up. Throws kiln::Error naming `file` for a
// layout it cannot reorder.
RowTransform row_transform(const ModelConfig& c, const std::string& canon, bool qkv_per_head,
                           const std::string& file, bool interleaved_gate_up = false);

}  // namespace kiln
