#include "backends/cuda/cuda_quant_linear.h"

#include <algorithm>
#include <memory>

#include "backends/cuda/cuda_common.h"
#include "backends/cuda/cuda_fp8.h"
#include "backends/cuda/cuda_gemv_w4.h"
#include "backends/cuda/cuda_gemv_w8.h"
#include "backends/cuda/cuda_kernels.h"
#include "core/error.h"

namespace kiln::cuda {

namespace {

void check_fp8(const QuantLinearParams& p) {
  const Tensor& w = *p.w;
  KILN_CHECK(p.act != DType::F32 && w.dtype == DType::F8_E4M3 && w.scales &&
                 w.scales->dtype == DType::F32 && w.in_features() % 16 == 0,
             "CUDA linear: an fp8 weight needs its scales, a multiple of 16 inputs and a 16-bit "
             "activation type");
}

GemvFp8Params fp8_gemv_params(const QuantLinearParams& p) {
  const Tensor& w = *p.w;
  GemvFp8Params g;
  g.act = p.act, g.n = p.n, g.w = w.ptr<uint8_t>(), g.sw = w.scales->ptr<float>();
  g.in = w.shape[1], g.out = w.shape[0], g.bias = p.bias, g.y = p.y, g.ldy = p.ldy, g.sms = p.sms;
  g.y_f32 = p.y_f32;
  // One token: the CUDA-core kernel, whose small blocks put all of a small matrix in flight at
  // once (tg128 of the 8B shape, H100: 221 -> 256 t/s; docs/perf.md).
  g.cuda_cores = p.n == 1;
  return g;
}

// int4 tensor-core GEMV: blocks of 16 warps where the grid is small (at most 4 blocks of 16 rows
// an SM: qkv, o and down of the 8B shape), so each block has more of its rows in flight; 8 warps
// on larger grids (gate_up), where 16 were slower (H100: tg128 int4-wo 272 -> 314 t/s;
// docs/perf.md).
int w4_warps(int64_t out, int sms) {
  return (out + 15) / 16 <= 4 * int64_t(sms) ? 16 : 8;
}

// The int4 GEMV of p (its weight has zeros and [out, groups] scales).
GemvW4Params w4_gemv_params(const QuantLinearParams& p) {
  const Tensor& w = *p.w;
  const int64_t in = w.in_features(), out = w.shape[0];
  GemvW4Params g;
  g.act = p.act, g.x = p.x, g.n = p.n, g.ldx = p.ldx, g.w = w.ptr<uint8_t>();
  g.scales = w.scales->ptr<float>(), g.zeros = w.zero_points->ptr<uint8_t>();
  g.in = in, g.out = out, g.group = in / w.scales->shape[1], g.bias = p.bias, g.y = p.y;
  g.ldy = p.ldy, g.y_f32 = p.y_f32;
  g.warps = w4_warps(out, p.sms);
  return g;
}

DType out_dtype(const QuantLinearParams& p) {
  return p.y_f32 ? DType::F32 : p.act;
}

// Scratch for x quantized per token: codes [n, in] (rows 16-byte aligned since in % 16 == 0),
// then the n scales; g reads its activations from there.
QuantActFp8Params fp8_codes(const QuantLinearParams& p, const ScratchFn& scratch,
                            GemvFp8Params& g) {
  const int64_t in = p.w->shape[1];
  const size_t code_bytes = size_t(p.n * in + 255) / 256 * 256;
  auto* buf = static_cast<uint8_t*>(scratch("fp8_act", code_bytes + size_t(p.n) * 4));
  auto* sx = reinterpret_cast<float*>(buf + code_bytes);
  g.x = nullptr, g.ldx = 0, g.xq = buf, g.ldq = in, g.sx = sx;
  return {p.act, p.x, p.n, p.ldx, in, buf, in, sx};
}

// fp8: the fused GEMV (quantizing x itself) for small n * in; otherwise x quantized per token
// into scratch, then the FP8 GEMV or cuBLASLt's FP8 GEMM (the GEMV over chunks of 8 tokens where
// cuBLASLt has no algorithm for the shape).
void fp8_linear(const QuantLinearParams& p, LtGemm& lt, const ScratchFn& scratch, cudaStream_t s) {
  check_fp8(p);
  const Tensor& w = *p.w;
  const int64_t in = w.shape[1], out = w.shape[0];
  if (p.n == 0 || out == 0) return;
  const float* sw = w.scales->ptr<float>();
  GemvFp8Params g = fp8_gemv_params(p);
  if (p.gemv && p.n <= kGemvFp8MaxRows && p.n * in <= kGemvFp8FusedMax) {
    g.x = p.x, g.ldx = p.ldx;
    if (gemv_fp8_is_supported(g)) return gemv_fp8_launch(g, s);
  }
  quant_act_fp8_launch(fp8_codes(p, scratch, g), s);
  const uint8_t* buf = g.xq;
  const float* sx = g.sx;
  const auto gemv = [&](int64_t t0, int64_t n) {
    GemvFp8Params c = g;
    c.xq = buf + t0 * in, c.ldq = in, c.sx = sx + t0, c.n = n;
    c.y = static_cast<char*>(p.y) + size_t(t0 * p.ldy) * dtype_size(out_dtype(p));
    gemv_fp8_launch(c, s);
  };
  if (p.gemv && p.n <= kGemvFp8MaxRows) return gemv(0, p.n);
  if (lt.run_fp8(buf, p.n, in, sx, w.data, sw, in, out, out_dtype(p), p.y, p.ldy)) {
    if (p.bias) bias_add(out_dtype(p), p.y, p.n, out, p.ldy, p.bias, s);
    return;
  }
  for (int64_t t0 = 0; t0 < p.n; t0 += kGemvFp8MaxRows)
    gemv(t0, std::min(kGemvFp8MaxRows, p.n - t0));
}

}  // namespace

bool quant_linear_gated(const QuantLinearParams& p, void* out, Activation a,
                        const ScratchFn& scratch, cudaStream_t s) {
  const Tensor& w = *p.w;
  if (!p.gemv || p.y_f32 || p.n < 1 || w.input_perm || w.shape.size() != 2 || w.shape[0] % 2 != 0)
    return false;
  if (w.quant == WeightQuant::Fp8) {
    check_fp8(p);
    if (p.n > kGemvFp8MaxRows) return false;
    GemvFp8Params g = fp8_gemv_params(p);
    g.gated = out, g.gated_act = int(a);
    if (p.n * g.in <= kGemvFp8FusedMax) {
      g.x = p.x, g.ldx = p.ldx;
      if (gemv_fp8_is_supported(g)) return gemv_fp8_launch(g, s), true;
      g.x = nullptr, g.ldx = 0;
    }
    const QuantActFp8Params q = fp8_codes(p, scratch, g);
    if (!gemv_fp8_is_supported(g)) return false;
    quant_act_fp8_launch(q, s);
    gemv_fp8_launch(g, s);
    return true;
  }
  if (w.quant == WeightQuant::Int4 && w.zero_points && w.scales && w.scales->shape.size() == 2) {
    GemvW4Params g = w4_gemv_params(p);
    g.gated = out, g.gated_act = int(a);
    if (!gemv_w4_is_supported(g)) return false;
    gemv_w4_launch(g, s);
    return true;
  }
  return false;
}

void relayout_quant_weight(Tensor& t, cudaStream_t s) {
  if (t.quant != WeightQuant::Int4 || t.dtype != DType::U8 || t.shape.size() != 2 || !t.scales ||
      t.scales->shape.size() != 2 || t.scales->shape[1] <= 0)
    return;
  const int64_t in = t.in_features(), out = t.shape[0], groups = t.scales->shape[1];
  if (in % groups != 0 || !w4_tiled(in, out, in / groups)) return;
  // A plain allocation freed after the copy, not the stream-ordered pool: the KV cache is sized
  // from the memory free after the weights, which memory the pool keeps would shrink.
  void* tmp = nullptr;
  KILN_CUDA_CHECK(cudaMalloc(&tmp, t.nbytes()));
  std::unique_ptr<void, decltype(&cudaFree)> hold(tmp, &cudaFree);
  KILN_CUDA_CHECK(cudaMemcpyAsync(tmp, t.data, t.nbytes(), cudaMemcpyDeviceToDevice, s));
  tile_w4_launch(static_cast<const uint8_t*>(tmp), t.ptr<uint8_t>(), out, in, s);
  KILN_CUDA_CHECK(cudaStreamSynchronize(s));
}

void quant_linear(const QuantLinearParams& p, LtGemm& lt, const ScratchFn& scratch,
                  cudaStream_t s) {
  if (p.w->quant == WeightQuant::Fp8) return fp8_linear(p, lt, scratch, s);
  const Tensor& w = *p.w;
  const bool int8 = w.quant == WeightQuant::Int8;
  KILN_CHECK(p.act != DType::F32 && w.scales && w.scales->dtype == DType::F32 &&
                 (int8 ? w.dtype == DType::I8
                       : w.quant == WeightQuant::Int4 && w.dtype == DType::U8 && w.zero_points &&
                             w.scales->shape.size() == 2),
             "CUDA linear: a ", weight_quant_name(w.quant),
             " weight needs its scales (and zeros) and a 16-bit activation type");
  const int64_t in = w.in_features(), out = w.shape[0];
  if (p.n == 0 || out == 0) return;
  if (w.input_perm) {  // act-order: gather the inputs into the stored column order first
    KILN_CHECK(w.input_perm->dtype == DType::I32 && w.input_perm->numel() == in,
               "CUDA linear: an act-order weight needs an I32 input order of ", in);
    QuantLinearParams q = p;
    void* xp = scratch("act_order_x", size_t(p.n * in) * dtype_size(p.act));
    gather_cols_launch({p.x, p.n, p.ldx, in, w.input_perm->ptr<int32_t>(), xp}, s);
    Tensor plain = w;
    plain.input_perm = nullptr;
    q.x = xp;
    q.ldx = in;
    q.w = &plain;
    return quant_linear(q, lt, scratch, s);
  }
  const float* sc = w.scales->ptr<float>();
  const GemvW4Params g4 = int8 ? GemvW4Params{} : w4_gemv_params(p);
  if (int8) {
    GemvW8Params g{p.act, p.x, p.n, p.ldx, w.ptr<int8_t>(), sc, in, out, p.bias, p.y, p.ldy};
    g.y_f32 = p.y_f32;
    if (p.gemv && gemv_w8_is_supported(g)) return gemv_w8_launch(g, s);
  } else if (p.gemv && gemv_w4_is_supported(g4)) {
    return gemv_w4_launch(g4, s);
  }
  // Dequantized into scratch a slice of rows at a time (whole groups of 256 rows, keeping the
  // slices' outputs aligned), each slice then a cuBLASLt product into its columns of y.
  const size_t es = dtype_size(p.act), row_bytes = size_t(in) * es;
  const int64_t rows =
      std::min(out, std::max<int64_t>(256, int64_t(kDequantChunkBytes / row_bytes) / 256 * 256));
  void* deq = scratch("wq_dequant", size_t(rows) * row_bytes);
  const DType yt = out_dtype(p);
  for (int64_t r0 = 0; r0 < out; r0 += rows) {
    const int64_t m = std::min(rows, out - r0);
    if (int8) {
      dequant_w8_launch({p.act, w.ptr<int8_t>() + r0 * in, sc + r0, m, in, deq}, s);
    } else {
      const int64_t groups = w.scales->shape[1];
      dequant_w4_launch({p.act, g4.w + r0 * (in / 2), sc + r0 * groups, g4.zeros + r0 * groups, m,
                         in, g4.group, deq, w4_tiled(in, out, g4.group)},
                        s);
    }
    lt.run(p.act, p.x, p.n, p.ldx, deq, in, m,
           static_cast<char*>(p.y) + size_t(r0) * dtype_size(yt), p.ldy, p.y_f32);
  }
  if (p.bias) bias_add(yt, p.y, p.n, out, p.ldy, p.bias, s);
}

}  // namespace kiln::cuda
