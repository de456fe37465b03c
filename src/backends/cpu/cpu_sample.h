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
//      drawn. S = the exact integer sum of q over K.
//    - top_p in (0, 1): with K ranked as above, token j stays iff
//      double(sum of q ranked strictly before j) < double(top_p) * double(S): the smallest
//      ranked prefix whose mass reaches top_p, at least one token (transformers'
//      TopPLogitsWarper up to the fixed point). S' = the kept mass; otherwise everything in K
//      stays and S' = S.
//    - u = sampling::uniform(seed, step) in [0, 1); r = min(uint64(u * double(S')), S' - 1); the
//      pick is the first kept token in INDEX order whose inclusive running sum of q exceeds r.
//      (Index order, not rank order, so the GPU needs no sort; the distribution is the same.)
// A row whose logits are all -inf or NaN samples uniformly among them (all are the maximum).
#pragma once

#include <cstdint>
#include <vector>

#include "graph/backend.h"

namespace kiln::cpu {

// The token picked from one row of logits (see above).
int32_t sample_row(const float* logits, int64_t vocab, const SampleParams& p);

struct SampleCandidate {
  int32_t id;
  uint64_t weight;  // fixed point, 2^40 at the maximum logit; may be 0
};
// The tokens that survive top-k and top-p for a sampling row (temperature > 0), in index order
// with their weights: the set the draw of sample_row picks from.
std::vector<SampleCandidate> sample_candidates(const float* logits, int64_t vocab,
                                               const SampleParams& p);

}  // namespace kiln::cpu
