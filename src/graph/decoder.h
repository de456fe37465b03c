// The one shared decoder graph. Every architecture runs through these builders; what differs
// between families is only ModelConfig (knobs and hyper-parameters), never a branch on a name.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "arch/model_config.h"
#include "graph/backend.h"
#include "graph/batch.h"
#include "graph/comm.h"
#include "graph/shard.h"
#include "runtime/kv_cache.h"

namespace kiln {

// Runs forward steps over mixed batches: one Decoder, or a model sharded over several ranks
// (runtime/parallel.h). The engine and the scheduler drive either through this.
class Executor {
 public:
  virtual ~Executor() = default;
  // See Decoder::forward: F32 logits [b.logit_rows.size(), vocab] in the driving backend's
  // memory, valid until the next call.
  virtual const float* forward(const Batch& b, bool tokens_on_device = false) = 0;
  virtual void prepare(int64_t max_tokens, int64_t max_seqs, int64_t max_logit_rows) = 0;
  virtual int32_t* token_buffer() = 0;
  virtual void set_graphs(bool on) = 0;
  virtual bool graphs() const = 0;
  virtual int64_t graphs_captured() const = 0;
};

// One rank's place in a tensor- / pipeline-parallel model. The Decoder of such a rank is given
// rank_config(c, shard) and the weights shard_weights() made for it; it all-reduces the partial
// sums of row-parallel products (attention output, FFN), gathers the vocabulary slices of the
// logits and passes the residual stream between stages. Comms are null for a whole model.
struct Parallel {
  Shard shard;
  Comm* tp = nullptr;  // this stage's ranks (size shard.tp): collectives run even when 1 rank
  Comm* pp = nullptr;  // the stages of this tp_rank (size shard.pp, rank pp_rank)
};

// Engine weights resident on a backend, looked up by canonical name.
class DeviceWeights {
 public:
  // `resident`: the host weights made resident (Backend::upload_all), in the same order.
  DeviceWeights(const std::vector<std::pair<std::string, Tensor>>& host,
                std::vector<Tensor> resident);
  const Tensor& at(const std::string& name) const;
  const Tensor* find(const std::string& name) const;

 private:
  std::map<std::string, Tensor> t_;
};

class Decoder final : public Executor {
 public:
  // `cache` holds every sequence's K/V; its block 0 is reserved as the target of padding rows.
  // `par`: this rank's shard (c is then the rank's config, w its weights); a stage that is not
  // the last returns nullptr from forward (its output went to the next stage).
  Decoder(Backend& be, const ModelConfig& c, const DeviceWeights& w, KVCache& cache,
          int64_t max_seq_len, const Parallel& par = {});
  ~Decoder();
  Decoder(const Decoder&) = delete;
  Decoder& operator=(const Decoder&) = delete;

  // One forward over a mixed batch (graph/batch.h): writes the K/V of every new token and
  // returns F32 logits [b.logit_rows.size(), vocab] in device memory, valid until the next call.
  // Block tables must already cover each sequence's positions (the caller allocates blocks).
  // A decode-only batch (every n == 1, every row's logits) of at most max_graph_batch() rows is
  // padded to the next captured size (padding rows write only the reserved block 0) and replayed
  // from its CUDA graph when graphs are on. tokens_on_device: a decode-only batch whose tokens
  // are already in token_buffer() in row order (sampled there by the previous step), so the step
  // can be queued before they are read back; b.tokens is then ignored.
  const float* forward(const Batch& b, bool tokens_on_device = false) override;

  // Sizes every buffer for steps of up to max_tokens rows and max_seqs sequences, then (graphs
  // on) captures the decode graphs of batch sizes 1, 2, 4, ... up to max_seqs, so no buffer
  // grows and nothing is captured while serving. Uses block 0 only.
  // max_logit_rows: the most rows whose logits one step may ask for (>= max_seqs).
  void prepare(int64_t max_tokens, int64_t max_seqs, int64_t max_logit_rows) override;
  int64_t max_graph_batch() const { return graph_sizes_.empty() ? 0 : graph_sizes_.back(); }
  int64_t graph_replays() const { return replays_; }
  int64_t graph_stale() const { return stale_; }

  // Device buffer a decode step reads its tokens from ([padded batch] int32): where the
  // sampler of the previous step writes, for forward(b, true).
  int32_t* token_buffer() override { return static_cast<int32_t*>(buf("decode_tok", 4)); }

  // Graphs on (default when the backend has them) or off (every step issued eagerly).
  void set_graphs(bool on) override { graphs_ = on && be_.graphs(); }
  bool graphs() const override { return graphs_; }
  int64_t graphs_captured() const override { return captures_; }

 private:
  struct Graph {
    std::unique_ptr<Backend::Graph> g;
    uint64_t be_gen = 0, gen = 0;
  };
  void build_norm(const std::string& name, const void* x, int64_t n, void* y,
                  bool residual_in = false);
  void build_attn(int64_t l, int64_t n);
  // FFN of layer l over `in` (activations [n, hidden]) into `out`.
  void build_ffn(int64_t l, int64_t n, const void* in, void* out);
  void build_moe_ffn(int64_t l, int64_t n, const void* in, void* out);
  void build_attn_mla(int64_t l, int64_t n);
  // Tensor parallel: sums a row-parallel product's partial outputs over the stage's ranks.
  void all_reduce(void* x, int64_t count, DType t);
  // Tensor parallel, norms over a whole projection (Knobs::qk_norm_full): gathers the ranks'
  // slices (local_w of each row, rows ld apart; `reps` ranks hold each slice), norms the whole
  // width and keeps this rank's slice.
  void gather_norm(void* x, int64_t n, int64_t ld, int64_t local_w, int reps, const Tensor& w,
                   const Tensor* b);
  // Tensor parallel: the vocabulary slices of every rank's logits into whole rows.
  void gather_logits(const float* part, int64_t rows, float* out);
  const float* logits_out();
  KVLayerView cache_view(int64_t l, int64_t kv_dim, int64_t head_dim) const;
  // residual += delta; y = the norm `name` of the residual ("": none, y = residual in the
  // activation dtype, for models without pre-norms, Knobs::pre_norm).
  void add_in_norm(void* residual, const void* delta, int64_t n, const std::string& name, void* y);
  // The whole network over n rows whose inputs are in place; logits of `rows` rows (from row
  // `first`, or the rows listed at d_rows when given) go to the "logits" buffer.
  void build_forward(const int32_t* d_tok, int64_t n, int64_t first, int64_t rows,
                     const int32_t* d_rows = nullptr);
  void* buf(const std::string& name, size_t bytes);
  void* at(void* p, int64_t elems) const;
  // Host inputs of a step into one staging buffer and one copy: positions, rows' sequences,
  // sequence starts, block tables, logit rows, rope tables.
  void stage_inputs(const Batch& b, int64_t rows, int64_t seqs);

  Backend& be_;
  const ModelConfig& c_;
  Parallel par_;
  int64_t first_layer_, last_layer_;
  const DeviceWeights& w_;
  KVCache& cache_;
  int64_t max_seq_len_, bt_stride_;
  bool graphs_;
  std::map<std::string, std::pair<void*, size_t>> bufs_;
  uint64_t gen_ = 0;  // bumped when a buffer moves: graphs of older generations are stale
  std::map<int64_t, Graph> graphs_by_batch_;
  std::vector<int64_t> graph_sizes_;  // captured batch sizes, ascending
  int64_t captures_ = 0, replays_ = 0, stale_ = 0;
  bool warmup_ = false;  // prepare()'s steps: block 0 stands for every block
  // Per-forward device-side inputs.
  const int32_t* d_pos_ = nullptr;
  const int32_t* d_blocks_ = nullptr;
  const int32_t* d_seq_ = nullptr;
  const int32_t* d_seq_start_ = nullptr;
  const int32_t* d_logit_rows_ = nullptr;
  int64_t num_seqs_ = 0, num_decode_ = 0, max_q_ = 0;
  int64_t kv_len_ = 0;  // the cache length attention may see (an upper bound)
  std::vector<const float*> d_cos_, d_sin_;
  std::vector<int32_t> staging_;
  // Per rope: cos / sin rows by position, for tables that do not depend on the sequence length.
  std::map<size_t, std::pair<std::vector<float>, std::vector<float>>> rope_cache_;
};

}  // namespace kiln
