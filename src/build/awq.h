// Activation-aware weight quantization (AWQ, Lin et al. 2023) for `--quant int4-awq`: a few
// input channels of each linear carry much larger activations than the rest, and their weights
// matter most. Scaling those weight columns up by s before int4 rounding (and the inputs down by
// 1 / s, folded into the op that produces them) gives them finer steps. Per linear, s =
// mean|x|^alpha (normalized), with alpha searched on calibration activations for the smallest
// output error against the float weight. kiln's int4-wo kernels then run the scaled weights as
// any other int4-wo engine: the result is an int4-wo engine, nothing new at run time.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "arch/model_config.h"
#include "build/checkpoint.h"

namespace kiln {

// What calibration saw at one linear's input: the sum of |x| per input channel over `rows` rows,
// and a sample of whole rows (sample_rows of them, [sample_rows, in]) to measure output error on.
struct ActStats {
  std::vector<double> abs_sum;
  int64_t rows = 0;
  std::vector<float> sample;
  int64_t sample_rows = 0;
};

// Per engine weight (e.g. "layers.3.wqkv"), the input scale s it is multiplied by.
using AwqScales = std::map<std::string, std::vector<float>>;

// The engine weights whose input scale can be folded exactly into what produces the input, as
// AutoAWQ does for Llama-like blocks: wqkv into attn_norm; w_gate_up (w_up) into ffn_norm; w_down
// into the up rows of w_gate_up (gated MLPs only: an activation lies between otherwise); wo into
// the v rows of wqkv (only when every head has its own KV head, as under GQA a v channel feeds
// several heads' outputs). MoE layers are left alone (the norm also feeds the router and experts).
std::vector<std::string> awq_weights(const ModelConfig& c);

struct AwqChoice {
  std::vector<float> scale;     // [in]
  float alpha = 0;              // mean|x|^alpha; 0: s = 1, plain round-to-nearest
  double err = 0, err_rtn = 0;  // squared output error measured, chosen and at alpha 0
};
// Searches alpha over 0, 1/grid, ..., (grid - 1)/grid for the weight w [out, in] (F32) quantized
// to int4 in groups of `group` (core/quant.h's quantize_int4_row), minimizing the squared error
// of the sample rows' outputs against the float weight's, over up to 512 evenly spaced rows of
// w. Deterministic; OpenMP over rows.
AwqChoice awq_search(const float* w, int64_t out, int64_t in, int64_t group, const ActStats& st,
                     int grid = 20);

// Rewrites a weight plan (every tensor of engine_layout(c), the weights int4 will quantize planned
// in F32) so that each weight in `s` has its columns multiplied by s and what produces its input
// divided by s (see awq_weights), before quantize_plan rounds it. In exact arithmetic the network
// computes the same function. Throws kiln::Error for a weight AWQ cannot fold or a bad scale.
WeightPlan apply_awq(WeightPlan plan, const ModelConfig& c, const AwqScales& s);

}  // namespace kiln
