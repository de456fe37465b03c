// The runtime over the shared KV cache: batched decode steps of several sequences at different
// positions against transformers' logits (CPU here; test_cuda_runtime.cpp repeats it on the
// GPU with CUDA graphs), and running out of KV cache as a clear error.
#include <algorithm>

#include "kiln/kiln.h"
#include "test_util.h"

namespace kiln::test {

// Feeds every reference prompt token by token, all prompts together in batched decode steps
// (a prompt leaves the batch when it ends, so rows sit at different positions and batch sizes
// pad to 4, 2 and 1), and returns the worst normalised error against the reference logits.
double batched_teacher_forcing(Engine& e, const Reference& ref) {
  const int64_t V = e.info().vocab_size;
  std::vector<Session> ss;
  for (size_t j = 0; j < ref.prompts.size(); ++j) ss.push_back(e.session());
  double worst = 0;
  for (size_t i = 0;; ++i) {
    std::vector<Session*> batch;
    std::vector<int32_t> tok;
    std::vector<size_t> which;
    for (size_t j = 0; j < ref.prompts.size(); ++j)
      if (i < ref.prompts[j].size()) {
        batch.push_back(&ss[j]);
        tok.push_back(ref.prompts[j][i]);
        which.push_back(j);
      }
    if (batch.empty()) break;
    std::vector<float> lg = e.step_logits(batch, tok);
    EXPECT_EQ(lg.size(), batch.size() * size_t(V));
    for (size_t r = 0; r < batch.size(); ++r) {
      const double err = rel_err(lg.data() + r * V, ref.logits[which[r]].ptr<float>() + i * V, V);
      worst = std::max(worst, err);
      EXPECT_LE(err, 1e-5) << "prompt " << which[r] << " position " << i << " (batched decode)";
    }
  }
  return worst;
}

namespace {

class BatchedDecode : public ::testing::TestWithParam<std::string> {};

TEST_P(BatchedDecode, MatchesReferenceAtEveryPosition) {
  Reference ref = load_reference(GetParam());
  ASSERT_GE(ref.prompts.size(), 3u);
  BuildConfig bc;
  bc.dtype = "f32";
  Engine e = Engine::build(hf(GetParam()), bc);
  e.start({.device = "cpu"});
  const double worst = batched_teacher_forcing(e, ref);
  std::printf("[batched decode cpu] %-12s max rel err %.2e\n", GetParam().c_str(), worst);
}

// Dense, sliding-window + soft-capping, and MoE layers.
INSTANTIATE_TEST_SUITE_P(Hf, BatchedDecode, ::testing::Values("llama", "gemma2", "qwen2_moe"));

TEST(Runtime, StepPicksTokensPerSessionSettings) {
  Reference ref = load_reference("llama");
  BuildConfig bc;
  bc.dtype = "f32";
  Engine e = Engine::build(hf("llama"), bc);
  e.start({.device = "cpu"});
  // Two greedy sessions in one batch continue exactly as the reference greedy runs do.
  Session a = e.session(), b = e.session();
  SamplingParams g;
  g.temperature = 0;
  a.set_sampling(g);
  b.set_sampling(g);
  std::vector<int32_t> t = {a.next(ref.prompts[0]), b.next(ref.prompts[1])};
  std::vector<std::vector<int32_t>> got(2);
  std::vector<Session*> both = {&a, &b};
  for (int i = 0; i < 8; ++i) {
    got[0].push_back(t[0]);
    got[1].push_back(t[1]);
    t = e.step(both, t);
  }
  EXPECT_EQ(got[0], std::vector<int32_t>(ref.greedy[0].begin(), ref.greedy[0].begin() + 8));
  EXPECT_EQ(got[1], std::vector<int32_t>(ref.greedy[1].begin(), ref.greedy[1].begin() + 8));
  // Bad steps are errors, not crashes.
  std::vector<int32_t> one = {1};
  std::vector<Session*> twice = {&a, &a};
  std::vector<int32_t> two = {1, 2};
  EXPECT_THROW(e.step(both, one), Error);
  EXPECT_THROW(e.step(twice, two), Error);
}

TEST(Runtime, FullKvCacheIsAClearError) {
  BuildConfig bc;
  bc.dtype = "f32";
  bc.max_seq_len = 64;
  Engine e = Engine::build(hf("llama"), bc);
  RuntimeConfig rc;
  rc.device = "cpu";
  rc.kv_cache_tokens = 64;  // one full sequence
  e.start(rc);
  EXPECT_EQ(e.runtime_info().kv_cache_tokens, 64);
  Session a = e.session();
  std::vector<int32_t> p(40, 5);
  a.forward(p);
  Session b = e.session();
  try {
    b.forward(p);  // 40 more tokens: only 24 are left
    FAIL() << "expected a KV cache full error";
  } catch (const Error& ex) {
    EXPECT_NE(std::string(ex.what()).find("KV cache full"), std::string::npos) << ex.what();
  }
  // The first sequence goes on; once it is gone its blocks serve the second.
  EXPECT_NO_THROW(a.forward(std::vector<int32_t>{6}));
  { Session gone = std::move(a); }
  EXPECT_NO_THROW(b.forward(p));
  // A session longer than the whole cache is refused up front.
  EXPECT_THROW(e.session(65), Error);
}

TEST(Runtime, KvCacheSettingsAreChecked) {
  BuildConfig bc;
  bc.dtype = "f32";
  bc.max_seq_len = 64;
  {
    Engine e = Engine::build(hf("llama"), bc);
    RuntimeConfig rc;
    rc.device = "cpu";
    rc.kv_cache_tokens = 32;  // less than one sequence of max_seq_len
    EXPECT_THROW(e.start(rc), Error);
  }
  {
    Engine e = Engine::build(hf("llama"), bc);
    RuntimeConfig rc;
    rc.device = "cpu";
    rc.kv_cache_fraction = 1.5;
    EXPECT_THROW(e.start(rc), Error);
  }
  // Settings that would change nothing are refused, not ignored.
  auto start_error = [&](const RuntimeConfig& rc) -> std::string {
    Engine e = Engine::build(hf("llama"), bc);
    try {
      e.start(rc);
    } catch (const Error& ex) {
      return ex.what();
    }
    return "";
  };
  RuntimeConfig rc;
  rc.device = "cpu";
  rc.kv_cache_fraction = 0.5;
  EXPECT_NE(start_error(rc).find("--kv-cache-fraction sizes a GPU's KV cache"), std::string::npos);
  rc.kv_cache_tokens = 128;
  EXPECT_NE(start_error(rc).find("give one"), std::string::npos);
}

TEST(Runtime, BuildOptionsForABuiltEngineAreRefused) {
  TempDir tmp;
  Engine::build_to(hf("llama"), tmp / "e");
  BuildConfig bc;
  EXPECT_NO_THROW(Engine::open(tmp / "e", bc));
  bc.dtype = "bf16";
  try {
    Engine::open(tmp / "e", bc);
    FAIL() << "expected an error";
  } catch (const Error& ex) {
    EXPECT_NE(std::string(ex.what()).find("is a built engine; --dtype applies only when building"),
              std::string::npos)
        << ex.what();
  }
  std::string out;
  EXPECT_EQ(run_cli("run " + (tmp / "e").string() + " --prompt-ids 1,2 --max-seq-len 8", &out), 1);
  EXPECT_NE(out.find("kiln: error: " + (tmp / "e").string() + ": is a built engine; --max-seq-len"),
            std::string::npos)
      << out;
  EXPECT_EQ(run_cli("verify " + (tmp / "e").string(), &out), 0) << out;
  EXPECT_NE(out.find(": ok ("), std::string::npos) << out;
  EXPECT_EQ(
      run_cli("build " + hf("llama").string() + " -o " + (tmp / "f").string() + " --seed 3", &out),
      1);
  EXPECT_NE(out.find("kiln: error: --seed is for --dummy-weights"), std::string::npos) << out;
}

TEST(Runtime, BenchPrintsMarkdownAndJson) {
  TempDir tmp;
  std::string out;
  ASSERT_EQ(run_cli("build " + hf("llama").string() + " --dtype f32 --max-seq-len 64 -o " +
                        (tmp / "e").string(),
                    &out),
            0)
      << out;
  ASSERT_EQ(run_cli("bench " + (tmp / "e").string() + " --device cpu -p 8 -n 4 -b 1,3 -r 1", &out),
            0)
      << out;
  EXPECT_NE(out.find("| pp8 | 1 |"), std::string::npos) << out;
  EXPECT_NE(out.find("| tg4 | 3 |"), std::string::npos) << out;
  ASSERT_EQ(
      run_cli("bench " + (tmp / "e").string() + " --device cpu -p 0 -n 4 -b 2 -r 2 -o json", &out),
      0)
      << out;
  auto j = nlohmann::json::parse(out);
  ASSERT_EQ(j.size(), 1u);
  EXPECT_EQ(j[0]["test"], "tg4");
  EXPECT_EQ(j[0]["n_batch"], 2);
  EXPECT_EQ(j[0]["samples_ts"].size(), 2u);
  EXPECT_GT(j[0]["avg_ts"].get<double>(), 0.0);
  EXPECT_EQ(j[0]["tp"], 1);
  EXPECT_EQ(j[0]["pp"], 1);
  // Ranks show in the backend column (and the JSON's tp / pp), as llama-bench shows its split.
  ASSERT_EQ(run_cli("bench " + (tmp / "e").string() + " --device cpu -p 0 -n 4 -r 1 --tp 2", &out),
            0)
      << out;
  EXPECT_NE(out.find("| CPU tp2 |"), std::string::npos) << out;
  ASSERT_EQ(run_cli("bench " + (tmp / "e").string() +
                        " --device cpu -p 0 -n 4 -r 1 --tp 2 --pp 2 -o json",
                    &out),
            0)
      << out;
  j = nlohmann::json::parse(out);
  EXPECT_EQ(j[0]["backend"], "CPU");
  EXPECT_EQ(j[0]["tp"], 2);
  EXPECT_EQ(j[0]["pp"], 2);
  EXPECT_EQ(run_cli("bench " + (tmp / "e").string() + " --device cpu -o xml", &out), 1);
  EXPECT_NE(out.find("-o: expected md or json"), std::string::npos) << out;
}

}  // namespace
}  // namespace kiln::test
