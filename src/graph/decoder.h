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
  DeviceWeights(Backend& be, const std::vector<std::pair<std::string, Tensor>>& host);
  const Tensor& at(const std::string& name) const;
  const Tensor* find(const std::string& name) const;

 private:
  std::map<std::string, Tensor> t_;
};

class Decoder {
 public:
  Decoder(Backend& be, const ModelConfig& c, const DeviceWeights& w);
  ~Decoder();
  Decoder(const Decoder&) = delete;
  Decoder& operator=(const Decoder&) = delete;

  // Appends tokens[0..n) to `seq` (positions seq.length ...), writes their K/V into `cache` and
  // returns F32 logits on the host: [n, vocab] if all_logits, else [1, vocab] for the last token.
  std::vector<float> forward(const int32_t* tokens, int64_t n, Sequence& seq, KVCache& cache,
                             bool all_logits);

 private:
  struct Layer;
  void build_norm(const std::string& name, const void* x, int64_t n, void* y);
  void build_attn(int64_t l, int64_t n, KVCache& cache);
  void build_ffn(int64_t l, int64_t n);
  void build_moe_ffn(int64_t l, int64_t n);
  void* buf(const std::string& name, size_t bytes);
  void* at(void* p, int64_t elems) const;

  Backend& be_;
  const ModelConfig& c_;
  const DeviceWeights& w_;
  std::map<std::string, std::pair<void*, size_t>> bufs_;
  // Per-forward device-side inputs.
  const int32_t* d_pos_ = nullptr;
  const int32_t* d_blocks_ = nullptr;
  int64_t kv_len_ = 0;  // seq.length after this forward
  std::vector<const float*> d_cos_, d_sin_;
};

}  // namespace kiln
