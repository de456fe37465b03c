#include "runtime/block_manager.h"

#include <algorithm>

#include "core/error.h"

namespace kiln {

BlockManager::BlockManager(KVCache& cache, bool caching)
    : cache_(cache), caching_(caching), bs_(cache.block_size()) {
  owned_ = cache.take(cache.free_blocks());
  meta_.resize(size_t(cache.num_blocks()));
  // Lowest ids handed out first (free_ is popped from the back).
  free_ = owned_;
  std::sort(free_.begin(), free_.end(), std::greater<>());
}

BlockManager::~BlockManager() {
  cache_.give_back(owned_);
}

uint64_t BlockManager::chain(uint64_t parent, std::span<const int32_t> toks) {
  // FNV-1a over the parent hash and the tokens, then a splitmix finaliser.
  uint64_t h = 0xcbf29ce484222325ull ^ parent;
  for (int32_t t : toks) {
    h ^= uint32_t(t);
    h *= 0x100000001b3ull;
  }
  h ^= h >> 31;
  h *= 0x94D049BB133111EBull;
  h ^= h >> 29;
  return h;
}

int64_t BlockManager::match(std::span<const int32_t> tokens, int64_t max_tokens,
                            std::vector<int32_t>& blocks, Chain& out) {
  KILN_CHECK(blocks.empty(), "prefix match into a non-empty block table");
  out = Chain{};
  if (!caching_) return 0;
  uint64_t h = 0;
  int64_t covered = 0;
  while (covered + bs_ <= std::min<int64_t>(max_tokens, int64_t(tokens.size()))) {
    const auto toks = tokens.subspan(size_t(covered), size_t(bs_));
    h = BlockManager::chain(h, toks);
    auto it = by_hash_.find(h);
    if (it == by_hash_.end()) break;
    Meta& m = meta(it->second);
    if (!std::equal(toks.begin(), toks.end(), m.tokens.begin(), m.tokens.end())) break;
    if (m.ref++ == 0) lru_.erase(m.lru);
    blocks.push_back(it->second);
    covered += bs_;
    out.blocks += 1;
    out.hash = h;
  }
  return covered;
}

void BlockManager::unhash(int32_t b) {
  Meta& m = meta(b);
  if (!m.hashed) return;
  auto it = by_hash_.find(m.hash);
  if (it != by_hash_.end() && it->second == b) by_hash_.erase(it);
  m.hashed = false;
  m.tokens.clear();
}

bool BlockManager::allocate(int64_t n, std::vector<int32_t>& blocks) {
  if (n <= 0) return true;
  if (n > available()) return false;
  for (int64_t i = 0; i < n; ++i) {
    int32_t b;
    if (!free_.empty()) {
      b = free_.back();
      free_.pop_back();
    } else {
      b = lru_.front();  // the least recently used cached block loses its content
      lru_.pop_front();
      unhash(b);
    }
    meta(b).ref = 1;
    blocks.push_back(b);
  }
  return true;
}

void BlockManager::release(std::vector<int32_t>& blocks) {
  for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) {
    Meta& m = meta(*it);
    KILN_CHECK(m.ref > 0, "KV block ", *it, " released more often than taken");
    if (--m.ref > 0) continue;
    if (m.hashed) {
      // Released from the sequence's end: its later blocks are evicted before its earlier ones.
      m.lru = lru_.insert(lru_.end(), *it);
    } else {
      free_.push_back(*it);
    }
  }
  blocks.clear();
}

void BlockManager::register_full(std::span<const int32_t> tokens, int64_t computed,
                                 const std::vector<int32_t>& blocks, Chain& c) {
  if (!caching_) return;
  const int64_t full = std::min<int64_t>(computed / bs_, int64_t(blocks.size()));
  uint64_t h = c.hash;
  for (int64_t i = c.blocks; i < full; ++i) {
    const auto toks = tokens.subspan(size_t(i * bs_), size_t(bs_));
    h = BlockManager::chain(h, toks);
    Meta& m = meta(blocks[size_t(i)]);
    if (!m.hashed && !by_hash_.count(h)) {
      m.hashed = true;
      m.hash = h;
      m.tokens.assign(toks.begin(), toks.end());
      by_hash_[h] = blocks[size_t(i)];
    }
  }
  if (full > c.blocks) c = Chain{full, h};
}

}  // namespace kiln
