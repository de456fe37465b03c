// Token sampling on the GPU: picks exactly the token of the CPU reference cpu::sample_row
// (backends/cpu/cpu_sample.h documents the semantics) for every row.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "graph/backend.h"

namespace kiln::cuda {

// Bytes of device workspace sample() needs for this shape. Currently 0 (all state lives in shared
// memory); callers allocate what it returns so that may change.
size_t sample_workspace(int64_t rows, int64_t vocab);

// One token per row of F32 logits [rows, vocab] (device memory) into d_out[rows] (device), with
// the settings of row i in d_params[i] (device). One block per row; no allocation, host sync or
// host read, so it can be captured into a CUDA graph. Deterministic. Requires
// 1 <= vocab < 2^24 (throws kiln::Error otherwise).
void sample(const float* logits, int64_t rows, int64_t vocab, const SampleParams* d_params,
            int32_t* d_out, void* workspace, cudaStream_t s);

}  // namespace kiln::cuda
