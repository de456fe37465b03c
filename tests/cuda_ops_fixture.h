// The fixture of the CUDA op tests (test_cuda_ops.cpp, test_cuda_ops_quant.cpp,
// test_cuda_attention.cpp): a CUDA and a CPU backend, inputs rounded to the engine dtype,
// per-dtype tolerances. Skips without a GPU. Not in an anonymous namespace: CudaOps is one
// fixture type for its tests in every file (instantiated once, in test_cuda_ops.cpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>

#include "core/dtype.h"
#include "core/error.h"
#include "core/quant.h"
#include "graph/backend.h"
#include "test_util.h"

namespace kiln::test {

inline double tolerance(DType t) {
  return t == DType::F32 ? 1e-5 : t == DType::F16 ? 2e-3 : 1e-2;
}

inline const char* label(DType t) {
  return t == DType::F32 ? "f32" : t == DType::F16 ? "f16" : "bf16";
}

constexpr float kPoison = 1232.0f;  // exact in F32, F16 and BF16

class CudaOps : public ::testing::TestWithParam<DType> {
 protected:
  void SetUp() override {
    if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU visible";
    dt = GetParam();
    gpu = make_cuda_backend(dt);
    ASSERT_TRUE(gpu);
    cpu = make_cpu_backend();
  }
  void TearDown() override {
    for (void* p : allocs) gpu->release(p);
  }

  // Values of N(0, sd) exactly representable in the engine dtype.
  std::vector<float> rnd(size_t n, float sd = 1.0f, float mean = 0.0f) {
    std::normal_distribution<float> d(mean, sd);
    std::vector<float> v(n);
    for (auto& x : v) x = d(rng);
    return round(v);
  }
  std::vector<float> round(std::vector<float> v) const {
    std::vector<uint8_t> tmp(v.size() * dtype_size(dt));
    from_f32(dt, v.data(), tmp.data(), v.size());
    to_f32(dt, tmp.data(), v.data(), v.size());
    return v;
  }
  // A device activation buffer holding `v` (converted to the engine dtype).
  void* up(const std::vector<float>& v) {
    void* p = gpu->alloc(std::max<size_t>(v.size(), 1) * dtype_size(dt));
    allocs.push_back(p);
    std::vector<uint8_t> tmp(v.size() * dtype_size(dt));
    from_f32(dt, v.data(), tmp.data(), v.size());
    gpu->to_device(p, tmp.data(), tmp.size());
    return p;
  }
  // Raw device bytes (int tables, F32 RoPE tables).
  template <typename U>
  U* up_raw(const std::vector<U>& v) {
    void* p = gpu->alloc(std::max<size_t>(v.size(), 1) * sizeof(U));
    allocs.push_back(p);
    gpu->to_device(p, v.data(), v.size() * sizeof(U));
    return static_cast<U*>(p);
  }
  std::vector<float> down(const void* p, size_t n) {
    std::vector<float> r(n);
    gpu->to_f32(p, int64_t(n), r.data());
    return r;
  }
  // The residual stream is F32 in every engine dtype.
  std::vector<float> down_f32(const void* p, size_t n) {
    std::vector<float> r(n);
    gpu->to_host(r.data(), p, n * 4);
    return r;
  }
  // A weight in dtype `t` (host, for the CPU backend) and its device copy.
  std::pair<Tensor, Tensor> weight(const std::vector<float>& v, Shape shape, DType t) {
    Tensor h = Tensor::zeros(t, shape);
    from_f32(t, v.data(), h.data, v.size());
    return {h, gpu->upload(h)};
  }
  std::pair<Tensor, Tensor> matrix(int64_t rows, int64_t cols, float sd) {
    return weight(rnd(size_t(rows * cols), sd), {rows, cols}, dt);
  }
  std::pair<Tensor, Tensor> vec(int64_t n, float mean, float sd) {
    std::normal_distribution<float> d(mean, sd);
    std::vector<float> v(static_cast<size_t>(n));
    for (auto& x : v) x = d(rng);
    return weight(v, {n}, DType::F32);
  }

  // ||got - want|| / ||want|| over `cols` of `rows` rows (lds given); gap columns of `got`
  // (cols..ld_got) must still hold kPoison.
  void expect_close(const std::vector<float>& got, int64_t ld_got, const std::vector<float>& want,
                    int64_t ld_want, int64_t rows, int64_t cols, const std::string& what,
                    double tol = -1) {
    if (tol < 0) tol = tolerance(dt);
    double num = 0, den = 0;
    int64_t clobbered = 0;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        const double a = got[size_t(r * ld_got + c)], b = want[size_t(r * ld_want + c)];
        num += (a - b) * (a - b);
        den += b * b;
      }
      for (int64_t c = cols; c < ld_got; ++c) clobbered += got[size_t(r * ld_got + c)] != kPoison;
    }
    const double err = std::sqrt(num / std::max(den, 1e-30));
    // On failure, each row's own error: one bad row (a routing choice, a tail) reads differently
    // from a uniformly wrong result.
    std::string rows_err;
    if (!(err <= tol))
      for (int64_t r = 0; r < rows && r < 32; ++r) {
        double rn = 0, rd = 0;
        for (int64_t c = 0; c < cols; ++c) {
          const double a = got[size_t(r * ld_got + c)], b = want[size_t(r * ld_want + c)];
          rn += (a - b) * (a - b), rd += b * b;
        }
        rows_err += cat(r ? " " : "; rows:", " ", std::sqrt(rn / std::max(rd, 1e-30)));
      }
    EXPECT_LE(err, tol) << label(dt) << " " << what << rows_err;
    EXPECT_EQ(clobbered, 0) << label(dt) << " " << what << ": wrote outside its columns";
  }

  DType dt = DType::F32;
  std::unique_ptr<Backend> gpu, cpu;
  std::mt19937 rng{20251122};
  std::vector<void*> allocs;
};

// Rows of `width` values at stride `ld`, gap columns poisoned.
inline std::vector<float> strided(const std::vector<float>& dense, int64_t rows, int64_t width,
                                  int64_t ld) {
  std::vector<float> r(size_t(rows * ld), kPoison);
  for (int64_t i = 0; i < rows; ++i)
    std::copy_n(dense.begin() + i * width, width, r.begin() + i * ld);
  return r;
}

// A host weight [rows, cols] in the given scheme (None: the engine dtype), as kiln's quantizer
// writes it (core/quant.h).
inline Tensor quantized_weight(const std::vector<float>& wf, int64_t rows, int64_t cols,
                               WeightQuant q, DType dt) {
  if (q == WeightQuant::None) {
    Tensor h = Tensor::zeros(dt, {rows, cols});
    from_f32(dt, wf.data(), h.data, wf.size());
    return h;
  }
  const bool int4 = q == WeightQuant::Int4;
  const int64_t group = int4 ? int4_group(cols) : 0, G = int4 ? cols / group : 0;
  Tensor h = Tensor::zeros(quant_storage(q), {rows, int4 ? cols / 2 : cols});
  Tensor sc = int4 ? Tensor::zeros(DType::F32, {rows, G}) : Tensor::zeros(DType::F32, {rows});
  Tensor z = Tensor::zeros(DType::U8, {rows, std::max<int64_t>(G, 1)});
  for (int64_t r = 0; r < rows; ++r) {
    const float* w = &wf[size_t(r * cols)];
    const bool ok =
        q == WeightQuant::Int8
            ? quantize_int8_row(w, cols, h.ptr<int8_t>() + r * cols, sc.ptr<float>() + r)
        : q == WeightQuant::Fp8
            ? quantize_fp8_row(w, cols, h.ptr<uint8_t>() + r * cols, sc.ptr<float>() + r)
            : quantize_int4_row(w, cols, group, h.ptr<uint8_t>() + r * cols / 2,
                                sc.ptr<float>() + r * G, z.ptr<uint8_t>() + r * G);
    KILN_CHECK(ok, "test weight: a row failed to quantize");
  }
  h.quant = q;
  h.scales = std::make_shared<Tensor>(sc);
  if (int4) h.zero_points = std::make_shared<Tensor>(z);
  return h;
}

}  // namespace kiln::test
