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
#include "core/quant.h"
#include "cuda_ops_fixture.h"
#include "graph/backend.h"
#include "test_util.h"

namespace kiln::test {
namespace {

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
  for (NormKind kind : {NormKind::RMS, NormKind::RMSPlusOne, NormKind::Layer, NormKind::None}) {
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
  for (NormKind kind : {NormKind::RMS, NormKind::RMSPlusOne, NormKind::Layer, NormKind::None}) {
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
  // hd 4096, one head: OLMo 2's q/k norms over the whole projection (Knobs::qk_norm_full).
  for (int64_t hd : {16, 32, 128, 4096}) {
    for (int64_t heads : {1, 2, 4}) {
      const int64_t n = 3, ld = heads * hd + 24;  // q|k|v-like rows: only the first part normed
      // Shared weights (RMS); per-head weights (Cohere's LayerNorm); a shared bias (Phi's).
      for (int mode : {0, 1, 2}) {
        if (mode == 1 && heads == 1) continue;
        auto x = rnd(size_t(n * ld), 1.5f);
        auto [wh, wd] = vec(mode == 1 ? heads * hd : hd, 1.0f, 0.2f);
        auto [bh, bd] = vec(hd, 0.0f, 0.3f);
        const NormKind kind = mode == 0 ? NormKind::RMS : NormKind::Layer;
        auto want = x;
        cpu->head_norm(want.data(), n, ld, heads, hd, wh, kind, 1e-6f, mode == 2 ? &bh : nullptr);
        void* xd = up(x);
        gpu->head_norm(xd, n, ld, heads, hd, wd, kind, 1e-6f, mode == 2 ? &bd : nullptr);
        expect_close(down(xd, size_t(n * ld)), ld, want, ld, n, ld,
                     cat("head_norm hd=", hd, " heads=", heads, " mode ", mode));
      }
    }
  }
}

// The Decoder's q/k pattern: head_norm and rope on the q heads, then on the k heads that follow
// them in the same rows (the backend may merge each pair into one launch), then an unrelated op.
TEST_P(CudaOps, QkNormThenRope) {
  for (int64_t hd : {32, 128}) {
    for (const bool per_head : {false, true}) {  // shared [hd] weights, or one slice per head
      const int64_t n = 3, hq = 4, hk = 2, qd = hq * hd, ld = qd + 2 * hk * hd;  // q | k | v
      const int64_t rot = hd == 32 ? 16 : hd, half = rot / 2;
      auto x = rnd(size_t(n * ld), 1.5f);
      auto [qwh, qwd] = vec(per_head ? hq * hd : hd, 1.0f, 0.2f);
      auto [kwh, kwd] = vec(per_head ? hk * hd : hd, 1.0f, 0.2f);
      std::vector<float> cs(size_t(n * half)), sn(cs.size());
      for (size_t i = 0; i < cs.size(); ++i)
        cs[i] = std::cos(0.3f * float(i)), sn[i] = std::sin(0.3f * float(i));
      auto want = x;
      cpu->head_norm(want.data(), n, ld, hq, hd, qwh, NormKind::RMS, 1e-6f);
      cpu->head_norm(want.data() + qd, n, ld, hk, hd, kwh, NormKind::RMS, 1e-6f);
      cpu->rope(want.data(), n, ld, hq, hd, rot, cs.data(), sn.data());
      cpu->rope(want.data() + qd, n, ld, hk, hd, rot, cs.data(), sn.data());
      void* xd = up(x);
      void* kd = static_cast<char*>(xd) + qd * dtype_size(dt);
      gpu->qk_norm(xd, n, ld, hq, hk, hd, qwd, kwd, NormKind::RMS, 1e-6f);
      gpu->rope(xd, n, ld, hq, hd, rot, up_raw(cs), up_raw(sn));
      gpu->rope(kd, n, ld, hk, hd, rot, up_raw(cs), up_raw(sn));
      expect_close(down(xd, size_t(n * ld)), ld, want, ld, n, ld,
                   cat("qk_norm, rope hd=", hd, per_head ? " per-head weights" : ""));
    }
  }
}

// linear_gated_act (gate_up GEMV with the activation as its epilogue on CUDA for decode-sized n,
// over 16-bit, fp8 and int4 weights; the composition elsewhere) against the CPU's composition:
// both gu and the activation.
TEST_P(CudaOps, LinearGatedAct) {
  std::vector<WeightQuant> schemes = {WeightQuant::None};
  if (dt != DType::F32)
    schemes.insert(schemes.end(), {WeightQuant::Fp8, WeightQuant::Int4, WeightQuant::Int8});
  for (WeightQuant q : schemes) {
    for (int64_t n : {1, 2, 5, 8, 12}) {
      // in 2112: int4 groups of 64 (not the tensor-core kernel), fp8 at n = 8 past the fused
      // quantization (kGemvFp8FusedMax). inter 4400: int4 in 8-warp blocks (w4_warps).
      const std::pair<int64_t, int64_t> shapes[] = {{3, 256},    {64, 256},  {1000, 256},
                                                    {4400, 256}, {64, 2112}, {300, 2112}};
      for (const auto [inter, in] : shapes) {
        for (Activation a : {Activation::SiLU, Activation::GeluTanh, Activation::SwiGLUOai}) {
          if (a != Activation::SiLU && inter != 64) continue;
          const bool bias = (n + inter) % 2 == 1;
          auto x = rnd(size_t(n * in));
          // SwiGLUOai: pre-activations of a few units, some past its clamp at 7.
          const float sd = a == Activation::SwiGLUOai ? 8.0f / std::sqrt(float(in))
                                                      : 1.0f / std::sqrt(float(in));
          const Tensor wh = quantized_weight(rnd(size_t(2 * inter * in), sd), 2 * inter, in, q, dt);
          const Tensor wd = gpu->upload(wh);
          auto [bh, bd] = vec(2 * inter, 0.0f, 0.5f);
          std::vector<float> gu(size_t(n * 2 * inter)), want(size_t(n * inter));
          cpu->linear_gated_act(x.data(), n, in, wh, bias ? &bh : nullptr, gu.data(), inter, a,
                                want.data());
          void* xd = up(x);
          void* gud = up(std::vector<float>(size_t(n * 2 * inter), kPoison));
          void* outd = up(std::vector<float>(size_t(n * inter), kPoison));
          gpu->linear_gated_act(xd, n, in, wd, bias ? &bd : nullptr, gud, inter, a, outd);
          const std::string what = cat("gate_up+act ", weight_quant_name(q), " n=", n, " in=", in,
                                       " inter=", inter, " act ", int(a), bias ? " bias" : "");
          expect_close(down(outd, size_t(n * inter)), inter, want, inter, n, inter, what);
          expect_close(down(gud, size_t(n * 2 * inter)), 2 * inter, gu, 2 * inter, n, 2 * inter,
                       what + " gu");
        }
      }
    }
  }
}

// rope_kv_write (one launch on CUDA) against the CPU's rope(q), rope(k), kv_write(k, v); and a
// GEMV followed by something else.
TEST_P(CudaOps, FusedDecoderSequences) {
  {  // a GEMV whose output is read by something else
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
    const float* c = up_raw(cs);
    const float* s2 = up_raw(sn);
    gpu->rope_kv_write(xd, n, ld, hq, hk, hd, rot, c, s2, kv_gpu, up_raw(pos));
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
      for (Activation a : {Activation::SiLU, Activation::GeluTanh, Activation::GeluErf,
                           Activation::ReLU, Activation::SwiGLUOai}) {
        auto gu = rnd(size_t(n * 2 * inter), a == Activation::SwiGLUOai ? 6.0f : 2.0f);
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
      // A tensor-parallel rank's slice of the vocabulary: tokens [20, 70); the others are zeros.
      std::vector<float> slice(size_t(n * dim));
      cpu->embed(th, ids.data(), n, scale, slice.data(), 20);
      for (int64_t i = 0; i < n; ++i)
        EXPECT_EQ(slice[size_t(i * dim)] == 0.0f && slice[size_t(i * dim + 1)] == 0.0f,
                  ids[size_t(i)] < 20)
            << "row " << i;
      gpu->embed(td, idd, n, scale, out, 20);
      expect_close(down_f32(out, size_t(n * dim)), dim, slice, dim, n, dim,
                   cat("embed first=20 dim=", dim), 1e-6);
    }
  }
}

TEST_P(CudaOps, Copy2d) {
  // Logit slices of 3 ranks (13 columns each, the last padded) into whole rows of 37.
  const int64_t rows = 5, slice = 13, V = 37;
  std::vector<float> parts(size_t(3 * rows * slice));
  for (size_t i = 0; i < parts.size(); ++i) parts[i] = float(i);
  std::vector<float> want(size_t(rows * V), kPoison);
  auto copy_all = [&](Backend& be, float* dst, const float* src) {
    for (int64_t r = 0; r < 3; ++r)
      be.copy_2d(dst + r * slice, size_t(V) * 4, src + r * rows * slice, size_t(slice) * 4,
                 size_t(std::min(slice, V - r * slice)) * 4, size_t(rows));
  };
  copy_all(*cpu, want.data(), parts.data());
  EXPECT_EQ(want[size_t(V + 13)], float(rows * slice + slice));  // row 1, rank 1's first
  float* out = up_raw(std::vector<float>(size_t(rows * V), kPoison));
  copy_all(*gpu, out, up_raw(parts));
  EXPECT_EQ(down_f32(out, size_t(rows * V)), want);
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
// The LM head: F32 logits whatever the activation dtype, soft-capped or not, with a bias or not
// (Phi); GEMV and cuBLASLt sizes.
TEST_P(CudaOps, Logits) {
  for (const int64_t n : {1, 2, 3, 9}) {
    for (const float cap : {0.0f, 30.0f}) {
      const int64_t in = 256, out = 1001;
      auto x = rnd(size_t(n * in));
      auto [wh, wd] = matrix(out, in, 4.0f / std::sqrt(float(in)));
      // The bias where there is no cap (Phi has no cap; both at once run the same code).
      auto [bh, bd] = vec(out, 0.0f, 1.0f);
      const Tensor* bias_h = cap > 0 ? nullptr : &bh;
      const Tensor* bias_d = cap > 0 ? nullptr : &bd;
      std::vector<float> want(size_t(n * out));
      cpu->logits(x.data(), n, in, wh, bias_h, cap, want.data());
      auto* yd = static_cast<float*>(gpu->alloc(size_t(n * out) * 4));
      allocs.push_back(yd);
      gpu->logits(up(x), n, in, wd, bias_d, cap, yd);
      std::vector<float> got(size_t(n * out));
      gpu->to_host(got.data(), yd, got.size() * 4);
      // F32 out: only the products' accumulation order differs from the CPU, in every dtype.
      expect_close(got, out, want, out, n, out, cat("logits n=", n, " cap=", cap), 1e-5);
      // From an F32 hidden state (unrounded values): the same, through GEMV or the rounding
      // fallback for cuBLASLt (n > 2), whose error is the dtype's.
      std::normal_distribution<float> nd(0.0f, 1.0f);
      std::vector<float> xf(size_t(n * in));
      for (auto& v : xf) v = nd(rng);
      cpu->logits(xf.data(), n, in, wh, bias_h, cap, want.data());
      gpu->logits(up_raw(xf), n, in, wd, bias_d, cap, yd, true);
      gpu->to_host(got.data(), yd, got.size() * 4);
      expect_close(got, out, want, out, n, out, cat("logits from F32 n=", n, " cap=", cap),
                   n <= 2 || dt == DType::F32 ? 1e-5 : tolerance(dt));
    }
  }
}

// Modes: 0 softmax top-k; 1 GPT-OSS's router and expert biases with its clamped SwiGLU (gate/up
// sized to cross the clamp at 7); 2 DeepSeek V2's group-limited softmax, scaled, ungated shared
// expert; 3 DeepSeek V3's sigmoid with a score-correction bias over groups, scaled.
TEST_P(CudaOps, MoE) {
  const int64_t E = 4, H = 64, I = 32, Is = 48;
  for (int64_t n : {1, 5, 17}) {
    for (bool renorm : {true, false}) {
      for (bool shared : {false, true}) {
        for (int64_t k : {1, 2}) {
          for (int mode : {0, 1, 2, 3}) {
            if (mode == 1 && (shared || !renorm)) continue;  // GPT-OSS: no shared expert, renormed
            const bool bias = mode == 1;
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
            std::vector<Tensor> gu_h, gu_d, dn_h, dn_d, bgu_h, bgu_d, bdn_h, bdn_d;
            for (int64_t e = 0; e < E; ++e) {
              auto [a, b] = matrix(2 * I, H, bias ? 0.9f : 0.125f);
              auto [c2, d2] = matrix(H, I, 0.17f);
              gu_h.push_back(a), gu_d.push_back(b), dn_h.push_back(c2), dn_d.push_back(d2);
              auto [e1, e2] = vec(2 * I, 0.0f, 1.0f);
              auto [e3, e4] = vec(H, 0.0f, 0.5f);
              bgu_h.push_back(e1), bgu_d.push_back(e2), bdn_h.push_back(e3), bdn_d.push_back(e4);
            }
            // A small router bias: it moves the weights without reordering the experts.
            auto [rbh, rbd] = vec(E, 0.0f, 0.05f);
            auto [sguh, sgud] = matrix(2 * Is, H, 0.125f);
            auto [sdh, sdd] = matrix(H, Is, 0.14f);
            auto [sgh, sgd] = matrix(1, H, 0.125f);
            std::vector<const Tensor*> guh_p, gud_p, dnh_p, dnd_p, bguh_p, bgud_p, bdnh_p, bdnd_p;
            for (int64_t e = 0; e < E; ++e) {
              guh_p.push_back(&gu_h[size_t(e)]), gud_p.push_back(&gu_d[size_t(e)]);
              dnh_p.push_back(&dn_h[size_t(e)]), dnd_p.push_back(&dn_d[size_t(e)]);
              bguh_p.push_back(&bgu_h[size_t(e)]), bgud_p.push_back(&bgu_d[size_t(e)]);
              bdnh_p.push_back(&bdn_h[size_t(e)]), bdnd_p.push_back(&bdn_d[size_t(e)]);
            }
            Backend::MoeWeights wh{&rh,
                                   guh_p.data(),
                                   dnh_p.data(),
                                   shared ? &sguh : nullptr,
                                   shared ? &sdh : nullptr,
                                   shared ? &sgh : nullptr,
                                   bias ? &rbh : nullptr,
                                   bias ? bguh_p.data() : nullptr,
                                   bias ? bdnh_p.data() : nullptr};
            Backend::MoeWeights wd{&rd,
                                   gud_p.data(),
                                   dnd_p.data(),
                                   shared ? &sgud : nullptr,
                                   shared ? &sdd : nullptr,
                                   shared ? &sgd : nullptr,
                                   bias ? &rbd : nullptr,
                                   bias ? bgud_p.data() : nullptr,
                                   bias ? bdnd_p.data() : nullptr};
            const Activation act = bias ? Activation::SwiGLUOai : Activation::SiLU;
            Backend::MoeParams mp;
            mp.num_experts = E, mp.top_k = k, mp.renorm = renorm;
            if (mode >= 2) {  // two groups of two experts, one chosen; ungated shared expert
              mp.groups = 2, mp.topk_groups = 1, mp.shared_gated = false;
              mp.scaling = mode == 2 ? 1.5f : 2.5f;
              wh.shared_gate = wd.shared_gate = nullptr;
            }
            if (mode == 3) {
              mp.scoring = Routing::SigmoidTopK;
              wh.score_bias = &rbh, wd.score_bias = &rbd;
            }
            std::vector<float> want(size_t(n * H));
            cpu->moe_ffn(x.data(), n, H, wh, mp, act, want.data());
            void* out = up(std::vector<float>(size_t(n * H), kPoison));
            void* xd = up(x);
            gpu->moe_ffn(xd, n, H, wd, mp, act, out);
            const std::vector<float> got = down(out, size_t(n * H));
            const std::string what = cat("moe n=", n, " k=", k, renorm ? " renorm" : "",
                                         shared ? " shared" : "", " mode ", mode);
            expect_close(got, H, want, H, n, H, what);
            // The same call again gives the same bits (no race on the routing scratch).
            void* again = up(std::vector<float>(size_t(n * H), kPoison));
            gpu->moe_ffn(xd, n, H, wd, mp, act, again);
            EXPECT_EQ(down(again, size_t(n * H)), got) << label(dt) << " " << what << ": rerun";
          }
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaOps, ::testing::Values(DType::F32, DType::F16, DType::BF16),
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

}  // namespace
}  // namespace kiln::test
