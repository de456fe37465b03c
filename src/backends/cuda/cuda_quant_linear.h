// Linears over quantized weights (core/quant.h) on the CUDA backend. int8-wo / int4-wo: the
// W8A16 / W4A16 GEMV for decode-sized batches, otherwise the weight dequantized into a scratch
// buffer (one rounding to the activation type) and cuBLASLt on it. fp8: the activations are
// quantized per token into scratch, then the FP8 tensor-core GEMV (up to 8 tokens) or cuBLASLt's
// FP8 GEMM with per-token and per-channel scales.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>

#include "arch/model_config.h"
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
  bool y_f32 = false;  // y is F32, not act: the LM head's logits (quant_linear only)
  bool gemv = true;    // false: always dequantize + cuBLASLt (KILN_CUDA_GEMV=0)
  int sms = 0;         // the device's multiprocessors (kernel shapes); 0: asked of the runtime
};

// y[n, out] = x[n, in] . W^T (+ bias). `scratch(name, bytes)` returns a device buffer of at
// least that size, one per name ("wq_dequant": a dequantized weight, at most
// kDequantChunkBytes of it at a time; "fp8_act": quantized activations). Throws kiln::Error for a
// weight without its scales (and zeros) or an F32 activation type.
using ScratchFn = std::function<void*(const char* name, size_t bytes)>;
// Weights larger than this are dequantized and multiplied a slice of rows at a time, so the
// scratch stays bounded (an int4 LM head of a 128K vocabulary would be 1 GB in BF16 at once).
constexpr size_t kDequantChunkBytes = size_t(256) << 20;
void quant_linear(const QuantLinearParams& p, LtGemm& lt, const ScratchFn& scratch, cudaStream_t s);

// Puts an uploaded quantized weight's codes into the device layout the kernels read: int4
// weights that w4_tiled takes are tiled (cuda_gemv_w4.h), on the stream, through a temporary copy;
// every other weight is left as uploaded. Called once per weight by the uploads.
void relayout_quant_weight(Tensor& t, cudaStream_t s);

// The gate_up product with the gated activation as its epilogue, where a decode GEMV can take it
// (fp8, and int4 groups of 128-code multiples, up to 8 tokens): y = gu [n, 2 * inter] (gate
// rows, then up rows), out[n, inter] = act(gate) * up from gu's rounded values, as the separate
// calls would write them. Returns false, launching nothing, where none applies.
bool quant_linear_gated(const QuantLinearParams& p, void* out, Activation a,
                        const ScratchFn& scratch, cudaStream_t s);

}  // namespace kiln::cuda
