// Attention of the CUDA backend against the CPU backend: single-sequence prefill and decode,
// batched decode, and mixed batches of decodes and prefill chunks (the scheduler's steps).
// Skips when no GPU is visible (CI); compiles without CUDA.
#include "cuda_ops_fixture.h"

namespace kiln::test {
namespace {

// Block tables of sequences of `lens` tokens: row i at i * stride, each sequence's blocks
// scattered over the pool (block 0 unused: unfilled entries point at it). Returns the table and
// the pool's block count.
std::pair<std::vector<int32_t>, int64_t> scattered_tables(const std::vector<int64_t>& lens,
                                                          int64_t stride, int64_t bs,
                                                          std::mt19937& rng) {
  int64_t nb = 1;
  std::vector<int32_t> table(lens.size() * size_t(stride), 0);
  for (size_t i = 0; i < lens.size(); ++i)
    for (int64_t b = 0; b * bs < lens[i]; ++b)
      table[i * size_t(stride) + size_t(b)] = int32_t(nb++);
  std::vector<int32_t> perm(static_cast<size_t>(nb));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin() + 1, perm.end(), rng);
  for (auto& t : table) t = perm[size_t(t)];
  return {table, nb};
}

struct AttnCase {
  int64_t heads, kv_heads, hd, window;
  float softcap;
  int64_t block_size, cached, n;
  bool tell_len = true;  // KVLayerView::len set (else the backend reads positions back)
  bool fp8 = false;      // FP8 cache (--kv-cache-dtype fp8): E4M3 codes and per-head scales
  bool sinks = false;    // attention sinks (AttnParams::sinks)
};

// Sink logits per head, from well below to well above the scores (|q.k| * scale is ~1 here), so
// some heads barely notice theirs and some give it most of the mass.
std::vector<float> sink_logits(int64_t heads) {
  std::vector<float> s(static_cast<size_t>(heads));
  for (int64_t h = 0; h < heads; ++h) s[size_t(h)] = -4.0f + 9.0f * float(h % 7) / 6.0f;
  return s;
}

class CudaAttention : public CudaOps {
 protected:
  void run(const AttnCase& c) {
    if (c.fp8 && dt == DType::F32) return;  // FP8 caches are for 16-bit engines
    const std::string what =
        cat("attention heads=", c.heads, "/", c.kv_heads, " hd=", c.hd, " window=", c.window,
            " softcap=", c.softcap, " bs=", c.block_size, " cached=", c.cached, " n=", c.n,
            c.fp8 ? " fp8 cache" : "", c.sinks ? " sinks" : "");
    const std::vector<float> sinks = sink_logits(c.heads);
    const float* sinks_gpu = c.sinks ? up_raw(sinks) : nullptr;
    const int64_t T = c.cached + c.n, kvd = c.kv_heads * c.hd, qd = c.heads * c.hd;
    const int64_t need = (T + c.block_size - 1) / c.block_size, nb = need + 3;
    // A scattered block table: the sequence's blocks are not in pool order.
    std::vector<int32_t> perm(static_cast<size_t>(nb));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    std::vector<int32_t> table(perm.begin(), perm.begin() + need);
    const int64_t pool = nb * c.block_size * kvd;
    std::vector<float> kc(size_t(pool), 0.0f), vc(size_t(pool), 0.0f);
    void* kg = up(std::vector<float>(size_t(pool), 0.0f));
    void* vg = up(std::vector<float>(size_t(pool), 0.0f));
    const int32_t* tg = up_raw(table);
    KVLayerView kv_cpu{kc.data(), vc.data(), table.data(), c.block_size, kvd, T};
    KVLayerView kv_gpu{kg, vg, tg, c.block_size, kvd, c.tell_len ? T : 0};
    // FP8: the pools' first bytes hold the codes; scales [slots][kv_heads] beside them.
    const int64_t nscales = nb * c.block_size * c.kv_heads;
    std::vector<float> ksc(size_t(nscales), 0.0f), vsc(size_t(nscales), 0.0f);
    if (c.fp8) {
      kv_cpu.k_scale = ksc.data(), kv_cpu.v_scale = vsc.data(), kv_cpu.head_dim = c.hd;
      kv_gpu.k_scale = up_raw(ksc), kv_gpu.v_scale = up_raw(vsc), kv_gpu.head_dim = c.hd;
    }
    // K/V rows strided like the Decoder's fused qkv buffer.
    const int64_t ldkv = 2 * kvd + 8;
    auto write = [&](int64_t p0, int64_t m) {
      if (m == 0) return;
      auto kv = rnd(size_t(m * ldkv));
      std::vector<int32_t> pos(static_cast<size_t>(m));
      std::iota(pos.begin(), pos.end(), int32_t(p0));
      cpu->kv_write(kv_cpu, kv.data(), kv.data() + kvd, ldkv, pos.data(), m);
      void* kvg = up(kv);
      gpu->kv_write(kv_gpu, kvg, static_cast<char*>(kvg) + kvd * dtype_size(dt), ldkv, up_raw(pos),
                    m);
    };
    write(0, c.cached);
    write(c.cached, c.n);
    // Rows 8 bytes past 16-byte alignment (only the CUDA-core kernel takes them) and 16-byte
    // aligned (the tensor-core kernels' condition in F16 / BF16).
    for (const int64_t pad : {4, 8}) {
      const int64_t ldq = qd + 2 * pad + 4, ldo = qd + pad;
      auto q = rnd(size_t(c.n * ldq));
      std::vector<int32_t> pos(static_cast<size_t>(c.n));
      std::iota(pos.begin(), pos.end(), int32_t(c.cached));
      AttnParams ap{c.heads, c.kv_heads, c.hd, 1.0f / std::sqrt(float(c.hd)), c.softcap, c.window};
      std::vector<float> want(size_t(c.n * ldo), kPoison);
      if (c.sinks) ap.sinks = sinks.data();
      cpu->attention(q.data(), ldq, c.n, pos.data(), kv_cpu, ap, want.data(), ldo);
      void* out = up(std::vector<float>(size_t(c.n * ldo), kPoison));
      ap.sinks = sinks_gpu;
      gpu->attention(up(q), ldq, c.n, up_raw(pos), kv_gpu, ap, out, ldo);
      expect_close(down(out, size_t(c.n * ldo)), ldo, want, ldo, c.n, qd, cat(what, " ldo=", ldo));
    }
    // The cache itself, as attention read it.
    if (c.fp8) {  // the same inputs give the same codes and scales, bit for bit
      const auto bytes = [](const void* p, size_t n) {
        std::vector<uint8_t> r(n);
        std::memcpy(r.data(), p, n);
        return r;
      };
      std::vector<uint8_t> kcodes(static_cast<size_t>(pool)), vcodes(kcodes.size());
      gpu->to_host(kcodes.data(), kg, kcodes.size());
      gpu->to_host(vcodes.data(), vg, vcodes.size());
      EXPECT_EQ(kcodes, bytes(kc.data(), size_t(pool))) << what << ": K codes";
      EXPECT_EQ(vcodes, bytes(vc.data(), size_t(pool))) << what << ": V codes";
      std::vector<float> kg_s(ksc.size()), vg_s(vsc.size());
      gpu->to_host(kg_s.data(), kv_gpu.k_scale, kg_s.size() * 4);
      gpu->to_host(vg_s.data(), kv_gpu.v_scale, vg_s.size() * 4);
      EXPECT_EQ(kg_s, ksc) << what << ": K scales";
      EXPECT_EQ(vg_s, vsc) << what << ": V scales";
      return;
    }
    auto kgot = down(kg, size_t(pool));
    expect_close(kgot, pool, kc, pool, 1, pool, what + " K cache", 0.0);
  }
};

TEST_P(CudaAttention, Prefill) {
  run({4, 4, 16, 0, 0, 16, 0, 17});    // MHA, fixture head size
  run({4, 2, 32, 0, 0, 16, 0, 24});    // GQA 2
  run({16, 2, 64, 0, 0, 16, 0, 33});   // GQA 8
  run({8, 1, 128, 0, 0, 16, 0, 130});  // MQA
  run({32, 8, 128, 0, 0, 16, 0, 300});
  run({8, 2, 256, 0, 0, 16, 0, 70});
  run({8, 8, 80, 0, 0, 4, 0, 19});   // head_dim 80, small blocks
  run({4, 2, 18, 0, 0, 16, 0, 21});  // head_dim not a multiple of 8: scalar K/V loads
  // MLA's latent heads (DeepSeek V2/V3: 512 + 64 over one KV head): prefill, and a long decode
  // (split-K).
  run({16, 1, 576, 0, 0, 16, 0, 20});
  run({16, 1, 576, 0, 0, 16, 300, 1});
}

TEST_P(CudaAttention, WindowAndSoftcap) {
  run({4, 2, 16, 8, 0, 16, 0, 24});
  run({4, 2, 16, 8, 50.0f, 16, 0, 24});
  run({8, 4, 64, 0, 30.0f, 16, 10, 9});
  run({16, 8, 128, 100, 0, 16, 0, 260});
  run({32, 8, 128, 1024, 0, 16, 2000, 1});  // window with split-K
}

TEST_P(CudaAttention, Sinks) {
  AttnCase c{16, 2, 64, 0, 0, 16, 0, 33};  // tensor-core prefill
  c.sinks = true;
  run(c);
  c = {4, 2, 18, 8, 0, 16, 0, 21};  // CUDA cores, window
  c.sinks = true;
  run(c);
  c = {32, 8, 128, 0, 0, 16, 2000, 1};  // one long decode: split-K
  c.sinks = true;
  run(c);
  c = {8, 4, 64, 0, 30.0f, 16, 10, 9};  // soft-cap, few rows
  c.sinks = true;
  run(c);
}

TEST_P(CudaAttention, DecodeAndChunks) {
  run({4, 2, 16, 0, 0, 16, 5, 1});
  run({32, 8, 128, 0, 0, 16, 700, 1});   // split-K
  run({64, 8, 128, 0, 0, 16, 3000, 1});  // many splits
  run({8, 2, 256, 0, 0, 16, 100, 5});    // chunked prefill onto a cache
  run({32, 8, 128, 0, 0, 16, 640, 3});   // a few rows, split-K
  run({14, 2, 64, 0, 0, 16, 500, 1});    // group 7
  AttnCase c{32, 8, 128, 0, 0, 16, 700, 1};
  c.tell_len = false;
  run(c);
}

// FP8 cache: codes and scales equal the CPU's bit for bit; attention over them matches the CPU's
// over the same codes (prefill, decode with split-K, head sizes the tensor-core kernels take and
// one they do not, a window and a soft-cap).
TEST_P(CudaAttention, Fp8Cache) {
  for (AttnCase c :
       {AttnCase{4, 2, 32, 0, 0, 16, 0, 24}, AttnCase{32, 8, 128, 0, 0, 16, 0, 300},
        AttnCase{8, 2, 256, 0, 0, 16, 0, 70}, AttnCase{4, 2, 18, 0, 0, 16, 0, 21},
        AttnCase{4, 2, 16, 8, 50.0f, 16, 0, 24}, AttnCase{32, 8, 128, 0, 0, 16, 700, 1},
        AttnCase{14, 2, 64, 0, 0, 16, 500, 1}, AttnCase{8, 8, 80, 0, 0, 4, 90, 3},
        AttnCase{32, 8, 128, 1024, 0, 16, 2000, 1}}) {
    c.fp8 = true;
    run(c);
  }
}

// Batched decode: one token of each of several sequences, each with its own row of a block-table
// matrix, at different lengths (one past a window, one long enough for split-K); GQA groups that
// fill a block partly, exactly and over several blocks.
TEST_P(CudaAttention, BatchedSequences) {
  struct G {
    int64_t heads, kv_heads, hd, window;
  };
  for (const G g :
       {G{32, 8, 128, 0}, G{16, 1, 64, 0}, G{8, 8, 64, 0}, G{40, 2, 64, 0}, G{8, 2, 128, 24}}) {
    const std::vector<int64_t> lens = {1, 37, 700, 5, 64, 129};
    const int64_t B = int64_t(lens.size()), bs = 16, kvd = g.kv_heads * g.hd, qd = g.heads * g.hd;
    const int64_t stride = 50;  // table row length: >= the longest sequence's blocks
    const auto [table, nb] = scattered_tables(lens, stride, bs, rng);
    const int64_t pool = nb * bs * kvd;
    std::vector<float> kc(size_t(pool), 0.0f), vc(size_t(pool), 0.0f);
    void* kg = up(std::vector<float>(size_t(pool), 0.0f));
    void* vg = up(std::vector<float>(size_t(pool), 0.0f));
    const int32_t* tg = up_raw(table);
    std::vector<int32_t> seq(static_cast<size_t>(B));
    std::iota(seq.begin(), seq.end(), 0);
    const int32_t* sg = up_raw(seq);
    const int64_t longest = *std::max_element(lens.begin(), lens.end());
    KVLayerView kv_cpu{kc.data(), vc.data(), table.data(), bs, kvd, longest, seq.data(), stride};
    KVLayerView kv_gpu{kg, vg, tg, bs, kvd, 1024, sg, stride};  // len: an upper bound
    // Every sequence's history, written one sequence at a time through its own table row.
    for (int64_t i = 0; i < B; ++i) {
      const int64_t m = lens[size_t(i)];
      auto kv = rnd(size_t(m * 2 * kvd));
      std::vector<int32_t> pos(static_cast<size_t>(m)), one(static_cast<size_t>(m), int32_t(i));
      std::iota(pos.begin(), pos.end(), 0);
      cpu->kv_write(KVLayerView{kc.data(), vc.data(), table.data(), bs, kvd, m, one.data(), stride},
                    kv.data(), kv.data() + kvd, 2 * kvd, pos.data(), m);
      void* kvg = up(kv);
      gpu->kv_write(KVLayerView{kg, vg, tg, bs, kvd, m, up_raw(one), stride}, kvg,
                    static_cast<char*>(kvg) + kvd * dtype_size(dt), 2 * kvd, up_raw(pos), m);
    }
    std::vector<int32_t> pos(static_cast<size_t>(B));
    for (int64_t i = 0; i < B; ++i) pos[size_t(i)] = int32_t(lens[size_t(i)] - 1);
    const AttnParams ap{g.heads, g.kv_heads, g.hd, 1.0f / std::sqrt(float(g.hd)), 0.0f, g.window};
    const std::string what = cat("batched attention heads=", g.heads, "/", g.kv_heads, " hd=", g.hd,
                                 " window=", g.window);
    auto q = rnd(size_t(B * qd));
    for (const int64_t ldo : {qd + 4, qd + 8}) {  // CUDA cores only; tensor cores in F16 / BF16
      std::vector<float> want(size_t(B * ldo), kPoison);
      cpu->attention(q.data(), qd, B, pos.data(), kv_cpu, ap, want.data(), ldo);
      void* out = up(std::vector<float>(size_t(B * ldo), kPoison));
      gpu->attention(up(q), qd, B, up_raw(pos), kv_gpu, ap, out, ldo);
      expect_close(down(out, size_t(B * ldo)), ldo, want, ldo, B, qd, cat(what, " ldo=", ldo));
    }
    expect_close(down(kg, size_t(pool)), pool, kc, pool, 1, pool, what + " K cache", 0.0);
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaAttention,
                         ::testing::Values(DType::F32, DType::F16, DType::BF16),
                         [](const auto& i) { return std::string(label(i.param)); });

// ---- Mixed batches (continuous batching) ----
// One attention call over the rows of several sequences: one-token decodes first, then prefill
// chunks at consecutive positions from `start` (their K/V already in the cache, as the Decoder's
// kv_write leaves them), each sequence with its own block-table row. The CPU backend computes
// every row from seq / pos; the CUDA backend gets seq_start, num_seqs, num_decode and max_q
// too (decodes on CUDA cores, chunks on tensor cores in F16 / BF16 for the head sizes it takes).

struct MixedSeq {
  int64_t start, q;  // positions cached before the step; rows this step
};

struct MixedCase {
  int64_t heads, kv_heads, hd, window;
  float softcap;
  std::vector<MixedSeq> seqs;  // the first num_decode have q == 1
  int64_t num_decode;
  bool seq_start = true;  // give the mixed-batch fields (else a plain batched decode: seq, pos)
  bool fp8 = false;       // FP8 cache
  bool sinks = false;     // attention sinks
};

class CudaMixedAttention : public CudaOps {
 protected:
  // Runs the case once per KV length in `bounds` (0: the tight max(pos) + 1) against the CPU
  // reference; returns each output [n, ldo].
  std::vector<std::vector<float>> run(const MixedCase& c, const std::vector<int64_t>& bounds) {
    if (c.fp8 && dt == DType::F32) return {};  // FP8 caches are for 16-bit engines
    const int64_t bs = 16, kvd = c.kv_heads * c.hd, qd = c.heads * c.hd;
    const int64_t S = int64_t(c.seqs.size());
    int64_t n = 0, max_q = 0, longest = 0, stride = 1;
    std::vector<int32_t> seq_start{0};
    for (int64_t s = 0; s < S; ++s) {
      const MixedSeq& m = c.seqs[size_t(s)];
      if (s < c.num_decode) {
        EXPECT_EQ(m.q, 1) << "decodes have one row";
      }
      if (s >= c.num_decode) max_q = std::max(max_q, m.q);
      n += m.q;
      seq_start.push_back(int32_t(n));
      longest = std::max(longest, m.start + m.q);
      stride = std::max(stride, (m.start + m.q + bs - 1) / bs + 1);  // + 1: rows have slack
    }
    std::string what = cat("mixed attention heads=", c.heads, "/", c.kv_heads, " hd=", c.hd,
                           " window=", c.window, " softcap=", c.softcap, " decodes=", c.num_decode,
                           c.fp8 ? " fp8 cache" : "", c.sinks ? " sinks" : "", " seqs=[");
    for (const MixedSeq& m : c.seqs) what += cat(" ", m.start, "+", m.q);
    what += " ]";
    // Block tables: row s covers sequence s; blocks scattered over the pool; block 0 unused.
    std::vector<int64_t> lens;
    for (const MixedSeq& m : c.seqs) lens.push_back(m.start + m.q);
    const auto [table, nb] = scattered_tables(lens, stride, bs, rng);
    const int64_t pool = nb * bs * kvd;
    std::vector<float> kc(size_t(pool), 0.0f), vc(size_t(pool), 0.0f);
    void* kg = up(std::vector<float>(size_t(pool), 0.0f));
    void* vg = up(std::vector<float>(size_t(pool), 0.0f));
    const int32_t* tg = up_raw(table);
    std::vector<float> ksc(size_t(nb * bs * c.kv_heads)), vsc(ksc.size());
    float* ksg = up_raw(ksc);
    float* vsg = up_raw(vsc);
    auto scaled = [&](KVLayerView v, bool on_gpu) {  // the FP8 scale pools, when asked for
      if (c.fp8) {
        v.k_scale = on_gpu ? ksg : ksc.data(), v.v_scale = on_gpu ? vsg : vsc.data();
        v.head_dim = c.hd;
      }
      return v;
    };
    // Each sequence's history and this step's K/V, through its own table row. A decode's own
    // key goes to the GPU cache twice, as in a decode step: a stale value first, then, as the
    // Decoder's rope_kv_write does, by a kernel launched right before attention (below).
    std::vector<float> fresh(size_t(std::max<int64_t>(c.num_decode, 1) * 2 * kvd));
    for (int64_t s = 0; s < S; ++s) {
      const int64_t m = c.seqs[size_t(s)].start + c.seqs[size_t(s)].q;
      auto kv = rnd(size_t(m * 2 * kvd));
      std::vector<int32_t> pos(static_cast<size_t>(m)), one(static_cast<size_t>(m), int32_t(s));
      std::iota(pos.begin(), pos.end(), 0);
      cpu->kv_write(
          scaled({kc.data(), vc.data(), table.data(), bs, kvd, m, one.data(), stride}, false),
          kv.data(), kv.data() + kvd, 2 * kvd, pos.data(), m);
      if (s < c.num_decode) {
        std::copy_n(kv.begin() + (m - 1) * 2 * kvd, 2 * kvd, fresh.begin() + s * 2 * kvd);
        const auto stale = rnd(size_t(2 * kvd), 1.0f, 3.0f);
        std::copy(stale.begin(), stale.end(), kv.begin() + (m - 1) * 2 * kvd);
      }
      void* kvg = up(kv);
      gpu->kv_write(scaled({kg, vg, tg, bs, kvd, m, up_raw(one), stride}, true), kvg,
                    static_cast<char*>(kvg) + kvd * dtype_size(dt), 2 * kvd, up_raw(pos), m);
    }
    std::vector<int32_t> pos(static_cast<size_t>(n)), seq(static_cast<size_t>(n));
    for (int64_t s = 0; s < S; ++s)
      for (int64_t j = 0; j < c.seqs[size_t(s)].q; ++j) {
        pos[size_t(seq_start[size_t(s)] + j)] = int32_t(c.seqs[size_t(s)].start + j);
        seq[size_t(seq_start[size_t(s)] + j)] = int32_t(s);
      }
    AttnParams ap{c.heads, c.kv_heads, c.hd, 1.0f / std::sqrt(float(c.hd)), c.softcap, c.window};
    const std::vector<float> sinks = sink_logits(c.heads);
    if (c.sinks) ap.sinks = sinks.data();
    // Rows 16-byte aligned (the tensor-core kernel's condition), gap columns poisoned.
    const int64_t ldq = qd + 16, ldo = qd + 8;
    auto q = rnd(size_t(n * ldq));
    std::vector<float> want(size_t(n * ldo), kPoison);
    const KVLayerView kv_cpu =
        scaled({kc.data(), vc.data(), table.data(), bs, kvd, longest, seq.data(), stride}, false);
    cpu->attention(q.data(), ldq, n, pos.data(), kv_cpu, ap, want.data(), ldo);
    if (c.sinks) ap.sinks = up_raw(sinks);
    void* qg = up(q);
    const int32_t* pg = up_raw(pos);
    const int32_t* sg = up_raw(seq);
    const int32_t* ssg = up_raw(seq_start);
    auto view = [&](int64_t bound) {
      KVLayerView kv_gpu =
          scaled({kg, vg, tg, bs, kvd, bound > 0 ? bound : longest, sg, stride}, true);
      if (c.seq_start) {
        kv_gpu.seq_start = ssg;
        kv_gpu.num_seqs = S;
        kv_gpu.num_decode = c.num_decode;
        kv_gpu.max_q = max_q;
      }
      return kv_gpu;
    };
    std::vector<void*> gpu_outs;
    for (size_t b = 0; b < bounds.size(); ++b)
      gpu_outs.push_back(up(std::vector<float>(size_t(n * ldo), kPoison)));
    void* fresh_g = up(fresh);
    // A first launch sizes the backend's scratch (no allocation or memset may then sit between
    // the write and attention), then the decodes' keys are written and attention follows at once.
    gpu->attention(qg, ldq, n, pg, view(bounds[0]), ap, gpu_outs[0], ldo);
    if (c.num_decode > 0)
      gpu->kv_write(view(bounds[0]), fresh_g, static_cast<char*>(fresh_g) + kvd * dtype_size(dt),
                    2 * kvd, pg, c.num_decode);
    std::vector<std::vector<float>> outs;
    for (size_t b = 0; b < bounds.size(); ++b) {
      const KVLayerView kv_gpu = view(bounds[b]);
      gpu->attention(qg, ldq, n, pg, kv_gpu, ap, gpu_outs[b], ldo);
    }
    for (size_t b = 0; b < bounds.size(); ++b) {
      outs.push_back(down(gpu_outs[b], size_t(n * ldo)));
      expect_close(outs.back(), ldo, want, ldo, n, qd, cat(what, " len=", view(bounds[b]).len));
    }
    if (!c.fp8)  // (the FP8 codes are compared bit for bit by CudaAttention)
      expect_close(down(kg, size_t(pool)), pool, kc, pool, 1, pool, what + " K cache", 0.0);
    return outs;
  }
  void run(const MixedCase& c) { run(c, {0}); }
};

// Decodes at various lengths plus prefill chunks from 0 and from the middle of a cache, 1 to
// 300 rows; GQA, MHA, MQA; head_dim 64, 80, 128, 256 (tensor cores in F16 / BF16) and 18 (CUDA
// cores in every dtype).
TEST_P(CudaMixedAttention, DecodesAndChunks) {
  const std::vector<MixedSeq> llama = {{0, 1},   {36, 1},   {699, 1}, {4, 1},   {128, 1},
                                       {0, 300}, {100, 17}, {513, 1}, {40, 64}, {1000, 45}};
  run({32, 8, 128, 0, 0.0f, llama, 5});
  run({16, 2, 64, 0, 0.0f, {{49, 1}, {299, 1}, {0, 33}, {90, 130}, {250, 7}}, 2});
  run({8, 8, 80, 0, 0.0f, {{19, 1}, {0, 19}, {33, 70}}, 1});
  run({8, 2, 256, 0, 0.0f, {{9, 1}, {77, 1}, {5, 40}, {0, 2}}, 2});
  run({4, 2, 18, 0, 0.0f, {{10, 1}, {3, 1}, {0, 21}, {50, 9}}, 2});
  run({40, 2, 64, 0, 0.0f, {{5, 1}, {31, 1}, {200, 3}, {0, 100}}, 2});  // group 20: 2 blocks
  // Only prefill chunks; a single one; only decodes (seq_start given).
  run({32, 8, 128, 0, 0.0f, {{0, 150}, {300, 16}, {17, 1}, {64, 129}}, 0});
  run({8, 2, 64, 0, 0.0f, {{333, 77}}, 0});
  run({32, 8, 128, 0, 0.0f, {{2, 1}, {899, 1}, {63, 1}}, 3});
}

TEST_P(CudaMixedAttention, Fp8Cache) {
  const std::vector<MixedSeq> llama = {{0, 1},   {36, 1},   {699, 1}, {4, 1},   {128, 1},
                                       {0, 300}, {100, 17}, {513, 1}, {40, 64}, {1000, 45}};
  run({32, 8, 128, 0, 0.0f, llama, 5, true, true});
  run({8, 2, 256, 0, 0.0f, {{9, 1}, {77, 1}, {5, 40}, {0, 2}}, 2, true, true});
  run({16, 8, 128, 100, 0.0f, {{30, 1}, {700, 1}, {0, 260}, {150, 80}, {400, 5}}, 2, true, true});
  run({8, 8, 80, 0, 30.0f, {{20, 1}, {0, 19}, {33, 70}}, 1, true, true});
  run({4, 2, 18, 0, 0.0f, {{10, 1}, {3, 1}, {0, 21}, {50, 9}}, 2, true, true});
  run({32, 8, 128, 0, 0.0f, {{2, 1}, {899, 1}, {63, 1}}, 3, false, true});  // batched decode
}

TEST_P(CudaMixedAttention, WindowAndSoftcap) {
  run({16, 8, 128, 100, 0.0f, {{30, 1}, {700, 1}, {0, 260}, {150, 80}, {400, 5}}, 2});
  run({8, 1, 128, 64, 50.0f, {{0, 100}, {200, 31}}, 0});  // MQA
  run({8, 8, 80, 0, 30.0f, {{20, 1}, {0, 19}, {33, 70}}, 1});
  run({32, 8, 64, 1024, 0.0f, {{1999, 1}, {1500, 1}, {1800, 40}}, 2});  // window, split-K
  run({4, 2, 16, 8, 50.0f, {{12, 1}, {0, 24}, {30, 3}}, 1});
}

// GPT-OSS's sinks in every kernel: tensor-core prefill chunks and decodes, split-K merges
// (long decodes), CUDA-core rows (head_dim 18), a window, an FP8 cache, a batched decode.
TEST_P(CudaMixedAttention, Sinks) {
  const std::vector<MixedSeq> llama = {{0, 1},   {36, 1},   {699, 1}, {4, 1},   {128, 1},
                                       {0, 300}, {100, 17}, {513, 1}, {40, 64}, {1000, 45}};
  run({32, 8, 128, 0, 0.0f, llama, 5, true, false, true});
  run({64, 8, 64, 128, 0.0f, {{2000, 1}, {30, 1}, {0, 200}, {150, 80}}, 2, true, false, true});
  run({32, 8, 64, 0, 0.0f, {{1999, 1}, {1500, 1}, {1800, 40}}, 2, true, false, true});  // split-K
  run({4, 2, 18, 0, 0.0f, {{10, 1}, {3, 1}, {0, 21}, {50, 9}}, 2, true, false, true});
  run({32, 8, 128, 0, 0.0f, llama, 5, true, true, true});                          // FP8 cache
  run({32, 8, 128, 0, 0.0f, {{2, 1}, {899, 1}, {63, 1}}, 3, false, false, true});  // batched
}

// A captured decode graph passes a length bucket, not the lengths: the same launch under a large
// kv.len bound must give the tight bound's result for short sequences (the split over keys
// follows each row's own range on the device), with and without the mixed-batch fields.
TEST_P(CudaMixedAttention, LengthBoundDoesNotMatter) {
  const std::vector<MixedSeq> short_decodes = {{2, 1}, {39, 1}, {16, 1}, {8, 1}, {32, 1}, {0, 1}};
  for (const bool given : {true, false}) {
    MixedCase c{32, 8, 128, 0, 0.0f, short_decodes, 6};
    c.seq_start = given;
    const auto outs = run(c, {0, 1 << 16});
    const int64_t n = 6, qd = 32 * 128, ldo = qd + 8;
    expect_close(outs[1], ldo, outs[0], ldo, n, qd, "large bound vs tight bound");
  }
  MixedCase w{16, 2, 64, 48, 0.0f, {{5, 1}, {60, 1}, {200, 1}, {20, 1}}, 4};  // window
  auto outs = run(w, {0, 4096});
  expect_close(outs[1], 16 * 64 + 8, outs[0], 16 * 64 + 8, 4, 16 * 64, "window, large bound");
  MixedCase m{32, 8, 128, 0, 0.0f, {{3, 1}, {20, 1}, {0, 40}, {10, 8}}, 2};  // with chunks
  outs = run(m, {0, 1 << 16});
  expect_close(outs[1], 32 * 128 + 8, outs[0], 32 * 128 + 8, 50, 32 * 128, "mixed, large bound");
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaMixedAttention,
                         ::testing::Values(DType::F32, DType::F16, DType::BF16),
                         [](const auto& i) { return std::string(label(i.param)); });

}  // namespace
}  // namespace kiln::test
