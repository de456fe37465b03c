// Token sampling, one 1024-thread block per row, picking exactly the token of the CPU reference
// (cpu_sample.h). No sort: every selection is a radix descent over 8-bit digits with shared-
// memory histograms, and every sum is an integer (fixed-point weights), so the order in which
// threads add never changes a result.
//
// Tokens are ranked by a unique 56-bit composite, key(logit) << 24 | (2^24 - 1 - index): larger
// composite = larger logit, then smaller index, the reference's (logit desc, index asc). Each
// selection ends in a composite threshold, so membership is one compare per token:
//   top-k  K    = {composite >= bk}: the descent by counts finds the top_k-th composite;
//   top-p  kept = {composite >= bp}: the descent by weight finds the lowest-ranked token with
//                 double(mass ranked before it) < top_p * S (the reference's rule);
//   draw          the first kept token in index order whose running weight exceeds r: a
//                 descent by weight over the index digits (few candidates, in shared memory), or
//                 index-order chunk sums then a scan inside one chunk (many).
// One SM reads the whole row, so time goes by passes over the row and instructions per token
// (an exp costs several times a compare). The descents therefore run over a short list in shared
// memory whenever one provably holds every token that matters:
//   * top_k <= 1024: the tokens at or above tau, the top_k-th largest of the threads' own maxima
//     (found in the pass that finds the maximum): top_k threads each hold a token >= tau, so
//     the list holds K, and few tokens reach tau;
//   * top-p without such a list: one pass with exps gives S, the mass at or above a few of the
//     threads' maxima, and a weight histogram over buckets of (l - m) / T. The highest of those
//     maxima whose mass reaches top_p * S bounds the kept set (the list is every token above
//     it), else the bucket holding the boundary is listed and the buckets before it are kept
//     whole.
// min_p needs no selection of its own: a token it drops weighs 0 wherever a weight is computed,
// which leaves it out of S, of every mass top-p compares and of the draw (cpu_sample.h).
// What is left (ties or flat rows too dense for a list) takes row passes, with histogram updates
// combined per warp (a row's bulk lands in a few buckets, where per-token shared atomics would
// serialise).
#include "backends/cuda/cuda_sample.h"

#include <cfloat>

#include "backends/cuda/cuda_common.h"
#include "core/error.h"
#include "core/sample_math.h"

namespace kiln::cuda {
namespace {

using u64 = unsigned long long;
using sampling::logit_key;
using sampling::sanitize;

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;
constexpr int kCap = 2048;        // candidates held in shared memory
constexpr int kMaxChunks = 2048;  // index-order chunks of the row-wide draw
// Buckets of (l - m) / T over [-28, 0] (weights below e^-28 truncate to 0) that place a large
// kept set's boundary when the threads' maxima cannot.
constexpr int kValueBuckets = 1024;
constexpr float kValueScale = float(kValueBuckets) / 28.0f;
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ u64 composite(uint32_t key, int i) {
  return (u64(key) << 24) | u64(0xffffff - i);
}
__device__ __forceinline__ int composite_index(u64 c) {
  return 0xffffff - int(c & 0xffffff);
}

struct Smem {
  uint32_t cnt[256];
  u64 mass[256];
  union {
    struct {
      u64 comp[kCap];
      u64 q[kCap];
    } list;
    u64 chunk[kMaxChunks];
    struct {
      uint32_t cnt[kValueBuckets];
      u64 mass[kValueBuckets];
    } vb;
  };
  uint32_t tk[kThreads];  // each thread's maximum logit, as a key
  u64 red[kWarps];
  u64 red5[5][kWarps];
  // Published by warp 0's decide(), read by every thread after a barrier.
  u64 acc;   // count still needed (top-k) / mass ranked above (top-p) / r left (draw)
  u64 acc2;  // top-p: tokens ranked above
  u64 kept_mass;
  uint32_t kept_cnt;
  uint32_t digit;
  int done;
  double thr;
  uint32_t maxkey;
  int n;
  int pick;
  int bound;
  int vbest;
  uint32_t vcnt;
  u64 vabove, vcabove;
};

__device__ __forceinline__ u64 warp_sum_u64(u64 v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// Exclusive prefix sum over the block in thread order; `total` gets the block's sum.
__device__ u64 block_exclusive_scan(u64 v, Smem& sm, u64& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  u64 x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const u64 y = __shfl_up_sync(kFull, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) sm.red[warp] = x;
  __syncthreads();
  if (warp == 0) {
    u64 w = sm.red[lane];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const u64 y = __shfl_up_sync(kFull, w, o);
      if (lane >= o) w += y;
    }
    sm.red[lane] = w;
  }
  __syncthreads();
  total = sm.red[kWarps - 1];
  const u64 r = (warp > 0 ? sm.red[warp - 1] : 0) + x - v;
  __syncthreads();
  return r;
}

// Value bucket of a token: 0 at the maximum, growing as (l - m) / T falls; non-increasing in l
// (the scaled logit is non-decreasing in l, and so are the product and the cast).
__device__ __forceinline__ int value_bucket(float l, float m, float t) {
  const float y = l == m ? 0.0f : mul_rn(-sampling::scaled_logit(l, m, t), kValueScale);
  return y < float(kValueBuckets - 1) ? int(y) : kValueBuckets - 1;
}

// Sorts sm.tk (one key per thread) into descending order: bitonic, exchanging through shuffles
// for partners in the same warp and through shared memory beyond.
__device__ void sort_keys_desc(Smem& sm) {
  const int i = threadIdx.x;
  uint32_t x = sm.tk[i];
  for (int k = 2; k <= kThreads; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      uint32_t y;
      if (j >= 32) {
        __syncthreads();
        sm.tk[i] = x;
        __syncthreads();
        y = sm.tk[i ^ j];
      } else {
        y = __shfl_xor_sync(kFull, x, j);
      }
      const bool keep_max = ((i & k) == 0) == ((i & j) == 0);
      x = keep_max ? max(x, y) : min(x, y);
    }
  }
  __syncthreads();
  sm.tk[i] = x;
  __syncthreads();
}

// Calls f(group, first_index, v[4]) for 128-token groups of the row, lane l of a warp holding
// tokens first_index .. first_index + 3 (v of tokens >= n reads -inf: f checks indices where
// that matters). All 32 lanes of a warp call f for the same group, so f may use warp
// collectives.
template <typename F>
__device__ __forceinline__ void for_groups(const float* row, int n, bool vec, F&& f) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int groups = (n + 127) >> 7;
  for (int g0 = warp; g0 < groups; g0 += kWarps * kUnroll) {
    float v[kUnroll][4];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int g = g0 + u * kWarps;
      const int base = g * 128 + lane * 4;
      if (g < groups) {
        if (vec && base < n) {
          const float4 t = *reinterpret_cast<const float4*>(row + base);
          v[u][0] = t.x, v[u][1] = t.y, v[u][2] = t.z, v[u][3] = t.w;
        } else {
#pragma unroll
          for (int j = 0; j < 4; ++j) v[u][j] = base + j < n ? row[base + j] : -INFINITY;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int g = g0 + u * kWarps;
      if (g < groups) f(g, g * 128 + lane * 4, v[u]);
    }
  }
}

enum class Rule {
  kCountDesc,  // top-k: the bucket holding the need-th largest (acc = need)
  kMassDesc,   // top-p: the lowest bucket whose top token stays (acc = mass ranked above,
               // sm.thr = the threshold)
  kMassAsc,    // draw: the bucket where the running weight passes r (acc = r)
};

// Warp 0: picks the next digit from sm.cnt / sm.mass and publishes it (and the updated
// accumulators) in sm. Lane l owns buckets 8l .. 8l + 7.
template <Rule R>
__device__ __noinline__ void decide(Smem& sm, int lane, bool last_level) {
  uint32_t c[8];
  u64 w[8];
  uint32_t cs = 0;
  u64 ws = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    c[j] = sm.cnt[lane * 8 + j];
    w[j] = sm.mass[lane * 8 + j];
    cs += c[j];
    ws += w[j];
  }
  uint32_t ci = cs;
  u64 wi = ws;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t a = __shfl_up_sync(kFull, ci, o);
    const u64 b = __shfl_up_sync(kFull, wi, o);
    if (lane >= o) ci += a, wi += b;
  }
  const uint32_t ctot = __shfl_sync(kFull, ci, 31);
  const u64 wtot = __shfl_sync(kFull, wi, 31);
  // Totals of the buckets below each of this lane's.
  uint32_t clt[8];
  u64 wlt[8];
  uint32_t cb = ci - cs;
  u64 wb = wi - ws;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    clt[j] = cb, wlt[j] = wb;
    cb += c[j], wb += w[j];
  }
  const u64 acc = sm.acc;
  const double thr = sm.thr;

  unsigned d;
  if (R == Rule::kCountDesc) {
    // Largest bucket whose count at or above it reaches the need (monotone in the bucket).
    unsigned best = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (u64(ctot - clt[j]) >= acc) best = unsigned(lane * 8 + j + 1);
    d = __reduce_max_sync(kFull, best);
    d = d > 0 ? d - 1 : 0;
  } else {
    unsigned best = 256;
#pragma unroll
    for (int j = 7; j >= 0; --j) {
      const bool ok = R == Rule::kMassDesc ? w[j] > 0 && double(acc + (wtot - wlt[j] - w[j])) < thr
                                           : wlt[j] + w[j] > acc;
      if (ok) best = unsigned(lane * 8 + j);
    }
    d = __reduce_min_sync(kFull, best);
    d = d < 256 ? d : 255;
  }
  __syncwarp();  // every lane has read sm.acc before the owner rewrites it
  if (lane == int(d >> 3)) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (lane * 8 + j != int(d)) continue;
      sm.digit = d;
      const uint32_t c_above = ctot - clt[j] - c[j];
      const u64 w_above = wtot - wlt[j] - w[j];
      if (R == Rule::kCountDesc) {
        const u64 need = acc - c_above;
        sm.acc = need;
        sm.done = u64(c[j]) == need;
      } else if (R == Rule::kMassDesc) {
        sm.acc = acc + w_above;
        sm.acc2 += c_above;
        sm.done = c[j] == 1 || last_level;
        sm.kept_mass = acc + w_above + w[j];
        sm.kept_cnt = uint32_t(sm.acc2) + c[j];
      } else {
        sm.acc = acc - wlt[j];
        sm.done = 0;
      }
    }
  }
}

// Histogram update from a row pass, called by all 32 lanes of a warp together: lanes with `on`
// add one token of weight q to bucket d. Lanes sharing a bucket are combined first (one atomic
// per bucket and warp): the bulk of a row falls in a few buckets.
template <bool kMass>
__device__ __forceinline__ void hist_add_warp(uint32_t* cnt, u64* mass, bool on, unsigned d,
                                              u64 q) {
  const unsigned peers = __match_any_sync(kFull, on ? d : 0xffffffffu);
  if (!on) return;
  unsigned hi = 0, lo = 0;
  if (kMass) {  // q < 2^41: 32 lanes' halves of 20 bits sum within 32 bits
    hi = __reduce_add_sync(peers, unsigned(q >> 20));
    lo = __reduce_add_sync(peers, unsigned(q) & 0xfffffu);
  }
  if (int(threadIdx.x & 31) == __ffs(int(peers)) - 1) {
    atomicAdd(&cnt[d], unsigned(__popc(int(peers))));
    const u64 w = (u64(hi) << 20) + lo;
    if (kMass && w) atomicAdd(&mass[d], w);
  }
}

// A radix descent over values of `bits` bits, 8 at a time from the top: each level clears the
// histograms, calls fill(shift, prefix) to add the values whose bits above `shift` equal prefix
// (bucket = the 8 bits from `shift`), and warp 0 picks a bucket by rule R. Stops after the last
// level or once decide() says done. Returns the threshold prefix << shift: the lowest value of
// the chosen bucket.
template <Rule R, typename Fill>
__device__ u64 descend(Smem& sm, int bits, Fill&& fill) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int levels = bits / 8;
  u64 prefix = 0;
  for (int level = 0;; ++level) {
    const int shift = bits - 8 * (level + 1);
    if (threadIdx.x < 256) sm.cnt[threadIdx.x] = 0, sm.mass[threadIdx.x] = 0;
    __syncthreads();
    fill(shift, prefix);
    __syncthreads();
    if (warp == 0) decide<R>(sm, lane, level == levels - 1);
    __syncthreads();
    prefix = (prefix << 8) | sm.digit;
    if (sm.done || level == levels - 1) return prefix << shift;
  }
}

__global__ void __launch_bounds__(kThreads, 1)
    sample_kernel(const float* logits, int n, const SampleParams* __restrict__ params,
                  int32_t* __restrict__ out) {
  __shared__ Smem sm;
  pdl_begin();
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const float* row = logits + int64_t(blockIdx.x) * n;
  const SampleParams p = params[blockIdx.x];
  const bool vec = (n & 3) == 0 && (reinterpret_cast<uintptr_t>(row) & 15) == 0;

  if (p.temperature <= 0.0f) {
    // Greedy: the first maximum. Each thread visits its tokens in increasing index order, so a
    // strict > keeps its first; NaN never compares greater; all -inf / NaN leaves index 0.
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    bool bad = false;  // a NaN or +inf (not <= FLT_MAX; -inf, a ban, and padding are)
    for_groups(row, n, vec, [&](int, int base, const float* v) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (v[j] > bv) bv = v[j], bi = base + j;
        bad |= !(v[j] <= FLT_MAX);
      }
    });
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(kFull, bv, o);
      const int oi = __shfl_xor_sync(kFull, bi, o);
      if (ov > bv || (ov == bv && oi < bi)) bv = ov, bi = oi;
    }
    if (lane == 0) sm.tk[warp] = float_bits(bv), sm.red[warp] = u64(bi);
    const bool any_bad = __syncthreads_or(bad);
    if (any_bad) {
      if (tid == 0) out[blockIdx.x] = kNonFiniteLogits;
      return;
    }
    if (warp == 0) {
      bv = bits_float(sm.tk[lane]);
      bi = int(sm.red[lane]);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(kFull, bv, o);
        const int oi = __shfl_xor_sync(kFull, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) bv = ov, bi = oi;
      }
      if (lane == 0) out[blockIdx.x] = bv > -INFINITY ? bi : 0;
    }
    return;
  }

  const bool use_k = p.top_k > 0 && p.top_k < n;
  const bool use_p = p.top_p > 0.0f && p.top_p < 1.0f;
  const float t = p.temperature;

  // Pass 1: the maximum (fmaxf skips NaN), and each thread's own maximum.
  float mx = -INFINITY;
  bool bad = false;
  for_groups(row, n, vec, [&](int, int, const float* v) {
#pragma unroll
    for (int j = 0; j < 4; ++j) mx = fmaxf(mx, v[j]), bad |= !(v[j] <= FLT_MAX);
  });
  const uint32_t mykey = logit_key(mx);
  sm.tk[tid] = mykey;
  if (tid == 0) sm.maxkey = 0, sm.pick = 0;
  if (__syncthreads_or(bad)) {  // block-uniform
    if (tid == 0) out[blockIdx.x] = kNonFiniteLogits;
    return;
  }
  const uint32_t wk = __reduce_max_sync(kFull, mykey);
  if (lane == 0) atomicMax(&sm.maxkey, wk);
  __syncthreads();
  const float m = sampling::key_logit(sm.maxkey);
  // Every weight below goes through min_p: a token it drops weighs 0, which drops it from every
  // sum and from the draw (cpu_sample.h), so no path needs a case of its own.
  const u64 q_min = sampling::min_p_weight(p.min_p);
  const auto weight = [&](float l) -> u64 {
    return sampling::min_p_filter(sampling::weight(l, m, t), q_min);
  };

  // Copies the tokens passing keep(l, i) (l sanitized) into sm.list with composites and weights;
  // returns how many passed (only the first kCap are stored).
  const auto compact = [&](auto&& keep) {
    if (tid == 0) sm.n = 0;
    __syncthreads();
    for_groups(row, n, vec, [&](int, int base, const float* v) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float l = sanitize(v[j]);
        if (base + j < n && keep(l, base + j)) {
          const int s = atomicAdd(&sm.n, 1);
          if (s < kCap)
            sm.list.comp[s] = composite(logit_key(l), base + j), sm.list.q[s] = weight(l);
        }
      }
    });
    __syncthreads();
    return sm.n;
  };

  // Top-k. Small top_k: tau = the top_k-th largest thread maximum bounds the top_k-th logit
  // from below (top_k threads each hold a token >= tau), and few tokens reach it; the list of
  // those holds K. Otherwise (or when ties make that list too long) a descent over the row.
  int nl = 0;
  bool list = false;  // sm.list holds every token that can be kept
  u64 bk = 0;         // K = {composite >= bk} (among the list's tokens when `list`)
  if (use_k && p.top_k <= kThreads) {
    if (tid == 0) sm.acc = u64(p.top_k);
    const uint32_t tau_key = uint32_t(descend<Rule::kCountDesc>(sm, 32, [&](int shift, u64 pre) {
      const u64 k = sm.tk[tid];
      if ((k >> (shift + 8)) == pre) atomicAdd(&sm.cnt[(k >> shift) & 255], 1u);
    }));
    // Keys up to key(-inf) would let every token in (NaN as -inf too): no gain, take the row.
    if (tau_key > logit_key(-INFINITY)) {
      const float tau = sampling::key_logit(tau_key);
      nl = compact([&](float l, int) { return l >= tau; });
      list = nl <= kCap;
    }
    if (list) {
      if (tid == 0) sm.acc = u64(p.top_k);
      bk = descend<Rule::kCountDesc>(sm, 56, [&](int shift, u64 pre) {
        for (int s = tid; s < nl; s += kThreads) {
          const u64 c = sm.list.comp[s];
          if ((c >> (shift + 8)) == pre) atomicAdd(&sm.cnt[(c >> shift) & 255], 1u);
        }
      });
    }
  }
  if (use_k && !list) {
    if (tid == 0) sm.acc = u64(p.top_k);
    bk = descend<Rule::kCountDesc>(sm, 56, [&](int shift, u64 pre) {
      for_groups(row, n, vec, [&](int, int base, const float* v) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const u64 c = composite(logit_key(v[j]), base + j);
          hist_add_warp<false>(sm.cnt, sm.mass, base + j < n && (c >> (shift + 8)) == pre,
                               unsigned(c >> shift) & 255, 0);
        }
      });
    });
    if (p.top_k <= kCap) {
      nl = compact([&](float l, int i) { return composite(logit_key(l), i) >= bk; });
      list = true;
    }
  }

  // Top-p: bp = the lowest-ranked kept composite, by weight histograms over K. The threshold
  // top_p * S needs S, the mass of all of K. Without a list of K, one pass over the row finds
  // S together with the mass at or above a few of the threads' maxima (ranks 8 .. 512); the
  // highest of those whose mass reaches the threshold bounds the kept set from below (any
  // token under it has at least that much mass ranked before it), and its tokens are few.
  // The same pass fills the value buckets (weighted tokens only) for when none does.
  u64 bp = bk, kept_mass = 0;
  uint32_t kept_cnt = 0;
  if (use_p) {
    const auto list_fill = [&](int shift, u64 pre) {
      for (int s = tid; s < nl; s += kThreads) {
        const u64 c = sm.list.comp[s], q = sm.list.q[s];
        if (c >= bk && (c >> (shift + 8)) == pre) {
          const int d = int(c >> shift) & 255;
          atomicAdd(&sm.cnt[d], 1u);
          if (q) atomicAdd(&sm.mass[d], q);
        }
      }
    };
    u64 lo;
    if (list) {
      u64 s = 0, total;
      for (int i = tid; i < nl; i += kThreads)
        if (sm.list.comp[i] >= bk) s += sm.list.q[i];
      block_exclusive_scan(s, sm, total);
      if (tid == 0) sm.acc = 0, sm.acc2 = 0, sm.thr = sampling::top_p_threshold(p.top_p, total);
      lo = descend<Rule::kMassDesc>(sm, 56, list_fill);
    } else {
      constexpr int kRanks[4] = {8, 32, 128, 512};
      for (int i = tid; i < kValueBuckets; i += kThreads) sm.vb.cnt[i] = 0, sm.vb.mass[i] = 0;
      sort_keys_desc(sm);
      float tau[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) tau[r] = sampling::key_logit(sm.tk[kRanks[r] - 1]);
      u64 acc[5] = {0, 0, 0, 0, 0};  // S, then the mass at or above each tau
      for_groups(row, n, vec, [&](int, int base, const float* v) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float l = sanitize(v[j]);
          const bool on = base + j < n && (!use_k || composite(logit_key(l), base + j) >= bk);
          if (on) {
            const u64 q = weight(l);
            acc[0] += q;
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[r + 1] += l >= tau[r] ? q : 0;
            // Weightless tokens never decide the boundary (and would crowd the last bucket).
            if (q) {
              const int b = value_bucket(l, m, t);
              atomicAdd(&sm.vb.cnt[b], 1u);
              atomicAdd(&sm.vb.mass[b], q);
            }
          }
        }
      });
#pragma unroll
      for (int r = 0; r < 5; ++r) {
        acc[r] = warp_sum_u64(acc[r]);
        if (lane == 0) sm.red5[r][warp] = acc[r];
      }
      __syncthreads();
      if (warp == 0) {
#pragma unroll
        for (int r = 0; r < 5; ++r) acc[r] = warp_sum_u64(sm.red5[r][lane]);
        if (lane == 0) {
          const double thr = sampling::top_p_threshold(p.top_p, acc[0]);
          int bound = -1;
          for (int r = 3; r >= 0; --r)
            if (double(acc[r + 1]) >= thr) bound = r;
          sm.thr = thr, sm.acc = 0, sm.acc2 = 0, sm.bound = bound, sm.vbest = -1;
        }
      }
      __syncthreads();
      const int bound = sm.bound;
      // The value bucket holding the boundary: the last one whose top token stays (mass of the
      // buckets before it below the threshold). Bucket tid, buckets in rank order.
      const u64 vm = sm.vb.mass[tid];
      const uint32_t vc = sm.vb.cnt[tid];
      u64 mass_before, cnt_before, unused;
      mass_before = block_exclusive_scan(vm, sm, unused);
      cnt_before = block_exclusive_scan(u64(vc), sm, unused);
      if (vm > 0 && double(mass_before) < sm.thr) atomicMax(&sm.vbest, tid);
      __syncthreads();
      const int vbest = sm.vbest;
      if (tid == vbest) sm.vabove = mass_before, sm.vcabove = cnt_before, sm.vcnt = vc;
      __syncthreads();
      if (bound >= 0) {
        float tb = tau[0];
#pragma unroll
        for (int r = 1; r < 4; ++r) tb = r == bound ? tau[r] : tb;
        nl = compact([&](float l, int i) {
          return l >= tb && (!use_k || composite(logit_key(l), i) >= bk);
        });
        list = nl <= kCap;
      }
      bool in_list = list;
      if (list) {
        lo = descend<Rule::kMassDesc>(sm, 56, list_fill);
      } else if (vbest >= 0 && sm.vcnt <= kCap) {
        // The boundary bucket's tokens into the list; the buckets before it are all kept.
        const u64 vabove = sm.vabove, vcabove = sm.vcabove;
        nl = compact([&](float l, int i) {
          return value_bucket(l, m, t) == vbest && (!use_k || composite(logit_key(l), i) >= bk);
        });
        in_list = nl <= kCap;
        if (in_list) {
          if (tid == 0) sm.acc = vabove, sm.acc2 = vcabove;
          lo = descend<Rule::kMassDesc>(sm, 56, list_fill);
          // The draw reads the row, where an early stop's threshold could also admit tokens of
          // the next bucket: take the boundary token's own composite.
          if (tid == 0) sm.red[0] = ~0ull;
          __syncthreads();
          for (int i = tid; i < nl; i += kThreads) {
            const u64 c = sm.list.comp[i];
            if (c >= lo && c >= bk) atomicMin(&sm.red[0], c);
          }
          __syncthreads();
          lo = sm.red[0];
          __syncthreads();
        }
      }
      if (!in_list) {
        lo = descend<Rule::kMassDesc>(sm, 56, [&](int shift, u64 pre) {
          for_groups(row, n, vec, [&](int, int base, const float* v) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              const float l = sanitize(v[j]);
              const u64 c = composite(logit_key(l), base + j);
              const bool on = base + j < n && c >= bk && (c >> (shift + 8)) == pre;
              hist_add_warp<true>(sm.cnt, sm.mass, on, unsigned(c >> shift) & 255,
                                  on ? weight(l) : 0);
            }
          });
        });
      }
    }
    // An early stop leaves the threshold below the boundary token, possibly below bk too (the
    // histograms held only K): kept = K and composite >= bp.
    bp = lo > bk ? lo : bk;
    kept_mass = sm.kept_mass;
    kept_cnt = sm.kept_cnt;
  }

  const double u = sampling::uniform(p.seed, p.step);
  int pick;
  // kept_cnt leaves out weightless tokens found by value buckets: the copy checks the count.
  bool small = list;
  if (!list && use_p && kept_cnt <= kCap) {
    nl = compact([&](float l, int i) { return composite(logit_key(l), i) >= bp; });
    small = nl <= kCap;
  }
  if (small) {
    if (!use_p) {
      u64 s = 0;
      for (int i = tid; i < nl; i += kThreads)
        if (sm.list.comp[i] >= bk) s += sm.list.q[i];
      block_exclusive_scan(s, sm, kept_mass);
    }
    if (tid == 0) sm.acc = sampling::target(u, kept_mass);
    // Descent over the 24 index bits, lowest index first, by kept weight.
    pick = int(descend<Rule::kMassAsc>(sm, 24, [&](int shift, u64 pre) {
      for (int s = tid; s < nl; s += kThreads) {
        const u64 c = sm.list.comp[s], q = sm.list.q[s];
        const unsigned i = unsigned(composite_index(c));
        if (c >= bp && q && (i >> (shift + 8)) == pre) atomicAdd(&sm.mass[(i >> shift) & 255], q);
      }
    }));
  } else {
    // Many kept tokens: kept weight per chunk of `ch` consecutive ids (one atomic per warp and
    // group: a group never straddles chunks), then the chunk holding r, then the token.
    const int ch = 128 * ((n + 128 * kMaxChunks - 1) / (128 * kMaxChunks));
    const int nch = (n + ch - 1) / ch;
    for (int s = tid; s < nch; s += kThreads) sm.chunk[s] = 0;
    __syncthreads();
    for_groups(row, n, vec, [&](int g, int base, const float* v) {
      u64 s = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float l = sanitize(v[j]);
        if (base + j < n && composite(logit_key(l), base + j) >= bp) s += weight(l);
      }
      s = warp_sum_u64(s);
      if (lane == 0 && s) atomicAdd(&sm.chunk[g * 128 / ch], s);
    });
    __syncthreads();
    const u64 a = 2 * tid < nch ? sm.chunk[2 * tid] : 0;
    const u64 b = 2 * tid + 1 < nch ? sm.chunk[2 * tid + 1] : 0;
    u64 total;
    const u64 ex = block_exclusive_scan(a + b, sm, total);
    if (!use_p) kept_mass = total;
    const u64 r = sampling::target(u, kept_mass);
    if (r >= ex && r - ex < a) sm.pick = 2 * tid, sm.acc = r - ex;
    if (r >= ex + a && r - ex - a < b) sm.pick = 2 * tid + 1, sm.acc = r - ex - a;
    __syncthreads();
    // Inside the chunk: each thread a run of consecutive ids, a block scan of their weights.
    const int c0 = sm.pick * ch, len = min(ch, n - c0);
    const u64 rr = sm.acc;
    const int per = (len + kThreads - 1) / kThreads;
    const int lo = c0 + tid * per, hi = min(lo + per, c0 + len);
    u64 s = 0;
    for (int i = lo; i < hi; ++i) {
      const float l = sanitize(row[i]);
      if (composite(logit_key(l), i) >= bp) s += weight(l);
    }
    u64 tot;
    const u64 ex2 = block_exclusive_scan(s, sm, tot);
    if (rr >= ex2 && rr - ex2 < s) {
      u64 cum = ex2;
      for (int i = lo; i < hi; ++i) {
        const float l = sanitize(row[i]);
        if (composite(logit_key(l), i) < bp) continue;
        cum += weight(l);
        if (cum > rr) {
          sm.pick = i;
          break;
        }
      }
    }
    __syncthreads();
    pick = sm.pick;
  }
  if (tid == 0) out[blockIdx.x] = pick;
}

}  // namespace

size_t sample_workspace(int64_t rows, int64_t vocab) {
  return 0;
}

void sample(const float* logits, int64_t rows, int64_t vocab, const SampleParams* d_params,
            int32_t* d_out, void* workspace, cudaStream_t s) {
  KILN_CHECK(vocab >= 1 && vocab <= sampling::kMaxVocab, "cuda::sample: vocab ", vocab,
             " is outside [1, ", sampling::kMaxVocab, "]");
  KILN_CHECK(rows >= 0 && rows <= 0x7fffffff, "cuda::sample: ", rows, " rows");
  if (rows == 0) return;
  launch_kernel(sample_kernel, dim3(unsigned(rows)), dim3(kThreads), 0, s, logits, int(vocab),
                d_params, d_out);
}

}  // namespace kiln::cuda
