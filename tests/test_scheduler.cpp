// The continuous-batching scheduler on the CPU: mixed batches (prefill chunks next to decodes)
// against transformers' logits, requests that give the same tokens alone and together, under
// preemption and from the prefix cache, stop rules, cancellation and refused requests.
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include <cstring>
#include <limits>

#include "io/safetensors.h"
#include "kiln/serving.h"
#include "test_util.h"

namespace kiln::test {
namespace {

// Collects every event of every request; wait() blocks until `n` requests finished.
struct Collector {
  struct Out {
    std::vector<int32_t> ids;
    std::string text;
    FinishReason finish = FinishReason::None;
    std::string stop_reason, error;
    std::vector<TokenLogprob> lps;
    std::vector<std::optional<TokenLogprob>> prompt_lps;
    int64_t cached = 0;
    int events = 0;
    bool first_seen = false;
  };
  std::mutex mu;
  std::condition_variable cv;
  std::map<std::pair<uint64_t, int>, Out> out;
  int finished = 0;

  Scheduler::Callback cb() {
    return [this](const RequestOutput& o) {
      std::lock_guard<std::mutex> l(mu);
      Out& x = out[{o.request_id, o.index}];
      x.ids.insert(x.ids.end(), o.token_ids.begin(), o.token_ids.end());
      x.text += o.text;
      x.lps.insert(x.lps.end(), o.logprobs.begin(), o.logprobs.end());
      if (!o.prompt_logprobs.empty()) x.prompt_lps = o.prompt_logprobs;
      EXPECT_EQ(o.first, x.events == 0);
      ++x.events;
      x.cached = o.cached_tokens;
      EXPECT_EQ(o.completion_tokens, int64_t(x.ids.size()));
      if (o.finish != FinishReason::None) {
        EXPECT_EQ(x.finish, FinishReason::None) << "two finish events";
        x.finish = o.finish;
        x.stop_reason = o.stop_reason;
        x.error = o.error;
        ++finished;
        cv.notify_all();
      }
    };
  }
  void wait(int n) {
    std::unique_lock<std::mutex> l(mu);
    ASSERT_TRUE(cv.wait_for(l, std::chrono::seconds(120), [&] { return finished >= n; }))
        << finished << " of " << n << " finished";
  }
  Out get(uint64_t id, int index = 0) {
    std::lock_guard<std::mutex> l(mu);
    return out[{id, index}];
  }
};

Engine fixture_engine(const std::string& arch, int64_t max_seq_len = 0) {
  BuildConfig bc;
  bc.dtype = "f32";
  bc.max_seq_len = max_seq_len;
  return Engine::build(hf(arch), bc);
}

ServeConfig cpu_config(int64_t max_tokens = 0, int64_t max_seqs = 0, int64_t kv_tokens = 0) {
  ServeConfig sc;
  sc.runtime.device = "cpu";
  sc.runtime.kv_cache_tokens = kv_tokens;
  sc.max_num_tokens = max_tokens;
  sc.max_num_seqs = max_seqs;
  return sc;
}

// Stats are published after each step's events: wait until the scheduler is idle.
SchedulerStats settled(const Scheduler& s) {
  for (int i = 0; i < 2000; ++i) {
    const SchedulerStats st = s.stats();
    if (st.running == 0 && st.waiting == 0 && st.kv_blocks_used == 0) return st;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return s.stats();
}

GenerationParams greedy(int64_t max_tokens) {
  GenerationParams p;
  p.temperature = 0.0f;
  p.max_tokens = max_tokens;
  p.ignore_eos = true;
  return p;
}

std::vector<double> log_softmax(const float* l, int64_t V) {
  double m = -INFINITY, s = 0;
  for (int64_t i = 0; i < V; ++i) m = std::max(m, double(l[i]));
  for (int64_t i = 0; i < V; ++i) s += std::exp(double(l[i]) - m);
  std::vector<double> r(static_cast<size_t>(V));
  for (int64_t i = 0; i < V; ++i) r[size_t(i)] = double(l[i]) - m - std::log(s);
  return r;
}

// Every reference prompt at once, prefills chunked by a small token budget so chunks of one
// prompt share steps with decodes of others: prompt log-probabilities match transformers'
// logits and the greedy continuations are transformers' greedy continuations.
class MixedBatch : public ::testing::TestWithParam<std::string> {};

TEST_P(MixedBatch, ChunkedPrefillsAndDecodesMatchTheReference) {
  Reference ref = load_reference(GetParam());
  Engine e = fixture_engine(GetParam());
  const int64_t V = e.info().vocab_size;
  Scheduler s(e, cpu_config(/*max_tokens=*/8, /*max_seqs=*/4));
  Collector c;
  std::vector<uint64_t> ids;
  for (const auto& p : ref.prompts) {
    GenerationParams g = greedy(int64_t(ref.greedy[0].size()));
    g.prompt_logprobs = 1;
    ids.push_back(s.submit(p, g, c.cb()));
  }
  c.wait(int(ids.size()));
  double worst = 0;
  for (size_t j = 0; j < ids.size(); ++j) {
    const Collector::Out o = c.get(ids[j]);
    EXPECT_EQ(o.finish, FinishReason::Length);
    EXPECT_EQ(o.ids, ref.greedy[j]) << "prompt " << j;
    ASSERT_EQ(o.prompt_lps.size(), ref.prompts[j].size());
    EXPECT_FALSE(o.prompt_lps[0].has_value());
    for (size_t i = 1; i < ref.prompts[j].size(); ++i) {
      ASSERT_TRUE(o.prompt_lps[i].has_value());
      const auto want = log_softmax(ref.logits[j].ptr<float>() + (i - 1) * V, V);
      const double d = std::abs(o.prompt_lps[i]->logprob - want[size_t(ref.prompts[j][i])]);
      worst = std::max(worst, d);
      EXPECT_LT(d, 1e-4) << "prompt " << j << " token " << i;
      ASSERT_EQ(o.prompt_lps[i]->top.size(), 1u);
    }
  }
  std::printf("[mixed batch cpu] %-12s max |logprob - ref| %.2e, %lld steps\n", GetParam().c_str(),
              worst, (long long)s.stats().steps);
}

INSTANTIATE_TEST_SUITE_P(Hf, MixedBatch,
                         ::testing::Values("llama", "gemma2", "qwen2_moe", "gpt2", "phi3"));

// The tokens a request gets alone (one sequence per step, no cache sharing).
std::vector<std::vector<int32_t>> alone(Engine& e, const std::vector<std::vector<int32_t>>& prompts,
                                        const GenerationParams& g) {
  ServeConfig sc = cpu_config(0, 1);
  sc.prefix_cache = false;
  Scheduler s(e, sc);
  std::vector<std::vector<int32_t>> r;
  for (const auto& p : prompts) {
    Collector c;
    const uint64_t id = s.submit(p, g, c.cb());
    c.wait(1);
    r.push_back(c.get(id).ids);
  }
  return r;
}

std::vector<std::vector<int32_t>> prompts_of(int count, int64_t V, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::vector<int32_t>> ps;
  for (int i = 0; i < count; ++i) {
    std::vector<int32_t> p(size_t(3 + rng() % 40));
    for (auto& t : p) t = int32_t(rng() % uint32_t(V));
    ps.push_back(p);
  }
  return ps;
}

TEST(Scheduler, ConcurrentRequestsGetWhatTheyGetAlone) {
  Engine e = fixture_engine("llama", 128);
  const auto ps = prompts_of(24, e.info().vocab_size, 7);
  GenerationParams g = greedy(20);
  GenerationParams sampled = g;
  sampled.temperature = 0.8f;
  sampled.top_p = 0.9f;
  sampled.seed = 42;
  e.start({.device = "cpu"});
  const auto want = alone(e, ps, g);
  const auto want_sampled = alone(e, ps, sampled);
  Scheduler s(e, cpu_config(32, 16));
  Collector c;
  std::vector<uint64_t> a, b;
  for (const auto& p : ps) {
    a.push_back(s.submit(p, g, c.cb()));
    b.push_back(s.submit(p, sampled, c.cb()));
  }
  c.wait(int(2 * ps.size()));
  for (size_t i = 0; i < ps.size(); ++i) {
    EXPECT_EQ(c.get(a[i]).ids, want[i]) << "greedy request " << i;
    EXPECT_EQ(c.get(b[i]).ids, want_sampled[i]) << "seeded request " << i;
  }
  const SchedulerStats st = settled(s);
  EXPECT_EQ(st.kv_blocks_used, 0);
  EXPECT_EQ(st.running, 0);
}

// The step limits a ServeConfig asks for hold even above the engine's defaults, when the engine
// is started first with engine_runtime() (as `kiln serve` and `kiln bench offline` do), and
// on_step reports every step: decode rows, prompt chunks and their tokens.
TEST(Scheduler, StepLimitsAboveTheDefaultsAndStepReports) {
  Engine e = fixture_engine("llama", 64);
  const auto ps = prompts_of(40, e.info().vocab_size, 5);
  ServeConfig sc = cpu_config(4096, 40, 4096);  // CPU defaults: 16 sequences, 2048 tokens
  std::mutex mu;
  std::vector<StepInfo> steps;
  sc.on_step = [&](const StepInfo& si) {
    std::lock_guard<std::mutex> l(mu);
    steps.push_back(si);
  };
  e.start(sc.engine_runtime());
  EXPECT_EQ(e.runtime_info().max_num_seqs, 40);
  Scheduler s(e, sc);
  Collector c;
  int64_t prompt_tokens = 0;
  for (const auto& p : ps) {
    s.submit(p, greedy(6), c.cb());
    prompt_tokens += int64_t(p.size());
  }
  c.wait(int(ps.size()));
  settled(s);
  std::lock_guard<std::mutex> l(mu);
  int64_t most = 0, decodes = 0, chunk_tokens = 0;
  for (const StepInfo& si : steps) {
    most = std::max(most, si.decodes);
    decodes += si.decodes;
    chunk_tokens += si.prefill_tokens;
    EXPECT_GE(si.seconds, 0.0);
    EXPECT_LE(si.decodes + si.prefill_seqs, 40);
  }
  EXPECT_EQ(most, 40) << "every sequence decodes in one step";
  EXPECT_EQ(decodes, 40 * 5);  // 6 tokens: the first from the prompt's step, 5 from decodes
  EXPECT_EQ(chunk_tokens, prompt_tokens);
}

// A checkpoint whose final norm weight is NaN makes every logit NaN: the request ends with an
// error naming the cause (finish abort), never with tokens picked from NaN; `kiln run` says so
// in one line and exits 1.
TEST(Scheduler, NonFiniteLogitsEndTheRequestWithAnError) {
  TempDir tmp;
  copy_dir(hf("llama"), tmp / "m");
  {
    std::vector<std::pair<std::string, Tensor>> ts;
    {
      const auto f = SafetensorsFile::open(tmp / "m" / "model.safetensors");
      for (const auto& [name, info] : f->tensors()) {
        const Tensor v = f->get(name);
        Tensor t = Tensor::zeros(v.dtype, v.shape);
        std::memcpy(t.data, v.data, t.nbytes());
        if (name == "model.norm.weight") {
          std::vector<float> nan(size_t(t.numel()), std::numeric_limits<float>::quiet_NaN());
          from_f32(t.dtype, nan.data(), t.data, nan.size());
        }
        ts.emplace_back(name, std::move(t));
      }
    }
    write_safetensors(tmp / "m" / "model.safetensors", ts);
  }
  BuildConfig bc;
  bc.dtype = "f32";
  Engine e = Engine::build(tmp / "m", bc);
  Scheduler s(e, cpu_config());
  Collector c;
  const uint64_t id = s.submit({1, 2, 3}, greedy(4), c.cb());
  c.wait(1);
  const Collector::Out o = c.get(id);
  EXPECT_EQ(o.finish, FinishReason::Abort);
  EXPECT_TRUE(o.ids.empty());
  EXPECT_NE(o.error.find("non-finite logits"), std::string::npos) << o.error;
  EXPECT_EQ(settled(s).kv_blocks_used, 0);

  std::string out;
  const int rc = run_cli("run " + (tmp / "m").string() + " --device cpu --prompt-ids 1,2,3", &out);
  EXPECT_EQ(rc, 1) << out;
  EXPECT_EQ(out.rfind("kiln: error: ", 0), 0u) << out;
  EXPECT_NE(out.find("non-finite logits"), std::string::npos) << out;
}

TEST(Scheduler, PreemptionByRecomputeGivesTheSameTokens) {
  Engine e = fixture_engine("llama", 64);
  const auto ps = prompts_of(12, e.info().vocab_size, 11);
  GenerationParams g = greedy(24);
  e.start({.device = "cpu", .kv_cache_tokens = 64});
  const auto want = alone(e, ps, g);
  // 64 tokens of cache for 12 sequences of up to 66 tokens: they must take turns.
  Scheduler s(e, cpu_config(16, 8, 64));
  Collector c;
  std::vector<uint64_t> ids;
  for (const auto& p : ps) ids.push_back(s.submit(p, g, c.cb()));
  c.wait(int(ps.size()));
  for (size_t i = 0; i < ps.size(); ++i) EXPECT_EQ(c.get(ids[i]).ids, want[i]) << "request " << i;
  const SchedulerStats st = settled(s);
  EXPECT_GT(st.preemptions, 0);
  EXPECT_EQ(st.kv_blocks_used, 0);
}

TEST(Scheduler, PrefixCacheHitGivesTheSameTokens) {
  Engine e = fixture_engine("llama", 128);
  std::vector<int32_t> p(50);
  for (size_t i = 0; i < p.size(); ++i) p[i] = int32_t((i * 37 + 5) % 500);
  GenerationParams g = greedy(12);
  std::vector<int32_t> q = p;
  q.insert(q.end(), {7, 8, 9});
  e.start({.device = "cpu"});
  const auto q_alone = alone(e, {q}, g)[0];  // one scheduler per engine at a time
  Scheduler s(e, cpu_config());
  Collector c;
  const uint64_t a = s.submit(p, g, c.cb());
  c.wait(1);
  const uint64_t b = s.submit(p, g, c.cb());
  c.wait(2);
  EXPECT_EQ(c.get(a).cached, 0);
  EXPECT_EQ(c.get(b).cached, 48);  // three full blocks of 16; the last token is recomputed
  EXPECT_EQ(c.get(a).ids, c.get(b).ids);
  EXPECT_EQ(settled(s).prefix_hits, 48);
  EXPECT_EQ(s.stats().prefix_queries, 100);
  // A longer prompt sharing the prefix gets what it gets without the cache.
  const uint64_t d = s.submit(q, g, c.cb());
  c.wait(3);
  EXPECT_EQ(c.get(d).cached, 48);
  EXPECT_EQ(c.get(d).ids, q_alone);
}

TEST(Scheduler, CancelFreesBlocksAndEndsWithAbort) {
  Engine e = fixture_engine("llama", 256);
  Scheduler s(e, cpu_config());
  Collector c;
  std::atomic<int> tokens{0};
  uint64_t id = 0;
  id = s.submit(std::vector<int32_t>(20, 3), greedy(200), [&](const RequestOutput& o) {
    tokens += int(o.token_ids.size());
    c.cb()(o);
  });
  for (int i = 0; i < 2000 && tokens < 3; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  s.cancel(id);
  c.wait(1);
  EXPECT_EQ(c.get(id).finish, FinishReason::Abort);
  EXPECT_LT(c.get(id).ids.size(), 200u);
  EXPECT_EQ(settled(s).kv_blocks_used, 0);
  s.cancel(id);  // again: ignored
  s.cancel(12345);
}

TEST(Scheduler, RefusesBadRequests) {
  Engine e = fixture_engine("llama", 64);
  ServeConfig sc = cpu_config();
  sc.max_queue = 2;
  Scheduler s(e, sc);
  auto refused = [&](std::vector<int32_t> p, GenerationParams g, const std::string& what) {
    try {
      s.submit(std::move(p), g, nullptr);
      ADD_FAILURE() << "accepted; expected an error mentioning '" << what << "'";
    } catch (const Error& ex) {
      EXPECT_NE(std::string(ex.what()).find(what), std::string::npos) << ex.what();
    }
  };
  const std::vector<int32_t> p = {1, 2, 3};
  GenerationParams g = greedy(4);
  g.temperature = -1.0f;
  refused(p, g, "temperature");
  g = greedy(4);
  g.top_p = 0.0f;
  refused(p, g, "top_p");
  g = greedy(4);
  g.logit_bias = {{9999, 1.0f}};
  refused(p, g, "logit_bias");
  g = greedy(4);
  g.n = 0;
  refused(p, g, "n must");
  refused({}, greedy(4), "empty");
  refused({1, 600}, greedy(4), "vocabulary");
  refused(std::vector<int32_t>(60, 1), greedy(10), "max_seq_len of 64");
  refused(std::vector<int32_t>(65, 1), GenerationParams{}, "max_seq_len");
}

TEST(Scheduler, QueueFullIsRefused) {
  Engine e = fixture_engine("llama", 256);
  ServeConfig sc = cpu_config(0, 1);
  sc.max_queue = 2;
  Scheduler s(e, sc);
  Collector c;
  int accepted = 0, full = 0;
  for (int i = 0; i < 8; ++i) {
    try {
      s.submit(std::vector<int32_t>(10, 3), greedy(100), c.cb());
      ++accepted;
    } catch (const QueueFull&) {
      ++full;
    }
  }
  EXPECT_GT(full, 0);
  EXPECT_GE(accepted, 2);
  c.wait(accepted);
}

// Text-level rules on the demo model (a real byte-level BPE tokenizer).
TEST(Scheduler, StopStringsAcrossTokenBoundaries) {
  Engine e = Engine::open(demo());
  Scheduler s(e, cpu_config());
  const std::vector<int32_t> p = {1, 40, 41, 42, 43};
  Collector c;
  const uint64_t a = s.submit(p, greedy(40), c.cb());
  c.wait(1);
  const Collector::Out full = c.get(a);
  ASSERT_GE(full.text.size(), 12u) << full.text;
  // A stop string that starts inside one token and ends inside a later one.
  std::string stop;
  size_t at = 0;
  {
    Collector c2;
    GenerationParams g = greedy(40);
    g.detokenize = true;
    // Find token boundaries by decoding prefixes of the ids.
    std::vector<size_t> ends;
    std::string acc;
    for (size_t i = 0; i < full.ids.size(); ++i) {
      GenerationParams one = greedy(int64_t(i + 1));
      const uint64_t id = s.submit(p, one, c2.cb());
      c2.wait(int(i + 1));
      ends.push_back(c2.get(id).text.size());
      if (ends.size() >= 4) break;
    }
    ASSERT_GE(ends.size(), 4u);
    // From the middle of the 2nd token's text to the middle of the 4th's.
    const size_t from = ends[0] + (ends[1] - ends[0]) / 2,
                 to = ends[2] + (ends[3] - ends[2] + 1) / 2;
    ASSERT_LT(from, to);
    stop = full.text.substr(from, to - from);
    at = full.text.find(stop);
  }
  for (bool include : {false, true}) {
    GenerationParams g = greedy(40);
    g.stop = {"never-appears-xyz", stop};
    g.include_stop_str_in_output = include;
    Collector c3;
    const uint64_t b = s.submit(p, g, c3.cb());
    c3.wait(1);
    const Collector::Out o = c3.get(b);
    EXPECT_EQ(o.finish, FinishReason::Stop);
    EXPECT_EQ(o.stop_reason, stop);
    EXPECT_EQ(o.text, full.text.substr(0, at + (include ? stop.size() : 0)));
    EXPECT_LT(o.ids.size(), full.ids.size());
  }
}

TEST(Scheduler, StopTokensMinTokensAndLogitBias) {
  Engine e = fixture_engine("llama", 128);
  Scheduler s(e, cpu_config());
  const std::vector<int32_t> p = {1, 2, 3, 4};
  Collector c;
  const uint64_t a = s.submit(p, greedy(16), c.cb());
  c.wait(1);
  const auto ref = c.get(a).ids;
  // Stop at the 5th token's id (first occurrence).
  GenerationParams g = greedy(16);
  g.stop_token_ids = {ref[4]};
  const size_t first = size_t(std::find(ref.begin(), ref.end(), ref[4]) - ref.begin());
  const uint64_t b = s.submit(p, g, c.cb());
  c.wait(2);
  EXPECT_EQ(c.get(b).finish, FinishReason::Stop);
  EXPECT_EQ(c.get(b).stop_reason, std::to_string(ref[4]));
  EXPECT_EQ(c.get(b).ids, std::vector<int32_t>(ref.begin(), ref.begin() + first + 1));
  // A +100 bias makes one token the greedy pick at every step.
  GenerationParams h = greedy(6);
  h.logit_bias = {{77, 100.0f}};
  const uint64_t d = s.submit(p, h, c.cb());
  c.wait(3);
  EXPECT_EQ(c.get(d).ids, std::vector<int32_t>(6, 77));
  // min_tokens: the stop id is banned until 8 tokens are out, so it cannot end the reply early.
  GenerationParams m = greedy(12);
  m.stop_token_ids = {77};
  m.logit_bias = {{77, 100.0f}};
  m.min_tokens = 8;
  const uint64_t f = s.submit(p, m, c.cb());
  c.wait(4);
  const auto mo = c.get(f);
  EXPECT_EQ(mo.finish, FinishReason::Stop);
  ASSERT_EQ(mo.ids.size(), 9u);
  EXPECT_NE(mo.ids[7], 77);
  EXPECT_EQ(mo.ids[8], 77);
}

// gpt2's fixture keeps its family's eos (50256) past its 512-token vocabulary, as HF does:
// min_tokens bans only ids that can come up, and the reply is the unbanned one.
TEST(Scheduler, MinTokensWithAnEosPastTheVocabulary) {
  Engine e = fixture_engine("gpt2", 64);
  ASSERT_GT(e.info().eos_token_ids.at(0), e.info().vocab_size);
  Scheduler s(e, cpu_config());
  const std::vector<int32_t> p = {1, 2, 3, 4};
  Collector c;
  const uint64_t a = s.submit(p, greedy(6), c.cb());
  GenerationParams g = greedy(6);
  g.min_tokens = 4;
  const uint64_t b = s.submit(p, g, c.cb());
  c.wait(2);
  EXPECT_EQ(c.get(b).error, "");
  EXPECT_EQ(c.get(b).finish, FinishReason::Length);
  EXPECT_EQ(c.get(b).ids, c.get(a).ids);
}

// generation_config.json's repetition_penalty applies unless a request sets its own.
TEST(Scheduler, RepetitionPenaltyDefaultsFromGenerationConfig) {
  TempDir tmp;
  copy_dir(hf("llama"), tmp / "m");
  auto gc = read_json(tmp / "m" / "generation_config.json");
  gc["repetition_penalty"] = 3.0;
  write_json(tmp / "m" / "generation_config.json", gc);
  BuildConfig bc;
  bc.dtype = "f32";
  bc.max_seq_len = 128;
  Engine plain = fixture_engine("llama", 128);
  Engine penalised = Engine::build(tmp / "m", bc);
  const std::vector<int32_t> p = {1, 2, 3, 4, 5, 6};
  std::vector<int32_t> a, b, c;
  {
    Scheduler s(plain, cpu_config());
    Collector k;
    const uint64_t id = s.submit(p, greedy(24), k.cb());
    k.wait(1);
    a = k.get(id).ids;
  }
  {
    Scheduler s(penalised, cpu_config());
    Collector k;
    const uint64_t id = s.submit(p, greedy(24), k.cb());
    GenerationParams off = greedy(24);
    off.repetition_penalty = 1.0f;
    const uint64_t id2 = s.submit(p, off, k.cb());
    k.wait(2);
    b = k.get(id).ids;
    c = k.get(id2).ids;
  }
  EXPECT_NE(a, b);  // a strong default penalty changes greedy continuations
  EXPECT_EQ(a, c);  // and a request's own value overrides it
}

TEST(Scheduler, LogprobsAndSeveralCompletions) {
  Engine e = fixture_engine("llama", 128);
  const int64_t V = e.info().vocab_size;
  Reference ref = load_reference("llama");
  Scheduler s(e, cpu_config());
  Collector c;
  GenerationParams g = greedy(3);
  g.logprobs = 5;
  const uint64_t a = s.submit(ref.prompts[2], g, c.cb());
  c.wait(1);
  const auto o = c.get(a);
  ASSERT_EQ(o.lps.size(), 3u);
  // The first generated token's distribution is the reference's last prompt position.
  const auto want = log_softmax(ref.logits[2].ptr<float>() + (ref.prompts[2].size() - 1) * V, V);
  EXPECT_EQ(o.lps[0].id, o.ids[0]);
  EXPECT_NEAR(o.lps[0].logprob, want[size_t(o.ids[0])], 1e-4);
  ASSERT_EQ(o.lps[0].top.size(), 5u);
  EXPECT_EQ(o.lps[0].top[0].first, o.ids[0]);  // greedy picks the most likely token
  for (size_t i = 1; i < 5; ++i) EXPECT_GE(o.lps[0].top[i - 1].second, o.lps[0].top[i].second);
  // n = 3 sampled completions: distinct streams, each reproducible by its seed.
  GenerationParams n3 = greedy(8);
  n3.temperature = 1.0f;
  n3.seed = 5;
  n3.n = 3;
  const uint64_t b = s.submit(ref.prompts[1], n3, c.cb());
  c.wait(4);
  EXPECT_NE(c.get(b, 0).ids, c.get(b, 1).ids);
  GenerationParams one = n3;
  one.n = 1;
  one.seed = 6;  // completion 1 of seed 5 is seed 6
  const uint64_t d = s.submit(ref.prompts[1], one, c.cb());
  c.wait(5);
  EXPECT_EQ(c.get(d).ids, c.get(b, 1).ids);
}

}  // namespace
}  // namespace kiln::test
