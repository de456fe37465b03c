// MLA's absorbed projections (Knobs::mla), made at build from the checkpoint's kv_b_proj.
#pragma once

#include <array>
#include <memory>
#include <string>

#include "arch/model_config.h"
#include "build/checkpoint.h"

namespace kiln {

// MLA's absorbed per-head matrices (Knobs::mla), made at build from kv_b_proj
// ([heads][nope + v rows][kv_lora_rank], block-FP8 dequantized as read):
//   w_q_absorb [heads * D, nope + rope], D = rope + kv_lora_rank: maps a head's query
//     [nope | rope] to [rope (de-interleaved when rope_interleaved) | W_UK^T nope];
//   w_o_absorb [heads * v, D]: maps a head's attention output [. rope | latent] to W_UV latent.
// `hf` is kv_b_proj in `wset`; `block_scale` its weight_scale_inv when it is block-wise FP8
// (blocks of `block` rows x cols), else empty. `name` is the engine tensor (its last part says
// which of the two), `dt` its dtype.
PlannedTensor plan_absorbed(const ModelConfig& c, const std::shared_ptr<WeightSet>& wset,
                            const std::string& hf, const std::string& block_scale,
                            std::array<int64_t, 2> block, const std::string& name, DType dt);

}  // namespace kiln
