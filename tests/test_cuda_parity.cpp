// HF parity of the CUDA backend: the fixtures' reference logits at every position (one prefill,
// and one-token decode steps), greedy continuations. F32 engines must match transformers to
// 1e-5 like the CPU backend. BF16 engines (BF16 activations and KV cache) must stay within 2e-2
// of the FP32 reference and agree with its greedy tokens (teacher-forced: after the prompt and
// each reference token, our argmax against the reference's next token) on >= 95% of the steps,
// per fixture (the bar) and over all fixtures. The bar is tight: these tiny random models
// have near-tied logits (gemma2: 5 of 64 steps with a top-2 gap under 0.25% of the logits' RMS),
// so BF16 rounding flips a few argmaxes whoever computes. transformers' own BF16 forward
// (bench/hf_bf16_agreement.py, H100) gets 61/64 at worst per fixture; kiln, with its F32
// residual stream and F32 LM-head input, 61/64 at worst (gemma2) and 763/768 overall.
// Fixtures of architectures kiln does not support yet skip. Skips when no GPU is visible (CI).
#include <algorithm>
#include <optional>

#include "build/checkpoint.h"
#include "core/error.h"
#include "graph/backend.h"
#include "kiln/kiln.h"
#include "test_util.h"

namespace kiln::test {
namespace {

int32_t argmax(const float* v, int64_t n) {
  return int32_t(std::max_element(v, v + n) - v);
}

const char* const kFixtures[] = {
    "llama",      "llama31_rope", "mistral_swa", "qwen2",       "qwen3",       "gemma",
    "gemma2",     "gemma3_text",  "gpt2",        "mixtral",     "phi3",        "qwen2_moe",
    "qwen3_moe",  "starcoder2",   "granite",     "phi",         "gpt_neox",    "gpt_neox_seq",
    "cohere",     "olmo2",        "cohere2",     "olmo3",       "falcon_mq",   "falcon_new",
    "falcon_seq", "smollm3",      "gpt_oss",     "deepseek_v2", "deepseek_v3", "cohere_qk",
    "phi_qk"};

// Whether the fixture has an LM head of its own (--quant-lm-head refuses a tied one). The folder
// as a build opens it: an architecture outside kiln's tables is built as the family it matches.
bool own_lm_head(const std::string& arch) {
  return !open_checkpoint(hf(arch)).config.tie_word_embeddings;
}

// Teacher-forced greedy agreement with the reference continuations: {agreeing steps, steps}.
std::pair<int, int> teacher_forced(Engine& e, const Reference& ref) {
  const int64_t V = e.info().vocab_size;
  int agree = 0, steps = 0;
  for (size_t j = 0; j < ref.prompts.size(); ++j) {
    const auto& g = ref.greedy[j];
    Session s = e.session();
    std::vector<float> lg = s.forward(ref.prompts[j]);
    for (size_t t = 0; t < g.size(); ++t) {
      agree += argmax(lg.data(), V) == g[t];
      ++steps;
      if (t + 1 < g.size()) lg = s.forward(std::span<const int32_t>(&g[t], 1));
    }
  }
  return {agree, steps};
}

std::optional<Engine> open_engine(const std::string& arch, const std::string& dtype,
                                  std::string* unsupported) {
  BuildConfig bc;
  bc.dtype = dtype;
  try {
    std::optional<Engine> e(Engine::build(hf(arch), bc));
    e->start({.device = "cuda"});
    return e;
  } catch (const Error& ex) {
    if (std::string(ex.what()).find("unsupported architecture") == std::string::npos) throw;
    *unsupported = ex.what();
    return std::nullopt;
  }
}

class CudaParity : public ::testing::TestWithParam<std::string> {
 protected:
  // The engine on the GPU, or nullopt (test skipped) for an unsupported architecture.
  std::optional<Engine> open(const std::string& dtype) {
    return open_engine(GetParam(), dtype, &unsupported);
  }
  std::string unsupported;
};

TEST_P(CudaParity, F32PrefillDecodeAndGreedy) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU visible";
  const std::string arch = GetParam();
  std::optional<Engine> e = open("f32");
  if (!e) GTEST_SKIP() << unsupported;
  EXPECT_NE(e->device_name().find("CUDA"), std::string::npos) << e->device_name();
  constexpr double kTol = 1e-5;
  Reference ref = load_reference(arch);
  const int64_t V = e->info().vocab_size;
  double worst_prefill = 0, worst_decode = 0;
  int greedy_match = 0;
  for (size_t j = 0; j < ref.prompts.size(); ++j) {
    const auto& p = ref.prompts[j];
    const float* want = ref.logits[j].ptr<float>();
    std::vector<float> got = e->logits(p);
    for (size_t i = 0; i < p.size(); ++i) {
      const double err = rel_err(got.data() + i * V, want + i * V, V);
      worst_prefill = std::max(worst_prefill, err);
      EXPECT_LE(err, kTol) << arch << " prompt " << j << " position " << i << " (prefill)";
    }
    Session s = e->session();
    for (size_t i = 0; i < p.size(); ++i) {
      std::vector<float> step = s.forward(std::span<const int32_t>(&p[i], 1));
      const double err = rel_err(step.data(), want + i * V, V);
      worst_decode = std::max(worst_decode, err);
      EXPECT_LE(err, kTol) << arch << " prompt " << j << " position " << i << " (decode)";
    }
    SamplingParams sp;
    sp.temperature = 0;
    sp.max_tokens = int64_t(ref.greedy[j].size());
    sp.ignore_eos = true;
    std::vector<int32_t> gen = e->generate(p, sp);
    EXPECT_EQ(gen, ref.greedy[j]) << arch << " prompt " << j;
    greedy_match += gen == ref.greedy[j];
  }
  std::printf("[cuda parity f32] %-14s prefill max rel err %.2e | decode %.2e | greedy %d/%zu\n",
              arch.c_str(), worst_prefill, worst_decode, greedy_match, ref.prompts.size());
}

TEST_P(CudaParity, Bf16StaysClose) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU visible";
  const std::string arch = GetParam();
  std::optional<Engine> e = open("bf16");
  if (!e) GTEST_SKIP() << unsupported;
  constexpr double kTol = 2e-2;
  Reference ref = load_reference(arch);
  const int64_t V = e->info().vocab_size;
  double worst_prefill = 0, worst_decode = 0;
  int free_match = 0, free_total = 0;
  for (size_t j = 0; j < ref.prompts.size(); ++j) {
    const auto& p = ref.prompts[j];
    const float* want = ref.logits[j].ptr<float>();
    std::vector<float> got = e->logits(p);
    for (size_t i = 0; i < p.size(); ++i) {
      const double err = rel_err(got.data() + i * V, want + i * V, V);
      worst_prefill = std::max(worst_prefill, err);
      EXPECT_LE(err, kTol) << arch << " prompt " << j << " position " << i << " (prefill)";
    }
    {
      Session s = e->session();
      for (size_t i = 0; i < p.size(); ++i) {
        std::vector<float> step = s.forward(std::span<const int32_t>(&p[i], 1));
        const double err = rel_err(step.data(), want + i * V, V);
        worst_decode = std::max(worst_decode, err);
        EXPECT_LE(err, kTol) << arch << " prompt " << j << " position " << i << " (decode)";
      }
    }
    const auto& g = ref.greedy[j];
    SamplingParams sp;
    sp.temperature = 0;
    sp.max_tokens = int64_t(g.size());
    sp.ignore_eos = true;
    std::vector<int32_t> gen = e->generate(p, sp);
    for (size_t t = 0; t < g.size() && t < gen.size(); ++t) free_match += gen[t] == g[t];
    free_total += int(g.size());
  }
  const auto [agree, steps] = teacher_forced(*e, ref);
  EXPECT_GE(double(agree), 0.95 * steps) << arch << ": greedy agreement " << agree << "/" << steps;
  std::printf(
      "[cuda parity bf16] %-14s prefill max rel err %.2e | decode %.2e | greedy "
      "teacher-forced %d/%d, free-running %d/%d\n",
      arch.c_str(), worst_prefill, worst_decode, agree, steps, free_match, free_total);
}

// Int8-wo and int4-wo BF16 engines on the GPU against the same engines on the CPU reference (which
// computes with the dequantized weights in FP32): the W8A16 / W4A16 GEMVs in decode, dequantize +
// cuBLASLt in prefill, within the BF16 tolerance; greedy agreement with HF is printed. Each
// scheme also with --quant-lm-head where the fixture has its own head: its GEMVs and
// dequantize + cuBLASLt writing F32 logits.
TEST_P(CudaParity, WeightOnlyQuantMatchesTheCpuEngine) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU visible";
  const std::string arch = GetParam();
  for (const char* name : {"int8-wo", "int4-wo", "int8-wo+head", "int4-wo+head"}) {
    const std::string scheme = name;
    BuildConfig bc;
    bc.dtype = "bf16";
    bc.quant = scheme.substr(0, 7);
    bc.quant_lm_head = scheme.ends_with("+head");
    if (bc.quant_lm_head && !own_lm_head(arch)) continue;
    Engine gpu = Engine::build(hf(arch), bc), cpu = Engine::build(hf(arch), bc);
    gpu.start({.device = "cuda"});
    cpu.start({.device = "cpu"});
    constexpr double kTol = 2e-2;
    Reference ref = load_reference(arch);
    const int64_t V = gpu.info().vocab_size;
    // MoE fixtures: the router's top-k is a discrete choice, and where two experts score within
    // BF16 rounding of each other the CPU (F32 activations) and the GPU (BF16) may pick
    // differently; that position and those attending to it then differ by 0.1-1. The MoE
    // fixtures' seeds are chosen so no choice is that close in either scheme (an emulation of
    // both engines: tests/fixtures/make_hf_fixtures.py, bf16_conditioning), so every fixture is
    // held to the tolerance in prefill and decode alike.
    double worst_prefill = 0, worst_decode = 0;
    for (size_t j = 0; j < ref.prompts.size(); ++j) {
      const auto& p = ref.prompts[j];
      const std::vector<float> want = cpu.logits(p), got = gpu.logits(p);
      Session s = gpu.session();
      for (size_t i = 0; i < p.size(); ++i) {
        const double err = rel_err(got.data() + i * V, want.data() + i * V, V);
        worst_prefill = std::max(worst_prefill, err);
        EXPECT_LE(err, kTol) << arch << " prompt " << j << " position " << i << " (prefill)";
        const std::vector<float> step = s.forward(std::span<const int32_t>(&p[i], 1));
        const double derr = rel_err(step.data(), want.data() + i * V, V);
        worst_decode = std::max(worst_decode, derr);
        EXPECT_LE(derr, kTol) << arch << " prompt " << j << " position " << i << " (decode)";
      }
    }
    const auto [agree, steps] = teacher_forced(gpu, ref);
    std::printf(
        "[cuda parity %s] %-14s vs the CPU engine: prefill max rel err %.2e | decode %.2e | "
        "greedy teacher-forced vs HF %d/%d\n",
        scheme.c_str(), arch.c_str(), worst_prefill, worst_decode, agree, steps);
  }
}

// fp8 engines quantize every activation row as it enters a linear. The CPU engine's activations
// are F32 and the GPU's BF16, so an element near a rounding boundary of E4M3 (steps of 1/8 to
// 1/16 of the value) gets the neighbouring code on one of them: the two engines are two
// instances of FP8 rounding noise, not the same numbers to BF16 precision. (With equal inputs
// the kernels match the CPU to the BF16 tolerance and the codes bit for bit: CudaOps.LinearFp8,
// CudaFp8.ActivationCodesAndScalesMatchTheCpu.) So the GPU engine is held to the CPU engine's
// quality: its logits' NMSE against the HF reference, in prefill and in decode, at most twice
// the CPU fp8 engine's plus the BF16 engine's own (measured on the H100: 0.57x to 1.06x), and
// top-1 agreement with HF on at least 70% of positions, the bound the CPU fp8 engine is held to
// (QuantQuality); top-1 over 43 near-flat random-weight positions moves by a few either way
// between two fp8 engines. An FP8 KV cache is the same case: K and V reach it in BF16 on the GPU
// and in F32 on the CPU. expect_as_good_as_the_cpu holds the GPU engine built with `bc` to the
// CPU engine built the same way, both against HF.
void expect_as_good_as_the_cpu(const std::string& arch, const BuildConfig& bc, double top1_bound) {
  BuildConfig plain;
  plain.dtype = "bf16";
  Engine gpu = Engine::build(hf(arch), bc), cpu = Engine::build(hf(arch), bc);
  Engine bf16 = Engine::build(hf(arch), plain);
  gpu.start({.device = "cuda"});
  cpu.start({.device = "cpu"});
  bf16.start({.device = "cuda"});
  Reference ref = load_reference(arch);
  const int64_t V = gpu.info().vocab_size;
  struct Acc {
    double num = 0, den = 0;
    int64_t top1 = 0, n = 0;
    void add(const float* g, const float* w, int64_t V) {
      for (int64_t v = 0; v < V; ++v) {
        num += (double(g[v]) - w[v]) * (double(g[v]) - w[v]);
        den += double(w[v]) * w[v];
      }
      top1 += std::max_element(g, g + V) - g == std::max_element(w, w + V) - w;
      ++n;
    }
    double nmse() const { return num / den; }
  } c, g_prefill, g_decode, b;
  for (size_t j = 0; j < ref.prompts.size(); ++j) {
    const auto& p = ref.prompts[j];
    const float* want = ref.logits[j].ptr<float>();
    const std::vector<float> lc = cpu.logits(p), lg = gpu.logits(p), lb = bf16.logits(p);
    Session s = gpu.session();
    for (size_t i = 0; i < p.size(); ++i) {
      c.add(lc.data() + i * V, want + i * V, V);
      g_prefill.add(lg.data() + i * V, want + i * V, V);
      b.add(lb.data() + i * V, want + i * V, V);
      const std::vector<float> step = s.forward(std::span<const int32_t>(&p[i], 1));
      g_decode.add(step.data(), want + i * V, V);
    }
  }
  const std::string what =
      bc.quant + (bc.quant_lm_head ? "+head" : "") + (bc.kv_cache_dtype == "fp8" ? " kv-fp8" : "");
  std::printf(
      "[cuda %s %s] NMSE vs HF: cpu %.2e (top-1 %lld/%lld) | gpu prefill %.2e (%lld) | "
      "decode %.2e (%lld) | gpu bf16 %.2e\n",
      what.c_str(), arch.c_str(), c.nmse(), (long long)c.top1, (long long)c.n, g_prefill.nmse(),
      (long long)g_prefill.top1, g_decode.nmse(), (long long)g_decode.top1, b.nmse());
  for (const Acc* g : {&g_prefill, &g_decode}) {
    EXPECT_LE(g->nmse(), 2 * c.nmse() + b.nmse()) << arch << " " << what;
    EXPECT_GE(double(g->top1), top1_bound * double(g->n)) << arch << " " << what;
  }
}

TEST_P(CudaParity, Fp8EngineIsAsGoodAsTheCpuFp8Engine) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU visible";
  BuildConfig bc;
  bc.dtype = "bf16";
  bc.quant = "fp8";
  expect_as_good_as_the_cpu(GetParam(), bc, 0.7);  // QuantQuality's bound for fp8
}

// An fp8 engine with --quant-lm-head (fixtures with their own head) the same way: the head's FP8
// GEMV and GEMM write F32 logits from FP8 codes of the final hidden state. Top-1 is held to the
// bound QuantLmHead holds the CPU engines to (the head's noise lands on the logits directly).
TEST_P(CudaParity, Fp8HeadEngineIsAsGoodAsTheCpuFp8HeadEngine) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU visible";
  if (!own_lm_head(GetParam())) GTEST_SKIP() << "the fixture ties its LM head to the embeddings";
  BuildConfig bc;
  bc.dtype = "bf16";
  bc.quant = "fp8";
  bc.quant_lm_head = true;
  expect_as_good_as_the_cpu(GetParam(), bc, 0.6);
}

// The FP8 KV cache the same way (GPU prefill reads it on CUDA cores, decode on tensor cores),
// held to QuantQuality's top-1 bound for it.
TEST_P(CudaParity, KvFp8EngineIsAsGoodAsTheCpuKvFp8Engine) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU visible";
  BuildConfig bc;
  bc.dtype = "bf16";
  bc.kv_cache_dtype = "fp8";
  expect_as_good_as_the_cpu(GetParam(), bc, 0.85);
}

INSTANTIATE_TEST_SUITE_P(Hf, CudaParity,
                         ::testing::ValuesIn(std::vector<std::string>(std::begin(kFixtures),
                                                                      std::end(kFixtures))));

TEST(CudaParityAll, Bf16GreedyAgreementOverAllFixtures) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU visible";
  int agree = 0, steps = 0;
  std::string unsupported;
  for (const char* arch : kFixtures) {
    std::optional<Engine> e = open_engine(arch, "bf16", &unsupported);
    if (!e) continue;
    const auto [a, s] = teacher_forced(*e, load_reference(arch));
    agree += a, steps += s;
  }
  if (steps == 0) GTEST_SKIP() << "no supported fixture";
  std::printf("[cuda parity bf16] all fixtures: greedy teacher-forced %d/%d\n", agree, steps);
  EXPECT_GE(double(agree), 0.95 * steps) << "greedy agreement " << agree << "/" << steps;
}

}  // namespace
}  // namespace kiln::test
