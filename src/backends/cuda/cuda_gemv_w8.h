// Int8 weight-only (W8A16) kernels: weights int8 [out, in] with one F32 scale per output row
// (core/quant.h), activations F16 or BF16, FP32 accumulation.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/dtype.h"

namespace kiln::cuda {

// GEMV for decode: y[n, out] = (x[n, in] . q[out, in]^T) * scales[out] (+ bias[out]), n <= 8.
// Each weight byte is read once per call (half the bytes of a 16-bit weight), unpacked to FP32
// with a byte permute and one add (no integer-to-float conversion unit), and the row's scale is
// applied once after the reduction.
struct GemvW8Params {
  DType act = DType::BF16;  // of x and y (F16 or BF16)
  const void* x = nullptr;
  int64_t n = 0, ldx = 0;
  const int8_t* w = nullptr;
  const float* scales = nullptr;
  int64_t in = 0, out = 0;
  const float* bias = nullptr;  // may be null
  void* y = nullptr;
  int64_t ldy = 0;
  bool y_f32 = false;  // y is F32 (the LM head's logits), not act
};
constexpr int64_t kGemvW8MaxRows = 8;
// Shapes and alignment the kernel takes: 1 <= n <= 8, in % 16 == 0, 16-byte aligned x and w rows.
bool gemv_w8_is_supported(const GemvW8Params& p);
void gemv_w8_launch(const GemvW8Params& p, cudaStream_t s);

// Dequantizes q[rows, cols] into out (act dtype, same shape): out[r, c] = q[r, c] * scales[r],
// rounded once to the activation type; batches larger than the GEMV's run through cuBLASLt on it.
struct DequantW8Params {
  DType act = DType::BF16;
  const int8_t* w = nullptr;
  const float* scales = nullptr;
  int64_t rows = 0, cols = 0;
  void* out = nullptr;
};
void dequant_w8_launch(const DequantW8Params& p, cudaStream_t s);

}  // namespace kiln::cuda
