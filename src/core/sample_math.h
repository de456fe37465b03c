// The arithmetic of token sampling shared by the CPU reference (backends/cpu/cpu_sample.h, which
// documents the semantics) and the CUDA kernel, so both pick the same token: every value that
// decides a pick is computed here, on host and device alike, with exactly rounded operations.
#pragma once

#include <cmath>
#include <cstdint>

#include "core/fastmath.h"

namespace kiln::sampling {

// Fixed-point weight of a token at the maximum logit: weights are uint64(w * 2^40), w <= 1, so
// sums over up to 2^24 - 1 tokens fit in 64 bits and add exactly in any order.
constexpr int kWeightBits = 40;
constexpr uint64_t kWeightOne = uint64_t(1) << kWeightBits;
// Token ids must stay below this (24 bits), which also keeps the sums above exact.
constexpr int64_t kMaxVocab = (int64_t(1) << 24) - 1;

// NaN logits count as -inf.
KILN_HD float sanitize(float l) {
  return l != l ? bits_float(0xff800000u) : l;
}

// Order-preserving 32-bit key of a logit: a < b <=> key(a) < key(b), NaN as -inf and -0 as +0
// (they compare equal as floats, so their order must come from the token index alone).
KILN_HD uint32_t logit_key(float l) {
  uint32_t u = float_bits(sanitize(l));
  if (u == 0x80000000u) u = 0;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The logit a key came from (the canonical one: NaN -> -inf, -0 -> +0).
KILN_HD float key_logit(uint32_t k) {
  return bits_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// (l - m) / t, the exponent of a token's weight; non-decreasing in l.
KILN_HD float scaled_logit(float l, float m, float t) {
  return div_rn(sub_rn(l, m), t);
}

// Fixed-point weight of logit l (sanitized) at temperature t > 0 when the row's maximum is m:
// uint64(e^((l - m) / t) * 2^40), truncated. l == m is exactly kWeightOne also when m is
// infinite, where (l - m) would be NaN.
KILN_HD uint64_t weight(float l, float m, float t) {
  if (l == m) return kWeightOne;
  return uint64_t(mul_rn(kiln_expf(scaled_logit(l, m, t)), float(kWeightOne)));
}

// Draw `step` of the stream of `seed`: splitmix64 on counter seed * G + 1 + (step + 1) * G
// (G the golden-ratio increment), as a double in [0, 1) with 53 random bits.
KILN_HD double uniform(uint64_t seed, uint64_t step) {
  constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;
  uint64_t z = seed * kGolden + 1 + (step + 1) * kGolden;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return double(z >> 11) * 0x1.0p-53;
}

// The fixed-point point in [0, total) that u selects (total > 0).
KILN_HD uint64_t target(double u, uint64_t total) {
  const uint64_t r = uint64_t(dmul_rn(u, double(total)));
  return r < total ? r : total - 1;
}

// A token is kept by top-p iff double(mass ranked before it) < this.
KILN_HD double top_p_threshold(float top_p, uint64_t total) {
  return dmul_rn(double(top_p), double(total));
}

// The least weight that survives min_p: q survives iff double(q) >= min(min_p, 1) * 2^40, and
// q is an integer, so iff q >= ceil(that) (exact: scaling by 2^40 and ceil round nothing). 0 when
// min_p is off (<= 0 or NaN): every weight survives. min_p >= 1 keeps the weights of 2^40 alone,
// the maximum's ties, so the kept set is never empty.
KILN_HD uint64_t min_p_weight(float min_p) {
  if (!(min_p > 0.0f)) return 0;
  const double f = min_p < 1.0f ? double(min_p) : 1.0;
  return uint64_t(ceil(dmul_rn(f, double(kWeightOne))));
}

// A token's weight with min_p applied: a token min_p drops weighs 0, which is how both samplers
// drop it (a weightless token adds no mass to S or to any sum top-p or the draw compares, and is
// never drawn).
KILN_HD uint64_t min_p_filter(uint64_t q, uint64_t q_min) {
  return q >= q_min ? q : 0;
}

// A value the host compiler may not fuse with the operation that consumes it: g++ contracts a
// product feeding a sum into an FMA under -ffp-contract=fast, even across inlined helpers. The
// device's *_rn intrinsics are never contracted.
KILN_HD float no_contract(float x) {
#ifdef __CUDA_ARCH__
  return x;
#else
  volatile float v = x;
  return v;
#endif
}

// One entry of Backend::edit_logits (graph/backend.h gives the order) applied to logit l, each
// step rounded to FP32 on its own except the penalty, one fused frequency * count + presence:
//   l = l + bias;
//   if seen and repetition != 1: l = l > 0 ? l / repetition : l * repetition;
//   if count > 0: l = l - fma(frequency, count, presence).
// (count <= 0 subtracts nothing, so an infinite penalty cannot turn an unpenalised logit NaN.)
KILN_HD float edit_logit(float l, float bias, bool seen, int32_t count, float presence,
                         float frequency, float repetition) {
  l = add_rn(l, bias);
  if (seen && repetition != 1.0f)
    l = no_contract(l > 0.0f ? div_rn(l, repetition) : mul_rn(l, repetition));
  if (count > 0) l = sub_rn(l, fma_rn(frequency, float(count), presence));
  return l;
}

// e^(l - m) of log_softmax for logit l (sanitized) of a row whose maximum is m: 1 when l == m
// (also when m is infinite), else kiln_expf(l - m).
KILN_HD float softmax_term(float l, float m) {
  return l == m ? 1.0f : kiln_expf(sub_rn(l, m));
}

// log_softmax of logit l (sanitized) given the row's maximum m and ls = float(log(sum of the
// terms)): -ls when l == m, else (l - m) - ls (torch's order: the difference is exact near the
// top, where it matters).
KILN_HD float log_softmax_value(float l, float m, float ls) {
  return l == m ? -ls : sub_rn(sub_rn(l, m), ls);
}

}  // namespace kiln::sampling
