// The weights the shared decoder builder reads, as a function of the model config: names, shapes
// and whether a tensor is a matrix (stored in the engine dtype) or a vector (always F32).
#pragma once

#include <string>
#include <vector>

#include "arch/model_config.h"
#include "core/tensor.h"

namespace kiln {

struct WeightSpec {
  std::string name;
  Shape shape;
  bool matrix;
};

// Engine (runtime) layout: fused wqkv and w_gate_up, in the order they are stored.
std::vector<WeightSpec> engine_layout(const ModelConfig& c);

// Shape a checkpoint's source tensor must have, for canonical source names such as
// "layers.3.wq" or "layers.0.experts.2.w_gate"; empty if the builder has no use for it.
Shape source_shape(const ModelConfig& c, const std::string& canonical);

}  // namespace kiln
