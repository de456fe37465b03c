// Shared by the sampling tests (test_sampling.cpp: the CPU reference; test_cuda_sampling.cpp:
// the CUDA kernels against it): parameter helpers, random rows of every kind (ties, -inf, NaN,
// +inf), and literal readings of the documented rules (first argmax, the kept set).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "backends/cpu/cpu_sample.h"
#include "core/sample_math.h"
#include "graph/backend.h"

namespace kiln::test {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

SampleParams params(float t, int32_t k, float p, uint64_t seed = 0, uint64_t step = 0) {
  SampleParams s;
  s.temperature = t;
  s.top_k = k;
  s.top_p = p;
  s.seed = seed;
  s.step = step;
  return s;
}

std::string describe(const SampleParams& p) {
  return "T=" + std::to_string(p.temperature) + " top_k=" + std::to_string(p.top_k) +
         " top_p=" + std::to_string(p.top_p) + " seed=" + std::to_string(p.seed) +
         " step=" + std::to_string(p.step) + " min_p=" + std::to_string(p.min_p);
}

// A NaN or +inf anywhere: the row's logits are broken (-inf only bans a token).
bool non_finite(const float* l, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (std::isnan(l[i]) || l[i] == kInf) return true;
  return false;
}

// Greedy's rule: the first maximum; kNonFiniteLogits for a broken row.
int32_t first_argmax(const float* l, int64_t n) {
  if (non_finite(l, n)) return kNonFiniteLogits;
  const auto v = [&](int64_t i) { return l[i]; };
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (v(i) > v(best)) best = i;
  return int32_t(best);
}

// The documented rule read literally: a full stable sort, the first top_k, weights, then the
// ranked prefix whose preceding mass stays below top_p * S.
std::vector<cpu::SampleCandidate> brute_force_kept(const std::vector<float>& logits,
                                                   const SampleParams& p) {
  const int64_t n = int64_t(logits.size());
  std::vector<float> l(logits);
  for (float& x : l)
    if (std::isnan(x)) x = -kInf;
  std::vector<int32_t> order(l.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return l[size_t(a)] > l[size_t(b)]; });
  if (p.top_k > 0 && p.top_k < n) order.resize(size_t(p.top_k));
  const float m = l[size_t(order[0])];
  if (p.min_p > 0) {  // probability at least min_p (at most 1) times the maximum's, in 2^-40
    const double floor = double(std::min(p.min_p, 1.0f)) * 0x1p40;
    std::erase_if(order, [&](int32_t i) {
      return double(sampling::weight(l[size_t(i)], m, p.temperature)) < floor;
    });
  }
  std::vector<cpu::SampleCandidate> kept;
  uint64_t total = 0;
  for (int32_t i : order) total += sampling::weight(l[size_t(i)], m, p.temperature);
  const bool use_p = p.top_p > 0 && p.top_p < 1;
  uint64_t before = 0;
  for (int32_t i : order) {
    if (use_p && !(double(before) < double(p.top_p) * double(total))) break;
    const uint64_t q = sampling::weight(l[size_t(i)], m, p.temperature);
    kept.push_back({i, q});
    before += q;
  }
  std::sort(kept.begin(), kept.end(), [](auto& a, auto& b) { return a.id < b.id; });
  return kept;
}

// Logit rows of several shapes: normal at several scales, heavy exact ties (+-0 included),
// -inf / NaN / +inf sprinkled, constant rows, all -inf.
std::vector<float> random_row(std::mt19937& rng, int64_t n, int mode) {
  std::vector<float> v(static_cast<size_t>(n));
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_real_distribution<float> ud(0.0f, 1.0f);
  const float scales[] = {0.05f, 1.0f, 3.0f, 10.0f};
  switch (mode % 8) {
    case 0:
    case 1:
    case 2:
    case 3:
      for (float& x : v) x = nd(rng) * scales[mode % 4] + 5.0f;
      break;
    case 4:  // many exact ties
      for (float& x : v) x = std::round(nd(rng) * 2.0f);
      break;
    case 5:  // ties, signed zeros, -inf and NaN
      for (float& x : v) {
        const float r = ud(rng);
        x = r < 0.2f ? -kInf : r < 0.25f ? kNaN : r < 0.5f ? 0.0f : r < 0.75f ? -0.0f : nd(rng);
      }
      break;
    case 6:  // mostly -inf: fewer finite logits than top_k
      for (float& x : v) x = ud(rng) < 0.9f ? -kInf : nd(rng) * 2.0f;
      break;
    case 7: {  // constant, all -inf, or a few +inf
      const float r = ud(rng);
      for (float& x : v) x = r < 0.3f ? 1.5f : r < 0.6f ? -kInf : nd(rng);
      if (r >= 0.6f)
        for (int j = 0; j < 3; ++j) v[size_t(rng() % uint64_t(n))] = kInf;
      break;
    }
  }
  return v;
}

SampleParams random_params(std::mt19937& rng, int64_t n, int kind) {
  const float temps[] = {0.05f, 0.7f, 1.0f, 2.5f};
  const int32_t ks[] = {
      1, 2, 3, 5, 50, 100, 2048, 2049, 3000, int32_t(n) - 1, int32_t(n), int32_t(n) + 5, 0, -1};
  const float ps[] = {0.1f, 0.5f, 0.9f, 0.95f, 0.999f, 1.0f, 0.0f, 1.5f};
  SampleParams p;
  p.temperature = temps[rng() % 4];
  p.seed = rng();
  p.step = rng() % 1000;
  switch (kind % 6) {
    case 0:  // greedy
      p.temperature = (rng() & 1) ? 0.0f : -1.0f;
      p.top_k = ks[rng() % 14];
      break;
    case 1:  // temperature only
      break;
    case 2:
      p.top_k = ks[rng() % 14];
      break;
    case 3:
      p.top_p = ps[rng() % 8];
      break;
    case 4:
      p.top_k = ks[rng() % 14];
      p.top_p = ps[rng() % 8];
      break;
    case 5:  // the common serving setting
      p.top_k = 50;
      p.top_p = 0.9f;
      break;
  }
  // min_p on a third of the rows, greedy ones too (which ignore it); 2.0 acts as 1, <= 0 is off.
  const float mps[] = {0.01f, 0.05f, 0.1f, 0.3f, 0.9f, 1.0f, 2.0f, 0.0f, -1.0f, 1e-12f};
  if (rng() % 3 == 0) p.min_p = mps[rng() % 10];
  return p;
}

}  // namespace
}  // namespace kiln::test
