// Tensor and pipeline parallelism inside one process: the CPU emulation of a multi-GPU node,
// which tests sharding on every commit and runs `kiln run --tp N --pp M --device cpu`.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "graph/decoder.h"

namespace kiln {

using WeightsOf = std::function<std::vector<std::pair<std::string, Tensor>>(const Shard&)>;

// A model sharded over tp x pp ranks that are threads of this process, each with its own CPU
// backend, weights (shard_weights), KV cache and decoder, talking through a ThreadWorld. Every
// step runs on every rank at once. Pipeline stages take a batch as micro-batches (up to pp of
// them, by sequence), so stage s works on one while stage s + 1 works on the one before. A rank
// that fails fails the step on every rank, with its error. Each rank keeps one thread (and its
// OpenMP team) for the executor's life: a step wakes them rather than starting threads.
class ThreadRanks final : public Executor {
 public:
  // `weights_of(shard)`: the host weights a rank holds (shard_weights of the engine's, or its
  // file's of a sharded engine). The KV caches get num_blocks blocks each, with the same block
  // ids on every rank.
  ThreadRanks(const ModelConfig& c, const WeightsOf& weights_of, int tp, int pp, int64_t num_blocks,
              int64_t block_size, bool kv_fp8, int64_t max_seq_len);
  ~ThreadRanks() override;

  // Rank 0's cache: the one blocks are taken from (the others mirror its block ids).
  KVCache& cache();
  // Host memory, like every rank's.
  const float* forward(const Batch& b, bool tokens_on_device = false) override;
  void prepare(int64_t max_tokens, int64_t max_seqs, int64_t max_logit_rows) override;
  int32_t* token_buffer() override { return tokens_.data(); }
  void set_graphs(bool) override {}
  bool graphs() const override { return false; }
  int64_t graphs_captured() const override { return 0; }
  // Bytes of weights the ranks hold, all together.
  int64_t weight_bytes() const;

 private:
  struct Rank;
  class Threads;
  void on_all(const std::function<void(Rank&)>& f);

  ModelConfig config_;
  std::unique_ptr<ThreadWorld> world_;
  std::vector<std::unique_ptr<Rank>> ranks_;
  std::vector<int32_t> tokens_;
  int threads_per_rank_ = 1;
  std::vector<float> logits_;
  std::unique_ptr<Threads> threads_;  // last: stopped and joined before the ranks go
};

// Splits a batch into at most `parts` batches of whole sequences, in order (decodes stay first
// in each); their logit rows are renumbered within each.
std::vector<Batch> split_batch(const Batch& b, int64_t parts);

}  // namespace kiln
