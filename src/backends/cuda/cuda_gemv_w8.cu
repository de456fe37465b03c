// Int8 weight-only GEMV and dequantization (cuda_gemv_w8.h). The GEMV has the shape of the 16-bit
// one (cuda_gemv.cu): a block of up to 256 threads owns 4 output rows and sweeps `in` with
// 16-byte weight loads (16 int8 weights each), streamed past L1; x is re-read from L1/L2.
#include <algorithm>
#include <climits>

#include "backends/cuda/cuda_common.h"
#include "backends/cuda/cuda_gemv_w8.h"

namespace kiln::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kRows = 4;

// Four signed bytes of `w` as floats: flip the sign bit (x + 128, unsigned), place each byte as
// the low mantissa byte of 2^23 (0x4B000000), subtract 2^23 + 128. Exact for every int8.
__device__ __forceinline__ void unpack_i8x4(uint32_t w, float* f) {
  const uint32_t u = w ^ 0x80808080u;
  f[0] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7440)) - 8388736.0f;
  f[1] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7441)) - 8388736.0f;
  f[2] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7442)) - 8388736.0f;
  f[3] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7443)) - 8388736.0f;
}

template <typename T, int N>
__global__ void __launch_bounds__(kThreads)
    gemv_w8_kernel(const T* __restrict__ x, int64_t ldx, const int8_t* __restrict__ w,
                   const float* __restrict__ scales, int in, int out,
                   const float* __restrict__ bias, T* __restrict__ y, int64_t ldy, bool y_f32) {
  pdl_trigger();
  const int row0 = int(blockIdx.x) * kRows, chunks = in / 16;
  float acc[N][kRows];
#pragma unroll
  for (int t = 0; t < N; ++t)
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[t][r] = 0.0f;
  const uint4* wr[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r)  // rows past the end read the last row and are never stored
    wr[r] = reinterpret_cast<const uint4*>(w + int64_t(min(row0 + r, out - 1)) * in);
  int c = threadIdx.x;
  uint4 wa[kRows];
  if (c < chunks)
#pragma unroll
    for (int r = 0; r < kRows; ++r) wa[r] = ld_stream(wr[r] + c);
  pdl_wait();  // weights do not depend on the previous kernel; x does
  while (c < chunks) {
    float wf[kRows][16];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      unpack_i8x4(wa[r].x, wf[r]);
      unpack_i8x4(wa[r].y, wf[r] + 4);
      unpack_i8x4(wa[r].z, wf[r] + 8);
      unpack_i8x4(wa[r].w, wf[r] + 12);
    }
    const int next = c + int(blockDim.x);
    if (next < chunks)
#pragma unroll
      for (int r = 0; r < kRows; ++r) wa[r] = ld_stream(wr[r] + next);
#pragma unroll
    for (int t = 0; t < N; ++t) {
      // 16 activations: two 16-byte vectors of a 16-bit type.
      const uint4* xp = reinterpret_cast<const uint4*>(x + t * ldx + int64_t(c) * 16);
      float xf[16];
      unpack_vec<T>(ld_act(xp), xf);
      unpack_vec<T>(ld_act(xp + 1), xf + 8);
#pragma unroll
      for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int e = 0; e < 16; ++e) acc[t][r] = fmaf(wf[r][e], xf[e], acc[t][r]);
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
    if (row < out) store_y(y, t * ldy + row, s * scales[row] + (bias ? bias[row] : 0.0f), y_f32);
  }
}

template <typename T, int N>
void launch_gemv(const GemvW8Params& p, cudaStream_t s) {
  const int64_t chunks = p.in / 16;
  const unsigned threads = unsigned(std::clamp<int64_t>((chunks + 31) / 32 * 32, 32, kThreads));
  const unsigned blocks = unsigned((p.out + kRows - 1) / kRows);
  launch_kernel(gemv_w8_kernel<T, N>, blocks, threads, 0, s, static_cast<const T*>(p.x), p.ldx, p.w,
                p.scales, int(p.in), int(p.out), p.bias, static_cast<T*>(p.y), p.ldy, p.y_f32);
}

template <typename T>
void dispatch_n(const GemvW8Params& p, cudaStream_t s) {
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

// 16 weights per thread: one 16-byte load, two 16-byte stores.
template <typename T>
__global__ void dequant_w8_vec_kernel(const int8_t* __restrict__ w,
                                      const float* __restrict__ scales, int64_t chunks_per_row,
                                      int64_t chunks, T* __restrict__ out) {
  pdl_begin();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < chunks;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float sc = scales[i / chunks_per_row];
    const uint4 q = __ldg(reinterpret_cast<const uint4*>(w) + i);
    float f[16];
    unpack_i8x4(q.x, f);
    unpack_i8x4(q.y, f + 4);
    unpack_i8x4(q.z, f + 8);
    unpack_i8x4(q.w, f + 12);
#pragma unroll
    for (int e = 0; e < 16; ++e) f[e] *= sc;
    uint4* o = reinterpret_cast<uint4*>(out) + 2 * i;
    o[0] = pack_vec<T>(f);
    o[1] = pack_vec<T>(f + 8);
  }
}

template <typename T>
__global__ void dequant_w8_kernel(const int8_t* __restrict__ w, const float* __restrict__ scales,
                                  int64_t cols, int64_t count, T* __restrict__ out) {
  pdl_begin();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_f<T>(float(w[i]) * scales[i / cols]);
}

template <typename T>
void launch_dequant(const DequantW8Params& p, bool vec, int64_t items, unsigned blocks,
                    cudaStream_t s) {
  if (vec)
    launch_kernel(dequant_w8_vec_kernel<T>, blocks, 256, 0, s, p.w, p.scales, p.cols / 16, items,
                  static_cast<T*>(p.out));
  else
    launch_kernel(dequant_w8_kernel<T>, blocks, 256, 0, s, p.w, p.scales, p.cols, items,
                  static_cast<T*>(p.out));
}

}  // namespace

bool gemv_w8_is_supported(const GemvW8Params& p) {
  if (p.act != DType::F16 && p.act != DType::BF16) return false;
  if (p.n < 1 || p.n > kGemvW8MaxRows || p.out < 1 || p.in < 16 || p.in > INT_MAX ||
      p.out > INT_MAX)
    return false;
  const auto a16 = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  return p.in % 16 == 0 && (p.ldx * 2) % 16 == 0 && a16(p.x) && a16(p.w) && p.scales;
}

void gemv_w8_launch(const GemvW8Params& p, cudaStream_t s) {
  KILN_CHECK(gemv_w8_is_supported(p), "gemv_w8: unsupported shape or alignment (n ", p.n, ", in ",
             p.in, ")");
  if (p.act == DType::BF16)
    dispatch_n<__nv_bfloat16>(p, s);
  else
    dispatch_n<__half>(p, s);
}

void dequant_w8_launch(const DequantW8Params& p, cudaStream_t s) {
  KILN_CHECK(p.act == DType::F16 || p.act == DType::BF16,
             "dequant_w8: the activation type must be F16 or BF16");
  const int64_t count = p.rows * p.cols;
  if (count == 0) return;
  const bool vec = p.cols % 16 == 0 && reinterpret_cast<uintptr_t>(p.w) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(p.out) % 16 == 0;
  const int64_t items = vec ? count / 16 : count;
  const unsigned blocks = unsigned(std::min<int64_t>((items + 255) / 256, 65535));
  if (p.act == DType::BF16)
    launch_dequant<__nv_bfloat16>(p, vec, items, blocks, s);
  else
    launch_dequant<__half>(p, vec, items, blocks, s);
}

}  // namespace kiln::cuda
