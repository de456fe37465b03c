// One forward step over many sequences: prefill chunks and one-token decodes together, the
// shape TensorRT-LLM's attention metadata and vLLM's scheduler output describe. The caller (the
// KV cache / scheduler layer) owns block allocation: every sequence comes with a block table
// that already covers its positions up to start + n.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace kiln {

struct BatchSeq {
  int64_t start = 0;                // tokens already in the cache: this step's first position
  int64_t n = 0;                    // new tokens this step (>= 1); their K/V are written
  std::span<const int32_t> blocks;  // block table (host), covering positions [0, start + n)
};

struct Batch {
  // New tokens of every sequence, flattened in sequence order: sequence s owns rows
  // [sum of n before s, + n). Decodes (n == 1) first, then prefill chunks (Decoder::forward
  // reorders nothing; it checks).
  std::vector<int32_t> tokens;
  std::vector<BatchSeq> seqs;
  // Rows whose logits are wanted, ascending; the logits come back in this order.
  std::vector<int32_t> logit_rows;

  int64_t num_tokens() const { return int64_t(tokens.size()); }
  // Sequences with n == 1 at the front.
  int64_t num_decode() const {
    int64_t d = 0;
    while (d < int64_t(seqs.size()) && seqs[size_t(d)].n == 1) ++d;
    return d;
  }
  // Appends a sequence's tokens; `logits`: the row of its last token is wanted (all rows when
  // all_logits).
  void add(std::span<const int32_t> toks, int64_t start, std::span<const int32_t> blocks,
           bool logits, bool all_logits = false) {
    const int64_t first = num_tokens();
    tokens.insert(tokens.end(), toks.begin(), toks.end());
    seqs.push_back({start, int64_t(toks.size()), blocks});
    if (all_logits)
      for (int64_t r = first; r < num_tokens(); ++r) logit_rows.push_back(int32_t(r));
    else if (logits)
      logit_rows.push_back(int32_t(num_tokens() - 1));
  }
};

}  // namespace kiln
