// Ranks as processes, one per GPU (or per CPU rank for tests), on one node or many. Rank 0 is
// the process the user runs: it holds the engine, the scheduler and the sampler, sends every
// other rank its shard of the weights and then, each step, the step's batch; every rank runs its
// decoder on it, with collectives through NCCL (GPUs) or the TCP mesh (CPUs). The last stage's
// logits come back to rank 0. A rank whose process ends takes the others down with an error
// naming it.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "graph/decoder.h"
#include "runtime/dist.h"
#include "runtime/parallel.h"

namespace kiln {

struct RankSetup {
  ModelConfig config;  // the whole model
  DType dtype = DType::F32;
  WeightQuant quant = WeightQuant::None;
  int64_t quant_group = 0;
  bool act_order = false, kv_fp8 = false;
  int tp = 1, pp = 1;
  std::string device = "cpu";  // cpu or cuda
  int threads = 0;
  int64_t num_blocks = 0, block_size = 16, max_seq_len = 0;
};

// One rank's pieces: backend, weights, KV cache, comms, decoder.
struct RankState;
class Watchdog;

// Rank 0's executor. `be`: rank 0's backend (the engine's); `weights_of(shard)`: the host
// weights of each rank, which rank 0 sends it. Ranks 1 .. world - 1 are launched on this node from
// `rank_exe` (a kiln binary; "": this executable) unless `launched` says they were started
// already (mpirun), and connect to `env`'s host:port.
class ProcessRanks final : public Executor {
 public:
  // `kv_blocks(free, total)`: the KV cache's blocks (s.num_blocks is ignored), given the memory
  // rank 0 has free once its weights are resident; every rank gets as many.
  ProcessRanks(Backend& be, const RankSetup& s, const WeightsOf& weights_of, const DistEnv& env,
               bool launched, const std::string& rank_exe,
               const std::function<int64_t(size_t free, size_t total)>& kv_blocks);
  ~ProcessRanks() override;
  KVCache& cache();
  const float* forward(const Batch& b, bool tokens_on_device = false) override;
  void prepare(int64_t max_tokens, int64_t max_seqs, int64_t max_logit_rows) override;
  int32_t* token_buffer() override;
  void set_graphs(bool on) override;
  bool graphs() const override;
  int64_t graphs_captured() const override;

 private:
  void command(const std::string& m);
  RankSetup setup_;
  Backend& be_;
  std::vector<int> children_;  // pids of the ranks this process launched
  std::unique_ptr<Mesh> mesh_;
  std::unique_ptr<RankState> me_;
  std::unique_ptr<Watchdog> dog_;  // notices ranks whose process ended
  float* logits_ = nullptr;        // rank 0's device buffer for the last stage's logits (pp > 1)
  size_t logits_bytes_ = 0;
  bool stopped_ = false;
};

// The loop of a rank > 0: connects to rank 0, receives its setup and weights, then runs every
// step rank 0 sends until it says stop (returns) or its connection closes (throws).
void serve_rank(const DistEnv& env);

}  // namespace kiln
