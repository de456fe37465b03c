// The one shared decoder graph. Every architecture runs through these builders; what differs
// between families is only ModelConfig (knobs and hyper-parameters), never a branch on a name.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "arch/model_config.h"
#include "graph/backend.h"
#include "runtime/kv_cache.h"

namespace kiln {

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

class Decoder {
 public:
  // `cache` holds every sequence's K/V; its block 0 is reserved as the target of padding rows.
  Decoder(Backend& be, const ModelConfig& c, const DeviceWeights& w, KVCache& cache,
          int64_t max_seq_len);
  ~Decoder();
  Decoder(const Decoder&) = delete;
  Decoder& operator=(const Decoder&) = delete;

  // Appends tokens[0..n) to `seq` (positions seq.length ...) and writes their K/V. Returns F32
  // logits in device memory, valid until the next call: [n, vocab] if all_logits, else
  // [1, vocab] for the last token.
  const float* extend(const int32_t* tokens, int64_t n, Sequence& seq, bool all_logits);

  // One decode step of B sequences: tokens[i] is appended to *seqs[i]. Returns F32 logits
  // [B, vocab] in device memory, valid until the next call. The batch is padded to a power of
  // two (padding rows write only the reserved block) and, on backends with graphs, replayed
  // from a graph captured per (padded batch, cache-length bucket). tokens == nullptr: the step's
  // tokens are already in token_buffer() (sampled there by the previous step of the same
  // sequences, in the same order), so the step can be queued before they are read back.
  const float* decode(const int32_t* tokens, Sequence* const* seqs, int64_t B);
  // Device buffer the decode step reads its tokens from ([padded batch] int32, valid for the
  // batch size of the last decode()).
  int32_t* token_buffer() { return static_cast<int32_t*>(bufs_["decode_tok"].first); }

  // Graphs on (default when the backend has them) or off (every step issued eagerly).
  void set_graphs(bool on) { graphs_ = on && be_.graphs(); }
  bool graphs() const { return graphs_; }
  int64_t graphs_captured() const { return captures_; }

 private:
  struct Graph {
    std::unique_ptr<Backend::Graph> g;
    uint64_t be_gen = 0, gen = 0;
  };
  void build_norm(const std::string& name, const void* x, int64_t n, void* y,
                  bool residual_in = false);
  void build_attn(int64_t l, int64_t n);
  void build_ffn(int64_t l, int64_t n);
  void build_moe_ffn(int64_t l, int64_t n);
  // The whole network over n rows whose inputs are in place; logits of `rows` rows from row
  // `first` go to the "logits" buffer.
  void build_forward(const int32_t* d_tok, int64_t n, int64_t first, int64_t rows);
  void* buf(const std::string& name, size_t bytes);
  void* at(void* p, int64_t elems) const;
  void reserve_blocks(Sequence& seq, int64_t end);

  Backend& be_;
  const ModelConfig& c_;
  const DeviceWeights& w_;
  KVCache& cache_;
  int64_t max_seq_len_, bt_stride_;
  bool graphs_;
  std::map<std::string, std::pair<void*, size_t>> bufs_;
  uint64_t gen_ = 0;  // bumped when a buffer moves: graphs of older generations are stale
  std::map<std::pair<int64_t, int64_t>, Graph> graphs_by_shape_;
  int64_t captures_ = 0;
  // Per-forward device-side inputs.
  const int32_t* d_pos_ = nullptr;
  const int32_t* d_blocks_ = nullptr;
  const int32_t* d_seq_ = nullptr;
  int64_t kv_len_ = 0;  // the cache length attention may see (an upper bound for decode)
  std::vector<const float*> d_cos_, d_sin_;
};

}  // namespace kiln
