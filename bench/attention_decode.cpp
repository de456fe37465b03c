// Decode-attention microbenchmark: one decode step's attention over the paged KV cache, as the
// Decoder issues it (a mixed batch of decode rows only), Llama-3.1-8B shapes (32 query heads,
// 8 KV heads, head_dim 128, BF16, 16-token blocks scattered over the pool), for batch sizes 1 to
// 512 and several context lengths. Times the tensor-core decode kernel (cuda_attention_decode.cu)
// and the CUDA-core kernel (cuda_attention.cu, tensor cores switched off) as achieved K/V read
// GB/s, and prints the normalised difference between their outputs (the CUDA-core kernel computes
// in FP32: the difference is the BF16 rounding of P in the tensor-core kernel).
// Built by CMake as bench_attention_decode; prints a note and exits when built without CUDA.
#ifdef KILN_HAVE_CUDA
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "backends/cuda/cuda_attention_tc.h"
#include "backends/cuda/cuda_common.h"
#include "backends/cuda/cuda_kernels.h"

namespace {

struct Case {
  int64_t batch, ctx;
};

}  // namespace

int main() {
  using namespace kiln;
  constexpr int64_t H = 32, KVH = 8, D = 128, BS = 16, KVD = KVH * D;
  const Case cases[] = {{1, 1024},  {1, 8192},  {16, 1024}, {64, 1024},
                        {64, 4096}, {256, 256}, {512, 192}, {512, 1024}};
  cudaStream_t s;
  KILN_CUDA_CHECK(cudaStreamCreate(&s));
  int dev = 0, sms = 0;
  KILN_CUDA_CHECK(cudaGetDevice(&dev));
  KILN_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  cudaEvent_t e0, e1;
  KILN_CUDA_CHECK(cudaEventCreate(&e0));
  KILN_CUDA_CHECK(cudaEventCreate(&e1));
  std::mt19937 rng(7);
  std::printf(
      "| batch | context | K/V MB | tensor-core us | GB/s | CUDA-core us | GB/s | diff |\n");
  std::printf("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  for (const Case& c : cases) {
    // Contexts spread +-25% around c.ctx (a real batch is ragged), each sequence's blocks
    // scattered over the pool.
    std::uniform_int_distribution<int64_t> len_d(std::max<int64_t>(1, c.ctx * 3 / 4),
                                                 c.ctx * 5 / 4);
    std::vector<int32_t> pos(size_t(c.batch)), seq(size_t(c.batch)), start(size_t(c.batch) + 1);
    int64_t total = 0, longest = 0, stride = 0;
    for (int64_t i = 0; i < c.batch; ++i) {
      const int64_t len = c.batch == 1 ? c.ctx : len_d(rng);
      pos[size_t(i)] = int32_t(len - 1), seq[size_t(i)] = int32_t(i), start[size_t(i)] = int32_t(i);
      total += len, longest = std::max(longest, len);
    }
    start[size_t(c.batch)] = int32_t(c.batch);
    stride = (longest + BS - 1) / BS;
    const int64_t blocks = c.batch * stride;
    std::vector<int32_t> perm(static_cast<size_t>(blocks));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    const size_t pool = size_t(blocks * BS * KVD) * 2;
    void *kp, *vp, *q, *out_tc, *out_core;
    int32_t *dpos, *dseq, *dstart, *dtable;
    KILN_CUDA_CHECK(cudaMalloc(&kp, pool));
    KILN_CUDA_CHECK(cudaMalloc(&vp, pool));
    {  // random BF16 in [-1, 1): every value finite
      std::vector<__nv_bfloat16> h(pool / 2);
      std::uniform_real_distribution<float> u(-1.0f, 1.0f);
      for (auto& x : h) x = __float2bfloat16(u(rng));
      KILN_CUDA_CHECK(cudaMemcpy(kp, h.data(), pool, cudaMemcpyHostToDevice));
      std::shuffle(h.begin(), h.end(), rng);
      KILN_CUDA_CHECK(cudaMemcpy(vp, h.data(), pool, cudaMemcpyHostToDevice));
    }
    const size_t qbytes = size_t(c.batch * H * D) * 2;
    KILN_CUDA_CHECK(cudaMalloc(&q, qbytes));
    KILN_CUDA_CHECK(cudaMalloc(&out_tc, qbytes));
    KILN_CUDA_CHECK(cudaMalloc(&out_core, qbytes));
    {
      std::vector<__nv_bfloat16> h(qbytes / 2);
      std::normal_distribution<float> nd(0.0f, 1.0f);
      for (auto& x : h) x = __float2bfloat16(nd(rng));
      KILN_CUDA_CHECK(cudaMemcpy(q, h.data(), qbytes, cudaMemcpyHostToDevice));
    }
    auto up = [](const std::vector<int32_t>& v, int32_t** d) {
      KILN_CUDA_CHECK(cudaMalloc(d, v.size() * 4));
      KILN_CUDA_CHECK(cudaMemcpy(*d, v.data(), v.size() * 4, cudaMemcpyHostToDevice));
    };
    up(pos, &dpos), up(seq, &dseq), up(start, &dstart), up(perm, &dtable);
    cuda::AttnLaunch a{q,
                       H * D,
                       c.batch,
                       dpos,
                       kp,
                       vp,
                       dtable,
                       BS,
                       KVD,
                       H,
                       KVH,
                       D,
                       1.0f / std::sqrt(float(D)),
                       0.0f,
                       0,
                       nullptr,
                       8192,
                       nullptr,
                       H * D,
                       dseq,
                       stride,
                       dstart,
                       c.batch,
                       c.batch,
                       0};
    const size_t ws = cuda::attention_workspace(a, sms), nc = cuda::attention_counters(a, sms);
    float* dws = nullptr;
    int* dcount = nullptr;
    if (ws) KILN_CUDA_CHECK(cudaMalloc(&dws, ws));
    if (nc) {
      KILN_CUDA_CHECK(cudaMalloc(&dcount, nc * 4));
      KILN_CUDA_CHECK(cudaMemset(dcount, 0, nc * 4));
    }
    auto time = [&](bool tc, void* out) {
      cuda::set_attention_tc_enabled(tc);
      a.out = out;
      for (int i = 0; i < 3; ++i) cuda::attention(DType::BF16, a, dws, dcount, sms, s);
      const int reps = 20;
      KILN_CUDA_CHECK(cudaEventRecord(e0, s));
      for (int i = 0; i < reps; ++i) cuda::attention(DType::BF16, a, dws, dcount, sms, s);
      KILN_CUDA_CHECK(cudaEventRecord(e1, s));
      KILN_CUDA_CHECK(cudaEventSynchronize(e1));
      float ms;
      KILN_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
      return double(ms) * 1e3 / reps;
    };
    const double t_tc = time(true, out_tc), t_core = time(false, out_core);
    cuda::set_attention_tc_enabled(true);
    std::vector<__nv_bfloat16> ht(qbytes / 2), hc(qbytes / 2);
    KILN_CUDA_CHECK(cudaMemcpy(ht.data(), out_tc, qbytes, cudaMemcpyDeviceToHost));
    KILN_CUDA_CHECK(cudaMemcpy(hc.data(), out_core, qbytes, cudaMemcpyDeviceToHost));
    double num = 0, den = 0;
    for (size_t i = 0; i < ht.size(); ++i) {
      const double x = __bfloat162float(ht[i]), y = __bfloat162float(hc[i]);
      num += (x - y) * (x - y), den += y * y;
    }
    const double bytes = double(total) * KVD * 2 * 2;  // K and V, BF16
    std::printf("| %lld | %lld | %.0f | %.1f | %.0f | %.1f | %.0f | %.1e |\n", (long long)c.batch,
                (long long)c.ctx, bytes / 1e6, t_tc, bytes / t_tc / 1e3, t_core,
                bytes / t_core / 1e3, std::sqrt(num / std::max(den, 1e-30)));
    std::fflush(stdout);
    for (void* p : {kp, vp, q, out_tc, out_core, static_cast<void*>(dpos), static_cast<void*>(dseq),
                    static_cast<void*>(dstart), static_cast<void*>(dtable), static_cast<void*>(dws),
                    static_cast<void*>(dcount)})
      if (p) KILN_CUDA_CHECK(cudaFree(p));
  }
  return 0;
}

#else
#include <cstdio>
int main() {
  std::puts("bench_attention_decode: built without CUDA");
  return 0;
}
#endif
