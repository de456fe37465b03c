// Weight quantization: the schemes kiln builds and runs, and their numerics. A quantized weight
// is a Tensor whose dtype is the storage type and whose `scales` hold the dequantization factors
// (core/tensor.h); every backend computes with exactly the values dequantize_row() gives, so the
// CPU reference over dequantized rows defines a quantized engine's numerics.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "core/dtype.h"

namespace kiln {

enum class WeightQuant : uint8_t {
  None,
  // int8-wo (TensorRT-LLM's int8 weight-only, W8A16): symmetric int8 per output channel,
  // w[r, c] = q[r, c] * scale[r] with scale[r] = max_c |w[r, c]| / 127; activations stay in the
  // engine dtype.
  Int8,
};

// "none" or "int8-wo"; throws kiln::Error naming the accepted spellings.
WeightQuant parse_weight_quant(std::string_view s);
std::string_view weight_quant_name(WeightQuant q);
// The storage dtype of a weight quantized with q (q != None).
DType quant_storage(WeightQuant q);

// Quantizes one row of `cols` floats to int8 with one scale: scale = max |w| / 127 (0 for a row
// of zeros), q = w / scale rounded to nearest, ties to even. Returns false (and writes nothing
// meaningful) when the row holds a non-finite value.
bool quantize_int8_row(const float* w, int64_t cols, int8_t* q, float* scale);

// The values a quantized row stands for: out[c] = q[c] * scale.
inline void dequantize_int8_row(const int8_t* q, float scale, int64_t cols, float* out) {
  for (int64_t c = 0; c < cols; ++c) out[c] = float(q[c]) * scale;
}

}  // namespace kiln
