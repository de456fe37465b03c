// Token sampling, CPU reference: written for clarity (sorts), not speed; the semantics are in
// cpu_sample.h and the shared arithmetic in core/sample_math.h.
#include "backends/cpu/cpu_sample.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"
#include "core/sample_math.h"

namespace kiln::cpu {
namespace {

void check_vocab(int64_t vocab) {
  KILN_CHECK(vocab >= 1 && vocab <= sampling::kMaxVocab, "sample: vocab ", vocab,
             " is outside [1, ", sampling::kMaxVocab, "]");
}

}  // namespace

std::vector<SampleCandidate> sample_candidates(const float* logits, int64_t vocab,
                                               const SampleParams& p) {
  check_vocab(vocab);
  std::vector<float> l(static_cast<size_t>(vocab));
  for (int64_t i = 0; i < vocab; ++i) l[size_t(i)] = sampling::sanitize(logits[i]);
  const float m = *std::max_element(l.begin(), l.end());
  const auto ranked_before = [&](int32_t a, int32_t b) {
    return l[size_t(a)] > l[size_t(b)] || (l[size_t(a)] == l[size_t(b)] && a < b);
  };

  std::vector<int32_t> k(static_cast<size_t>(vocab));
  std::iota(k.begin(), k.end(), 0);
  if (p.top_k > 0 && p.top_k < vocab) {
    std::nth_element(k.begin(), k.begin() + (p.top_k - 1), k.end(), ranked_before);
    k.resize(size_t(p.top_k));
  }
  const auto weight = [&](int32_t i) { return sampling::weight(l[size_t(i)], m, p.temperature); };
  // min_p narrows K before top-p measures it.
  const uint64_t q_min = sampling::min_p_weight(p.min_p);
  if (q_min > 0) std::erase_if(k, [&](int32_t i) { return weight(i) < q_min; });

  std::vector<SampleCandidate> kept;
  kept.reserve(k.size());
  if (p.top_p > 0.0f && p.top_p < 1.0f) {
    std::sort(k.begin(), k.end(), ranked_before);
    std::vector<uint64_t> q(k.size());
    uint64_t total = 0;
    for (size_t j = 0; j < k.size(); ++j) total += (q[j] = weight(k[j]));
    const double threshold = sampling::top_p_threshold(p.top_p, total);
    uint64_t before = 0;
    for (size_t j = 0; j < k.size() && double(before) < threshold; ++j) {
      kept.push_back({k[j], q[j]});
      before += q[j];
    }
    std::sort(kept.begin(), kept.end(),
              [](const SampleCandidate& a, const SampleCandidate& b) { return a.id < b.id; });
  } else {
    std::sort(k.begin(), k.end());
    for (int32_t i : k) kept.push_back({i, weight(i)});
  }
  return kept;
}

int32_t sample_row(const float* logits, int64_t vocab, const SampleParams& p) {
  check_vocab(vocab);
  for (int64_t i = 0; i < vocab; ++i)  // NaN or +inf: broken logits (-inf is a ban)
    if (std::isnan(logits[i]) || logits[i] == INFINITY) return kNonFiniteLogits;
  if (p.temperature <= 0.0f) {
    int64_t best = 0;
    float bv = sampling::sanitize(logits[0]);
    for (int64_t i = 1; i < vocab; ++i) {
      const float v = sampling::sanitize(logits[i]);
      if (v > bv) best = i, bv = v;
    }
    return int32_t(best);
  }
  const std::vector<SampleCandidate> kept = sample_candidates(logits, vocab, p);
  uint64_t total = 0;
  for (const SampleCandidate& c : kept) total += c.weight;
  // The maximum is always kept with weight 2^40, so total > 0; guarded all the same.
  if (total == 0) return kept.front().id;
  const uint64_t r = sampling::target(sampling::uniform(p.seed, p.step), total);
  uint64_t cum = 0;
  for (const SampleCandidate& c : kept)
    if ((cum += c.weight) > r) return c.id;
  return kept.back().id;
}

void check_edits(int64_t rows, int64_t vocab, const LogitEdit* edits, int64_t n) {
  for (int64_t e = 0; e < n; ++e) {
    const LogitEdit& d = edits[e];
    KILN_CHECK(d.row >= 0 && d.row < rows && d.id >= 0 && d.id < vocab, "edit_logits: entry ", e,
               " (", d.row, ", ", d.id, ") outside [", rows, ", ", vocab, ")");
  }
}

void edit_logits(float* logits, int64_t rows, int64_t vocab, const RowPenalty* pen,
                 const LogitEdit* edits, int64_t n) {
  check_edits(rows, vocab, edits, n);  // all of them first: an error edits nothing
  for (int64_t e = 0; e < n; ++e) {
    const LogitEdit& d = edits[e];
    const RowPenalty& p = pen[d.row];
    float& l = logits[int64_t(d.row) * vocab + d.id];
    l = sampling::edit_logit(l, d.bias, d.seen != 0, d.count, p.presence, p.frequency,
                             p.repetition);
  }
}

void logprobs_row(const float* logits, int64_t vocab, int32_t id, int64_t k, float* lp,
                  int32_t* top_ids, float* top_lp) {
  check_vocab(vocab);
  KILN_CHECK(id >= 0 && id < vocab, "logprobs: token ", id, " outside the vocabulary");
  KILN_CHECK(k >= 0 && k <= vocab, "logprobs: ", k, " top tokens of ", vocab);
  std::vector<float> l(static_cast<size_t>(vocab));
  for (int64_t i = 0; i < vocab; ++i) l[size_t(i)] = sampling::sanitize(logits[i]);
  const float m = *std::max_element(l.begin(), l.end());
  double sum = 0;
  for (float x : l) sum += double(sampling::softmax_term(x, m));
  const float ls = float(std::log(sum));
  *lp = sampling::log_softmax_value(l[size_t(id)], m, ls);
  if (k == 0) return;
  std::vector<int32_t> idx(static_cast<size_t>(vocab));
  std::iota(idx.begin(), idx.end(), 0);
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int32_t a, int32_t b) {
    return l[size_t(a)] > l[size_t(b)] || (l[size_t(a)] == l[size_t(b)] && a < b);
  });
  for (int64_t j = 0; j < k; ++j) {
    top_ids[j] = idx[size_t(j)];
    top_lp[j] = sampling::log_softmax_value(l[size_t(idx[size_t(j)])], m, ls);
  }
}

}  // namespace kiln::cpu
