// Build-time weight quantization: rewrites a weight plan so that the weights a scheme quantizes
// stream to the engine file as their storage type plus scales, a chunk of rows at a time (memory
// stays bounded whatever the model size).
#pragma once

#include <vector>

#include "build/checkpoint.h"
#include "graph/layout.h"

namespace kiln {

// `plan` holds every tensor of engine_layout(c) (no scales), with the weights that `layout`
// (engine_layout(c, q)) marks quantized planned in F32. Returns the plan of `layout`: each such
// weight replaced by its codes followed by "<name>.scale" (and "<name>.zero" for int4-wo). A
// non-finite value in a weight is an error naming the tensor and row.
WeightPlan quantize_plan(WeightPlan plan, const std::vector<WeightSpec>& layout);

// Moves each "<name>.scale" / "<name>.zero" / "<name>.perm" tensor of `w` into the `scales` /
// `zero_points` / `input_perm` of the weight <name> (which must be in `w`) and marks it quantized
// with q, so that a quantized weight travels as one Tensor from here on.
std::vector<std::pair<std::string, Tensor>> attach_scales(
    std::vector<std::pair<std::string, Tensor>> w, WeightQuant q);

}  // namespace kiln
