// The CUDA backend: activations and KV cache in the engine dtype (F32, F16 or BF16), FP32
// accumulation everywhere. One stream; weights are uploaded once with cudaMalloc; the only
// host/device synchronisation inside a forward is the Decoder's final logits read-back.
//
// linear() takes the hand-written GEMV for decode-sized inputs (n <= 2 rows) and cuBLASLt
// otherwise. Environment switches, for measurements:
//   KILN_CUDA_GEMV=0     cuBLASLt for every product
//   KILN_CUDA_PDL=0      plain launches (no programmatic dependent launch)
//   KILN_CUDA_PROFILE=1  GPU time per op kind, printed to stderr when the backend goes away
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <vector>

#include "backends/cpu/cpu_sample.h"
#include "backends/cuda/cuda_common.h"
#include "backends/cuda/cuda_expert_tables.h"
#include "backends/cuda/cuda_fp8.h"
#include "backends/cuda/cuda_gemm.h"
#include "backends/cuda/cuda_kernels.h"
#include "backends/cuda/cuda_logits.h"
#include "backends/cuda/cuda_profile.h"
#include "backends/cuda/cuda_quant_linear.h"
#include "backends/cuda/cuda_sample.h"
#include "backends/cuda/cuda_upload.h"
#include "graph/backend.h"

namespace kiln {

namespace {

const float* fptr(const Tensor* t) {
  return t ? t->ptr<float>() : nullptr;
}

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(DType act) : act_(act) {
    KILN_CHECK(act == DType::F32 || act == DType::F16 || act == DType::BF16,
               "CUDA backend: engine dtype must be f32, f16 or bf16 (got ", dtype_name(act), ")");
    KILN_CUDA_CHECK(cudaGetDevice(&device_));
    cudaDeviceProp prop{};
    KILN_CUDA_CHECK(cudaGetDeviceProperties(&prop, device_));
    name_ = cat("CUDA (", prop.name, ")");
    sms_ = prop.multiProcessorCount;
    // A blocking stream: it also orders against anything issued on the legacy default stream.
    KILN_CUDA_CHECK(cudaStreamCreate(&stream_));
    lt_ = std::make_unique<cuda::LtGemm>(stream_);
    const char* g = std::getenv("KILN_CUDA_GEMV");
    gemv_ = !(g && std::strcmp(g, "0") == 0);
    const char* pr = std::getenv("KILN_CUDA_PROFILE");
    if (pr && std::strcmp(pr, "0") != 0) prof_ = std::make_unique<OpProfile>(stream_);
    KILN_CUDA_CHECK(cudaMallocHost(&pinned_, kPinnedBytes));
    for (auto& e : chunk_done_)
      KILN_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    for (auto& e : mark_events_)
      KILN_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  }

  ~CudaBackend() override {
    // Nothing here may throw; work in flight is drained first so frees are safe.
    cudaStreamSynchronize(stream_);
    if (prof_) {
      try {
        prof_->harvest(false);
        prof_->report();
      } catch (const Error&) {
      }
      prof_.reset();
    }
    lt_.reset();
    for (auto& [k, p] : scratch_) cudaFree(p.first);
    for (cudaEvent_t e : chunk_done_) cudaEventDestroy(e);
    for (cudaEvent_t e : mark_events_) cudaEventDestroy(e);
    cudaFreeHost(pinned_);
    cudaStreamDestroy(stream_);
  }

  Device device() const override { return Device::CUDA; }
  std::string name() const override { return name_; }
  DType act_dtype() const override { return act_; }

  void* alloc(size_t bytes) override {
    void* p = nullptr;
    KILN_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(bytes, 1)));
    return p;
  }
  // Called from destructors (Decoder, KVCache): never throws.
  void release(void* p) override {
    if (p) cudaFree(p);
  }
  // Pageable sources are staged by the driver before the call returns, so callers may reuse
  // their buffers at once; the copy stays ordered on the stream.
  void to_device(void* dst, const void* src, size_t bytes) override {
    if (bytes) KILN_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_));
  }
  void to_host(void* dst, const void* src, size_t bytes) override {
    if (!bytes) return;
    if (bytes >= kChunkBytes) return read_pinned(src, bytes, dst);
    KILN_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
    KILN_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  void synchronize() override { KILN_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

  Tensor upload(const Tensor& host) override {
    KILN_CHECK(host.device == Device::CPU, "upload: tensor is already on a device");
    if (host.quant != WeightQuant::None) {  // a quantized weight: scales, zeros, order go with it
      Tensor plain = host;
      plain.quant = WeightQuant::None;
      plain.scales = plain.zero_points = plain.input_perm = nullptr;
      Tensor t = upload(plain);
      t.quant = host.quant;
      if (host.scales) t.scales = std::make_shared<Tensor>(upload(*host.scales));
      if (host.zero_points) t.zero_points = std::make_shared<Tensor>(upload(*host.zero_points));
      if (host.input_perm) t.input_perm = std::make_shared<Tensor>(upload(*host.input_perm));
      cuda::relayout_quant_weight(t, stream_);
      return t;
    }
    const size_t bytes = host.nbytes();
    void* p = alloc(bytes);
    std::shared_ptr<void> owner(p, [](void* q) { cudaFree(q); });
    // On the stream, so the kernels that read the weight are ordered after the copy.
    if (bytes)
      KILN_CUDA_CHECK(cudaMemcpyAsync(p, host.data, bytes, cudaMemcpyHostToDevice, stream_));
    Tensor t = Tensor::view(host.dtype, host.shape, owner, p);
    t.device = Device::CUDA;
    return t;
  }
  std::vector<Tensor> upload_all(const std::vector<const Tensor*>& host) override {
    return cuda::upload_all(host, stream_);
  }

  std::pair<size_t, size_t> memory() const override {
    size_t free = 0, total = 0;
    KILN_CUDA_CHECK(cudaMemGetInfo(&free, &total));
    return {free, total};
  }

  // CUDA graphs. Not while profiling: the profiler's events would be captured too.
  bool graphs() const override { return !prof_; }
  void capture_begin() override {
    KILN_CHECK(!capturing_, "CUDA graph capture already in progress");
    KILN_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    capturing_ = true;
  }
  std::unique_ptr<Graph> capture_end() override {
    KILN_CHECK(capturing_, "no CUDA graph capture in progress");
    capturing_ = false;
    cudaGraph_t g = nullptr;
    const cudaError_t e = cudaStreamEndCapture(stream_, &g);
    auto out = std::make_unique<CudaGraph>();
    out->graph = g;
    KILN_CUDA_CHECK(e);
    KILN_CUDA_CHECK(cudaGraphInstantiate(&out->exec, g, 0));
    return out;
  }
  void replay(Graph& g) override {
    KILN_CUDA_CHECK(cudaGraphLaunch(static_cast<CudaGraph&>(g).exec, stream_));
  }
  uint64_t generation() const override { return generation_; }

  void embed(const Tensor& table, const int32_t* ids, int64_t n, float scale, void* out,
             int64_t first) override {
    Prof prof(prof_.get(), "embed");
    cuda::embed(act_, table.data, table.dtype, table.shape[0], table.shape[1], ids, n, scale, out,
                stream_, true, first);
  }
  void add_rows(const Tensor& table, const int32_t* rows, int64_t n, void* x) override {
    Prof prof(prof_.get(), "add_rows");
    cuda::add_rows(act_, table.data, table.dtype, table.shape[1], rows, n, x, stream_, true);
  }

  void linear(const void* x, int64_t n, int64_t ldx, const Tensor& w, const Tensor* b, void* y,
              int64_t ldy) override {
    Prof prof(prof_.get(), "linear");
    linear_impl(x, n, ldx, w, b, y, ldy);
  }
  void linear_gated_act(const void* x, int64_t n, int64_t ldx, const Tensor& w, const Tensor* b,
                        void* gu, int64_t inter, Activation a, void* out) override {
    Prof prof(prof_.get(), "linear_gated_act");
    gated_impl(x, n, ldx, w, b, gu, inter, a, out);
  }

  void norm(const void* x, int64_t rows, int64_t dim, int64_t ldx, const Tensor& w, const Tensor* b,
            NormKind kind, float eps, void* y, int64_t ldy, bool residual_in,
            bool f32_out) override {
    Prof prof(prof_.get(), "norm");
    check_f32(w, b);
    KILN_CHECK(!f32_out || residual_in || act_ == DType::F32,
               "CUDA norm: an F32 output needs the F32 residual stream as input");
    // F32 in and out is the F32 instantiation, whatever the engine dtype.
    cuda::norm(f32_out ? DType::F32 : act_, x, rows, 1, dim, ldx, y, ldy, w.ptr<float>(), fptr(b),
               kind, eps, stream_, nullptr, 0, residual_in);
  }
  void add_norm(void* residual, const void* delta, int64_t rows, int64_t dim, const Tensor& w,
                const Tensor* b, NormKind kind, float eps, void* y) override {
    Prof prof(prof_.get(), "add_norm");
    check_f32(w, b);
    cuda::add_norm(act_, residual, delta, rows, dim, w.ptr<float>(), fptr(b), kind, eps, y, stream_,
                   true);
  }
  void head_norm(void* x, int64_t n, int64_t ld, int64_t heads, int64_t head_dim, const Tensor& w,
                 NormKind kind, float eps, const Tensor* b) override {
    Prof prof(prof_.get(), "head_norm");
    check_f32(w, b);
    cuda::norm(act_, x, n, heads, head_dim, ld, x, ld, w.ptr<float>(), fptr(b), kind, eps, stream_,
               nullptr, 0, false, nullptr, per_head(w, heads, head_dim));
  }
  // One launch over the q and the k heads, two weight vectors.
  void qk_norm(void* x, int64_t n, int64_t ld, int64_t q_heads, int64_t k_heads, int64_t head_dim,
               const Tensor& wq, const Tensor& wk, NormKind kind, float eps, const Tensor* bq,
               const Tensor* bk) override {
    Prof prof(prof_.get(), "head_norm");
    check_f32(wq, bq);
    check_f32(wk, bk);
    const bool pq = per_head(wq, q_heads, head_dim);
    if (pq != per_head(wk, k_heads, head_dim) || (bq != nullptr) != (bk != nullptr))
      return Backend::qk_norm(x, n, ld, q_heads, k_heads, head_dim, wq, wk, kind, eps, bq, bk);
    cuda::norm(act_, x, n, q_heads + k_heads, head_dim, ld, x, ld, wq.ptr<float>(), fptr(bq), kind,
               eps, stream_, wk.ptr<float>(), q_heads, false, fptr(bk), pq);
  }
  void add(void* x, const void* y, int64_t count) override {
    Prof prof(prof_.get(), "add");
    cuda::add(act_, x, y, count, stream_);
  }
  void copy_2d(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
               size_t rows) override {
    if (width && rows)
      KILN_CUDA_CHECK(cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, rows,
                                        cudaMemcpyDeviceToDevice, stream_));
  }
  void* stream() override { return stream_; }
  void rope(void* x, int64_t n, int64_t ld, int64_t heads, int64_t head_dim, int64_t rot_dim,
            const float* cos, const float* sin) override {
    Prof prof(prof_.get(), "rope");
    cuda::rope(act_, x, n, ld, heads, head_dim, rot_dim, cos, sin, stream_);
  }
  void kv_write(const KVLayerView& kv, const void* k, const void* v, int64_t ld, const int32_t* pos,
                int64_t n) override {
    Prof prof(prof_.get(), "kv_write");
    kv_write_impl(kv, k, v, ld, pos, n);
  }
  // One launch for a 16-bit cache; an FP8 cache's per-head amax needs the roped k first, so
  // there the rope (q and k at once) and the write are two.
  void rope_kv_write(void* x, int64_t n, int64_t ld, int64_t q_heads, int64_t kv_heads,
                     int64_t head_dim, int64_t rot_dim, const float* cos, const float* sin,
                     const KVLayerView& kv, const int32_t* pos) override {
    Prof prof(prof_.get(), "rope_kv_write");
    const size_t es = dtype_size(act_);
    char* k = static_cast<char*>(x) + size_t(q_heads * head_dim) * es;
    const char* v = k + size_t(kv_heads * head_dim) * es;
    if (kv.fp8() || kv.kv_dim != kv_heads * head_dim) {
      cuda::rope(act_, x, n, ld, q_heads + kv_heads, head_dim, rot_dim, cos, sin, stream_);
      return kv_write_impl(kv, k, v, ld, pos, n);
    }
    cuda::rope_kv_write(act_, x, n, ld, q_heads + kv_heads, q_heads, head_dim, rot_dim, cos, sin,
                        kv.k, kv.v, kv.block_table, kv.block_size, kv.kv_dim, v, pos, stream_,
                        kv.seq, kv.bt_stride);
  }

  void attention(const void* q, int64_t ldq, int64_t n, const int32_t* pos, const KVLayerView& kv,
                 const AttnParams& p, void* out, int64_t ldo) override {
    Prof prof(prof_.get(), "attention");
    if (n == 0) return;
    int64_t len = kv.len;
    if (len <= 0) {  // caller did not say: read the positions back (a sync; the Decoder says)
      KILN_CHECK(!capturing_, "attention: the cache length must be given while capturing");
      std::vector<int32_t> h(static_cast<size_t>(n));
      to_host(h.data(), pos, size_t(n) * 4);
      len = int64_t(*std::max_element(h.begin(), h.end())) + 1;
    }
    const cuda::AttnLaunch a{q,
                             ldq,
                             n,
                             pos,
                             kv.k,
                             kv.v,
                             kv.block_table,
                             kv.block_size,
                             kv.kv_dim,
                             p.heads,
                             p.kv_heads,
                             p.head_dim,
                             p.scale,
                             p.softcap,
                             p.window,
                             p.sinks,
                             len,
                             out,
                             ldo,
                             kv.seq,
                             kv.bt_stride,
                             kv.seq_start,
                             kv.num_seqs,
                             kv.num_decode,
                             kv.max_q,
                             kv.k_scale,
                             kv.v_scale};
    const size_t ws = cuda::attention_workspace(a, sms_);
    const size_t nc = cuda::attention_counters(a, sms_);
    cuda::attention(act_, a, ws ? static_cast<float*>(scratch("attn_ws", ws)) : nullptr,
                    nc ? static_cast<int*>(scratch("attn_counters", nc * 4, true)) : nullptr, sms_,
                    stream_);
  }

  void gated_act(const void* gu, int64_t n, int64_t inter, Activation a, void* out) override {
    Prof prof(prof_.get(), "gated_act");
    cuda::gated_act(act_, gu, n, inter, a, out, stream_);
  }
  void act(void* x, int64_t count, Activation a) override {
    Prof prof(prof_.get(), "act");
    cuda::act_inplace(act_, x, count, a, stream_);
  }
  void softcap(void* x, int64_t count, float cap) override {
    Prof prof(prof_.get(), "softcap");
    cuda::softcap(act_, x, count, cap, stream_);
  }

  void to_f32(const void* x, int64_t count, float* host_out) override {
    if (count <= 0) return;
    Prof prof(prof_.get(), "to_f32");
    const float* src = static_cast<const float*>(x);
    if (act_ != DType::F32) {
      float* f = static_cast<float*>(scratch("to_f32", size_t(count) * 4));
      cuda::to_f32(act_, x, count, f, stream_);
      src = f;
    }
    read_pinned(src, size_t(count) * 4, host_out);
    if (prof_) prof_->harvest(true);
  }

  void logits(const void* x, int64_t n, int64_t ldx, const Tensor& w, const Tensor* bias, float cap,
              float* y, bool x_f32) override {
    Prof prof(prof_.get(), "logits");
    KILN_CHECK(!bias || bias->dtype == DType::F32, "CUDA logits: the LM head bias must be F32");
    const bool quant = w.quant != WeightQuant::None;
    KILN_CHECK(quant || w.dtype == act_, "CUDA logits: weight dtype ", dtype_name(w.dtype),
               " differs from the activation dtype ", dtype_name(act_));
    const int64_t in = w.in_features(), out = w.shape[0];
    if (n == 0 || out == 0) return;
    x_f32 = x_f32 && act_ != DType::F32;
    if (quant) {  // --quant-lm-head: the linears' kernels with F32 outputs, on 16-bit inputs
      if (x_f32) x = round_rows(x, n, ldx, in), ldx = in;
      cuda::QuantLinearParams q = quant_params(x, n, ldx, w, bias, y, out);
      q.y_f32 = true;
      cuda::quant_linear(
          q, *lt_, [this](const char* name, size_t bytes) { return scratch(name, bytes); },
          stream_);
      if (cap > 0) cuda::softcap_f32(y, n * out, cap, stream_);
      return;
    }
    if (gemv_ &&
        cuda::gemv(act_, x, n, ldx, w.data, in, out, nullptr, y, out, stream_, true, x_f32)) {
      if (bias) cuda::bias_add(DType::F32, y, n, out, out, bias->ptr<float>(), stream_);
      if (cap > 0) cuda::softcap_f32(y, n * out, cap, stream_);
      return;
    }
    if (x_f32) x = round_rows(x, n, ldx, in), ldx = in;  // cuBLASLt multiplies like types
    lt_->run(act_, x, n, ldx, w.data, in, out, y, out, true);
    if (bias) cuda::bias_add(DType::F32, y, n, out, out, bias->ptr<float>(), stream_);
    if (cap > 0) cuda::softcap_f32(y, n * out, cap, stream_);
  }
  // F32 rows x[n, in] (ldx apart) rounded to the activation type, in scratch [n, in].
  void* round_rows(const void* x, int64_t n, int64_t ldx, int64_t in) {
    const size_t es = dtype_size(act_);
    void* xr = scratch("logits_x", size_t(n * in) * es);
    if (ldx == in) {  // contiguous rows (the decoder's): one launch
      cuda::from_f32(act_, static_cast<const float*>(x), n * in, xr, stream_);
      return xr;
    }
    for (int64_t i = 0; i < n; ++i)
      cuda::from_f32(act_, static_cast<const float*>(x) + i * ldx, in,
                     static_cast<char*>(xr) + size_t(i * in) * es, stream_);
    return xr;
  }

  void sample_async(const float* logits, int64_t rows, int64_t vocab, const SampleParams* d_params,
                    int32_t* d_ids) override {
    Prof prof(prof_.get(), "sample");
    if (rows <= 0) return;
    const size_t wsb = cuda::sample_workspace(rows, vocab);
    cuda::sample(logits, rows, vocab, d_params, d_ids, wsb ? scratch("sample_ws", wsb) : nullptr,
                 stream_);
  }
  // The host edits go up in one copy from pageable memory, which the driver stages before the
  // call returns (the caller may drop them at once) without waiting for the GPU; then one kernel.
  // Not capturable: a captured copy would re-read the host buffer at every replay.
  void edit_logits(float* logits, int64_t rows, int64_t vocab, const RowPenalty* pen,
                   const LogitEdit* edits, int64_t n) override {
    Prof prof(prof_.get(), "edit_logits");
    if (n <= 0) return;
    KILN_CHECK(!capturing_, "edit_logits: not inside a graph capture (it copies host edits)");
    KILN_CHECK(pen && edits, "edit_logits: null penalties or edits");
    cpu::check_edits(rows, vocab, edits, n);
    // Penalties, then entries: both 4-byte aligned, sizes multiples of 4.
    const size_t pb = size_t(rows) * sizeof(RowPenalty), eb = size_t(n) * sizeof(LogitEdit);
    std::vector<char> host(pb + eb);
    std::memcpy(host.data(), pen, pb);
    std::memcpy(host.data() + pb, edits, eb);
    char* d = static_cast<char*>(scratch("edit_logits", grown(pb + eb)));
    KILN_CUDA_CHECK(cudaMemcpyAsync(d, host.data(), pb + eb, cudaMemcpyHostToDevice, stream_));
    cuda::edit_logits(logits, vocab, reinterpret_cast<const RowPenalty*>(d),
                      reinterpret_cast<const LogitEdit*>(d + pb), n, stream_);
  }
  // Ids up and results back through the pinned buffer (as sample()), one sync at the end.
  void logprobs(const float* logits, int64_t rows, int64_t vocab, const int32_t* ids, int64_t k,
                float* lp, int32_t* top_ids, float* top_lp) override {
    Prof prof(prof_.get(), "logprobs");
    if (rows <= 0) return;
    KILN_CHECK(!capturing_, "logprobs: not inside a graph capture (it reads results back)");
    for (int64_t r = 0; r < rows; ++r)
      KILN_CHECK(ids[r] >= 0 && ids[r] < vocab, "logprobs: token ", ids[r],
                 " outside the vocabulary");
    const size_t ib = size_t(rows) * 4, tb = size_t(rows * k) * 4, ob = ib + 2 * tb;
    KILN_CHECK(ib + ob <= kPinnedBytes, "logprobs: too many rows (", rows, ")");
    char* d = static_cast<char*>(scratch("logprobs", grown(ib + ob)));
    auto* d_lp = reinterpret_cast<float*>(d + ib);
    auto* d_top_ids = reinterpret_cast<int32_t*>(d + 2 * ib);
    auto* d_top_lp = reinterpret_cast<float*>(d + 2 * ib + tb);
    std::memcpy(pinned_, ids, ib);
    KILN_CUDA_CHECK(cudaMemcpyAsync(d, pinned_, ib, cudaMemcpyHostToDevice, stream_));
    cuda::logprobs(logits, rows, vocab, reinterpret_cast<const int32_t*>(d), k, d_lp, d_top_ids,
                   d_top_lp, stream_);
    char* back = static_cast<char*>(pinned_) + ib;
    KILN_CUDA_CHECK(cudaMemcpyAsync(back, d_lp, ob, cudaMemcpyDeviceToHost, stream_));
    KILN_CUDA_CHECK(cudaStreamSynchronize(stream_));
    std::memcpy(lp, back, ib);
    if (k > 0) {
      std::memcpy(top_ids, back + ib, tb);
      std::memcpy(top_lp, back + ib + tb, tb);
    }
    if (prof_) prof_->harvest(true);
  }
  // Scratch sizes for buffers whose need creeps up (edits grow with the generated text): powers
  // of two from 64 KiB, so the scratch grows, and drops captured graphs, a few times at most.
  static size_t grown(size_t bytes) {
    size_t b = size_t(64) << 10;
    while (b < bytes) b <<= 1;
    return b;
  }
  void* host_alloc(size_t bytes) override {
    void* p = nullptr;
    KILN_CUDA_CHECK(cudaMallocHost(&p, std::max<size_t>(bytes, 1)));
    return p;
  }
  void host_free(void* p) override {
    try {
      synchronize();  // a copy into it may be pending
    } catch (const Error&) {
    }
    if (p) cudaFreeHost(p);
  }
  void to_host_async(void* dst, const void* src, size_t bytes) override {
    if (bytes) KILN_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
  }
  uint64_t mark() override {
    const uint64_t m = marks_++;
    KILN_CUDA_CHECK(cudaEventRecord(mark_events_[m % kMarks], stream_));
    return m;
  }
  void wait(uint64_t m) override {
    KILN_CHECK(m < marks_ && marks_ - m <= kMarks, "wait: marker ", m, " is not outstanding");
    KILN_CUDA_CHECK(cudaEventSynchronize(mark_events_[m % kMarks]));
    if (prof_) {  // the profile's events of later queued work must be complete to be read
      synchronize();
      prof_->harvest(true);
    }
  }

  void sample(const float* logits, int64_t rows, int64_t vocab, const SampleParams* params,
              int32_t* host_ids) override {
    Prof prof(prof_.get(), "sample");
    if (rows <= 0) return;
    KILN_CHECK(!capturing_, "sample: not inside a graph capture (it reads results back)");
    const size_t pb = size_t(rows) * sizeof(SampleParams), ib = size_t(rows) * 4;
    KILN_CHECK(pb + ib <= kPinnedBytes, "sample: too many rows (", rows, ")");
    auto* dp = static_cast<SampleParams*>(scratch("sample_params", pb));
    auto* di = static_cast<int32_t*>(scratch("sample_ids", ib));
    const size_t wsb = cuda::sample_workspace(rows, vocab);
    void* ws = wsb ? scratch("sample_ws", wsb) : nullptr;
    // Pinned staging both ways: an async copy from pageable memory is staged synchronously.
    std::memcpy(pinned_, params, pb);
    KILN_CUDA_CHECK(cudaMemcpyAsync(dp, pinned_, pb, cudaMemcpyHostToDevice, stream_));
    cuda::sample(logits, rows, vocab, dp, di, ws, stream_);
    char* back = static_cast<char*>(pinned_) + pb;
    KILN_CUDA_CHECK(cudaMemcpyAsync(back, di, ib, cudaMemcpyDeviceToHost, stream_));
    KILN_CUDA_CHECK(cudaStreamSynchronize(stream_));
    std::memcpy(host_ids, back, ib);
    if (prof_) prof_->harvest(true);
  }

 private:
  struct CudaGraph final : Graph {
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    ~CudaGraph() override {
      if (exec) cudaGraphExecDestroy(exec);
      if (graph) cudaGraphDestroy(graph);
    }
  };

  // Device-to-host through the pinned buffer (a pageable destination is copied at a fraction of
  // the bus speed), in chunks, so the host copy of one chunk overlaps the transfer of the next.
  void read_pinned(const void* src, size_t total, void* host_out) {
    const char* s = reinterpret_cast<const char*>(src);
    char* h = reinterpret_cast<char*>(host_out);
    for (size_t g = 0; g < total; g += kPinnedBytes) {
      const size_t gb = std::min(kPinnedBytes, total - g);
      const size_t chunks = (gb + kChunkBytes - 1) / kChunkBytes;
      for (size_t c = 0; c < chunks; ++c) {
        const size_t off = c * kChunkBytes, m = std::min(kChunkBytes, gb - off);
        KILN_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(pinned_) + off, s + g + off, m,
                                        cudaMemcpyDeviceToHost, stream_));
        KILN_CUDA_CHECK(cudaEventRecord(chunk_done_[c], stream_));
      }
      for (size_t c = 0; c < chunks; ++c) {
        const size_t off = c * kChunkBytes, m = std::min(kChunkBytes, gb - off);
        KILN_CUDA_CHECK(cudaEventSynchronize(chunk_done_[c]));
        std::memcpy(h + g + off, static_cast<char*>(pinned_) + off, m);
      }
    }
  }

 public:
  void moe_ffn(const void* x, int64_t n, int64_t H, const MoeWeights& w, const MoeParams& mp,
               Activation a, void* out) override {
    const int64_t E = mp.num_experts, k = mp.top_k;
    Prof prof(prof_.get(), "moe_ffn");
    if (n == 0) return;
    const size_t es = dtype_size(act_);
    const int64_t I = w.gate_up[0]->shape[0] / 2, nk = n * k;
    auto* logits = static_cast<float*>(scratch("moe_logits", size_t(n * E) * 4));
    auto* sel_row = static_cast<int32_t*>(scratch("moe_rows", size_t(nk) * 4));
    auto* sel_exp = static_cast<int32_t*>(scratch("moe_experts", size_t(nk) * 4));
    auto* weights = static_cast<float*>(scratch("moe_weights", size_t(nk) * 4));
    // Router logits in F32, as the CPU reference routes: 16-bit logits would tie or swap experts
    // whose scores differ past the third significant digit.
    KILN_CHECK(w.router->quant == WeightQuant::None && w.router->dtype == act_,
               "CUDA MoE: the router must be a plain matrix in the activation dtype");
    // The LM head's calls (logits()): the F32-output GEMV for few rows, else cuBLASLt.
    if (!gemv_ ||
        !cuda::gemv(act_, x, n, H, w.router->data, H, E, nullptr, logits, E, stream_, true, false))
      lt_->run(act_, x, n, H, w.router->data, H, E, logits, E, true);
    if (w.router_bias)
      cuda::bias_add(DType::F32, logits, n, E, E, w.router_bias->ptr<float>(), stream_);
    const cuda::MoeRouteArgs ra{
        E,
        mp.top_k,
        mp.renorm,
        mp.scoring == Routing::SigmoidTopK,
        w.score_bias ? static_cast<const float*>(w.score_bias->data) : nullptr,
        int(mp.groups),
        int(mp.topk_groups),
        mp.scaling};
    cuda::moe_route(DType::F32, logits, n, ra, sel_row, sel_exp, weights, stream_);
    const float* const* bgu = w.gate_up_bias ? bias_table(w.gate_up_bias, E) : nullptr;
    const float* const* bdn = w.down_bias ? bias_table(w.down_bias, E) : nullptr;
    // Routed experts: gathered GEMVs over (row, expert) assignments, reading only the chosen
    // experts' weights (a grouped GEMM for long prompts is future work).
    void* gu = scratch("moe_gu", size_t(nk * 2 * I) * es);
    void* h = scratch("moe_h", size_t(nk * I) * es);
    void* ye = scratch("moe_ye", size_t(nk * H) * es);
    cuda::gemv_gather(act_, x, H, expert_table(w.gate_up, E), sel_row, sel_exp, nk, H, 2 * I, gu,
                      stream_);
    cuda::gated_act(act_, gu, nk, I, a, h, stream_, bgu, sel_exp);
    cuda::gemv_gather(act_, h, I, expert_table(w.down, E), nullptr, sel_exp, nk, I, H, ye, stream_);
    const void* ys = nullptr;
    const void* gate = nullptr;
    if (w.shared_gate_up) {
      const int64_t Is = w.shared_gate_up->shape[0] / 2;
      void* sgu = scratch("moe_sgu", size_t(n * 2 * Is) * es);
      void* sh = scratch("moe_sh", size_t(n * Is) * es);
      void* sy = scratch("moe_sy", size_t(n * H) * es);
      gated_impl(x, n, H, *w.shared_gate_up, nullptr, sgu, Is, a, sh);
      linear_impl(sh, n, Is, *w.shared_down, nullptr, sy, H);
      if (mp.shared_gated) {
        void* sg = scratch("moe_sg", size_t(n) * es);
        linear_impl(x, n, H, *w.shared_gate, nullptr, sg, 1);
        gate = sg;
      }
      ys = sy;
    }
    cuda::moe_combine(act_, ye, weights, n, k, H, ys, gate, out, stream_, bdn, sel_exp);
  }

  // One product per head (a GEMV for decode rows, cuBLASLt otherwise). MLA's heads are many
  // and small; a strided-batched GEMM would launch once (future work).
  void head_linear(const void* x, int64_t n, int64_t ldx, int64_t heads, const Tensor& w, void* y,
                   int64_t ldy) override {
    Prof prof(prof_.get(), "head_linear");
    KILN_CHECK(w.quant == WeightQuant::None && w.dtype == act_ && w.shape.size() == 2 &&
                   heads > 0 && w.shape[0] % heads == 0,
               "CUDA head_linear: the weight must be a plain [heads * out, in] matrix in ",
               dtype_name(act_));
    const int64_t out = w.shape[0] / heads, in = w.shape[1];
    if (n == 0 || out == 0) return;
    const size_t es = dtype_size(act_);
    for (int64_t h = 0; h < heads; ++h) {
      const void* xh = static_cast<const char*>(x) + size_t(h * in) * es;
      const void* wh = static_cast<const char*>(w.data) + size_t(h * out * in) * es;
      void* yh = static_cast<char*>(y) + size_t(h * out) * es;
      if (gemv_ && cuda::gemv_supported(act_, xh, n, ldx, wh, in, out))
        cuda::gemv(act_, xh, n, ldx, wh, in, out, nullptr, yh, ldy, stream_);
      else
        lt_->run(act_, xh, n, ldx, wh, in, out, yh, ldy);
    }
  }

 private:
  static constexpr size_t kPinnedBytes = size_t(4) << 20, kChunkBytes = size_t(128) << 10;
  static constexpr size_t kChunks = kPinnedBytes / kChunkBytes;

  // head_norm weights: one slice per head ([heads * head_dim]) or shared ([head_dim]).
  static bool per_head(const Tensor& w, int64_t heads, int64_t head_dim) {
    return heads > 1 && w.numel() == heads * head_dim;
  }
  void kv_write_impl(const KVLayerView& kv, const void* k, const void* v, int64_t ld,
                     const int32_t* pos, int64_t n) {
    if (kv.fp8()) {
      cuda::KvWriteFp8Params f;
      f.act = act_, f.k = k, f.v = v, f.ld = ld, f.n = n, f.pos = pos;
      f.kpool = static_cast<uint8_t*>(kv.k), f.vpool = static_cast<uint8_t*>(kv.v);
      f.k_scale = kv.k_scale, f.v_scale = kv.v_scale, f.block_table = kv.block_table;
      f.block_size = kv.block_size, f.kv_dim = kv.kv_dim, f.head_dim = kv.head_dim;
      f.seq = kv.seq, f.bt_stride = kv.bt_stride;
      return cuda::kv_write_fp8_launch(f, stream_);
    }
    cuda::kv_write(act_, kv.k, kv.v, kv.block_table, kv.block_size, kv.kv_dim, k, v, ld, pos, n,
                   stream_, kv.seq, kv.bt_stride);
  }

  cuda::QuantLinearParams quant_params(const void* x, int64_t n, int64_t ldx, const Tensor& w,
                                       const Tensor* b, void* y, int64_t ldy) const {
    cuda::QuantLinearParams q;
    q.act = act_, q.x = x, q.n = n, q.ldx = ldx, q.w = &w, q.bias = fptr(b), q.y = y, q.ldy = ldy;
    q.gemv = gemv_, q.sms = sms_;
    return q;
  }
  // linear_gated_act, also used by the MoE shared expert (which must not be timed twice).
  void gated_impl(const void* x, int64_t n, int64_t ldx, const Tensor& w, const Tensor* b, void* gu,
                  int64_t inter, Activation a, void* out) {
    KILN_CHECK(!b || b->dtype == DType::F32, "CUDA linear: bias must be F32");
    KILN_CHECK(w.shape.size() == 2 && w.shape[0] == 2 * inter,
               "CUDA linear_gated_act: the weight "
               "must hold 2 * ",
               inter, " rows (gate, then up)");
    if (n == 0 || inter == 0) return;
    // Decode-sized batches: one GEMV launch with the activation as its epilogue.
    if (w.quant != WeightQuant::None) {
      if (cuda::quant_linear_gated(
              quant_params(x, n, ldx, w, b, gu, 2 * inter), out, a,
              [this](const char* name, size_t bytes) { return scratch(name, bytes); }, stream_))
        return;
    } else if (gemv_ && w.dtype == act_ &&
               cuda::gemv_supported(act_, x, n, ldx, w.data, w.shape[1], 2 * inter)) {
      cuda::gemv_gated(act_, x, n, ldx, w.data, w.shape[1], inter, fptr(b), gu, out, a, stream_);
      return;
    }
    linear_impl(x, n, ldx, w, b, gu, 2 * inter);
    cuda::gated_act(act_, gu, n, inter, a, out, stream_);
  }

  void linear_impl(const void* x, int64_t n, int64_t ldx, const Tensor& w, const Tensor* b, void* y,
                   int64_t ldy) {
    if (w.quant != WeightQuant::None) {
      KILN_CHECK(!b || b->dtype == DType::F32, "CUDA linear: bias must be F32");
      return cuda::quant_linear(
          quant_params(x, n, ldx, w, b, y, ldy), *lt_,
          [this](const char* name, size_t bytes) { return scratch(name, bytes); }, stream_);
    }
    KILN_CHECK(w.dtype == act_, "CUDA linear: weight dtype ", dtype_name(w.dtype),
               " differs from the activation dtype ", dtype_name(act_));
    KILN_CHECK(!b || b->dtype == DType::F32, "CUDA linear: bias must be F32");
    const int64_t in = w.shape[1], out = w.shape[0];
    if (n == 0 || out == 0) return;
    if (gemv_ && cuda::gemv_supported(act_, x, n, ldx, w.data, in, out)) {
      cuda::gemv(act_, x, n, ldx, w.data, in, out, fptr(b), y, ldy, stream_);
      return;
    }
    lt_->run(act_, x, n, ldx, w.data, in, out, y, ldy);
    if (b) cuda::bias_add(act_, y, n, out, ldy, b->ptr<float>(), stream_);
  }

  static void check_f32(const Tensor& w, const Tensor* b) {
    KILN_CHECK(w.dtype == DType::F32 && (!b || b->dtype == DType::F32),
               "CUDA backend: norm weights and biases must be F32");
  }

  // Grow-only device scratch by name (zero-filled on (re)allocation if asked). Growing frees the
  // old buffer; cudaFree waits for the device, so kernels still reading it finish first.
  void* scratch(const std::string& name, size_t bytes, bool zeroed = false) {
    auto& s = scratch_[name];
    if (s.second < bytes) {
      KILN_CHECK(!capturing_, "CUDA scratch '", name, "' would grow during a graph capture");
      ++generation_;  // graphs captured so far may point at the old buffer
      if (s.first) cudaFree(s.first);
      s.first = nullptr;
      s.second = 0;
      s.first = alloc(bytes);
      s.second = bytes;
      if (zeroed) KILN_CUDA_CHECK(cudaMemsetAsync(s.first, 0, bytes, stream_));
    }
    return s.first;
  }

  // Device array of the experts' weight pointers, built on first use per layer.
  // Device arrays of the experts' tensor pointers (cuda_expert_tables.h).
  const float* const* bias_table(const Tensor* const* ts, int64_t E) {
    return reinterpret_cast<const float* const*>(expert_table(ts, E, DType::F32));
  }
  const void* const* expert_table(const Tensor* const* ts, int64_t E) {
    return expert_table(ts, E, act_);
  }
  const void* const* expert_table(const Tensor* const* ts, int64_t E, DType want) {
    return expert_tables_.get(ts, E, want, capturing_, stream_);
  }

  DType act_;
  int device_ = 0, sms_ = 1;
  std::string name_;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<cuda::LtGemm> lt_;
  bool gemv_ = true;
  void* pinned_ = nullptr;
  cudaEvent_t chunk_done_[kChunks] = {};
  std::map<std::string, std::pair<void*, size_t>> scratch_;
  cuda::ExpertTables expert_tables_;
  std::unique_ptr<OpProfile> prof_;
  bool capturing_ = false;
  uint64_t generation_ = 0;
  static constexpr uint64_t kMarks = 16;
  cudaEvent_t mark_events_[kMarks] = {};
  uint64_t marks_ = 0;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(DType act) {
  if (!cuda_available()) return nullptr;
  return std::make_unique<CudaBackend>(act);
}

}  // namespace kiln
