// The NCCL path on one GPU (RuntimeConfig::nccl): every tensor-parallel collective of the
// decoder issued through a real NCCL group of one rank (all-reduces after the attention output,
// the FFN and the embedding, the vocabulary all-gather of the logits, OLMo 2's gathered q/k
// norms), in eager steps and inside the captured decode graphs. A group of one sums nothing, so
// the logits must be bit-identical to the engine without collectives. Skips without a GPU.
#include <cstring>

#include "graph/backend.h"
#include "kiln/kiln.h"
#include "test_util.h"

namespace kiln::test::cuda_parallel {
namespace {

class CudaNccl : public ::testing::TestWithParam<std::string> {};

// Prefill logits of every prompt, then 4 batched decode steps over all prompts (replayed from
// the decode graphs), as one flat vector.
std::vector<float> logits(const std::string& arch, const std::string& dtype, bool nccl,
                          std::string* device) {
  BuildConfig bc;
  bc.dtype = dtype;
  Engine e = Engine::build(hf(arch), bc);
  RuntimeConfig rc;
  rc.device = "cuda";
  rc.nccl = nccl;
  e.start(rc);
  *device = e.runtime_info().device;
  const Reference ref = load_reference(arch);
  std::vector<float> out;
  std::vector<Session> ss;
  for (const auto& p : ref.prompts) {
    auto l = e.logits(p);
    out.insert(out.end(), l.begin(), l.end());
    ss.push_back(e.session());
    ss.back().forward(p);
  }
  std::vector<Session*> ptrs;
  for (auto& s : ss) ptrs.push_back(&s);
  std::vector<int32_t> toks(ss.size(), 3);
  for (int k = 0; k < 4; ++k) {
    auto l = e.step_logits(ptrs, toks);
    out.insert(out.end(), l.begin(), l.end());
    for (size_t i = 0; i < toks.size(); ++i) toks[i] = int32_t((toks[i] * 7 + int32_t(i)) % 500);
  }
  EXPECT_GT(e.runtime_info().graphs_captured, 0) << arch;
  return out;
}

TEST_P(CudaNccl, OneRankGroupIsBitIdentical) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU visible";
  const std::string arch = GetParam();
  for (const char* dtype : {"f32", "bf16"}) {
    std::string plain_dev, nccl_dev;
    const auto plain = logits(arch, dtype, false, &plain_dev);
    const auto nccl = logits(arch, dtype, true, &nccl_dev);
    EXPECT_NE(nccl_dev.find("NCCL"), std::string::npos) << nccl_dev;
    ASSERT_EQ(plain.size(), nccl.size());
    size_t differ = 0;
    for (size_t i = 0; i < plain.size(); ++i) differ += std::memcmp(&plain[i], &nccl[i], 4) != 0;
    EXPECT_EQ(differ, 0u) << arch << " " << dtype << ": " << differ << " of " << plain.size()
                          << " logits differ";
    std::printf("[cuda nccl] %-12s %-4s %zu logits, %zu differ\n", arch.c_str(), dtype,
                plain.size(), differ);
  }
}

INSTANTIATE_TEST_SUITE_P(Hf, CudaNccl,
                         ::testing::Values("llama", "gemma2_tied", "qwen3_moe", "olmo2", "phi",
                                           "gpt_oss", "deepseek_v3"));

}  // namespace
}  // namespace kiln::test::cuda_parallel
