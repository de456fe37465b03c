// HF parity: every position of every reference prompt, as one prefill and as prefill of the
// first token followed by one-token decode steps; 16-token greedy continuations identical.
#include <cstring>

#include "kiln/kiln.h"
#include "test_util.h"

namespace kiln::test {
namespace {

constexpr double kTol = 1e-5;  // ||delta|| / ||ref|| per position, FP32

class Parity : public ::testing::TestWithParam<std::string> {};

TEST_P(Parity, PrefillDecodeAndGreedy) {
  const std::string arch = GetParam();
  Reference ref = load_reference(arch);
  BuildConfig bc;
  bc.dtype = "f32";
  Engine e = Engine::build(hf(arch), bc);
  e.start({.device = "cpu"});
  const int64_t V = e.info().vocab_size;
  double worst_prefill = 0, worst_decode = 0;
  int greedy_match = 0;
  for (size_t j = 0; j < ref.prompts.size(); ++j) {
    const auto& p = ref.prompts[j];
    const float* want = ref.logits[j].ptr<float>();
    ASSERT_EQ(ref.logits[j].shape, (Shape{int64_t(p.size()), V}));
    std::vector<float> got = e.logits(p);
    for (size_t i = 0; i < p.size(); ++i) {
      double err = rel_err(got.data() + i * V, want + i * V, V);
      worst_prefill = std::max(worst_prefill, err);
      EXPECT_LE(err, kTol) << arch << " prompt " << j << " position " << i << " (prefill)";
    }
    Session s = e.session();
    for (size_t i = 0; i < p.size(); ++i) {
      std::vector<float> step = s.forward(std::span<const int32_t>(&p[i], 1));
      double err = rel_err(step.data(), want + i * V, V);
      worst_decode = std::max(worst_decode, err);
      EXPECT_LE(err, kTol) << arch << " prompt " << j << " position " << i << " (decode)";
    }
    SamplingParams sp;
    sp.temperature = 0;
    sp.max_tokens = int64_t(ref.greedy[j].size());
    sp.ignore_eos = true;
    std::vector<int32_t> gen = e.generate(p, sp);
    EXPECT_EQ(gen, ref.greedy[j]) << arch << " prompt " << j;
    greedy_match += gen == ref.greedy[j];
  }
  std::printf("[parity] %-14s prefill max rel err %.2e | decode max rel err %.2e | greedy %d/%zu\n",
              arch.c_str(), worst_prefill, worst_decode, greedy_match, ref.prompts.size());
}

// A BF16 engine on the CPU (matrices rounded to BF16, arithmetic in F32) against the float64
// reference, at the bound the GPU's BF16 engines are held to (CudaParity.Bf16StaysClose). This is
// the part of the GPU's error that comes from the weights alone, so a fixture too sensitive to
// BF16 rounding (a MoE token near a routing tie) fails here in CI, not only on the device:
// the first GPT-OSS fixture routed a token differently with BF16 weights (0.42 at one position).
// tests/fixtures/make_hf_fixtures.py holds MoE fixtures to 1.5e-2 here and to identical routing.
TEST_P(Parity, Bf16WeightsStayClose) {
  const std::string arch = GetParam();
  Reference ref = load_reference(arch);
  BuildConfig bc;
  bc.dtype = "bf16";
  Engine e = Engine::build(hf(arch), bc);
  e.start({.device = "cpu"});
  const int64_t V = e.info().vocab_size;
  double worst = 0;
  for (size_t j = 0; j < ref.prompts.size(); ++j) {
    const auto& p = ref.prompts[j];
    const std::vector<float> got = e.logits(p);
    for (size_t i = 0; i < p.size(); ++i) {
      const double err = rel_err(got.data() + i * V, ref.logits[j].ptr<float>() + i * V, V);
      worst = std::max(worst, err);
      EXPECT_LE(err, 2e-2) << arch << " prompt " << j << " position " << i;
    }
  }
  std::printf("[parity bf16 weights] %-14s max rel err %.2e\n", arch.c_str(), worst);
}

INSTANTIATE_TEST_SUITE_P(Hf, Parity, ::testing::ValuesIn(kHfParityFixtures));

TEST(Engine, RoundTripIsBitIdentical) {
  TempDir tmp;
  BuildConfig bc;
  bc.dtype = "f32";
  Engine mem = Engine::build(hf("qwen3"), bc);
  mem.save(tmp / "e");
  EXPECT_TRUE(Engine::is_engine_dir(tmp / "e"));
  EXPECT_TRUE(fs::exists(tmp / "e" / "generation_config.json"));
  Engine disk = Engine::load(tmp / "e");
  const std::vector<int32_t> p = {5, 17, 300, 2, 99, 42, 7};
  std::vector<float> a = mem.logits(p), b = disk.logits(p);
  ASSERT_EQ(a.size(), b.size());
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * 4), 0);
  // No temporary folders are left beside the engine.
  for (const auto& d : fs::directory_iterator(tmp.path))
    EXPECT_EQ(d.path().filename(), "e") << "left behind: " << d.path();
}

TEST(Engine, HalfPrecisionBuildsStayClose) {
  Reference ref = load_reference("llama");
  for (const char* dt : {"bf16", "f16"}) {
    BuildConfig bc;
    bc.dtype = dt;
    Engine e = Engine::build(hf("llama"), bc);
    EXPECT_EQ(e.info().dtype, dt);
    const auto& p = ref.prompts[3];
    std::vector<float> got = e.logits(p);
    const int64_t V = e.info().vocab_size;
    for (size_t i = 0; i < p.size(); ++i)
      EXPECT_LE(rel_err(got.data() + i * V, ref.logits[3].ptr<float>() + i * V, V), 2e-2) << dt;
  }
}

TEST(Engine, DummyWeightsAreSeededAndRun) {
  TempDir tmp;
  BuildConfig bc;
  bc.dtype = "bf16";
  bc.max_seq_len = 64;
  Engine a = Engine::build_dummy(hf("qwen3") / "config.json", bc, 7);
  Engine b = Engine::build_dummy(hf("qwen3") / "config.json", bc, 7);
  Engine c = Engine::build_dummy(hf("qwen3") / "config.json", bc, 8);
  const std::vector<int32_t> p = {1, 2, 3};
  EXPECT_EQ(a.logits(p), b.logits(p));
  EXPECT_NE(a.logits(p), c.logits(p));
  a.save(tmp / "d");
  Engine d = Engine::load(tmp / "d");
  EXPECT_EQ(d.info().max_seq_len, 64);
  SamplingParams sp;
  sp.max_tokens = 5;
  sp.ignore_eos = true;
  EXPECT_EQ(d.generate(p, sp).size(), 5u);
}

TEST(Sampling, SeededSamplingIsReproducibleAndRespectsTopK) {
  BuildConfig bc;
  bc.dtype = "f32";
  Engine e = Engine::build(hf("llama"), bc);
  SamplingParams sp;
  sp.temperature = 1.0f;
  sp.top_k = 5;
  sp.seed = 11;
  sp.max_tokens = 12;
  sp.ignore_eos = true;
  const std::vector<int32_t> p = {3, 4, 5};
  auto x = e.generate(p, sp), y = e.generate(p, sp);
  EXPECT_EQ(x, y);
  sp.seed = 12;
  EXPECT_NE(x, e.generate(p, sp));
  // top_k = 1 is greedy whatever the temperature.
  sp.top_k = 1;
  SamplingParams g;
  g.temperature = 0;
  g.max_tokens = 12;
  g.ignore_eos = true;
  EXPECT_EQ(e.generate(p, sp), e.generate(p, g));
}

TEST(Sampling, SamplerDistribution) {
  // logits favouring token 2 strongly; top_p 0.5 keeps only it.
  const float logits[4] = {0.0f, 1.0f, 5.0f, 0.5f};
  Sampler s(1.0f, 0, 0.5f, 3);
  for (int i = 0; i < 50; ++i) EXPECT_EQ(s.sample(logits, 4), 2);
  Sampler all(1.0f, 0, 1.0f, 3);
  int counts[4] = {};
  for (int i = 0; i < 4000; ++i) counts[all.sample(logits, 4)]++;
  // p(2) = e^5 / (1 + e + e^5 + e^0.5) ~ 0.95
  EXPECT_NEAR(counts[2] / 4000.0, 0.951, 0.02);
  EXPECT_GT(counts[1], 0);
}

TEST(Generate, StopsAtEosFromGenerationConfig) {
  // Make the third greedy token the eos id (generation_config.json, as a list) and check the
  // run stops right after it, and runs on with ignore_eos.
  Reference ref = load_reference("llama");
  TempDir tmp;
  copy_dir(hf("llama"), tmp / "m");
  auto g = read_json(tmp / "m" / "generation_config.json");
  g["eos_token_id"] = {ref.greedy[0][2], 511};
  write_json(tmp / "m" / "generation_config.json", g);
  BuildConfig bc;
  bc.dtype = "f32";
  Engine e = Engine::build(tmp / "m", bc);
  EXPECT_EQ(e.info().eos_token_ids, (std::vector<int64_t>{ref.greedy[0][2], 511}));
  SamplingParams sp;
  sp.max_tokens = 16;
  std::vector<int32_t> out = e.generate(ref.prompts[0], sp);
  EXPECT_EQ(out, std::vector<int32_t>(ref.greedy[0].begin(), ref.greedy[0].begin() + 3));
  sp.ignore_eos = true;
  EXPECT_EQ(e.generate(ref.prompts[0], sp), ref.greedy[0]);
}

}  // namespace
}  // namespace kiln::test
