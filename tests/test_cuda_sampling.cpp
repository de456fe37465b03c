// The CUDA sampling kernel against the CPU reference, token for token (exact by design: shared
// arithmetic, integer sums), and the CUDA backend's edit_logits and logprobs against the CPU.
// The tests skip when no GPU is visible; those calling cuda:: directly compile only in CUDA
// builds, those going through the Backend interface in every build.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "backends/cpu/cpu_sample.h"
#include "core/error.h"
#include "graph/backend.h"
#include "kiln/kiln.h"
#include "sampling_util.h"

#ifdef KILN_HAVE_CUDA
#include <cuda_runtime.h>

#include "backends/cuda/cuda_sample.h"
#endif

namespace kiln::test {
namespace {

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
