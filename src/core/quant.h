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
  // int4-wo (W4A16, the storage of AWQ and GPTQ checkpoints): asymmetric 4-bit codes in groups of
  // `g` consecutive input columns (int4_group()), w[r, c] = (q[r, c] - zero[r, c / g]) *
  // scale[r, c / g] with integer zeros in [0, 15]. Codes are packed two per byte, column 2k in
  // the low nibble of byte k of the row; scales are F32 [rows, cols / g], zeros U8 [rows, cols /
  // g].
  Int4,
  // fp8 (W8A8, TensorRT-LLM's and vLLM's dynamic FP8): E4M3 weights with one F32 scale per output
  // channel, w[r, c] = e4m3(q[r, c]) * scale[r], scale[r] = max_c |w[r, c]| / 448; activations
  // are quantized the same way per token (row) as each linear runs (quantize_fp8_row), so a
  // product is sx[t] * scale[r] * sum_c e4m3(qx[t, c]) * e4m3(q[r, c]), the product FP8 tensor
  // cores compute.
  Fp8,
};

// "none", "int8-wo", "int4-wo" or "fp8"; throws kiln::Error naming the accepted spellings.
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

// The group size int4-wo uses for rows of `cols` inputs: 128, else 64 or 32 when that divides
// cols (small models); 0 when none does (the weight cannot be quantized to int4).
int64_t int4_group(int64_t cols);

// Quantizes one row of `cols` floats (cols % group == 0, group even) to packed int4 codes
// (cols / 2 bytes) with per-group scales and zeros, as GPTQ does: over each group, with lo =
// min(w, 0) and hi = max(w, 0) (so 0 stays exact), scale = (hi - lo) / 15, zero = round(-lo /
// scale) in [0, 15], q = round(w / scale) + zero clamped to [0, 15]; a group of zeros gets scale
// 0. Returns false when the row holds a non-finite value.
bool quantize_int4_row(const float* w, int64_t cols, int64_t group, uint8_t* q, float* scales,
                       uint8_t* zeros);

// The values a packed int4 row stands for: out[c] = (q[c] - zero[g]) * scale[g], g = c / group.
inline void dequantize_int4_row(const uint8_t* q, const float* scales, const uint8_t* zeros,
                                int64_t group, int64_t cols, float* out) {
  for (int64_t c = 0; c < cols; ++c) {
    const int code = (q[c / 2] >> (4 * (c % 2))) & 15;
    out[c] = float(code - int(zeros[c / group])) * scales[c / group];
  }
}

// E4M3 (the "fn" variant: no infinities, one NaN code per sign, largest finite 448) from a
// float: round to nearest, ties to even, saturating to +-448 as the GPU's satfinite conversion
// does; NaN gives 0x7F.
uint8_t f32_to_e4m3(float f);
// The value of an E4M3 code (a table lookup).
float e4m3_to_f32(uint8_t v);
constexpr float kE4M3Max = 448.0f;

// Quantizes one row of `cols` floats to E4M3 codes with one scale: scale = max |w| / 448,
// q = f32_to_e4m3(w * (448 / max |w|)); a row whose max |w| is below kFp8TinyRow (zeros
// included) gets scale 0 and codes 0. Used for fp8 weights at build time and for activations
// per token at run time (the GPU computes the same codes). Returns false for a non-finite value.
constexpr float kFp8TinyRow = 1e-30f;
bool quantize_fp8_row(const float* w, int64_t cols, uint8_t* q, float* scale);

inline void dequantize_fp8_row(const uint8_t* q, float scale, int64_t cols, float* out) {
  for (int64_t c = 0; c < cols; ++c) out[c] = e4m3_to_f32(q[c]) * scale;
}

}  // namespace kiln
