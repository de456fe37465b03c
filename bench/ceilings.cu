// Device ceilings for docs/perf.md: device-to-device copy bandwidth (bytes read + written), a
// read-only streaming kernel's bandwidth, and cuBLASLt BF16 8192^3 matmul TFLOP/s on random data.
// Built and run by bench/gpu_bench.sh:
//   nvcc -O3 -gencode=arch=compute_90a,code=sm_90a bench/ceilings.cu -lcublasLt -o ceilings
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(x)                                                                                 \
  do {                                                                                        \
    cudaError_t e = (x);                                                                      \
    if (e != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)
#define CB(x)                                                                                      \
  do {                                                                                             \
    cublasStatus_t s = (x);                                                                        \
    if (s != CUBLAS_STATUS_SUCCESS) {                                                              \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cublasLtGetStatusString(s)); \
      std::exit(1);                                                                                \
    }                                                                                              \
  } while (0)

__global__ void fill_bf16(__nv_bfloat16* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 15, h *= 2246822519u, h ^= h >> 13;
    p[i] = __float2bfloat16(float(h & 0xffff) / 65536.0f - 0.5f);
  }
}

// Streams `n` uint4 (n a multiple of 4 * grid size) and folds them into one word per thread
// (written so nothing is elided); 4 independent 16-byte loads in flight per thread.
__global__ void read_kernel(const uint4* __restrict__ p, size_t n, uint32_t* out) {
  uint32_t acc = 0;
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i + 3 * stride < n;
       i += 4 * stride) {
    uint4 v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = __ldcs(p + i + k * stride);
#pragma unroll
    for (int k = 0; k < 4; ++k) acc ^= v[k].x ^ v[k].y ^ v[k].z ^ v[k].w;
  }
  if (acc == 0x12345678u) out[0] = acc;
}

template <typename F>
float median_ms(F&& f, int warm, int reps) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < warm; ++i) f();
  std::vector<float> t;
  for (int i = 0; i < reps; ++i) {
    CK(cudaEventRecord(a));
    f();
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms;
    CK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int main() {
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize >> 20);

  // Copy: 4 GiB each way, far past L2.
  const size_t bytes = size_t(4) << 30;
  void *src, *dst;
  CK(cudaMalloc(&src, bytes));
  CK(cudaMalloc(&dst, bytes));
  fill_bf16<<<4096, 256>>>(static_cast<__nv_bfloat16*>(src), bytes / 2, 1);
  CK(cudaGetLastError());
  const float copy_ms =
      median_ms([&] { CK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice)); }, 3, 20);
  std::printf("copy_TBps %.3f  (cudaMemcpy D2D, %zu MiB, read+write counted)\n",
              2.0 * double(bytes) / (copy_ms * 1e-3) / 1e12, bytes >> 20);
  uint32_t* sink;
  CK(cudaMalloc(&sink, 4));
  const float read_ms = median_ms(
      [&] {
        // 1024 x 512 threads: the 2^28 vectors split into whole rounds of 4 loads each.
        read_kernel<<<1024, 512>>>(static_cast<const uint4*>(src), bytes / 16, sink);
      },
      3, 20);
  CK(cudaGetLastError());
  std::printf("read_TBps %.3f  (streaming read kernel, %zu MiB)\n",
              double(bytes) / (read_ms * 1e-3) / 1e12, bytes >> 20);
  CK(cudaFree(dst));

  // cuBLASLt BF16 GEMM 8192^3, FP32 accumulate.
  const int64_t N = 8192;
  __nv_bfloat16 *A, *B, *C;
  CK(cudaMalloc(&A, N * N * 2));
  CK(cudaMalloc(&B, N * N * 2));
  CK(cudaMalloc(&C, N * N * 2));
  fill_bf16<<<4096, 256>>>(A, size_t(N * N), 7);
  fill_bf16<<<4096, 256>>>(B, size_t(N * N), 9);
  CK(cudaGetLastError());
  cublasLtHandle_t h;
  CB(cublasLtCreate(&h));
  cublasLtMatmulDesc_t op;
  CB(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  CB(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
  CB(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
  cublasLtMatrixLayout_t la, lb, lc;
  CB(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, N, N, N));
  CB(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, N, N, N));
  CB(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, N, N, N));
  const size_t ws_bytes = size_t(32) << 20;
  void* ws;
  CK(cudaMalloc(&ws, ws_bytes));
  cublasLtMatmulPreference_t pref;
  CB(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t wsz = ws_bytes;
  CB(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsz,
                                          sizeof wsz));
  cublasLtMatmulHeuristicResult_t res;
  int found = 0;
  CB(cublasLtMatmulAlgoGetHeuristic(h, op, la, lb, lc, lc, pref, 1, &res, &found));
  if (!found) {
    std::fprintf(stderr, "no cuBLASLt algorithm\n");
    return 1;
  }
  const float alpha = 1, beta = 0;
  const float mm_ms = median_ms(
      [&] {
        CB(cublasLtMatmul(h, op, &alpha, A, la, B, lb, &beta, C, lc, C, lc, &res.algo, ws, ws_bytes,
                          0));
      },
      3, 10);
  std::printf("bf16_gemm_TFLOPs %.1f  (cuBLASLt 8192^3, FP32 accumulate, random data)\n",
              2.0 * double(N) * N * N / (mm_ms * 1e-3) / 1e12);
  return 0;
}
