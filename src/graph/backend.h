// The op vocabulary of the shared decoder graph, behind one interface per device. Activations
// are opaque device pointers of the backend's activation dtype; weights are Tensors the backend
// made resident with upload(). Integer side inputs (token ids, positions, block tables) and the
// RoPE cos/sin tables are device pointers made with to_device().
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "arch/model_config.h"
#include "core/tensor.h"

namespace kiln {

// Paged KV cache of one layer: pools [num_blocks, block_size, kv_dim] for K and V.
struct KVLayerView {
  void* k;
  void* v;
  const int32_t* block_table;  // of the (single) sequence being processed
  int64_t block_size;
  int64_t kv_dim;
  // Cache positions valid once this step's K/V are written (max position + 1), so device
  // backends can size attention launches without reading positions back; 0: unknown. An upper
  // bound is fine (a captured decode graph passes its length bucket).
  int64_t len = 0;
  // Batched decode: token i of the step belongs to sequence seq[i], whose block table is row
  // seq[i] of block_table (rows bt_stride entries apart). nullptr: every token belongs to the
  // one sequence whose table is block_table.
  const int32_t* seq = nullptr;
  int64_t bt_stride = 0;
  // Mixed batch (Decoder::forward over a Batch): the step's rows are grouped by sequence;
  // sequence s owns rows [seq_start[s], seq_start[s + 1]) (device array of num_seqs + 1
  // entries) and block-table row s; seq[i] is set for every row as well. The first num_decode
  // sequences have one row each (decodes, rows [0, num_decode)); the others are prefill chunks
  // of at most max_q rows, their rows at consecutive positions. seq_start == nullptr: not
  // given (backends then rely on seq / pos alone, as for a plain decode step).
  // With seq_start given, pos, seq, seq_start and block_table are copied from the host before
  // the forward's kernels run, and every key before a decode row's own position was written by
  // earlier forwards (no kernel of this forward writes it): a backend may read both before the
  // forward's earlier kernels finish (the CUDA decode kernel loads those keys while the qkv GEMV
  // and rope_kv_write drain).
  // Launch shapes may depend on n, num_seqs, num_decode, max_q and len, never on the device
  // contents of pos / seq_start (a captured decode graph replays with other positions).
  const int32_t* seq_start = nullptr;
  int64_t num_seqs = 0, num_decode = 0, max_q = 0;
  // FP8 cache (--kv-cache-dtype fp8): k / v hold E4M3 codes, and k_scale / v_scale one F32
  // scale per (slot, KV head), [num_blocks * block_size][kv_dim / head_dim]: a head's values are
  // its codes times its scale, quantized by kv_write per token and head with quantize_fp8_row
  // (core/quant.h; max |x| / 448), so no calibration is needed and an outlier token or head costs
  // only its own precision. nullptr: k / v hold the backend's activation dtype.
  float* k_scale = nullptr;
  float* v_scale = nullptr;
  int64_t head_dim = 0;  // the scales' granularity; set with them
  bool fp8() const { return k_scale != nullptr; }
};

// Backend::sample's id for a row of logits holding NaN or +inf.
constexpr int32_t kNonFiniteLogits = -1;

// Per-row settings of Backend::sample. The draw of a row is a pure function of (seed, step)
// and the logits, so a replayed step picks the same token and CPU and CUDA agree.
struct SampleParams {
  float temperature = 0.0f;  // <= 0: greedy (first maximum, as torch.argmax)
  int32_t top_k = 0;         // <= 0: off
  float top_p = 1.0f;        // <= 0 or >= 1: off
  uint64_t seed = 0;
  uint64_t step = 0;  // index of this draw in the sequence's stream of draws
  // Keeps tokens whose probability is at least min_p times the most likely token's (vLLM's
  // min_p), applied with top-k before top-p. <= 0: off.
  float min_p = 0.0f;
};

// Logits processing of Backend::edit_logits, per (row, token) entry; each pair at most once.
// Applied in this order to l = logits[row][id], in FP32:
//   l += bias                                       (logit_bias; -inf bans the token)
//   if seen and repetition != 1: l = l > 0 ? l / repetition : l * repetition
//   l -= frequency * count + presence * (count > 0 ? 1 : 0)
// with the row's RowPenalty (transformers' / vLLM's repetition, frequency and presence
// penalties: `seen` = in the prompt or generated, `count` = times generated).
struct LogitEdit {
  int32_t row = 0, id = 0;
  float bias = 0.0f;
  int32_t count = 0;
  int32_t seen = 0;
};
struct RowPenalty {
  float presence = 0.0f, frequency = 0.0f, repetition = 1.0f;
};

struct AttnParams {
  int64_t heads, kv_heads, head_dim;
  float scale;
  float softcap;   // 0: off
  int64_t window;  // 0: full causal
  // Attention sinks (Knobs::attn_sinks): F32 [heads] in this device's memory, one logit per
  // query head that joins each row's softmax (in the units of the scaled scores) and adds no
  // value; nullptr: none.
  const float* sinks = nullptr;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual std::string name() const = 0;
  virtual DType act_dtype() const = 0;  // element type of activations and KV cache

  virtual void* alloc(size_t bytes) = 0;
  virtual void release(void* p) = 0;
  virtual void to_device(void* dst, const void* src, size_t bytes) = 0;
  virtual void to_host(void* dst, const void* src, size_t bytes) = 0;
  virtual void synchronize() {}
  // Makes a host weight resident on this device (CPU: returns it as is, zero-copy).
  virtual Tensor upload(const Tensor& host) = 0;

  // The residual stream (embed's out, add_rows' x, add_norm's residual, norm's x when
  // residual_in) is F32 on every backend, whatever the activation dtype: 16-bit engines do not
  // round it between layers (as llama.cpp keeps it), so rounding does not pile up over depth.
  // out[i] = table[ids[i] - first] * scale; an id outside the table gives a zero row (callers
  // validate ids; kNonFiniteLogits from a pipelined decode step must not read out of bounds).
  // `first`: the table holds tokens [first, first + rows), one tensor-parallel rank's slice of
  // the vocabulary (the ranks' rows then sum to the whole lookup).
  virtual void embed(const Tensor& table, const int32_t* ids, int64_t n, float scale, void* out,
                     int64_t first = 0) = 0;
  virtual void add_rows(const Tensor& table, const int32_t* rows, int64_t n, void* x) = 0;
  // y[n, out] = x[n, in] . w^T (+ b)
  virtual void linear(const void* x, int64_t n, int64_t ldx, const Tensor& w, const Tensor* b,
                      void* y, int64_t ldy) = 0;
  virtual void norm(const void* x, int64_t rows, int64_t dim, int64_t ldx, const Tensor& w,
                    const Tensor* b, NormKind kind, float eps, void* y, int64_t ldy,
                    bool residual_in = false, bool f32_out = false) = 0;
  // residual += delta; y = norm(residual)
  virtual void add_norm(void* residual, const void* delta, int64_t rows, int64_t dim,
                        const Tensor& w, const Tensor* b, NormKind kind, float eps, void* y) = 0;
  // In place over `heads` vectors of `head_dim` per row (q/k norms); rows are `ld` apart. w (and
  // the bias b, F32, may be null) hold [head_dim], shared by the heads, or [heads * head_dim],
  // one slice per head (Cohere's q/k norms).
  virtual void head_norm(void* x, int64_t n, int64_t ld, int64_t heads, int64_t head_dim,
                         const Tensor& w, NormKind kind, float eps, const Tensor* b = nullptr) = 0;
  // The q and k norms of an attention input: q_heads heads at x and the k_heads heads right after
  // them, each set with its own weight (and bias) as head_norm takes them. CUDA: one launch.
  virtual void qk_norm(void* x, int64_t n, int64_t ld, int64_t q_heads, int64_t k_heads,
                       int64_t head_dim, const Tensor& wq, const Tensor& wk, NormKind kind,
                       float eps, const Tensor* bq = nullptr, const Tensor* bk = nullptr) {
    head_norm(x, n, ld, q_heads, head_dim, wq, kind, eps, bq);
    head_norm(static_cast<char*>(x) + size_t(q_heads * head_dim) * dtype_size(act_dtype()), n, ld,
              k_heads, head_dim, wk, kind, eps, bk);
  }
  virtual void add(void* x, const void* y, int64_t count) = 0;  // x += y
  // rows rows of width bytes, from src (rows spitch bytes apart) to dst (dpitch apart), device
  // memory both (cudaMemcpy2D): vocabulary slices into whole logit rows, a head range of q.
  virtual void copy_2d(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                       size_t rows) = 0;
  virtual void rope(void* x, int64_t n, int64_t ld, int64_t heads, int64_t head_dim,
                    int64_t rot_dim, const float* cos, const float* sin) = 0;
  virtual void kv_write(const KVLayerView& kv, const void* k, const void* v, int64_t ld,
                        const int32_t* pos, int64_t n) = 0;
  // rope over the q_heads heads at x and the kv_heads k heads right after them, then kv_write of
  // those k heads and the kv_heads v heads after them: an attention input row [q | k | v] (rows
  // ld apart) made ready for attention. CUDA: one launch for a 16-bit cache.
  virtual void rope_kv_write(void* x, int64_t n, int64_t ld, int64_t q_heads, int64_t kv_heads,
                             int64_t head_dim, int64_t rot_dim, const float* cos, const float* sin,
                             const KVLayerView& kv, const int32_t* pos) {
    char* k = static_cast<char*>(x) + size_t(q_heads * head_dim) * dtype_size(act_dtype());
    rope(x, n, ld, q_heads, head_dim, rot_dim, cos, sin);
    rope(k, n, ld, kv_heads, head_dim, rot_dim, cos, sin);
    kv_write(kv, k, k + size_t(kv_heads * head_dim) * dtype_size(act_dtype()), ld, pos, n);
  }
  virtual void attention(const void* q, int64_t ldq, int64_t n, const int32_t* pos,
                         const KVLayerView& kv, const AttnParams& p, void* out, int64_t ldo) = 0;
  virtual void gated_act(const void* gu, int64_t n, int64_t inter, Activation a, void* out) = 0;
  // The gated MLP's first half as one op: gu[n, 2 * inter] = x . w^T (+ b) (gate rows, then up
  // rows), out[n, inter] = gated_act(gu). Both outputs are written as the two calls would write
  // them; a backend may run them as one kernel (CUDA does for decode-sized n: the activation is
  // the GEMV's epilogue, one launch and no round trip of gu less per layer).
  virtual void linear_gated_act(const void* x, int64_t n, int64_t ldx, const Tensor& w,
                                const Tensor* b, void* gu, int64_t inter, Activation a, void* out) {
    linear(x, n, ldx, w, b, gu, 2 * inter);
    gated_act(gu, n, inter, a, out);
  }
  virtual void act(void* x, int64_t count, Activation a) = 0;
  virtual void softcap(void* x, int64_t count, float cap) = 0;
  // Converts `count` activations to F32 (for logits read-back).
  virtual void to_f32(const void* x, int64_t count, float* host_out) = 0;
  // F32 logits y[n, out] = x[n, in] . w^T (+ bias, F32 [out], or nullptr), soft-capped when softcap
  // > 0: the LM head, kept in F32 so 16-bit engines do not round logits (greedy ties) before
  // sampling. x_f32: x is the F32 final hidden state (norm with f32_out) rather than activations.
  virtual void logits(const void* x, int64_t n, int64_t ldx, const Tensor& w, const Tensor* bias,
                      float softcap, float* y, bool x_f32 = false) = 0;
  // Picks one token per row of F32 logits [rows, vocab] (this device's memory) with the
  // settings of each row (host array); writes the ids to host memory. Synchronises. A row that
  // holds a NaN or +inf gets kNonFiniteLogits instead of a token: the model's output is broken,
  // and callers report it as an error (-inf is a banned token, not an error).
  virtual void sample(const float* logits, int64_t rows, int64_t vocab, const SampleParams* params,
                      int32_t* host_ids) = 0;
  // Applies `n` edits (host array; see LogitEdit) to F32 logits [rows, vocab] in this device's
  // memory, in place; pen[row] (host array of `rows`) holds each row's penalties. Returns at
  // once (the edits are copied before it returns).
  virtual void edit_logits(float* logits, int64_t rows, int64_t vocab, const RowPenalty* pen,
                           const LogitEdit* edits, int64_t n) = 0;
  // Log-probabilities of the model's distribution, log_softmax(logits[r]) in FP32, for rows of
  // F32 logits [rows, vocab] (this device's memory): lp[r] = the value of token ids[r] (host
  // array), and the k most likely tokens (logit desc, index asc) into top_ids / top_lp [rows, k]
  // (host arrays; k may be 0). Synchronises.
  virtual void logprobs(const float* logits, int64_t rows, int64_t vocab, const int32_t* ids,
                        int64_t k, float* lp, int32_t* top_ids, float* top_lp) = 0;
  // sample() without the wait: params and ids in this device's memory; returns at once.
  virtual void sample_async(const float* logits, int64_t rows, int64_t vocab,
                            const SampleParams* d_params, int32_t* d_ids) = 0;
  // Host memory that to_host_async() copies into (pinned on CUDA).
  virtual void* host_alloc(size_t bytes) { return alloc(bytes); }
  virtual void host_free(void* p) { release(p); }
  // Copies device memory into host_alloc() memory after the work issued so far; returns at once
  // (the CPU copies at once). Read the result after wait() on a later mark().
  virtual void to_host_async(void* dst, const void* src, size_t bytes) { to_host(dst, src, bytes); }
  // A marker after the work issued so far; wait(marker) blocks until that work is done. At
  // most 16 markers may be outstanding.
  virtual uint64_t mark() { return 0; }
  virtual void wait(uint64_t marker) {}
  // The native stream that work issued so far is ordered on (cudaStream_t; nullptr on the CPU,
  // where every op has finished when it returns), with any deferred op issued first: where
  // collectives (NCCL) go so that they follow the ops before them.
  virtual void* stream() { return nullptr; }
  // Makes many host weights resident at once (default: upload() each). Device backends may
  // allocate once and overlap reading the mapped file with the copies (engine load time).
  virtual std::vector<Tensor> upload_all(const std::vector<const Tensor*>& host) {
    std::vector<Tensor> r;
    r.reserve(host.size());
    for (const Tensor* t : host) r.push_back(upload(*t));
    return r;
  }

  // Decode-step graphs (CUDA graphs). Between capture_begin() and capture_end() the ops issued
  // are recorded, not run; replay() runs the recorded work with the buffers' current contents.
  // Backends without graphs return false from graphs() and are never asked to capture.
  class Graph {
   public:
    virtual ~Graph() = default;
  };
  virtual bool graphs() const { return false; }
  virtual void capture_begin() {}
  virtual std::unique_ptr<Graph> capture_end() { return nullptr; }
  virtual void replay(Graph& g) {}
  // Bumped whenever the backend frees or moves a buffer a captured graph may refer to (its
  // scratch grew): graphs captured under an older generation must not be replayed.
  virtual uint64_t generation() const { return 0; }
  // Device memory free now and in total (bytes); CPU backends return {0, 0}: no limit known.
  virtual std::pair<size_t, size_t> memory() const { return {0, 0}; }
  // MoE FFN: for each row, route (MoeParams) over `router` (+ router_bias), run the chosen
  // experts' gated FFNs (with their biases when given) and sum weighted; plus a shared expert
  // when given (scaled by sigmoid(x . shared_gate) when gated). Softmax over the top-k logits
  // alone (GPT-OSS) is softmax top-k with renorm: both give exp(l_e) / sum over the chosen.
  struct MoeWeights {
    const Tensor* router;
    const Tensor* const* gate_up;  // [num_experts]
    const Tensor* const* down;     // [num_experts]
    const Tensor* shared_gate_up;  // may be null
    const Tensor* shared_down;
    const Tensor* shared_gate;
    const Tensor* router_bias = nullptr;          // F32 [num_experts]
    const Tensor* const* gate_up_bias = nullptr;  // [num_experts] F32 [2 I], or nullptr
    const Tensor* const* down_bias = nullptr;     // [num_experts] F32 [hidden], or nullptr
    // Sigmoid routing (DeepSeek V3): F32 [num_experts] added to the scores to choose experts
    // (not to weight them); nullptr: none.
    const Tensor* score_bias = nullptr;
  };
  // Routing, per row of router logits l (F32 math, ties to the lower expert index):
  //   p = softmax(l) or sigmoid(l) (scoring); s = p + score_bias (when given);
  //   groups > 1: experts split into `groups` equal groups scored by their best s (softmax) or
  //   their two best s summed (sigmoid); only the topk_groups best groups stay eligible;
  //   the top_k eligible experts by s, weighted p_e, renormalised to sum 1 when renorm (sigmoid:
  //   sum + 1e-20, as DeepSeek V3), then times `scaling`.
  struct MoeParams {
    int64_t num_experts = 0, top_k = 1;
    bool renorm = true;
    Routing scoring = Routing::SoftmaxTopK;
    int64_t groups = 1, topk_groups = 1;
    float scaling = 1.0f;
    bool shared_gated = true;  // shared expert scaled by sigmoid(shared_gate) (else by 1)
  };
  virtual void moe_ffn(const void* x, int64_t n, int64_t hidden, const MoeWeights& w,
                       const MoeParams& p, Activation a, void* out) = 0;
  // Per-head linear: for each head h, y[:, h*out .. (h+1)*out) = x[:, h*in .. (h+1)*in) . W_h^T,
  // where w is [heads * out, in] and W_h its rows [h*out, (h+1)*out) (MLA's absorbed query and
  // output projections). Rows of x are ldx apart, of y ldy apart.
  virtual void head_linear(const void* x, int64_t n, int64_t ldx, int64_t heads, const Tensor& w,
                           void* y, int64_t ldy) = 0;
};

// Called by the CPU backend with the F32 input rows of every linear() before it runs (x[n, in],
// rows ldx apart) and the weight it multiplies: how calibration (build/awq.h) sees activations.
using LinearObserver = std::function<void(const float* x, int64_t n, int64_t ldx, const Tensor& w)>;
std::unique_ptr<Backend> make_cpu_backend(LinearObserver observe = {});
// CUDA backend whose activations and KV cache use `act` (the engine dtype: f32 engines compute
// in FP32, f16/bf16 engines in that type with FP32 accumulation). nullptr when kiln was built
// without CUDA or no GPU is visible.
std::unique_ptr<Backend> make_cuda_backend(DType act);
bool cuda_available();
// Makes GPU `local_rank` (modulo the GPUs visible) this thread's CUDA device, before its backend
// is made: the GPU of one rank of a multi-process engine. No-op without CUDA.
void cuda_use_device(int local_rank);
// "CUDA runtime X.Y, driver X.Y, cuBLASLt X.Y.Z" for `kiln --version`; "" without CUDA.
std::string cuda_versions();

}  // namespace kiln
