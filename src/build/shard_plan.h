// Per-rank weight plans (kiln build --tp / --pp): each rank's slices of a weight plan, streamed
// from the same source rows, so a sharded build needs no more memory than a whole one.
#pragma once

#include "build/checkpoint.h"
#include "graph/shard.h"

namespace kiln {

// The plan of rank s's engine file from `plan` (the whole engine layout of engine_layout(c, q),
// scale slots included): its stage's tensors in layout order, each sliced as
// sharded_layout says. Rows are filled from the source plan's rows; a split by input features
// fills whole source rows and keeps the rank's columns.
WeightPlan shard_plan(const WeightPlan& plan, const ModelConfig& c, const QuantScheme& q,
                      const Shard& s);

}  // namespace kiln
