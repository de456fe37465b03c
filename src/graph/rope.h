// Rotary position embedding tables for every rope variant of the architecture tables.
#pragma once

#include <cstdint>
#include <vector>

#include "arch/model_config.h"

namespace kiln {

// Inverse frequencies [rot_dim / 2] and the attention factor that scales cos/sin, following
// transformers' rope initialisers. `seq_len` is the longest position + 1 the current forward
// sees (only dynamic NTK and longrope depend on it).
std::vector<double> rope_inv_freq(const RopeConfig& r, int64_t rot_dim, int64_t max_pos,
                                  int64_t seq_len, double* attention_factor);

// cos/sin [n, rot_dim / 2] for positions pos[0..n).
void rope_tables(const RopeConfig& r, int64_t rot_dim, int64_t max_pos, const int32_t* pos,
                 int64_t n, float* cos, float* sin);

}  // namespace kiln
