// KV blocks for the scheduler: reference-counted blocks with prefix caching. Full blocks are
// identified by a hash chained over every token up to and including them (vLLM's scheme), so a
// block is shared only by sequences whose whole prefix matches; the tokens are kept and compared
// too, so a hash collision can never share a wrong block. Blocks whose last user is gone stay
// cached (evictable, least recently used first) until their space is needed.
#pragma once

#include <cstdint>
#include <list>
#include <span>
#include <unordered_map>
#include <vector>

#include "runtime/kv_cache.h"

namespace kiln {

class BlockManager {
 public:
  // Takes every free block of `cache` (given back on destruction). caching: prefix caching on.
  BlockManager(KVCache& cache, bool caching);
  ~BlockManager();
  BlockManager(const BlockManager&) = delete;
  BlockManager& operator=(const BlockManager&) = delete;

  int64_t block_size() const { return bs_; }
  int64_t total() const { return int64_t(owned_.size()); }
  // Blocks that can be handed out now: free ones and cached ones nobody uses.
  int64_t available() const { return int64_t(free_.size() + lru_.size()); }
  int64_t used() const { return total() - available(); }
  bool caching() const { return caching_; }

  // Where a sequence's registration stands: full blocks registered and the hash chained over
  // them.
  struct Chain {
    int64_t blocks = 0;
    uint64_t hash = 0;
  };
  // The longest run of cached full blocks that starts `tokens` (at most `max_tokens` tokens),
  // each taken (ref + 1); appended to `blocks` (which must be empty). Returns tokens covered;
  // `chain` gets the matched blocks' chain.
  int64_t match(std::span<const int32_t> tokens, int64_t max_tokens, std::vector<int32_t>& blocks,
                Chain& chain);
  // Takes n fresh blocks, evicting cached ones as needed; false (nothing taken) if too few.
  bool allocate(int64_t n, std::vector<int32_t>& blocks);
  // Drops one reference to each block (a cached block with no user becomes evictable, the most
  // recently released last; blocks of a sequence are released from its end so its prefix stays
  // longest).
  void release(std::vector<int32_t>& blocks);
  // Registers the full blocks of a sequence whose tokens [0, computed) are in the cache, from
  // block chain.blocks on (chain updated), so later sequences can share them.
  void register_full(std::span<const int32_t> tokens, int64_t computed,
                     const std::vector<int32_t>& blocks, Chain& chain);

 private:
  struct Meta {
    int32_t ref = 0;
    bool hashed = false;
    uint64_t hash = 0;
    std::vector<int32_t> tokens;       // the block's tokens, when hashed
    std::list<int32_t>::iterator lru;  // position in lru_ while evictable
  };
  static uint64_t chain(uint64_t parent, std::span<const int32_t> toks);
  Meta& meta(int32_t b) { return meta_[size_t(b)]; }
  void unhash(int32_t b);

  KVCache& cache_;
  bool caching_;
  int64_t bs_;
  std::vector<Meta> meta_;     // indexed by block id
  std::vector<int32_t> free_;  // no content anyone can share
  std::list<int32_t> lru_;     // cached, unreferenced: front is evicted first
  std::unordered_map<uint64_t, int32_t> by_hash_;
  std::vector<int32_t> owned_;  // every block taken from the cache
};

}  // namespace kiln
