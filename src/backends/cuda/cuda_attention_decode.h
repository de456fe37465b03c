// Tensor-core decode attention (cuda_attention_decode.cu): one query token per row, each row with
// its own sequence (block-table row), for F16 / BF16 engines. attention() sends it the decode
// rows of every batch it takes (a mixed batch's first num_decode rows, a batched decode, or a
// single sequence's few rows) and keeps its CUDA-core kernel for the rest.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "backends/cuda/cuda_kernels.h"
#include "core/dtype.h"

namespace kiln::cuda {

// `a` describes only the rows to run: a.n rows, row i of sequence a.seq[i] (table row
// a.seq[i] * a.bt_stride; a.seq == nullptr: every row reads table a.block_table), at position
// a.pos[i]; a.seq_start is ignored. Host values only, so a launch recorded in a CUDA graph is the
// launch every replay needs: true when attention_decode() runs these rows. It declines F32,
// head sizes other than 64, 80, 96, 128, 256, GQA groups over 16 query heads, pointers not
// 16-byte aligned or strides not multiples of 8 elements, and everything while the tensor-core
// switch (set_attention_tc_enabled) is off.
bool attention_decode_supported(DType act, const AttnLaunch& a);
// Bytes of FP32 workspace and the number of zeroed int counters the launch needs (0: none).
size_t attention_decode_workspace(const AttnLaunch& a, int num_sms);
size_t attention_decode_counters(const AttnLaunch& a, int num_sms);
// Runs the rows (attention_decode_supported must hold). No host synchronisation, no allocation.
void attention_decode(DType act, const AttnLaunch& a, float* ws, int* counters, int num_sms,
                      cudaStream_t s);

}  // namespace kiln::cuda
