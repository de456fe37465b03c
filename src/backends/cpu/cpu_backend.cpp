// The CPU backend: FP32 activations, kernels from cpu_ops.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <numeric>
#include <vector>

#include "backends/cpu/cpu_ops.h"
#include "backends/cpu/cpu_sample.h"
#include "core/error.h"
#include "graph/backend.h"

namespace kiln {

namespace {

const float* fptr(const Tensor* t) {
  return t ? t->ptr<float>() : nullptr;
}
// How to dequantize weight w (quant None for a plain one).
cpu::QuantRef scales(const Tensor& w) {
  cpu::QuantRef q;
  q.quant = w.quant;
  if (w.scales) {
    q.scales = w.scales->ptr<float>();
    q.groups = w.scales->shape.size() == 2 ? w.scales->shape[1] : 1;
  }
  if (w.zero_points) q.zeros = w.zero_points->ptr<uint8_t>();
  if (w.input_perm) q.perm = w.input_perm->ptr<int32_t>();
  return q;
}
float* F(void* p) {
  return static_cast<float*>(p);
}
const float* F(const void* p) {
  return static_cast<const float*>(p);
}

cpu::KVView view(const KVLayerView& kv) {
  return {F(kv.k), F(kv.v),      kv.block_table, kv.block_size, kv.kv_dim,
          kv.seq,  kv.bt_stride, kv.k_scale,     kv.v_scale,    kv.head_dim};
}

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(LinearObserver observe) : observe_(std::move(observe)) {}
  Device device() const override { return Device::CPU; }
  std::string name() const override { return "CPU"; }
  DType act_dtype() const override { return DType::F32; }

  void* alloc(size_t bytes) override {
    void* p = std::aligned_alloc(64, (std::max<size_t>(bytes, 1) + 63) / 64 * 64);
    if (!p) throw std::bad_alloc();
    return p;
  }
  void release(void* p) override { std::free(p); }
  void to_device(void* dst, const void* src, size_t n) override { std::memcpy(dst, src, n); }
  void to_host(void* dst, const void* src, size_t n) override { std::memcpy(dst, src, n); }
  Tensor upload(const Tensor& host) override { return host; }

  void embed(const Tensor& t, const int32_t* ids, int64_t n, float scale, void* out,
             int64_t first) override {
    cpu::embed(t.data, t.dtype, t.shape[0], t.shape[1], ids, n, scale, F(out), first);
  }
  void add_rows(const Tensor& t, const int32_t* rows, int64_t n, void* x) override {
    cpu::add_rows(t.data, t.dtype, t.shape[1], rows, n, F(x));
  }
  void linear(const void* x, int64_t n, int64_t ldx, const Tensor& w, const Tensor* b, void* y,
              int64_t ldy) override {
    if (observe_) observe_(F(x), n, ldx, w);
    cpu::linear(F(x), n, w.in_features(), ldx, w.data, w.dtype, w.shape[0], fptr(b), F(y), ldy,
                scales(w));
  }
  void norm(const void* x, int64_t rows, int64_t dim, int64_t ldx, const Tensor& w, const Tensor* b,
            NormKind kind, float eps, void* y, int64_t ldy, bool, bool) override {
    cpu::norm(F(x), rows, dim, ldx, w.ptr<float>(), fptr(b), kind, eps, F(y), ldy);
  }
  void add_norm(void* r, const void* d, int64_t rows, int64_t dim, const Tensor& w, const Tensor* b,
                NormKind kind, float eps, void* y) override {
    cpu::add_norm(F(r), F(d), rows, dim, w.ptr<float>(), fptr(b), kind, eps, F(y));
  }
  void head_norm(void* x, int64_t n, int64_t ld, int64_t heads, int64_t hd, const Tensor& w,
                 NormKind kind, float eps, const Tensor* b) override {
    const bool per_head = heads > 1 && w.numel() == heads * hd;
    if (!per_head) {
      for (int64_t i = 0; i < n; ++i)
        cpu::norm(F(x) + i * ld, heads, hd, hd, w.ptr<float>(), fptr(b), kind, eps, F(x) + i * ld,
                  hd);
      return;
    }
    for (int64_t i = 0; i < n; ++i)
      for (int64_t h = 0; h < heads; ++h)
        cpu::norm(F(x) + i * ld + h * hd, 1, hd, hd, w.ptr<float>() + h * hd,
                  b ? fptr(b) + h * hd : nullptr, kind, eps, F(x) + i * ld + h * hd, hd);
  }
  void add(void* x, const void* y, int64_t count) override {
    for (int64_t i = 0; i < count; ++i) F(x)[i] += F(y)[i];
  }
  void copy_2d(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
               size_t rows) override {
    for (size_t r = 0; r < rows; ++r)
      std::memcpy(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch,
                  width);
  }
  void rope(void* x, int64_t n, int64_t ld, int64_t heads, int64_t hd, int64_t rot,
            const float* cos, const float* sin) override {
    cpu::rope(F(x), n, ld, heads, hd, rot, cos, sin);
  }
  void kv_write(const KVLayerView& kv, const void* k, const void* v, int64_t ld, const int32_t* pos,
                int64_t n) override {
    cpu::kv_write(view(kv), F(k), F(v), ld, pos, n);
  }
  void attention(const void* q, int64_t ldq, int64_t n, const int32_t* pos, const KVLayerView& kv,
                 const AttnParams& p, void* out, int64_t ldo) override {
    cpu::attention(F(q), ldq, n, pos, view(kv), p.heads, p.kv_heads, p.head_dim, p.scale, p.softcap,
                   p.window, p.sinks, F(out), ldo);
  }
  void gated_act(const void* gu, int64_t n, int64_t inter, Activation a, void* out) override {
    cpu::gated_act(F(gu), n, inter, a, F(out));
  }
  void act(void* x, int64_t count, Activation a) override { cpu::act_inplace(F(x), count, a); }
  void softcap(void* x, int64_t count, float cap) override { cpu::softcap(F(x), count, cap); }
  void to_f32(const void* x, int64_t count, float* out) override {
    std::memcpy(out, x, size_t(count) * 4);
  }
  void logits(const void* x, int64_t n, int64_t ldx, const Tensor& w, const Tensor* bias, float cap,
              float* y, bool) override {
    cpu::linear(F(x), n, w.in_features(), ldx, w.data, w.dtype, w.shape[0],
                bias ? F(bias->data) : nullptr, y, w.shape[0], scales(w));
    if (cap > 0) cpu::softcap(y, n * w.shape[0], cap);
  }
  void sample_async(const float* logits, int64_t rows, int64_t vocab, const SampleParams* params,
                    int32_t* ids) override {
    sample(logits, rows, vocab, params, ids);
  }
  void sample(const float* logits, int64_t rows, int64_t vocab, const SampleParams* params,
              int32_t* ids) override {
    for (int64_t r = 0; r < rows; ++r)
      ids[r] = cpu::sample_row(logits + r * vocab, vocab, params[r]);
  }

  void edit_logits(float* logits, int64_t rows, int64_t vocab, const RowPenalty* pen,
                   const LogitEdit* edits, int64_t n) override {
    cpu::edit_logits(logits, rows, vocab, pen, edits, n);
  }
  void logprobs(const float* logits, int64_t rows, int64_t vocab, const int32_t* ids, int64_t k,
                float* lp, int32_t* top_ids, float* top_lp) override {
    for (int64_t r = 0; r < rows; ++r)
      cpu::logprobs_row(logits + r * vocab, vocab, ids[r], k, lp + r, top_ids + r * k,
                        top_lp + r * k);
  }

  void moe_ffn(const void* xv, int64_t n, int64_t H, const MoeWeights& w, const MoeParams& mp,
               Activation a, void* outv) override {
    const float* x = F(xv);
    float* out = F(outv);
    const int64_t E = mp.num_experts;
    std::vector<float> logits(size_t(n * E));
    cpu::linear(x, n, H, H, w.router->data, w.router->dtype, E,
                w.router_bias ? F(w.router_bias->data) : nullptr, logits.data(), E);
    std::fill(out, out + n * H, 0.0f);
    std::vector<float> gu, h, y(static_cast<size_t>(H));
    std::vector<int64_t> chosen;
    for (int64_t i = 0; i < n; ++i) {
      float* p = logits.data() + i * E;  // becomes the scores p
      cpu::moe_route(p, E, mp, w.score_bias ? F(w.score_bias->data) : nullptr, chosen);
      float wsum = 0;
      for (int64_t e : chosen) wsum += p[e];
      if (mp.scoring == Routing::SigmoidTopK) wsum += 1e-20f;
      const float* xi = x + i * H;
      float* oi = out + i * H;
      auto run = [&](const Tensor& wgu, const Tensor& wd, float scale, const Tensor* bgu,
                     const Tensor* bd) {
        const int64_t I = wgu.shape[0] / 2;
        gu.resize(size_t(2 * I));
        h.resize(size_t(I));
        cpu::linear(xi, 1, H, H, wgu.data, wgu.dtype, 2 * I, bgu ? F(bgu->data) : nullptr,
                    gu.data(), 2 * I, scales(wgu));
        cpu::gated_act(gu.data(), 1, I, a, h.data());
        cpu::linear(h.data(), 1, I, I, wd.data, wd.dtype, H, bd ? F(bd->data) : nullptr, y.data(),
                    H, scales(wd));
        for (int64_t d = 0; d < H; ++d) oi[d] += scale * y[size_t(d)];
      };
      for (int64_t e : chosen)
        run(*w.gate_up[e], *w.down[e], (mp.renorm ? p[e] / wsum : p[e]) * mp.scaling,
            w.gate_up_bias ? w.gate_up_bias[e] : nullptr, w.down_bias ? w.down_bias[e] : nullptr);
      if (w.shared_gate_up) {
        float g = 1.0f;
        if (mp.shared_gated) {
          cpu::linear(xi, 1, H, H, w.shared_gate->data, w.shared_gate->dtype, 1, nullptr, &g, 1);
          g = 1.0f / (1.0f + std::exp(-g));
        }
        run(*w.shared_gate_up, *w.shared_down, g, nullptr, nullptr);
      }
    }
  }

  void head_linear(const void* x, int64_t n, int64_t ldx, int64_t heads, const Tensor& w, void* y,
                   int64_t ldy) override {
    KILN_CHECK(w.quant == WeightQuant::None && w.shape.size() == 2 && w.shape[0] % heads == 0,
               "head_linear: the weight must be a plain [heads * out, in] matrix");
    const int64_t out = w.shape[0] / heads, in = w.shape[1];
    const size_t head_bytes = size_t(out * in) * dtype_size(w.dtype);
    for (int64_t hh = 0; hh < heads; ++hh)
      cpu::linear(F(x) + hh * in, n, in, ldx, static_cast<const char*>(w.data) + hh * head_bytes,
                  w.dtype, out, nullptr, F(y) + hh * out, ldy);
  }

 private:
  LinearObserver observe_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(LinearObserver observe) {
  return std::make_unique<CpuBackend>(std::move(observe));
}

#ifndef KILN_HAVE_CUDA
std::unique_ptr<Backend> make_cuda_backend(DType) {
  return nullptr;
}
bool cuda_available() {
  return false;
}
void cuda_use_device(int) {}
std::string cuda_versions() {
  return "";
}
#endif

}  // namespace kiln
