// Attention over the paged KV cache: one kernel for prefill and decode, flash-attention style.
//
// A block owns 16 query rows that share one KV head: the rows are the flattened pairs
// (token i, query head g of the GQA group), so for decode the whole group of query heads reads
// each K/V tile once. Each of the 4 warps owns 4 rows. The block walks the keys its rows can see
// in tiles of 32, staged in shared memory as FP32 (K transposed, so lane j reads key j without
// bank conflicts); scores use lane = key, the PV product uses lane = output dims; softmax is
// online (running max m, running sum l, rescaled accumulators), all in FP32.
//
// Decode has too few rows to fill the GPU, so the keys are also split (flash-decoding): grid.z
// blocks each take a range of keys and write unnormalised partial outputs with their (m, l);
// the last block of a row block to finish (an atomic counter) merges them, which saves the
// launch of a separate merge kernel. The host picks only the number of splits (from n, the KV
// heads, the SM count and kv_len as an upper bound); each row block cuts its own key range
// [min lo, max hi] into that many whole-tile pieces on the device. So a CUDA graph captured
// under a length bound and replayed at other positions spreads the keys it actually has over
// every split, rather than leaving them all to the first.
//
// Which kernel takes which rows: in F16 / BF16, prefill chunks go to the tensor-core prefill
// kernel (cuda_attention_tc.cu) and decode rows to the tensor-core decode kernel
// (cuda_attention_decode.cu) when they take them; this CUDA-core kernel runs everything else:
// every F32 engine (exact FP32 math, the parity reference on the GPU) and the shapes those
// kernels decline (head sizes, GQA groups over 16). For a mixed batch it then takes every row,
// each token in its own row blocks (seq).
#include <algorithm>
#include <climits>
#include <type_traits>

#include "backends/cuda/cuda_attention_decode.h"
#include "backends/cuda/cuda_attention_tc.h"
#include "backends/cuda/cuda_common.h"
#include "backends/cuda/cuda_kernels.h"

namespace kiln::cuda {

namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr int kWarpRows = 4;   // query rows per warp
constexpr int kRows = 16;      // query rows per block
constexpr int kBK = 32;        // keys per tile
// 576: MLA's latent heads (DeepSeek: kv_lora_rank 512 + rope 64), which only this kernel takes.
constexpr int kMaxHeadDim = 576;
constexpr int kMaxSplits = 32;  // merge weights [kRows][splits] must fit where K/V tiles were
// Split over keys until about this many blocks per SM: a block walks its tiles one after another
// (load, sync, compute), so an SM needs several of them (up to 5 fit at D = 128) to hide that.
constexpr int kBlocksPerSm = 4;

struct Args {
  const void* q;
  int64_t ldq;
  int n;
  const int32_t* pos;
  const void* kpool;
  const void* vpool;
  const int32_t* bt;
  int bs;
  int64_t kv_dim;
  int heads, group, D;
  // Query rows are flattened (token, head of the GQA group) pairs, `rstride` per token: the
  // group size for one sequence (a block may span tokens), or the group rounded up to whole
  // blocks for batched decode (seq != nullptr), so a block never mixes sequences.
  int rstride;
  const int32_t* seq;
  int64_t bt_stride;
  float scale, softcap;
  int window;
  int splits;  // key ranges per row block (grid.z); sized on the device from the rows' ranges
  bool vec;    // 16-byte K/V loads
  bool vec_q;  // 16-byte Q loads
  const float* k_scale;  // FP8 cache: one scale per (slot, KV head), kv_heads a slot
  const float* v_scale;
  int kv_heads;
  void* out;
  int64_t ldo;
  float* ws;           // [n * heads][splits][D + 2] when splits > 1
  int* counters;       // [row_blocks * kv_heads], zero between launches (the merging block resets)
  const float* sinks;  // [heads] or nullptr (AttnLaunch::sinks)
};

size_t smem_bytes(int D) {
  return size_t(kRows * D + kBK * D + kBK * (D + 4) + 4 * kBK * kWarpRows) * sizeof(float);
}

// DPL: output dims per lane, ceil(D / 32) rounded up to an instantiated value. KV: the cache's
// element type, T or E4M3 (codes times a scale per key and KV head, applied as the tile loads).
template <typename T, typename KV, int DPL>
__global__ void __launch_bounds__(kThreads) attn_kernel(const Args a) {
  constexpr bool kFp8 = std::is_same_v<KV, E4M3>;
  pdl_begin();
  extern __shared__ float4 smem4[];
  const int D = a.D;
  float* Qs = reinterpret_cast<float*>(smem4);  // [D][kRows]
  float* Kt = Qs + D * kRows;                   // [D][kBK]
  float* Vs = Kt + D * kBK;                     // [kBK][D + 4] (+4: conflict-free float4 stores)
  float* Ps = Vs + kBK * (D + 4);               // [warp][kBK][kWarpRows]
  __shared__ int s_lo[kRows], s_hi[kRows];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int kvh = blockIdx.y, split = blockIdx.z;
  const int rbase = blockIdx.x * kRows;
  // Row fr is query head kvh * group + fr % rstride of token fr / rstride.
  auto valid = [&](int fr) { return fr / a.rstride < a.n && fr % a.rstride < a.group; };
  const int32_t* bt = a.bt + (a.seq ? int64_t(a.seq[rbase / a.rstride]) * a.bt_stride : 0);
  if (tid < kRows) {  // key range [lo, hi] of each row; empty for padding rows
    const int r = rbase + tid;
    int lo = INT_MAX, hi = -1;
    if (valid(r)) {
      hi = a.pos[r / a.rstride];
      lo = a.window > 0 ? max(0, hi - a.window + 1) : 0;
    }
    s_lo[tid] = lo, s_hi[tid] = hi;
  }
  // Q rows into shared memory. Decode blocks do little else, so the loads are all issued before
  // the first use: latency once, not once per element.
  const T* q = static_cast<const T*>(a.q);
  if (a.vec_q) {
    // Enough 16-byte loads per thread for kRows rows of DPL * 32 >= D elements.
    constexpr int E = kVec<T>, kIt = (kRows * DPL * 32 / E + kThreads - 1) / kThreads;
    const int per_row = D / E, chunks = kRows * per_row;
    uint4 buf[kIt];
#pragma unroll
    for (int it = 0; it < kIt; ++it) {
      const int e = tid + it * kThreads, r = e / per_row, fr = rbase + r;
      buf[it] = make_uint4(0, 0, 0, 0);
      if (e < chunks && valid(fr)) {
        const int i = fr / a.rstride, h = kvh * a.group + fr % a.rstride;
        buf[it] = *reinterpret_cast<const uint4*>(q + int64_t(i) * a.ldq + int64_t(h) * D +
                                                  (e % per_row) * E);
      }
    }
#pragma unroll
    for (int it = 0; it < kIt; ++it) {
      const int e = tid + it * kThreads, r = e / per_row, c = e % per_row;
      if (e < chunks) {
        float f[E];
        unpack_vec<T>(buf[it], f);
#pragma unroll
        for (int k = 0; k < E; ++k) Qs[(c * E + k) * kRows + r] = f[k];
      }
    }
  } else {
    for (int e = tid; e < kRows * D; e += kThreads) {
      const int r = e / D, d = e % D, fr = rbase + r;
      float v = 0.0f;
      if (valid(fr)) {
        const int i = fr / a.rstride, h = kvh * a.group + fr % a.rstride;
        v = to_f(q[int64_t(i) * a.ldq + int64_t(h) * D + d]);
      }
      Qs[d * kRows + r] = v;
    }
  }
  __syncthreads();

  int kmin = INT_MAX, kmax = -1;
#pragma unroll
  for (int r = 0; r < kRows; ++r) kmin = min(kmin, s_lo[r]), kmax = max(kmax, s_hi[r]);
  int my_lo[kWarpRows], my_hi[kWarpRows];
#pragma unroll
  for (int j = 0; j < kWarpRows; ++j)
    my_lo[j] = s_lo[warp * kWarpRows + j], my_hi[j] = s_hi[warp * kWarpRows + j];
  int k0 = kmin, k1 = kmax + 1;  // empty (k0 > k1) for a block of padding rows only
  // Splits of this row block that hold keys: the first `used` of grid.z (the same in each).
  int used = 0;
  if (a.splits > 1 && k1 > k0) {
    // This split's share of the block's own key range, in whole tiles. Short ranges use fewer
    // splits; the others only count themselves in for the merge, which never reads them.
    const int per = ((k1 - k0 + a.splits - 1) / a.splits + kBK - 1) / kBK * kBK;
    used = (k1 - k0 + per - 1) / per;
    const int64_t s0 = int64_t(k0) + int64_t(split) * per;
    k0 = int(min(s0, int64_t(k1)));
    k1 = int(min(s0 + per, int64_t(k1)));
  }
  // Warps whose rows are all padding (a GQA group smaller than the block) only help load tiles.
  // (my_lo / my_hi come from shared memory: the same in every lane, so this is warp-uniform.)
  bool warp_live = false;
#pragma unroll
  for (int j = 0; j < kWarpRows; ++j) warp_live |= my_hi[j] >= 0;

  float m[kWarpRows], l[kWarpRows], o[kWarpRows][DPL];
#pragma unroll
  for (int j = 0; j < kWarpRows; ++j) {
    m[j] = -INFINITY, l[j] = 0.0f;
#pragma unroll
    for (int k = 0; k < DPL; ++k) o[j][k] = 0.0f;
  }
  const KV* kp = static_cast<const KV*>(a.kpool) + int64_t(kvh) * D;
  const KV* vp = static_cast<const KV*>(a.vpool) + int64_t(kvh) * D;
  float* pw = Ps + warp * kBK * kWarpRows;
  const float4* q4 = reinterpret_cast<const float4*>(Qs) + warp;  // rows warp*4 .. +3 of dim d

  for (int t0 = k0; t0 < k1; t0 += kBK) {
    __syncthreads();  // the previous tile's readers are done with Kt / Vs
    {
      const int j = tid % kBK, t = t0 + j;
      const bool ok = t < k1;
      const int64_t slot = ok ? int64_t(bt[t / a.bs]) * a.bs + t % a.bs : 0;
      const int64_t off = slot * a.kv_dim;
      float ks = 1.0f, vs = 1.0f;  // FP8: this key's scales
      if constexpr (kFp8) {
        ks = ok ? a.k_scale[slot * a.kv_heads + kvh] : 0.0f;
        vs = ok ? a.v_scale[slot * a.kv_heads + kvh] : 0.0f;
      }
      if (a.vec) {
        // Batches of 4 chunks per thread: 8 independent 16-byte loads before the first use.
        constexpr int E = kVec<KV>, kStep = kThreads / kBK;
        for (int c0 = tid / kBK; c0 < D / E; c0 += 4 * kStep) {
          uint4 kb[4], vb[4];
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int c = c0 + u * kStep;
            kb[u] = vb[u] = make_uint4(0, 0, 0, 0);  // zeros, never garbage: 0 * NaN is NaN
            if (ok && c < D / E) {
              kb[u] = *reinterpret_cast<const uint4*>(kp + off + c * E);
              vb[u] = *reinterpret_cast<const uint4*>(vp + off + c * E);
            }
          }
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int c = c0 + u * kStep;
            if (c >= D / E) break;
            float kf[E], vf[E];
            unpack_vec<KV>(kb[u], kf);
            unpack_vec<KV>(vb[u], vf);
            if constexpr (kFp8) {
#pragma unroll
              for (int e = 0; e < E; ++e) kf[e] *= ks, vf[e] *= vs;
            }
#pragma unroll
            for (int e = 0; e < E; ++e) Kt[(c * E + e) * kBK + j] = kf[e];
            float4* vd = reinterpret_cast<float4*>(Vs + j * (D + 4) + c * E);
#pragma unroll
            for (int e = 0; e < E; e += 4)
              vd[e / 4] = make_float4(vf[e], vf[e + 1], vf[e + 2], vf[e + 3]);
          }
        }
      } else {
        for (int d = tid / kBK; d < D; d += kThreads / kBK) {
          Kt[d * kBK + j] = ok ? to_f(kp[off + d]) * ks : 0.0f;
          Vs[j * (D + 4) + d] = ok ? to_f(vp[off + d]) * vs : 0.0f;
        }
      }
    }
    __syncthreads();
    if (!warp_live) continue;  // warp-uniform; the next tile's __syncthreads still comes

    float s[kWarpRows] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 4
    for (int d = 0; d < D; ++d) {
      const float kv = Kt[d * kBK + lane];
      const float4 qq = q4[d * (kRows / 4)];
      s[0] = fmaf(qq.x, kv, s[0]);
      s[1] = fmaf(qq.y, kv, s[1]);
      s[2] = fmaf(qq.z, kv, s[2]);
      s[3] = fmaf(qq.w, kv, s[3]);
    }
    const int t = t0 + lane;
#pragma unroll
    for (int j = 0; j < kWarpRows; ++j) {
      float x = s[j] * a.scale;
      if (a.softcap > 0.0f) x = a.softcap * tanhf(x / a.softcap);
      const bool ok = t < k1 && t >= my_lo[j] && t <= my_hi[j];
      x = ok ? x : -INFINITY;
      const float mnew = fmaxf(m[j], warp_max(x));
      float p = 0.0f, corr = 1.0f;
      if (mnew != -INFINITY) {  // else every key so far is masked: nothing to rescale
        p = ok ? expf(x - mnew) : 0.0f;
        corr = expf(m[j] - mnew);
      }
      l[j] = l[j] * corr + warp_sum(p);
#pragma unroll
      for (int k = 0; k < DPL; ++k) o[j][k] *= corr;
      m[j] = mnew;
      pw[lane * kWarpRows + j] = p;
    }
    __syncwarp();
    const int kend = min(kBK, k1 - t0);
    for (int jj = 0; jj < kend; ++jj) {
      const float4 p4 = reinterpret_cast<const float4*>(pw)[jj];
      const float* vr = Vs + jj * (D + 4);
#pragma unroll
      for (int k = 0; k < DPL; ++k) {
        const int d = lane + 32 * k;
        if (d < D) {
          const float v = vr[d];
          o[0][k] = fmaf(p4.x, v, o[0][k]);
          o[1][k] = fmaf(p4.y, v, o[1][k]);
          o[2][k] = fmaf(p4.z, v, o[2][k]);
          o[3][k] = fmaf(p4.w, v, o[3][k]);
        }
      }
    }
    __syncwarp();  // pw is rewritten by the next tile
  }

#pragma unroll
  for (int j = 0; j < kWarpRows; ++j) {
    const int fr = rbase + warp * kWarpRows + j;
    if (!valid(fr) || (a.splits > 1 && split >= used)) continue;
    const int i = fr / a.rstride, h = blockIdx.y * a.group + fr % a.rstride;
    if (a.splits == 1) {
      // A sink adds exp(sink - m) to the row's normaliser (and nothing to its output).
      const float lj = l[j] + (a.sinks && m[j] != -INFINITY ? expf(a.sinks[h] - m[j]) : 0.0f);
      const float inv = lj > 0.0f ? 1.0f / lj : 0.0f;
      T* op = static_cast<T*>(a.out) + int64_t(i) * a.ldo + int64_t(h) * D;
#pragma unroll
      for (int k = 0; k < DPL; ++k)
        if (lane + 32 * k < D) op[lane + 32 * k] = from_f<T>(o[j][k] * inv);
    } else {
      float* w = a.ws + ((int64_t(i) * a.heads + h) * a.splits + split) * (D + 2);
#pragma unroll
      for (int k = 0; k < DPL; ++k)
        if (lane + 32 * k < D) w[lane + 32 * k] = o[j][k];
      if (lane == 0) w[D] = m[j], w[D + 1] = l[j];
    }
  }
  if (a.splits == 1) return;

  // Split-K merge by the last of this row block's splits to finish. Each block publishes its
  // partials (fence, then count); the last one sees every other block's writes after its own
  // fence, and reads them past L1 (__ldcg), which may hold lines of an earlier launch.
  __shared__ bool s_last;
  __threadfence();
  __syncthreads();
  int* counter = a.counters + blockIdx.x * gridDim.y + blockIdx.y;
  if (tid == 0) s_last = atomicAdd(counter, 1) == a.splits - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  // Split weights exp(m_s - M) per row (8 threads per row, into the free K/V tile space) and the
  // normaliser L = sum l_s exp(m_s - M); then each output is one pass over the used splits.
  float* wts = Kt;  // [kRows][splits]
  __shared__ float s_L[kRows];
  {
    const int r = tid / 8, part = tid % 8, fr = rbase + r;
    const float* w = nullptr;
    float M = -INFINITY, L = 0.0f;
    if (valid(fr)) {
      const int i = fr / a.rstride, h = blockIdx.y * a.group + fr % a.rstride;
      w = a.ws + (int64_t(i) * a.heads + h) * a.splits * (D + 2);
      for (int sp = part; sp < used; sp += 8) M = fmaxf(M, __ldcg(w + sp * (D + 2) + D));
    }
#pragma unroll
    for (int o = 1; o < 8; o <<= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    if (w) {
      for (int sp = part; sp < used; sp += 8) {
        const float ms = __ldcg(w + sp * (D + 2) + D);
        const float f = ms == -INFINITY ? 0.0f : expf(ms - M);  // a split with no visible keys
        wts[r * a.splits + sp] = f;
        L += __ldcg(w + sp * (D + 2) + D + 1) * f;
      }
    }
#pragma unroll
    for (int o = 1; o < 8; o <<= 1) L += __shfl_xor_sync(0xffffffffu, L, o);
    if (part == 0 && a.sinks && valid(fr) && M != -INFINITY)
      L += expf(a.sinks[blockIdx.y * a.group + fr % a.rstride] - M);
    if (part == 0) s_L[r] = L;
  }
  __syncthreads();
  // kE outputs per thread at a time and the split loop unrolled: the partials come from L2, so
  // the merge is bound by how many loads are in flight, not by arithmetic.
  constexpr int kE = 8;
  for (int e0 = tid; e0 < kRows * D; e0 += kE * kThreads) {
    const float* wp[kE];
    float acc[kE];
    int rr[kE];
#pragma unroll
    for (int k = 0; k < kE; ++k) {
      const int e = e0 + k * kThreads, r = e / D, fr = rbase + r;
      wp[k] = nullptr, acc[k] = 0.0f, rr[k] = r;
      if (e < kRows * D && valid(fr)) {
        const int i = fr / a.rstride, h = blockIdx.y * a.group + fr % a.rstride;
        wp[k] = a.ws + (int64_t(i) * a.heads + h) * a.splits * (D + 2) + e % D;
      }
    }
#pragma unroll 4
    for (int sp = 0; sp < used; ++sp) {
#pragma unroll
      for (int k = 0; k < kE; ++k)
        if (wp[k]) acc[k] += wts[rr[k] * a.splits + sp] * __ldcg(wp[k] + sp * (D + 2));
    }
#pragma unroll
    for (int k = 0; k < kE; ++k) {
      if (!wp[k]) continue;
      const int e = e0 + k * kThreads, fr = rbase + rr[k];
      const int i = fr / a.rstride, h = blockIdx.y * a.group + fr % a.rstride;
      static_cast<T*>(a.out)[int64_t(i) * a.ldo + int64_t(h) * D + e % D] =
          from_f<T>(s_L[rr[k]] > 0.0f ? acc[k] / s_L[rr[k]] : 0.0f);
    }
  }
  if (tid == 0) *counter = 0;  // ready for the next launch
}

struct Plan {
  int rstride, row_blocks, splits = 1;
};

// From host values only (n, heads, seq given or not, window, kv_len, SM count), so a launch
// recorded in a graph is the launch any replay needs.
Plan make_plan(const AttnLaunch& a, int num_sms) {
  Plan p;
  const int64_t group = a.heads / a.kv_heads;
  p.rstride = int(a.seq ? (group + kRows - 1) / kRows * kRows : group);
  p.row_blocks = int((a.n * p.rstride + kRows - 1) / kRows);
  const int64_t blocks = int64_t(p.row_blocks) * a.kv_heads;
  if (blocks == 0 || blocks >= kBlocksPerSm * int64_t(num_sms) || a.kv_len <= 0) return p;
  // The most keys one row block can see: its rows belong to one token (seq) or to at most
  // min(n, kRows) consecutive ones, each seeing at most `window` keys.
  const int64_t span = a.seq ? 1 : std::min<int64_t>(a.n, kRows);
  const int64_t keys =
      a.window > 0 ? std::min(a.kv_len, std::min(a.window, a.kv_len) + span - 1) : a.kv_len;
  const int64_t want = (kBlocksPerSm * int64_t(num_sms) + blocks - 1) / blocks;
  const int64_t most = (keys + kBK - 1) / kBK;  // >= 1 tile per split
  p.splits = int(std::max<int64_t>(1, std::min({want, most, int64_t(kMaxSplits)})));
  return p;
}

// The rows the CUDA-core kernel takes: all of them (seq_start cleared: the kernel relies on seq
// and pos alone), or, when the tensor-core kernel took a mixed batch's prefill chunks, only its
// decode rows [0, num_decode).
AttnLaunch core_part(const AttnLaunch& a, bool decode_only) {
  AttnLaunch c = a;
  c.seq_start = nullptr;
  if (decode_only) c.n = a.num_decode;
  c.settled = a.seq_start && (decode_only || a.num_seqs == a.num_decode);
  return c;
}

// Whether every row of the part is a one-token decode with its own key range (the tensor-core
// decode kernel's shape): a mixed batch's decode rows, a batched decode, or a single sequence's
// few rows.
bool all_decode(const AttnLaunch& a, bool decode_only) {
  if (a.seq_start) return decode_only || a.num_seqs == a.num_decode;
  return a.seq != nullptr || a.n < kTcMinRows;
}

// Either part may run, on either kernel (which depends on the dtype and on the tensor-core
// switch), so the scratch is sized for the largest; every plan uses host values only.
template <typename F, typename G>
size_t max_over_parts(const AttnLaunch& a, int num_sms, F core, G decode) {
  size_t r = 0;
  for (const bool decode_only : {false, true}) {
    if (decode_only && !(a.seq_start && a.num_decode > 0)) continue;
    const AttnLaunch c = core_part(a, decode_only);
    r = std::max(r, core(c));
    if (all_decode(a, decode_only)) r = std::max(r, decode(c, num_sms));
  }
  return r;
}

template <typename T, typename KV, int DPL>
void launch(const Args& args, dim3 grid, cudaStream_t s) {
  const size_t smem = smem_bytes(args.D);
  allow_dynamic_smem(reinterpret_cast<const void*>(attn_kernel<T, KV, DPL>),
                     smem_bytes(kMaxHeadDim));
  launch_kernel(attn_kernel<T, KV, DPL>, grid, kThreads, smem, s, args);
}

template <typename T, typename KV>
void launch_dpl(const Args& args, dim3 grid, cudaStream_t s) {
  const int dpl = (args.D + 31) / 32;
  if (dpl <= 1) return launch<T, KV, 1>(args, grid, s);
  if (dpl <= 2) return launch<T, KV, 2>(args, grid, s);
  if (dpl <= 3) return launch<T, KV, 3>(args, grid, s);
  if (dpl <= 4) return launch<T, KV, 4>(args, grid, s);
  if (dpl <= 6) return launch<T, KV, 6>(args, grid, s);
  if (dpl <= 8) return launch<T, KV, 8>(args, grid, s);
  return launch<T, KV, 18>(args, grid, s);  // MLA latent heads
}

template <typename T>
void launch_core(const AttnLaunch& a, float* ws, int* counters, int num_sms, cudaStream_t s) {
  const Plan p = make_plan(a, num_sms);
  KILN_CHECK(p.splits == 1 || (ws && counters), "attention: split-K workspace missing");
  const int64_t e = 16 / int64_t(sizeof(T));
  const int64_t ekv = a.k_scale ? 16 : e;  // K/V elements per 16-byte load
  Args g{a.q,
         a.ldq,
         int(a.n),
         a.pos,
         a.kpool,
         a.vpool,
         a.block_table,
         int(a.block_size),
         a.kv_dim,
         int(a.heads),
         int(a.heads / a.kv_heads),
         int(a.head_dim),
         p.rstride,
         a.seq,
         a.bt_stride,
         a.scale,
         a.softcap,
         int(a.window),
         p.splits,
         a.head_dim % ekv == 0 && a.kv_dim % ekv == 0,
         a.head_dim % e == 0 && a.ldq % e == 0 && reinterpret_cast<uintptr_t>(a.q) % 16 == 0,
         a.k_scale,
         a.v_scale,
         int(a.kv_heads),
         a.out,
         a.ldo,
         ws,
         counters,
         a.sinks};
  const dim3 grid(unsigned(p.row_blocks), unsigned(a.kv_heads), unsigned(p.splits));
  KILN_CHECK(grid.y <= 65535 && grid.z <= 65535, "attention: too many KV heads");
  if (a.k_scale) {
    if constexpr (std::is_same_v<T, float>)
      throw Error("attention: an FP8 KV cache needs F16 or BF16 activations");
    else
      launch_dpl<T, E4M3>(g, grid, s);
  } else {
    launch_dpl<T, T>(g, grid, s);
  }
}

}  // namespace

size_t attention_workspace(const AttnLaunch& a, int num_sms) {
  if (a.kv_heads <= 0 || a.heads % a.kv_heads) return 0;
  return max_over_parts(
      a, num_sms,
      [&](const AttnLaunch& c) -> size_t {
        const Plan p = make_plan(c, num_sms);
        return p.splits > 1 ? size_t(c.n * c.heads) * size_t(p.splits) * size_t(c.head_dim + 2) * 4
                            : 0;
      },
      attention_decode_workspace);
}

size_t attention_counters(const AttnLaunch& a, int num_sms) {
  if (a.kv_heads <= 0 || a.heads % a.kv_heads) return 0;
  return max_over_parts(
      a, num_sms,
      [&](const AttnLaunch& c) -> size_t {
        const Plan p = make_plan(c, num_sms);
        return p.splits > 1 ? size_t(p.row_blocks) * size_t(c.kv_heads) : 0;
      },
      attention_decode_counters);
}

void attention(DType act, const AttnLaunch& a, float* ws, int* counters, int num_sms,
               cudaStream_t s) {
  KILN_CHECK(a.kv_heads > 0 && a.heads % a.kv_heads == 0, "attention: ", a.heads,
             " query heads are not a multiple of ", a.kv_heads, " KV heads");
  KILN_CHECK(a.head_dim >= 1 && a.head_dim <= kMaxHeadDim, "attention: head_dim ", a.head_dim,
             " outside the CUDA kernel's range [1, ", kMaxHeadDim, "]");
  KILN_CHECK(a.n * (a.heads + kRows) < INT_MAX && a.kv_len < INT_MAX,
             "attention: sizes exceed 2^31");
  if (a.n == 0) return;
  bool decode_only = false;
  if (a.seq_start) {
    KILN_CHECK(a.seq && a.num_decode >= 0 && a.num_decode <= a.num_seqs && a.num_decode <= a.n &&
                   a.num_seqs <= a.n && a.max_q <= a.n,
               "attention: inconsistent mixed batch (n ", a.n, ", ", a.num_seqs, " sequences, ",
               a.num_decode, " decodes, max_q ", a.max_q, ", seq ", a.seq ? "set" : "null", ")");
    // Prefill chunks on tensor cores when it takes them (it leaves the decode rows alone).
    decode_only = a.num_seqs > a.num_decode && attention_tc(act, a, s);
    if (decode_only && a.num_decode == 0) return;
  } else if (!a.seq && a.n >= kTcMinRows && attention_tc(act, a, s)) {
    return;  // tensor cores (single-sequence prefill)
  }
  const AttnLaunch c = core_part(a, decode_only);
  if (all_decode(a, decode_only) && attention_decode_supported(act, c))
    return attention_decode(act, c, ws, counters, num_sms, s);  // decode rows on tensor cores
  KILN_DISPATCH_ACT(act, launch_core<T>(c, ws, counters, num_sms, s));
}

}  // namespace kiln::cuda
