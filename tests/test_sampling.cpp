// Token sampling: properties of the CPU reference (cpu::sample_row) against a brute-force
// reading of its documented rule, its statistics, its random stream; and the CUDA kernel
// against the reference, token for token (exact by design: shared arithmetic, integer sums).
// The CUDA tests skip when no GPU is visible; they compile only in CUDA builds.
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
         " step=" + std::to_string(p.step);
}

int32_t first_argmax(const float* l, int64_t n) {
  const auto v = [&](int64_t i) { return std::isnan(l[i]) ? -kInf : l[i]; };
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
  const std::vector<int32_t> want = {1, 1, 0, 0, 0, 0, 0, 0, 0};
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
      // The draw lands on a kept token with weight.
      const int32_t tok = cpu::sample_row(l.data(), n, p);
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

}  // namespace
}  // namespace kiln::test
