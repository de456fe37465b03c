// Quantized decode-GEMV microbenchmark: the FP8 and int4 GEMVs on the weight shapes of
// Llama-3.1-8B, n = 1 and 8 rows of x, as weight bytes read per second, beside the BF16 GEMV.
// Weights rotate over enough copies to exceed L2, so every call streams from HBM. A variant of a
// kernel under study can be added as another row. gate_up also runs with the gated activation
// as the GEMV's epilogue (Backend::linear_gated_act), as the decoder issues it.
// Built by CMake as bench_gemv_quant; prints a note and exits when built without CUDA.
#ifdef KILN_HAVE_CUDA
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "backends/cuda/cuda_common.h"
#include "backends/cuda/cuda_fp8.h"
#include "backends/cuda/cuda_gemm.h"
#include "backends/cuda/cuda_gemv_w4.h"
#include "backends/cuda/cuda_kernels.h"
#include "gpu_timing.h"

namespace {

using namespace kiln;

struct Shape {
  const char* name;
  int64_t in, out;
};

void* dev(size_t bytes) {
  void* p;
  KILN_CUDA_CHECK(cudaMalloc(&p, bytes));
  return p;
}

void* upload(const void* h, size_t bytes) {
  void* p = dev(bytes);
  KILN_CUDA_CHECK(cudaMemcpy(p, h, bytes, cudaMemcpyHostToDevice));
  return p;
}

std::vector<uint8_t> random_bytes(size_t n, std::mt19937& rng, bool fp8) {
  std::vector<uint8_t> v(n);
  std::uniform_int_distribution<int> d(0, 255);
  for (auto& b : v) {
    b = uint8_t(d(rng));
    if (fp8 && (b & 0x7f) == 0x7f) b = 0;  // no NaN codes
  }
  return v;
}

std::vector<uint16_t> bf16_host(size_t n, std::mt19937& rng) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<uint16_t> v(n);
  for (auto& e : v) {
    float f = d(rng);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    e = uint16_t(u >> 16);
  }
  return v;
}

}  // namespace

int main() {
  const Shape shapes[] = {
      {"qkv", 4096, 6144}, {"o", 4096, 4096}, {"gate_up", 4096, 28672}, {"down", 14336, 4096}};
  cudaStream_t s;
  KILN_CUDA_CHECK(cudaStreamCreate(&s));
  std::mt19937 rng(7);
  std::printf("| shape | n | kernel | us | GB/s |\n");
  std::printf("| --- | ---: | --- | ---: | ---: |\n");
  for (const Shape& sh : shapes) {
    const int64_t in = sh.in, out = sh.out;
    const auto x_h = bf16_host(size_t(8 * in), rng);
    void* x = upload(x_h.data(), x_h.size() * 2);
    void* y = dev(size_t(8 * out) * 2);
    void* act = dev(size_t(8 * out / 2) * 2);  // the gated activation (gate_up)
    const bool gated = std::string(sh.name) == "gate_up";
    // Codes and scales of x for the non-fused FP8 path.
    auto* xq = static_cast<uint8_t*>(dev(size_t(8 * in)));
    auto* sx = static_cast<float*>(dev(8 * 4));
    cuda::quant_act_fp8_launch({DType::BF16, x, 8, in, in, xq, in, sx}, s);

    struct Weights {
      std::vector<void*> w, sc, z;
      int copies = 0;
    };
    const auto make = [&](size_t wbytes, bool fp8, size_t sbytes, size_t zbytes) {
      Weights r;
      r.copies = int(std::max<size_t>(2, (size_t(320) << 20) / wbytes + 1));
      const auto wh = random_bytes(wbytes, rng, fp8);
      std::vector<float> sh_(sbytes / 4);
      for (auto& v : sh_) v = 0.01f;
      const auto zh = random_bytes(zbytes, rng, false);
      for (int c = 0; c < r.copies; ++c) {
        r.w.push_back(upload(wh.data(), wbytes));
        r.sc.push_back(upload(sh_.data(), sbytes));
        r.z.push_back(zbytes ? upload(zh.data(), zbytes) : nullptr);
      }
      return r;
    };
    const auto time = [&](const std::function<void(int)>& call, int copies) {
      return bench::gpu_us_per_call(call, copies, 30, s);
    };
    const auto row = [&](int64_t n, const std::string& k, double us, size_t bytes) {
      std::printf("| %s %lldx%lld | %lld | %s | %.1f | %.0f |\n", sh.name, (long long)in,
                  (long long)out, (long long)n, k.c_str(), us, double(bytes) / us / 1e3);
      std::fflush(stdout);
    };

    {  // BF16
      Weights wt = make(size_t(in * out) * 2, false, 4, 0);
      for (int64_t n : {1, 2}) {
        const double us = time(
            [&](int i) {
              cuda::gemv(DType::BF16, x, n, in, wt.w[size_t(i % wt.copies)], in, out, nullptr, y,
                         out, s);
            },
            wt.copies);
        row(n, "bf16 gemv", us, size_t(in * out) * 2);
        if (gated) {
          const double ug = time(
              [&](int i) {
                cuda::gemv_gated(DType::BF16, x, n, in, wt.w[size_t(i % wt.copies)], in, out / 2,
                                 nullptr, y, act, Activation::SiLU, s);
              },
              wt.copies);
          row(n, "bf16 gemv + gated act", ug, size_t(in * out) * 2);
        }
      }
      for (auto* p : wt.w) cudaFree(p);
      for (auto* p : wt.sc) cudaFree(p);
    }
    {  // FP8
      Weights wt = make(size_t(in * out), true, size_t(out) * 4, 0);
      for (int64_t n : {1, 8}) {
        // At n = 1 also from codes quantized beforehand (what the fused quantization costs) and
        // on CUDA cores.
        for (const int mode : {0, 1, 2, 3, 4}) {
          const bool g_act = mode == 1 || mode == 4, from_codes = mode == 2, cc = mode >= 3;
          if ((g_act && !gated) || ((from_codes || cc) && n != 1)) continue;
          const bool fused = n * in <= cuda::kGemvFp8FusedMax && !from_codes;
          const auto call = [&](int i) {
            cuda::GemvFp8Params g;
            g.act = DType::BF16, g.n = n, g.in = in, g.out = out, g.y = y, g.ldy = out;
            g.w = static_cast<const uint8_t*>(wt.w[size_t(i % wt.copies)]);
            g.sw = static_cast<const float*>(wt.sc[size_t(i % wt.copies)]);
            if (fused)
              g.x = x, g.ldx = in;
            else
              g.xq = xq, g.ldq = in, g.sx = sx;
            if (g_act) g.gated = act, g.gated_act = int(Activation::SiLU);
            g.cuda_cores = cc;
            cuda::gemv_fp8_launch(g, s);
          };
          row(n,
              std::string(cc      ? "fp8 CUDA cores"
                          : fused ? "fp8 (fused)"
                                  : "fp8") +
                  (g_act ? " + gated act" : ""),
              time(call, wt.copies), size_t(in * out));
        }
      }
      for (auto* p : wt.w) cudaFree(p);
      for (auto* p : wt.sc) cudaFree(p);
    }
    {  // int4, group 128
      const int64_t group = 128, groups = in / group;
      Weights wt =
          make(size_t(in * out / 2), false, size_t(out * groups) * 4, size_t(out * groups));
      const size_t bytes = size_t(in * out / 2) + size_t(out * groups) * 5;
      for (int64_t n : {1, 8}) {
        for (const int mode : {0, 1, 2}) {  // plain, gated, plain in 16-warp blocks
          const bool g_act = mode == 1;
          const int warps = mode == 2 ? 16 : 8;
          if (g_act && !gated) continue;
          const auto call = [&](int i) {
            cuda::GemvW4Params g;
            g.act = DType::BF16, g.x = x, g.n = n, g.ldx = in;
            g.w = static_cast<const uint8_t*>(wt.w[size_t(i % wt.copies)]);
            g.scales = static_cast<const float*>(wt.sc[size_t(i % wt.copies)]);
            g.zeros = static_cast<const uint8_t*>(wt.z[size_t(i % wt.copies)]);
            g.in = in, g.out = out, g.group = group, g.y = y, g.ldy = out;
            if (g_act) g.gated = act, g.gated_act = int(Activation::SiLU);
            g.warps = warps;
            cuda::gemv_w4_launch(g, s);
          };
          row(n,
              g_act         ? "int4 (group 128) + gated act"
              : warps == 16 ? "int4 (group 128), 16 warps"
                            : "int4 (group 128)",
              time(call, wt.copies), bytes);
        }
      }
      for (auto* p : wt.w) cudaFree(p);
      for (auto* p : wt.sc) cudaFree(p);
      for (auto* p : wt.z) cudaFree(p);
    }
    KILN_CUDA_CHECK(cudaFree(x));
    KILN_CUDA_CHECK(cudaFree(y));
    KILN_CUDA_CHECK(cudaFree(act));
    KILN_CUDA_CHECK(cudaFree(xq));
    KILN_CUDA_CHECK(cudaFree(sx));
  }
  return 0;
}
#else
#include <cstdio>
int main() {
  std::printf("bench_gemv_quant: built without CUDA\n");
  return 0;
}
#endif
