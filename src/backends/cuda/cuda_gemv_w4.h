// Int4 weight-only (W4A16) kernels: packed 4-bit codes [out, in / 2] with per-group F32 scales and
// U8 zeros [out, in / group] (core/quant.h, int4-wo), activations F16 or BF16, FP32 accumulation.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/dtype.h"

namespace kiln::cuda {

// GEMV for decode: y[n, out] = x[n, in] . W^T (+ bias) with W[r, c] = (q[r, c] - zero[r, g]) *
// scale[r, g], g = c / group; n <= 8. Groups of a multiple of 128 run on tensor cores (codes
// turned into 16-bit (q - zero) by mask tricks, mma.m16n8k16 with x as the B operand, each
// 128-code step scaled once); smaller groups on CUDA cores (a thread takes 32 codes of a row at a
// time, all in one group, so the group's factors apply once per chunk: s * (sum q x - zero *
// sum x)).
struct GemvW4Params {
  DType act = DType::BF16;  // of x and y (F16 or BF16)
  const void* x = nullptr;
  int64_t n = 0, ldx = 0;
  const uint8_t* w = nullptr;
  const float* scales = nullptr;
  const uint8_t* zeros = nullptr;
  int64_t in = 0, out = 0, group = 0;
  const float* bias = nullptr;  // may be null
  void* y = nullptr;
  int64_t ldy = 0;
  bool y_f32 = false;  // y is F32 (the LM head's logits), not act; not with `gated`
  // Gated (non-null): w holds gate rows then up rows (out even), y is gu, and gated[t, j] (rows
  // out / 2 apart) = act(gate) * up from gu's rounded values, act an Activation. Tensor-core
  // kernel only (group % 128 == 0).
  void* gated = nullptr;
  int gated_act = 0;
  int warps = 8;  // a block of the tensor-core kernel: 8 or 16 warps
};
constexpr int64_t kGemvW4MaxRows = 8;
// 1 <= n <= 8, in % 32 == 0, group % 32 == 0 dividing in, 16-byte aligned x and w rows.
bool gemv_w4_is_supported(const GemvW4Params& p);
void gemv_w4_launch(const GemvW4Params& p, cudaStream_t s);

// The device layout of int4 codes. Weights whose groups are whole 128-code steps and whose rows
// come in 16s (what the tensor-core GEMV takes: every dense linear of the usual models) are held
// tiled on the GPU: the codes of 8 consecutive rows x 128 columns (512 bytes) contiguous, tiles in
// (row block, step) order. Each warp load of the tensor-core GEMV then reads 512 contiguous bytes;
// row-major, its 32 lanes read 64-byte pieces of 8 rows in/2 bytes apart. Other weights stay
// row-major. The upload re-lays a weight (tile_w4_launch) and every reader of device codes (the
// GEMV, the dequantization) derives the layout from this predicate alone. H100, tg128 of the 8B
// shape at one token: int4-wo 323.8 -> 366.9 t/s (docs/perf.md).
bool w4_tiled(int64_t in, int64_t out, int64_t group);
// dst (tiled) from src (row-major [rows, cols / 2] bytes); w4_tiled(cols, rows, group) must hold.
void tile_w4_launch(const uint8_t* src, uint8_t* dst, int64_t rows, int64_t cols, cudaStream_t s);

// Dequantizes the codes (in their device layout) into out (act dtype, [rows, cols], row-major),
// each value rounded once; larger batches run through cuBLASLt on it. cols % 32 == 0.
struct DequantW4Params {
  DType act = DType::BF16;
  const uint8_t* w = nullptr;
  const float* scales = nullptr;
  const uint8_t* zeros = nullptr;
  int64_t rows = 0, cols = 0, group = 0;
  void* out = nullptr;
  // The codes are tiled: w4_tiled of the whole weight, which a slice of its rows (whole 8-row
  // blocks, rows % 8 == 0) keeps whatever the slice's own row count.
  bool tiled = false;
};
void dequant_w4_launch(const DequantW4Params& p, cudaStream_t s);

// Act-order weights (Tensor::input_perm): y[t, j] = x[t, perm[j]] for t < n, j < in, y dense
// [n, in]; 16-bit elements, so the linear that follows reads its inputs in the stored order.
// perm must be a permutation of [0, in) (checked when the engine loads).
struct GatherColsParams {
  const void* x = nullptr;  // 16-bit elements
  int64_t n = 0, ldx = 0, in = 0;
  const int32_t* perm = nullptr;
  void* y = nullptr;
};
void gather_cols_launch(const GatherColsParams& p, cudaStream_t s);

}  // namespace kiln::cuda
