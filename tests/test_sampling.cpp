// Token sampling: properties of the CPU reference (cpu::sample_row) against a brute-force
// reading of its documented rule, its statistics, its random stream; min_p, logit edits and
// log-probabilities. The CUDA kernels against this reference: test_cuda_sampling.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
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
#include "sampling_util.h"

namespace kiln::test {
namespace {

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

}  // namespace
}  // namespace kiln::test
