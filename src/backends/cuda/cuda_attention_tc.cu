// Tensor-core flash attention (FlashAttention-2 style) over the paged KV cache, F16 / BF16.
//
// A block owns 64 or 128 query rows of one KV head: the flattened pairs (token i, query head g of
// the GQA group), as in the CUDA-core kernel, so the whole group shares each K/V tile. Each of
// the 4 warps owns 16 or 32 rows (one or two m16 tiles). The block walks the keys its rows can
// see in tiles of BN keys, gathered from the paged cache with cp.async (16-byte chunks,
// zero-filled outside the block's key range so unwritten slots are never read) into a ring of ST
// shared-memory stages, rows padded by 16 bytes (conflict-free ldmatrix). Per tile and warp:
//   S = Q K^T   mma.sync m16n8k16 (F16/BF16 in, FP32 accumulate), Q and K via ldmatrix;
//   scale, soft-cap, causal / window mask, online softmax, all FP32 (base-2 exponent);
//   O += P V    P rounded to the input type, V via ldmatrix.trans, FP32 accumulate.
// A warp skips the tiles none of its rows can see and masks only tiles that straddle one of its
// rows' limits. The output is normalised, staged in the warp's own Q rows and stored as 16-byte
// vectors. Blocks are issued heaviest first (last rows first) for a shorter causal tail.
//
// An FP8 cache (KV = E4M3): the ring holds codes and per-(key, KV head) scales, half the bytes;
// once a tile has landed the block turns it into one T tile pair (code * scale in FP32, rounded
// to T) behind a second barrier, and the products are the 16-bit kernel's.
//
// Variable length (a mixed batch's prefill chunks, AttnLaunch::seq_start): one launch serves
// several sequences, each with its own block-table row and positions. Sequence p has
// ceil(q_p * group / rows) blocks, numbered in sequence order; the grid is sized from host
// bounds (n, the number of chunks, max_q) and each block finds its sequence by a warp scan of
// seq_start, so the launch never depends on the lengths and no block mixes sequences. Spare
// blocks of the bound exit at once.
//
// H100, Llama-3.1-8B shapes (32 heads, 8 KV heads, D = 128, BF16): pp512 0.030 ms per layer
// (71 TFLOP/s causal; the CUDA-core kernel: 0.219 ms), pp2048 0.240 ms (143 TFLOP/s; 2.47 ms).
#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "backends/cuda/cuda_attention_tc.h"
#include "backends/cuda/cuda_common.h"
#include "backends/cuda/cuda_mma.h"

namespace kiln::cuda {

namespace {

constexpr int kThreads = 128;  // 4 warps

struct TcArgs {
  const void* q;
  int64_t ldq;
  int total;  // n * group rows per KV head (varlen: of all its sequences together)
  int group;
  // Varlen: sequences [first_seq, num_seqs) of seq_start, block-table rows bt_stride apart, at
  // most max_q rows each; seq_start == nullptr: one sequence of `total` rows, table bt.
  const int32_t* seq_start;
  int first_seq, num_seqs, max_q;
  int64_t bt_stride;
  const int32_t* pos;
  const void* kpool;
  const void* vpool;
  const int32_t* bt;
  int bs;
  int64_t kv_dim;
  const float* k_scale;  // FP8 cache: [slots][kv_heads]
  const float* v_scale;
  float scale_log2;      // scale * log2(e)
  float scale_over_cap;  // scale / softcap
  float cap_log2;        // softcap * log2(e); 0: no soft-cap
  int window;
  void* out;
  int64_t ldo;
  const float* sinks;  // [heads] or nullptr (AttnLaunch::sinks; natural-log units)
};

// Tile configuration: MI m16 row tiles per warp (block rows 64 * MI), BN keys per tile, ST
// shared-memory stages of K/V (ST - 1 tiles in flight while one is computed).
// FP8 (KV = E4M3): each stage holds codes [2][BN][D + 16] bytes and scales [2][BN] F32, followed
// by the one converted T tile pair [2][BN][D + 8].
template <int D, int BN>
constexpr int kStage8 = 2 * BN*(D + 16) + 2 * BN * 4;  // bytes

template <typename T, typename KV, int D, int BN, int MI, int ST>
constexpr size_t smem_bytes() {
  if constexpr (std::is_same_v<KV, E4M3>)
    return size_t(64 * MI + 2 * BN) * (D + 8) * sizeof(T) + size_t(ST) * kStage8<D, BN>;
  return size_t(64 * MI + 2 * ST * BN) * (D + 8) * sizeof(T);
}

template <typename T, typename KV, int D, int BN, int MI, int ST>
__global__ void __launch_bounds__(kThreads) attn_tc_kernel(const TcArgs a) {
  constexpr bool kFp8 = std::is_same_v<KV, E4M3>;
  constexpr int LD8 = D + 16;     // bytes per FP8 row
  constexpr int kRows = 64 * MI;  // query rows per block
  constexpr int WR = 16 * MI;     // query rows per warp
  constexpr int LDS = D + 8;      // elements per shared row (+16 bytes: conflict-free ldmatrix)
  constexpr int CH = D / 8;       // 16-byte chunks per row
  constexpr int NT = BN / 8;      // n8 tiles of S
  constexpr int KS = D / 16;      // k16 steps of Q K^T
  constexpr int DT = D / 8;       // n8 tiles of O
  constexpr bool kQReg = MI == 1 && D <= 128;  // Q fragments in registers (else re-read)
  static_assert(D % 16 == 0 && BN % 16 == 0 && ST >= 2, "tile shapes");
  static_assert((kRows * CH) % kThreads == 0 && (WR * CH) % 32 == 0, "Q / O shapes");

  extern __shared__ float4 smem4[];
  T* Qs = reinterpret_cast<T*>(smem4);  // [kRows][LDS]
  T* Ks = Qs + kRows * LDS;             // [ST][BN][LDS] (FP8: [BN][LDS], converted)
  T* Vs = Ks + (kFp8 ? 1 : ST) * BN * LDS;
  uint8_t* ring8 = reinterpret_cast<uint8_t*>(Vs + BN * LDS);  // FP8: [ST] stages
  __shared__ int s_lo[kRows], s_hi[kRows];
  __shared__ int s_find[3];

  pdl_begin();
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int kvh = blockIdx.y;
  // This block's rows: flattened rows rbase .. rbase + kRows - 1 (of `total`) of the sequence
  // whose first token is row row0 and whose block table is bt.
  int rbase, total = a.total, row0 = 0;
  const int32_t* bt = a.bt;
  if (a.seq_start == nullptr) {
    rbase = int(gridDim.x - 1 - blockIdx.x) * kRows;  // heaviest rows first
  } else {
    if (warp == 0) {  // which sequence owns block blockIdx.x: scan of the block counts
      const int bid = int(blockIdx.x);
      int base = 0, found[3] = {-1, 0, 0};
      for (int p0 = a.first_seq; p0 < a.num_seqs; p0 += 32) {
        const int p = p0 + lane;
        const int c = p < a.num_seqs
                          ? ((a.seq_start[p + 1] - a.seq_start[p]) * a.group + kRows - 1) / kRows
                          : 0;
        int inc = c;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const int t = __shfl_up_sync(0xffffffffu, inc, o);
          if (lane >= o) inc += t;
        }
        const int excl = base + inc - c;
        const unsigned hit = __ballot_sync(0xffffffffu, c > 0 && bid >= excl && bid < excl + c);
        if (hit) {  // warp-uniform
          const int src = __ffs(hit) - 1;
          found[0] = p0 + src;
          found[1] = bid - __shfl_sync(0xffffffffu, excl, src);
          found[2] = __shfl_sync(0xffffffffu, c, src);
          break;
        }
        base += __shfl_sync(0xffffffffu, inc, 31);
      }
      if (lane == 0) s_find[0] = found[0], s_find[1] = found[1], s_find[2] = found[2];
    }
    __syncthreads();
    const int sq = s_find[0];
    if (sq < 0) return;  // a spare block of the host's bound (uniform over the block)
    row0 = a.seq_start[sq];
    total = (a.seq_start[sq + 1] - row0) * a.group;
    bt += int64_t(sq) * a.bt_stride;
    rbase = (s_find[2] - 1 - s_find[1]) * kRows;  // heaviest rows of the sequence first
  }

  // Key range [lo, hi] of each row; empty (lo > hi) for padding rows.
  for (int r = tid; r < kRows; r += kThreads) {
    const int fr = rbase + r;
    int lo = INT_MAX, hi = -1;
    if (fr < total) {
      hi = a.pos[row0 + fr / a.group];
      lo = a.window > 0 ? max(0, hi - a.window + 1) : 0;
    }
    s_lo[r] = lo, s_hi[r] = hi;
  }
  // Q rows (cp.async; committed with the first K/V tile).
  {
    const T* q = static_cast<const T*>(a.q);
#pragma unroll
    for (int it = 0; it < kRows * CH / kThreads; ++it) {
      const int e = tid + it * kThreads, r = e / CH, c = e % CH, fr = rbase + r;
      const bool ok = fr < total;
      const T* src = q;
      if (ok) {
        const int i = row0 + fr / a.group, h = kvh * a.group + fr % a.group;
        src = q + int64_t(i) * a.ldq + int64_t(h) * D + c * 8;
      }
      cp_async16(Qs + r * LDS + c * 8, src, ok);
    }
  }
  __syncthreads();  // s_lo / s_hi

  int cta_lo = INT_MAX, cta_hi = -1;
  for (int r = 0; r < kRows; ++r) cta_lo = min(cta_lo, s_lo[r]), cta_hi = max(cta_hi, s_hi[r]);
  // The warp's union of ranges [w_lo_min, w_hi_max] (tiles outside: skipped) and intersection
  // [w_lo_max, w_hi_min] (tiles inside: no mask; a padding row makes it empty).
  int w_lo_min = INT_MAX, w_lo_max = INT_MIN, w_hi_min = INT_MAX, w_hi_max = -1;
#pragma unroll
  for (int r = warp * WR; r < warp * WR + WR; ++r) {
    const int lo = s_lo[r], hi = s_hi[r];
    w_lo_min = min(w_lo_min, lo), w_lo_max = max(w_lo_max, lo);
    w_hi_min = min(w_hi_min, hi), w_hi_max = max(w_hi_max, hi);
  }
  // This thread's rows: warp * WR + mi * 16 + lane / 4 (+ 8).
  int lo[MI][2], hi[MI][2];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = warp * WR + mi * 16 + lane / 4 + h * 8;
      lo[mi][h] = s_lo[r], hi[mi][h] = s_hi[r];
    }

  const KV* kp = static_cast<const KV*>(a.kpool) + int64_t(kvh) * D;
  const KV* vp = static_cast<const KV*>(a.vpool) + int64_t(kvh) * D;
  // Keys t0 .. t0 + BN - 1 into stage `buf`; keys outside [cta_lo, cta_hi] become zeros.
  auto load_tile = [&](int buf, int t0) {
    if constexpr (kFp8) {
      constexpr int CH8 = D / 16;
      uint8_t* kd = ring8 + buf * kStage8<D, BN>;
      uint8_t* vd = kd + BN * LD8;
      float* sd = reinterpret_cast<float*>(vd + BN * LD8);  // K scales [BN], V scales [BN]
#pragma unroll
      for (int it = 0; it < (BN * CH8 + kThreads - 1) / kThreads; ++it) {
        const int e = tid + it * kThreads, j = e / CH8, c = e % CH8, t = t0 + j;
        if ((BN * CH8) % kThreads != 0 && e >= BN * CH8) break;
        const bool ok = t >= cta_lo && t <= cta_hi;
        int64_t off = 0;
        if (ok) off = (int64_t(__ldg(bt + t / a.bs)) * a.bs + t % a.bs) * a.kv_dim + c * 16;
        cp_async16(kd + j * LD8 + c * 16, kp + off, ok);
        cp_async16(vd + j * LD8 + c * 16, vp + off, ok);
      }
      if (tid < 2 * BN) {  // threads [0, BN): K scales; [BN, 2 BN): V scales
        const int t = t0 + tid % BN;
        const bool ok = t >= cta_lo && t <= cta_hi;
        int64_t si = 0;
        if (ok) si = (int64_t(__ldg(bt + t / a.bs)) * a.bs + t % a.bs) * gridDim.y + kvh;
        cp_async4(sd + tid, (tid < BN ? a.k_scale : a.v_scale) + si, ok);
      }
      return;
    }
    T* kd = Ks + buf * BN * LDS;
    T* vd = Vs + buf * BN * LDS;
#pragma unroll
    for (int it = 0; it < (BN * CH + kThreads - 1) / kThreads; ++it) {
      const int e = tid + it * kThreads, j = e / CH, c = e % CH, t = t0 + j;
      if ((BN * CH) % kThreads != 0 && e >= BN * CH) break;
      const bool ok = t >= cta_lo && t <= cta_hi;
      int64_t off = 0;
      if (ok) off = (int64_t(__ldg(bt + t / a.bs)) * a.bs + t % a.bs) * a.kv_dim + c * 8;
      cp_async16(kd + j * LDS + c * 8, kp + off, ok);
      cp_async16(vd + j * LDS + c * 8, vp + off, ok);
    }
  };

  // cta_hi >= 0: the block has at least one real row, which sees at least its own key.
  // Commit group g holds tile g (the first also Q); groups past the last tile are empty.
  const int t_begin = cta_lo / BN * BN;
  const int ntiles = (cta_hi - t_begin) / BN + 1;
#pragma unroll
  for (int st = 0; st < ST - 1; ++st) {
    if (st < ntiles) load_tile(st, t_begin + st * BN);
    cp_async_commit();
  }

  float o[MI][DT][4];
  float m[MI][2], l[MI][2];  // running max (base 2) and per-thread partial sums of each row
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
    for (int d = 0; d < DT; ++d) o[mi][d][0] = o[mi][d][1] = o[mi][d][2] = o[mi][d][3] = 0.0f;
    m[mi][0] = m[mi][1] = -INFINITY, l[mi][0] = l[mi][1] = 0.0f;
  }
  uint32_t qf[kQReg ? KS : 1][4];
  const T* qw = Qs + (warp * WR + lane % 16) * LDS + (lane / 16) * 8;  // ldmatrix A address

  for (int it = 0; it < ntiles; ++it) {
    cp_async_wait<ST - 2>();
    __syncthreads();  // tile `it` visible to all; everyone is done with the stage refilled next
    if constexpr (kQReg) {
      if (it == 0) {
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) ldsm_x4(qf[ks], qw + ks * 16);
      }
    }
    {
      const int nx = it + ST - 1;
      if (nx < ntiles) load_tile(nx % ST, t_begin + nx * BN);
      cp_async_commit();
    }
    if constexpr (kFp8) {  // the whole block turns stage it % ST into Ks / Vs
      constexpr int CH8 = D / 16;
      const uint8_t* src = ring8 + (it % ST) * kStage8<D, BN>;
      const float* sd = reinterpret_cast<const float*>(src + 2 * BN * LD8);
      for (int e = tid; e < 2 * BN * CH8; e += kThreads) {
        const int row = e / CH8, c = e % CH8;  // rows [0, BN): K, [BN, 2 BN): V
        float f[16];
        unpack_vec<E4M3>(*reinterpret_cast<const uint4*>(src + row * LD8 + c * 16), f);
        const float sc = sd[row];
#pragma unroll
        for (int k = 0; k < 16; ++k) f[k] *= sc;
        uint4* d = reinterpret_cast<uint4*>(Ks + row * LDS + c * 16);  // Vs follows Ks
        d[0] = pack_vec<T>(f);
        d[1] = pack_vec<T>(f + 8);
      }
      __syncthreads();
    }
    const int t0 = t_begin + it * BN;
    if (t0 > w_hi_max || t0 + BN - 1 < w_lo_min) continue;  // no row of this warp sees the tile
    const T* Kb = Ks + (kFp8 ? 0 : it % ST) * BN * LDS;
    const T* Vb = Vs + (kFp8 ? 0 : it % ST) * BN * LDS;

    // S = Q K^T
    float s[MI][NT][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
        s[mi][nt][0] = s[mi][nt][1] = s[mi][nt][2] = s[mi][nt][3] = 0.0f;
    const T* kw = Kb + (lane % 8 + (lane / 16) * 8) * LDS + ((lane / 8) & 1) * 8;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      uint32_t qa[MI][4];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        if constexpr (kQReg) {
          qa[mi][0] = qf[ks][0], qa[mi][1] = qf[ks][1], qa[mi][2] = qf[ks][2],
          qa[mi][3] = qf[ks][3];
        } else {
          ldsm_x4(qa[mi], qw + mi * 16 * LDS + ks * 16);
        }
      }
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t b[4];
        ldsm_x4(b, kw + np * 16 * LDS + ks * 16);
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
          mma16816<T>(s[mi][2 * np], qa[mi], b[0], b[1]);
          mma16816<T>(s[mi][2 * np + 1], qa[mi], b[2], b[3]);
        }
      }
    }

    // Scale (base 2), soft-cap, mask.
    if (a.cap_log2 > 0.0f) {
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            s[mi][nt][e] = a.cap_log2 * tanhf(s[mi][nt][e] * a.scale_over_cap);
    } else {
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mi][nt][e] *= a.scale_log2;
    }
    if (t0 < w_lo_max || t0 + BN - 1 > w_hi_min) {
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int t = t0 + nt * 8 + (lane % 4) * 2 + (e & 1), h = e / 2;
            if (t < lo[mi][h] || t > hi[mi][h]) s[mi][nt][e] = -INFINITY;
          }
    }
    // Online softmax per row (the 4 threads of a quad share a row).
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        mx[0] = fmaxf(mx[0], fmaxf(s[mi][nt][0], s[mi][nt][1]));
        mx[1] = fmaxf(mx[1], fmaxf(s[mi][nt][2], s[mi][nt][3]));
      }
      float base[2], corr[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
        const float mn = fmaxf(m[mi][h], mx[h]);
        // A row that has seen no key yet keeps m = -inf: subtract 0 instead (every p is 0).
        base[h] = mn == -INFINITY ? 0.0f : mn;
        corr[h] = ex2(m[mi][h] - base[h]);
        m[mi][h] = mn;
      }
      float ps[2] = {0.0f, 0.0f};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[mi][nt][e] = ex2(s[mi][nt][e] - base[e / 2]);
          ps[e / 2] += s[mi][nt][e];
        }
#pragma unroll
      for (int h = 0; h < 2; ++h) l[mi][h] = l[mi][h] * corr[h] + ps[h];
#pragma unroll
      for (int d = 0; d < DT; ++d) {
        o[mi][d][0] *= corr[0], o[mi][d][1] *= corr[0];
        o[mi][d][2] *= corr[1], o[mi][d][3] *= corr[1];
      }
    }

    // O += P V (the S accumulators of keys 16kk .. 16kk + 15 are P's A fragment)
    const T* vw = Vb + (lane % 8 + ((lane / 8) & 1) * 8) * LDS + (lane / 16) * 8;
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t pa[MI][4];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        pa[mi][0] = pack2<T>(s[mi][2 * kk][0], s[mi][2 * kk][1]);
        pa[mi][1] = pack2<T>(s[mi][2 * kk][2], s[mi][2 * kk][3]);
        pa[mi][2] = pack2<T>(s[mi][2 * kk + 1][0], s[mi][2 * kk + 1][1]);
        pa[mi][3] = pack2<T>(s[mi][2 * kk + 1][2], s[mi][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        ldsm_x4_t(b, vw + kk * 16 * LDS + dp * 16);
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
          mma16816<T>(o[mi][2 * dp], pa[mi], b[0], b[1]);
          mma16816<T>(o[mi][2 * dp + 1], pa[mi], b[2], b[3]);
        }
      }
    }
  }

  // Normalise; stage the warp's output rows in its own Q rows (only this warp reads them), then
  // 16-byte stores.
  T* Os = Qs + warp * WR * LDS;
  __syncwarp();
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
    float inv[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float t = l[mi][h];
      t += __shfl_xor_sync(0xffffffffu, t, 1);
      t += __shfl_xor_sync(0xffffffffu, t, 2);
      if (a.sinks && m[mi][h] != -INFINITY) {  // the sink's share of the normaliser (base 2)
        const int fr = rbase + warp * WR + mi * 16 + lane / 4 + 8 * h;
        t += ex2(a.sinks[kvh * a.group + fr % a.group] * 1.4426950408889634f - m[mi][h]);
      }
      inv[h] = t > 0.0f ? 1.0f / t : 0.0f;
    }
#pragma unroll
    for (int d = 0; d < DT; ++d) {
      const int col = d * 8 + (lane % 4) * 2, r = mi * 16 + lane / 4;
      *reinterpret_cast<uint32_t*>(Os + r * LDS + col) =
          pack2<T>(o[mi][d][0] * inv[0], o[mi][d][1] * inv[0]);
      *reinterpret_cast<uint32_t*>(Os + (r + 8) * LDS + col) =
          pack2<T>(o[mi][d][2] * inv[1], o[mi][d][3] * inv[1]);
    }
  }
  __syncwarp();
  T* out = static_cast<T*>(a.out);
#pragma unroll
  for (int it = 0; it < WR * CH / 32; ++it) {
    const int e = lane + it * 32, r = e / CH, c = e % CH, fr = rbase + warp * WR + r;
    if (fr < total) {
      const int i = row0 + fr / a.group, h = kvh * a.group + fr % a.group;
      *reinterpret_cast<uint4*>(out + int64_t(i) * a.ldo + int64_t(h) * D + c * 8) =
          *reinterpret_cast<const uint4*>(Os + r * LDS + c * 8);
    }
  }
}

template <typename T, typename KV, int D, int BN, int MI, int ST>
void launch(const TcArgs& g, int64_t total, int64_t kv_heads, cudaStream_t s) {
  constexpr size_t smem = smem_bytes<T, KV, D, BN, MI, ST>();
  allow_dynamic_smem(reinterpret_cast<const void*>(attn_tc_kernel<T, KV, D, BN, MI, ST>), smem);
  constexpr int64_t R = 64 * MI;
  int64_t gx = (total + R - 1) / R;
  if (g.seq_start) {
    // Sequence p takes ceil(q_p * group / R) blocks: at most one partial block each beyond the
    // rows' share, and at most as many as a max_q chunk needs.
    const int64_t seqs = g.num_seqs - g.first_seq;
    gx += seqs;
    if (g.max_q > 0) gx = std::min(gx, seqs * ((int64_t(g.max_q) * g.group + R - 1) / R));
  }
  if (gx == 0) return;
  KILN_CHECK(gx < INT_MAX, "attention: too many query rows");
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(kv_heads));
  launch_kernel(attn_tc_kernel<T, KV, D, BN, MI, ST>, grid, dim3(kThreads), smem, s, g);
}

// Two tile configurations, both checked on H100 (bench/attention_tc_check.cu): 64 rows per block
// with 64-key tiles and 2 stages (lowest latency per tile: best while the grid is about one wave,
// as for pp512), and 128 rows with 32-key tiles and 3 stages (K/V fragments reused over two row
// tiles: ~5% faster once the grid fills every SM twice, as for pp2048). D = 256 keeps 64 rows and
// 32-key tiles (its FP32 output tile takes 128 registers a thread).
template <typename T, typename KV, int D>
void launch_rows(bool rows128, const TcArgs& g, int64_t total, int64_t kv_heads, cudaStream_t s) {
  if constexpr (D == 256) {
    launch<T, KV, D, 32, 1, 2>(g, total, kv_heads, s);
  } else {
    if (rows128) return launch<T, KV, D, 32, 2, 3>(g, total, kv_heads, s);
    launch<T, KV, D, 64, 1, 2>(g, total, kv_heads, s);
  }
}

template <typename T, typename KV>
bool launch_d(int64_t D, bool rows128, const TcArgs& g, int64_t total, int64_t kv_heads,
              cudaStream_t s) {
  switch (D) {
    case 64:
      launch_rows<T, KV, 64>(rows128, g, total, kv_heads, s);
      return true;
    case 80:
      launch_rows<T, KV, 80>(rows128, g, total, kv_heads, s);
      return true;
    case 96:
      launch_rows<T, KV, 96>(rows128, g, total, kv_heads, s);
      return true;
    case 128:
      launch_rows<T, KV, 128>(rows128, g, total, kv_heads, s);
      return true;
    case 256:
      launch_rows<T, KV, 256>(rows128, g, total, kv_heads, s);
      return true;
    default:
      return false;
  }
}

int num_sms() {
  int dev = 0, n = 0;
  KILN_CUDA_CHECK(cudaGetDevice(&dev));
  KILN_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  return n;
}

// KILN_CUDA_ATTN_TC_ROWS=64 or 128 forces the rows per block (testing); else chosen per launch.
int forced_rows() {
  static const int r = [] {
    const char* e = std::getenv("KILN_CUDA_ATTN_TC_ROWS");
    return e ? std::atoi(e) : 0;
  }();
  return r;
}

bool use_rows128(int64_t total, int64_t kv_heads) {
  if (forced_rows() == 64 || forced_rows() == 128) return forced_rows() == 128;
  // 128-row blocks once they fill every SM twice; else 64-row blocks.
  static const int sms = num_sms();
  return (total + 127) / 128 * kv_heads >= 2 * int64_t(sms);
}

int g_enabled = -1;  // -1: not read from the environment yet

}  // namespace

void set_attention_tc_enabled(bool on) {
  g_enabled = on ? 1 : 0;
}

bool attention_tc_enabled() {
  if (g_enabled < 0) {
    const char* e = std::getenv("KILN_CUDA_ATTN_TC");
    g_enabled = (e && std::strcmp(e, "0") == 0) ? 0 : 1;
  }
  return g_enabled == 1;
}

bool attention_tc(DType act, const AttnLaunch& a, cudaStream_t s) {
  if (!attention_tc_enabled()) return false;
  if (act != DType::F16 && act != DType::BF16) return false;
  if (a.k_scale && (!a.v_scale || a.kv_dim % 16 != 0)) return false;  // FP8: 16 codes a chunk
  if (a.seq != nullptr && a.seq_start == nullptr) return false;
  if (a.seq_start && (a.num_seqs <= a.num_decode || a.num_decode < 0 || a.num_decode > a.n ||
                      a.bt_stride < 0 || a.num_seqs >= INT_MAX || a.max_q >= INT_MAX))
    return false;
  const int64_t D = a.head_dim;
  if (D != 64 && D != 80 && D != 96 && D != 128 && D != 256) return false;
  if (a.n <= 0 || a.kv_heads <= 0 || a.heads % a.kv_heads != 0 || a.block_size <= 0) return false;
  if (a.kv_dim < a.kv_heads * D || a.n * a.heads >= INT_MAX || a.block_size >= INT_MAX)
    return false;
  // Positions are < 2^31, so a window that wide is no window.
  const int window = a.window > 0 && a.window < INT_MAX ? int(a.window) : 0;
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (!aligned(a.q) || !aligned(a.out) || !aligned(a.kpool) || !aligned(a.vpool)) return false;
  if (a.ldq % 8 != 0 || a.ldo % 8 != 0 || a.kv_dim % 8 != 0) return false;
  const int64_t group = a.heads / a.kv_heads;
  // Varlen: the prefill chunks' rows only (the decode rows are the caller's).
  const int64_t total = (a.seq_start ? a.n - a.num_decode : a.n) * group;
  if (a.kv_heads > 65535) return false;
  const float log2e = 1.4426950408889634f;
  const TcArgs g{a.q,
                 a.ldq,
                 int(total),
                 int(group),
                 a.seq_start,
                 int(a.num_decode),
                 int(a.num_seqs),
                 int(a.max_q),
                 a.bt_stride,
                 a.pos,
                 a.kpool,
                 a.vpool,
                 a.block_table,
                 int(a.block_size),
                 a.kv_dim,
                 a.k_scale,
                 a.v_scale,
                 a.scale * log2e,
                 a.softcap > 0.0f ? a.scale / a.softcap : 0.0f,
                 a.softcap > 0.0f ? a.softcap * log2e : 0.0f,
                 window,
                 a.out,
                 a.ldo,
                 a.sinks};
  const bool rows128 = use_rows128(total, a.kv_heads);
  if (a.k_scale) {
    if (act == DType::BF16)
      return launch_d<__nv_bfloat16, E4M3>(D, rows128, g, total, a.kv_heads, s);
    return launch_d<__half, E4M3>(D, rows128, g, total, a.kv_heads, s);
  }
  if (act == DType::BF16)
    return launch_d<__nv_bfloat16, __nv_bfloat16>(D, rows128, g, total, a.kv_heads, s);
  return launch_d<__half, __half>(D, rows128, g, total, a.kv_heads, s);
}

}  // namespace kiln::cuda
