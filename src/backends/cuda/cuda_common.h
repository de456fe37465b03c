// Shared pieces of the CUDA backend: error checking that throws kiln::Error, element-type helpers
// (FP32 / FP16 / BF16 activations, always computed in FP32) and warp reductions.
#pragma once

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "arch/model_config.h"
#include "core/dtype.h"
#include "core/error.h"

namespace kiln::cuda {

// Throws kiln::Error("CUDA error at file:line: expr: what") after clearing the runtime's
// last-error slot, so a caught failure is not reported again by the next launch check.
[[noreturn]] void throw_error(const char* file, int line, const char* expr, const char* what);

// Programmatic dependent launch (Hopper): each kernel may be launched while its predecessor on
// the stream is still running; it waits (griddepcontrol.wait, see pdl_begin) before touching
// memory. This hides most of the launch gap between the many small kernels of a decode step.
// On unless KILN_CUDA_PDL=0.
bool pdl_enabled();

// Lets `kernel` take `bytes` of dynamic shared memory (past the default 48 KiB) on the current
// device. Once per kernel and device: the attribute is per device, and ranks drive several.
void allow_dynamic_smem(const void* kernel, size_t bytes);

}  // namespace kiln::cuda

#define KILN_CUDA_CHECK(expr)                                                            \
  do {                                                                                   \
    const cudaError_t kiln_e_ = (expr);                                                  \
    if (kiln_e_ != cudaSuccess)                                                          \
      ::kiln::cuda::throw_error(__FILE__, __LINE__, #expr, cudaGetErrorString(kiln_e_)); \
  } while (0)

#define KILN_CUBLAS_CHECK(expr)                                                               \
  do {                                                                                        \
    const cublasStatus_t kiln_s_ = (expr);                                                    \
    if (kiln_s_ != CUBLAS_STATUS_SUCCESS)                                                     \
      ::kiln::cuda::throw_error(__FILE__, __LINE__, #expr, cublasLtGetStatusString(kiln_s_)); \
  } while (0)

// After every kernel launch: launch-configuration errors surface here, not at the next sync.
#define KILN_CUDA_LAUNCH_CHECK() KILN_CUDA_CHECK(cudaGetLastError())

// Runs the statement with `T` bound to the device element type of activation dtype `dt`.
#define KILN_DISPATCH_ACT(dt, ...)                                               \
  switch (dt) {                                                                  \
    case ::kiln::DType::F32: {                                                   \
      using T = float;                                                           \
      __VA_ARGS__;                                                               \
      break;                                                                     \
    }                                                                            \
    case ::kiln::DType::F16: {                                                   \
      using T = __half;                                                          \
      __VA_ARGS__;                                                               \
      break;                                                                     \
    }                                                                            \
    case ::kiln::DType::BF16: {                                                  \
      using T = __nv_bfloat16;                                                   \
      __VA_ARGS__;                                                               \
      break;                                                                     \
    }                                                                            \
    default:                                                                     \
      throw ::kiln::Error("CUDA backend: activations must be F32, F16 or BF16"); \
  }

#ifdef __CUDACC__
namespace kiln::cuda {

__device__ __forceinline__ float to_f(float v) {
  return v;
}
__device__ __forceinline__ float to_f(__half v) {
  return __half2float(v);
}
__device__ __forceinline__ float to_f(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Stores output v at element i of y: rounded to T, or as F32 where y_f32 (then y points at F32
// memory; the LM head's logits, which are kept in F32 so 16-bit engines do not round them
// before sampling).
template <typename T>
__device__ __forceinline__ void store_y(T* y, int64_t i, float v, bool y_f32) {
  if (y_f32)
    reinterpret_cast<float*>(y)[i] = v;
  else
    y[i] = from_f<T>(v);
}

// Rounds through T and back: the value a T activation store would keep.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_f(from_f<T>(v));
}

// Cache slot of token i: its position through its sequence's block table.
__device__ __forceinline__ int64_t cache_slot(const int32_t* bt, int64_t bs, const int32_t* seq,
                                              int64_t bt_stride, const int32_t* pos, int64_t i) {
  const int64_t p = pos[i];
  if (seq) bt += int64_t(seq[i]) * bt_stride;
  return int64_t(bt[p / bs]) * bs + p % bs;
}

// Elements of T in one 16-byte vector.
template <typename T>
constexpr int kVec = 16 / int(sizeof(T));

// Unpacks a 16-byte vector of T into kVec<T> floats.
__device__ __forceinline__ void unpack(const uint4& u, float* f, float*) {
  f[0] = __uint_as_float(u.x), f[1] = __uint_as_float(u.y);
  f[2] = __uint_as_float(u.z), f[3] = __uint_as_float(u.w);
}
__device__ __forceinline__ void unpack_word(uint32_t w, float* f, __nv_bfloat16*) {
  // bf16 is the top half of an f32: two shifts/masks instead of a conversion instruction.
  f[0] = __uint_as_float(w << 16);
  f[1] = __uint_as_float(w & 0xffff0000u);
}
__device__ __forceinline__ void unpack_word(uint32_t w, float* f, __half*) {
  __half2 h;
  memcpy(&h, &w, 4);
  const float2 v = __half22float2(h);
  f[0] = v.x, f[1] = v.y;
}
template <typename H>
__device__ __forceinline__ void unpack(const uint4& u, float* f, H* tag) {
  unpack_word(u.x, f + 0, tag);
  unpack_word(u.y, f + 2, tag);
  unpack_word(u.z, f + 4, tag);
  unpack_word(u.w, f + 6, tag);
}
// An E4M3 code of an FP8 KV cache (KVLayerView::k_scale): the KV element type the attention
// kernels take besides the activation type; its values still need their scale.
struct E4M3 {
  uint8_t bits;
};
__device__ __forceinline__ float2 e4m3x2_to_float2(uint16_t w) {
  // cvt.rn.f16x2.e4m3x2: exact (every E4M3 value is an F16), then exact to F32.
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(w), __NV_E4M3);
  __half2 v;
  memcpy(&v, &h, 4);
  return __half22float2(v);
}
__device__ __forceinline__ float to_f(E4M3 v) {
  return e4m3x2_to_float2(v.bits).x;
}
__device__ __forceinline__ void unpack(const uint4& u, float* f, E4M3*) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 a = e4m3x2_to_float2(uint16_t(w[i] & 0xffffu));
    const float2 b = e4m3x2_to_float2(uint16_t(w[i] >> 16));
    f[4 * i] = a.x, f[4 * i + 1] = a.y, f[4 * i + 2] = b.x, f[4 * i + 3] = b.y;
  }
}
template <typename T>
__device__ __forceinline__ void unpack_vec(const uint4& u, float* f) {
  unpack(u, f, static_cast<T*>(nullptr));
}

// Packs kVec<T> floats into a 16-byte vector of T (round to nearest even).
template <typename T>
__device__ __forceinline__ uint4 pack_vec(const float* f) {
  uint4 u;
  T* t = reinterpret_cast<T*>(&u);
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) t[i] = from_f<T>(f[i]);
  return u;
}

// Programmatic dependent launch, device side. pdl_trigger lets the next kernel on the stream
// start launching; it does so only once every block of this grid has triggered (or exited), so
// it never takes SM slots this grid still needs. pdl_wait blocks until the previous kernel has
// finished and its writes are visible; nothing produced or consumed by earlier kernels may be
// touched before it (both are no-ops without programmatic dependent launch). Because every
// kernel waits for its predecessor before finishing, the chain stays ordered transitively.
__device__ __forceinline__ void pdl_trigger() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}
__device__ __forceinline__ void pdl_wait() {
  asm volatile("griddepcontrol.wait;" ::: "memory");
}
// Loads of what an earlier kernel on the stream wrote (activations, router choices). Under
// programmatic dependent launch a kernel starts while the one before it is still running, so such
// data changes during the reader's lifetime, and PTX allows the non-coherent path (__ldg,
// ld.global.nc, or what nvcc may emit for a const __restrict__ pointer) only for data that stays
// unchanged for the whole kernel. These plain ld.global loads are ordered after pdl_wait (both
// volatile) and see the writes it waited for; kernels that read such data through plain pointers
// do not mark them const __restrict__. Weights, scales and tables fixed at load keep the
// non-coherent path. Seen on an H100: CudaOps.MoE in F16 gave rows off by ~1, and a second call
// unlike the first, with PDL on (it passed with KILN_CUDA_PDL=0, or with its dense GEMVs moved to
// cuBLASLt); with these loads it passes three runs of three in every dtype.
__device__ __forceinline__ uint4 ld_act(const uint4* p) {
  uint4 r;
  asm volatile("ld.global.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p)
               : "memory");
  return r;
}
__device__ __forceinline__ float4 ld_act(const float4* p) {
  const uint4 u = ld_act(reinterpret_cast<const uint4*>(p));
  return make_float4(__uint_as_float(u.x), __uint_as_float(u.y), __uint_as_float(u.z),
                     __uint_as_float(u.w));
}

// Weights (fixed for the engine's life) streamed once per step: the non-coherent path, not kept
// in L1, so they do not evict the activations every block re-reads. Volatile: stays in program
// order with pdl_wait, so a kernel's first weight loads really go out before it waits.
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

// First statement of every kernel that has nothing to do before its inputs are ready.
__device__ __forceinline__ void pdl_begin() {
  pdl_trigger();
  pdl_wait();
}

// Launches `kernel` on `s`, with programmatic dependent launch when enabled; checks the launch.
template <typename... K, typename... A>
void launch_kernel(void (*kernel)(K...), dim3 grid, dim3 block, size_t smem, cudaStream_t s,
                   A&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cfg.attrs = attr;
  cfg.numAttrs = pdl_enabled() ? 1 : 0;
  KILN_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...));
}

// Activation functions in FP32 (the CPU reference's formulas).
__device__ __forceinline__ float apply_act(float x, int a) {
  switch (Activation(a)) {
    case Activation::SiLU:
      return x / (1.0f + expf(-x));
    case Activation::GeluTanh:
      return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    case Activation::GeluErf:
      return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
    case Activation::ReLU:
      return x > 0.0f ? x : 0.0f;
    case Activation::SwiGLUOai:  // gated only: apply_gated
      break;
  }
  return x;
}

// act(gate) * up, or GPT-OSS's clamped form (model_config.h; the CPU's apply_gated).
__device__ __forceinline__ float apply_gated(float g, float u, int a) {
  if (Activation(a) != Activation::SwiGLUOai) return apply_act(g, a) * u;
  g = fminf(g, 7.0f);
  u = fminf(fmaxf(u, -7.0f), 7.0f);
  return (u + 1.0f) * (g / (1.0f + expf(-1.702f * g)));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

}  // namespace kiln::cuda
#endif  // __CUDACC__
