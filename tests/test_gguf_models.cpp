// GGUF files made by llama.cpp's own converter (tests/fixtures/make_gguf_model_fixtures.py) from
// the Hugging Face fixtures: kiln must undo llama.cpp's conventions (dimension order, Q/K rotary
// permutation, Gemma's 1 + w norms, rope factors as a tensor, fused Phi-3 weights, values the
// file does not store) and compute what transformers computes on the original folder, at the HF
// parity tolerance (FP32 engine): every position in prefill and in decode steps, and the greedy
// continuations.
#include <algorithm>
#include <cstring>
#include <fstream>

#include "graph/backend.h"
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

namespace kiln::test {
namespace {

std::vector<char> read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::vector<char>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// Replaces the first occurrence of `from` in a file's bytes by `to` (same length).
void patch_bytes(std::vector<char>& b, const std::string& from, const std::string& to) {
  auto it = std::search(b.begin(), b.end(), from.begin(), from.end());
  ASSERT_NE(it, b.end()) << from;
  std::copy(to.begin(), to.end(), it);
}

// NMSE of an engine's logits over every position of the reference prompts.
double nmse_vs_reference(Engine& e, const Reference& ref) {
  const int64_t V = e.info().vocab_size;
  std::vector<float> got, want;
  for (size_t j = 0; j < ref.prompts.size(); ++j) {
    const std::vector<float> a = e.logits(ref.prompts[j]);
    got.insert(got.end(), a.begin(), a.end());
    want.insert(want.end(), ref.logits[j].ptr<float>(),
                ref.logits[j].ptr<float>() + ref.prompts[j].size() * size_t(V));
  }
  return nmse(got, want);
}

// Q4_0 (llama-quantize --pure of llama.gguf) is kiln's int4-wo in groups of 32, exactly: the
// linears stay quantized and compute what the same file dequantized to F32 by gguf-py computes
// (llama_q4_0_dequant.gguf), bit for bit with F32 activations on the CPU.
TEST(GgufQuant, Q4_0IsKeptAsInt4) {
  BuildConfig bc;
  bc.dtype = "f32";
  Engine q = Engine::build(data("gguf/llama_q4_0.gguf"), bc);
  Engine d = Engine::build(data("gguf/llama_q4_0_dequant.gguf"), bc);
  EXPECT_EQ(q.info().quant, "int4-wo");
  EXPECT_EQ(d.info().quant, "none");
  EXPECT_EQ(q.info().conversion,
            "GGUF llama: Q4_0 x21 kept as int4-wo (groups of 32); Q4_0 x2 dequantized (no kiln "
            "kernel for them); F32 x7 as stored");
  q.start({.device = "cpu"});
  d.start({.device = "cpu"});
  const Reference ref = load_reference("llama");
  for (const auto& p : ref.prompts) EXPECT_EQ(q.logits(p), d.logits(p));
  // Against the float model, for scale: --pure made the embeddings and the LM head 4-bit too,
  // so this is above QuantQuality's int4-wo figures (16-bit embeddings and head, there).
  const double e = nmse_vs_reference(q, ref);
  std::printf("[gguf quant] llama Q4_0 (every matrix) vs the float model: NMSE %.2e\n", e);
  EXPECT_LT(e, 0.1);
}

// The kept Q4_0 weights run on the GPU's int4 kernels (BF16 activations) as on the CPU.
TEST(GgufQuant, Q4_0RunsOnCudaAsOnTheCpu) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU visible";
  BuildConfig bc;
  bc.dtype = "bf16";
  Engine gpu = Engine::build(data("gguf/llama_q4_0.gguf"), bc);
  Engine cpu = Engine::build(data("gguf/llama_q4_0.gguf"), bc);
  gpu.start({.device = "cuda"});
  cpu.start({.device = "cpu"});
  const int64_t V = gpu.info().vocab_size;
  for (const auto& p : load_reference("llama").prompts) {
    const std::vector<float> want = cpu.logits(p), got = gpu.logits(p);
    Session s = gpu.session();
    for (size_t i = 0; i < p.size(); ++i) {
      EXPECT_LE(rel_err(got.data() + i * V, want.data() + i * V, V), 2e-2) << "prefill " << i;
      const std::vector<float> step = s.forward(std::span<const int32_t>(&p[i], 1));
      EXPECT_LE(rel_err(step.data(), want.data() + i * V, V), 2e-2) << "decode " << i;
    }
  }
}

// Q8_0 (the converter's --outtype q8_0) has no kiln kernel: dequantized exactly and converted.
TEST(GgufQuant, Q8_0IsDequantized) {
  BuildConfig bc;
  bc.dtype = "f32";
  Engine e = Engine::build(data("gguf/llama_q8_0.gguf"), bc);
  EXPECT_EQ(e.info().quant, "none");
  EXPECT_EQ(e.info().conversion,
            "GGUF llama: Q8_0 x23 dequantized (no kiln kernel for them); F32 x7 as stored");
  e.start({.device = "cpu"});
  const double err = nmse_vs_reference(e, load_reference("llama"));
  // 8-bit codes per block of 32: held to QuantQuality's int8-wo (per channel) bound.
  std::printf("[gguf quant] llama Q8_0 vs the float model: NMSE %.2e\n", err);
  EXPECT_LT(err, 1e-3);
}

// What kiln does not map is refused by name, with nothing left behind.
TEST(GgufImport, RefusesWhatItDoesNotMap) {
  TempDir tmp;
  const std::vector<char> good = read_bytes(data("gguf/llama.gguf"));
  const auto attempt = [&](std::vector<char> b) {
    {
      std::ofstream out(tmp / "m.gguf", std::ios::binary);
      out.write(b.data(), std::streamsize(b.size()));
    }
    BuildConfig bc;
    bc.dtype = "f32";
    const std::string err = error_of([&] { Engine::build_to(tmp / "m.gguf", tmp / "e", bc); });
    EXPECT_FALSE(fs::exists(tmp / "e")) << err;
    return err;
  };
  auto b = good;
  patch_bytes(b, "llama.block_count", "llamb.block_count");  // a required key missing
  EXPECT_NE(attempt(b).find("missing metadata llama.block_count"), std::string::npos);
  b = good;
  patch_bytes(b, "blk.1.ffn_up.weight", "blk.1.ffn_uq.weight");
  std::string err = attempt(b);
  EXPECT_NE(err.find("tensors kiln does not map for llama: blk.1.ffn_uq.weight"), std::string::npos)
      << err;
  b = good;
  patch_bytes(
      b,
      std::string("general.architecture\x08\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00llama", 37),
      std::string("general.architecture\x08\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00"
                  "bloom",
                  37));
  err = attempt(b);
  EXPECT_NE(err.find("general.architecture 'bloom' is not one kiln maps from GGUF yet (known: "
                     "llama, qwen2, qwen3, gemma, gemma2, gemma3, phi3)"),
            std::string::npos)
      << err;
  b = good;
  patch_bytes(b, "tokenizer.ggml.pre", "tokenizer.ggml.prf");  // llama.cpp's name for it, gone
  patch_bytes(b, "gpt-2", "gpt-9");
  err = attempt(b);
  EXPECT_NE(err.find("is a pre-tokenizer kiln does not know"), std::string::npos) << err;
  write_text(tmp / "x.gguf", "not a gguf file at all");
  EXPECT_NE(error_of([&] { Engine::build(tmp / "x.gguf"); }).find("not a GGUF file"),
            std::string::npos);
}

}  // namespace
}  // namespace kiln::test
