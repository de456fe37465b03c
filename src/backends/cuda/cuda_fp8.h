// FP8 (E4M3) kernels for fp8 engines (core/quant.h): activations quantized per token as each
// linear runs, and the decode GEMV on FP8 tensor cores. Larger batches use cuBLASLt's FP8 GEMM
// with the same per-token and per-channel scales (LtGemm::run_fp8).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/dtype.h"

namespace kiln::cuda {

// codes[t, :] = E4M3(x[t, :] / scales[t]) with scales[t] = max |x[t, :]| / 448, for each of the
// n rows: the CPU reference's quantize_fp8_row, bit for bit (IEEE division, round to nearest
// even, saturating). A NaN or infinity in a row gives NaN codes, so the products stay NaN.
struct QuantActFp8Params {
  DType act = DType::BF16;  // of x (F16 or BF16)
  const void* x = nullptr;
  int64_t n = 0, ldx = 0, in = 0;
  uint8_t* codes = nullptr;  // [n, ldq]
  int64_t ldq = 0;
  float* scales = nullptr;  // [n]
};
void quant_act_fp8_launch(const QuantActFp8Params& p, cudaStream_t s);

// The FP8 KV cache's write (KVLayerView::k_scale): rows k / v [n, kv_dim] (stride ld) into the
// slots of positions pos[i] as E4M3 codes, one scale per (token, KV head) = max |x| / 448 over
// the head's head_dim values: the CPU's quantize_fp8_row per head, bit for bit. A NaN or
// infinity in a head makes its dequantized values NaN. One warp per (token, head).
struct KvWriteFp8Params {
  DType act = DType::BF16;  // of k / v
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t ld = 0, n = 0;
  const int32_t* pos = nullptr;
  uint8_t* kpool = nullptr;  // [slots, kv_dim]
  uint8_t* vpool = nullptr;
  float* k_scale = nullptr;  // [slots, kv_dim / head_dim]
  float* v_scale = nullptr;
  const int32_t* block_table = nullptr;
  int64_t block_size = 0, kv_dim = 0, head_dim = 0;
  const int32_t* seq = nullptr;  // batched: token i's table is row seq[i], bt_stride apart
  int64_t bt_stride = 0;
};
bool kv_write_fp8_is_supported(const KvWriteFp8Params& p);
void kv_write_fp8_launch(const KvWriteFp8Params& p, cudaStream_t s);

// y[t, r] = (sum_c e4m3(xq[t, c]) * e4m3(w[r, c])) * sx[t] * sw[r] (+ bias[r]) for n <= 8
// tokens: one m16n8k32 FP8 mma per 16 rows and 32 inputs, the tokens as its 8 columns, so the
// weights go to the tensor cores as stored (no conversion instructions). They are staged through
// shared memory in coalesced tiles; any order of the inputs gives the same sum, so each thread
// feeds the mma 16 contiguous bytes of a tile row.
// Activations either as codes (xq, ldq, sx from quant_act_fp8) or, with xq null, as the 16-bit x
// itself (x, ldx), quantized inside the kernel to the same codes and scales: the fused form, for
// small n * in (kGemvFp8FusedMax), where a separate quantization kernel would cost more than
// every block reading x.
struct GemvFp8Params {
  DType act = DType::BF16;  // of x and y (F16 or BF16)
  const uint8_t* xq = nullptr;
  int64_t ldq = 0;
  const float* sx = nullptr;
  const void* x = nullptr;  // fused (xq null)
  int64_t ldx = 0;
  int64_t n = 0;
  const uint8_t* w = nullptr;
  const float* sw = nullptr;
  int64_t in = 0, out = 0;
  const float* bias = nullptr;  // may be null
  void* y = nullptr;
  int64_t ldy = 0;
  bool y_f32 = false;  // y is F32 (the LM head's logits), not act; not with `gated`
  // Gated (non-null): w holds gate rows then up rows (out even), y is gu, and gated[t, j] (rows
  // out / 2 apart) = act(gate) * up from gu's rounded values, act an Activation.
  void* gated = nullptr;
  int gated_act = 0;
  int sms = 0;  // the device's multiprocessors; 0: asked of the runtime
  // One token from x (fused): the CUDA-core kernel instead of the tensor-core one.
  bool cuda_cores = false;
};
constexpr int64_t kGemvFp8FusedMax = 16384;  // n * in up to which the GEMV quantizes x itself
constexpr int64_t kGemvFp8MaxRows = 8;
// 1 <= n <= 8, in % 16 == 0, 16-byte aligned rows of x (or xq) and w.
bool gemv_fp8_is_supported(const GemvFp8Params& p);
void gemv_fp8_launch(const GemvFp8Params& p, cudaStream_t s);

}  // namespace kiln::cuda
