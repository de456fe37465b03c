#include "runtime/kv_cache.h"

#include "core/error.h"

namespace kiln {

KVCache::KVCache(Backend& be, const ModelConfig& c, int64_t num_blocks, int64_t block_size,
                 bool fp8, std::pair<int64_t, int64_t> layers)
    : be_(be),
      num_blocks_(num_blocks),
      block_size_(block_size),
      kv_dim_(c.kv_dim()),
      fp8_(fp8),
      shared_(c.knobs.mla) {
  KILN_CHECK(num_blocks >= 2, "KV cache needs at least 2 blocks (got ", num_blocks, ")");
  const size_t slots = size_t(num_blocks * block_size);
  const size_t bytes = slots * size_t(kv_dim_) * (fp8 ? 1 : dtype_size(be.act_dtype()));
  const int64_t last = layers.second < 0 ? c.num_layers : layers.second;
  KILN_CHECK(layers.first >= 0 && layers.first < last && last <= c.num_layers, "KV cache layers [",
             layers.first, ", ", last, ") of ", c.num_layers);
  const size_t L = size_t(c.num_layers);
  k_.assign(L, nullptr);
  if (!shared_) v_.assign(L, nullptr);
  if (fp8) {
    ks_.assign(L, nullptr);
    if (!shared_) vs_.assign(L, nullptr);
  }
  for (size_t l = size_t(layers.first); l < size_t(last); ++l) {
    k_[l] = be.alloc(bytes);
    if (!shared_) v_[l] = be.alloc(bytes);
    if (fp8) {
      ks_[l] = static_cast<float*>(be.alloc(slots * size_t(c.num_kv_heads) * 4));
      if (!shared_) vs_[l] = static_cast<float*>(be.alloc(slots * size_t(c.num_kv_heads) * 4));
    }
  }
  for (int64_t b = num_blocks - 1; b >= 1; --b) free_.push_back(int32_t(b));
}

KVCache::~KVCache() {
  for (void* p : k_)
    if (p) be_.release(p);
  for (void* p : v_)
    if (p) be_.release(p);
  for (float* p : ks_)
    if (p) be_.release(p);
  for (float* p : vs_)
    if (p) be_.release(p);
}

size_t KVCache::block_bytes(const ModelConfig& c, int64_t block_size, DType act, bool fp8,
                            int64_t num_layers) {
  const size_t per_token =
      fp8 ? size_t(c.kv_dim()) + 4 * size_t(c.num_kv_heads) : size_t(c.kv_dim()) * dtype_size(act);
  const int64_t L = num_layers < 0 ? c.num_layers : num_layers;
  return size_t((c.knobs.mla ? 1 : 2) * L * block_size) * per_token;
}

std::vector<int32_t> KVCache::take(int64_t n) {
  if (n > int64_t(free_.size()))
    throw Error(cat("KV cache full: need ", n, " more blocks of ", block_size_, " tokens but ",
                    free_.size(), " of ", num_blocks_ - 1, " are free (the cache holds ",
                    (num_blocks_ - 1) * block_size_,
                    " tokens; raise --kv-cache-fraction or run fewer or shorter sequences)"));
  std::vector<int32_t> r(free_.end() - n, free_.end());
  free_.resize(free_.size() - size_t(n));
  return r;
}

void KVCache::give_back(const std::vector<int32_t>& blocks) {
  free_.insert(free_.end(), blocks.begin(), blocks.end());
}

}  // namespace kiln
