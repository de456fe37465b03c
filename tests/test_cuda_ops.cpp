// Every op of the CUDA backend against the CPU backend (test-backend-ops style): random inputs
// rounded to the engine dtype so both backends see the same values, compared by the normalised
// error ||gpu - cpu|| / ||cpu|| with per-dtype tolerances. Odd sizes, strided rows (whose gap
// columns must stay untouched), GQA groups, windows and soft-capping included.
// Skips when no GPU is visible (CI); compiles without CUDA.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>

#include "core/dtype.h"
#include "core/error.h"
#include "graph/backend.h"
#include "test_util.h"

namespace kiln::test {
namespace {

double tolerance(DType t) {
  return t == DType::F32 ? 1e-5 : t == DType::F16 ? 2e-3 : 1e-2;
}

const char* label(DType t) {
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
    EXPECT_LE(err, tol) << label(dt) << " " << what;
    EXPECT_EQ(clobbered, 0) << label(dt) << " " << what << ": wrote outside its columns";
  }

  DType dt = DType::F32;
  std::unique_ptr<Backend> gpu, cpu;
  std::mt19937 rng{20251122};
  std::vector<void*> allocs;
};

// Rows of `width` values at stride `ld`, gap columns poisoned.
std::vector<float> strided(const std::vector<float>& dense, int64_t rows, int64_t width,
                           int64_t ld) {
  std::vector<float> r(size_t(rows * ld), kPoison);
  for (int64_t i = 0; i < rows; ++i)
    std::copy_n(dense.begin() + i * width, width, r.begin() + i * ld);
  return r;
}

TEST_P(CudaOps, Linear) {
  struct Case {
    int64_t n, in, out, ldx_pad, ldy_pad;
    bool bias;
  };
  const Case cases[] = {
      {1, 64, 33, 0, 0, false},    {1, 4096, 256, 0, 0, true},  {2, 1024, 3000, 0, 0, false},
      {3, 136, 100, 8, 3, true},   {8, 256, 1000, 0, 0, false}, {5, 100, 17, 4, 0, false},
      {4, 18, 7, 2, 1, true},      {17, 64, 130, 0, 5, true},   {130, 200, 96, 16, 0, false},
      {1, 14336, 64, 0, 0, false}, {9, 512, 1, 0, 0, true}};
  for (const Case& c : cases) {
    const std::string what = cat("linear n=", c.n, " in=", c.in, " out=", c.out, " ldx+", c.ldx_pad,
                                 " ldy+", c.ldy_pad, c.bias ? " bias" : "");
    const int64_t ldx = c.in + c.ldx_pad, ldy = c.out + c.ldy_pad;
    auto x = strided(rnd(size_t(c.n * c.in)), c.n, c.in, ldx);
    auto [wh, wd] = matrix(c.out, c.in, 1.0f / std::sqrt(float(c.in)));
    auto [bh, bd] = vec(c.out, 0.0f, 1.0f);
    std::vector<float> want(size_t(c.n * ldy), kPoison);
    cpu->linear(x.data(), c.n, ldx, wh, c.bias ? &bh : nullptr, want.data(), ldy);
    void* xd = up(x);
    void* yd = up(std::vector<float>(size_t(c.n * ldy), kPoison));
    gpu->linear(xd, c.n, ldx, wd, c.bias ? &bd : nullptr, yd, ldy);
    expect_close(down(yd, size_t(c.n * ldy)), ldy, want, ldy, c.n, c.out, what);
  }
}

// The same products with the GEMV kernel switched off: cuBLASLt for every n.
TEST_P(CudaOps, LinearCublasLtOnly) {
  setenv("KILN_CUDA_GEMV", "0", 1);
  auto lt = make_cuda_backend(dt);
  unsetenv("KILN_CUDA_GEMV");
  for (int64_t n : {1, 3, 8}) {
    const int64_t in = 256, out = 300;
    auto x = rnd(size_t(n * in));
    auto [wh, wd] = matrix(out, in, 0.0625f);
    std::vector<float> want(size_t(n * out));
    cpu->linear(x.data(), n, in, wh, nullptr, want.data(), out);
    void* xd = up(x);
    void* yd = up(std::vector<float>(size_t(n * out), kPoison));
    gpu->synchronize();  // the two backends have separate streams
    lt->linear(xd, n, in, wd, nullptr, yd, out);
    lt->synchronize();
    expect_close(down(yd, size_t(n * out)), out, want, out, n, out, cat("cuBLASLt n=", n));
  }
}

TEST_P(CudaOps, Norms) {
  struct Case {
    int64_t rows, dim, ldx_pad, ldy_pad;
  };
  const Case cases[] = {{1, 64, 0, 0},    {3, 100, 4, 2}, {17, 4096, 0, 0},
                        {2, 1000, 24, 8}, {5, 513, 0, 0}, {1, 16, 0, 0}};
  for (NormKind kind : {NormKind::RMS, NormKind::RMSPlusOne, NormKind::Layer}) {
    for (const Case& c : cases) {
      const std::string what = cat("norm kind=", int(kind), " rows=", c.rows, " dim=", c.dim);
      const int64_t ldx = c.dim + c.ldx_pad, ldy = c.dim + c.ldy_pad;
      auto x = strided(rnd(size_t(c.rows * c.dim), 2.0f, 0.5f), c.rows, c.dim, ldx);
      auto [wh, wd] = vec(c.dim, kind == NormKind::RMSPlusOne ? 0.0f : 1.0f, 0.1f);
      auto [bh, bd] = vec(c.dim, 0.0f, 0.1f);
      const bool bias = kind == NormKind::Layer;
      std::vector<float> want(size_t(c.rows * ldy), kPoison);
      cpu->norm(x.data(), c.rows, c.dim, ldx, wh, bias ? &bh : nullptr, kind, 1e-5f, want.data(),
                ldy);
      void* xd = up(x);
      void* yd = up(std::vector<float>(size_t(c.rows * ldy), kPoison));
      gpu->norm(xd, c.rows, c.dim, ldx, wd, bias ? &bd : nullptr, kind, 1e-5f, yd, ldy);
      expect_close(down(yd, size_t(c.rows * ldy)), ldy, want, ldy, c.rows, c.dim, what);
      // In place (the Decoder's post-norms write over their input).
      gpu->norm(xd, c.rows, c.dim, ldx, wd, bias ? &bd : nullptr, kind, 1e-5f, xd, ldx);
      auto want_in = strided(std::vector<float>(size_t(c.rows * c.dim)), c.rows, c.dim, ldx);
      for (int64_t r = 0; r < c.rows; ++r)
        std::copy_n(want.begin() + r * ldy, c.dim, want_in.begin() + r * ldx);
      expect_close(down(xd, size_t(c.rows * ldx)), ldx, want_in, ldx, c.rows, c.dim,
                   what + " in place");
      // From the F32 residual stream (the first layer's input norm).
      void* rd = up_raw(x);
      void* y2 = up(std::vector<float>(size_t(c.rows * ldy), kPoison));
      gpu->norm(rd, c.rows, c.dim, ldx, wd, bias ? &bd : nullptr, kind, 1e-5f, y2, ldy, true);
      expect_close(down(y2, size_t(c.rows * ldy)), ldy, want, ldy, c.rows, c.dim,
                   what + " from the F32 residual");
      // F32 in and out (the final norm the LM head reads): F32 math on both sides.
      auto* y3 = up_raw(std::vector<float>(size_t(c.rows * ldy), kPoison));
      gpu->norm(rd, c.rows, c.dim, ldx, wd, bias ? &bd : nullptr, kind, 1e-5f, y3, ldy, true, true);
      expect_close(down_f32(y3, size_t(c.rows * ldy)), ldy, want, ldy, c.rows, c.dim,
                   what + " F32 in and out", 1e-6);
    }
  }
}

TEST_P(CudaOps, AddNorm) {
  for (NormKind kind : {NormKind::RMS, NormKind::RMSPlusOne, NormKind::Layer}) {
    for (int64_t rows : {1, 3, 17}) {
      for (int64_t dim : {64, 100, 2048}) {
        const std::string what = cat("add_norm kind=", int(kind), " rows=", rows, " dim=", dim);
        // The residual is F32 (unrounded); delta and y are in the engine dtype.
        std::normal_distribution<float> nd(0.0f, 1.0f);
        std::vector<float> res(size_t(rows * dim));
        for (auto& v : res) v = nd(rng);
        auto delta = rnd(size_t(rows * dim), 1.0f);
        auto [wh, wd] = vec(dim, 1.0f, 0.1f);
        auto [bh, bd] = vec(dim, 0.0f, 0.1f);
        const Tensor* b = kind == NormKind::Layer ? &bh : nullptr;
        std::vector<float> res_cpu = res, y(size_t(rows * dim));
        cpu->add_norm(res_cpu.data(), delta.data(), rows, dim, wh, b, kind, 1e-6f, y.data());
        void* rd = up_raw(res);
        void* dd = up(delta);
        void* yd = up(std::vector<float>(size_t(rows * dim), kPoison));
        gpu->add_norm(rd, dd, rows, dim, wd, b ? &bd : nullptr, kind, 1e-6f, yd);
        expect_close(down_f32(rd, size_t(rows * dim)), dim, res_cpu, dim, rows, dim,
                     what + " residual", 1e-6);
        expect_close(down(yd, size_t(rows * dim)), dim, y, dim, rows, dim, what);
      }
    }
  }
}

TEST_P(CudaOps, HeadNorm) {
  for (int64_t hd : {16, 32, 128}) {
    for (int64_t heads : {2, 4}) {
      const int64_t n = 3, ld = heads * hd + 24;  // q|k|v-like rows: only the first part normed
      auto x = rnd(size_t(n * ld), 1.5f);
      auto [wh, wd] = vec(hd, 1.0f, 0.2f);
      auto want = x;
      cpu->head_norm(want.data(), n, ld, heads, hd, wh, NormKind::RMS, 1e-6f);
      void* xd = up(x);
      gpu->head_norm(xd, n, ld, heads, hd, wd, NormKind::RMS, 1e-6f);
      expect_close(down(xd, size_t(n * ld)), ld, want, ld, n, ld,
                   cat("head_norm hd=", hd, " heads=", heads));
    }
  }
}

// The Decoder's q/k pattern: head_norm and rope on the q heads, then on the k heads that follow
// them in the same rows (the backend may merge each pair into one launch), then an unrelated op.
TEST_P(CudaOps, QkNormAndRopePairs) {
  for (int64_t hd : {32, 128}) {
    const int64_t n = 3, hq = 4, hk = 2, qd = hq * hd, ld = qd + 2 * hk * hd;  // q | k | v
    const int64_t rot = hd == 32 ? 16 : hd, half = rot / 2;
    auto x = rnd(size_t(n * ld), 1.5f);
    auto [qwh, qwd] = vec(hd, 1.0f, 0.2f);
    auto [kwh, kwd] = vec(hd, 1.0f, 0.2f);
    std::vector<float> cs(size_t(n * half)), sn(cs.size());
    for (size_t i = 0; i < cs.size(); ++i)
      cs[i] = std::cos(0.3f * float(i)), sn[i] = std::sin(0.3f * float(i));
    auto want = x;
    cpu->head_norm(want.data(), n, ld, hq, hd, qwh, NormKind::RMS, 1e-6f);
    cpu->head_norm(want.data() + qd, n, ld, hk, hd, kwh, NormKind::RMS, 1e-6f);
    cpu->rope(want.data(), n, ld, hq, hd, rot, cs.data(), sn.data());
    cpu->rope(want.data() + qd, n, ld, hk, hd, rot, cs.data(), sn.data());
    cpu->add(want.data(), want.data() + ld, ld);  // row 0 += row 1
    void* xd = up(x);
    void* kd = static_cast<char*>(xd) + qd * dtype_size(dt);
    const float* c = up_raw(cs);
    const float* s2 = up_raw(sn);
    gpu->head_norm(xd, n, ld, hq, hd, qwd, NormKind::RMS, 1e-6f);
    gpu->head_norm(kd, n, ld, hk, hd, kwd, NormKind::RMS, 1e-6f);
    gpu->rope(xd, n, ld, hq, hd, rot, c, s2);
    gpu->rope(kd, n, ld, hk, hd, rot, c, s2);
    gpu->add(xd, static_cast<char*>(xd) + ld * dtype_size(dt), ld);
    expect_close(down(xd, size_t(n * ld)), ld, want, ld, n, ld, cat("q/k pairs hd=", hd));
    // A lone rope (no k half follows) still runs before the next op reads its output.
    auto want2 = want;
    cpu->rope(want2.data(), n, ld, hq, hd, rot, cs.data(), sn.data());
    cpu->act(want2.data(), n * ld, Activation::ReLU);
    gpu->rope(xd, n, ld, hq, hd, rot, c, s2);
    gpu->act(xd, n * ld, Activation::ReLU);
    expect_close(down(xd, size_t(n * ld)), ld, want2, ld, n, ld, cat("lone rope hd=", hd));
  }
}

// Decoder sequences the backend may fuse: GEMV gate_up + gated_act; rope(q), rope(k),
// kv_write(k, v); and a held-back GEMV followed by something else.
TEST_P(CudaOps, FusedDecoderSequences) {
  for (int64_t n : {1, 2}) {
    for (int64_t inter : {3, 64, 1000}) {
      for (bool bias : {false, true}) {
        for (Activation a : {Activation::SiLU, Activation::GeluTanh}) {
          const int64_t in = 256;
          auto x = rnd(size_t(n * in));
          auto [wh, wd] = matrix(2 * inter, in, 0.0625f);
          auto [bh, bd] = vec(2 * inter, 0.0f, 0.5f);
          std::vector<float> gu(size_t(n * 2 * inter)), want(size_t(n * inter));
          cpu->linear(x.data(), n, in, wh, bias ? &bh : nullptr, gu.data(), 2 * inter);
          cpu->gated_act(gu.data(), n, inter, a, want.data());
          void* xd = up(x);
          void* gud = up(std::vector<float>(size_t(n * 2 * inter), kPoison));
          void* outd = up(std::vector<float>(size_t(n * inter), kPoison));
          gpu->linear(xd, n, in, wd, bias ? &bd : nullptr, gud, 2 * inter);
          gpu->gated_act(gud, n, inter, a, outd);
          const std::string what = cat("gate_up+act n=", n, " inter=", inter, bias ? " bias" : "");
          expect_close(down(outd, size_t(n * inter)), inter, want, inter, n, inter, what);
          expect_close(down(gud, size_t(n * 2 * inter)), 2 * inter, gu, 2 * inter, n, 2 * inter,
                       what + " gu");
        }
      }
    }
  }
  {  // a held-back GEMV whose output is read by something else
    const int64_t n = 1, in = 128, out = 64;
    auto x = rnd(size_t(n * in)), r = rnd(size_t(n * out));
    auto [wh, wd] = matrix(out, in, 0.1f);
    std::vector<float> want(size_t(n * out));
    cpu->linear(x.data(), n, in, wh, nullptr, want.data(), out);
    cpu->add(want.data(), r.data(), n * out);
    void* yd = up(std::vector<float>(size_t(n * out), kPoison));
    gpu->linear(up(x), n, in, wd, nullptr, yd, out);
    gpu->add(yd, up(r), n * out);
    expect_close(down(yd, size_t(n * out)), out, want, out, n, out, "gemv then add");
  }
  for (int64_t rot : {64, 32}) {  // full and partial rotary
    const int64_t n = 3, hq = 4, hk = 2, hd = 64, qd = hq * hd, kvd = hk * hd, ld = qd + 2 * kvd;
    const int64_t bs = 4, half = rot / 2;
    std::vector<int32_t> table = {5, 1, 3, 0};
    std::vector<int32_t> pos = {6, 7, 8};
    const int64_t pool = 6 * bs * kvd;
    std::vector<float> kc(size_t(pool), 0.0f), vc(size_t(pool), 0.0f);
    void* kg = up(std::vector<float>(size_t(pool), 0.0f));
    void* vg = up(std::vector<float>(size_t(pool), 0.0f));
    KVLayerView kv_cpu{kc.data(), vc.data(), table.data(), bs, kvd, 9};
    KVLayerView kv_gpu{kg, vg, up_raw(table), bs, kvd, 9};
    auto x = rnd(size_t(n * ld));
    std::vector<float> cs(size_t(n * half)), sn(cs.size());
    for (size_t i = 0; i < cs.size(); ++i)
      cs[i] = std::cos(0.7f * float(i)), sn[i] = std::sin(0.7f * float(i));
    auto want = x;
    cpu->rope(want.data(), n, ld, hq, hd, rot, cs.data(), sn.data());
    cpu->rope(want.data() + qd, n, ld, hk, hd, rot, cs.data(), sn.data());
    cpu->kv_write(kv_cpu, want.data() + qd, want.data() + qd + kvd, ld, pos.data(), n);
    void* xd = up(x);
    const size_t es = dtype_size(dt);
    const float* c = up_raw(cs);
    const float* s2 = up_raw(sn);
    gpu->rope(xd, n, ld, hq, hd, rot, c, s2);
    gpu->rope(static_cast<char*>(xd) + qd * es, n, ld, hk, hd, rot, c, s2);
    gpu->kv_write(kv_gpu, static_cast<char*>(xd) + qd * es,
                  static_cast<char*>(xd) + (qd + kvd) * es, ld, up_raw(pos), n);
    const std::string what = cat("rope+kv_write rot=", rot);
    expect_close(down(xd, size_t(n * ld)), ld, want, ld, n, ld, what);
    expect_close(down(kg, size_t(pool)), pool, kc, pool, 1, pool, what + " K cache");
    expect_close(down(vg, size_t(pool)), pool, vc, pool, 1, pool, what + " V cache", 0.0);
  }
}

TEST_P(CudaOps, Elementwise) {
  for (int64_t count : {1, 17, 1000, 70000}) {
    auto x = rnd(size_t(count), 2.0f), y = rnd(size_t(count), 2.0f);
    {
      auto want = x;
      cpu->add(want.data(), y.data(), count);
      void* xd = up(x);
      gpu->add(xd, up(y), count);
      expect_close(down(xd, size_t(count)), count, want, count, 1, count, cat("add ", count));
    }
    for (Activation a :
         {Activation::SiLU, Activation::GeluTanh, Activation::GeluErf, Activation::ReLU}) {
      auto want = x;
      cpu->act(want.data(), count, a);
      void* xd = up(x);
      gpu->act(xd, count, a);
      expect_close(down(xd, size_t(count)), count, want, count, 1, count,
                   cat("act ", int(a), " count=", count));
    }
    {
      auto want = x;
      cpu->softcap(want.data(), count, 3.0f);
      void* xd = up(x);
      gpu->softcap(xd, count, 3.0f);
      expect_close(down(xd, size_t(count)), count, want, count, 1, count, cat("softcap ", count));
    }
  }
  for (int64_t n : {1, 3}) {
    for (int64_t inter : {17, 100, 14336}) {
      for (Activation a :
           {Activation::SiLU, Activation::GeluTanh, Activation::GeluErf, Activation::ReLU}) {
        auto gu = rnd(size_t(n * 2 * inter), 2.0f);
        std::vector<float> want(size_t(n * inter));
        cpu->gated_act(gu.data(), n, inter, a, want.data());
        void* out = up(std::vector<float>(size_t(n * inter), kPoison));
        gpu->gated_act(up(gu), n, inter, a, out);
        expect_close(down(out, size_t(n * inter)), inter, want, inter, n, inter,
                     cat("gated_act ", int(a), " n=", n, " inter=", inter));
      }
    }
  }
}

TEST_P(CudaOps, EmbedAndAddRows) {
  for (int64_t dim : {24, 64, 4096}) {
    for (float scale : {1.0f, 8.0f}) {
      const int64_t vocab = 50, n = 7;
      auto [th, td] = matrix(vocab, dim, 1.0f);
      std::vector<int32_t> ids = {0, 49, 3, 3, 17, 1, 48};
      std::vector<float> want(size_t(n * dim));
      cpu->embed(th, ids.data(), n, scale, want.data());
      void* out = up_raw(std::vector<float>(size_t(n * dim), kPoison));  // F32 residual stream
      const int32_t* idd = up_raw(ids);
      gpu->embed(td, idd, n, scale, out);
      expect_close(down_f32(out, size_t(n * dim)), dim, want, dim, n, dim,
                   cat("embed dim=", dim, " scale=", scale), 1e-6);
      auto [ph, pd] = matrix(vocab, dim, 0.5f);
      cpu->add_rows(ph, ids.data(), n, want.data());
      gpu->add_rows(pd, idd, n, out);
      expect_close(down_f32(out, size_t(n * dim)), dim, want, dim, n, dim,
                   cat("add_rows dim=", dim), 1e-6);
    }
  }
}

TEST_P(CudaOps, Rope) {
  struct Case {
    int64_t n, heads, hd, rot, pad;
  };
  const Case cases[] = {{1, 4, 16, 16, 0},
                        {5, 4, 64, 64, 8},
                        {3, 8, 128, 64, 0},
                        {2, 2, 64, 24, 5},
                        {17, 2, 256, 256, 0}};
  std::uniform_real_distribution<float> ang(-3.2f, 3.2f);
  for (const Case& c : cases) {
    const int64_t ld = c.heads * c.hd + c.pad, half = c.rot / 2;
    auto x = rnd(size_t(c.n * ld));
    std::vector<float> cs(size_t(c.n * half)), sn(cs.size());
    for (size_t i = 0; i < cs.size(); ++i) {
      const float t = ang(rng);
      cs[i] = std::cos(t), sn[i] = std::sin(t);
    }
    auto want = x;
    cpu->rope(want.data(), c.n, ld, c.heads, c.hd, c.rot, cs.data(), sn.data());
    void* xd = up(x);
    gpu->rope(xd, c.n, ld, c.heads, c.hd, c.rot, up_raw(cs), up_raw(sn));
    expect_close(down(xd, size_t(c.n * ld)), ld, want, ld, c.n, ld,
                 cat("rope n=", c.n, " hd=", c.hd, " rot=", c.rot));
  }
}

struct AttnCase {
  int64_t heads, kv_heads, hd, window;
  float softcap;
  int64_t block_size, cached, n;
  bool tell_len = true;  // KVLayerView::len set (else the backend reads positions back)
};

class CudaAttention : public CudaOps {
 protected:
  void run(const AttnCase& c) {
    const std::string what =
        cat("attention heads=", c.heads, "/", c.kv_heads, " hd=", c.hd, " window=", c.window,
            " softcap=", c.softcap, " bs=", c.block_size, " cached=", c.cached, " n=", c.n);
    const int64_t T = c.cached + c.n, kvd = c.kv_heads * c.hd, qd = c.heads * c.hd;
    const int64_t need = (T + c.block_size - 1) / c.block_size, nb = need + 3;
    // A scattered block table: the sequence's blocks are not in pool order.
    std::vector<int32_t> perm(static_cast<size_t>(nb));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    std::vector<int32_t> table(perm.begin(), perm.begin() + need);
    const int64_t pool = nb * c.block_size * kvd;
    std::vector<float> kc(size_t(pool), 0.0f), vc(size_t(pool), 0.0f);
    void* kg = up(std::vector<float>(size_t(pool), 0.0f));
    void* vg = up(std::vector<float>(size_t(pool), 0.0f));
    const int32_t* tg = up_raw(table);
    KVLayerView kv_cpu{kc.data(), vc.data(), table.data(), c.block_size, kvd, T};
    KVLayerView kv_gpu{kg, vg, tg, c.block_size, kvd, c.tell_len ? T : 0};
    // K/V rows strided like the Decoder's fused qkv buffer.
    const int64_t ldkv = 2 * kvd + 8;
    auto write = [&](int64_t p0, int64_t m) {
      if (m == 0) return;
      auto kv = rnd(size_t(m * ldkv));
      std::vector<int32_t> pos(static_cast<size_t>(m));
      std::iota(pos.begin(), pos.end(), int32_t(p0));
      cpu->kv_write(kv_cpu, kv.data(), kv.data() + kvd, ldkv, pos.data(), m);
      void* kvg = up(kv);
      gpu->kv_write(kv_gpu, kvg, static_cast<char*>(kvg) + kvd * dtype_size(dt), ldkv, up_raw(pos),
                    m);
    };
    write(0, c.cached);
    write(c.cached, c.n);
    const int64_t ldq = qd + 12, ldo = qd + 4;
    auto q = rnd(size_t(c.n * ldq));
    std::vector<int32_t> pos(static_cast<size_t>(c.n));
    std::iota(pos.begin(), pos.end(), int32_t(c.cached));
    const AttnParams ap{c.heads,   c.kv_heads, c.hd, 1.0f / std::sqrt(float(c.hd)),
                        c.softcap, c.window};
    std::vector<float> want(size_t(c.n * ldo), kPoison);
    cpu->attention(q.data(), ldq, c.n, pos.data(), kv_cpu, ap, want.data(), ldo);
    void* out = up(std::vector<float>(size_t(c.n * ldo), kPoison));
    gpu->attention(up(q), ldq, c.n, up_raw(pos), kv_gpu, ap, out, ldo);
    expect_close(down(out, size_t(c.n * ldo)), ldo, want, ldo, c.n, qd, what);
    // The cache itself, as attention read it.
    auto kgot = down(kg, size_t(pool));
    expect_close(kgot, pool, kc, pool, 1, pool, what + " K cache", 0.0);
  }
};

TEST_P(CudaAttention, Prefill) {
  run({4, 4, 16, 0, 0, 16, 0, 17});    // MHA, fixture head size
  run({4, 2, 32, 0, 0, 16, 0, 24});    // GQA 2
  run({16, 2, 64, 0, 0, 16, 0, 33});   // GQA 8
  run({8, 1, 128, 0, 0, 16, 0, 130});  // MQA
  run({32, 8, 128, 0, 0, 16, 0, 300});
  run({8, 2, 256, 0, 0, 16, 0, 70});
  run({8, 8, 80, 0, 0, 4, 0, 19});   // head_dim 80, small blocks
  run({4, 2, 18, 0, 0, 16, 0, 21});  // head_dim not a multiple of 8: scalar K/V loads
}

TEST_P(CudaAttention, WindowAndSoftcap) {
  run({4, 2, 16, 8, 0, 16, 0, 24});
  run({4, 2, 16, 8, 50.0f, 16, 0, 24});
  run({8, 4, 64, 0, 30.0f, 16, 10, 9});
  run({16, 8, 128, 100, 0, 16, 0, 260});
  run({32, 8, 128, 1024, 0, 16, 2000, 1});  // window with split-K
}

TEST_P(CudaAttention, DecodeAndChunks) {
  run({4, 2, 16, 0, 0, 16, 5, 1});
  run({32, 8, 128, 0, 0, 16, 700, 1});   // split-K
  run({64, 8, 128, 0, 0, 16, 3000, 1});  // many splits
  run({8, 2, 256, 0, 0, 16, 100, 5});    // chunked prefill onto a cache
  run({32, 8, 128, 0, 0, 16, 640, 3});   // a few rows, split-K
  run({14, 2, 64, 0, 0, 16, 500, 1});    // group 7
  AttnCase c{32, 8, 128, 0, 0, 16, 700, 1};
  c.tell_len = false;
  run(c);
}

// Batched decode: one token of each of several sequences, each with its own row of a block-table
// matrix, at different lengths (one past a window, one long enough for split-K); GQA groups that
// fill a block partly, exactly and over several blocks.
TEST_P(CudaAttention, BatchedSequences) {
  struct G {
    int64_t heads, kv_heads, hd, window;
  };
  for (const G g :
       {G{32, 8, 128, 0}, G{16, 1, 64, 0}, G{8, 8, 64, 0}, G{40, 2, 64, 0}, G{8, 2, 128, 24}}) {
    const std::vector<int64_t> lens = {1, 37, 700, 5, 64, 129};
    const int64_t B = int64_t(lens.size()), bs = 16, kvd = g.kv_heads * g.hd, qd = g.heads * g.hd;
    const int64_t stride = 50;  // table row length: >= the longest sequence's blocks
    int64_t nb = 1;
    std::vector<int32_t> table(size_t(B * stride), 0);
    for (int64_t i = 0; i < B; ++i)
      for (int64_t b = 0; b * bs < lens[size_t(i)]; ++b)
        table[size_t(i * stride + b)] = int32_t(nb++);
    std::vector<int32_t> perm(static_cast<size_t>(nb));  // scatter the blocks over the pool
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin() + 1, perm.end(), rng);
    for (auto& t : table) t = perm[size_t(t)];
    const int64_t pool = nb * bs * kvd;
    std::vector<float> kc(size_t(pool), 0.0f), vc(size_t(pool), 0.0f);
    void* kg = up(std::vector<float>(size_t(pool), 0.0f));
    void* vg = up(std::vector<float>(size_t(pool), 0.0f));
    const int32_t* tg = up_raw(table);
    std::vector<int32_t> seq(static_cast<size_t>(B));
    std::iota(seq.begin(), seq.end(), 0);
    const int32_t* sg = up_raw(seq);
    const int64_t longest = *std::max_element(lens.begin(), lens.end());
    KVLayerView kv_cpu{kc.data(), vc.data(), table.data(), bs, kvd, longest, seq.data(), stride};
    KVLayerView kv_gpu{kg, vg, tg, bs, kvd, 1024, sg, stride};  // len: an upper bound
    // Every sequence's history, written one sequence at a time through its own table row.
    for (int64_t i = 0; i < B; ++i) {
      const int64_t m = lens[size_t(i)];
      auto kv = rnd(size_t(m * 2 * kvd));
      std::vector<int32_t> pos(static_cast<size_t>(m)), one(static_cast<size_t>(m), int32_t(i));
      std::iota(pos.begin(), pos.end(), 0);
      cpu->kv_write(KVLayerView{kc.data(), vc.data(), table.data(), bs, kvd, m, one.data(), stride},
                    kv.data(), kv.data() + kvd, 2 * kvd, pos.data(), m);
      void* kvg = up(kv);
      gpu->kv_write(KVLayerView{kg, vg, tg, bs, kvd, m, up_raw(one), stride}, kvg,
                    static_cast<char*>(kvg) + kvd * dtype_size(dt), 2 * kvd, up_raw(pos), m);
    }
    std::vector<int32_t> pos(static_cast<size_t>(B));
    for (int64_t i = 0; i < B; ++i) pos[size_t(i)] = int32_t(lens[size_t(i)] - 1);
    const AttnParams ap{g.heads, g.kv_heads, g.hd, 1.0f / std::sqrt(float(g.hd)), 0.0f, g.window};
    const int64_t ldo = qd + 4;
    auto q = rnd(size_t(B * qd));
    std::vector<float> want(size_t(B * ldo), kPoison);
    cpu->attention(q.data(), qd, B, pos.data(), kv_cpu, ap, want.data(), ldo);
    void* out = up(std::vector<float>(size_t(B * ldo), kPoison));
    gpu->attention(up(q), qd, B, up_raw(pos), kv_gpu, ap, out, ldo);
    const std::string what = cat("batched attention heads=", g.heads, "/", g.kv_heads, " hd=", g.hd,
                                 " window=", g.window);
    expect_close(down(out, size_t(B * ldo)), ldo, want, ldo, B, qd, what);
    expect_close(down(kg, size_t(pool)), pool, kc, pool, 1, pool, what + " K cache", 0.0);
  }
}

// The LM head: F32 logits whatever the activation dtype, soft-capped or not; GEMV and cuBLASLt
// sizes.
TEST_P(CudaOps, Logits) {
  for (const int64_t n : {1, 2, 3, 9}) {
    for (const float cap : {0.0f, 30.0f}) {
      const int64_t in = 256, out = 1001;
      auto x = rnd(size_t(n * in));
      auto [wh, wd] = matrix(out, in, 4.0f / std::sqrt(float(in)));
      std::vector<float> want(size_t(n * out));
      cpu->logits(x.data(), n, in, wh, cap, want.data());
      auto* yd = static_cast<float*>(gpu->alloc(size_t(n * out) * 4));
      allocs.push_back(yd);
      gpu->logits(up(x), n, in, wd, cap, yd);
      std::vector<float> got(size_t(n * out));
      gpu->to_host(got.data(), yd, got.size() * 4);
      // F32 out: only the products' accumulation order differs from the CPU, in every dtype.
      expect_close(got, out, want, out, n, out, cat("logits n=", n, " cap=", cap), 1e-5);
      // From an F32 hidden state (unrounded values): the same, through GEMV or the rounding
      // fallback for cuBLASLt (n > 2), whose error is the dtype's.
      std::normal_distribution<float> nd(0.0f, 1.0f);
      std::vector<float> xf(size_t(n * in));
      for (auto& v : xf) v = nd(rng);
      cpu->logits(xf.data(), n, in, wh, cap, want.data());
      gpu->logits(up_raw(xf), n, in, wd, cap, yd, true);
      gpu->to_host(got.data(), yd, got.size() * 4);
      expect_close(got, out, want, out, n, out, cat("logits from F32 n=", n, " cap=", cap),
                   n <= 2 || dt == DType::F32 ? 1e-5 : tolerance(dt));
    }
  }
}

TEST_P(CudaOps, MoE) {
  const int64_t E = 4, H = 64, I = 32, Is = 48;
  for (int64_t n : {1, 5, 17}) {
    for (bool renorm : {true, false}) {
      for (bool shared : {false, true}) {
        for (int64_t k : {1, 2}) {
          // Router rows are unit vectors on the first E coordinates and each row of x ranks the
          // experts there 3 apart, so top-k is the same in every dtype (no near ties).
          std::vector<float> x = rnd(size_t(n * H));
          for (int64_t i = 0; i < n; ++i) {
            std::vector<int> order(static_cast<size_t>(E));
            std::iota(order.begin(), order.end(), 0);
            std::shuffle(order.begin(), order.end(), rng);
            for (int64_t e = 0; e < E; ++e)
              x[size_t(i * H + e)] = 3.0f * float(order[size_t(e)]) / 4.0f;
          }
          x = round(x);
          std::vector<float> router(size_t(E * H), 0.0f);
          for (int64_t e = 0; e < E; ++e) router[size_t(e * H + e)] = 4.0f;
          auto [rh, rd] = weight(router, {E, H}, dt);
          std::vector<Tensor> gu_h, gu_d, dn_h, dn_d;
          for (int64_t e = 0; e < E; ++e) {
            auto [a, b] = matrix(2 * I, H, 0.125f);
            auto [c2, d2] = matrix(H, I, 0.17f);
            gu_h.push_back(a), gu_d.push_back(b), dn_h.push_back(c2), dn_d.push_back(d2);
          }
          auto [sguh, sgud] = matrix(2 * Is, H, 0.125f);
          auto [sdh, sdd] = matrix(H, Is, 0.14f);
          auto [sgh, sgd] = matrix(1, H, 0.125f);
          std::vector<const Tensor*> guh_p, gud_p, dnh_p, dnd_p;
          for (int64_t e = 0; e < E; ++e) {
            guh_p.push_back(&gu_h[size_t(e)]), gud_p.push_back(&gu_d[size_t(e)]);
            dnh_p.push_back(&dn_h[size_t(e)]), dnd_p.push_back(&dn_d[size_t(e)]);
          }
          Backend::MoeWeights wh{&rh,
                                 guh_p.data(),
                                 dnh_p.data(),
                                 shared ? &sguh : nullptr,
                                 shared ? &sdh : nullptr,
                                 shared ? &sgh : nullptr};
          Backend::MoeWeights wd{&rd,
                                 gud_p.data(),
                                 dnd_p.data(),
                                 shared ? &sgud : nullptr,
                                 shared ? &sdd : nullptr,
                                 shared ? &sgd : nullptr};
          std::vector<float> want(size_t(n * H));
          cpu->moe_ffn(x.data(), n, H, wh, E, k, renorm, Activation::SiLU, want.data());
          void* out = up(std::vector<float>(size_t(n * H), kPoison));
          gpu->moe_ffn(up(x), n, H, wd, E, k, renorm, Activation::SiLU, out);
          expect_close(
              down(out, size_t(n * H)), H, want, H, n, H,
              cat("moe n=", n, " k=", k, renorm ? " renorm" : "", shared ? " shared" : ""));
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaOps, ::testing::Values(DType::F32, DType::F16, DType::BF16),
                         [](const auto& i) { return std::string(label(i.param)); });
INSTANTIATE_TEST_SUITE_P(Dtypes, CudaAttention,
                         ::testing::Values(DType::F32, DType::F16, DType::BF16),
                         [](const auto& i) { return std::string(label(i.param)); });

TEST(Cuda, AvailabilityMatchesFactory) {
  EXPECT_EQ(cuda_available(), make_cuda_backend(DType::BF16) != nullptr);
}

TEST(Cuda, ErrorsAreKilnErrors) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU visible";
  auto be = make_cuda_backend(DType::F32);
  // An absurd allocation fails with a kiln::Error naming the call, not a crash.
  try {
    be->alloc(size_t(1) << 60);
    FAIL() << "expected kiln::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cudaMalloc"), std::string::npos) << e.what();
  }
  EXPECT_THROW(make_cuda_backend(DType::I32), Error);
}

// ---- Mixed batches (continuous batching) ----
// One attention call over the rows of several sequences: one-token decodes first, then prefill
// chunks at consecutive positions from `start` (their K/V already in the cache, as the Decoder's
// kv_write leaves them), each sequence with its own block-table row. The CPU backend computes
// every row from seq / pos; the CUDA backend gets seq_start, num_seqs, num_decode and max_q
// too (decodes on CUDA cores, chunks on tensor cores in F16 / BF16 for the head sizes it takes).

struct MixedSeq {
  int64_t start, q;  // positions cached before the step; rows this step
};

struct MixedCase {
  int64_t heads, kv_heads, hd, window;
  float softcap;
  std::vector<MixedSeq> seqs;  // the first num_decode have q == 1
  int64_t num_decode;
  bool seq_start = true;  // give the mixed-batch fields (else a plain batched decode: seq, pos)
};

class CudaMixedAttention : public CudaOps {
 protected:
  // Runs the case once per KV length in `bounds` (0: the tight max(pos) + 1) against the CPU
  // reference; returns each output [n, ldo].
  std::vector<std::vector<float>> run(const MixedCase& c, const std::vector<int64_t>& bounds) {
    const int64_t bs = 16, kvd = c.kv_heads * c.hd, qd = c.heads * c.hd;
    const int64_t S = int64_t(c.seqs.size());
    int64_t n = 0, max_q = 0, longest = 0, stride = 1;
    std::vector<int32_t> seq_start{0};
    for (int64_t s = 0; s < S; ++s) {
      const MixedSeq& m = c.seqs[size_t(s)];
      if (s < c.num_decode) {
        EXPECT_EQ(m.q, 1) << "decodes have one row";
      }
      if (s >= c.num_decode) max_q = std::max(max_q, m.q);
      n += m.q;
      seq_start.push_back(int32_t(n));
      longest = std::max(longest, m.start + m.q);
      stride = std::max(stride, (m.start + m.q + bs - 1) / bs + 1);  // + 1: rows have slack
    }
    std::string what =
        cat("mixed attention heads=", c.heads, "/", c.kv_heads, " hd=", c.hd, " window=", c.window,
            " softcap=", c.softcap, " decodes=", c.num_decode, " seqs=[");
    for (const MixedSeq& m : c.seqs) what += cat(" ", m.start, "+", m.q);
    what += " ]";
    // Block tables: row s covers sequence s; blocks scattered over the pool; block 0 unused.
    int64_t nb = 1;
    std::vector<int32_t> table(size_t(S * stride), 0);
    for (int64_t s = 0; s < S; ++s) {
      const MixedSeq& m = c.seqs[size_t(s)];
      for (int64_t b = 0; b * bs < m.start + m.q; ++b)
        table[size_t(s * stride + b)] = int32_t(nb++);
    }
    std::vector<int32_t> perm(static_cast<size_t>(nb));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin() + 1, perm.end(), rng);
    for (auto& t : table) t = perm[size_t(t)];
    const int64_t pool = nb * bs * kvd;
    std::vector<float> kc(size_t(pool), 0.0f), vc(size_t(pool), 0.0f);
    void* kg = up(std::vector<float>(size_t(pool), 0.0f));
    void* vg = up(std::vector<float>(size_t(pool), 0.0f));
    const int32_t* tg = up_raw(table);
    // Each sequence's history and this step's K/V, through its own table row.
    for (int64_t s = 0; s < S; ++s) {
      const int64_t m = c.seqs[size_t(s)].start + c.seqs[size_t(s)].q;
      auto kv = rnd(size_t(m * 2 * kvd));
      std::vector<int32_t> pos(static_cast<size_t>(m)), one(static_cast<size_t>(m), int32_t(s));
      std::iota(pos.begin(), pos.end(), 0);
      cpu->kv_write(KVLayerView{kc.data(), vc.data(), table.data(), bs, kvd, m, one.data(), stride},
                    kv.data(), kv.data() + kvd, 2 * kvd, pos.data(), m);
      void* kvg = up(kv);
      gpu->kv_write(KVLayerView{kg, vg, tg, bs, kvd, m, up_raw(one), stride}, kvg,
                    static_cast<char*>(kvg) + kvd * dtype_size(dt), 2 * kvd, up_raw(pos), m);
    }
    std::vector<int32_t> pos(static_cast<size_t>(n)), seq(static_cast<size_t>(n));
    for (int64_t s = 0; s < S; ++s)
      for (int64_t j = 0; j < c.seqs[size_t(s)].q; ++j) {
        pos[size_t(seq_start[size_t(s)] + j)] = int32_t(c.seqs[size_t(s)].start + j);
        seq[size_t(seq_start[size_t(s)] + j)] = int32_t(s);
      }
    const AttnParams ap{c.heads,   c.kv_heads, c.hd, 1.0f / std::sqrt(float(c.hd)),
                        c.softcap, c.window};
    // Rows 16-byte aligned (the tensor-core kernel's condition), gap columns poisoned.
    const int64_t ldq = qd + 16, ldo = qd + 8;
    auto q = rnd(size_t(n * ldq));
    std::vector<float> want(size_t(n * ldo), kPoison);
    KVLayerView kv_cpu{kc.data(), vc.data(), table.data(), bs, kvd, longest, seq.data(), stride};
    cpu->attention(q.data(), ldq, n, pos.data(), kv_cpu, ap, want.data(), ldo);
    void* qg = up(q);
    const int32_t* pg = up_raw(pos);
    const int32_t* sg = up_raw(seq);
    const int32_t* ssg = up_raw(seq_start);
    std::vector<std::vector<float>> outs;
    for (const int64_t bound : bounds) {
      KVLayerView kv_gpu{kg, vg, tg, bs, kvd, bound > 0 ? bound : longest, sg, stride};
      if (c.seq_start) {
        kv_gpu.seq_start = ssg;
        kv_gpu.num_seqs = S;
        kv_gpu.num_decode = c.num_decode;
        kv_gpu.max_q = max_q;
      }
      void* out = up(std::vector<float>(size_t(n * ldo), kPoison));
      gpu->attention(qg, ldq, n, pg, kv_gpu, ap, out, ldo);
      outs.push_back(down(out, size_t(n * ldo)));
      expect_close(outs.back(), ldo, want, ldo, n, qd, cat(what, " len=", kv_gpu.len));
    }
    expect_close(down(kg, size_t(pool)), pool, kc, pool, 1, pool, what + " K cache", 0.0);
    return outs;
  }
  void run(const MixedCase& c) { run(c, {0}); }
};

// Decodes at various lengths plus prefill chunks from 0 and from the middle of a cache, 1 to
// 300 rows; GQA, MHA, MQA; head_dim 64, 80, 128, 256 (tensor cores in F16 / BF16) and 18 (CUDA
// cores in every dtype).
TEST_P(CudaMixedAttention, DecodesAndChunks) {
  const std::vector<MixedSeq> llama = {{0, 1},   {36, 1},   {699, 1}, {4, 1},   {128, 1},
                                       {0, 300}, {100, 17}, {513, 1}, {40, 64}, {1000, 45}};
  run({32, 8, 128, 0, 0.0f, llama, 5});
  run({16, 2, 64, 0, 0.0f, {{49, 1}, {299, 1}, {0, 33}, {90, 130}, {250, 7}}, 2});
  run({8, 8, 80, 0, 0.0f, {{19, 1}, {0, 19}, {33, 70}}, 1});
  run({8, 2, 256, 0, 0.0f, {{9, 1}, {77, 1}, {5, 40}, {0, 2}}, 2});
  run({4, 2, 18, 0, 0.0f, {{10, 1}, {3, 1}, {0, 21}, {50, 9}}, 2});
  run({40, 2, 64, 0, 0.0f, {{5, 1}, {31, 1}, {200, 3}, {0, 100}}, 2});  // group 20: 2 blocks
  // Only prefill chunks; a single one; only decodes (seq_start given).
  run({32, 8, 128, 0, 0.0f, {{0, 150}, {300, 16}, {17, 1}, {64, 129}}, 0});
  run({8, 2, 64, 0, 0.0f, {{333, 77}}, 0});
  run({32, 8, 128, 0, 0.0f, {{2, 1}, {899, 1}, {63, 1}}, 3});
}

TEST_P(CudaMixedAttention, WindowAndSoftcap) {
  run({16, 8, 128, 100, 0.0f, {{30, 1}, {700, 1}, {0, 260}, {150, 80}, {400, 5}}, 2});
  run({8, 1, 128, 64, 50.0f, {{0, 100}, {200, 31}}, 0});  // MQA
  run({8, 8, 80, 0, 30.0f, {{20, 1}, {0, 19}, {33, 70}}, 1});
  run({32, 8, 64, 1024, 0.0f, {{1999, 1}, {1500, 1}, {1800, 40}}, 2});  // window, split-K
  run({4, 2, 16, 8, 50.0f, {{12, 1}, {0, 24}, {30, 3}}, 1});
}

// A captured decode graph passes a length bucket, not the lengths: the same launch under a large
// kv.len bound must give the tight bound's result for short sequences (the split over keys
// follows each row's own range on the device), with and without the mixed-batch fields.
TEST_P(CudaMixedAttention, LengthBoundDoesNotMatter) {
  const std::vector<MixedSeq> short_decodes = {{2, 1}, {39, 1}, {16, 1}, {8, 1}, {32, 1}, {0, 1}};
  for (const bool given : {true, false}) {
    MixedCase c{32, 8, 128, 0, 0.0f, short_decodes, 6};
    c.seq_start = given;
    const auto outs = run(c, {0, 1 << 16});
    const int64_t n = 6, qd = 32 * 128, ldo = qd + 8;
    expect_close(outs[1], ldo, outs[0], ldo, n, qd, "large bound vs tight bound");
  }
  MixedCase w{16, 2, 64, 48, 0.0f, {{5, 1}, {60, 1}, {200, 1}, {20, 1}}, 4};  // window
  auto outs = run(w, {0, 4096});
  expect_close(outs[1], 16 * 64 + 8, outs[0], 16 * 64 + 8, 4, 16 * 64, "window, large bound");
  MixedCase m{32, 8, 128, 0, 0.0f, {{3, 1}, {20, 1}, {0, 40}, {10, 8}}, 2};  // with chunks
  outs = run(m, {0, 1 << 16});
  expect_close(outs[1], 32 * 128 + 8, outs[0], 32 * 128 + 8, 50, 32 * 128, "mixed, large bound");
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaMixedAttention,
                         ::testing::Values(DType::F32, DType::F16, DType::BF16),
                         [](const auto& i) { return std::string(label(i.param)); });

}  // namespace
}  // namespace kiln::test
