// Token sampling, CPU reference. The CUDA kernel (backends/cuda/cuda_sample.h) picks exactly the
// token this picks for the same logits and SampleParams; both share core/sample_math.h.
//
// Semantics of one row of `vocab` F32 logits l (1 <= vocab < 2^24; NaN logits count as -inf):
//  * temperature <= 0: greedy, the index of the first maximum (as torch.argmax, except NaN).
//  * otherwise, with T = temperature:
//    - K = the top_k largest logits ranked by (logit desc, index asc); all of them if top_k <= 0
//      or top_k >= vocab. -0 and +0 are equal logits.
//    - m = the maximum logit. Each token of K weighs q = uint64(e^((l - m) / T) * 2^40)
//      (truncated; kiln_expf from core/fastmath.h; q = 2^40 when l == m, infinities included).
//      Tokens whose weight is below 2^-40 of the maximum's therefore have q = 0 and are never
//      drawn.
//    - min_p > 0: a token of K survives iff double(q) >= double(min(min_p, 1)) * 2^40 (exact
//      in double; sampling::min_p_weight), i.e. its probability at temperature T is at least
//      min_p times the maximum's (vLLM's min_p, which also applies it after the temperature).
//      The maximum (q = 2^40) always survives. K shrinks to the survivors, so min_p and top-k
//      act together, before top-p. (Both samplers give a dropped token weight 0 instead of
//      removing it: it then adds to no sum and is never drawn, the same picks.)
//      S = the exact integer sum of q over K.
//    - top_p in (0, 1): with K ranked as above, token j stays iff
//      double(sum of q ranked strictly before j) < double(top_p) * double(S): the smallest
//      ranked prefix whose mass reaches top_p, at least one token (transformers'
//      TopPLogitsWarper up to the fixed point). S' = the kept mass; otherwise everything in K
//      stays and S' = S.
//    - u = sampling::uniform(seed, step) in [0, 1); r = min(uint64(u * double(S')), S' - 1); the
//      pick is the first kept token in INDEX order whose inclusive running sum of q exceeds r.
//      (Index order, not rank order, so the GPU needs no sort; the distribution is the same.)
// A row whose logits are all -inf or NaN samples uniformly among them (all are the maximum).
// Greedy ignores top_k, top_p and min_p.
//
// Logit edits (edit_logits) follow graph/backend.h's order, rounded as sampling::edit_logit
// (core/sample_math.h) says; the CUDA kernel uses the same function, so results are bitwise
// equal. A (row, id) pair must appear at most once: the GPU applies entries in parallel.
//
// Log-probabilities (logprobs_row) of a row of logits l (NaN as -inf) with maximum m:
//   e_i = 1 if l_i == m, else kiln_expf(l_i - m) (FP32); ls = float(log(sum of e_i in double));
//   lp_i = -ls if l_i == m, else (l_i - m) - ls (FP32, torch's log_softmax order).
// A row with an infinite maximum gives its tied maxima log(1 / count) and the rest -inf; an
// all -inf row is uniform, -log(vocab) each (as the sampler draws from it). The sum's order is
// the only freedom, so the GPU agrees to a few ulp. Top tokens rank by (logit desc, index asc).
#pragma once

#include <cstdint>
#include <vector>

#include "graph/backend.h"

namespace kiln::cpu {

// The token picked from one row of logits (see above); kNonFiniteLogits for a row holding NaN
// or +inf.
int32_t sample_row(const float* logits, int64_t vocab, const SampleParams& p);

struct SampleCandidate {
  int32_t id;
  uint64_t weight;  // fixed point, 2^40 at the maximum logit; may be 0
};
// The tokens that survive top-k, min_p and top-p for a sampling row (temperature > 0), in index
// order with their weights: the set the draw of sample_row picks from.
std::vector<SampleCandidate> sample_candidates(const float* logits, int64_t vocab,
                                               const SampleParams& p);

// Throws kiln::Error unless every edit's (row, id) lies in [rows, vocab) (the CUDA backend
// checks host edits with it too, before it copies them).
void check_edits(int64_t rows, int64_t vocab, const LogitEdit* edits, int64_t n);

// Applies LogitEdits (see above) to logits [rows, vocab] in place; pen[row] holds each row's
// penalties. Checks every entry before it edits anything.
void edit_logits(float* logits, int64_t rows, int64_t vocab, const RowPenalty* pen,
                 const LogitEdit* edits, int64_t n);

// log_softmax of one row (see above): *lp gets token id's value, top_ids / top_lp the k largest
// (logit desc, index asc). 0 <= k <= vocab.
void logprobs_row(const float* logits, int64_t vocab, int32_t id, int64_t k, float* lp,
                  int32_t* top_ids, float* top_lp);

}  // namespace kiln::cpu
