// Int4 weight-only GEMV and dequantization (cuda_gemv_w4.h). The CUDA-core GEMV is shaped like
// the int8 one (cuda_gemv_w8.cu): 256 threads own 4 output rows and sweep `in` with 16-byte weight
// loads (32 codes each), streamed past L1. The tensor-core GEMV (groups of 128k codes) follows it.
#include <algorithm>
#include <climits>

#include "backends/cuda/cuda_common.h"
#include "backends/cuda/cuda_gemv_w4.h"
#include "backends/cuda/cuda_mma.h"

namespace kiln::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kRows = 4;

// The 8 codes of `w` (columns 0..7: byte k holds columns 2k and 2k + 1) minus the zero point, as
// floats: each nibble becomes the low mantissa byte of 2^23 (0x4B000000) by a byte permute, and
// one subtraction of `bias` = 2^23 + zero leaves code - zero, exactly.
__device__ __forceinline__ void unpack_u4x8(uint32_t w, float bias, float* f) {
  const uint32_t lo = w & 0x0F0F0F0Fu, hi = (w >> 4) & 0x0F0F0F0Fu;
  f[0] = __uint_as_float(__byte_perm(lo, 0x4B000000u, 0x7440)) - bias;
  f[1] = __uint_as_float(__byte_perm(hi, 0x4B000000u, 0x7440)) - bias;
  f[2] = __uint_as_float(__byte_perm(lo, 0x4B000000u, 0x7441)) - bias;
  f[3] = __uint_as_float(__byte_perm(hi, 0x4B000000u, 0x7441)) - bias;
  f[4] = __uint_as_float(__byte_perm(lo, 0x4B000000u, 0x7442)) - bias;
  f[5] = __uint_as_float(__byte_perm(hi, 0x4B000000u, 0x7442)) - bias;
  f[6] = __uint_as_float(__byte_perm(lo, 0x4B000000u, 0x7443)) - bias;
  f[7] = __uint_as_float(__byte_perm(hi, 0x4B000000u, 0x7443)) - bias;
}

// 32 codes minus `zero`.
__device__ __forceinline__ void unpack_u4x32(const uint4& w, float zero, float* f) {
  const float bias = 8388608.0f + zero;
  unpack_u4x8(w.x, bias, f);
  unpack_u4x8(w.y, bias, f + 8);
  unpack_u4x8(w.z, bias, f + 16);
  unpack_u4x8(w.w, bias, f + 24);
}

// A thread takes one 16-byte chunk (32 codes) of each of the block's kRows rows per pass, the
// next pass's loads issued before this pass's arithmetic. The 32 codes share one group, so its
// factors apply once per chunk: s * (sum q x - z * sum x).
template <typename T, int N>
__global__ void __launch_bounds__(kThreads)
    gemv_w4_kernel(const T* __restrict__ x, int64_t ldx, const uint8_t* __restrict__ w,
                   const float* __restrict__ scales, const uint8_t* __restrict__ zeros, int in,
                   int out, int group, const float* __restrict__ bias, T* __restrict__ y,
                   int64_t ldy, bool y_f32) {
  pdl_trigger();
  const int row0 = int(blockIdx.x) * kRows, chunks = in / 32, groups = in / group;
  const int chunks_per_group = group / 32;
  float acc[N][kRows];
#pragma unroll
  for (int t = 0; t < N; ++t)
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[t][r] = 0.0f;
  int rows[kRows];
  const uint4* wr[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {  // rows past the end read the last row and are never stored
    rows[r] = min(row0 + r, out - 1);
    wr[r] = reinterpret_cast<const uint4*>(w + int64_t(rows[r]) * (in / 2));
  }
  int c = threadIdx.x;
  uint4 wa[kRows];
  if (c < chunks)
#pragma unroll
    for (int r = 0; r < kRows; ++r) wa[r] = ld_stream(wr[r] + c);
  pdl_wait();  // weights do not depend on the previous kernel; x does
  while (c < chunks) {
    const int g = c / chunks_per_group;
    float sc[kRows], zr[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      sc[r] = __ldg(scales + int64_t(rows[r]) * groups + g);
      zr[r] = float(__ldg(zeros + int64_t(rows[r]) * groups + g));
    }
    uint4 cur[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) cur[r] = wa[r];
    const int next = c + int(blockDim.x);
    if (next < chunks)
#pragma unroll
      for (int r = 0; r < kRows; ++r) wa[r] = ld_stream(wr[r] + next);
#pragma unroll
    for (int t = 0; t < N; ++t) {
      // 32 activations: four 16-byte vectors of a 16-bit type.
      const uint4* xp = reinterpret_cast<const uint4*>(x + t * ldx + int64_t(c) * 32);
      float xf[32];
#pragma unroll
      for (int v = 0; v < 4; ++v) unpack_vec<T>(ld_act(xp + v), xf + 8 * v);
      float xs = 0.0f;
#pragma unroll
      for (int e = 0; e < 32; ++e) xs += xf[e];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        float wf[32];
        unpack_u4x32(cur[r], 0.0f, wf);
        float d = 0.0f;
#pragma unroll
        for (int e = 0; e < 32; ++e) d = fmaf(wf[e], xf[e], d);
        acc[t][r] = fmaf(sc[r], d - zr[r] * xs, acc[t][r]);  // s * sum (q - z) x
      }
    }
    c = next;
  }
  __shared__ float red[kThreads / 32][N * kRows];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
#pragma unroll
  for (int t = 0; t < N; ++t)
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float v = warp_sum(acc[t][r]);
      if (lane == 0) red[warp][t * kRows + r] = v;
    }
  __syncthreads();
  if (threadIdx.x < N * kRows) {
    const int t = threadIdx.x / kRows, r = threadIdx.x % kRows, row = row0 + r;
    float s = 0;
    for (int k = 0; k < warps; ++k) s += red[k][threadIdx.x];
    if (row < out) store_y(y, t * ldy + row, s + (bias ? bias[row] : 0.0f), y_f32);
  }
}

// Tensor-core variant for groups that are whole multiples of 128 codes (Llama-class shapes: the
// int4 default group and AWQ / GPTQ's usual one). The CUDA-core kernel above spends ~3.5
// instructions a weight (a byte permute, a subtraction and an FMA each, plus x); here a weight
// costs ~1.4: nibbles become 16-bit (magic + code) values with a mask-or (lop3) per two codes,
// one exact subtraction of (magic + zero) per two, and mma.m16n8k16 does the products, x's rows
// being the B operand's columns (n <= 8).
//
// A warp owns 16 rows and steps through `in` 128 codes at a time: lane (g = lane / 4, q =
// lane % 4) loads 16 bytes of row g and of row g + 8, codes q * 32 .. q * 32 + 31 of the step.
// The mma's k order is free as long as A and B agree, so logical k of (q, i) maps to the code
// pairs the mask trick yields: of each 32-bit word (8 codes c0..c7), (c0, c4), (c1, c5), (c2,
// c6), (c3, c7); B takes x in the same pairs (byte permutes of x's words). A step lies in one
// group, so its products are summed in a fresh tile and scaled once by each row's group scale.
// The block's 8 warps split the steps; the next step's loads are issued before this step's math.
// Gated (inter > 0): rows g are gate rows j0 + g and rows g + 8 their up rows inter + j0 + g, so
// lane (g, q) holds both halves of its outputs and applies the activation in the store.
// W (warps a block) is 8, or 16 where few blocks would leave the SMs with too few bytes in
// flight (GemvW4Params::warps).
constexpr int kTcRows = 16;
// x staged in shared memory up to this many bytes (one token: 28 KiB at 14336 inputs), so four
// 8-warp blocks still fit an SM; larger x (batches) takes the kernel's plain form.
constexpr size_t kW4XsMax = 32 << 10;

template <typename T>
struct Magic;
template <>
struct Magic<__nv_bfloat16> {  // bf16 128.0: 0x4300 | c is 128 + c exactly (7 mantissa bits)
  static constexpr uint32_t bits = 0x43004300u;
  static constexpr float value = 128.0f;
};
template <>
struct Magic<__half> {  // fp16 1024.0: 0x6400 | c is 1024 + c exactly
  static constexpr uint32_t bits = 0x64006400u;
  static constexpr float value = 1024.0f;
};

__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t mask, uint32_t magic) {
  uint32_t r;  // (a & mask) | magic
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(a), "r"(mask), "r"(magic));
  return r;
}

template <typename T>
__device__ __forceinline__ uint32_t sub2(uint32_t a, uint32_t b) {  // a - b, two lanes of T
  uint32_t r;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat162 x, y;
    memcpy(&x, &a, 4), memcpy(&y, &b, 4);
    const __nv_bfloat162 z = __hsub2(x, y);
    memcpy(&r, &z, 4);
  } else {
    __half2 x, y;
    memcpy(&x, &a, 4), memcpy(&y, &b, 4);
    const __half2 z = __hsub2(x, y);
    memcpy(&r, &z, 4);
  }
  return r;
}

// The 8 codes of word w minus the zero (zm: (magic + zero) in both halves) as four registers of
// two T: (c0, c4), (c1, c5), (c2, c6), (c3, c7).
template <typename T>
__device__ __forceinline__ void codes8(uint32_t w, uint32_t zm, uint32_t (&r)[4]) {
  constexpr uint32_t m = Magic<T>::bits;
  r[0] = sub2<T>(lop3_and_or(w, 0x000F000Fu, m), zm);
  r[1] = sub2<T>(lop3_and_or(w >> 4, 0x000F000Fu, m), zm);
  r[2] = sub2<T>(lop3_and_or(w >> 8, 0x000F000Fu, m), zm);
  r[3] = sub2<T>(lop3_and_or(w >> 12, 0x000F000Fu, m), zm);
}

// x's 8 values of one word group (words X0..X3: columns (0,1) (2,3) (4,5) (6,7)) in the pairs
// of codes8: (0,4) (1,5) (2,6) (3,7).
__device__ __forceinline__ void pairs8(const uint32_t* xw, uint32_t (&r)[4]) {
  r[0] = __byte_perm(xw[0], xw[2], 0x5410);
  r[1] = __byte_perm(xw[0], xw[2], 0x7632);
  r[2] = __byte_perm(xw[1], xw[3], 0x5410);
  r[3] = __byte_perm(xw[1], xw[3], 0x7632);
}

// XS (x small enough for kW4XsMax): the block stages x once in shared memory, each 8 values
// already in pairs8's order, so a step's B fragments are 4 shared loads instead of 4 global loads
// and 16 byte permutes; and the group factors of a step are loaded with its codes, one step
// ahead, so a step waits on one memory round trip instead of two. Registers are capped at 64 to
// keep 2048 threads an SM (the factors ahead alone spilled 32 bytes and lost 7%; with x in shared
// memory nothing spills). Tensor-core GEMVs at one token, H100, tg128 of the 8B shape: int4-wo
// 312.3 -> 324.0 t/s (docs/perf.md).
template <typename T, int kTcWarps, bool XS, bool TL>
__global__ void __launch_bounds__(kTcWarps * 32, XS ? 1024 / (kTcWarps * 32) : 0)
    gemv_w4_tc_kernel(const T* __restrict__ x, int64_t ldx, int n, const uint8_t* __restrict__ w,
                      const float* __restrict__ scales, const uint8_t* __restrict__ zeros, int in,
                      int out, int group, const float* __restrict__ bias, T* __restrict__ y,
                      int64_t ldy, int inter, T* __restrict__ gated, int act, bool y_f32) {
  pdl_trigger();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  const int row0 = int(blockIdx.x) * (inter > 0 ? kTcRows / 2 : kTcRows);
  // Rows past the end read the last row and are never stored.
  const int ra = inter > 0 ? min(row0 + g, inter - 1) : min(row0 + g, out - 1);
  const int rb = inter > 0 ? inter + ra : min(row0 + g + 8, out - 1);
  const int steps = in / 128, groups = in / group, steps_per_group = group / 128;
  // TL: tiled codes (w4_tiled; rows in 16s, so row0 + g and rb are real rows): lane (g, q) reads
  // chunk q of its row in the row's 8-row tile, a warp load 512 contiguous bytes; a step is one
  // tile further (32 uint4). Row-major: 4 uint4 further.
  const uint4* wa =
      TL ? reinterpret_cast<const uint4*>(w) + (int64_t(ra / 8) * steps) * 32 + (ra % 8) * 4 + q
         : reinterpret_cast<const uint4*>(w + int64_t(ra) * (in / 2)) + q;
  const uint4* wb =
      TL ? reinterpret_cast<const uint4*>(w) + (int64_t(rb / 8) * steps) * 32 + (rb % 8) * 4 + q
         : reinterpret_cast<const uint4*>(w + int64_t(rb) * (in / 2)) + q;
  constexpr int WS = TL ? 32 : 4;
  const bool has_x = g < n;  // lane g supplies x row g as the B operand's column g
  const uint4* xr = reinterpret_cast<const uint4*>(x + int64_t(has_x ? g : 0) * ldx) + 4 * q;
  extern __shared__ uint4 xs[];  // XS: x, [n][in / 8]
  const int xvecs = in / 8;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  int s = warp;
  uint4 na, nb;  // the next step's codes (a step is 128 codes: 4 uint4 of a row, one a lane)
  float nsa = 0.0f, nsb = 0.0f, nfa = 0.0f, nfb = 0.0f;
  const auto factors = [&](int st, float& sa, float& sb, float& fa, float& fb) {
    const int gi = st / steps_per_group;
    sa = __ldg(scales + int64_t(ra) * groups + gi);
    sb = __ldg(scales + int64_t(rb) * groups + gi);
    fa = Magic<T>::value + float(__ldg(zeros + int64_t(ra) * groups + gi));
    fb = Magic<T>::value + float(__ldg(zeros + int64_t(rb) * groups + gi));
  };
  if (s < steps) {
    na = ld_stream(wa + WS * s), nb = ld_stream(wb + WS * s);
    if (XS) factors(s, nsa, nsb, nfa, nfb);
  }
  pdl_wait();  // weights do not depend on the previous kernel; x does
  if (XS) {
    for (int i = int(threadIdx.x); i < n * xvecs; i += kTcWarps * 32) {
      const int t = i / xvecs, c = i % xvecs;
      const uint4 u = ld_act(reinterpret_cast<const uint4*>(x + int64_t(t) * ldx) + c);
      const uint32_t xw[4] = {u.x, u.y, u.z, u.w};
      uint32_t r[4];
      pairs8(xw, r);
      xs[i] = make_uint4(r[0], r[1], r[2], r[3]);
    }
    __syncthreads();
  }
  for (; s < steps; s += kTcWarps) {
    const uint4 ca = na, cb = nb;
    float sa = nsa, sb = nsb, fa = nfa, fb = nfb;
    const int next = s + kTcWarps;
    if (next < steps) {
      na = ld_stream(wa + WS * next), nb = ld_stream(wb + WS * next);
      if (XS) factors(next, nsa, nsb, nfa, nfb);
    }
    uint4 xv[4];
#pragma unroll
    for (int v = 0; v < 4; ++v)
      if (XS)
        xv[v] = has_x ? xs[g * xvecs + s * 16 + 4 * q + v] : make_uint4(0, 0, 0, 0);
      else
        xv[v] = has_x ? ld_act(xr + int64_t(s) * 16 + v) : make_uint4(0, 0, 0, 0);
    if (!XS) factors(s, sa, sb, fa, fb);
    const uint32_t za = pack2<T>(fa, fa), zb = pack2<T>(fb, fb);  // magic + zero, exact
    const uint32_t aw[4] = {ca.x, ca.y, ca.z, ca.w}, bw[4] = {cb.x, cb.y, cb.z, cb.w};
    const uint32_t* xw = reinterpret_cast<const uint32_t*>(xv);
    float t[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int k = 0; k < 4; ++k) {  // word k: codes q * 32 + 8k .. + 8 of both rows
      uint32_t A[4], B[4], X[4];
      codes8<T>(aw[k], za, A);
      codes8<T>(bw[k], zb, B);
      if (XS)
        X[0] = xw[4 * k], X[1] = xw[4 * k + 1], X[2] = xw[4 * k + 2], X[3] = xw[4 * k + 3];
      else
        pairs8(xw + 4 * k, X);
      const uint32_t f0[4] = {A[0], B[0], A[1], B[1]}, f1[4] = {A[2], B[2], A[3], B[3]};
      mma16816<T>(t, f0, X[0], X[1]);
      mma16816<T>(t, f1, X[2], X[3]);
    }
    acc[0] = fmaf(t[0], sa, acc[0]);
    acc[1] = fmaf(t[1], sa, acc[1]);
    acc[2] = fmaf(t[2], sb, acc[2]);
    acc[3] = fmaf(t[3], sb, acc[3]);
  }
  // acc: rows g (0, 1) and g + 8 (2, 3), x rows 2q and 2q + 1. Sum the warps' partial tiles.
  __shared__ float red[kTcWarps][32][4];
#pragma unroll
  for (int i = 0; i < 4; ++i) red[warp][lane][i] = acc[i];
  __syncthreads();
  if (warp == 0) {
    float v[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[i] = 0.0f;
      for (int k = 0; k < kTcWarps; ++k) v[i] += red[k][lane][i];
    }
    if (inter > 0) {
      const int j = row0 + g;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int t = 2 * q + i;
        if (j >= inter || t >= n) continue;
        const T gt = from_f<T>(v[i] + (bias ? bias[j] : 0.0f));
        const T ut = from_f<T>(v[i + 2] + (bias ? bias[inter + j] : 0.0f));
        y[t * ldy + j] = gt;
        y[t * ldy + inter + j] = ut;
        gated[int64_t(t) * inter + j] = from_f<T>(apply_gated(to_f(gt), to_f(ut), act));
      }
      return;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = row0 + g + (i >= 2 ? 8 : 0), t = 2 * q + (i & 1);
      if (row < out && t < n) store_y(y, t * ldy + row, v[i] + (bias ? bias[row] : 0.0f), y_f32);
    }
  }
}

template <typename T, int W>
void launch_gemv_tc(const GemvW4Params& p, cudaStream_t s) {
  constexpr int kTcWarps = W;
  const int inter = p.gated ? int(p.out / 2) : 0;
  const unsigned blocks = unsigned(p.gated ? (inter + kTcRows / 2 - 1) / (kTcRows / 2)
                                           : (p.out + kTcRows - 1) / kTcRows);
  const size_t xs_bytes = size_t(p.n * p.in) * 2;
  const bool xs = xs_bytes <= kW4XsMax;
  const bool tl = w4_tiled(p.in, p.out, p.group);
  auto* kernel =
      xs ? (tl ? gemv_w4_tc_kernel<T, W, true, true> : gemv_w4_tc_kernel<T, W, true, false>)
         : (tl ? gemv_w4_tc_kernel<T, W, false, true> : gemv_w4_tc_kernel<T, W, false, false>);
  launch_kernel(kernel, blocks, kTcWarps * 32, xs ? xs_bytes : 0, s, static_cast<const T*>(p.x),
                p.ldx, int(p.n), p.w, p.scales, p.zeros, int(p.in), int(p.out), int(p.group),
                p.bias, static_cast<T*>(p.y), p.ldy, inter, static_cast<T*>(p.gated), p.gated_act,
                p.y_f32);
}

template <typename T, int N>
void launch_gemv(const GemvW4Params& p, cudaStream_t s) {
  const int64_t chunks = p.in / 32;
  const unsigned threads = unsigned(std::clamp<int64_t>((chunks + 31) / 32 * 32, 32, kThreads));
  const unsigned blocks = unsigned((p.out + kRows - 1) / kRows);
  launch_kernel(gemv_w4_kernel<T, N>, blocks, threads, 0, s, static_cast<const T*>(p.x), p.ldx, p.w,
                p.scales, p.zeros, int(p.in), int(p.out), int(p.group), p.bias,
                static_cast<T*>(p.y), p.ldy, p.y_f32);
}

template <typename T>
void dispatch_n(const GemvW4Params& p, cudaStream_t s) {
  switch (p.n) {
    case 1:
      return launch_gemv<T, 1>(p, s);
    case 2:
      return launch_gemv<T, 2>(p, s);
    case 3:
      return launch_gemv<T, 3>(p, s);
    case 4:
      return launch_gemv<T, 4>(p, s);
    case 5:
      return launch_gemv<T, 5>(p, s);
    case 6:
      return launch_gemv<T, 6>(p, s);
    case 7:
      return launch_gemv<T, 7>(p, s);
    default:
      return launch_gemv<T, 8>(p, s);
  }
}

// Where 16-byte chunk i of the device codes (32 codes) sits in the row-major matrix: its row and
// first column. Tiled (w4_tiled): 32 chunks a tile of 8 rows x 128 columns, chunk q of row g of
// the tile at g * 4 + q, tiles in (row block, step) order.
__device__ __forceinline__ void w4_chunk_at(int64_t i, int64_t cols, bool tiled, int64_t& row,
                                            int64_t& col) {
  if (!tiled) {
    row = i / (cols / 32), col = i % (cols / 32) * 32;
    return;
  }
  const int64_t tile = i / 32, steps = cols / 128;
  const int k = int(i % 32);
  row = tile / steps * 8 + k / 4, col = tile % steps * 128 + k % 4 * 32;
}

// 32 codes per thread: one 16-byte load, four 16-byte stores.
template <typename T>
__global__ void dequant_w4_kernel(const uint8_t* __restrict__ w, const float* __restrict__ scales,
                                  const uint8_t* __restrict__ zeros, int64_t cols, int64_t group,
                                  int64_t chunks, bool tiled, T* __restrict__ out) {
  pdl_begin();
  const int64_t groups = cols / group;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < chunks;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t row, col;
    w4_chunk_at(i, cols, tiled, row, col);
    const int64_t g = col / group;
    const float sc = scales[row * groups + g], z = float(zeros[row * groups + g]);
    float f[32];
    unpack_u4x32(__ldg(reinterpret_cast<const uint4*>(w) + i), z, f);
#pragma unroll
    for (int e = 0; e < 32; ++e) f[e] *= sc;
    uint4* o = reinterpret_cast<uint4*>(out + row * cols + col);
#pragma unroll
    for (int v = 0; v < 4; ++v) o[v] = pack_vec<T>(f + 8 * v);
  }
}

template <typename T>
void launch_dequant(const DequantW4Params& p, cudaStream_t s) {
  const int64_t chunks = p.rows * p.cols / 32;
  const unsigned blocks = unsigned(std::min<int64_t>((chunks + 255) / 256, 65535));
  launch_kernel(dequant_w4_kernel<T>, blocks, 256, 0, s, p.w, p.scales, p.zeros, p.cols, p.group,
                chunks, p.tiled, static_cast<T*>(p.out));
}

// One thread per 16-byte chunk of the tiled copy, read from its row-major place (once, at upload).
__global__ void tile_w4_kernel(const uint4* __restrict__ src, uint4* __restrict__ dst, int64_t cols,
                               int64_t chunks) {
  pdl_begin();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < chunks;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t row, col;
    w4_chunk_at(i, cols, true, row, col);
    dst[i] = src[(row * cols + col) / 32];
  }
}

bool aligned16(const void* q) {
  return reinterpret_cast<uintptr_t>(q) % 16 == 0;
}

}  // namespace

bool w4_tiled(int64_t in, int64_t out, int64_t group) {
  return group > 0 && group % 128 == 0 && in % group == 0 && out % 16 == 0;
}

void tile_w4_launch(const uint8_t* src, uint8_t* dst, int64_t rows, int64_t cols, cudaStream_t s) {
  KILN_CHECK(rows % 16 == 0 && cols % 128 == 0 && aligned16(src) && aligned16(dst),
             "tile_w4: unsupported shape or alignment (rows ", rows, ", cols ", cols, ")");
  const int64_t chunks = rows * cols / 32;
  if (chunks == 0) return;
  const unsigned blocks = unsigned(std::min<int64_t>((chunks + 255) / 256, 65535));
  launch_kernel(tile_w4_kernel, blocks, 256, 0, s, reinterpret_cast<const uint4*>(src),
                reinterpret_cast<uint4*>(dst), cols, chunks);
}

namespace {

// One thread per output element; rows of x are L2-resident (at most a few KiB).
__global__ void gather_cols_kernel(const uint16_t* __restrict__ x, int64_t ldx,
                                   const int32_t* __restrict__ perm, int in,
                                   uint16_t* __restrict__ y) {
  pdl_begin();  // x is the previous kernel's output
  const int j = int(blockIdx.x) * blockDim.x + int(threadIdx.x);
  const int64_t t = blockIdx.y;
  if (j < in) y[t * in + j] = x[t * ldx + perm[j]];
}

}  // namespace

void gather_cols_launch(const GatherColsParams& p, cudaStream_t s) {
  KILN_CHECK(p.in > 0 && p.in <= INT_MAX && p.n >= 0 && p.n <= 65535 && p.ldx >= p.in,
             "gather_cols: unsupported shape (n ", p.n, ", in ", p.in, ")");
  if (p.n == 0) return;
  launch_kernel(gather_cols_kernel, dim3(unsigned((p.in + 255) / 256), unsigned(p.n)), 256, 0, s,
                static_cast<const uint16_t*>(p.x), p.ldx, p.perm, int(p.in),
                static_cast<uint16_t*>(p.y));
}

bool gemv_w4_is_supported(const GemvW4Params& p) {
  if (p.act != DType::F16 && p.act != DType::BF16) return false;
  if (p.n < 1 || p.n > kGemvW4MaxRows || p.out < 1 || p.in < 32 || p.in > INT_MAX ||
      p.out > INT_MAX)
    return false;
  if (p.warps != 8 && p.warps != 16) return false;
  if (p.gated && (p.group % 128 != 0 || p.out % 2 != 0 || p.ldy < p.out || p.y_f32)) return false;
  return p.in % 32 == 0 && p.group >= 32 && p.group % 32 == 0 && p.in % p.group == 0 &&
         (p.ldx * 2) % 16 == 0 && aligned16(p.x) && aligned16(p.w) && p.scales && p.zeros;
}

void gemv_w4_launch(const GemvW4Params& p, cudaStream_t s) {
  KILN_CHECK(gemv_w4_is_supported(p), "gemv_w4: unsupported shape or alignment (n ", p.n, ", in ",
             p.in, ", group ", p.group, ")");
  if (p.group % 128 == 0) {  // whole 128-code steps per group: the tensor-core kernel
    if (p.warps == 16) {
      if (p.act == DType::BF16) return launch_gemv_tc<__nv_bfloat16, 16>(p, s);
      return launch_gemv_tc<__half, 16>(p, s);
    }
    if (p.act == DType::BF16) return launch_gemv_tc<__nv_bfloat16, 8>(p, s);
    return launch_gemv_tc<__half, 8>(p, s);
  }
  if (p.act == DType::BF16)
    dispatch_n<__nv_bfloat16>(p, s);
  else
    dispatch_n<__half>(p, s);
}

void dequant_w4_launch(const DequantW4Params& p, cudaStream_t s) {
  KILN_CHECK((p.act == DType::F16 || p.act == DType::BF16) && p.cols % 32 == 0 && p.group >= 32 &&
                 p.group % 32 == 0 && p.cols % p.group == 0 && aligned16(p.w) && aligned16(p.out) &&
                 (!p.tiled || (p.rows % 8 == 0 && p.cols % 128 == 0)),
             "dequant_w4: unsupported shape or alignment (cols ", p.cols, ", group ", p.group, ")");
  if (p.rows * p.cols == 0) return;
  if (p.act == DType::BF16)
    launch_dequant<__nv_bfloat16>(p, s);
  else
    launch_dequant<__half>(p, s);
}

}  // namespace kiln::cuda
