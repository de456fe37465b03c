// Paged KV cache: per layer, pools of fixed-size blocks for K and V on the backend's device;
// each sequence owns a block table. Running out of blocks is a kiln::Error, never a crash.
// Block 0 is never handed out: padding rows of a batched step write there.
// Elements are the backend's activation dtype, or with fp8 E4M3 codes plus one F32 scale per
// (token, KV head) in pools of their own (KVLayerView): 1 + 4 / head_dim bytes an element.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "arch/model_config.h"
#include "graph/backend.h"

namespace kiln {

class KVCache {
 public:
  // `layers`: the pipeline stage's layers [first, last) that get pools (last < 0: all); the
  // others' pools are null.
  KVCache(Backend& be, const ModelConfig& c, int64_t num_blocks, int64_t block_size = 16,
          bool fp8 = false, std::pair<int64_t, int64_t> layers = {0, -1});
  ~KVCache();
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;

  int64_t block_size() const { return block_size_; }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t free_blocks() const { return int64_t(free_.size()); }
  int64_t capacity_tokens() const { return (num_blocks_ - 1) * block_size_; }
  // Bytes of one block across all layers, K and V (and their scales with fp8).
  // num_layers < 0: all of c's.
  static size_t block_bytes(const ModelConfig& c, int64_t block_size, DType act, bool fp8 = false,
                            int64_t num_layers = -1);
  void* k_pool(int64_t layer) const { return k_[size_t(layer)]; }
  // MLA (Knobs::mla): one pool per layer, the latent rows, which V reads too.
  void* v_pool(int64_t layer) const { return (shared_ ? k_ : v_)[size_t(layer)]; }
  // FP8 scale pools [num_blocks * block_size][num_kv_heads]; nullptr without fp8.
  float* k_scales(int64_t layer) const { return fp8_ ? ks_[size_t(layer)] : nullptr; }
  float* v_scales(int64_t layer) const {
    return fp8_ ? (shared_ ? ks_ : vs_)[size_t(layer)] : nullptr;
  }
  bool fp8() const { return fp8_; }
  int64_t kv_dim() const { return kv_dim_; }

  // Takes and returns blocks; take() throws kiln::Error when the pool is exhausted.
  std::vector<int32_t> take(int64_t n);
  void give_back(const std::vector<int32_t>& blocks);

 private:
  Backend& be_;
  int64_t num_blocks_, block_size_, kv_dim_;
  bool fp8_;
  bool shared_;  // V reads K's pool (MLA)
  std::vector<void*> k_, v_;
  std::vector<float*> ks_, vs_;
  std::vector<int32_t> free_;
};

// One sequence's place in the cache.
struct Sequence {
  std::vector<int32_t> blocks;
  int64_t length = 0;
};

}  // namespace kiln
