#include "backends/cuda/cuda_quant_linear.h"

#include "backends/cuda/cuda_gemv_w4.h"
#include "backends/cuda/cuda_gemv_w8.h"
#include "backends/cuda/cuda_kernels.h"
#include "core/error.h"

namespace kiln::cuda {

void quant_linear(const QuantLinearParams& p, LtGemm& lt,
                  const std::function<void*(size_t)>& scratch, cudaStream_t s) {
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
  const float* sc = w.scales->ptr<float>();
  void* deq = nullptr;
  if (int8) {
    const GemvW8Params g{p.act, p.x, p.n, p.ldx, w.ptr<int8_t>(), sc, in, out, p.bias, p.y, p.ldy};
    if (p.gemv && gemv_w8_is_supported(g)) return gemv_w8_launch(g, s);
    deq = scratch(size_t(in * out) * dtype_size(p.act));
    dequant_w8_launch({p.act, w.ptr<int8_t>(), sc, out, in, deq}, s);
  } else {
    const int64_t group = in / w.scales->shape[1];
    const uint8_t* z = w.zero_points->ptr<uint8_t>();
    const GemvW4Params g{p.act, p.x,    p.n, p.ldx, w.ptr<uint8_t>(), sc, z, in, out,
                         group, p.bias, p.y, p.ldy};
    if (p.gemv && gemv_w4_is_supported(g)) return gemv_w4_launch(g, s);
    deq = scratch(size_t(in * out) * dtype_size(p.act));
    dequant_w4_launch({p.act, w.ptr<uint8_t>(), sc, z, out, in, group, deq}, s);
  }
  lt.run(p.act, p.x, p.n, p.ldx, deq, in, out, p.y, p.ldy);
  if (p.bias) bias_add(p.act, p.y, p.n, out, p.ldy, p.bias, s);
}

}  // namespace kiln::cuda
