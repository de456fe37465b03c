// CPU reference kernels: free functions on raw pointers, FP32 activations, weights in F32, F16 or
// BF16 (upcast on the fly) or int8 with scales (dequantized on the fly). Parallel with OpenMP.
// These define the numerics every other backend is checked against.
#pragma once

#include <cstdint>
#include <vector>

#include "arch/model_config.h"
#include "core/dtype.h"
#include "core/quant.h"
#include "graph/backend.h"

namespace kiln::cpu {

// y[n, out] = x[n, in] . w[out, in]^T (+ bias[out]); x rows are `ldx` floats apart, y rows `ldy`.
// A quantized weight (core/quant.h; `in` is its number of input features) is dequantized a row
// at a time: the result is exactly that of the F32 weight the codes stand for. For fp8 each row of
// x is first quantized to E4M3 with its own scale (quantize_fp8_row) and replaced by the values
// its codes stand for, as the GPU's FP8 products see it.
struct QuantRef {
  WeightQuant quant = WeightQuant::None;
  const float* scales = nullptr;   // [out] (int8-wo, fp8) or [out, groups] (int4-wo)
  const uint8_t* zeros = nullptr;  // [out, groups] (int4-wo)
  int64_t groups = 1;
  const int32_t* perm = nullptr;  // [in]: act-order int4-wo, stored column j is input perm[j]
};
void linear(const float* x, int64_t n, int64_t in, int64_t ldx, const void* w, DType wt,
            int64_t out, const float* bias, float* y, int64_t ldy, const QuantRef& q = {});

// y = norm(x) * w (+ b) row-wise over `dim`; y may alias x.
void norm(const float* x, int64_t rows, int64_t dim, int64_t ldx, const float* w, const float* b,
          NormKind kind, float eps, float* y, int64_t ldy);

// residual += delta; y = norm(residual) (the fused pre-norm of the next block).
void add_norm(float* residual, const float* delta, int64_t rows, int64_t dim, const float* w,
              const float* b, NormKind kind, float eps, float* y);

// out[i] = table[ids[i] - first] * scale, table rows in dtype `t` (zeros outside the table).
void embed(const void* table, DType t, int64_t vocab, int64_t dim, const int32_t* ids, int64_t n,
           float scale, float* out, int64_t first = 0);

// x[i] += table[pos[i]].
void add_rows(const void* table, DType t, int64_t dim, const int32_t* pos, int64_t n, float* x);

// Rotates the first `rot_dim` dims of each head (rotate-half convention) of `heads` heads per
// row; cos/sin are [n, rot_dim / 2].
void rope(float* x, int64_t n, int64_t ld, int64_t heads, int64_t head_dim, int64_t rot_dim,
          const float* cos, const float* sin);

// MoE routing of one row (Backend::MoeParams): turns router logits l[E] into scores p in place
// and returns the chosen experts in `chosen` (best first; ties to the lower index). score_bias
// (F32 [E] or nullptr) shifts the choice, not the scores.
void moe_route(float* l, int64_t E, const Backend::MoeParams& p, const float* score_bias,
               std::vector<int64_t>& chosen);

// Gated activation: out[n, inter] = act(gu[:, :inter]) * gu[:, inter:] (SwiGLUOai: its clamped
// form, model_config.h); or act in place (!gated).
void gated_act(const float* gu, int64_t n, int64_t inter, Activation a, float* out);
void act_inplace(float* x, int64_t count, Activation a);

// x = cap * tanh(x / cap).
void softcap(float* x, int64_t count, float cap);

// Paged KV cache geometry: pool is [num_blocks, block_size, kv_dim] per layer for K and for V.
struct KVView {
  float* k;
  float* v;
  const int32_t* block_table;
  int64_t block_size;
  int64_t kv_dim;
  const int32_t* seq = nullptr;  // token i's table is row seq[i] (bt_stride apart); null: one
  int64_t bt_stride = 0;
  // FP8 cache (KVLayerView): k / v are E4M3 codes (uint8_t), one scale per (slot, KV head).
  float* k_scale = nullptr;
  float* v_scale = nullptr;
  int64_t head_dim = 0;
  // Cache slot of token i at position p.
  int64_t slot(int64_t i, int64_t p) const {
    const int32_t* bt = seq ? block_table + int64_t(seq[i]) * bt_stride : block_table;
    return int64_t(bt[p / block_size]) * block_size + p % block_size;
  }
};

// Writes rows k/v [n, kv_dim] (row stride ld) at positions pos[i].
void kv_write(const KVView& kv, const float* k, const float* v, int64_t ld, const int32_t* pos,
              int64_t n);

// out[n, heads*head_dim] = softmax(scale * q.k (soft-capped), causal, window) . v for query
// rows at positions pos[i]; keys are the cache positions [lo, pos[i]]. sinks (F32 [heads] or
// nullptr): one extra logit per head in each softmax, with no value (AttnParams::sinks).
void attention(const float* q, int64_t ldq, int64_t n, const int32_t* pos, const KVView& kv,
               int64_t heads, int64_t kv_heads, int64_t head_dim, float scale, float softcap,
               int64_t window, const float* sinks, float* out, int64_t ldo);

}  // namespace kiln::cpu
