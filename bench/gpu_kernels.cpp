// Decode-GEMV microbenchmark: kiln's GEMV kernel against cuBLASLt on the weight shapes of
// Llama-3.1-8B and Qwen3-0.6B (BF16, n = 1, 2, 4, 8 rows of x), as achieved weight-read GB/s.
// Weights rotate over enough copies to exceed L2, so every call streams from HBM.
// Built by CMake as bench_gpu_kernels; prints a note and exits when built without CUDA.
#ifdef KILN_HAVE_CUDA
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <vector>

#include "backends/cuda/cuda_common.h"
#include "backends/cuda/cuda_gemm.h"
#include "backends/cuda/cuda_kernels.h"

namespace {

struct Shape {
  const char* name;
  int64_t in, out;
};

}  // namespace

int main() {
  using namespace kiln;
  const Shape shapes[] = {{"llama8b qkv", 4096, 6144},       {"llama8b o", 4096, 4096},
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
  for (const Shape& sh : shapes) {
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
        for (int i = 0; i < 2 * copies; ++i) call(i);
        const int reps = std::max(20, 2 * copies);
        KILN_CUDA_CHECK(cudaEventRecord(a, s));
        for (int i = 0; i < reps; ++i) call(i);
        KILN_CUDA_CHECK(cudaEventRecord(b, s));
        KILN_CUDA_CHECK(cudaEventSynchronize(b));
        float ms;
        KILN_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
        return double(ms) * 1e3 / reps;  // us per call (back-to-back launches)
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
  return 0;
}
#else
#include <cstdio>
int main() {
  std::puts("bench_gpu_kernels: kiln was built without CUDA");
  return 0;
}
#endif
