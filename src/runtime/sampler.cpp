// kiln::Sampler: the CPU sampling reference (backends/cpu/cpu_sample.h) over one sequence's
// stream of draws, so a sequence sampled on the CPU and one sampled by a GPU backend with the
// same seed pick the same tokens.
#include "backends/cpu/cpu_sample.h"
#include "kiln/kiln.h"

namespace kiln {

Sampler::Sampler(float temperature, int top_k, float top_p, uint64_t seed)
    : temperature_(temperature), top_p_(top_p), top_k_(top_k), seed_(seed) {}

int32_t Sampler::sample(const float* logits, int64_t vocab) {
  SampleParams p;
  p.temperature = temperature_;
  p.top_k = top_k_;
  p.top_p = top_p_;
  p.seed = seed_;
  p.step = step_++;
  return cpu::sample_row(logits, vocab, p);
}

}  // namespace kiln
