// Tensor-core decode attention over the paged KV cache (F16 / BF16): the decode rows of a step.
//
// Why its own kernel: a decode step reads every cached key and value of every sequence once and
// does two multiply-adds per element read, so it is bound by memory bandwidth, and by nothing
// else only if enough K/V bytes are in flight per SM. The CUDA-core kernel (cuda_attention.cu)
// stages tiles through FP32 shared memory with one warp computing while the others wait, and
// reaches a fraction of the bandwidth; here K/V stay in the cache's own type from global memory
// to the tensor cores.
//
// A block owns one (row, KV head, split): the row's whole GQA group (up to 16 query heads) is the
// m16 tile of mma.sync m16n8k16, padded with zero rows, so the group reads each key once. The
// block's key range is dealt to its 4 warps in 16-key tiles (warp w takes tiles w, w + 4, ...);
// each warp streams its own tiles through a private ring of ST shared-memory stages with
// cp.async (ST - 1 tiles in flight, no block-wide barrier in the loop) and keeps its own online
// softmax (FP32, base-2 exponent; P rounded to the input type for the PV product, as in the
// prefill kernel). The 4 warps' partial results are merged through shared memory at the end.
//
// An FP8 cache (KV = E4M3) streams its codes and per-(key, KV head) scales through the ring
// instead, half the bytes a key, in 5 stages. Before each product the warp turns the tile's K
// (then V) into one T tile (code * scale in FP32, rounded to T), so the tensor-core part is the
// 16-bit kernel's. Decode against the BF16 cache on the H100 (Llama-3.1-8B at depth 4096, each
// ratio from one device call): 5 stages 1.05x at batch 32 and 1.09x at batch 64; 3 stages (K and
// V converted together) 1.07x at batch 32; 3 blocks of 3 stages per SM 0.99x and 1.02x. So the
// per-tile chain (convert, products, softmax), not the bytes, bounds it now.
//
// Few rows (batch 1, small batches) cannot fill the GPU, so the keys are also split over grid.z
// (flash-decoding); the last block of a (row, KV head) to finish merges the splits (an atomic
// counter; no second launch). The host picks only the number of splits, from host values; each
// block cuts its own row's key range into that many pieces on the device, so a CUDA graph
// captured under a length bound spreads the keys a replay actually has over every split.
#include <algorithm>
#include <climits>
#include <type_traits>

#include "backends/cuda/cuda_attention_decode.h"
#include "backends/cuda/cuda_attention_tc.h"
#include "backends/cuda/cuda_common.h"
#include "backends/cuda/cuda_mma.h"

namespace kiln::cuda {

namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = 4;
constexpr int kRows = 16;       // query heads per block (the GQA group, zero-padded)
constexpr int kTileKeys = 16;   // keys per warp tile
constexpr int kMaxSplits = 32;  // split weights [kRows][kMaxSplits] in static shared memory
// Splits until about this many blocks per SM (two fit at D = 128: ~107 KB of stages each).
constexpr int kBlocksPerSm = 2;

struct DecArgs {
  const void* q;
  int64_t ldq;
  int n, heads, group;
  const int32_t* pos;
  const int32_t* seq;  // nullptr: every row reads table bt
  int64_t bt_stride;
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
  int splits;
  void* out;
  int64_t ldo;
  float* ws;           // [n * heads][splits][D + 4]: unnormalised output, (max, sum) in base 2, pad
  int* counters;       // [n * kv_heads], zero between launches (the merging block resets its own)
  const float* sinks;  // [heads] or nullptr (AttnLaunch::sinks; natural-log units)
  bool settled;        // AttnLaunch::settled: the keys before a row's position load before the wait
};

// A sink's share of a row's normaliser, whose running max M is in base 2 (scores * log2 e).
__device__ __forceinline__ float sink_term(const float* sinks, int h, float M) {
  return sinks && M != -INFINITY ? ex2(sinks[h] * 1.4426950408889634f - M) : 0.0f;
}

// Stages per warp: 3 (two tiles in flight per warp, two blocks per SM) up to D = 128; 2 for
// D = 256, whose stages are twice the size.
template <int D>
constexpr int kStages = D > 128 ? 2 : 3;
// FP8: as many bytes in flight per warp as the 16-bit ring (4 and 2 tiles of half the bytes),
// still two blocks per SM up to D = 128.
template <int D>
constexpr int kStages8 = D > 128 ? 3 : 5;

// Shared memory: Q [kRows][D + 8] T, then each warp's region: ST stages of K / V tiles in the
// cache's type (FP8: codes [2][kTileKeys][D] bytes, unpadded (a quarter-warp reads 128
// contiguous bytes), and scales [2][kTileKeys] F32 per stage, then the one T tile that K, then V,
// is turned into). The warps' partial outputs reuse their region.
template <typename T, typename KV, int D>
struct DecSmem {
  static constexpr bool kFp8 = std::is_same_v<KV, E4M3>;
  static constexpr int ST = kFp8 ? kStages8<D> : kStages<D>;
  static constexpr int LDS = D + 8;                    // T elements per row
  static constexpr int kStageT = 2 * kTileKeys * LDS;  // T elements: K tile then V tile
  static constexpr int LD8 = D;                        // bytes per FP8 row
  static constexpr int kStage8 = 2 * kTileKeys * LD8 + 2 * kTileKeys * 4;  // bytes
  static constexpr int kWarpBytes =
      kFp8 ? ST * kStage8 + kTileKeys * LDS * int(sizeof(T)) : ST * kStageT * int(sizeof(T));
  static constexpr size_t kBytes = size_t(kRows * LDS) * sizeof(T) + size_t(kWarps) * kWarpBytes;
  static_assert(kWarpBytes % 16 == 0 && kStage8 % 16 == 0, "16-byte aligned regions");
};

template <typename T, typename KV, int D>
constexpr size_t smem_bytes() {
  return DecSmem<T, KV, D>::kBytes;
}

template <typename T, typename KV, int D>
__global__ void __launch_bounds__(kThreads) attn_decode_kernel(const DecArgs a) {
  using Sm = DecSmem<T, KV, D>;
  constexpr bool kFp8 = Sm::kFp8;
  constexpr int ST = Sm::ST;
  constexpr int LDS = D + 8;  // elements per shared row (+16 bytes: conflict-free ldmatrix)
  constexpr int CH = D / 8;   // 16-byte chunks per row
  constexpr int KS = D / 16;  // k16 steps of Q K^T
  constexpr int DT = D / 8;   // n8 tiles of O
  constexpr bool kQReg = D <= 128;
  constexpr int kStage = Sm::kStageT;  // one stage: K tile then V tile
  constexpr int LDP = D + 4;           // floats per row of a warp's partial output
  constexpr int WS = D + 4;  // floats per workspace row: 16-byte aligned for the merge's loads
  static_assert(D % 16 == 0 && ST >= 2, "tile shapes");
  static_assert(kRows * LDP * 4 <= Sm::kWarpBytes, "partials fit in the warp's region");

  extern __shared__ float4 smem4[];
  T* Qs = reinterpret_cast<T*>(smem4);  // [kRows][LDS]
  __shared__ float s_m[kWarps][kRows], s_l[kWarps][kRows];
  __shared__ float s_w[kWarps][kRows], s_inv[kRows];

  // Under programmatic dependent launch the block starts while the kernels ahead of it (the
  // qkv GEMV, rope_kv_write) still run. With settled rows, positions and block tables came from
  // the host and every key before a row's own position from earlier forwards, so the warps
  // request those tiles first and wait only for Q and the current key: the cache bytes of a
  // short context are then in flight while the step's earlier kernels drain.
  pdl_trigger();
  if (!a.settled) pdl_wait();
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int i = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
  const int group = a.group;
  char* const regions = reinterpret_cast<char*>(Qs + kRows * LDS);
  char* const region = regions + warp * Sm::kWarpBytes;
  T* ring = reinterpret_cast<T*>(region);                     // 16-bit cache: the stages
  uint8_t* ring8 = reinterpret_cast<uint8_t*>(region);        // FP8: the stages
  T* conv = reinterpret_cast<T*>(region + ST * Sm::kStage8);  // FP8: the converted tile

  // Key range of the row and this split's piece of it, in whole warp tiles.
  const int hi = a.pos[i];
  int k0 = a.window > 0 ? max(0, hi - a.window + 1) : 0, k1 = hi + 1;
  int used = 1;
  if (a.splits > 1) {
    const int per = ((k1 - k0 + a.splits - 1) / a.splits + kTileKeys - 1) / kTileKeys * kTileKeys;
    used = (k1 - k0 + per - 1) / per;
    const int64_t s0 = int64_t(k0) + int64_t(split) * per;
    k0 = int(min(s0, int64_t(k1)));
    k1 = int(min(s0 + per, int64_t(k1)));
  }
  const int ntiles = (k1 - k0 + kTileKeys - 1) / kTileKeys;  // 0 for an unused split
  const int my_tiles = ntiles > warp ? (ntiles - warp + kWarps - 1) / kWarps : 0;

  const int32_t* bt = a.bt + (a.seq ? int64_t(a.seq[i]) * a.bt_stride : 0);
  const KV* kp = static_cast<const KV*>(a.kpool) + int64_t(kvh) * D;
  const KV* vp = static_cast<const KV*>(a.vpool) + int64_t(kvh) * D;
  // The warp's tile j (keys k0 + 16 (warp + 4 j) ...) into stage `st`; keys past k1 are zeros.
  // Key `skip` is left alone (load_key brings it once it may be read).
  auto load_tile = [&](int st, int j, int skip) {
    const int t0 = k0 + (warp + kWarps * j) * kTileKeys;
    if constexpr (kFp8) {
      constexpr int CH8 = D / 16;  // 16-byte chunks of codes per row
      uint8_t* kd = ring8 + st * Sm::kStage8;
      uint8_t* vd = kd + kTileKeys * Sm::LD8;
      float* sd = reinterpret_cast<float*>(vd + kTileKeys * Sm::LD8);  // K scales, V scales
#pragma unroll
      for (int e = lane; e < kTileKeys * CH8; e += 32) {
        const int jj = e / CH8, c = e % CH8, t = t0 + jj;
        const bool ok = t < k1;
        if (t == skip) continue;
        int64_t off = 0;
        if (ok) off = (int64_t(__ldg(bt + t / a.bs)) * a.bs + t % a.bs) * a.kv_dim + c * 16;
        cp_async16(kd + jj * Sm::LD8 + c * 16, kp + off, ok);
        cp_async16(vd + jj * Sm::LD8 + c * 16, vp + off, ok);
      }
      {  // lanes 0-15: the keys' K scales, 16-31 their V scales
        const int jj = lane % kTileKeys, t = t0 + jj;
        const bool ok = t < k1;
        int64_t si = 0;
        if (ok) si = (int64_t(__ldg(bt + t / a.bs)) * a.bs + t % a.bs) * gridDim.y + kvh;
        if (t != skip) cp_async4(sd + lane, (lane < kTileKeys ? a.k_scale : a.v_scale) + si, ok);
      }
    } else {
      T* kd = ring + st * kStage;
      T* vd = kd + kTileKeys * LDS;
#pragma unroll
      for (int e = lane; e < kTileKeys * CH; e += 32) {
        const int jj = e / CH, c = e % CH, t = t0 + jj;
        const bool ok = t < k1;
        if (t == skip) continue;
        int64_t off = 0;
        if (ok) off = (int64_t(__ldg(bt + t / a.bs)) * a.bs + t % a.bs) * a.kv_dim + c * 8;
        cp_async16(kd + jj * LDS + c * 8, kp + off, ok);
        cp_async16(vd + jj * LDS + c * 8, vp + off, ok);
      }
    }
  };
  // FP8: the K (kv 0) or V (kv 1) codes of stage st times their scales into the T tile `conv`
  // (zero-filled keys have codes and scales 0). Each lane turns 16-byte chunks of 16 codes into
  // two 16-byte T chunks.
  auto convert_tile = [&](int st, int kv) {
    constexpr int CH8 = D / 16;
    const uint8_t* src = ring8 + st * Sm::kStage8 + kv * kTileKeys * Sm::LD8;
    const float* sd =
        reinterpret_cast<const float*>(ring8 + st * Sm::kStage8 + 2 * kTileKeys * Sm::LD8) +
        kv * kTileKeys;
#pragma unroll
    for (int e = lane; e < kTileKeys * CH8; e += 32) {
      const int row = e / CH8, c = e % CH8;
      float f[16];
      unpack_vec<E4M3>(*reinterpret_cast<const uint4*>(src + row * Sm::LD8 + c * 16), f);
      const float sc = sd[row];
#pragma unroll
      for (int k = 0; k < 16; ++k) f[k] *= sc;
      uint4* d = reinterpret_cast<uint4*>(conv + row * LDS + c * 16);
      d[0] = pack_vec<T>(f);
      d[1] = pack_vec<T>(f + 8);
    }
  };
  // The key at the row's own position, written by this forward (rope_kv_write), into stage st
  // as row key - t0 of the tile that starts at t0: its K and V rows (FP8: and their scales).
  auto load_key = [&](int st, int t0, int key) {
    const int jj = key - t0;
    const int64_t slot = int64_t(__ldg(bt + key / a.bs)) * a.bs + key % a.bs;
    if constexpr (kFp8) {
      constexpr int CH8 = D / 16;
      uint8_t* kd = ring8 + st * Sm::kStage8;
      uint8_t* vd = kd + kTileKeys * Sm::LD8;
      float* sd = reinterpret_cast<float*>(vd + kTileKeys * Sm::LD8);
      for (int e = lane; e < 2 * CH8; e += 32) {
        const int c = e % CH8;
        cp_async16((e < CH8 ? kd : vd) + jj * Sm::LD8 + c * 16,
                   (e < CH8 ? kp : vp) + slot * a.kv_dim + c * 16, true);
      }
      if (lane < 2)
        cp_async4(sd + lane * kTileKeys + jj,
                  (lane == 0 ? a.k_scale : a.v_scale) + slot * gridDim.y + kvh, true);
    } else {
      T* kd = ring + st * kStage;
      T* vd = kd + kTileKeys * LDS;
      for (int e = lane; e < 2 * CH; e += 32) {
        const int c = e % CH;
        cp_async16((e < CH ? kd : vd) + jj * LDS + c * 8,
                   (e < CH ? kp : vp) + slot * a.kv_dim + c * 8, true);
      }
    }
  };
  // The first ST - 1 tiles, one commit group each; settled rows leave out their current key.
  const int early_skip = a.settled ? hi : INT_MIN;
#pragma unroll
  for (int st = 0; st < ST - 1; ++st) {
    if (st < my_tiles) load_tile(st, st, early_skip);
    cp_async_commit();
  }
  if (a.settled) pdl_wait();
  // Q rows (written by the step's earlier kernels) and, where a settled row's current key fell
  // in those tiles, that key: one more group, and the block waits for all of them.
  {
    const T* q = static_cast<const T*>(a.q) + int64_t(i) * a.ldq + int64_t(kvh) * group * D;
    for (int e = tid; e < kRows * CH; e += kThreads) {
      const int r = e / CH, c = e % CH;
      cp_async16(Qs + r * LDS + c * 8, q + (r < group ? r * D + c * 8 : 0), r < group);
    }
    if (a.settled) {
      const int j = (hi - k0) / kTileKeys;  // the tile of the key, if this split holds it
      if (hi >= k0 && hi < k1 && j % kWarps == warp && j / kWarps < ST - 1)
        load_key(j / kWarps, k0 + j * kTileKeys, hi);
    }
    cp_async_commit();
  }
  cp_async_wait<0>();  // this thread's Q chunks and first tiles
  __syncthreads();     // everyone's

  float o[DT][4];
#pragma unroll
  for (int d = 0; d < DT; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  const T* qw = Qs + (lane % 16) * LDS + (lane / 16) * 8;  // ldmatrix A address
  uint32_t qf[kQReg ? KS : 1][4];
  if constexpr (kQReg) {
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) ldsm_x4(qf[ks], qw + ks * 16);
  }

  for (int j = 0; j < my_tiles; ++j) {
    cp_async_wait<ST - 2>();
    __syncwarp();  // tile j visible to the warp; the stage refilled next is no longer read
    {
      const int nx = j + ST - 1;
      if (nx < my_tiles) load_tile(nx % ST, nx, INT_MIN);
      cp_async_commit();
    }
    const T* Kb = ring + (j % ST) * kStage;
    const T* Vb = Kb + kTileKeys * LDS;
    if constexpr (kFp8) {
      convert_tile(j % ST, 0);
      __syncwarp();  // the converted K visible to the warp's ldmatrix
      Kb = conv;
    }
    const int t0 = k0 + (warp + kWarps * j) * kTileKeys;

    // S = Q K^T over the tile's 16 keys (two n8 tiles).
    float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
    const T* kw = Kb + (lane % 8 + (lane / 16) * 8) * LDS + ((lane / 8) & 1) * 8;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      uint32_t qa[4];
      if constexpr (kQReg) {
        qa[0] = qf[ks][0], qa[1] = qf[ks][1], qa[2] = qf[ks][2], qa[3] = qf[ks][3];
      } else {
        ldsm_x4(qa, qw + ks * 16);
      }
      uint32_t b[4];
      ldsm_x4(b, kw + ks * 16);
      mma16816<T>(s[0], qa, b[0], b[1]);
      mma16816<T>(s[1], qa, b[2], b[3]);
    }
    // Scale (base 2), soft-cap, and mask the keys past the range (every row sees [k0, k1)).
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nt][e];
        x = a.cap_log2 > 0.0f ? a.cap_log2 * tanhf(x * a.scale_over_cap) : x * a.scale_log2;
        const int t = t0 + nt * 8 + (lane % 4) * 2 + (e & 1);
        s[nt][e] = t < k1 ? x : -INFINITY;
      }
    // Online softmax per row (the 4 threads of a quad share a row; h: rows lane/4 and +8).
    float mx[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(fmaxf(s[0][2 * h], s[0][2 * h + 1]), fmaxf(s[1][2 * h], s[1][2 * h + 1]));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
    }
    float corr[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // Every tile has at least one visible key, so the new max is finite.
      const float mn = fmaxf(m[h], mx[h]);
      corr[h] = ex2(m[h] - mn);
      m[h] = mn;
      float ps = 0.0f;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 2 * h; e < 2 * h + 2; ++e) {
          s[nt][e] = ex2(s[nt][e] - mn);
          ps += s[nt][e];
        }
      l[h] = l[h] * corr[h] + ps;
    }
#pragma unroll
    for (int d = 0; d < DT; ++d) {
      o[d][0] *= corr[0], o[d][1] *= corr[0];
      o[d][2] *= corr[1], o[d][3] *= corr[1];
    }
    // O += P V (S's accumulators are P's A fragment for the 16 keys).
    uint32_t pa[4];
    pa[0] = pack2<T>(s[0][0], s[0][1]);
    pa[1] = pack2<T>(s[0][2], s[0][3]);
    pa[2] = pack2<T>(s[1][0], s[1][1]);
    pa[3] = pack2<T>(s[1][2], s[1][3]);
    if constexpr (kFp8) {
      __syncwarp();  // every lane's K reads done
      convert_tile(j % ST, 1);
      __syncwarp();
      Vb = conv;
    }
    const T* vw = Vb + (lane % 8 + ((lane / 8) & 1) * 8) * LDS + (lane / 16) * 8;
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t b[4];
      ldsm_x4_t(b, vw + dp * 16);
      mma16816<T>(o[2 * dp], pa, b[0], b[1]);
      mma16816<T>(o[2 * dp + 1], pa, b[2], b[3]);
    }
  }

  // The warp's partial (unnormalised O, max, sum) into its own ring, now idle.
  cp_async_wait<0>();
  __syncwarp();
  float* part = reinterpret_cast<float*>(region);  // [kRows][LDP]
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float t = l[h];
    t += __shfl_xor_sync(0xffffffffu, t, 1);
    t += __shfl_xor_sync(0xffffffffu, t, 2);
    const int r = lane / 4 + 8 * h;
    if (lane % 4 == 0) s_m[warp][r] = m[h], s_l[warp][r] = t;
#pragma unroll
    for (int d = 0; d < DT; ++d)
      *reinterpret_cast<float2*>(part + r * LDP + d * 8 + (lane % 4) * 2) =
          make_float2(o[d][2 * h], o[d][2 * h + 1]);
  }
  __syncthreads();
  // Per row: M = max over warps, the warps' weights 2^(m_w - M), and L = sum l_w 2^(m_w - M).
  if (tid < kRows) {
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, s_m[w][tid]);
    float L = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float f = s_m[w][tid] == -INFINITY ? 0.0f : ex2(s_m[w][tid] - M);
      s_w[w][tid] = f;
      L += s_l[w][tid] * f;
    }
    s_m[0][tid] = M;  // (read again only after the next barrier)
    // One split: the sink joins here; else once, in the merge below.
    if (a.splits == 1 && tid < group) L += sink_term(a.sinks, kvh * group + tid, M);
    s_inv[tid] = L;
  }
  __syncthreads();
  const float* parts = reinterpret_cast<const float*>(regions);
  auto merged = [&](int r, int d) {
    float acc = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) acc += s_w[w][r] * parts[w * Sm::kWarpBytes / 4 + r * LDP + d];
    return acc;
  };
  const int h0 = kvh * group;
  if (a.splits == 1) {
    T* out = static_cast<T*>(a.out) + int64_t(i) * a.ldo + int64_t(h0) * D;
    for (int e = tid; e < group * CH; e += kThreads) {
      const int r = e / CH, c = e % CH;
      const float L = s_inv[r], inv = L > 0.0f ? 1.0f / L : 0.0f;
      float f[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) f[k] = merged(r, c * 8 + k) * inv;
      *reinterpret_cast<uint4*>(out + r * D + c * 8) = pack_vec<T>(f);
    }
    return;
  }
  if (split < used) {
    for (int e = tid; e < group * D; e += kThreads) {
      const int r = e / D, d = e % D;
      float* w = a.ws + ((int64_t(i) * a.heads + h0 + r) * a.splits + split) * WS;
      w[d] = merged(r, d);
      if (d == 0) w[D] = s_m[0][r], w[D + 1] = s_inv[r];
    }
  }

  // Split merge by the last of the row's splits to finish: each block publishes its partials
  // (fence, then count); the last sees every other block's writes after its own fence and reads
  // them past L1 (__ldcg), which may hold lines of an earlier launch.
  __shared__ bool s_last;
  __shared__ float s_sw[kRows][kMaxSplits];
  __threadfence();
  __syncthreads();
  int* counter = a.counters + int64_t(i) * gridDim.y + kvh;
  if (tid == 0) s_last = atomicAdd(counter, 1) == a.splits - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  {  // 8 threads per row: the splits' weights and the normaliser
    const int r = tid / 8, p = tid % 8;
    const float* w = a.ws + (int64_t(i) * a.heads + h0 + r) * a.splits * WS;
    const bool ok = r < group;
    float M = -INFINITY, L = 0.0f;
    if (ok)
      for (int sp = p; sp < used; sp += 8) M = fmaxf(M, __ldcg(w + sp * WS + D));
#pragma unroll
    for (int x = 1; x < 8; x <<= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, x));
    if (ok)
      for (int sp = p; sp < used; sp += 8) {
        const float ms = __ldcg(w + sp * WS + D);
        const float f = ms == -INFINITY ? 0.0f : ex2(ms - M);
        s_sw[r][sp] = f;
        L += __ldcg(w + sp * WS + D + 1) * f;
      }
#pragma unroll
    for (int x = 1; x < 8; x <<= 1) L += __shfl_xor_sync(0xffffffffu, L, x);
    if (ok) L += sink_term(a.sinks, h0 + r, M);
    if (p == 0) s_inv[r] = L > 0.0f ? 1.0f / L : 0.0f;
  }
  __syncthreads();
  T* out = static_cast<T*>(a.out) + int64_t(i) * a.ldo + int64_t(h0) * D;
  for (int e = tid; e < group * CH; e += kThreads) {
    const int r = e / CH, c = e % CH;
    const float* w = a.ws + (int64_t(i) * a.heads + h0 + r) * a.splits * WS + c * 8;
    float f[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (int sp = 0; sp < used; ++sp) {
      const float x = s_sw[r][sp];
      const float4 u = __ldcg(reinterpret_cast<const float4*>(w + sp * WS));
      const float4 v = __ldcg(reinterpret_cast<const float4*>(w + sp * WS + 4));
      f[0] += x * u.x, f[1] += x * u.y, f[2] += x * u.z, f[3] += x * u.w;
      f[4] += x * v.x, f[5] += x * v.y, f[6] += x * v.z, f[7] += x * v.w;
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) f[k] *= s_inv[r];
    *reinterpret_cast<uint4*>(out + r * D + c * 8) = pack_vec<T>(f);
  }
  if (tid == 0) *counter = 0;  // ready for the next launch
}

int plan_splits(const AttnLaunch& a, int num_sms) {
  const int64_t blocks = a.n * a.kv_heads;
  const int64_t target = int64_t(kBlocksPerSm) * num_sms;
  if (blocks == 0 || blocks >= target || a.kv_len <= 0) return 1;
  const int64_t keys = a.window > 0 ? std::min(a.window, a.kv_len) : a.kv_len;
  const int64_t want = (target + blocks - 1) / blocks;
  const int64_t most = (keys + kTileKeys - 1) / kTileKeys;  // >= 1 tile per split
  return int(std::max<int64_t>(1, std::min({want, most, int64_t(kMaxSplits)})));
}

template <typename T, typename KV, int D>
void launch(const DecArgs& g, int64_t kv_heads, cudaStream_t s) {
  constexpr size_t smem = smem_bytes<T, KV, D>();
  allow_dynamic_smem(reinterpret_cast<const void*>(attn_decode_kernel<T, KV, D>), smem);
  const dim3 grid(unsigned(g.n), unsigned(kv_heads), unsigned(g.splits));
  launch_kernel(attn_decode_kernel<T, KV, D>, grid, dim3(kThreads), smem, s, g);
}

template <typename T, typename KV>
void launch_d(int64_t D, const DecArgs& g, int64_t kv_heads, cudaStream_t s) {
  switch (D) {
    case 64:
      return launch<T, KV, 64>(g, kv_heads, s);
    case 80:
      return launch<T, KV, 80>(g, kv_heads, s);
    case 96:
      return launch<T, KV, 96>(g, kv_heads, s);
    case 128:
      return launch<T, KV, 128>(g, kv_heads, s);
    default:
      return launch<T, KV, 256>(g, kv_heads, s);
  }
}

}  // namespace

bool attention_decode_supported(DType act, const AttnLaunch& a) {
  if (!attention_tc_enabled()) return false;
  if (act != DType::F16 && act != DType::BF16) return false;
  const int64_t D = a.head_dim;
  if (D != 64 && D != 80 && D != 96 && D != 128 && D != 256) return false;
  if (a.n <= 0 || a.kv_heads <= 0 || a.heads % a.kv_heads != 0 || a.block_size <= 0) return false;
  if (a.heads / a.kv_heads > kRows || a.kv_heads > 65535 || a.n >= INT_MAX) return false;
  if (a.kv_dim < a.kv_heads * D || a.n * a.heads >= INT_MAX || a.block_size >= INT_MAX)
    return false;
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (!aligned(a.q) || !aligned(a.out) || !aligned(a.kpool) || !aligned(a.vpool)) return false;
  if (a.k_scale && (!a.v_scale || a.kv_dim % 16 != 0)) return false;  // FP8: 16 codes a chunk
  return a.ldq % 8 == 0 && a.ldo % 8 == 0 && a.kv_dim % 8 == 0;
}

size_t attention_decode_workspace(const AttnLaunch& a, int num_sms) {
  const int splits = plan_splits(a, num_sms);
  return splits > 1 ? size_t(a.n * a.heads) * size_t(splits) * size_t(a.head_dim + 4) * 4 : 0;
}

size_t attention_decode_counters(const AttnLaunch& a, int num_sms) {
  return plan_splits(a, num_sms) > 1 ? size_t(a.n * a.kv_heads) : 0;
}

void attention_decode(DType act, const AttnLaunch& a, float* ws, int* counters, int num_sms,
                      cudaStream_t s) {
  KILN_CHECK(attention_decode_supported(act, a),
             "attention: decode kernel given a launch it "
             "does not take");
  const int splits = plan_splits(a, num_sms);
  KILN_CHECK(splits == 1 || (ws && counters), "attention: split-K workspace missing");
  const float log2e = 1.4426950408889634f;
  const DecArgs g{a.q,
                  a.ldq,
                  int(a.n),
                  int(a.heads),
                  int(a.heads / a.kv_heads),
                  a.pos,
                  a.seq,
                  a.bt_stride,
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
                  a.window > 0 && a.window < INT_MAX ? int(a.window) : 0,
                  splits,
                  a.out,
                  a.ldo,
                  ws,
                  counters,
                  a.sinks,
                  a.settled};
  if (a.k_scale) {
    if (act == DType::BF16) return launch_d<__nv_bfloat16, E4M3>(a.head_dim, g, a.kv_heads, s);
    return launch_d<__half, E4M3>(a.head_dim, g, a.kv_heads, s);
  }
  if (act == DType::BF16)
    return launch_d<__nv_bfloat16, __nv_bfloat16>(a.head_dim, g, a.kv_heads, s);
  launch_d<__half, __half>(a.head_dim, g, a.kv_heads, s);
}

}  // namespace kiln::cuda
