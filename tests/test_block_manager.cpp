// The scheduler's KV block manager: reference counts, prefix matching over whole prefixes,
// least-recently-released eviction, and caching off.
#include "build/checkpoint.h"
#include "runtime/block_manager.h"
#include "test_util.h"

namespace kiln::test {
namespace {

struct Blocks : ::testing::Test {
  std::unique_ptr<Backend> be = make_cpu_backend();
  ModelConfig cfg = open_checkpoint(hf("llama"), false).config;
  KVCache cache{*be, cfg, 9, 4};  // 8 usable blocks of 4 tokens

  static std::vector<int32_t> seq(int32_t from, int n) {
    std::vector<int32_t> t(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) t[size_t(i)] = from + i;
    return t;
  }
};

TEST_F(Blocks, SharedPrefixesAreMatchedAndCounted) {
  BlockManager bm(cache, true);
  EXPECT_EQ(bm.total(), 8);
  const auto a = seq(100, 10);  // two full blocks and a partial one
  std::vector<int32_t> ba;
  ASSERT_TRUE(bm.allocate(3, ba));
  BlockManager::Chain ca;
  bm.register_full(a, 10, ba, ca);
  EXPECT_EQ(ca.blocks, 2);
  // The same first 8 tokens, then others: both full blocks are shared.
  auto b = a;
  b[9] = 7;
  std::vector<int32_t> bb;
  BlockManager::Chain cb;
  EXPECT_EQ(bm.match(b, 9, bb, cb), 8);
  EXPECT_EQ(bb, std::vector<int32_t>(ba.begin(), ba.begin() + 2));
  EXPECT_EQ(bm.used(), 3);  // shared blocks count once
  // A prefix that differs in its first block shares nothing: the hash covers the whole prefix.
  auto c = a;
  c[0] = 1;
  std::vector<int32_t> bc;
  BlockManager::Chain cc;
  EXPECT_EQ(bm.match(c, 9, bc, cc), 0);
  // max_tokens bounds the match (the last token is always computed).
  std::vector<int32_t> bd;
  BlockManager::Chain cd;
  EXPECT_EQ(bm.match(a, 7, bd, cd), 4);
  bm.release(bd);
  bm.release(bb);
  bm.release(ba);
  EXPECT_EQ(bm.used(), 0);
  EXPECT_EQ(bm.available(), 8);
  // Released but cached: still matched.
  std::vector<int32_t> be2;
  BlockManager::Chain ce;
  EXPECT_EQ(bm.match(a, 9, be2, ce), 8);
  bm.release(be2);
}

TEST_F(Blocks, EvictsTheLeastRecentlyReleasedFirst) {
  BlockManager bm(cache, true);
  const auto a = seq(0, 8), b = seq(50, 8);
  std::vector<int32_t> ba, bb;
  BlockManager::Chain ca, cb;
  ASSERT_TRUE(bm.allocate(2, ba));
  ASSERT_TRUE(bm.allocate(2, bb));
  bm.register_full(a, 8, ba, ca);
  bm.register_full(b, 8, bb, cb);
  bm.release(ba);  // a first: evicted first, its last block before its first
  bm.release(bb);
  std::vector<int32_t> fresh;
  ASSERT_TRUE(bm.allocate(5, fresh));  // 4 free blocks, then one cached block of a
  std::vector<int32_t> m;
  BlockManager::Chain cm;
  EXPECT_EQ(bm.match(a, 8, m, cm), 4);  // a's first block survived
  bm.release(m);
  m.clear();
  EXPECT_EQ(bm.match(b, 8, m, cm), 8);  // b untouched
  bm.release(m);
  EXPECT_FALSE(bm.allocate(9, m));  // more than exist: refused, nothing taken
  EXPECT_TRUE(m.empty());
  bm.release(fresh);
}

TEST_F(Blocks, CachingOffSharesNothingAndGivesBlocksBack) {
  {
    BlockManager bm(cache, false);
    const auto a = seq(0, 8);
    std::vector<int32_t> ba;
    BlockManager::Chain ca;
    ASSERT_TRUE(bm.allocate(2, ba));
    bm.register_full(a, 8, ba, ca);
    std::vector<int32_t> m;
    EXPECT_EQ(bm.match(a, 8, m, ca), 0);
    bm.release(ba);
    EXPECT_EQ(cache.free_blocks(), 0);  // the manager holds them all
  }
  EXPECT_EQ(cache.free_blocks(), 8);  // and gives them back when it goes
}

}  // namespace
}  // namespace kiln::test
