// Decode-GEMV microbenchmark: kiln's GEMV kernel against cuBLASLt on the weight shapes of
// Llama-3.1-8B and Qwen3-0.6B (BF16, n = 1, 2, 4, 8 rows of x), as achieved weight-read GB/s.
// Weights rotate over enough copies to exceed L2, so every call streams from HBM.
// Then token sampling (cuda::sample) over a 128256 vocabulary, greedy and sampled, 1 and 64
// rows; back-to-back launches on logits that stay in L2, as in a decode step after the LM head.
// Built by CMake as bench_gpu_kernels; prints a note and exits when built without CUDA.
#ifdef KILN_HAVE_CUDA
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#include "backends/cuda/cuda_common.h"
#include "backends/cuda/cuda_gemm.h"
#include "backends/cuda/cuda_kernels.h"
#include "backends/cuda/cuda_sample.h"
#include "gpu_timing.h"

namespace {

struct GemvShape {
  const char* name;
  int64_t in, out;
};

}  // namespace

int main() {
  using namespace kiln;
  const GemvShape shapes[] = {
      {"llama8b qkv", 4096, 6144},       {"llama8b o", 4096, 4096},
      {"llama8b gate_up", 4096, 28672},  {"llama8b down", 14336, 4096},
      {"llama8b lm_head", 4096, 128256}, {"qwen3-0.6b qkv", 1024, 4096},
      {"qwen3-0.6b o", 2048, 1024},      {"qwen3-0.6b gate_up", 1024, 6144},
      {"qwen3-0.6b down", 3072, 1024},   {"qwen3-0.6b lm_head", 1024, 151936}};
  cudaStream_t s;
  KILN_CUDA_CHECK(cudaStreamCreate(&s));
  cuda::LtGemm lt(s);
  cudaEvent_t a, b;
  KILN_CUDA_CHECK(cudaEventCreate(&a));
  KILN_CUDA_CHECK(cudaEventCreate(&b));
  std::printf("| shape | in | out | n | kiln GEMV us | GB/s | cuBLASLt us | GB/s |\n");
  std::printf("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  for (const GemvShape& sh : shapes) {
    const size_t wbytes = size_t(sh.in * sh.out) * 2;
    const int copies = int(std::max<size_t>(2, (size_t(256) << 20) / wbytes + 1));
    std::vector<void*> w(static_cast<size_t>(copies));
    for (auto& p : w) {
      KILN_CUDA_CHECK(cudaMalloc(&p, wbytes));
      KILN_CUDA_CHECK(cudaMemset(p, 0x3c, wbytes));  // bf16 0x3c3c ~ 0.0115: not zeros
    }
    void *x, *y;
    KILN_CUDA_CHECK(cudaMalloc(&x, size_t(8 * sh.in) * 2));
    KILN_CUDA_CHECK(cudaMemset(x, 0x3f, size_t(8 * sh.in) * 2));
    KILN_CUDA_CHECK(cudaMalloc(&y, size_t(8 * sh.out) * 2));
    for (int64_t n : {1, 2, 4, 8}) {
      auto time = [&](bool use_gemv) {
        auto call = [&](int i) {
          void* wi = w[size_t(i % copies)];
          if (!use_gemv ||
              !cuda::gemv(DType::BF16, x, n, sh.in, wi, sh.in, sh.out, nullptr, y, sh.out, s))
            lt.run(DType::BF16, x, n, sh.in, wi, sh.in, sh.out, y, sh.out);
        };
        return bench::gpu_us_per_call(call, copies, 20, s);  // back-to-back launches
      };
      const double tg = time(true), tl = time(false);
      std::printf("| %s | %lld | %lld | %lld | %.1f | %.0f | %.1f | %.0f |\n", sh.name,
                  (long long)sh.in, (long long)sh.out, (long long)n, tg, double(wbytes) / tg / 1e3,
                  tl, double(wbytes) / tl / 1e3);
      std::fflush(stdout);
    }
    for (void* p : w) KILN_CUDA_CHECK(cudaFree(p));
    KILN_CUDA_CHECK(cudaFree(x));
    KILN_CUDA_CHECK(cudaFree(y));
  }

  // Token sampling over Llama-3's vocabulary: N(0, 2.5) logits, one block per row.
  {
    const int64_t vocab = 128256, max_rows = 64;
    std::vector<float> hl(size_t(max_rows * vocab));
    std::mt19937 rng(1);
    std::normal_distribution<float> nd(0.0f, 2.5f);
    for (float& v : hl) v = nd(rng);
    float* dl;
    SampleParams* dp;
    int32_t* dout;
    KILN_CUDA_CHECK(cudaMalloc(&dl, hl.size() * sizeof(float)));
    KILN_CUDA_CHECK(cudaMalloc(&dp, size_t(max_rows) * sizeof(SampleParams)));
    KILN_CUDA_CHECK(cudaMalloc(&dout, size_t(max_rows) * sizeof(int32_t)));
    KILN_CUDA_CHECK(cudaMemcpy(dl, hl.data(), hl.size() * sizeof(float), cudaMemcpyHostToDevice));
    void* ws = nullptr;
    const size_t wsb = cuda::sample_workspace(max_rows, vocab);
    if (wsb) KILN_CUDA_CHECK(cudaMalloc(&ws, wsb));
    std::printf("\n| sample (vocab %lld) | rows | us per launch |\n| --- | ---: | ---: |\n",
                (long long)vocab);
    struct Case {
      const char* name;
      float temperature, top_p;
      int32_t top_k;
    };
    for (const Case& c :
         {Case{"greedy", 0.0f, 1.0f, 0}, Case{"top_k 50, top_p 0.9", 1.0f, 0.9f, 50},
          Case{"top_p 0.9", 1.0f, 0.9f, 0}, Case{"temperature 1", 1.0f, 1.0f, 0}}) {
      for (int64_t rows : {int64_t(1), max_rows}) {
        std::vector<SampleParams> ps(static_cast<size_t>(rows));
        for (size_t i = 0; i < ps.size(); ++i) {
          ps[i].temperature = c.temperature;
          ps[i].top_k = c.top_k;
          ps[i].top_p = c.top_p;
          ps[i].seed = i;
        }
        KILN_CUDA_CHECK(
            cudaMemcpy(dp, ps.data(), ps.size() * sizeof(SampleParams), cudaMemcpyHostToDevice));
        for (int i = 0; i < 10; ++i) cuda::sample(dl, rows, vocab, dp, dout, ws, s);
        const int reps = 200;
        KILN_CUDA_CHECK(cudaEventRecord(a, s));
        for (int i = 0; i < reps; ++i) cuda::sample(dl, rows, vocab, dp, dout, ws, s);
        KILN_CUDA_CHECK(cudaEventRecord(b, s));
        KILN_CUDA_CHECK(cudaEventSynchronize(b));
        float ms;
        KILN_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
        std::printf("| %s | %lld | %.1f |\n", c.name, (long long)rows, double(ms) * 1e3 / reps);
        std::fflush(stdout);
      }
    }
    KILN_CUDA_CHECK(cudaFree(dl));
    KILN_CUDA_CHECK(cudaFree(dp));
    KILN_CUDA_CHECK(cudaFree(dout));
    if (ws) KILN_CUDA_CHECK(cudaFree(ws));
  }
  return 0;
}
#else
#include <cstdio>
int main() {
  std::puts("bench_gpu_kernels: kiln was built without CUDA");
  return 0;
}
#endif
