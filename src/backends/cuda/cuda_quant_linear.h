// Linears over weight-only quantized weights (int8-wo, int4-wo; core/quant.h) on the CUDA
// backend: the W8A16 / W4A16 GEMV for decode-sized batches, otherwise the weight dequantized into
// a scratch buffer (one rounding to the activation type) and cuBLASLt on it.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>

#include "backends/cuda/cuda_gemm.h"
#include "core/tensor.h"

namespace kiln::cuda {

struct QuantLinearParams {
  DType act = DType::BF16;  // of x and y (F16 or BF16)
  const void* x = nullptr;
  int64_t n = 0, ldx = 0;
  const Tensor* w = nullptr;    // quantized, resident on the device
  const float* bias = nullptr;  // may be null
  void* y = nullptr;
  int64_t ldy = 0;
  bool gemv = true;  // false: always dequantize + cuBLASLt (KILN_CUDA_GEMV=0)
};

// y[n, out] = x[n, in] . W^T (+ bias). `scratch(bytes)` returns a device buffer of at least that
// size for the dequantized weight (used only above the GEMV's rows). Throws kiln::Error for a
// weight without its scales (and zeros) or an F32 activation type.
void quant_linear(const QuantLinearParams& p, LtGemm& lt,
                  const std::function<void*(size_t)>& scratch, cudaStream_t s);

}  // namespace kiln::cuda
