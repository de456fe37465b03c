// The op vocabulary of the shared decoder graph, behind one interface per device. Activations
// are opaque device pointers of the backend's activation dtype; weights are Tensors the backend
// made resident with upload(). Integer side inputs (token ids, positions, block tables) and the
// RoPE cos/sin tables are device pointers made with to_device().
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

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
  // backends can size attention launches without reading positions back; 0: unknown.
  int64_t len = 0;
};

struct AttnParams {
  int64_t heads, kv_heads, head_dim;
  float scale;
  float softcap;   // 0: off
  int64_t window;  // 0: full causal
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

  virtual void embed(const Tensor& table, const int32_t* ids, int64_t n, float scale,
                     void* out) = 0;
  virtual void add_rows(const Tensor& table, const int32_t* rows, int64_t n, void* x) = 0;
  // y[n, out] = x[n, in] . w^T (+ b)
  virtual void linear(const void* x, int64_t n, int64_t ldx, const Tensor& w, const Tensor* b,
                      void* y, int64_t ldy) = 0;
  virtual void norm(const void* x, int64_t rows, int64_t dim, int64_t ldx, const Tensor& w,
                    const Tensor* b, NormKind kind, float eps, void* y, int64_t ldy) = 0;
  // residual += delta; y = norm(residual)
  virtual void add_norm(void* residual, const void* delta, int64_t rows, int64_t dim,
                        const Tensor& w, const Tensor* b, NormKind kind, float eps, void* y) = 0;
  // In place over `heads` vectors of `head_dim` per row (q/k norms); rows are `ld` apart.
  virtual void head_norm(void* x, int64_t n, int64_t ld, int64_t heads, int64_t head_dim,
                         const Tensor& w, NormKind kind, float eps) = 0;
  virtual void add(void* x, const void* y, int64_t count) = 0;  // x += y
  virtual void rope(void* x, int64_t n, int64_t ld, int64_t heads, int64_t head_dim,
                    int64_t rot_dim, const float* cos, const float* sin) = 0;
  virtual void kv_write(const KVLayerView& kv, const void* k, const void* v, int64_t ld,
                        const int32_t* pos, int64_t n) = 0;
  virtual void attention(const void* q, int64_t ldq, int64_t n, const int32_t* pos,
                         const KVLayerView& kv, const AttnParams& p, void* out, int64_t ldo) = 0;
  virtual void gated_act(const void* gu, int64_t n, int64_t inter, Activation a, void* out) = 0;
  virtual void act(void* x, int64_t count, Activation a) = 0;
  virtual void softcap(void* x, int64_t count, float cap) = 0;
  // Converts `count` activations to F32 (for logits read-back).
  virtual void to_f32(const void* x, int64_t count, float* host_out) = 0;
  // MoE FFN: for each row, route over `router` (softmax top-k, optional renorm), run the chosen
  // experts' gated FFNs and sum weighted; plus a sigmoid-gated shared expert when given.
  struct MoeWeights {
    const Tensor* router;
    const Tensor* const* gate_up;  // [num_experts]
    const Tensor* const* down;     // [num_experts]
    const Tensor* shared_gate_up;  // may be null
    const Tensor* shared_down;
    const Tensor* shared_gate;
  };
  virtual void moe_ffn(const void* x, int64_t n, int64_t hidden, const MoeWeights& w,
                       int64_t num_experts, int64_t top_k, bool renorm, Activation a,
                       void* out) = 0;
};

std::unique_ptr<Backend> make_cpu_backend();
// CUDA backend whose activations and KV cache use `act` (the engine dtype: f32 engines compute
// in FP32, f16/bf16 engines in that type with FP32 accumulation). nullptr when kiln was built
// without CUDA or no GPU is visible.
std::unique_ptr<Backend> make_cuda_backend(DType act);
bool cuda_available();

}  // namespace kiln
