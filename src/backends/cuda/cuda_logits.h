// Logits processing on the GPU for the serving path: edits (logit_bias, bans, repetition /
// frequency / presence penalties) and log-probabilities, matching the CPU reference
// (backends/cpu/cpu_sample.h documents both) without a host round trip per row.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "graph/backend.h"

namespace kiln::cuda {

// The most top tokens logprobs() returns per row (OpenAI's top_logprobs limit).
constexpr int kMaxTopLogprobs = 20;

// Applies n LogitEdits (device array) to F32 logits [rows, vocab] (device) in place, row r with
// the penalties d_pen[r] (device). One thread per entry, so the entries must be checked
// (cpu::check_edits) and hold each (row, id) at most once. Bitwise the CPU reference's result
// (both use sampling::edit_logit). No allocation, host sync or host read.
void edit_logits(float* logits, int64_t vocab, const RowPenalty* d_pen, const LogitEdit* d_edits,
                 int64_t n, cudaStream_t s);

// log_softmax of rows of F32 logits [rows, vocab] (device), one block per row: d_lp[r] = the
// value of token d_ids[r], and the k (<= kMaxTopLogprobs, <= vocab) most likely tokens ranked by
// (logit desc, index asc) into d_top_ids / d_top_lp [rows, k]. All device arrays; the ids must
// be in [0, vocab) (an id outside gives NaN). Same ids as cpu::logprobs_row and values within a
// few ulp (only the order of the double sum differs). No allocation, host sync or host read.
void logprobs(const float* logits, int64_t rows, int64_t vocab, const int32_t* d_ids, int64_t k,
              float* d_lp, int32_t* d_top_ids, float* d_top_lp, cudaStream_t s);

}  // namespace kiln::cuda
