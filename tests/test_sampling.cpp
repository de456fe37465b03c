// Token sampling: properties of the CPU reference (cpu::sample_row) against a brute-force
// reading of its documented rule, its statistics, its random stream; and the CUDA kernel
// against the reference, token for token (exact by design: shared arithmetic, integer sums).
// Also min_p, logit edits and log-probabilities (CPU semantics, then CUDA against the CPU).
// The CUDA tests skip when no GPU is visible; those calling cuda:: directly compile only in CUDA
// builds, those going through the Backend interface in every build.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "backends/cpu/cpu_sample.h"
#include "core/error.h"
#include "core/fastmath.h"
#include "core/sample_math.h"
#include "graph/backend.h"
#include "kiln/kiln.h"

#ifdef KILN_HAVE_CUDA
#include <cuda_runtime.h>

#include "backends/cuda/cuda_sample.h"
#endif

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

TEST(Sampling, ExpfIsAccurateAndHandlesLimits) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> wide(-85.9f, 88.7f), narrow(-1.0f, 1.0f);
  double worst = 0;
  for (int i = 0; i < 400000; ++i) {
    for (float x : {wide(rng), narrow(rng)}) {
      const double ref = std::exp(double(x));
      int e;
      std::frexp(ref, &e);
      worst = std::max(worst, std::fabs(double(kiln_expf(x)) - ref) / std::ldexp(1.0, e - 24));
    }
  }
  EXPECT_LE(worst, 2.0);
  EXPECT_EQ(kiln_expf(0.0f), 1.0f);
  EXPECT_EQ(kiln_expf(-0.0f), 1.0f);
  EXPECT_EQ(kiln_expf(-kInf), 0.0f);
  EXPECT_EQ(kiln_expf(kNaN), 0.0f);
  EXPECT_EQ(kiln_expf(-1000.0f), 0.0f);
  EXPECT_EQ(kiln_expf(100.0f), kInf);
}

TEST(Sampling, FixedPointWeights) {
  EXPECT_EQ(sampling::weight(3.0f, 3.0f, 0.7f), sampling::kWeightOne);
  EXPECT_EQ(sampling::weight(kInf, kInf, 1.0f), sampling::kWeightOne);
  EXPECT_EQ(sampling::weight(5.0f, kInf, 1.0f), 0u);
  EXPECT_EQ(sampling::weight(-kInf, 1.0f, 1.0f), 0u);
  EXPECT_EQ(sampling::weight(-0.0f, 0.0f, 1.0f), sampling::kWeightOne);
  // e^-28 < 2^-40: never drawn.
  EXPECT_EQ(sampling::weight(-28.0f, 0.0f, 1.0f), 0u);
  EXPECT_GT(sampling::weight(-27.0f, 0.0f, 1.0f), 0u);
  const double half = double(sampling::weight(-std::log(2.0f), 0.0f, 1.0f));
  EXPECT_NEAR(half / double(sampling::kWeightOne), 0.5, 1e-6);
}

TEST(Sampling, UniformIsTheSplitmixStreamOfTheOldSampler) {
  for (uint64_t seed : {0ull, 3ull, 11ull, 0xffffffffffffffffull}) {
    uint64_t state = seed * 0x9E3779B97F4A7C15ull + 1;
    for (uint64_t step = 0; step < 100; ++step) {
      state += 0x9E3779B97F4A7C15ull;
      uint64_t z = state;
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
      z ^= z >> 31;
      const double u = double(z >> 11) * 0x1.0p-53;
      ASSERT_EQ(sampling::uniform(seed, step), u) << seed << " " << step;
    }
  }
}

TEST(Sampling, GreedyIsFirstArgmax) {
  const std::vector<std::vector<float>> rows = {{1, 3, 3, 2}, {kNaN, 1, kNaN}, {-kInf, -kInf},
                                                {kNaN, kNaN}, {-0.0f, 0.0f},   {0.0f, -0.0f},
                                                {2},          {kInf, 1, kInf}, {-1, -kInf, -1}};
  const std::vector<int32_t> want = {1, kNonFiniteLogits, 0, kNonFiniteLogits, 0, 0,
                                     0, kNonFiniteLogits, 0};
  for (size_t r = 0; r < rows.size(); ++r)
    EXPECT_EQ(cpu::sample_row(rows[r].data(), int64_t(rows[r].size()), params(0, 0, 1)), want[r])
        << "row " << r;
  std::mt19937 rng(1);
  for (int i = 0; i < 400; ++i) {
    const int64_t n = 1 + int64_t(rng() % 300);
    const std::vector<float> l = random_row(rng, n, i);
    EXPECT_EQ(cpu::sample_row(l.data(), n, params(i % 2 ? 0.0f : -2.0f, 5, 0.5f)),
              first_argmax(l.data(), n));
  }
}

// One NaN or +inf anywhere in a row, greedy or sampled, gives kNonFiniteLogits (an error for the
// caller), never a token picked from broken logits; -inf (a ban) does not, even everywhere.
TEST(Sampling, NonFiniteRowsAreRefused) {
  std::mt19937 rng(9);
  const SampleParams settings[] = {params(0, 0, 1), params(0.8f, 0, 1), params(1.0f, 5, 0.9f),
                                   params(0.7f, 0, 0.5f)};
  for (const int64_t n : {1, 3, 1000}) {
    for (const float bad : {kNaN, kInf}) {
      for (int i = 0; i < 20; ++i) {
        std::vector<float> l = random_row(rng, n, 0);
        l[size_t(rng() % uint64_t(n))] = bad;
        for (const SampleParams& p : settings)
          EXPECT_EQ(cpu::sample_row(l.data(), n, p), kNonFiniteLogits)
              << "n=" << n << " " << describe(p);
      }
    }
    const std::vector<float> banned(size_t(n), -kInf);
    for (const SampleParams& p : settings) {
      const int32_t t = cpu::sample_row(banned.data(), n, p);
      EXPECT_TRUE(t >= 0 && t < n) << t;
    }
  }
}

TEST(Sampling, TopK1IsGreedyAtAnyTemperature) {
  std::mt19937 rng(2);
  for (int i = 0; i < 400; ++i) {
    const int64_t n = 1 + int64_t(rng() % 300);
    const std::vector<float> l = random_row(rng, n, i);
    for (float t : {0.01f, 1.0f, 100.0f})
      for (float p : {1.0f, 0.3f})
        EXPECT_EQ(cpu::sample_row(l.data(), n, params(t, 1, p, rng(), i)),
                  first_argmax(l.data(), n));
  }
}

TEST(Sampling, KeptSetMatchesBruteForce) {
  std::mt19937 rng(3);
  for (int64_t n : {1, 2, 3, 7, 64, 1000}) {
    for (int i = 0; i < 300; ++i) {
      const std::vector<float> l = random_row(rng, n, i);
      SampleParams p = random_params(rng, n, 1 + i % 5);
      const auto got = cpu::sample_candidates(l.data(), n, p);
      const auto want = brute_force_kept(l, p);
      ASSERT_EQ(got.size(), want.size()) << "n=" << n << " row " << i << " " << describe(p);
      for (size_t j = 0; j < got.size(); ++j) {
        ASSERT_EQ(got[j].id, want[j].id) << "n=" << n << " row " << i << " " << describe(p);
        ASSERT_EQ(got[j].weight, want[j].weight) << "n=" << n << " row " << i;
      }
      // The draw lands on a kept token with weight; a row with NaN / +inf is refused instead.
      const int32_t tok = cpu::sample_row(l.data(), n, p);
      if (non_finite(l.data(), n)) {
        EXPECT_EQ(tok, kNonFiniteLogits) << "n=" << n << " row " << i;
        continue;
      }
      const auto it = std::find_if(got.begin(), got.end(), [&](auto& c) { return c.id == tok; });
      ASSERT_NE(it, got.end());
      EXPECT_GT(it->weight, 0u);
    }
  }
}

TEST(Sampling, FrequenciesMatchKeptWeights) {
  const std::vector<float> l = {2.0f, 1.5f, 1.0f, 0.2f, -0.5f, -3.0f, -kInf, 0.7f, 1.0f};
  const int64_t n = int64_t(l.size());
  for (const SampleParams& base : {params(0.9f, 6, 0.95f), params(1.3f, 0, 1.0f),
                                   params(0.5f, 0, 0.8f), params(2.0f, 4, 1.0f)}) {
    const auto kept = cpu::sample_candidates(l.data(), n, base);
    uint64_t total = 0;
    for (auto& c : kept) total += c.weight;
    std::vector<int> counts(size_t(n), 0);
    constexpr int kDraws = 20000;
    for (int s = 0; s < kDraws; ++s) {
      SampleParams p = base;
      p.seed = uint64_t(s);
      counts[size_t(cpu::sample_row(l.data(), n, p))]++;
    }
    std::vector<double> prob(size_t(n), 0.0);
    for (auto& c : kept) prob[size_t(c.id)] = double(c.weight) / double(total);
    for (int64_t i = 0; i < n; ++i) {
      const double mean = kDraws * prob[size_t(i)];
      const double sd = std::sqrt(kDraws * prob[size_t(i)] * (1 - prob[size_t(i)]));
      EXPECT_LE(std::fabs(counts[size_t(i)] - mean), 5 * sd) << describe(base) << " token " << i;
    }
  }
}

TEST(Sampling, DrawIsAPureFunctionOfSeedAndStep) {
  const std::vector<float> flat(16, 0.25f);
  const SampleParams p = params(1.0f, 0, 1.0f, 42, 7);
  const int32_t t = cpu::sample_row(flat.data(), 16, p);
  for (int i = 0; i < 10; ++i) EXPECT_EQ(cpu::sample_row(flat.data(), 16, p), t);
  std::vector<int> seen(16, 0), seen_seed(16, 0);
  for (uint64_t step = 0; step < 200; ++step) {
    seen[size_t(cpu::sample_row(flat.data(), 16, params(1.0f, 0, 1.0f, 42, step)))]++;
    seen_seed[size_t(cpu::sample_row(flat.data(), 16, params(1.0f, 0, 1.0f, step, 3)))]++;
  }
  EXPECT_EQ(std::count(seen.begin(), seen.end(), 0), 0);
  EXPECT_EQ(std::count(seen_seed.begin(), seen_seed.end(), 0), 0);
}

TEST(Sampling, SamplerFollowsTheStream) {
  std::mt19937 rng(4);
  const std::vector<float> l = random_row(rng, 500, 1);
  Sampler s(0.8f, 40, 0.9f, 1234);
  for (uint64_t step = 0; step < 50; ++step)
    EXPECT_EQ(s.sample(l.data(), 500),
              cpu::sample_row(l.data(), 500, params(0.8f, 40, 0.9f, 1234, step)));
}

TEST(Sampling, RejectsVocabOutOfRange) {
  const float l[1] = {0.0f};
  EXPECT_THROW(cpu::sample_row(l, 0, params(1, 0, 1)), Error);
}

// min_p at the exact edge: with min_p = 0.5 the floor is 2^39, and a logit whose weight is
// exactly 2^39 (e^x == 0.5 in kiln_expf) survives with all its ties while the next float below
// (weight < 2^39) is dropped with all of its.
TEST(Sampling, MinPThresholdIsInclusiveOverTies) {
  float x = -0.6931472f;  // ~ -ln 2; walk to a float whose kiln_expf is exactly 0.5
  for (int i = 0; i < 64 && kiln_expf(x) != 0.5f; ++i)
    x = kiln_expf(x) < 0.5f ? std::nextafter(x, 0.0f) : std::nextafter(x, -1.0f);
  ASSERT_EQ(kiln_expf(x), 0.5f);
  // The first float below x with a smaller weight.
  float below = std::nextafter(x, -1.0f);
  while (sampling::weight(below, 0.0f, 1.0f) == sampling::weight(x, 0.0f, 1.0f))
    below = std::nextafter(below, -1.0f);
  ASSERT_EQ(sampling::weight(x, 0.0f, 1.0f), uint64_t(1) << 39);
  ASSERT_LT(sampling::weight(below, 0.0f, 1.0f), uint64_t(1) << 39);
  const std::vector<float> l = {below, x, 0.0f, -5.0f, x, below, 0.0f, x};
  SampleParams p = params(1.0f, 0, 1.0f, 9);
  p.min_p = 0.5f;
  std::vector<int32_t> ids;
  for (const auto& c : cpu::sample_candidates(l.data(), int64_t(l.size()), p)) ids.push_back(c.id);
  EXPECT_EQ(ids, (std::vector<int32_t>{1, 2, 4, 6, 7}));
  // Every draw lands in that set, and each of its tokens is drawn.
  std::vector<int> hits(l.size(), 0);
  for (uint64_t step = 0; step < 2000; ++step) {
    p.step = step;
    hits[size_t(cpu::sample_row(l.data(), int64_t(l.size()), p))]++;
  }
  EXPECT_EQ(hits, (std::vector<int>{0, hits[1], hits[2], 0, hits[4], 0, hits[6], hits[7]}));
  for (int i : {1, 2, 4, 6, 7}) EXPECT_GT(hits[size_t(i)], 0) << i;
  // Top-p then measures only the survivors: S = 2 * 2^40 + 3 * 2^39, and top_p = 0.5 needs the
  // two maxima (mass before the third ranked token: 2^41 >= S / 2 = 1.75 * 2^40).
  p.top_p = 0.5f;
  ids.clear();
  for (const auto& c : cpu::sample_candidates(l.data(), int64_t(l.size()), p)) ids.push_back(c.id);
  EXPECT_EQ(ids, (std::vector<int32_t>{2, 6}));
}

TEST(Sampling, MinPLimits) {
  const std::vector<float> l = {1.0f, 3.0f, 3.0f, 2.9f, -kInf, -kInf, 0.5f};
  const int64_t n = int64_t(l.size());
  const auto kept = [&](float min_p, float t = 1.0f, int32_t k = 0) {
    SampleParams p = params(t, k, 1.0f);
    p.min_p = min_p;
    std::vector<int32_t> ids;
    for (const auto& c : cpu::sample_candidates(l.data(), n, p)) ids.push_back(c.id);
    return ids;
  };
  const std::vector<int32_t> all = kept(0.0f);
  EXPECT_EQ(all.size(), size_t(n));
  EXPECT_EQ(kept(-1.0f), all);  // <= 0 and NaN: off
  EXPECT_EQ(kept(kNaN), all);
  EXPECT_EQ(kept(1.0f), (std::vector<int32_t>{1, 2}));  // >= 1: the maximum's ties alone
  EXPECT_EQ(kept(7.5f), (std::vector<int32_t>{1, 2}));
  // Relative probabilities at T = 1: e^-0.1 ~ 0.905, e^-2 ~ 0.135, e^-2.5 ~ 0.082; at T = 2
  // (min_p after the temperature): e^-1 ~ 0.37, e^-1.25 ~ 0.29.
  EXPECT_EQ(kept(0.9f), (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(kept(0.2f), (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(kept(0.1f), (std::vector<int32_t>{0, 1, 2, 3}));
  EXPECT_EQ(kept(0.2f, 2.0f), (std::vector<int32_t>{0, 1, 2, 3, 6}));
  EXPECT_EQ(kept(0.3f, 2.0f), (std::vector<int32_t>{0, 1, 2, 3}));
  // With top-k: the survivors of both.
  EXPECT_EQ(kept(0.1f, 1.0f, 2), (std::vector<int32_t>{1, 2}));
  // Greedy ignores min_p.
  SampleParams g = params(0.0f, 0, 1.0f);
  g.min_p = 1.0f;
  EXPECT_EQ(cpu::sample_row(l.data(), n, g), 1);
}

TEST(Sampling, EditsApplyInTheDocumentedOrder) {
  // Values exact in FP32, so each expectation is the documented formula evaluated by hand.
  const int64_t rows = 2, vocab = 6;
  std::vector<float> l = {2.0f, -1.0f, -2.0f, 4.0f, 1.0f, 0.5f,   // row 0
                          2.0f, -1.0f, -2.0f, 4.0f, 1.0f, 0.5f};  // row 1
  const std::vector<RowPenalty> pen = {{0.25f, 0.5f, 1.5f}, {1.0f, 0.0f, 2.0f}};
  const std::vector<LogitEdit> edits = {
      {0, 0, 1.0f, 2, 1},   // (2 + 1) / 1.5 = 2; 2 - (0.5 * 2 + 0.25) = 0.75
      {0, 1, 3.0f, 0, 1},   // -1 + 3 = 2 > 0, so divided: 2 / 1.5 (bias before repetition)
      {0, 2, 0.5f, 1, 1},   // (-2 + 0.5) * 1.5 = -2.25; -2.25 - (0.5 + 0.25) = -3
      {0, 3, -kInf, 0, 0},  // banned
      {0, 4, 0.0f, 3, 0},   // not seen: no repetition; 1 - (1.5 + 0.25) = -0.75
      {1, 0, 0.0f, 1, 1},   // row 1's penalties: 2 / 2 = 1; 1 - (0 + 1) = 0
      {1, 2, 0.0f, 0, 1},   // -2 * 2 = -4, no count: no frequency / presence
  };
  cpu::edit_logits(l.data(), rows, vocab, pen.data(), edits.data(), int64_t(edits.size()));
  const std::vector<float> want = {0.75f, 2.0f / 1.5f, -3.0f, -kInf, -0.75f, 0.5f,
                                   0.0f,  -1.0f,       -4.0f, 4.0f,  1.0f,   0.5f};
  for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(l[i], want[i]) << i;
  // A bad entry edits nothing, wherever it is.
  std::vector<float> before = l;
  const std::vector<LogitEdit> bad = {{0, 5, 1.0f, 0, 0}, {1, 6, 1.0f, 0, 0}};
  EXPECT_THROW(cpu::edit_logits(l.data(), rows, vocab, pen.data(), bad.data(), 2), Error);
  EXPECT_EQ(l, before);
  const std::vector<LogitEdit> bad_row = {{2, 0, 1.0f, 0, 0}};
  EXPECT_THROW(cpu::edit_logits(l.data(), rows, vocab, pen.data(), bad_row.data(), 1), Error);
}

// log_softmax in double from the float logits: the exact value the FP32 result approximates.
void logprobs_double(const std::vector<float>& l, int64_t k, double& lse,
                     std::vector<int32_t>& top) {
  std::vector<double> v(l.size());
  for (size_t i = 0; i < l.size(); ++i) v[i] = std::isnan(l[i]) ? -kInf : double(l[i]);
  const double m = *std::max_element(v.begin(), v.end());
  double sum = 0;
  for (double x : v) sum += x == m ? 1.0 : std::exp(x - m);
  lse = m + std::log(sum);
  top.resize(l.size());
  std::iota(top.begin(), top.end(), 0);
  std::stable_sort(top.begin(), top.end(),
                   [&](int32_t a, int32_t b) { return v[size_t(a)] > v[size_t(b)]; });
  top.resize(size_t(k));
}

TEST(Sampling, LogprobsMatchADoublePrecisionReference) {
  std::mt19937 rng(11);
  for (int64_t n : {1, 2, 5, 100, 4099}) {
    for (int i = 0; i < 60; ++i) {
      const int mode = i % 8 == 7 ? 3 : i % 8;  // mode 7's infinite rows have a test of their own
      const std::vector<float> l = random_row(rng, n, mode);
      const int64_t k = std::min<int64_t>(n, int64_t(rng() % 21));
      double lse;
      std::vector<int32_t> want_top;
      logprobs_double(l, k, lse, want_top);
      if (!std::isfinite(lse)) continue;  // all -inf: the uniform row below
      const int32_t id = int32_t(rng() % uint64_t(n));
      float lp;
      std::vector<int32_t> top(static_cast<size_t>(k));
      std::vector<float> top_lp(static_cast<size_t>(k));
      cpu::logprobs_row(l.data(), n, id, k, &lp, top.data(), top_lp.data());
      ASSERT_EQ(top, want_top) << "n=" << n << " row " << i;
      // FP32 keeps ~2^-24 of each value: a few of those of |lp|, plus the sum's terms' error.
      const auto check = [&](float got, int32_t tok) {
        const double x = std::isnan(l[size_t(tok)]) ? -kInf : double(l[size_t(tok)]);
        const double ref = x - lse;
        if (std::isinf(ref)) {
          EXPECT_EQ(got, float(ref)) << "token " << tok;
          return;
        }
        EXPECT_NEAR(got, ref, 1e-6 + 2.5e-7 * std::fabs(ref)) << "n=" << n << " token " << tok;
      };
      check(lp, id);
      for (int64_t j = 0; j < k; ++j) check(top_lp[size_t(j)], top[size_t(j)]);
    }
  }
}

TEST(Sampling, LogprobsOfDegenerateRows) {
  float lp;
  int32_t top[3];
  float top_lp[3];
  // All -inf (and NaN as -inf): uniform, as the sampler draws.
  const std::vector<float> dead = {-kInf, kNaN, -kInf, -kInf};
  cpu::logprobs_row(dead.data(), 4, 1, 3, &lp, top, top_lp);
  EXPECT_FLOAT_EQ(lp, -std::log(4.0f));
  EXPECT_EQ(std::vector<int32_t>(top, top + 3), (std::vector<int32_t>{0, 1, 2}));
  // +inf maxima share the mass; everything else is -inf.
  const std::vector<float> inf = {1.0f, kInf, 3.0f, kInf};
  cpu::logprobs_row(inf.data(), 4, 0, 3, &lp, top, top_lp);
  EXPECT_EQ(lp, -kInf);
  EXPECT_EQ(std::vector<int32_t>(top, top + 3), (std::vector<int32_t>{1, 3, 2}));
  EXPECT_FLOAT_EQ(top_lp[0], -std::log(2.0f));
  EXPECT_FLOAT_EQ(top_lp[1], -std::log(2.0f));
  EXPECT_EQ(top_lp[2], -kInf);
  // Signed zeros tie (index order); a one-token row is certain.
  const std::vector<float> zeros = {-0.0f, 0.0f, -1.0f};
  cpu::logprobs_row(zeros.data(), 3, 2, 2, &lp, top, top_lp);
  EXPECT_EQ(std::vector<int32_t>(top, top + 2), (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(top_lp[0], top_lp[1]);
  const float one = 7.0f;
  cpu::logprobs_row(&one, 1, 0, 1, &lp, top, top_lp);
  EXPECT_EQ(lp, 0.0f);
  EXPECT_THROW(cpu::logprobs_row(zeros.data(), 3, 3, 0, &lp, top, top_lp), Error);
  EXPECT_THROW(cpu::logprobs_row(zeros.data(), 3, 0, 4, &lp, top, top_lp), Error);
}

#ifdef KILN_HAVE_CUDA

#define CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr

// Samples rows [rows, vocab] on the GPU (at element `offset` of the buffer, to test unaligned
// rows) and returns the tokens.
void gpu_sample(const std::vector<float>& logits, int64_t rows, int64_t vocab,
                const std::vector<SampleParams>& ps, std::vector<int32_t>& out, size_t offset = 0,
                bool graph = false) {
  float* d_l = nullptr;
  SampleParams* d_p = nullptr;
  int32_t* d_o = nullptr;
  void* ws = nullptr;
  const size_t wsb = cuda::sample_workspace(rows, vocab);
  CUDA_OK(cudaMalloc(&d_l, (logits.size() + offset) * sizeof(float)));
  CUDA_OK(cudaMalloc(&d_p, ps.size() * sizeof(SampleParams)));
  CUDA_OK(cudaMalloc(&d_o, size_t(rows) * sizeof(int32_t)));
  if (wsb) CUDA_OK(cudaMalloc(&ws, wsb));
  CUDA_OK(cudaMemcpy(d_l + offset, logits.data(), logits.size() * sizeof(float),
                     cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(d_p, ps.data(), ps.size() * sizeof(SampleParams), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(d_o, 0xff, size_t(rows) * sizeof(int32_t)));
  cudaStream_t s;
  CUDA_OK(cudaStreamCreate(&s));
  if (graph) {
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CUDA_OK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    cuda::sample(d_l + offset, rows, vocab, d_p, d_o, ws, s);
    CUDA_OK(cudaStreamEndCapture(s, &g));
    CUDA_OK(cudaGraphInstantiate(&ge, g, 0));
    CUDA_OK(cudaGraphLaunch(ge, s));
    CUDA_OK(cudaGraphExecDestroy(ge));
    CUDA_OK(cudaGraphDestroy(g));
  } else {
    cuda::sample(d_l + offset, rows, vocab, d_p, d_o, ws, s);
  }
  CUDA_OK(cudaStreamSynchronize(s));
  CUDA_OK(cudaStreamDestroy(s));
  out.assign(size_t(rows), -1);
  CUDA_OK(cudaMemcpy(out.data(), d_o, size_t(rows) * sizeof(int32_t), cudaMemcpyDeviceToHost));
  CUDA_OK(cudaFree(d_l));
  CUDA_OK(cudaFree(d_p));
  CUDA_OK(cudaFree(d_o));
  if (ws) CUDA_OK(cudaFree(ws));
}

// Random rows and mixed per-row settings; every GPU token must equal the reference's.
void check_against_cpu(int64_t vocab, int64_t rows, uint32_t seed, size_t offset = 0,
                       bool graph = false) {
  std::mt19937 rng(seed);
  std::vector<float> logits;
  logits.reserve(size_t(rows * vocab));
  std::vector<SampleParams> ps;
  for (int64_t r = 0; r < rows; ++r) {
    const std::vector<float> row = random_row(rng, vocab, int(rng() % 8));
    logits.insert(logits.end(), row.begin(), row.end());
    ps.push_back(random_params(rng, vocab, int(r % 6)));
  }
  std::vector<int32_t> got;
  gpu_sample(logits, rows, vocab, ps, got, offset, graph);
  ASSERT_EQ(got.size(), size_t(rows));
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t want = cpu::sample_row(logits.data() + r * vocab, vocab, ps[size_t(r)]);
    EXPECT_EQ(got[size_t(r)], want)
        << "vocab " << vocab << " row " << r << " of " << rows << " " << describe(ps[size_t(r)]);
  }
}

class SamplingCuda : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU visible";
  }
};

TEST_F(SamplingCuda, MatchesCpuReferenceAcrossVocabSizes) {
  uint32_t seed = 100;
  for (int64_t vocab : {1, 2, 7, 1000, 4099, 32000, 128256, 151936})
    for (int round = 0; round < 2; ++round) check_against_cpu(vocab, 64, seed++);
}

TEST_F(SamplingCuda, MatchesCpuReferenceForAnyRowCount) {
  uint32_t seed = 200;
  for (int64_t rows : {1, 2, 5, 17, 63, 64, 256}) check_against_cpu(1000, rows, seed++);
}

// Ordinary rows with one NaN or +inf each, greedy and sampled: kNonFiniteLogits, as the CPU.
TEST_F(SamplingCuda, NonFiniteRowsAreRefused) {
  std::mt19937 rng(600);
  for (const int64_t vocab : {1000, 128256}) {
    const int64_t rows = 16;
    std::vector<float> logits;
    std::vector<SampleParams> ps;
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<float> row = random_row(rng, vocab, int(r % 4));
      if (r % 4 != 3) row[size_t(rng() % uint64_t(vocab))] = r % 2 ? kNaN : kInf;
      logits.insert(logits.end(), row.begin(), row.end());
      ps.push_back(r % 3 ? params(0.8f, int32_t(r % 5) * 10, 0.9f, uint64_t(r)) : params(0, 0, 1));
    }
    std::vector<int32_t> got;
    gpu_sample(logits, rows, vocab, ps, got);
    for (int64_t r = 0; r < rows; ++r) {
      const int32_t want = cpu::sample_row(logits.data() + r * vocab, vocab, ps[size_t(r)]);
      EXPECT_EQ(want == kNonFiniteLogits, r % 4 != 3) << "row " << r;
      EXPECT_EQ(got[size_t(r)], want) << "vocab " << vocab << " row " << r;
    }
  }
}

TEST_F(SamplingCuda, UnalignedRows) {
  check_against_cpu(1000, 16, 300, 1);
  check_against_cpu(32000, 16, 301, 3);
}

TEST_F(SamplingCuda, CapturesIntoAGraph) {
  check_against_cpu(32000, 24, 400, 0, true);
}

TEST_F(SamplingCuda, LargeKeptSetsAndManyTies) {
  // Flat rows (tens of thousands kept), top-k beyond the shared-memory list, boundaries inside
  // big tie groups: the row-wide paths.
  const int64_t vocab = 128256, rows = 24;
  std::mt19937 rng(500);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> logits(size_t(rows * vocab));
  std::vector<SampleParams> ps;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < vocab; ++i) {
      const float x = nd(rng);
      logits[size_t(r * vocab + i)] = r % 3 == 0 ? x * 0.01f : r % 3 == 1 ? std::round(x) : x * 4;
    }
    const float pp[] = {0.5f, 0.99f, 1.0f};
    const int32_t kk[] = {0, 3000, 100000, 40};
    ps.push_back(params(r % 2 ? 1.0f : 2.0f, kk[r % 4], pp[(r / 4) % 3], rng(), uint64_t(r)));
  }
  std::vector<int32_t> got;
  gpu_sample(logits, rows, vocab, ps, got);
  for (int64_t r = 0; r < rows; ++r)
    EXPECT_EQ(got[size_t(r)], cpu::sample_row(logits.data() + r * vocab, vocab, ps[size_t(r)]))
        << "row " << r << " " << describe(ps[size_t(r)]);
}

TEST_F(SamplingCuda, MinPMatchesCpuReference) {
  // min_p on every row, alone and with top-k / top-p, over row shapes from flat to peaked.
  std::mt19937 rng(700);
  const float mps[] = {0.001f, 0.02f, 0.05f, 0.1f, 0.3f, 0.7f, 1.0f};
  for (int64_t vocab : {7, 1000, 32000, 151936}) {
    for (int round = 0; round < 3; ++round) {
      const int64_t rows = 64;
      std::vector<float> logits;
      std::vector<SampleParams> ps;
      for (int64_t r = 0; r < rows; ++r) {
        const std::vector<float> row = random_row(rng, vocab, int(rng() % 8));
        logits.insert(logits.end(), row.begin(), row.end());
        SampleParams p = random_params(rng, vocab, 1 + int(r % 5));
        p.min_p = mps[rng() % 7];
        ps.push_back(p);
      }
      std::vector<int32_t> got;
      gpu_sample(logits, rows, vocab, ps, got);
      for (int64_t r = 0; r < rows; ++r)
        EXPECT_EQ(got[size_t(r)], cpu::sample_row(logits.data() + r * vocab, vocab, ps[size_t(r)]))
            << "vocab " << vocab << " row " << r << " " << describe(ps[size_t(r)]);
    }
  }
}

TEST_F(SamplingCuda, IsDeterministic) {
  std::mt19937 rng(600);
  const int64_t vocab = 32000, rows = 64;
  std::vector<float> logits;
  std::vector<SampleParams> ps;
  for (int64_t r = 0; r < rows; ++r) {
    const auto row = random_row(rng, vocab, int(r % 8));
    logits.insert(logits.end(), row.begin(), row.end());
    ps.push_back(random_params(rng, vocab, int(r % 6)));
  }
  std::vector<int32_t> a, b;
  gpu_sample(logits, rows, vocab, ps, a);
  gpu_sample(logits, rows, vocab, ps, b);
  EXPECT_EQ(a, b);
}

#endif  // KILN_HAVE_CUDA

// The CUDA backend's edit_logits and logprobs against the CPU reference, through the Backend
// interface (so these compile in every build; they skip without a GPU).
class LogitsCuda : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU visible";
    gpu = make_cuda_backend(DType::F32);
    ASSERT_NE(gpu, nullptr);
  }
  float* upload(const std::vector<float>& v) {
    auto* d = static_cast<float*>(gpu->alloc(v.size() * sizeof(float)));
    gpu->to_device(d, v.data(), v.size() * sizeof(float));
    return d;
  }
  std::unique_ptr<Backend> gpu;
};

TEST_F(LogitsCuda, EditLogitsIsBitwiseTheReference) {
  std::mt19937 rng(800);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  for (int64_t vocab : {5, 1001, 32000}) {
    const int64_t rows = 9;
    std::vector<float> l(static_cast<size_t>(rows * vocab));
    for (float& x : l) x = nd(rng);
    std::vector<RowPenalty> pen(static_cast<size_t>(rows));
    for (auto& p : pen)  // some rows without repetition; penalties of both signs
      p = {nd(rng) * 0.3f, nd(rng) * 0.3f, rng() % 3 ? 1.0f + std::fabs(nd(rng)) * 0.2f : 1.0f};
    // Distinct (row, id) pairs, about a third of each row, in random order.
    std::vector<LogitEdit> edits;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < vocab; ++i) {
        if (rng() % 3) continue;
        LogitEdit e;
        e.row = int32_t(r), e.id = int32_t(i);
        e.bias = rng() % 4 ? 0.0f : rng() % 5 ? nd(rng) : -kInf;
        e.count = rng() % 2 ? int32_t(rng() % 7) : 0;
        e.seen = e.count > 0 || rng() % 2;
        edits.push_back(e);
      }
    std::shuffle(edits.begin(), edits.end(), rng);
    const std::vector<LogitEdit> kept = edits;
    const std::vector<RowPenalty> kept_pen = pen;
    float* d = upload(l);
    gpu->edit_logits(d, rows, vocab, pen.data(), edits.data(), int64_t(edits.size()));
    // The call copied the host arrays before it returned: scribbling on them changes nothing.
    std::fill(edits.begin(), edits.end(), LogitEdit{0, 0, kNaN, 1, 1});
    std::fill(pen.begin(), pen.end(), RowPenalty{kNaN, kNaN, kNaN});
    std::vector<float> got(l.size());
    gpu->to_host(got.data(), d, got.size() * sizeof(float));
    gpu->release(d);
    cpu::edit_logits(l.data(), rows, vocab, kept_pen.data(), kept.data(), int64_t(kept.size()));
    size_t differ = 0;
    for (size_t i = 0; i < l.size(); ++i) differ += float_bits(got[i]) != float_bits(l[i]);
    EXPECT_EQ(differ, 0u) << "vocab " << vocab << ": " << differ << " of " << l.size()
                          << " logits differ in some bit";
  }
  // Entries outside the rows / vocabulary throw before anything is copied.
  const std::vector<float> l(8, 1.0f);
  float* d = upload(l);
  const RowPenalty pen[1] = {};
  const LogitEdit bad[1] = {{0, 8, 1.0f, 0, 0}};
  EXPECT_THROW(gpu->edit_logits(d, 1, 8, pen, bad, 1), Error);
  gpu->release(d);
}

TEST_F(LogitsCuda, LogprobsMatchTheReference) {
  std::mt19937 rng(900);
  for (int64_t vocab : {1, 3, 20, 1001, 32000, 151936}) {
    for (int64_t k : {0, 1, 3, 5, 8, 20}) {
      if (k > vocab) continue;
      const int64_t rows = vocab > 100000 ? 8 : 24;
      std::vector<float> l;
      std::vector<int32_t> ids;
      for (int64_t r = 0; r < rows; ++r) {
        const std::vector<float> row = random_row(rng, vocab, int(rng() % 8));
        l.insert(l.end(), row.begin(), row.end());
        ids.push_back(int32_t(rng() % uint64_t(vocab)));
      }
      float* d = upload(l);
      std::vector<float> lp(static_cast<size_t>(rows)), top_lp(size_t(rows * k));
      std::vector<int32_t> top(static_cast<size_t>(rows * k));
      gpu->logprobs(d, rows, vocab, ids.data(), k, lp.data(), top.data(), top_lp.data());
      gpu->release(d);
      for (int64_t r = 0; r < rows; ++r) {
        float want_lp;
        std::vector<int32_t> want_top(static_cast<size_t>(k));
        std::vector<float> want_top_lp(static_cast<size_t>(k));
        cpu::logprobs_row(l.data() + r * vocab, vocab, ids[size_t(r)], k, &want_lp, want_top.data(),
                          want_top_lp.data());
        const auto close = [&](float got, float want, const char* what) {
          if (std::isinf(want))
            EXPECT_EQ(got, want) << what << " vocab " << vocab << " row " << r;
          else
            EXPECT_NEAR(got, want, 1e-5) << what << " vocab " << vocab << " row " << r;
        };
        close(lp[size_t(r)], want_lp, "lp");
        for (int64_t j = 0; j < k; ++j) {
          EXPECT_EQ(top[size_t(r * k + j)], want_top[size_t(j)])
              << "vocab " << vocab << " k " << k << " row " << r << " rank " << j;
          close(top_lp[size_t(r * k + j)], want_top_lp[size_t(j)], "top");
        }
      }
    }
  }
}

TEST_F(LogitsCuda, LogprobsRejectBadArguments) {
  const std::vector<float> l(30, 0.0f);
  float* d = upload(l);
  float lp[1], top_lp[21];
  int32_t top[21];
  const int32_t out_of_range[1] = {30}, ok[1] = {0};
  EXPECT_THROW(gpu->logprobs(d, 1, 30, out_of_range, 0, lp, top, top_lp), Error);
  EXPECT_THROW(gpu->logprobs(d, 1, 30, ok, 21, lp, top, top_lp), Error);
  gpu->logprobs(d, 1, 30, ok, 2, lp, top, top_lp);  // a flat row: uniform, index order
  EXPECT_NEAR(lp[0], -std::log(30.0), 1e-6);
  EXPECT_EQ(top[0], 0);
  EXPECT_EQ(top[1], 1);
  gpu->release(d);
}

}  // namespace
}  // namespace kiln::test
