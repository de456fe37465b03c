// Tensor-core (mma.sync m16n8k16) flash attention over the paged KV cache, for prefill in F16 /
// BF16 (cuda_attention_tc.cu). attention() tries it first for single-sequence launches of at
// least kTcMinRows query rows and for the prefill chunks of every mixed batch, and falls back to
// its CUDA-core kernel when attention_tc() declines.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "backends/cuda/cuda_kernels.h"
#include "core/dtype.h"

namespace kiln::cuda {

// Fewer query rows than this: the CUDA-core kernel (split over keys) fills the GPU better.
constexpr int64_t kTcMinRows = 16;

// Runs attention on tensor cores and returns true, or returns false having done nothing when it
// does not handle the launch. For a mixed batch (a.seq_start) it runs only the prefill chunks,
// sequences [num_decode, num_seqs), one launch for all; the decode rows [0, num_decode) are left
// to the caller. It declines: act not F16/BF16, batched decode (a.seq without a.seq_start), a
// mixed batch without prefill chunks, head_dim not one of
// 64, 80, 96, 128, 256, q / out / K / V pools not 16-byte aligned or ldq / ldo / kv_dim not
// multiples of 8 elements, or turned off (KILN_CUDA_ATTN_TC=0, set_attention_tc_enabled).
// No host synchronisation and no allocation: capturable in a CUDA graph.
// KILN_CUDA_ATTN_TC_ROWS=64|128 forces the rows per block (testing; else chosen per launch).
bool attention_tc(DType act, const AttnLaunch& a, cudaStream_t s);

// Process-wide switch (initially on unless KILN_CUDA_ATTN_TC=0): A/B timing and tests.
void set_attention_tc_enabled(bool on);
bool attention_tc_enabled();

}  // namespace kiln::cuda
