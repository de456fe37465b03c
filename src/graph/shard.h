// Tensor and pipeline parallelism: which part of the model one rank holds. Ranks are numbered
// rank = pp_rank * tp + tp_rank (TensorRT-LLM's order: the ranks of one pipeline stage are
// neighbours, so a stage's all-reduces stay inside one NVLink domain). A rank holds the layers
// of its stage, and of each of them the slice its TpSplit (graph/layout.h) gives tp_rank.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "arch/model_config.h"
#include "core/quant.h"
#include "core/tensor.h"
#include "graph/layout.h"

namespace kiln {

struct Shard {
  int tp_rank = 0, tp = 1, pp_rank = 0, pp = 1;
  int rank() const { return pp_rank * tp + tp_rank; }
  int world() const { return tp * pp; }
  bool first_stage() const { return pp_rank == 0; }
  bool last_stage() const { return pp_rank == pp - 1; }
  static Shard of(int rank, int tp, int pp) { return {rank % tp, tp, rank / tp, pp}; }
};

// Throws kiln::Error naming the first size that does not divide over tp ranks or pp stages
// (query heads, KV heads, intermediate sizes, layers), or the sizes asked for.
void check_shardable(const ModelConfig& c, int tp, int pp);

// The model as one tensor-parallel rank computes it: query heads, KV heads (at least one: fewer
// KV heads than ranks are replicated) and intermediate sizes divided by tp. The vocabulary stays
// whole (vocab_slice says what a rank holds of it).
ModelConfig rank_config(const ModelConfig& c, const Shard& s);

// Layers [first, last) of the rank's pipeline stage: as even as the count allows.
std::pair<int64_t, int64_t> stage_layers(const ModelConfig& c, const Shard& s);

// Rows of the vocabulary one rank's embedding and LM head hold: ceil(vocab / tp); rank r holds
// tokens [r * slice, (r + 1) * slice), the last rank's tail padded with zero rows.
int64_t vocab_slice(int64_t vocab, int tp);

// What rank `tp_rank` of `tp` takes along a split axis of `extent` elements (rows, or input
// features): {start, length} ranges in order; `total` gets the slice's length, more than the
// ranges cover where the vocabulary is padded. Throws naming `name` when the split does not
// divide.
std::vector<std::pair<int64_t, int64_t>> tp_ranges(const TpSplit& split, int64_t extent,
                                                   int tp_rank, int tp, int64_t& total,
                                                   const std::string& name);

// Whether the rank's pipeline stage holds the weight (engine layout name, scale slots included).
bool stage_holds(const ModelConfig& c, const std::string& name, const Shard& s);

// engine_layout(c, q) as rank `s` holds it: its stage's weights, each with the shape of its
// slice. The weights of a per-rank engine file (kiln build --tp / --pp).
std::vector<WeightSpec> sharded_layout(const ModelConfig& c, const QuantScheme& q, const Shard& s);

// The weights a rank holds, in order, from engine host weights `full` (engine_layout(c, q) order,
// quantized weights carrying their scales and zeros): its stage's layers and tables, each sliced as
// its TpSplit says, scales and zeros with their weight. Throws naming a weight that does not split
// (an int4 weight whose groups do not divide, act-order inputs).
std::vector<std::pair<std::string, Tensor>> shard_weights(
    const ModelConfig& c, const std::vector<std::pair<std::string, Tensor>>& full,
    const QuantScheme& q, const Shard& s);

}  // namespace kiln
