// Launchers of the CUDA backend's kernels. Each takes the activation dtype `act` (F32, F16 or
// BF16: the element type of every activation, KV-cache and matrix-weight pointer), raw device
// pointers and the stream; vector weights (norm scales, biases) and RoPE tables are F32.
// Kernels compute in FP32 and round once on store.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "arch/model_config.h"
#include "core/dtype.h"

namespace kiln::cuda {

// ---- elementwise / row ops (cuda_elementwise.cu) ----

// out[i] = table[ids[i] - first] * scale; `rows` table rows of `dim` elements in dtype `tdt`; an
// id outside [first, first + rows) gives a zero row. f32_out: out is F32 (the residual stream),
// else `act`.
void embed(DType act, const void* table, DType tdt, int64_t rows, int64_t dim, const int32_t* ids,
           int64_t n, float scale, void* out, cudaStream_t s, bool f32_out = false,
           int64_t first = 0);
// x[i] += table[rows[i]] (x F32 when f32_x).
void add_rows(DType act, const void* table, DType tdt, int64_t dim, const int32_t* rows, int64_t n,
              void* x, cudaStream_t s, bool f32_x = false);
// Normalises `rows * heads` vectors of `dim`: vector (r, h) is at x + r*ldx + h*dim and goes to
// y + r*ldy + h*dim (y may alias x). w, b: F32 [dim] (b may be null); vectors with h >= w2_from
// use w2 instead of w when w2 is given (q and k heads of one row in one launch).
// f32_x: x is F32 (the residual stream; y stays `act`, so it cannot alias x). b2: the bias of
// the w2 heads. per_head: w, w2, b, b2 hold one [dim] slice per head (Cohere's q/k norms).
void norm(DType act, const void* x, int64_t rows, int64_t heads, int64_t dim, int64_t ldx, void* y,
          int64_t ldy, const float* w, const float* b, NormKind kind, float eps, cudaStream_t s,
          const float* w2 = nullptr, int64_t w2_from = 0, bool f32_x = false,
          const float* b2 = nullptr, bool per_head = false);
// residual[rows, dim] += delta; y = norm(residual) (rows contiguous). The residual is F32 when
// f32_residual, else `act`; delta and y are `act`.
void add_norm(DType act, void* residual, const void* delta, int64_t rows, int64_t dim,
              const float* w, const float* b, NormKind kind, float eps, void* y, cudaStream_t s,
              bool f32_residual = false);
void add(DType act, void* x, const void* y, int64_t count, cudaStream_t s);
void rope(DType act, void* x, int64_t n, int64_t ld, int64_t heads, int64_t head_dim,
          int64_t rot_dim, const float* cos, const float* sin, cudaStream_t s);
// bias / sel (MoE experts with biases): row i adds F32 bias[sel[i]] [2 inter] first.
void gated_act(DType act, const void* gu, int64_t n, int64_t inter, Activation a, void* out,
               cudaStream_t s, const float* const* bias = nullptr, const int32_t* sel = nullptr);
void act_inplace(DType act, void* x, int64_t count, Activation a, cudaStream_t s);
void softcap(DType act, void* x, int64_t count, float cap, cudaStream_t s);
void to_f32(DType act, const void* x, int64_t count, float* out, cudaStream_t s);
// out[count] (act) = x (F32), rounded.
void from_f32(DType act, const float* x, int64_t count, void* out, cudaStream_t s);
// x[count] = cap * tanh(x / cap), F32.
void softcap_f32(float* x, int64_t count, float cap, cudaStream_t s);
// y[i, o] += bias[o] over n rows of `out` columns, rows `ldy` apart.
void bias_add(DType act, void* y, int64_t n, int64_t out, int64_t ldy, const float* bias,
              cudaStream_t s);
void kv_write(DType act, void* kpool, void* vpool, const int32_t* block_table, int64_t block_size,
              int64_t kv_dim, const void* k, const void* v, int64_t ld, const int32_t* pos,
              int64_t n, cudaStream_t s, const int32_t* seq = nullptr, int64_t bt_stride = 0);
// rope over `heads` heads of rows x (q heads, then the kv_dim / head_dim k heads from head
// `k_from`), then kv_write of the rotated k heads and of v: rope(q); rope(k); kv_write(k, v).
// seq / bt_stride: as in AttnLaunch (token i's block table is row seq[i]).
void rope_kv_write(DType act, void* x, int64_t n, int64_t ld, int64_t heads, int64_t k_from,
                   int64_t head_dim, int64_t rot_dim, const float* cos, const float* sin,
                   void* kpool, void* vpool, const int32_t* block_table, int64_t block_size,
                   int64_t kv_dim, const void* v, const int32_t* pos, cudaStream_t s,
                   const int32_t* seq = nullptr, int64_t bt_stride = 0);

// ---- MoE helpers (cuda_elementwise.cu) ----

// Routing of Backend::MoeParams (graph/backend.h) for one row of logits [E] each.
struct MoeRouteArgs {
  int64_t E, k;
  bool renorm, sigmoid;
  const float* score_bias;  // F32 [E] or nullptr
  int groups, topk_groups;
  float scaling;
};
// Per row of logits [n, E]: writes sel_row/sel_expert [n*k] (assignment a = i*k + j) and
// weights [n*k].
void moe_route(DType act, const void* logits, int64_t n, const MoeRouteArgs& r, int32_t* sel_row,
               int32_t* sel_expert, float* weights, cudaStream_t s);
// out[i] = sum_j weights[i*k+j] * (ye[i*k+j] + bias[sel[i*k+j]]) (+ g_i * ys[i], g_i =
// sigmoid(gate[i]), or 1 when gate is nullptr); rows of `hidden`; bias (F32 [hidden] per expert)
// may be nullptr.
void moe_combine(DType act, const void* ye, const float* weights, int64_t n, int64_t k,
                 int64_t hidden, const void* ys, const void* gate, void* out, cudaStream_t s,
                 const float* const* bias = nullptr, const int32_t* sel = nullptr);

// ---- GEMV for few rows (cuda_gemv.cu) ----

// y[n, out] = x[n, in] . w[out, in]^T (+ bias) for n <= kGemvMaxRows. Returns false (and does
// nothing) when the shapes or alignment do not suit the vectorised kernel.
constexpr int64_t kGemvMaxRows = 2;
// f32_out: y is F32 (logits), whatever the activation dtype; f32_x: so is x (needs f32_out).
bool gemv(DType act, const void* x, int64_t n, int64_t ldx, const void* w, int64_t in, int64_t out,
          const float* bias, void* y, int64_t ldy, cudaStream_t s, bool f32_out = false,
          bool f32_x = false);
// Whether gemv() would take these operands.
bool gemv_supported(DType act, const void* x, int64_t n, int64_t ldx, const void* w, int64_t in,
                    int64_t out, bool f32_x = false);
// gemv() of a gate_up weight [2 * inter, in] into gu [n, 2 * inter] fused with
// gated_act(gu) -> out [n, inter]; both outputs as the two unfused calls would write them.
void gemv_gated(DType act, const void* x, int64_t n, int64_t ldx, const void* w, int64_t in,
                int64_t inter, const float* bias, void* gu, void* out, Activation a,
                cudaStream_t s);
// Gathered GEMV for MoE: for each assignment a < count, y[a] = x[rows[a]] . W_{experts[a]}^T
// where W_e = weights[e] (device array of device pointers), each [out, in]; y rows `out` apart.
// rows == nullptr: x row a for assignment a.
void gemv_gather(DType act, const void* x, int64_t ldx, const void* const* weights,
                 const int32_t* rows, const int32_t* experts, int64_t count, int64_t in,
                 int64_t out, void* y, cudaStream_t s);

// ---- attention (cuda_attention.cu) ----

struct AttnLaunch {
  const void* q;
  int64_t ldq;
  int64_t n;
  const int32_t* pos;
  const void* kpool;
  const void* vpool;
  const int32_t* block_table;
  int64_t block_size, kv_dim;
  int64_t heads, kv_heads, head_dim;
  float scale, softcap;
  int64_t window;
  // Attention sinks (AttnParams::sinks): F32 [heads], a logit per query head in each softmax
  // with no value; nullptr: none.
  const float* sinks;
  // max(pos) + 1 or any upper bound: bounds the number of splits over keys (their sizes come
  // from the rows' own key ranges on the device, so a graph captured with a bound stays right).
  int64_t kv_len;
  void* out;
  int64_t ldo;
  // Batched decode: token i belongs to sequence seq[i], block table row seq[i] (bt_stride
  // entries apart); nullptr: one sequence. With seq, a block never mixes tokens.
  const int32_t* seq = nullptr;
  int64_t bt_stride = 0;
  // Mixed batch (as KVLayerView): sequence s owns rows [seq_start[s], seq_start[s + 1]) and
  // block-table row s (seq must be given too); the first num_decode sequences are one-row decodes
  // (rows [0, num_decode)), the others prefill chunks of at most max_q rows at consecutive
  // positions. Decode rows go to the CUDA-core kernel, prefill chunks to the tensor-core kernel
  // when it takes them (else the CUDA-core kernel takes every row through seq).
  const int32_t* seq_start = nullptr;
  int64_t num_seqs = 0, num_decode = 0, max_q = 0;
  // FP8 cache (KVLayerView::k_scale): kpool / vpool hold E4M3 codes, these one F32 scale per
  // (slot, KV head); nullptr: the pools hold the activation type. F16 / BF16 engines only.
  const float* k_scale = nullptr;
  const float* v_scale = nullptr;
  // Every row is a one-token decode whose positions and block table came from the host and whose
  // earlier keys were all written by earlier forwards (KVLayerView's mixed-batch contract): the
  // decode kernel then loads those keys before waiting for the kernels ahead of it (H100, tg128
  // of the 8B shape at one token: BF16 +0.9%, fp8 +1.0%, int4-wo +1.6%; docs/perf.md). Set by
  // attention() for a mixed batch's decode rows; false: it waits before touching memory.
  bool settled = false;
};
// Bytes of FP32 workspace, and the number of int counters (zero-initialised once; the kernel
// leaves them zero), that attention() needs for this launch (0: none).
size_t attention_workspace(const AttnLaunch& a, int num_sms);
size_t attention_counters(const AttnLaunch& a, int num_sms);
void attention(DType act, const AttnLaunch& a, float* workspace, int* counters, int num_sms,
               cudaStream_t s);

}  // namespace kiln::cuda
