// Token selection: greedy, or temperature -> top-k -> top-p -> draw, in transformers' order.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "kiln/kiln.h"

namespace kiln {

Sampler::Sampler(float temperature, int top_k, float top_p, uint64_t seed)
    : temperature_(temperature), top_p_(top_p), top_k_(top_k), state_(seed * 0x9E3779B97F4A7C15ull + 1) {}

int32_t Sampler::sample(const float* logits, int64_t vocab) {
  if (temperature_ <= 0) {
    int64_t best = 0;  // first maximum, as torch.argmax
    for (int64_t i = 1; i < vocab; ++i)
      if (logits[i] > logits[best]) best = i;
    return int32_t(best);
  }
  std::vector<int32_t> idx(static_cast<size_t>(vocab));
  std::iota(idx.begin(), idx.end(), 0);
  int64_t k = top_k_ > 0 ? std::min<int64_t>(top_k_, vocab) : vocab;
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                    [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
  idx.resize(size_t(k));
  std::vector<double> p(static_cast<size_t>(k));
  const double mx = logits[idx[0]] / temperature_;
  double sum = 0;
  for (int64_t i = 0; i < k; ++i) sum += (p[size_t(i)] = std::exp(logits[idx[size_t(i)]] / temperature_ - mx));
  for (auto& x : p) x /= sum;
  if (top_p_ > 0 && top_p_ < 1) {
    // Keep the smallest prefix whose mass reaches top_p (at least one token).
    double cum = 0;
    int64_t keep = 0;
    while (keep < k && cum < top_p_) cum += p[size_t(keep++)];
    p.resize(size_t(keep));
    idx.resize(size_t(keep));
    double s = std::accumulate(p.begin(), p.end(), 0.0);
    for (auto& x : p) x /= s;
  }
  // splitmix64 -> uniform double in [0, 1)
  state_ += 0x9E3779B97F4A7C15ull;
  uint64_t z = state_;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  const double u = double(z >> 11) * 0x1.0p-53;
  double cum = 0;
  for (size_t i = 0; i < p.size(); ++i) {
    cum += p[i];
    if (u < cum) return idx[i];
  }
  return idx.back();
}

}  // namespace kiln
