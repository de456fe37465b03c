// Shared by the GPU micro-benchmarks: microseconds per call of back-to-back launches on one
// stream, after a warm-up. `copies`: how many weight copies the calls rotate over (call(i) uses
// copy i % copies), so every timed call streams from HBM rather than L2.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <functional>

#include "backends/cuda/cuda_common.h"

namespace kiln::bench {

inline double gpu_us_per_call(const std::function<void(int)>& call, int copies, int min_reps,
                              cudaStream_t s) {
  cudaEvent_t a, b;
  KILN_CUDA_CHECK(cudaEventCreate(&a));
  KILN_CUDA_CHECK(cudaEventCreate(&b));
  for (int i = 0; i < 2 * copies; ++i) call(i);
  const int reps = std::max(min_reps, 2 * copies);
  KILN_CUDA_CHECK(cudaEventRecord(a, s));
  for (int i = 0; i < reps; ++i) call(i);
  KILN_CUDA_CHECK(cudaEventRecord(b, s));
  KILN_CUDA_CHECK(cudaEventSynchronize(b));
  float ms;
  KILN_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
  KILN_CUDA_CHECK(cudaEventDestroy(a));
  KILN_CUDA_CHECK(cudaEventDestroy(b));
  return double(ms) * 1e3 / reps;
}

}  // namespace kiln::bench
