// GEMV for decode: y[n, out] = x[n, in] . W[out, in]^T with n <= 8. This is the memory-bound hot
// path of token generation: every weight byte is read once per step, so the kernel is shaped to
// keep HBM busy rather than to save arithmetic.
//  - A block of up to 256 threads owns ROWS output rows and sweeps the whole `in` dimension with
//    16-byte loads (coalesced: consecutive threads read consecutive 16-byte chunks of one weight
//    row); narrow `in` gets a narrower block so no thread idles.
//  - n <= 2: measured on the H100, this kernel beats cuBLASLt by 5-20% for one or two rows of x
//    and loses from n = 4 (the FMA work per weight byte grows with n), so larger n goes to
//    cuBLASLt.
//  - Each thread issues 2 * ROWS independent weight loads before using any, so ~8 KiB per block
//    (x several resident blocks per SM) is in flight, enough to cover HBM latency.
//  - Weights stream with ld.global.nc.L1::no_allocate so they do not evict x, which every block
//    re-reads from L1/L2.
//  - Partial sums are reduced with warp shuffles, then across the 8 warps in shared memory; the
//    bias is added in the same store.
//  - Weights do not depend on the previous kernel, so under programmatic dependent launch each
//    block issues its first weight loads before waiting for x: the weight stream starts while
//    the small kernel before it (a norm, attention) is still running.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "backends/cuda/cuda_common.h"
#include "backends/cuda/cuda_kernels.h"

namespace kiln::cuda {

namespace {

constexpr int kGemvThreads = 256;  // most threads per block

// acc[t][r] summed over the block; thread t*ROWS + r stores y[t, row0 + r] (Y: the activation
// type, or float for F32 logits).
template <typename Y, int N, int ROWS>
__device__ __forceinline__ void gemv_reduce(float (&acc)[N][ROWS], int out, int row0,
                                            const float* __restrict__ bias, Y* __restrict__ y,
                                            int64_t ldy) {
  __shared__ float red[kGemvThreads / 32][N * ROWS];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
#pragma unroll
  for (int t = 0; t < N; ++t)
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const float v = warp_sum(acc[t][r]);
      if (lane == 0) red[warp][t * ROWS + r] = v;
    }
  __syncthreads();
  if (threadIdx.x < N * ROWS) {
    const int t = threadIdx.x / ROWS, r = threadIdx.x % ROWS, row = row0 + r;
    float s = 0;
    for (int w = 0; w < warps; ++w) s += red[w][threadIdx.x];
    if (row < out) y[t * ldy + row] = from_f<Y>(s + (bias ? bias[row] : 0.0f));
  }
}

// acc[t][r] += W chunk (unpacked, ROWS x kVec) . x[t] chunk, for all t. X: the type of x, T or
// float (the F32 final hidden state the LM head reads).
template <typename T, int N, int ROWS, typename X = T>
__device__ __forceinline__ void gemv_chunk(float (&acc)[N][ROWS], const uint4 (&wv)[ROWS],
                                           const X* __restrict__ x, int64_t ldx, int c) {
  constexpr int E = kVec<T>;
  float wf[ROWS][E];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) unpack_vec<T>(wv[r], wf[r]);
#pragma unroll
  for (int t = 0; t < N; ++t) {
    float xf[E];
    if constexpr (std::is_same<X, T>::value) {
      unpack_vec<T>(ld_act(reinterpret_cast<const uint4*>(x + t * ldx) + c), xf);
    } else {
      const float4* xp = reinterpret_cast<const float4*>(x + t * ldx + int64_t(c) * E);
#pragma unroll
      for (int q = 0; q < E / 4; ++q) {
        const float4 v = ld_act(xp + q);
        xf[4 * q] = v.x, xf[4 * q + 1] = v.y, xf[4 * q + 2] = v.z, xf[4 * q + 3] = v.w;
      }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int e = 0; e < E; ++e) acc[t][r] = fmaf(wf[r][e], xf[e], acc[t][r]);
  }
}

// Needs in % kVec<T> == 0 and 16-byte aligned rows of x and W. WAIT_X: the caller has not
// waited for the previous kernel yet; this function does, after issuing its first W loads.
// Leaves the per-thread partial sums of W rows rows[0..ROWS) in acc.
template <typename T, int N, int ROWS, bool WAIT_X, typename X = T>
__device__ __forceinline__ void gemv_partial(float (&acc)[N][ROWS], const X* __restrict__ x,
                                             int64_t ldx, const T* __restrict__ w, int in,
                                             const int (&rows)[ROWS]) {
  constexpr int E = kVec<T>;
  const int chunks = in / E;
#pragma unroll
  for (int t = 0; t < N; ++t)
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[t][r] = 0.0f;
  const uint4* wr[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) wr[r] = reinterpret_cast<const uint4*>(w + int64_t(rows[r]) * in);
  // Two chunks per row per pass; the first pass's loads go out before waiting on the previous
  // kernel (WAIT_X), since only x depends on it.
  const int nt = blockDim.x;
  int c = threadIdx.x;
  bool ha = c < chunks, hb = c + nt < chunks;
  uint4 wa[ROWS], wb[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    if (ha) wa[r] = ld_stream(wr[r] + c);
    if (hb) wb[r] = ld_stream(wr[r] + c + nt);
  }
  if constexpr (WAIT_X) pdl_wait();
  while (ha) {
    gemv_chunk<T, N, ROWS, X>(acc, wa, x, ldx, c);
    if (hb) gemv_chunk<T, N, ROWS, X>(acc, wb, x, ldx, c + nt);
    c += 2 * nt;
    ha = c < chunks, hb = c + nt < chunks;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      if (ha) wa[r] = ld_stream(wr[r] + c);
      if (hb) wb[r] = ld_stream(wr[r] + c + nt);
    }
  }
}

template <typename T, int N, int ROWS, bool WAIT_X, typename Y = T, typename X = T>
__device__ __forceinline__ void gemv_tile(const X* __restrict__ x, int64_t ldx,
                                          const T* __restrict__ w, int in, int out, int row0,
                                          const float* __restrict__ bias, Y* __restrict__ y,
                                          int64_t ldy) {
  int rows[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) rows[r] = min(row0 + r, out - 1);  // past the end: never stored
  float acc[N][ROWS];
  gemv_partial<T, N, ROWS, WAIT_X, X>(acc, x, ldx, w, in, rows);
  gemv_reduce<Y, N, ROWS>(acc, out, row0, bias, y, ldy);
}

// Any shape or alignment, one element at a time (MoE fallback for odd sizes).
template <typename T, int ROWS>
__device__ __forceinline__ void gemv_tile_scalar(const T* x, const T* __restrict__ w, int in,
                                                 int out, int row0, T* __restrict__ y) {
  float acc[1][ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) acc[0][r] = 0.0f;
  for (int k = threadIdx.x; k < in; k += blockDim.x) {
    const float xv = to_f(x[k]);
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
      acc[0][r] += to_f(w[int64_t(min(row0 + r, out - 1)) * in + k]) * xv;
  }
  gemv_reduce<T, 1, ROWS>(acc, out, row0, nullptr, y, 0);
}

template <typename T, int N, int ROWS, typename Y, typename X>
__global__ void __launch_bounds__(kGemvThreads)
    gemv_kernel(const X* __restrict__ x, int64_t ldx, const T* __restrict__ w, int in, int out,
                const float* __restrict__ bias, Y* __restrict__ y, int64_t ldy) {
  pdl_trigger();
  gemv_tile<T, N, ROWS, true, Y, X>(x, ldx, w, in, out, int(blockIdx.x) * ROWS, bias, y, ldy);
}

// gate_up GEMV fused with the gated activation: a block owns gate rows [j, j + H) and the up
// rows [inter + j, inter + j + H) (H = ROWS / 2); it stores both halves of gu (rounded to T, as
// the unfused product would) and out[t, j..] = act(gate) * up, as gated_act would from gu.
template <typename T, int N, int ROWS>
__global__ void __launch_bounds__(kGemvThreads)
    gemv_gated_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ w, int in,
                      int inter, const float* __restrict__ bias, T* __restrict__ gu,
                      T* __restrict__ out, int act) {
  constexpr int H = ROWS / 2;
  pdl_trigger();
  const int j0 = int(blockIdx.x) * H;
  int rows[ROWS];
#pragma unroll
  for (int r = 0; r < H; ++r) {
    rows[r] = min(j0 + r, inter - 1);
    rows[H + r] = inter + rows[r];
  }
  float acc[N][ROWS];
  gemv_partial<T, N, ROWS, true>(acc, x, ldx, w, in, rows);
  __shared__ float red[kGemvThreads / 32][N * ROWS];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
#pragma unroll
  for (int t = 0; t < N; ++t)
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const float v = warp_sum(acc[t][r]);
      if (lane == 0) red[warp][t * ROWS + r] = v;
    }
  __syncthreads();
  if (threadIdx.x < N * H) {
    const int t = threadIdx.x / H, r = threadIdx.x % H, j = j0 + r;
    float g = 0, u = 0;
    for (int k = 0; k < warps; ++k) g += red[k][t * ROWS + r], u += red[k][t * ROWS + H + r];
    if (j < inter) {
      const T gt = from_f<T>(g + (bias ? bias[j] : 0.0f));
      const T ut = from_f<T>(u + (bias ? bias[inter + j] : 0.0f));
      gu[int64_t(t) * 2 * inter + j] = gt;
      gu[int64_t(t) * 2 * inter + inter + j] = ut;
      out[int64_t(t) * inter + j] = from_f<T>(apply_gated(to_f(gt), to_f(ut), act));
    }
  }
}

template <typename T, int ROWS, bool VEC>
__global__ void __launch_bounds__(kGemvThreads)
    gemv_gather_kernel(const T* __restrict__ x, int64_t ldx, const T* const* ws,
                       const int32_t* rows, const int32_t* experts, int64_t a0, int in, int out,
                       T* __restrict__ y) {
  pdl_begin();
  // rows and experts come from the router kernel before this one: plain (coherent) loads, not
  // the non-coherent path const __restrict__ would allow (see ld_act).
  const int64_t a = a0 + blockIdx.y;
  const T* xr = x + (rows ? int64_t(rows[a]) : a) * ldx;
  const T* w = ws[experts[a]];
  const int row0 = int(blockIdx.x) * ROWS;
  if constexpr (VEC)
    gemv_tile<T, 1, ROWS, false>(xr, ldx, w, in, out, row0, nullptr, y + a * out, out);
  else
    gemv_tile_scalar<T, ROWS>(xr, w, in, out, row0, y + a * out);
}

// Threads per block: one 16-byte chunk per thread per pass, whole warps, at most 256.
unsigned threads_for(int64_t chunks) {
  return unsigned(std::clamp<int64_t>((chunks + 31) / 32 * 32, 32, kGemvThreads));
}

// 4 weight rows per block keep 8 independent 16-byte loads in flight per thread.
template <typename T, int N, typename Y = T, typename X = T>
void launch(const void* x, int64_t ldx, const void* w, int64_t in, int64_t out, const float* bias,
            void* y, int64_t ldy, cudaStream_t s) {
  constexpr int kRows = 4;
  const unsigned blocks = unsigned((out + kRows - 1) / kRows);
  launch_kernel(gemv_kernel<T, N, kRows, Y, X>, blocks, threads_for(in / kVec<T>), 0, s,
                static_cast<const X*>(x), ldx, static_cast<const T*>(w), int(in), int(out), bias,
                static_cast<Y*>(y), ldy);
}

// Weight rows per block of the fused kernel: 2 gate + 2 up rows (the registers of 4 plain rows).
template <typename T, int N>
void launch_gated(const void* x, int64_t ldx, const void* w, int64_t in, int64_t inter,
                  const float* bias, void* gu, void* out, Activation a, cudaStream_t s) {
  constexpr int kRows = 4;
  const unsigned blocks = unsigned((inter + kRows / 2 - 1) / (kRows / 2));
  launch_kernel(gemv_gated_kernel<T, N, kRows>, blocks, threads_for(in / kVec<T>), 0, s,
                static_cast<const T*>(x), ldx, static_cast<const T*>(w), int(in), int(inter), bias,
                static_cast<T*>(gu), static_cast<T*>(out), int(a));
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

}  // namespace

bool gemv_supported(DType act, const void* x, int64_t n, int64_t ldx, const void* w, int64_t in,
                    int64_t out, bool f32_x) {
  if (n < 1 || n > kGemvMaxRows || out < 1 || in < 1 || in > INT_MAX || out > INT_MAX) return false;
  const int64_t es = int64_t(dtype_size(act)), e = 16 / es, xs = f32_x ? 4 : es;
  return in % e == 0 && (ldx * xs) % 16 == 0 && aligned16(x) && aligned16(w);
}

void gemv_gated(DType act, const void* x, int64_t n, int64_t ldx, const void* w, int64_t in,
                int64_t inter, const float* bias, void* gu, void* out, Activation a,
                cudaStream_t s) {
  KILN_CHECK(gemv_supported(act, x, n, ldx, w, in, 2 * inter), "gemv_gated: unsupported shape");
  if (n == 1) {
    KILN_DISPATCH_ACT(act, launch_gated<T, 1>(x, ldx, w, in, inter, bias, gu, out, a, s));
  } else {
    KILN_DISPATCH_ACT(act, launch_gated<T, 2>(x, ldx, w, in, inter, bias, gu, out, a, s));
  }
}

bool gemv(DType act, const void* x, int64_t n, int64_t ldx, const void* w, int64_t in, int64_t out,
          const float* bias, void* y, int64_t ldy, cudaStream_t s, bool f32_out, bool f32_x) {
  if (!gemv_supported(act, x, n, ldx, w, in, out, f32_x)) return false;
  if (f32_x && act != DType::F32) {
    KILN_CHECK(f32_out, "gemv: F32 x needs an F32 y");
    if (n == 1) {
      KILN_DISPATCH_ACT(act, (launch<T, 1, float, float>(x, ldx, w, in, out, bias, y, ldy, s)));
    } else {
      KILN_DISPATCH_ACT(act, (launch<T, 2, float, float>(x, ldx, w, in, out, bias, y, ldy, s)));
    }
    return true;
  }
  if (f32_out) {
    if (n == 1) {
      KILN_DISPATCH_ACT(act, (launch<T, 1, float>(x, ldx, w, in, out, bias, y, ldy, s)));
    } else {
      KILN_DISPATCH_ACT(act, (launch<T, 2, float>(x, ldx, w, in, out, bias, y, ldy, s)));
    }
  } else if (n == 1) {
    KILN_DISPATCH_ACT(act, launch<T, 1>(x, ldx, w, in, out, bias, y, ldy, s));
  } else {
    KILN_DISPATCH_ACT(act, launch<T, 2>(x, ldx, w, in, out, bias, y, ldy, s));
  }
  return true;
}

void gemv_gather(DType act, const void* x, int64_t ldx, const void* const* weights,
                 const int32_t* rows, const int32_t* experts, int64_t count, int64_t in,
                 int64_t out, void* y, cudaStream_t s) {
  KILN_CHECK(in <= INT_MAX && out <= INT_MAX, "MoE GEMV: dimensions exceed 2^31");
  if (count == 0 || out == 0) return;
  constexpr int kRows = 4;
  const int64_t es = int64_t(dtype_size(act)), e = 16 / es;
  // Expert matrices come from cudaMalloc (256-byte aligned), so rows are aligned when `in` is.
  const bool vec = in % e == 0 && (ldx * es) % 16 == 0 && aligned16(x);
  const unsigned bx = unsigned((out + kRows - 1) / kRows);
  for (int64_t a0 = 0; a0 < count; a0 += 65535) {  // grid.y is limited to 65535
    const dim3 grid(bx, unsigned(std::min<int64_t>(65535, count - a0)));
    KILN_DISPATCH_ACT(act, {
      auto* k = vec ? gemv_gather_kernel<T, kRows, true> : gemv_gather_kernel<T, kRows, false>;
      launch_kernel(k, grid, vec ? threads_for(in / kVec<T>) : kGemvThreads, 0, s,
                    static_cast<const T*>(x), ldx, reinterpret_cast<const T* const*>(weights), rows,
                    experts, a0, int(in), int(out), static_cast<T*>(y));
    });
  }
}

}  // namespace kiln::cuda
