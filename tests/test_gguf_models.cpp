// GGUF files made by llama.cpp's own converter (tests/fixtures/make_gguf_model_fixtures.py) from
// the Hugging Face fixtures: kiln must undo llama.cpp's conventions (dimension order, Q/K rotary
// permutation, Gemma's 1 + w norms, rope factors as a tensor, fused Phi-3 weights, values the
// file does not store) and compute what transformers computes on the original folder, at the HF
// parity tolerance (FP32 engine): every position in prefill and in decode steps, and the greedy
// continuations.
#include <cstring>

#include "kiln/kiln.h"
#include "test_util.h"

namespace kiln::test {
namespace {

struct GgufFixture {
  const char* gguf;  // tests/fixtures/gguf/<gguf>.gguf
  const char* hf;    // the HF fixture it was converted from (its reference)
  const char* arch;  // the architecture kiln maps it to
};

class GgufParity : public ::testing::TestWithParam<GgufFixture> {};

TEST_P(GgufParity, MatchesTransformersOnTheOriginal) {
  const GgufFixture f = GetParam();
  Reference ref = load_reference(f.hf);
  BuildConfig bc;
  bc.dtype = "f32";
  Engine e = Engine::build(data(std::string("gguf/") + f.gguf + ".gguf"), bc);
  EXPECT_EQ(e.info().architecture, f.arch);
  EXPECT_NE(e.info().conversion.find("as stored"), std::string::npos) << e.info().conversion;
  e.start({.device = "cpu"});
  const int64_t V = e.info().vocab_size;
  double worst = 0;
  for (size_t j = 0; j < ref.prompts.size(); ++j) {
    const auto& p = ref.prompts[j];
    const float* want = ref.logits[j].ptr<float>();
    const std::vector<float> got = e.logits(p);
    Session s = e.session();
    for (size_t i = 0; i < p.size(); ++i) {
      const double pe = rel_err(got.data() + i * V, want + i * V, V);
      const std::vector<float> step = s.forward(std::span<const int32_t>(&p[i], 1));
      const double de = rel_err(step.data(), want + i * V, V);
      worst = std::max({worst, pe, de});
      EXPECT_LE(pe, 1e-5) << f.gguf << " prompt " << j << " position " << i << " (prefill)";
      EXPECT_LE(de, 1e-5) << f.gguf << " prompt " << j << " position " << i << " (decode)";
    }
    SamplingParams sp;
    sp.temperature = 0;
    sp.max_tokens = int64_t(ref.greedy[j].size());
    sp.ignore_eos = true;
    EXPECT_EQ(e.generate(p, sp), ref.greedy[j]) << f.gguf << " prompt " << j;
  }
  std::printf("[gguf parity] %-14s max rel err %.2e\n", f.gguf, worst);
}

INSTANTIATE_TEST_SUITE_P(
    Fixtures, GgufParity,
    ::testing::Values(GgufFixture{"llama", "llama", "LlamaForCausalLM"},
                      GgufFixture{"llama31_rope", "llama31_rope", "LlamaForCausalLM"},
                      GgufFixture{"qwen2", "qwen2", "Qwen2ForCausalLM"},
                      GgufFixture{"qwen3", "qwen3", "Qwen3ForCausalLM"},
                      GgufFixture{"phi3", "phi3", "Phi3ForCausalLM"},
                      GgufFixture{"gemma_tied", "gemma_tied", "GemmaForCausalLM"},
                      GgufFixture{"gemma2_tied", "gemma2_tied", "Gemma2ForCausalLM"},
                      GgufFixture{"gemma3_tied", "gemma3_tied", "Gemma3ForCausalLM"}),
    [](const auto& i) { return std::string(i.param.gguf); });

}  // namespace
}  // namespace kiln::test
