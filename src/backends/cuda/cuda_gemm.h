// cuBLASLt matrix products for the CUDA backend: y[n, out] = x[n, in] . W[out, in]^T with F32,
// F16 or BF16 operands and FP32 accumulation (F32 without TF32, so F32 engines stay exact).
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <tuple>

#include "core/dtype.h"

namespace kiln::cuda {

class LtGemm {
 public:
  explicit LtGemm(cudaStream_t s);
  ~LtGemm();
  LtGemm(const LtGemm&) = delete;
  LtGemm& operator=(const LtGemm&) = delete;

  // Row-major x (rows ldx apart), W and y (rows ldy apart), all of dtype `dt`; y F32 instead
  // when f32_out (logits).
  void run(DType dt, const void* x, int64_t n, int64_t ldx, const void* w, int64_t in, int64_t out,
           void* y, int64_t ldy, bool f32_out = false);

  // FP8 product with outer-vector scales (cuBLAS 12.9+ on Hopper): y[t, r] (dtype yt, F16 or
  // BF16) = (xq[t, :] . w[r, :]) * sx[t] * sw[r], xq [n, in] and w [out, in] E4M3 codes with
  // rows ldx and in bytes apart (multiples of 16). Returns false, computing nothing, when
  // cuBLASLt offers no algorithm for the shape.
  bool run_fp8(const void* xq, int64_t n, int64_t ldx, const float* sx, const void* w,
               const float* sw, int64_t in, int64_t out, DType yt, void* y, int64_t ldy);

 private:
  // The heuristic's choice depends on shapes, strides and how aligned the pointers are, so all
  // of them key the cache: each distinct product asks the heuristic once.
  struct Key {
    int dt, yt;
    int64_t m, n, k, ldx, ldy;
    int align_x, align_w, align_y;
    bool operator<(const Key& o) const {  // (nvcc compiles this as C++17: no <=>)
      return std::tie(dt, yt, m, n, k, ldx, ldy, align_x, align_w, align_y) <
             std::tie(o.dt, o.yt, o.m, o.n, o.k, o.ldx, o.ldy, o.align_x, o.align_w, o.align_y);
    }
  };
  struct Plan {
    bool ok = false;  // false: cuBLASLt has no algorithm (remembered, not asked again)
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo;
  };
  // The cached plan for `key` (FP8 operands get outer-vector scale modes); `ok` false when
  // there is no algorithm.
  const Plan& find_plan(const Key& key, const float* a_scale = nullptr,
                        const float* b_scale = nullptr);
  const Plan& plan(const Key& key);

  cublasLtHandle_t handle_ = nullptr;
  cudaStream_t stream_;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::map<Key, Plan> plans_;
};

}  // namespace kiln::cuda
