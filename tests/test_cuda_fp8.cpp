// FP8 activation quantization on the GPU against the CPU reference (core/quant.h): the codes and
// the per-token scales must be the same bits, for F16 and BF16 activations, strided rows, rows
// of zeros and rows spanning E4M3's whole range. Skips when no GPU is visible; compiles without
// CUDA.
#include <cmath>
#include <cstring>
#include <random>

#include "core/dtype.h"
#include "core/quant.h"
#include "graph/backend.h"
#include "test_util.h"

#ifdef KILN_HAVE_CUDA
#include <cuda_runtime.h>

#include "backends/cuda/cuda_fp8.h"
#endif

namespace kiln::test {
namespace {

#ifdef KILN_HAVE_CUDA

TEST(CudaFp8, ActivationCodesAndScalesMatchTheCpu) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU visible";
  std::mt19937 rng(8);
  for (DType dt : {DType::BF16, DType::F16})
    for (int64_t in : {16, 72, 4096, 14336})
      for (int64_t pad : {0, 8, 3}) {
        const int64_t n = 7, ldx = in + pad;
        std::vector<float> x(size_t(n * ldx), 0.0f);
        for (int64_t t = 0; t < n; ++t) {
          // Row t spans magnitudes 2^-(t+2) .. 2^(t % 4) (row 3 stays zero).
          std::normal_distribution<float> d(0.0f, std::ldexp(1.0f, int(t % 4)));
          for (int64_t c = 0; c < in; ++c)
            x[size_t(t * ldx + c)] = t == 3 ? 0.0f : d(rng) * std::ldexp(1.0f, -int(c % (t + 3)));
        }
        std::vector<uint8_t> xs(x.size() * 2);
        from_f32(dt, x.data(), xs.data(), x.size());
        to_f32(dt, xs.data(), x.data(), x.size());  // the values the GPU sees
        void *xd = nullptr, *qd = nullptr, *sd = nullptr;
        ASSERT_EQ(cudaMalloc(&xd, xs.size()), cudaSuccess);
        ASSERT_EQ(cudaMalloc(&qd, size_t(n * in)), cudaSuccess);
        ASSERT_EQ(cudaMalloc(&sd, size_t(n) * 4), cudaSuccess);
        ASSERT_EQ(cudaMemcpy(xd, xs.data(), xs.size(), cudaMemcpyHostToDevice), cudaSuccess);
        cuda::quant_act_fp8_launch(
            {dt, xd, n, ldx, in, static_cast<uint8_t*>(qd), in, static_cast<float*>(sd)}, nullptr);
        std::vector<uint8_t> q(size_t(n * in));
        std::vector<float> s(static_cast<size_t>(n));
        ASSERT_EQ(cudaMemcpy(q.data(), qd, q.size(), cudaMemcpyDeviceToHost), cudaSuccess);
        ASSERT_EQ(cudaMemcpy(s.data(), sd, s.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
        cudaFree(xd), cudaFree(qd), cudaFree(sd);
        std::vector<uint8_t> want(static_cast<size_t>(in));
        for (int64_t t = 0; t < n; ++t) {
          float ws = -1;
          ASSERT_TRUE(quantize_fp8_row(&x[size_t(t * ldx)], in, want.data(), &ws));
          EXPECT_EQ(s[size_t(t)], ws) << dtype_name(dt) << " in " << in << " row " << t;
          int64_t differ = 0;
          for (int64_t c = 0; c < in; ++c) differ += q[size_t(t * in + c)] != want[size_t(c)];
          EXPECT_EQ(differ, 0) << dtype_name(dt) << " in " << in << " ldx " << ldx << " row " << t;
        }
      }
}

#endif  // KILN_HAVE_CUDA

}  // namespace
}  // namespace kiln::test
