// The quantized linears of the CUDA backend against the CPU reference (test_cuda_ops.cpp's
// method: normalised error, strided rows with poisoned gaps): int8-wo, fp8 and int4-wo weights
// through the GEMVs and dequantize / FP8 GEMM paths, and a quantized LM head's F32 logits.
// Quantized weights run in 16-bit engines only. Skips when no GPU is visible (CI).
#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "core/quant.h"
#include "cuda_ops_fixture.h"
#include "graph/backend.h"
#include "test_util.h"

namespace kiln::test {
namespace {

// Int8 weight-only linears (16-bit engines): the W8A16 GEMV (n <= 8, aligned rows) and the
// dequantize + cuBLASLt path (larger n, odd strides) against the CPU reference, which computes
// with the dequantized weight q * scale in FP32.
TEST_P(CudaOps, LinearInt8) {
  if (dt == DType::F32) GTEST_SKIP() << "int8 weights run in 16-bit engines";
  struct Case {
    int64_t n, in, out, ldx_pad, ldy_pad;
    bool bias;
  };
  const Case cases[] = {
      {1, 64, 33, 0, 0, false},    {1, 4096, 256, 0, 0, true},  {2, 1024, 3000, 0, 0, false},
      {3, 144, 100, 8, 3, true},   {8, 256, 1000, 0, 0, false}, {5, 112, 17, 4, 0, false},
      {4, 18, 7, 2, 1, true},      {17, 64, 130, 0, 5, true},   {130, 208, 96, 16, 0, false},
      {1, 14336, 64, 0, 0, false}, {9, 512, 1, 0, 0, true},     {64, 4096, 512, 0, 0, false}};
  for (const Case& c : cases) {
    const std::string what = cat("int8 linear n=", c.n, " in=", c.in, " out=", c.out, " ldx+",
                                 c.ldx_pad, " ldy+", c.ldy_pad, c.bias ? " bias" : "");
    const int64_t ldx = c.in + c.ldx_pad, ldy = c.out + c.ldy_pad;
    auto x = strided(rnd(size_t(c.n * c.in)), c.n, c.in, ldx);
    const Tensor wh = quantized_weight(rnd(size_t(c.out * c.in), 1.0f / std::sqrt(float(c.in))),
                                       c.out, c.in, WeightQuant::Int8, dt);
    const Tensor wd = gpu->upload(wh);
    ASSERT_TRUE(wd.scales && wd.quant == WeightQuant::Int8);
    auto [bh, bd] = vec(c.out, 0.0f, 1.0f);
    std::vector<float> want(size_t(c.n * ldy), kPoison);
    cpu->linear(x.data(), c.n, ldx, wh, c.bias ? &bh : nullptr, want.data(), ldy);
    void* xd = up(x);
    void* yd = up(std::vector<float>(size_t(c.n * ldy), kPoison));
    gpu->linear(xd, c.n, ldx, wd, c.bias ? &bd : nullptr, yd, ldy);
    expect_close(down(yd, size_t(c.n * ldy)), ldy, want, ldy, c.n, c.out, what);
  }
  // The bulk upload carries scales too.
  Tensor wh = Tensor::zeros(DType::I8, {4, 32});
  wh.quant = WeightQuant::Int8;
  wh.scales = std::make_shared<Tensor>(Tensor::zeros(DType::F32, {4}));
  const std::vector<Tensor> up_all = gpu->upload_all({&wh});
  ASSERT_EQ(up_all.size(), 1u);
  EXPECT_TRUE(up_all[0].scales && up_all[0].scales->device == Device::CUDA);
}

// fp8 linears: activations quantized per token, then the FP8 tensor-core GEMV (n <= 8) or
// cuBLASLt's FP8 GEMM with outer-vector scales (the GEMV in chunks where cuBLASLt has no
// algorithm), against the CPU reference that quantizes the same activations the same way.
TEST_P(CudaOps, LinearFp8) {
  if (dt == DType::F32) GTEST_SKIP() << "fp8 weights run in 16-bit engines";
  struct Case {
    int64_t n, in, out, ldx_pad, ldy_pad;
    bool bias;
  };
  const Case cases[] = {
      {1, 64, 33, 0, 0, false},  {1, 4096, 256, 0, 0, true},   {2, 1024, 3000, 0, 0, false},
      {3, 144, 100, 8, 3, true}, {8, 256, 1000, 0, 0, false},  {5, 112, 17, 4, 0, false},
      {17, 64, 130, 0, 5, true}, {130, 208, 96, 16, 0, false}, {1, 14336, 64, 0, 0, false},
      {9, 512, 1, 0, 0, true},   {64, 4096, 512, 0, 0, false}, {300, 1024, 2048, 0, 0, true},
      {8, 16, 48, 0, 0, false},  {7, 80, 16, 0, 0, true}};
  setenv("KILN_CUDA_GEMV", "0", 1);
  auto lt = make_cuda_backend(dt);
  unsetenv("KILN_CUDA_GEMV");
  for (bool gemv : {true, false}) {
    Backend* be = gemv ? gpu.get() : lt.get();
    for (const Case& c : cases) {
      const std::string what =
          cat("fp8 linear n=", c.n, " in=", c.in, " out=", c.out, " ldx+", c.ldx_pad, " ldy+",
              c.ldy_pad, c.bias ? " bias" : "", gemv ? "" : " (no GEMV)");
      const int64_t ldx = c.in + c.ldx_pad, ldy = c.out + c.ldy_pad;
      auto x = strided(rnd(size_t(c.n * c.in)), c.n, c.in, ldx);
      const Tensor wh = quantized_weight(rnd(size_t(c.out * c.in), 1.0f / std::sqrt(float(c.in))),
                                         c.out, c.in, WeightQuant::Fp8, dt);
      const Tensor wd = be->upload(wh);
      ASSERT_TRUE(wd.scales && wd.quant == WeightQuant::Fp8);
      auto [bh, bd] = vec(c.out, 0.0f, 1.0f);
      std::vector<float> want(size_t(c.n * ldy), kPoison);
      cpu->linear(x.data(), c.n, ldx, wh, c.bias ? &bh : nullptr, want.data(), ldy);
      void* xd = up(x);
      void* yd = up(std::vector<float>(size_t(c.n * ldy), kPoison));
      gpu->synchronize();  // the two backends have separate streams
      be->linear(xd, c.n, ldx, wd, c.bias ? &bd : nullptr, yd, ldy);
      be->synchronize();
      expect_close(down(yd, size_t(c.n * ldy)), ldy, want, ldy, c.n, c.out, what);
    }
  }
}

// Int4 weight-only linears: the W4A16 GEMV (n <= 8) and dequantize + cuBLASLt against the CPU
// reference over the dequantized weight; groups of 32, 64 and 128.
TEST_P(CudaOps, LinearInt4) {
  if (dt == DType::F32) GTEST_SKIP() << "int4 weights run in 16-bit engines";
  struct Case {
    int64_t n, in, out, ldx_pad, ldy_pad;
    bool bias;
  };
  // The last two: more than 4 blocks of 16 rows an SM on a 132-SM GPU, so 8-warp blocks
  // (w4_warps); the others 16. Weights with rows in 16s and groups of 128 are tiled on the GPU
  // (w4_tiled): 4096 x 256, 14336 x 64, 4096 x 512 (at n = 8 past the x staging of one token,
  // and at n = 64 dequantized for cuBLASLt), 256 x 8720; the others stay row-major.
  const Case cases[] = {
      {1, 64, 33, 0, 0, false},   {1, 4096, 256, 0, 0, true},   {2, 1024, 3000, 0, 0, false},
      {3, 96, 100, 8, 3, true},   {8, 256, 1000, 0, 0, false},  {5, 128, 17, 4, 0, false},
      {17, 64, 130, 0, 5, true},  {130, 224, 96, 16, 0, false}, {1, 14336, 64, 0, 0, false},
      {9, 512, 1, 0, 0, true},    {64, 4096, 512, 0, 0, false}, {8, 4096, 512, 8, 8, true},
      {1, 256, 8720, 0, 0, true}, {8, 128, 9000, 0, 0, false}};
  std::mt19937 rng(3);
  // Each case also as an act-order weight (an input order the linear gathers x through first).
  for (const Case& c : cases)
    for (const bool act_order : {false, true}) {
      const int64_t group = int4_group(c.in);
      const std::string what =
          cat("int4 linear n=", c.n, " in=", c.in, " out=", c.out, " group ", group, " ldx+",
              c.ldx_pad, " ldy+", c.ldy_pad, c.bias ? " bias" : "", act_order ? " act-order" : "");
      const int64_t ldx = c.in + c.ldx_pad, ldy = c.out + c.ldy_pad;
      auto x = strided(rnd(size_t(c.n * c.in)), c.n, c.in, ldx);
      Tensor wh = quantized_weight(rnd(size_t(c.out * c.in), 1.0f / std::sqrt(float(c.in))), c.out,
                                   c.in, WeightQuant::Int4, dt);
      if (act_order) {
        Tensor ph = Tensor::zeros(DType::I32, {c.in});
        std::iota(ph.ptr<int32_t>(), ph.ptr<int32_t>() + c.in, 0);
        std::shuffle(ph.ptr<int32_t>(), ph.ptr<int32_t>() + c.in, rng);
        wh.input_perm = std::make_shared<Tensor>(ph);
      }
      const Tensor wd = gpu->upload(wh);
      ASSERT_TRUE(wd.scales && wd.zero_points && wd.quant == WeightQuant::Int4 &&
                  bool(wd.input_perm) == act_order);
      auto [bh, bd] = vec(c.out, 0.0f, 1.0f);
      std::vector<float> want(size_t(c.n * ldy), kPoison);
      cpu->linear(x.data(), c.n, ldx, wh, c.bias ? &bh : nullptr, want.data(), ldy);
      void* xd = up(x);
      void* yd = up(std::vector<float>(size_t(c.n * ldy), kPoison));
      gpu->linear(xd, c.n, ldx, wd, c.bias ? &bd : nullptr, yd, ldy);
      expect_close(down(yd, size_t(c.n * ldy)), ldy, want, ldy, c.n, c.out, what);
    }
}

// A quantized LM head (--quant-lm-head): the linears' kernels writing F32 logits from the F32
// hidden state rounded to the engine dtype: the GEMVs (n <= 8), dequantize + cuBLASLt (int4 and
// int8 at n = 9, in slices of rows where the dequantized weight passes kDequantChunkBytes) and
// cuBLASLt's FP8 GEMM. The hidden state is made of values the dtype holds exactly, so both
// backends multiply the same numbers (fp8: the same activation codes); only the accumulation order
// and, where the weight is dequantized into BF16 / F16, that one rounding differ.
TEST_P(CudaOps, QuantizedLogits) {
  if (dt == DType::F32) GTEST_SKIP() << "quantized weights run in 16-bit engines";
  struct Case {
    int64_t n, in, out;
    float cap;
    bool bias;
  };
  // The last: 33000 rows of 4096 inputs are 270 MB in BF16, so two slices of dequantized rows.
  const Case cases[] = {{1, 256, 1001, 0.0f, true},
                        {3, 512, 2048, 30.0f, false},
                        {8, 128, 515, 0.0f, false},
                        {9, 256, 1001, 0.0f, true},
                        {9, 4096, 33000, 0.0f, false}};
  for (const WeightQuant q : {WeightQuant::Int8, WeightQuant::Int4, WeightQuant::Fp8})
    for (const Case& c : cases) {
      if (c.out == 33000 && q == WeightQuant::Fp8) continue;  // no dequantized copy
      const std::string what = cat(weight_quant_name(q), " logits n=", c.n, " in=", c.in,
                                   " out=", c.out, " cap=", c.cap, c.bias ? " bias" : "");
      const Tensor wh = quantized_weight(rnd(size_t(c.out * c.in), 2.0f / std::sqrt(float(c.in))),
                                         c.out, c.in, q, dt);
      const Tensor wd = gpu->upload(wh);
      auto [bh, bd] = vec(c.out, 0.0f, 1.0f);
      const std::vector<float> x = rnd(size_t(c.n * c.in));
      std::vector<float> want(size_t(c.n * c.out));
      cpu->logits(x.data(), c.n, c.in, wh, c.bias ? &bh : nullptr, c.cap, want.data(), true);
      auto* yd = static_cast<float*>(gpu->alloc(want.size() * 4));
      allocs.push_back(yd);
      gpu->logits(up_raw(x), c.n, c.in, wd, c.bias ? &bd : nullptr, c.cap, yd, true);
      std::vector<float> got(want.size());
      gpu->to_host(got.data(), yd, got.size() * 4);
      for (float v : got) ASSERT_TRUE(std::isfinite(v)) << what;
      // int8 / int4 GEMVs: F32 products of the same values. Dequantized weights: rounded once to
      // the dtype. FP8 tensor cores keep about 14 bits of their running sums (DeepSeek-V3
      // technical report, 3.3.2), so their F32 outputs are good to ~1e-4, not F32's 1e-7.
      const double tol = q == WeightQuant::Fp8 ? 1e-3 : c.n > 8 ? tolerance(dt) : 1e-5;
      expect_close(got, c.out, want, c.out, c.n, c.out, what, tol);
    }
}

}  // namespace
}  // namespace kiln::test
