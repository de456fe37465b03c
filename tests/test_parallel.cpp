// Tensor and pipeline parallelism on the CPU emulation (ranks as threads, runtime/parallel.h):
// every fixture architecture's logits at TP=2, TP=4, PP=2 and TP=2 x PP=2 against one rank, in
// prefill, one-token decode and batched decode (micro-batches through the pipeline), and the
// serving scheduler on top; sharding by TpSplit; the thread collectives and their failures.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>

#include "build/checkpoint.h"
#include "core/error.h"
#include "graph/comm.h"
#include "graph/layout.h"
#include "graph/shard.h"
#include "kiln/serving.h"
#include "runtime/parallel.h"
#include "test_util.h"

namespace kiln::test::parallel {
namespace {

// FP32 tolerance, as the transformers parity tests: ||delta|| / ||ref|| per position. Ranks sum
// the same products in another order, nothing else.
constexpr double kTol = 1e-5;

struct Layout {
  int tp, pp;
  bool processes = false;  // ranks as kiln processes over the TCP mesh, not threads
};

RuntimeConfig runtime(Layout l) {
  RuntimeConfig rc;
  rc.device = "cpu";
  rc.tp = l.tp;
  rc.pp = l.pp;
  if (l.processes) {
    rc.dist_init = "127.0.0.1:0";
    rc.rank_exe = KILN_CLI;
  }
  return rc;
}

// Logits of every prompt position (one prefill), of one-token decode steps, and of batched
// decode steps over all prompts at once.
struct Logits {
  std::vector<std::vector<float>> prefill, decode, batched;
};

Logits run(const std::string& arch, const Reference& ref, Layout l) {
  BuildConfig bc;
  bc.dtype = "f32";
  Engine e = Engine::build(hf(arch), bc);
  e.start(runtime(l));
  Logits r;
  std::vector<Session> ss;
  for (const auto& p : ref.prompts) {
    r.prefill.push_back(e.logits(p));
    Session s = e.session();
    std::vector<float> all;
    for (int32_t t : p) {
      auto step = s.forward(std::span<const int32_t>(&t, 1));
      all.insert(all.end(), step.begin(), step.end());
    }
    r.decode.push_back(std::move(all));
    ss.push_back(std::move(s));
  }
  // Three batched steps over every session: several sequences a step, which pipeline stages
  // take as micro-batches.
  std::vector<Session*> ptrs;
  for (auto& s : ss) ptrs.push_back(&s);
  std::vector<int32_t> toks(ss.size());
  for (int k = 0; k < 3; ++k) {
    for (size_t i = 0; i < toks.size(); ++i) toks[i] = int32_t((7 + 31 * i + 5 * k) % 500);
    r.batched.push_back(e.step_logits(ptrs, toks));
  }
  return r;
}

double worst(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b,
             int64_t V) {
  double w = 0;
  EXPECT_EQ(a.size(), b.size());
  for (size_t j = 0; j < a.size() && j < b.size(); ++j) {
    EXPECT_EQ(a[j].size(), b[j].size());
    for (size_t i = 0; (i + 1) * size_t(V) <= a[j].size(); ++i)
      w = std::max(w, rel_err(a[j].data() + i * V, b[j].data() + i * V, V));
  }
  return w;
}

class Sharded : public ::testing::TestWithParam<std::string> {};

TEST_P(Sharded, MatchesOneRank) {
  const std::string arch = GetParam();
  const Reference ref = load_reference(arch);
  const int64_t V = ref.logits[0].shape[1];
  const Logits one = run(arch, ref, {1, 1});
  for (Layout l : {Layout{2, 1}, Layout{4, 1}, Layout{1, 2}, Layout{2, 2}}) {
    const Logits r = run(arch, ref, l);
    const double p = worst(r.prefill, one.prefill, V), d = worst(r.decode, one.decode, V),
                 b = worst(r.batched, one.batched, V);
    std::printf("[sharded] %-14s tp %d pp %d: prefill %.2e decode %.2e batched %.2e\n",
                arch.c_str(), l.tp, l.pp, p, d, b);
    EXPECT_LE(p, kTol) << arch << " tp " << l.tp << " pp " << l.pp << " (prefill)";
    EXPECT_LE(d, kTol) << arch << " tp " << l.tp << " pp " << l.pp << " (decode)";
    EXPECT_LE(b, kTol) << arch << " tp " << l.tp << " pp " << l.pp << " (batched decode)";
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Sharded, ::testing::ValuesIn(kHfParityFixtures));

TEST(Sharded, ProcessesMatchOneRank) {
  // Ranks as processes (kiln binaries started by the engine, talking over TCP): the path GPUs
  // take with NCCL, here with the CPU's collectives over the mesh.
  for (const char* arch : {"llama", "qwen3_moe", "olmo2", "gemma2_tied", "deepseek_v2"}) {
    const Reference ref = load_reference(arch);
    const int64_t V = ref.logits[0].shape[1];
    const Logits one = run(arch, ref, {1, 1});
    for (Layout l : {Layout{2, 1, true}, Layout{1, 2, true}, Layout{2, 2, true}}) {
      const Logits r = run(arch, ref, l);
      const double p = worst(r.prefill, one.prefill, V), d = worst(r.decode, one.decode, V),
                   b = worst(r.batched, one.batched, V);
      std::printf("[sharded] %-14s tp %d pp %d processes: prefill %.2e decode %.2e batched %.2e\n",
                  arch, l.tp, l.pp, p, d, b);
      EXPECT_LE(std::max({p, d, b}), kTol) << arch << " tp " << l.tp << " pp " << l.pp;
    }
  }
}

TEST(Sharded, PerRankFilesGiveTheSameLogits) {
  // kiln build --tp / --pp streams each rank's shard into its own file; loaded, the engine runs
  // on those ranks with the very weights sharding at start gives: bit-identical logits.
  struct Case {
    std::string arch, quant;
    Layout l;
  };
  TempDir tmp;
  const std::vector<int32_t> p = {5, 17, 300, 2, 99, 42, 7};
  for (const Case& k : {Case{"llama", "none", {2, 2}}, Case{"gpt2", "none", {2, 2}},
                        Case{"gemma2_tied", "none", {4, 1}}, Case{"qwen3_moe", "none", {2, 2}},
                        Case{"olmo2", "none", {2, 1}}, Case{"phi", "none", {1, 2}},
                        Case{"deepseek_v2", "none", {2, 2}}, Case{"llama_ct_w4a16", "none", {2, 2}},
                        Case{"llama", "int8-wo", {2, 2}}, Case{"qwen3_moe", "fp8", {2, 1}}}) {
    BuildConfig bc;
    bc.dtype = "f32";
    bc.quant = k.quant;
    const fs::path dir = tmp / (k.arch + "_" + k.quant);
    BuildConfig sharded = bc;
    sharded.tp = k.l.tp, sharded.pp = k.l.pp;
    Engine::build_to(hf(k.arch), dir, sharded);
    EXPECT_GT(Engine::verify(dir), 0u);
    Engine disk = Engine::load(dir);
    disk.start(runtime({1, 1}));  // the engine's own ranks
    EXPECT_NE(disk.runtime_info().device.find(cat("tp ", k.l.tp, ", pp ", k.l.pp)),
              std::string::npos)
        << disk.runtime_info().device;
    Engine mem = Engine::build(hf(k.arch), bc);
    mem.start(runtime(k.l));
    const auto a = disk.logits(p), b = mem.logits(p);
    ASSERT_EQ(a.size(), b.size());
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * 4), 0) << k.arch << " " << k.quant;
    EXPECT_EQ(disk.info().num_params, mem.info().num_params) << k.arch;
  }
}

TEST(Sharded, PerRankFilesAreChecked) {
  TempDir tmp;
  BuildConfig bc;
  bc.dtype = "f32";
  bc.tp = 2;
  Engine::build_to(hf("llama"), tmp / "e", bc);
  // Another rank count than the engine's.
  Engine e = Engine::load(tmp / "e");
  RuntimeConfig rc = runtime({4, 1});
  EXPECT_EQ(one_line_error([&] { e.start(rc); }),
            "the engine was built for --tp 2 --pp 1 (one weight file per rank), not --tp 4 --pp 1");
  // A flipped byte in rank 1's file.
  const fs::path f = tmp / "e" / "rank1-of-2.safetensors";
  {
    std::fstream io(f, std::ios::in | std::ios::out | std::ios::binary);
    io.seekp(-5, std::ios::end);
    io.put('\x7f');
  }
  EXPECT_TRUE(contains_text(one_line_error([&] { Engine::verify(tmp / "e"); }),
                            "rank1-of-2.safetensors: 1 tensor do not match the manifest"));
  // A missing one.
  fs::remove(f);
  EXPECT_TRUE(
      contains_text(one_line_error([&] { Engine::load(tmp / "e"); }), "rank1-of-2.safetensors"));
  // In memory there is nothing to write per rank.
  EXPECT_TRUE(contains_text(one_line_error([&] { Engine::build(hf("llama"), bc); }),
                            "--tp / --pp at build time write one weight file per rank"));
}

// The pids of this process's children.
std::vector<int> children() {
  std::vector<int> r;
  for (const auto& d : fs::directory_iterator("/proc")) {
    const std::string n = d.path().filename();
    if (n.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream f(d.path() / "stat");
    std::string stat;
    std::getline(f, stat);
    const size_t close = stat.rfind(')');
    if (close == std::string::npos) continue;
    std::istringstream rest(stat.substr(close + 2));
    char state;
    int ppid = 0;
    rest >> state >> ppid;
    if (ppid == getpid()) r.push_back(std::stoi(n));
  }
  return r;
}

TEST(Sharded, ARankThatDiesStopsTheEngine) {
  BuildConfig bc;
  bc.dtype = "f32";
  Engine e = Engine::build(hf("llama"), bc);
  e.start(runtime({2, 1, true}));
  const std::vector<int32_t> p = {5, 17, 300, 2};
  EXPECT_EQ(e.logits(p).size(), 4u * 512);
  const auto kids = children();
  ASSERT_EQ(kids.size(), 1u);
  kill(kids[0], SIGKILL);
  waitpid(kids[0], nullptr, 0);
  const auto t0 = std::chrono::steady_clock::now();
  const std::string err = one_line_error([&] { e.logits(p); });
  EXPECT_TRUE(contains_text(err, "rank 1 closed its connection (its process ended)")) << err;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(10));
}

// Collects the tokens of finished requests.
struct Done {
  std::mutex mu;
  std::condition_variable cv;
  std::map<uint64_t, std::vector<int32_t>> ids;
  int finished = 0;
  Scheduler::Callback cb() {
    return [this](const RequestOutput& o) {
      std::lock_guard l(mu);
      auto& v = ids[o.request_id];
      v.insert(v.end(), o.token_ids.begin(), o.token_ids.end());
      if (o.finish != FinishReason::None) {
        ++finished;
        cv.notify_all();
      }
    };
  }
  void wait(int n) {
    std::unique_lock l(mu);
    cv.wait(l, [&] { return finished >= n; });
  }
};

// Greedy completions of several requests at once (chunked prefill beside decodes), served
// through TP=2 x PP=2 ranks: the same tokens as one rank.
std::vector<std::vector<int32_t>> serve(const std::string& arch, Layout l) {
  BuildConfig bc;
  bc.dtype = "f32";
  Engine e = Engine::build(hf(arch), bc);
  ServeConfig cfg;
  cfg.runtime.device = "cpu";
  cfg.runtime.tp = l.tp;
  cfg.runtime.pp = l.pp;
  cfg.runtime.max_num_tokens = 24;  // prompts arrive in chunks beside running decodes
  Done d;
  std::vector<uint64_t> ids;
  {
    Scheduler s(e, cfg);
    const Reference ref = load_reference(arch);
    for (int rep = 0; rep < 2; ++rep)
      for (const auto& p : ref.prompts) {
        GenerationParams g;
        g.temperature = 0.0f;
        g.max_tokens = 12;
        g.ignore_eos = true;
        ids.push_back(s.submit(p, g, d.cb()));
      }
    d.wait(int(ids.size()));
  }
  std::vector<std::vector<int32_t>> out;
  for (uint64_t id : ids) out.push_back(d.ids[id]);
  return out;
}

TEST(Sharded, SchedulerServesTheSameTokens) {
  for (const char* arch : {"llama", "qwen3_moe"}) {
    const auto one = serve(arch, {1, 1}), many = serve(arch, {2, 2});
    ASSERT_EQ(one.size(), many.size());
    for (size_t i = 0; i < one.size(); ++i) {
      EXPECT_EQ(one[i].size(), 12u) << arch << " request " << i;
      EXPECT_EQ(many[i], one[i]) << arch << " request " << i;
    }
  }
}

// Each weight's element holds its own flat index, so a slice shows where it came from.
std::vector<std::pair<std::string, Tensor>> numbered(const ModelConfig& c) {
  std::vector<std::pair<std::string, Tensor>> w;
  for (const WeightSpec& s : engine_layout(c)) {
    Tensor t = Tensor::zeros(DType::F32, s.shape);
    for (int64_t i = 0; i < t.numel(); ++i) t.ptr<float>()[i] = float(i);
    w.emplace_back(s.name, t);
  }
  return w;
}

const Tensor& named(const std::vector<std::pair<std::string, Tensor>>& w, const std::string& n) {
  for (const auto& [k, t] : w)
    if (k == n) return t;
  throw Error(cat("no ", n));
}

bool holds(const std::vector<std::pair<std::string, Tensor>>& w, const std::string& n) {
  for (const auto& [k, t] : w)
    if (k == n) return true;
  return false;
}

TEST(Sharded, SplitsFollowTheLayout) {
  // llama fixture: 4 query heads and 2 KV heads of 16, hidden 64, intermediate 128, 3 layers.
  const ModelConfig c = open_config(hf("llama") / "config.json").config;
  ASSERT_EQ(c.num_heads, 4);
  ASSERT_EQ(c.num_kv_heads, 2);
  const auto full = numbered(c);
  const int64_t H = 64;
  auto first_row = [&](const Tensor& t, int64_t r) { return int64_t(t.ptr<float>()[r * H] / H); };
  {
    // TP=4: one query head each; KV heads replicated (ranks 0, 1 hold head 0; 2, 3 head 1).
    const auto w = shard_weights(c, full, WeightQuant::None, Shard::of(2, 4, 1));
    const Tensor& qkv = named(w, "layers.0.wqkv");
    ASSERT_EQ(qkv.shape, (Shape{48, H}));
    EXPECT_EQ(first_row(qkv, 0), 32);            // q head 2
    EXPECT_EQ(first_row(qkv, 16), 64 + 16);      // k head 1
    EXPECT_EQ(first_row(qkv, 32), 96 + 16);      // v head 1
    const Tensor& wo = named(w, "layers.0.wo");  // [64, 64]: input columns of head 2
    ASSERT_EQ(wo.shape, (Shape{H, 16}));
    EXPECT_EQ(wo.ptr<float>()[16 + 3], float(64 + 32 + 3));  // row 1, column 3
    const Tensor& gu = named(w, "layers.1.w_gate_up");       // [gate 128 | up 128] rows
    ASSERT_EQ(gu.shape, (Shape{64, H}));
    EXPECT_EQ(first_row(gu, 0), 64);
    EXPECT_EQ(first_row(gu, 32), 128 + 64);
    EXPECT_EQ(named(w, "layers.2.attn_norm").shape, (Shape{H}));  // vectors stay whole
    EXPECT_EQ(rank_config(c, Shard::of(2, 4, 1)).num_kv_heads, 1);
  }
  {
    // TP=3 does not divide 4 heads; the vocabulary alone would pad (512 = 171 + 171 + 170).
    EXPECT_TRUE(contains_text(error_of([&] { check_shardable(c, 3, 1); }),
                              "num_attention_heads 4 does not divide over 3 ranks"));
    EXPECT_EQ(vocab_slice(512, 3), 171);
  }
  {
    // PP=2: layers 0 on stage 0, 1 and 2 on stage 1; the LM head on the last stage only.
    const auto s0 = shard_weights(c, full, WeightQuant::None, Shard::of(0, 1, 2));
    const auto s1 = shard_weights(c, full, WeightQuant::None, Shard::of(1, 1, 2));
    EXPECT_TRUE(holds(s0, "embed") && holds(s0, "layers.0.wqkv") && !holds(s0, "layers.1.wqkv"));
    EXPECT_EQ(holds(s0, "lm_head"), false);
    EXPECT_TRUE(holds(s1, "layers.1.wqkv") && holds(s1, "layers.2.wqkv") && holds(s1, "lm_head"));
    EXPECT_EQ(holds(s1, "embed"), c.tie_word_embeddings);
  }
}

TEST(Sharded, VocabularyPadsOnTheLastRank) {
  // A vocabulary that does not divide: 3 ranks of a 512-row table, the last padded with zeros.
  ModelConfig c = open_config(hf("llama") / "config.json").config;
  Tensor t = Tensor::zeros(DType::F32, {512, 2});
  for (int64_t i = 0; i < 1024; ++i) t.ptr<float>()[i] = float(i);
  WeightSpec spec{"embed", {512, 2}, WeightRole::Embedding};
  // Through the layout's own rule for the table.
  for (const WeightSpec& s : engine_layout(c))
    if (s.name == "embed") spec.split = s.split;
  ASSERT_TRUE(spec.split.pad);
  c.vocab_size = 512;
  c.num_heads = c.num_kv_heads = 3;  // so that tp = 3 shards the rest
  c.intermediate_size = 3 * 64;
  for (int r = 0; r < 3; ++r) {
    std::vector<std::pair<std::string, Tensor>> full = numbered(c);
    for (auto& [n, x] : full)
      if (n == "embed") x = t;
    const auto w = shard_weights(c, full, WeightQuant::None, Shard::of(r, 3, 1));
    const Tensor& e = named(w, "embed");
    ASSERT_EQ(e.shape, (Shape{171, 2}));
    EXPECT_EQ(e.ptr<float>()[0], float(2 * 171 * r));
    // Rank 2 holds tokens 342 .. 511 and one zero row.
    if (r == 2) EXPECT_EQ(e.ptr<float>()[2 * 170], 0.0f);
  }
}

TEST(Sharded, Fp8ActivationsScaleEachRanksSlice) {
  // fp8 scales each token's activations by their max |x|; a row-parallel product (wo, w_down)
  // sees a rank's slice of the row, so TP rounds differently (as TensorRT-LLM and vLLM do), not
  // worse: against the float engine, TP=2 stays as close as one rank.
  const std::vector<int32_t> p = {5, 17, 300, 2, 99, 42, 7};
  auto logits = [&](const std::string& quant, int tp) {
    BuildConfig bc;
    bc.dtype = "f32";
    bc.quant = quant;
    Engine e = Engine::build(hf("qwen3_moe"), bc);
    RuntimeConfig rc;
    rc.device = "cpu";
    rc.tp = tp;
    e.start(rc);
    return e.logits(p);
  };
  const auto ref = logits("none", 1), one = logits("fp8", 1), two = logits("fp8", 2);
  const double e1 = std::sqrt(nmse(one, ref)), e2 = std::sqrt(nmse(two, ref));
  std::printf("[sharded] qwen3_moe fp8 against f32: tp 1 %.3e, tp 2 %.3e\n", e1, e2);
  EXPECT_GT(e1, 0.0);
  EXPECT_LE(e2, 1.5 * e1);
}

TEST(Sharded, RefusesInt4GroupsThatDoNotDivide) {
  // int4-wo picks groups of 64 for the fixture's 64-input wo: one group, which 2 ranks cannot
  // split.
  BuildConfig bc;
  bc.dtype = "f32";
  bc.quant = "int4-wo";
  Engine e = Engine::build(hf("llama"), bc);
  RuntimeConfig rc;
  rc.device = "cpu";
  rc.tp = 2;
  EXPECT_EQ(one_line_error([&] { e.start(rc); }),
            "layers.0.wo: its int4 groups of 64 inputs do not divide over 2 ranks of 32 input "
            "features; quantize with groups of at most 32 or use fewer ranks");
}

TEST(Sharded, RefusesWhatDoesNotDivide) {
  BuildConfig bc;
  bc.dtype = "f32";
  Engine e = Engine::build(hf("llama"), bc);
  RuntimeConfig rc;
  rc.device = "cpu";
  rc.tp = 3;
  EXPECT_EQ(one_line_error([&] { e.start(rc); }),
            "--tp 3: num_attention_heads 4 does not divide over 3 ranks");
  rc.tp = 1;
  rc.pp = 4;
  EXPECT_EQ(one_line_error([&] { e.start(rc); }), "--pp 4: the model has only 3 layers");
}

TEST(Sharded, QuantizedWeightsShardWithTheirScales) {
  // int4 (a compressed-tensors checkpoint, group 32) and int8-wo engines: TP=2 and PP=2 give
  // the logits of one rank.
  struct Case {
    std::string arch, quant;
  };
  for (const Case& k : {Case{"llama_ct_w4a16", "auto"}, Case{"llama_ct_w4a16_asym", "auto"},
                        Case{"llama", "int8-wo"}, Case{"qwen3_moe", "int8-wo"}}) {
    const std::vector<int32_t> p = {5, 17, 300, 2, 99, 42, 7};
    std::vector<float> want;
    for (Layout l : {Layout{1, 1}, Layout{2, 1}, Layout{1, 2}}) {
      BuildConfig bc;
      bc.dtype = "f32";
      if (k.quant != "auto") bc.quant = k.quant;
      Engine e = Engine::build(hf(k.arch), bc);
      RuntimeConfig rc;
      rc.device = "cpu";
      rc.tp = l.tp, rc.pp = l.pp;
      e.start(rc);
      const std::vector<float> got = e.logits(p);
      if (want.empty()) {
        want = got;
        continue;
      }
      const int64_t V = e.info().vocab_size;
      for (size_t i = 0; i < p.size(); ++i)
        EXPECT_LE(rel_err(got.data() + i * V, want.data() + i * V, V), kTol)
            << k.arch << " " << k.quant << " tp " << l.tp << " pp " << l.pp << " position " << i;
    }
  }
}

TEST(ThreadWorld, CollectivesAndPointToPoint) {
  ThreadWorld w(3);
  std::vector<std::vector<float>> sums(3), gathered(3);
  std::vector<int32_t> got(3, -1);
  std::vector<std::thread> ts;
  for (int r = 0; r < 3; ++r)
    ts.emplace_back([&, r] {
      auto c = w.group({0, 1, 2}, r);
      std::vector<float> x = {float(r), 1.0f, 0.5f * float(r)};
      c->all_reduce_sum(x.data(), 3, DType::F32);
      sums[size_t(r)] = x;
      std::vector<float> all(6);
      const float mine[2] = {float(10 * r), float(10 * r + 1)};
      c->all_gather(mine, all.data(), sizeof mine);
      gathered[size_t(r)] = all;
      // A ring: each rank sends to the next and receives from the one before.
      const int32_t v = 100 + r;
      c->send(&v, 4, (r + 1) % 3);
      c->recv(&got[size_t(r)], 4, (r + 2) % 3);
    });
  for (auto& t : ts) t.join();
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(sums[size_t(r)], (std::vector<float>{3.0f, 3.0f, 1.5f}));
    EXPECT_EQ(gathered[size_t(r)], (std::vector<float>{0, 1, 10, 11, 20, 21}));
    EXPECT_EQ(got[size_t(r)], 100 + (r + 2) % 3);
  }
}

TEST(ThreadWorld, AFailedRankStopsTheOthers) {
  // Rank 1 fails before the all-reduce; ranks 0 and 2 must not wait for it forever.
  ThreadWorld w(3);
  std::vector<std::string> err(3);
  std::vector<std::thread> ts;
  for (int r = 0; r < 3; ++r)
    ts.emplace_back([&, r] {
      auto c = w.group({0, 1, 2}, r);
      try {
        if (r == 1) throw Error("out of memory on rank 1");
        float x = 1.0f;
        c->all_reduce_sum(&x, 1, DType::F32);
      } catch (const std::exception& e) {
        err[size_t(r)] = e.what();
        w.abort(r, e.what());
      }
    });
  for (auto& t : ts) t.join();
  for (int r : {0, 2})
    EXPECT_EQ(err[size_t(r)], "rank 1 failed: out of memory on rank 1") << "rank " << r;
}

}  // namespace
}  // namespace kiln::test::parallel
