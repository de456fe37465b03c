// The GPU runtime: decode steps replayed from CUDA graphs give exactly what the same steps give
// issued one kernel at a time (every graph replayed many times, and a second sequence replays
// graphs captured by the first); batched decode against transformers' logits; sampling on the
// GPU picks what the CPU picks. Skips when no GPU is visible (CI).
#include "graph/backend.h"
#include "kiln/kiln.h"
#include "test_util.h"

namespace kiln::test {

double batched_teacher_forcing(Engine& e, const Reference& ref);  // test_runtime.cpp

namespace {

Engine gpu_engine(const std::string& arch, const std::string& dtype, bool graphs) {
  BuildConfig bc;
  bc.dtype = dtype;
  bc.max_seq_len = 128;
  Engine e = Engine::build(hf(arch), bc);
  RuntimeConfig rc;
  rc.device = "cuda";
  rc.cuda_graphs = graphs;
  e.start(rc);
  EXPECT_EQ(e.runtime_info().cuda_graphs, graphs);
  return e;
}

// Decode logits of prompt 0 fed token by token, then its greedy continuation, twice over (two
// sessions: the second replays what the first captured).
std::vector<std::vector<float>> decode_run(Engine& e, const Reference& ref) {
  std::vector<std::vector<float>> out;
  for (int rep = 0; rep < 2; ++rep) {
    Session s = e.session();
    std::vector<int32_t> toks = ref.prompts[0];
    toks.insert(toks.end(), ref.greedy[0].begin(), ref.greedy[0].end());
    for (int32_t t : toks) out.push_back(s.forward(std::span<const int32_t>(&t, 1)));
  }
  return out;
}

class CudaGraphs : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU visible";
  }
};

TEST_P(CudaGraphs, ReplaysMatchEagerStepsExactly) {
  Reference ref = load_reference(GetParam());
  for (const char* dt : {"f32", "bf16"}) {
    Engine eager = gpu_engine(GetParam(), dt, false);
    Engine graphs = gpu_engine(GetParam(), dt, true);
    const auto a = decode_run(eager, ref), b = decode_run(graphs, ref);
    ASSERT_EQ(a.size(), b.size());
    size_t same = 0;
    for (size_t i = 0; i < a.size(); ++i) same += a[i] == b[i];
    EXPECT_EQ(same, a.size()) << GetParam() << " " << dt
                              << ": graph replays differ from eager steps";
    // The second pass (all replays) equals the first (capture step included).
    const size_t half = a.size() / 2;
    for (size_t i = 0; i < half; ++i) EXPECT_EQ(b[i], b[half + i]) << "step " << i;
    std::printf("[cuda graphs] %-12s %-4s %zu decode steps bit-identical to eager\n",
                GetParam().c_str(), dt, same);
  }
}

TEST_P(CudaGraphs, BatchedDecodeMatchesReference) {
  Reference ref = load_reference(GetParam());
  Engine e = gpu_engine(GetParam(), "f32", true);
  const double worst = batched_teacher_forcing(e, ref);
  std::printf("[batched decode cuda] %-12s max rel err %.2e\n", GetParam().c_str(), worst);
}

INSTANTIATE_TEST_SUITE_P(Hf, CudaGraphs,
                         ::testing::Values("llama", "gemma2", "qwen2_moe", "qwen3"));

TEST(CudaSampling, SeededContinuationMatchesCpu) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU visible";
  Reference ref = load_reference("llama");
  BuildConfig bc;
  bc.dtype = "f32";
  Engine cpu = Engine::build(hf("llama"), bc);
  cpu.start({.device = "cpu"});
  Engine gpu = gpu_engine("llama", "f32", true);
  for (uint64_t seed : {1u, 2u, 3u}) {
    SamplingParams sp;
    sp.temperature = 0.9f;
    sp.top_k = 40;
    sp.top_p = 0.9f;
    sp.seed = seed;
    sp.max_tokens = 16;
    sp.ignore_eos = true;
    EXPECT_EQ(gpu.generate(ref.prompts[1], sp), cpu.generate(ref.prompts[1], sp))
        << "seed " << seed;
  }
  SamplingParams g;
  g.temperature = 0;
  g.max_tokens = 16;
  g.ignore_eos = true;
  EXPECT_EQ(gpu.generate(ref.prompts[2], g), ref.greedy[2]);
}

TEST(CudaRuntime, KvCacheSizedFromFreeMemory) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU visible";
  BuildConfig bc;
  bc.dtype = "bf16";
  bc.max_seq_len = 256;
  Engine e = Engine::build(hf("llama"), bc);
  RuntimeConfig rc;
  rc.device = "cuda";
  rc.kv_cache_fraction = 0.01;
  e.start(rc);
  const RuntimeInfo r = e.runtime_info();
  EXPECT_GT(r.free_bytes_before_kv, 0);
  EXPECT_LE(r.kv_cache_bytes, int64_t(0.01 * double(r.free_bytes_before_kv)) + 1);
  EXPECT_GE(r.kv_cache_tokens, 256);
  std::printf("[kv cache] 1%% of %.1f GiB free: %lld tokens\n",
              double(r.free_bytes_before_kv) / (1 << 30), (long long)r.kv_cache_tokens);
  // More than the device has is refused with the numbers, not a crash.
  Engine f = Engine::build(hf("llama"), bc);
  RuntimeConfig big;
  big.device = "cuda";
  big.kv_cache_tokens = int64_t(1) << 40;
  try {
    f.start(big);
    FAIL() << "expected an error";
  } catch (const Error& ex) {
    EXPECT_NE(std::string(ex.what()).find("free"), std::string::npos) << ex.what();
  }
}

}  // namespace
}  // namespace kiln::test
