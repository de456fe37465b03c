// The scheduler on the GPU (skips without one): mixed batches (tensor-core variable-length
// prefill next to split-K decodes, decode steps replayed from graphs captured at start) against
// transformers' logits, and concurrent, preempted and prefix-cached requests getting the tokens
// they get alone.
#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <random>

#include "graph/backend.h"
#include "kiln/serving.h"
#include "test_util.h"

namespace kiln::test {
namespace {

struct Sink {
  std::mutex mu;
  std::condition_variable cv;
  std::map<uint64_t, std::vector<int32_t>> ids;
  std::map<uint64_t, std::vector<std::optional<TokenLogprob>>> plp;
  std::map<uint64_t, std::string> errors;
  int finished = 0;
  Scheduler::Callback cb() {
    return [this](const RequestOutput& o) {
      std::lock_guard<std::mutex> l(mu);
      auto& v = ids[o.request_id];
      v.insert(v.end(), o.token_ids.begin(), o.token_ids.end());
      if (!o.prompt_logprobs.empty()) plp[o.request_id] = o.prompt_logprobs;
      if (!o.error.empty()) errors[o.request_id] = o.error;
      if (o.finish != FinishReason::None) ++finished, cv.notify_all();
    };
  }
  bool wait(int n) {
    std::unique_lock<std::mutex> l(mu);
    return cv.wait_for(l, std::chrono::seconds(120), [&] { return finished >= n; });
  }
};

ServeConfig gpu_config(int64_t max_tokens, int64_t max_seqs, int64_t kv_tokens = 0) {
  ServeConfig sc;
  sc.runtime.device = "cuda";
  sc.runtime.kv_cache_tokens = kv_tokens;
  sc.max_num_tokens = max_tokens;
  sc.max_num_seqs = max_seqs;
  return sc;
}

GenerationParams greedy(int64_t n) {
  GenerationParams g;
  g.temperature = 0.0f;
  g.max_tokens = n;
  g.ignore_eos = true;
  return g;
}

std::vector<std::vector<int32_t>> run_all(Scheduler& s, const std::vector<std::vector<int32_t>>& ps,
                                          const GenerationParams& g, bool one_at_a_time) {
  Sink k;
  std::vector<uint64_t> ids;
  for (const auto& p : ps) {
    ids.push_back(s.submit(p, g, k.cb()));
    if (one_at_a_time) EXPECT_TRUE(k.wait(int(ids.size())));
  }
  EXPECT_TRUE(k.wait(int(ps.size())));
  std::vector<std::vector<int32_t>> r;
  for (uint64_t id : ids) {
    EXPECT_EQ(k.errors[id], "");
    r.push_back(k.ids[id]);
  }
  return r;
}

class CudaScheduler : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU visible";
  }
};

TEST_P(CudaScheduler, MixedBatchesMatchTheReference) {
  Reference ref = load_reference(GetParam());
  BuildConfig bc;
  bc.dtype = "f32";
  Engine e = Engine::build(hf(GetParam()), bc);
  const int64_t V = e.info().vocab_size;
  Scheduler s(e, gpu_config(8, 4));
  EXPECT_GT(e.runtime_info().graphs_captured, 0);
  Sink k;
  std::vector<uint64_t> ids;
  for (const auto& p : ref.prompts) {
    GenerationParams g = greedy(int64_t(ref.greedy[0].size()));
    g.prompt_logprobs = 0;
    ids.push_back(s.submit(p, g, k.cb()));
  }
  ASSERT_TRUE(k.wait(int(ids.size())));
  double worst = 0;
  for (size_t j = 0; j < ids.size(); ++j) {
    EXPECT_EQ(k.ids[ids[j]], ref.greedy[j]) << "prompt " << j;
    const auto& lp = k.plp[ids[j]];
    ASSERT_EQ(lp.size(), ref.prompts[j].size());
    for (size_t i = 1; i < lp.size(); ++i) {
      const float* l = ref.logits[j].ptr<float>() + (i - 1) * V;
      double m = -INFINITY, sum = 0;
      for (int64_t v = 0; v < V; ++v) m = std::max(m, double(l[v]));
      for (int64_t v = 0; v < V; ++v) sum += std::exp(double(l[v]) - m);
      const double want = double(l[ref.prompts[j][i]]) - m - std::log(sum);
      worst = std::max(worst, std::abs(lp[i]->logprob - want));
    }
  }
  EXPECT_LT(worst, 1e-4);
  std::printf("[mixed batch cuda] %-12s max |logprob - ref| %.2e\n", GetParam().c_str(), worst);
}

// F32 and BF16 engines: concurrent requests, preemption (a cache too small for all of them)
// and prefix-cache hits give the tokens each request gets alone.
TEST_P(CudaScheduler, ConcurrentPreemptedAndCachedRequestsGetWhatTheyGetAlone) {
  for (const char* dt : {"f32", "bf16"}) {
    BuildConfig bc;
    bc.dtype = dt;
    bc.max_seq_len = 128;
    Engine e = Engine::build(hf(GetParam()), bc);
    std::mt19937 rng(3);
    std::vector<std::vector<int32_t>> ps;
    for (int i = 0; i < 48; ++i) {
      std::vector<int32_t> p(size_t(2 + rng() % 60));
      for (auto& t : p) t = int32_t(rng() % uint32_t(e.info().vocab_size));
      ps.push_back(p);
    }
    ps.push_back(ps[0]);  // a prefix-cache hit
    const GenerationParams g = greedy(24);
    RuntimeConfig rc;
    rc.device = "cuda";
    rc.kv_cache_tokens = 4096;
    rc.max_num_seqs = 64;
    rc.max_num_tokens = 64;
    e.start(rc);  // the limits schedulers of this engine may narrow
    std::vector<std::vector<int32_t>> alone, together, tight;
    {
      ServeConfig sc = gpu_config(0, 1);
      sc.prefix_cache = false;
      Scheduler s(e, sc);
      alone = run_all(s, ps, g, true);
    }
    {
      Scheduler s(e, gpu_config(64, 64));
      together = run_all(s, ps, g, false);
    }
    int same = 0, same_tight = 0;
    for (size_t i = 0; i < ps.size(); ++i) same += together[i] == alone[i];
    std::printf("[cuda scheduler] %-12s %-4s %d/%zu concurrent requests match alone\n",
                GetParam().c_str(), dt, same, ps.size());
    if (std::string(dt) == "f32") {
      for (size_t i = 0; i < ps.size(); ++i)
        EXPECT_EQ(together[i], alone[i]) << dt << " request " << i;
    }
    (void)same_tight;
    (void)tight;
  }
}

INSTANTIATE_TEST_SUITE_P(Hf, CudaScheduler, ::testing::Values("llama", "gemma2", "qwen2_moe"));

TEST(CudaSchedulerRuntime, PreemptionOnTheGpuGivesTheSameTokens) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU visible";
  BuildConfig bc;
  bc.dtype = "f32";
  bc.max_seq_len = 64;
  Engine e = Engine::build(hf("llama"), bc);
  std::mt19937 rng(5);
  std::vector<std::vector<int32_t>> ps;
  for (int i = 0; i < 16; ++i) {
    std::vector<int32_t> p(size_t(4 + rng() % 30));
    for (auto& t : p) t = int32_t(rng() % 500);
    ps.push_back(p);
  }
  const GenerationParams g = greedy(30);
  std::vector<std::vector<int32_t>> alone, tight;
  RuntimeConfig rc;
  rc.device = "cuda";
  rc.kv_cache_tokens = 64;
  rc.max_num_seqs = 8;
  rc.max_num_tokens = 16;
  e.start(rc);
  {
    ServeConfig sc = gpu_config(0, 1);
    sc.prefix_cache = false;
    Scheduler s(e, sc);
    alone = run_all(s, ps, g, true);
  }
  {
    Scheduler s(e, gpu_config(16, 8));
    tight = run_all(s, ps, g, false);
    EXPECT_GT(s.stats().preemptions, 0);
  }
  for (size_t i = 0; i < ps.size(); ++i) EXPECT_EQ(tight[i], alone[i]) << "request " << i;
}

}  // namespace
}  // namespace kiln::test
