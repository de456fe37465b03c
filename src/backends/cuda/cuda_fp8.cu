// FP8 activation quantization and the FP8 tensor-core GEMV (cuda_fp8.h).
#include <cuda_fp8.h>

#include <algorithm>
#include <climits>

#include "backends/cuda/cuda_common.h"
#include "backends/cuda/cuda_fp8.h"
#include "backends/cuda/cuda_mma.h"
#include "core/quant.h"

namespace kiln::cuda {

namespace {

constexpr int kQuantThreads = 256;

// Two floats to two E4M3 codes (cvt.rn.satfinite.e4m3x2.f32: nearest even, saturating, NaN to
// NaN), the low byte from `a`.
__device__ __forceinline__ uint32_t to_e4m3x2(float a, float b) {
  return uint32_t(__nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3));
}

// Eight values times `inv` to eight E4M3 codes, in order.
__device__ __forceinline__ uint2 to_e4m3x8(const float* f, float inv) {
  return make_uint2(to_e4m3x2(f[0] * inv, f[1] * inv) | to_e4m3x2(f[2] * inv, f[3] * inv) << 16,
                    to_e4m3x2(f[4] * inv, f[5] * inv) | to_e4m3x2(f[6] * inv, f[7] * inv) << 16);
}

// One block per row: the row's max |x|, then its codes. Vec: 8 elements (16 bytes) at a time.
template <typename T, bool Vec>
__global__ void __launch_bounds__(kQuantThreads)
    quant_act_fp8_kernel(const T* x, int64_t ldx, int in, uint8_t* __restrict__ q, int64_t ldq,
                         float* __restrict__ scales) {
  pdl_begin();
  const T* xr = x + int64_t(blockIdx.x) * ldx;
  uint8_t* qr = q + int64_t(blockIdx.x) * ldq;
  const int step = Vec ? 8 : 1;
  float amax = 0.0f;
  for (int c = int(threadIdx.x) * step; c < in; c += int(blockDim.x) * step) {
    if constexpr (Vec) {
      float f[8];
      unpack_vec<T>(*reinterpret_cast<const uint4*>(xr + c), f);
#pragma unroll
      for (int e = 0; e < 8; ++e) amax = fmaxf(amax, fabsf(f[e]));
    } else {
      amax = fmaxf(amax, fabsf(to_f(xr[c])));
    }
  }
  __shared__ float red[kQuantThreads / 32];
  amax = warp_max(amax);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = amax;
  __syncthreads();
  amax = 0.0f;
  for (int k = 0; k < int(blockDim.x) / 32; ++k) amax = fmaxf(amax, red[k]);
  // fmaxf drops NaNs, but a NaN element still converts to a NaN code below; an infinity makes
  // every code NaN (inf * 0, inf * inf) as the CPU's row of NaNs.
  const bool tiny = amax < kFp8TinyRow;  // zeros (core/quant.h)
  const float inv = tiny ? 0.0f : kE4M3Max / amax;
  if (threadIdx.x == 0) scales[blockIdx.x] = tiny ? 0.0f : amax / kE4M3Max;
  for (int c = int(threadIdx.x) * step; c < in; c += int(blockDim.x) * step) {
    if constexpr (Vec) {
      float f[8];
      unpack_vec<T>(*reinterpret_cast<const uint4*>(xr + c), f);
      *reinterpret_cast<uint2*>(qr + c) = tiny ? make_uint2(0u, 0u) : to_e4m3x8(f, inv);
    } else {
      qr[c] = tiny ? 0 : uint8_t(to_e4m3x2(to_f(xr[c]) * inv, 0.0f) & 0xffu);
    }
  }
}

template <typename T>
void launch_quant(const QuantActFp8Params& p, cudaStream_t s) {
  const auto a16 = [](const void* v) { return reinterpret_cast<uintptr_t>(v) % 16 == 0; };
  const bool vec = p.in % 8 == 0 && p.ldx % 8 == 0 && p.ldq % 8 == 0 && a16(p.x) &&
                   reinterpret_cast<uintptr_t>(p.codes) % 8 == 0;
  const unsigned threads =
      unsigned(std::clamp<int64_t>((p.in / (vec ? 8 : 1) + 31) / 32 * 32, 32, kQuantThreads));
  if (vec)
    launch_kernel(quant_act_fp8_kernel<T, true>, unsigned(p.n), threads, 0, s,
                  static_cast<const T*>(p.x), p.ldx, int(p.in), p.codes, p.ldq, p.scales);
  else
    launch_kernel(quant_act_fp8_kernel<T, false>, unsigned(p.n), threads, 0, s,
                  static_cast<const T*>(p.x), p.ldx, int(p.in), p.codes, p.ldq, p.scales);
}

// ---- KV cache write ----

constexpr int kKvWarps = 4;  // (token, head) pairs per block

template <typename T>
__global__ void __launch_bounds__(kKvWarps * 32) kv_write_fp8_kernel(const KvWriteFp8Params p) {
  pdl_begin();
  const int lane = int(threadIdx.x) % 32;
  const int64_t heads = p.kv_dim / p.head_dim;
  const int64_t task = int64_t(blockIdx.x) * kKvWarps + threadIdx.x / 32;
  if (task >= p.n * heads) return;
  const int64_t i = task / heads, h = task % heads;
  const int64_t slot = cache_slot(p.block_table, p.block_size, p.seq, p.bt_stride, p.pos, i);
  const int hd = int(p.head_dim);
#pragma unroll
  for (int kv = 0; kv < 2; ++kv) {
    const T* x = static_cast<const T*>(kv ? p.v : p.k) + i * p.ld + h * hd;
    uint8_t* q = (kv ? p.vpool : p.kpool) + slot * p.kv_dim + h * hd;
    float amax = 0.0f;
    for (int d = lane; d < hd; d += 32) amax = fmaxf(amax, fabsf(to_f(x[d])));
    amax = warp_max(amax);
    // As quant_act_fp8_kernel: NaN elements give NaN codes; an infinity makes inv 0 and the
    // scale infinite, so every dequantized value is NaN (0 * inf).
    const bool tiny = amax < kFp8TinyRow;
    const float inv = tiny ? 0.0f : kE4M3Max / amax;
    if (lane == 0) (kv ? p.v_scale : p.k_scale)[slot * heads + h] = tiny ? 0.0f : amax / kE4M3Max;
    for (int d = lane; d < hd; d += 32)
      q[d] = tiny ? 0 : uint8_t(to_e4m3x2(to_f(x[d]) * inv, 0.0f) & 0xffu);
  }
}

// ---- GEMV ----

constexpr int kWarps = 8;  // one 64-input step of each tile apiece

__device__ __forceinline__ void mma_e4m3(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Every token's scale (max |x| / 448) and reciprocal (448 / max |x|), 0 for tiny rows, into
// shared scale[] / inv[]: the block reads all n * in activations (vectors of 8).
template <typename T>
__device__ __forceinline__ void token_scales(const T* x, int64_t ld, int n, int in, float* scale,
                                             float* inv) {
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  float m[kGemvFp8MaxRows];
#pragma unroll
  for (int k = 0; k < kGemvFp8MaxRows; ++k) m[k] = 0.0f;
  const int vecs = in / 8;
  for (int i = int(threadIdx.x); i < n * vecs; i += int(blockDim.x)) {
    const int tok = i / vecs, c = (i % vecs) * 8;
    float f[8];
    unpack_vec<T>(*reinterpret_cast<const uint4*>(x + tok * ld + c), f);
    float v = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) v = fmaxf(v, fabsf(f[e]));
#pragma unroll
    for (int k = 0; k < kGemvFp8MaxRows; ++k)
      if (k == tok) m[k] = fmaxf(m[k], v);
  }
  __shared__ float red[kWarps][kGemvFp8MaxRows];
#pragma unroll
  for (int k = 0; k < kGemvFp8MaxRows; ++k) {
    const float v = warp_max(m[k]);
    if (lane == 0) red[warp][k] = v;
  }
  __syncthreads();
  if (threadIdx.x < kGemvFp8MaxRows) {
    float amax = 0.0f;
    for (int k = 0; k < kWarps; ++k) amax = fmaxf(amax, red[k][threadIdx.x]);
    const bool tiny = amax < kFp8TinyRow;
    scale[threadIdx.x] = tiny ? 0.0f : amax / kE4M3Max;
    inv[threadIdx.x] = tiny ? 0.0f : kE4M3Max / amax;
  }
  __syncthreads();
}

// Sums the warps' accumulators and writes y = sum * st[token] * sw[row] (+ bias). The mma's C
// fragment: c0, c1 at (row g, tokens 2t, 2t + 1), c2, c3 at row g + 8. Gated (inter > 0): tile
// rows 0-7 are gate rows j0.., 8-15 the matching up rows inter + j0..; both go to y (gu) rounded
// to T, and gated[token, j] = act(gate) * up from those rounded values, as gated_act would.
template <typename T>
__device__ __forceinline__ void store_rows(const float (&c)[4], int warp, int g, int t, int row0,
                                           int n, int out, const float* st,
                                           const float* __restrict__ sw,
                                           const float* __restrict__ bias, T* __restrict__ y,
                                           int64_t ldy, int inter, T* __restrict__ gated, int act,
                                           bool y_f32) {
  __shared__ float red_c[kWarps][16][8];
  red_c[warp][g][2 * t] = c[0];
  red_c[warp][g][2 * t + 1] = c[1];
  red_c[warp][g + 8][2 * t] = c[2];
  red_c[warp][g + 8][2 * t + 1] = c[3];
  __syncthreads();
  if (inter > 0) {
    for (int i = int(threadIdx.x); i < 8 * 8; i += int(blockDim.x)) {
      const int r = i / 8, tok = i % 8, j = row0 + r;
      if (tok >= n || j >= inter) continue;
      float sg = 0.0f, su = 0.0f;
#pragma unroll
      for (int k = 0; k < kWarps; ++k) sg += red_c[k][r][tok], su += red_c[k][r + 8][tok];
      const T gt = from_f<T>(sg * st[tok] * sw[j] + (bias ? bias[j] : 0.0f));
      const T ut = from_f<T>(su * st[tok] * sw[inter + j] + (bias ? bias[inter + j] : 0.0f));
      y[tok * ldy + j] = gt;
      y[tok * ldy + inter + j] = ut;
      gated[int64_t(tok) * inter + j] = from_f<T>(apply_gated(to_f(gt), to_f(ut), act));
    }
    return;
  }
  for (int i = int(threadIdx.x); i < 16 * 8; i += int(blockDim.x)) {
    const int r = i / 8, tok = i % 8, row = row0 + r;
    if (tok >= n || row >= out) continue;
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < kWarps; ++k) s += red_c[k][r][tok];
    store_y(y, tok * ldy + row, s * st[tok] * sw[row] + (bias ? bias[row] : 0.0f), y_f32);
  }
}

// Block: 16 output rows. Its weight rows go through shared memory in tiles of kTileK inputs,
// copied with cp.async in whole 512-byte row runs (coalesced), kStages tiles in flight; each of
// the kWarps warps then takes one 64-input step of a tile. Lane (g, t) = (lane / 4, lane % 4)
// reads the 16 bytes at input 64 * step + 16 t of rows g and g + 8 and the 16 activation codes
// of token g there. In the mma's fragments (PTX m16n8k32, 8-bit types) that lane holds A rows g
// and g + 8 and B column g at the same 8 k-slots per mma, so feeding it those bytes computes the
// same dot products over a permuted k: words 0-1 go to the first mma, words 2-3 to the second.
// Rows are padded by 64 bytes so the 8 lanes of a shared-memory phase hit distinct banks.
//
// Fused: x is the 16-bit activations; each block finds every token's max |x| itself and
// quantizes the 16 values it feeds the mma (the codes quant_act_fp8 would write), which saves
// the separate quantization kernel, a launch and a round trip through memory for small n * in.
//
// Measured on the H100 (docs/perf.md): an earlier form that loaded each lane's 16 bytes straight
// from global memory (64-byte pieces of 8 rows per warp load, 122 registers) read the weights at
// half the copy bandwidth; this one decodes 1.26x faster at batch 1.
//
// Gated (inter > 0, cuda_fp8.h): a block takes 8 gate rows and their 8 up rows, so one thread
// ends up with both halves of an output and applies the activation in the store.
//
// Stages (tiles in flight + 1): the H100 (docs/perf.md, `3efe2a6`) read Llama-3.1-8B's down
// projection (14336 inputs, 256 blocks, two an SM) at 1.9 TB/s with 4 and 2.5 TB/s with 8,
// while 8 made the shorter or wider products slower (qkv 1.9 -> 1.45, gate_up 2.8 -> 2.0 TB/s:
// fewer blocks fit an SM, each with a longer ramp). So 8 only where rows are long and the grid
// small (stages_for), 4 elsewhere.
constexpr int kTileK = 512, kPitch = kTileK + 64;
constexpr size_t kTileBytes = size_t(16) * kPitch;
constexpr size_t smem_bytes(int stages) {
  return size_t(stages) * kTileBytes;
}
static_assert(kTileK / 64 == kWarps, "one 64-input step per warp per tile");

template <typename T, bool Fused, int kStages>
__global__ void __launch_bounds__(kWarps * 32)
    gemv_fp8_kernel(const void* xv, int64_t ldq, const float* sx_in, int n,
                    const uint8_t* __restrict__ w, const float* __restrict__ sw, int in, int out,
                    const float* __restrict__ bias, T* __restrict__ y, int64_t ldy, int inter,
                    T* __restrict__ gated, int act, bool y_f32) {
  pdl_trigger();
  extern __shared__ __align__(16) uint8_t stage_mem[];  // kStages tiles of 16 rows * kPitch bytes
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, g = lane / 4, t = lane % 4;
  const int row0 = int(blockIdx.x) * (inter > 0 ? 8 : 16), tiles = (in + kTileK - 1) / kTileK;
  // The weight row behind tile row r; rows past the end read the last row and are never stored.
  const auto tile_row = [&](int r) {
    if (inter == 0) return min(row0 + r, out - 1);
    const int j = min(row0 + (r & 7), inter - 1);
    return r < 8 ? j : inter + j;
  };
  const auto issue = [&](int kt) {
    uint8_t* st = stage_mem + (kt % kStages) * kTileBytes;
    for (int i = int(threadIdx.x); i < 16 * (kTileK / 16); i += kWarps * 32) {
      const int r = i / (kTileK / 16), c = (i % (kTileK / 16)) * 16, col = kt * kTileK + c;
      const bool ok = kt < tiles && col < in;
      // Past `in`: zeros.
      const uint8_t* src = w + int64_t(tile_row(r)) * in + (ok ? col : 0);
      cp_async16(st + r * kPitch + c, src, ok);
    }
    cp_async_commit();
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue(s);
  pdl_wait();  // the weights do not depend on the previous kernel; the activations do

  __shared__ float scale[8], inv[8];
  if constexpr (Fused) token_scales<T>(static_cast<const T*>(xv), ldq, n, in, scale, inv);
  const float my_inv = Fused ? inv[g] : 0.0f;
  const bool has_x = g < n;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  // This lane's activations for a tile: raw loads first (in flight during the mmas before), codes
  // when used.
  struct XRaw {
    uint4 a, b;
  };
  const auto x_raw = [&](int kt) -> XRaw {
    const int col = kt * kTileK + warp * 64 + t * 16;
    if (!has_x || kt >= tiles || col >= in) return {zero, zero};
    if constexpr (Fused) {
      const uint4* p =
          reinterpret_cast<const uint4*>(static_cast<const T*>(xv) + int64_t(g) * ldq + col);
      return {ld_act(p), ld_act(p + 1)};
    } else {
      return {
          ld_act(reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(xv) + g * ldq + col)),
          zero};
    }
  };
  const auto x_codes = [&](const XRaw& r) -> uint4 {
    if constexpr (Fused) {
      float f[16];
      unpack_vec<T>(r.a, f);
      unpack_vec<T>(r.b, f + 8);
      const uint2 lo = to_e4m3x8(f, my_inv), hi = to_e4m3x8(f + 8, my_inv);
      return make_uint4(lo.x, lo.y, hi.x, hi.y);
    } else {
      return r.a;
    }
  };
  float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  XRaw xr = x_raw(0);
  for (int kt = 0; kt < tiles; ++kt) {
    cp_async_wait<kStages - 2>();  // this thread's copies of tile kt have landed
    __syncthreads();               // everyone's have; everyone is done with tile kt - 1
    issue(kt + kStages - 1);       // into tile kt - 1's slot
    const XRaw next = x_raw(kt + 1);
    const uint8_t* st = stage_mem + (kt % kStages) * kTileBytes + warp * 64 + t * 16;
    const uint4 a = *reinterpret_cast<const uint4*>(st + g * kPitch);
    const uint4 b = *reinterpret_cast<const uint4*>(st + (g + 8) * kPitch);
    const uint4 xq = x_codes(xr);
    mma_e4m3(c, a.x, b.x, a.y, b.y, xq.x, xq.y);
    mma_e4m3(c, a.z, b.z, a.w, b.w, xq.z, xq.w);
    xr = next;
  }
  cp_async_wait<0>();
  store_rows<T>(c, warp, g, t, row0, n, out, Fused ? scale : sx_in, sw, bias, y, ldy, inter, gated,
                act, y_f32);
}

// CUDA-core GEMV for one token, shaped like the BF16 GEMV (cuda_gemv.cu): a block owns kCcRows
// weight rows and sweeps `in` with 16-byte loads (16 codes), consecutive threads reading
// consecutive pieces of a row; each thread issues its first two pieces of every row before
// waiting for the previous kernel, so a small matrix is wholly in flight at once. x is quantized
// to the same codes as quant_act_fp8 (the block finds max |x| itself); each code pair is decoded
// exactly (cvt.rn.f16x2.e4m3x2) and the products summed in FP32. Gated (inter > 0): kCcRows / 2
// gate rows and their up rows, as gemv_gated_kernel.
constexpr int kCcRows = 4, kCcThreads = 256;

template <typename T>
__device__ __forceinline__ void cc_chunk(float (&acc)[kCcRows], const uint4 (&wv)[kCcRows],
                                         const T* x, int c, float inv) {
  float f[16];
  const uint4* xp = reinterpret_cast<const uint4*>(x) + 2 * c;
  unpack_vec<T>(ld_act(xp), f);
  unpack_vec<T>(ld_act(xp + 1), f + 8);
  const uint2 lo = to_e4m3x8(f, inv), hi = to_e4m3x8(f + 8, inv);
  unpack_vec<E4M3>(make_uint4(lo.x, lo.y, hi.x, hi.y), f);  // the codes' values
#pragma unroll
  for (int r = 0; r < kCcRows; ++r) {
    float wf[16];
    unpack_vec<E4M3>(wv[r], wf);
#pragma unroll
    for (int e = 0; e < 16; ++e) acc[r] = fmaf(wf[e], f[e], acc[r]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kCcThreads)
    gemv_fp8_cc_kernel(const T* x, const uint8_t* __restrict__ w, const float* __restrict__ sw,
                       int in, int out, const float* __restrict__ bias, T* __restrict__ y,
                       int inter, T* __restrict__ gated, int act, bool y_f32) {
  pdl_trigger();
  constexpr int R = kCcRows, H = kCcRows / 2;
  const int row0 = int(blockIdx.x) * (inter > 0 ? H : R), chunks = in / 16, nt = blockDim.x;
  const uint4* wr[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {  // rows past the end read the last row and are never stored
    const int j = min(row0 + r % H, inter - 1);
    const int row = inter > 0 ? (r < H ? j : inter + j) : min(row0 + r, out - 1);
    wr[r] = reinterpret_cast<const uint4*>(w + int64_t(row) * in);
  }
  int c = int(threadIdx.x);
  bool ha = c < chunks, hb = c + nt < chunks;
  uint4 wa[R], wb[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (ha) wa[r] = ld_stream(wr[r] + c);
    if (hb) wb[r] = ld_stream(wr[r] + c + nt);
  }
  // The store's row factors (weight scales, bias: fixed at load), requested now rather than
  // after the reduction, where a miss would add a memory round trip to the block's end (H100,
  // tg128 of the 8B shape: fp8 256.2 -> 259.5 t/s; docs/perf.md).
  float f0 = 0.0f, f1 = 0.0f, b0 = 0.0f, b1 = 0.0f;
  if (inter > 0) {
    if (threadIdx.x < H) {
      const int j = min(row0 + int(threadIdx.x), inter - 1);
      f0 = __ldg(sw + j), f1 = __ldg(sw + inter + j);
      if (bias) b0 = __ldg(bias + j), b1 = __ldg(bias + inter + j);
    }
  } else if (threadIdx.x < R) {
    const int row = min(row0 + int(threadIdx.x), out - 1);
    f0 = __ldg(sw + row);
    if (bias) b0 = __ldg(bias + row);
  }
  pdl_wait();  // x is the previous kernel's output
  __shared__ float red[kCcThreads / 32][R];
  __shared__ float s_scale, s_inv;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, warps = nt / 32;
  {  // max |x|: the token's scale, as quant_act_fp8_kernel
    float m = 0.0f;
    for (int i = int(threadIdx.x); i < in / 8; i += nt) {
      float f[8];
      unpack_vec<T>(ld_act(reinterpret_cast<const uint4*>(x) + i), f);
#pragma unroll
      for (int e = 0; e < 8; ++e) m = fmaxf(m, fabsf(f[e]));
    }
    m = warp_max(m);
    if (lane == 0) red[warp][0] = m;
    __syncthreads();
    if (threadIdx.x == 0) {
      float amax = 0.0f;
      for (int k = 0; k < warps; ++k) amax = fmaxf(amax, red[k][0]);
      const bool tiny = amax < kFp8TinyRow;
      s_scale = tiny ? 0.0f : amax / kE4M3Max;
      s_inv = tiny ? 0.0f : kE4M3Max / amax;
    }
    __syncthreads();
  }
  const float inv = s_inv;
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.0f;
  while (ha) {
    cc_chunk<T>(acc, wa, x, c, inv);
    if (hb) cc_chunk<T>(acc, wb, x, c + nt, inv);
    c += 2 * nt;
    ha = c < chunks, hb = c + nt < chunks;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (ha) wa[r] = ld_stream(wr[r] + c);
      if (hb) wb[r] = ld_stream(wr[r] + c + nt);
    }
  }
  __syncthreads();  // red[] is reused
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float v = warp_sum(acc[r]);
    if (lane == 0) red[warp][r] = v;
  }
  __syncthreads();
  const float st = s_scale;
  if (inter > 0) {
    if (threadIdx.x < H) {
      const int r = int(threadIdx.x), j = row0 + r;
      float g = 0.0f, u = 0.0f;
      for (int k = 0; k < warps; ++k) g += red[k][r], u += red[k][r + H];
      if (j < inter) {
        const T gt = from_f<T>(g * st * f0 + b0);
        const T ut = from_f<T>(u * st * f1 + b1);
        y[j] = gt;
        y[inter + j] = ut;
        gated[j] = from_f<T>(apply_gated(to_f(gt), to_f(ut), act));
      }
    }
  } else if (threadIdx.x < R) {
    const int r = int(threadIdx.x), row = row0 + r;
    float v = 0.0f;
    for (int k = 0; k < warps; ++k) v += red[k][r];
    if (row < out) store_y(y, row, v * st * f0 + b0, y_f32);
  }
}

template <typename T>
void launch_gemv_cc(const GemvFp8Params& p, cudaStream_t s) {
  const int64_t chunks = p.in / 16;
  // Two pieces of a row per thread in the first pass where `in` allows.
  const unsigned threads =
      unsigned(std::clamp<int64_t>((chunks / 2 + 31) / 32 * 32, 32, kCcThreads));
  const int inter = p.gated ? int(p.out / 2) : 0;
  const unsigned blocks = unsigned(p.gated ? (inter + kCcRows / 2 - 1) / (kCcRows / 2)
                                           : (p.out + kCcRows - 1) / kCcRows);
  launch_kernel(gemv_fp8_cc_kernel<T>, blocks, threads, 0, s, static_cast<const T*>(p.x), p.w, p.sw,
                int(p.in), int(p.out), p.bias, static_cast<T*>(p.y), inter,
                static_cast<T*>(p.gated), p.gated_act, p.y_f32);
}

template <typename T, bool Fused, int Stages>
void launch_gemv(const GemvFp8Params& p, const void* x, int64_t ld, cudaStream_t s) {
  auto* kernel = gemv_fp8_kernel<T, Fused, Stages>;
  allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem_bytes(Stages));
  const int inter = p.gated ? int(p.out / 2) : 0;
  const unsigned blocks = unsigned(p.gated ? (inter + 7) / 8 : (p.out + 15) / 16);
  launch_kernel(kernel, blocks, kWarps * 32, smem_bytes(Stages), s, x, ld, p.sx, int(p.n), p.w,
                p.sw, int(p.in), int(p.out), p.bias, static_cast<T*>(p.y), p.ldy, inter,
                static_cast<T*>(p.gated), p.gated_act, p.y_f32);
}

// 8 stages for rows of 16 tiles or more on a grid of at most 4 blocks an SM, else 4 (above).
int stages_for(const GemvFp8Params& p) {
  int sms = p.sms;
  if (sms <= 0) {
    int dev = 0;
    KILN_CUDA_CHECK(cudaGetDevice(&dev));
    KILN_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  }
  const int64_t tiles = (p.in + kTileK - 1) / kTileK, blocks = (p.out + 15) / 16;
  return tiles >= 16 && blocks <= 4 * int64_t(sms) ? 8 : 4;
}

template <typename T, bool Fused>
void launch_gemv(const GemvFp8Params& p, const void* x, int64_t ld, cudaStream_t s) {
  if (stages_for(p) == 8) return launch_gemv<T, Fused, 8>(p, x, ld, s);
  launch_gemv<T, Fused, 4>(p, x, ld, s);
}

template <typename T>
void launch_gemv(const GemvFp8Params& p, cudaStream_t s) {
  if (p.cuda_cores && p.xq == nullptr && p.n == 1) return launch_gemv_cc<T>(p, s);
  if (p.xq == nullptr)
    launch_gemv<T, true>(p, p.x, p.ldx, s);
  else
    launch_gemv<T, false>(p, p.xq, p.ldq, s);
}

}  // namespace

void quant_act_fp8_launch(const QuantActFp8Params& p, cudaStream_t s) {
  KILN_CHECK(p.act == DType::F16 || p.act == DType::BF16,
             "quant_act_fp8: the activation type must be F16 or BF16");
  KILN_CHECK(p.in > 0 && p.in <= INT_MAX && p.ldq >= p.in && p.n <= INT_MAX,
             "quant_act_fp8: bad shape (n ", p.n, ", in ", p.in, ")");
  if (p.n == 0) return;
  if (p.act == DType::BF16)
    launch_quant<__nv_bfloat16>(p, s);
  else
    launch_quant<__half>(p, s);
}

bool gemv_fp8_is_supported(const GemvFp8Params& p) {
  if (p.act != DType::F16 && p.act != DType::BF16) return false;
  if (p.n < 1 || p.n > kGemvFp8MaxRows || p.out < 1 || p.in < 16 || p.in > INT_MAX ||
      p.out > INT_MAX || !p.sw || (p.gated && (p.out % 2 != 0 || p.ldy < p.out || p.y_f32)))
    return false;
  const auto a16 = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  if (p.in % 16 != 0 || !a16(p.w)) return false;
  if (p.xq) return p.ldq % 16 == 0 && a16(p.xq) && p.sx;
  return p.x && (p.ldx * 2) % 16 == 0 && a16(p.x);  // fused: 16-bit rows, 16-byte aligned
}

void gemv_fp8_launch(const GemvFp8Params& p, cudaStream_t s) {
  KILN_CHECK(gemv_fp8_is_supported(p), "gemv_fp8: unsupported shape or alignment (n ", p.n, ", in ",
             p.in, ")");
  if (p.act == DType::BF16)
    launch_gemv<__nv_bfloat16>(p, s);
  else
    launch_gemv<__half>(p, s);
}

bool kv_write_fp8_is_supported(const KvWriteFp8Params& p) {
  return p.k && p.v && p.kpool && p.vpool && p.k_scale && p.v_scale && p.head_dim > 0 &&
         p.kv_dim % p.head_dim == 0 && p.n >= 0 &&
         p.n * (p.kv_dim / p.head_dim) / kKvWarps < INT_MAX;
}

void kv_write_fp8_launch(const KvWriteFp8Params& p, cudaStream_t s) {
  KILN_CHECK(kv_write_fp8_is_supported(p), "kv_write_fp8: bad operands (n ", p.n, ", kv_dim ",
             p.kv_dim, ", head_dim ", p.head_dim, ")");
  const int64_t tasks = p.n * (p.kv_dim / p.head_dim);
  if (tasks == 0) return;
  const unsigned blocks = unsigned((tasks + kKvWarps - 1) / kKvWarps);
  KILN_DISPATCH_ACT(p.act, launch_kernel(kv_write_fp8_kernel<T>, blocks, kKvWarps * 32, 0, s, p));
}

}  // namespace kiln::cuda
