// Logit edits and log-probabilities on the GPU (cuda_logits.h). The arithmetic that decides a
// value lives in core/sample_math.h, shared with the CPU reference.
#include "backends/cuda/cuda_logits.h"

#include "backends/cuda/cuda_common.h"
#include "core/error.h"
#include "core/sample_math.h"

namespace kiln::cuda {
namespace {

using u64 = unsigned long long;
using sampling::logit_key;
using sampling::sanitize;

constexpr unsigned kFull = 0xffffffffu;
constexpr int kEditThreads = 256;
constexpr int kLpThreads = 512;
constexpr int kLpWarps = kLpThreads / 32;

__global__ void __launch_bounds__(kEditThreads)
    edit_kernel(float* __restrict__ logits, int64_t vocab, const RowPenalty* __restrict__ pen,
                const LogitEdit* __restrict__ edits, int64_t n) {
  pdl_begin();
  const int64_t e = int64_t(blockIdx.x) * kEditThreads + threadIdx.x;
  if (e >= n) return;
  const LogitEdit d = edits[e];
  const RowPenalty p = pen[d.row];
  float* l = logits + int64_t(d.row) * vocab + d.id;
  *l =
      sampling::edit_logit(*l, d.bias, d.seen != 0, d.count, p.presence, p.frequency, p.repetition);
}

// The unique rank key of token i with logit key `key`: larger = ranked first (logit desc, then
// index asc), as in the sampling kernel. Always > 0 (ids < 2^24 - 1), so 0 marks an empty slot.
__device__ __forceinline__ u64 composite(uint32_t key, int i) {
  return (u64(key) << 24) | u64(0xffffff - i);
}
__device__ __forceinline__ int composite_index(u64 c) {
  return 0xffffff - int(c & 0xffffff);
}

__device__ __forceinline__ u64 warp_max_u64(u64 v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const u64 w = __shfl_xor_sync(kFull, v, o);
    v = w > v ? w : v;
  }
  return v;
}

// Calls f(logit, index) for every token of the row this thread owns, loads issued four float4
// (or four floats) at a time so one SM keeps enough bytes in flight. Any visiting order is fine
// for the callers: maxima and top lists are order-free, the sum is in double.
template <typename F>
__device__ __forceinline__ void for_row(const float* row, int n, F&& f) {
  const int tid = threadIdx.x;
  if ((n & 3) == 0 && (reinterpret_cast<uintptr_t>(row) & 15) == 0) {
    const float4* r4 = reinterpret_cast<const float4*>(row);
    const int n4 = n >> 2;
    for (int b = tid; b < n4; b += 4 * kLpThreads) {
      float4 v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int j = b + u * kLpThreads;
        v[u] = j < n4 ? r4[j] : make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int j = b + u * kLpThreads;
        if (j < n4)
          f(v[u].x, 4 * j), f(v[u].y, 4 * j + 1), f(v[u].z, 4 * j + 2), f(v[u].w, 4 * j + 3);
      }
    }
  } else {
    for (int b = tid; b < n; b += 4 * kLpThreads) {
      float v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int j = b + u * kLpThreads;
        v[u] = j < n ? row[j] : -INFINITY;
      }
#pragma unroll
      for (int u = 0; u < 4; ++u)
        if (b + u * kLpThreads < n) f(v[u], b + u * kLpThreads);
    }
  }
}

// One block per row. Pass 1: the maximum and each thread's K highest-ranked tokens (a sorted
// list in registers: K is a template constant so it never spills to local memory), merged by
// k rounds of a block maximum over the lists' heads. Pass 2: the sum of the softmax terms.
template <int K>
__global__ void __launch_bounds__(kLpThreads)
    logprobs_kernel(const float* logits, int n, const int32_t* ids, int k, float* __restrict__ lp,
                    int32_t* __restrict__ top_ids, float* __restrict__ top_lp) {
  __shared__ u64 red[kLpWarps];
  __shared__ double dred[kLpWarps];
  __shared__ u64 top[K > 0 ? K : 1];
  __shared__ uint32_t maxkey;
  pdl_begin();
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const float* row = logits + int64_t(blockIdx.x) * n;
  if (tid == 0) maxkey = 0;

  uint32_t mk = 0;
  u64 c[K > 0 ? K : 1];
#pragma unroll
  for (int j = 0; j < (K > 0 ? K : 1); ++j) c[j] = 0;
  for_row(row, n, [&](float v, int i) {
    const uint32_t key = logit_key(v);
    mk = max(mk, key);
    if constexpr (K > 0) {
      const u64 x = composite(key, i);
      if (x > c[K - 1]) {
#pragma unroll
        for (int j = K - 1; j > 0; --j) c[j] = x > c[j - 1] ? c[j - 1] : (x > c[j] ? x : c[j]);
        c[0] = x > c[0] ? x : c[0];
      }
    }
  });
  __syncthreads();  // maxkey's reset before anyone's atomicMax
  mk = __reduce_max_sync(kFull, mk);
  if (lane == 0) atomicMax(&maxkey, mk);

  if constexpr (K > 0) {
    for (int r = 0; r < k; ++r) {
      const u64 h = warp_max_u64(c[0]);
      if (lane == 0) red[warp] = h;
      __syncthreads();
      if (warp == 0) {
        const u64 b = warp_max_u64(lane < kLpWarps ? red[lane] : 0);
        if (lane == 0) top[r] = b;
      }
      __syncthreads();
      if (c[0] == top[r]) {  // composites are unique: one owner pops its head
#pragma unroll
        for (int j = 0; j < K - 1; ++j) c[j] = c[j + 1];
        c[K - 1] = 0;
      }
    }
  }
  __syncthreads();
  const float m = sampling::key_logit(maxkey);

  double sum = 0;
  for_row(row, n, [&](float v, int) { sum += double(sampling::softmax_term(sanitize(v), m)); });
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(kFull, sum, o);
  if (lane == 0) dred[warp] = sum;
  __syncthreads();
  if (warp == 0) {
    double t = lane < kLpWarps ? dred[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(kFull, t, o);
    if (lane == 0) dred[0] = t;
  }
  __syncthreads();
  const float ls = float(log(dred[0]));
  const int64_t r = blockIdx.x;
  if (tid == 0) {
    const int id = ids[r];
    lp[r] = id >= 0 && id < n ? sampling::log_softmax_value(sanitize(row[id]), m, ls) : NAN;
  }
  if constexpr (K > 0) {
    if (tid < k) {
      const u64 t = top[tid];
      top_ids[r * k + tid] = composite_index(t);
      top_lp[r * k + tid] =
          sampling::log_softmax_value(sampling::key_logit(uint32_t(t >> 24)), m, ls);
    }
  }
}

}  // namespace

void edit_logits(float* logits, int64_t vocab, const RowPenalty* d_pen, const LogitEdit* d_edits,
                 int64_t n, cudaStream_t s) {
  if (n <= 0) return;
  const int64_t blocks = (n + kEditThreads - 1) / kEditThreads;
  KILN_CHECK(blocks <= 0x7fffffff, "cuda::edit_logits: ", n, " edits");
  launch_kernel(edit_kernel, dim3(unsigned(blocks)), dim3(kEditThreads), 0, s, logits, vocab, d_pen,
                d_edits, n);
}

void logprobs(const float* logits, int64_t rows, int64_t vocab, const int32_t* d_ids, int64_t k,
              float* d_lp, int32_t* d_top_ids, float* d_top_lp, cudaStream_t s) {
  KILN_CHECK(vocab >= 1 && vocab <= sampling::kMaxVocab, "cuda::logprobs: vocab ", vocab,
             " is outside [1, ", sampling::kMaxVocab, "]");
  KILN_CHECK(k >= 0 && k <= kMaxTopLogprobs && k <= vocab, "cuda::logprobs: ", k,
             " top tokens (at most ", kMaxTopLogprobs, " and the vocabulary, ", vocab, ")");
  KILN_CHECK(rows >= 0 && rows <= 0x7fffffff, "cuda::logprobs: ", rows, " rows");
  if (rows == 0) return;
  const dim3 grid{unsigned(rows)}, block{unsigned(kLpThreads)};
  const int n = int(vocab), kk = int(k);
  // Few list sizes: each is a separate kernel, and k is 0 or small in practice.
  if (k == 0)
    launch_kernel(logprobs_kernel<0>, grid, block, 0, s, logits, n, d_ids, kk, d_lp, d_top_ids,
                  d_top_lp);
  else if (k == 1)
    launch_kernel(logprobs_kernel<1>, grid, block, 0, s, logits, n, d_ids, kk, d_lp, d_top_ids,
                  d_top_lp);
  else if (k <= 5)
    launch_kernel(logprobs_kernel<5>, grid, block, 0, s, logits, n, d_ids, kk, d_lp, d_top_ids,
                  d_top_lp);
  else
    launch_kernel(logprobs_kernel<kMaxTopLogprobs>, grid, block, 0, s, logits, n, d_ids, kk, d_lp,
                  d_top_ids, d_top_lp);
}

}  // namespace kiln::cuda
