// Int4 weight-only GEMV and dequantization (cuda_gemv_w4.h), shaped like the int8 ones
// (cuda_gemv_w8.cu): 256 threads own 4 output rows and sweep `in` with 16-byte weight loads
// (32 codes each), streamed past L1.
#include <algorithm>
#include <climits>

#include "backends/cuda/cuda_common.h"
#include "backends/cuda/cuda_gemv_w4.h"

namespace kiln::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kRows = 4;

__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

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
                   int64_t ldy) {
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
      for (int v = 0; v < 4; ++v) unpack_vec<T>(__ldg(xp + v), xf + 8 * v);
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
    if (row < out) y[t * ldy + row] = from_f<T>(s + (bias ? bias[row] : 0.0f));
  }
}

template <typename T, int N>
void launch_gemv(const GemvW4Params& p, cudaStream_t s) {
  const int64_t chunks = p.in / 32;
  const unsigned threads = unsigned(std::clamp<int64_t>((chunks + 31) / 32 * 32, 32, kThreads));
  const unsigned blocks = unsigned((p.out + kRows - 1) / kRows);
  launch_kernel(gemv_w4_kernel<T, N>, blocks, threads, 0, s, static_cast<const T*>(p.x), p.ldx, p.w,
                p.scales, p.zeros, int(p.in), int(p.out), int(p.group), p.bias,
                static_cast<T*>(p.y), p.ldy);
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

// 32 codes per thread: one 16-byte load, four 16-byte stores.
template <typename T>
__global__ void dequant_w4_kernel(const uint8_t* __restrict__ w, const float* __restrict__ scales,
                                  const uint8_t* __restrict__ zeros, int64_t cols, int64_t group,
                                  int64_t chunks, T* __restrict__ out) {
  pdl_begin();
  const int64_t per_row = cols / 32, groups = cols / group;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < chunks;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / per_row, g = (i % per_row) * 32 / group;
    const float sc = scales[row * groups + g], z = float(zeros[row * groups + g]);
    float f[32];
    unpack_u4x32(__ldg(reinterpret_cast<const uint4*>(w) + i), z, f);
#pragma unroll
    for (int e = 0; e < 32; ++e) f[e] *= sc;
    uint4* o = reinterpret_cast<uint4*>(out) + 4 * i;
#pragma unroll
    for (int v = 0; v < 4; ++v) o[v] = pack_vec<T>(f + 8 * v);
  }
}

template <typename T>
void launch_dequant(const DequantW4Params& p, cudaStream_t s) {
  const int64_t chunks = p.rows * p.cols / 32;
  const unsigned blocks = unsigned(std::min<int64_t>((chunks + 255) / 256, 65535));
  launch_kernel(dequant_w4_kernel<T>, blocks, 256, 0, s, p.w, p.scales, p.zeros, p.cols, p.group,
                chunks, static_cast<T*>(p.out));
}

bool aligned16(const void* q) {
  return reinterpret_cast<uintptr_t>(q) % 16 == 0;
}

// One thread per output element; rows of x are L2-resident (at most a few KiB).
__global__ void gather_cols_kernel(const uint16_t* __restrict__ x, int64_t ldx,
                                   const int32_t* __restrict__ perm, int in,
                                   uint16_t* __restrict__ y) {
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
  return p.in % 32 == 0 && p.group >= 32 && p.group % 32 == 0 && p.in % p.group == 0 &&
         (p.ldx * 2) % 16 == 0 && aligned16(p.x) && aligned16(p.w) && p.scales && p.zeros;
}

void gemv_w4_launch(const GemvW4Params& p, cudaStream_t s) {
  KILN_CHECK(gemv_w4_is_supported(p), "gemv_w4: unsupported shape or alignment (n ", p.n, ", in ",
             p.in, ", group ", p.group, ")");
  if (p.act == DType::BF16)
    dispatch_n<__nv_bfloat16>(p, s);
  else
    dispatch_n<__half>(p, s);
}

void dequant_w4_launch(const DequantW4Params& p, cudaStream_t s) {
  KILN_CHECK((p.act == DType::F16 || p.act == DType::BF16) && p.cols % 32 == 0 && p.group >= 32 &&
                 p.group % 32 == 0 && p.cols % p.group == 0 && aligned16(p.w) && aligned16(p.out),
             "dequant_w4: unsupported shape or alignment (cols ", p.cols, ", group ", p.group, ")");
  if (p.rows * p.cols == 0) return;
  if (p.act == DType::BF16)
    launch_dequant<__nv_bfloat16>(p, s);
  else
    launch_dequant<__half>(p, s);
}

}  // namespace kiln::cuda
