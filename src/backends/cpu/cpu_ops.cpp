#include "backends/cpu/cpu_ops.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

#include "core/error.h"
#include "core/quant.h"

namespace kiln::cpu {

namespace {

// Thread-local scratch that grows but never shrinks, so hot loops do not allocate.
float* scratch(size_t n, int slot) {
  thread_local std::vector<float> bufs[3];
  auto& b = bufs[slot];
  if (b.size() < n) b.resize(n);
  return b.data();
}

// Row `row` of weight w as floats: in place for F32, else converted (or dequantized exactly as
// core/quant.h defines) into buf.
const float* row_f32(const void* w, DType t, const QuantRef& q, int64_t row, int64_t in,
                     float* buf) {
  if (q.quant == WeightQuant::Int8) {
    dequantize_int8_row(static_cast<const int8_t*>(w) + row * in, q.scales[row], in, buf);
    return buf;
  }
  if (q.quant == WeightQuant::Fp8) {
    dequantize_fp8_row(static_cast<const uint8_t*>(w) + row * in, q.scales[row], in, buf);
    return buf;
  }
  if (q.quant == WeightQuant::Int4) {
    dequantize_int4_row(static_cast<const uint8_t*>(w) + row * (in / 2), q.scales + row * q.groups,
                        q.zeros + row * q.groups, in / q.groups, in, buf);
    return buf;
  }
  if (t == DType::F32) return static_cast<const float*>(w) + row * in;
  const auto* s = static_cast<const uint16_t*>(w) + row * in;
  if (t == DType::BF16) {
#pragma omp simd
    for (int64_t k = 0; k < in; ++k) buf[k] = bf16_to_f32(s[k]);
  } else {
    for (int64_t k = 0; k < in; ++k) buf[k] = f16_to_f32(s[k]);
  }
  return buf;
}

float dot(const float* a, const float* b, int64_t n) {
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += a[k] * b[k];
  return s;
}

float apply_act(float x, Activation a) {
  switch (a) {
    case Activation::SiLU:
      return x / (1.0f + std::exp(-x));
    case Activation::GeluTanh: {
      const float c = 0.7978845608028654f;  // sqrt(2/pi)
      return 0.5f * x * (1.0f + std::tanh(c * (x + 0.044715f * x * x * x)));
    }
    case Activation::GeluErf:
      return 0.5f * x * (1.0f + std::erf(x * 0.7071067811865476f));
    case Activation::ReLU:
      return x > 0 ? x : 0;
    case Activation::SwiGLUOai:  // gated only (config refuses it otherwise): see apply_gated
      break;
  }
  return x;
}

// act(gate) * up, or GPT-OSS's clamped form (model_config.h).
float apply_gated(float g, float u, Activation a) {
  if (a != Activation::SwiGLUOai) return apply_act(g, a) * u;
  g = std::min(g, 7.0f);
  u = std::clamp(u, -7.0f, 7.0f);
  return (u + 1.0f) * (g / (1.0f + std::exp(-1.702f * g)));
}

}  // namespace

void linear(const float* x, int64_t n, int64_t in, int64_t ldx, const void* w, DType wt,
            int64_t out, const float* bias, float* y, int64_t ldy, const QuantRef& q) {
  KILN_CHECK(q.quant == WeightQuant::None
                 ? (wt == DType::F32 || wt == DType::F16 || wt == DType::BF16)
                 : q.scales && (q.quant == WeightQuant::Int8 || q.quant == WeightQuant::Fp8 ||
                                (q.zeros && q.groups > 0 && in % (2 * q.groups) == 0)),
             "CPU linear: unsupported weight (", dtype_name(wt), ", ", weight_quant_name(q.quant),
             ")");
  // Every output element comes from the same 4x4 register tile, whatever n and the element's
  // place: tail rows of x and tail rows of w are padded (zeros) to whole tiles. So a row's
  // result never depends on the batch it is in (continuous batching and preemption give the
  // same tokens as a request alone).
  // fp8 quantizes each activation row as it comes in (core/quant.h): x becomes the values its
  // E4M3 codes stand for. A row with a NaN or infinity stays non-finite, for the engine's check
  // on the logits to report.
  // Act-order: the stored columns are the inputs in q.perm's order, so x is gathered the same
  // way first (the products then sum in the stored order).
  std::vector<float> xp;
  if (q.perm) {
    xp.resize(size_t(n * in));
    for (int64_t t = 0; t < n; ++t)
      for (int64_t j = 0; j < in; ++j) xp[size_t(t * in + j)] = x[t * ldx + q.perm[j]];
    x = xp.data();
    ldx = in;
  }
  std::vector<float> xq;
  if (q.quant == WeightQuant::Fp8) {
    xq.resize(size_t(n * in));
    std::vector<uint8_t> codes(static_cast<size_t>(in));
    for (int64_t t = 0; t < n; ++t) {
      float sx = 0.0f;
      float* r = xq.data() + t * in;
      if (quantize_fp8_row(x + t * ldx, in, codes.data(), &sx))
        dequantize_fp8_row(codes.data(), sx, in, r);
      else
        std::fill(r, r + in, std::numeric_limits<float>::quiet_NaN());
    }
    x = xq.data();
    ldx = in;
  }
  constexpr int64_t RB = 4, TB = 4;
  const int64_t full = n / TB * TB;
  std::vector<float> xt;  // the padded tail rows of x
  if (full < n) {
    xt.assign(size_t(TB * in), 0.0f);
    for (int64_t t = full; t < n; ++t)
      std::copy(x + t * ldx, x + t * ldx + in, xt.begin() + (t - full) * in);
  }
#pragma omp parallel for schedule(static)
  for (int64_t o0 = 0; o0 < out; o0 += RB) {
    const int64_t rb = std::min(RB, out - o0);
    float* buf = scratch(size_t(RB * in), 0);
    const float* wr[RB];
    for (int64_t r = 0; r < RB; ++r) {
      if (r < rb) {
        wr[r] = row_f32(w, wt, q, o0 + r, in, buf + r * in);
      } else {
        std::fill(buf + r * in, buf + (r + 1) * in, 0.0f);
        wr[r] = buf + r * in;
      }
    }
    for (int64_t t0 = 0; t0 < n; t0 += TB) {
      const bool tail = t0 >= full;
      const float* xb = tail ? xt.data() : x + t0 * ldx;
      const int64_t lx = tail ? in : ldx;
      const float *x0 = xb, *x1 = x0 + lx, *x2 = x1 + lx, *x3 = x2 + lx;
      const float *w0 = wr[0], *w1 = wr[1], *w2 = wr[2], *w3 = wr[3];
      float a00 = 0, a01 = 0, a02 = 0, a03 = 0, a10 = 0, a11 = 0, a12 = 0, a13 = 0;
      float a20 = 0, a21 = 0, a22 = 0, a23 = 0, a30 = 0, a31 = 0, a32 = 0, a33 = 0;
#pragma omp simd reduction(+ : a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, \
                               a31, a32, a33)
      for (int64_t k = 0; k < in; ++k) {
        a00 += x0[k] * w0[k], a01 += x0[k] * w1[k], a02 += x0[k] * w2[k], a03 += x0[k] * w3[k];
        a10 += x1[k] * w0[k], a11 += x1[k] * w1[k], a12 += x1[k] * w2[k], a13 += x1[k] * w3[k];
        a20 += x2[k] * w0[k], a21 += x2[k] * w1[k], a22 += x2[k] * w2[k], a23 += x2[k] * w3[k];
        a30 += x3[k] * w0[k], a31 += x3[k] * w1[k], a32 += x3[k] * w2[k], a33 += x3[k] * w3[k];
      }
      const float acc[4][4] = {
          {a00, a01, a02, a03}, {a10, a11, a12, a13}, {a20, a21, a22, a23}, {a30, a31, a32, a33}};
      for (int64_t t = 0; t < TB && t0 + t < n; ++t)
        for (int64_t r = 0; r < rb; ++r)
          y[(t0 + t) * ldy + o0 + r] = acc[t][r] + (bias ? bias[o0 + r] : 0.0f);
    }
  }
}

static void norm_row(const float* x, int64_t dim, const float* w, const float* b, NormKind kind,
                     float eps, float* y) {
  if (kind == NormKind::None) {  // y = x; w and b are not read
    if (y != x) std::copy(x, x + dim, y);
    return;
  }
  if (kind == NormKind::Layer) {
    float mean = 0;
#pragma omp simd reduction(+ : mean)
    for (int64_t i = 0; i < dim; ++i) mean += x[i];
    mean /= float(dim);
    float var = 0;
#pragma omp simd reduction(+ : var)
    for (int64_t i = 0; i < dim; ++i) var += (x[i] - mean) * (x[i] - mean);
    const float inv = 1.0f / std::sqrt(var / float(dim) + eps);
    for (int64_t i = 0; i < dim; ++i) y[i] = (x[i] - mean) * inv * w[i] + (b ? b[i] : 0.0f);
    return;
  }
  float ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < dim; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / float(dim) + eps);
  const float off = kind == NormKind::RMSPlusOne ? 1.0f : 0.0f;
  for (int64_t i = 0; i < dim; ++i) y[i] = x[i] * inv * (w[i] + off) + (b ? b[i] : 0.0f);
}

void norm(const float* x, int64_t rows, int64_t dim, int64_t ldx, const float* w, const float* b,
          NormKind kind, float eps, float* y, int64_t ldy) {
#pragma omp parallel for schedule(static) if (rows * dim > 16384)
  for (int64_t r = 0; r < rows; ++r) norm_row(x + r * ldx, dim, w, b, kind, eps, y + r * ldy);
}

void add_norm(float* residual, const float* delta, int64_t rows, int64_t dim, const float* w,
              const float* b, NormKind kind, float eps, float* y) {
#pragma omp parallel for schedule(static) if (rows * dim > 16384)
  for (int64_t r = 0; r < rows; ++r) {
    float* x = residual + r * dim;
    const float* d = delta + r * dim;
    for (int64_t i = 0; i < dim; ++i) x[i] += d[i];
    norm_row(x, dim, w, b, kind, eps, y + r * dim);
  }
}

void embed(const void* table, DType t, int64_t vocab, int64_t dim, const int32_t* ids, int64_t n,
           float scale, float* out, int64_t first) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = int64_t(ids[i]) - first;
    if (id < 0 || id >= vocab) {  // a zero row, never a read out of bounds
      std::fill(out + i * dim, out + (i + 1) * dim, 0.0f);
      continue;
    }
    to_f32(t, static_cast<const char*>(table) + size_t(id) * dim * dtype_size(t), out + i * dim,
           size_t(dim));
    if (scale != 1.0f)
      for (int64_t k = 0; k < dim; ++k) out[i * dim + k] *= scale;
  }
}

void add_rows(const void* table, DType t, int64_t dim, const int32_t* pos, int64_t n, float* x) {
  float* buf = scratch(size_t(dim), 1);
  for (int64_t i = 0; i < n; ++i) {
    to_f32(t, static_cast<const char*>(table) + size_t(pos[i]) * dim * dtype_size(t), buf,
           size_t(dim));
    for (int64_t k = 0; k < dim; ++k) x[i * dim + k] += buf[k];
  }
}

void rope(float* x, int64_t n, int64_t ld, int64_t heads, int64_t head_dim, int64_t rot_dim,
          const float* cos, const float* sin) {
  const int64_t half = rot_dim / 2;
  for (int64_t i = 0; i < n; ++i) {
    const float* c = cos + i * half;
    const float* s = sin + i * half;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + i * ld + h * head_dim;
      for (int64_t k = 0; k < half; ++k) {
        const float a = v[k], b = v[k + half];
        v[k] = a * c[k] - b * s[k];
        v[k + half] = b * c[k] + a * s[k];
      }
    }
  }
}

void moe_route(float* l, int64_t E, const Backend::MoeParams& p, const float* score_bias,
               std::vector<int64_t>& chosen) {
  if (p.scoring == Routing::SigmoidTopK) {
    for (int64_t e = 0; e < E; ++e) l[e] = 1.0f / (1.0f + std::exp(-l[e]));
  } else {
    const float mx = *std::max_element(l, l + E);
    float sum = 0;
    for (int64_t e = 0; e < E; ++e) sum += (l[e] = std::exp(l[e] - mx));
    for (int64_t e = 0; e < E; ++e) l[e] /= sum;
  }
  std::vector<float> s(l, l + E);
  if (score_bias)
    for (int64_t e = 0; e < E; ++e) s[size_t(e)] += score_bias[e];
  // Best first, ties to the lower index (as torch.topk and the CUDA kernel).
  auto best = [](const std::vector<float>& v, int64_t k) {
    std::vector<int64_t> idx(v.size());
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(),
                     [&](int64_t a, int64_t b) { return v[size_t(a)] > v[size_t(b)]; });
    idx.resize(size_t(k));
    return idx;
  };
  if (p.groups > 1) {
    const int64_t per = E / p.groups;
    std::vector<float> g(static_cast<size_t>(p.groups));
    for (int64_t q = 0; q < p.groups; ++q) {
      const auto top = best(std::vector<float>(s.begin() + q * per, s.begin() + (q + 1) * per),
                            p.scoring == Routing::SigmoidTopK ? std::min<int64_t>(2, per) : 1);
      for (int64_t j : top) g[size_t(q)] += s[size_t(q * per + j)];
    }
    std::vector<char> keep(static_cast<size_t>(p.groups), 0);
    for (int64_t q : best(g, p.topk_groups)) keep[size_t(q)] = 1;
    for (int64_t e = 0; e < E; ++e)
      if (!keep[size_t(e / per)]) s[size_t(e)] = -INFINITY;
  }
  chosen = best(s, p.top_k);
}

void gated_act(const float* gu, int64_t n, int64_t inter, Activation a, float* out) {
#pragma omp parallel for schedule(static) if (n * inter > 16384)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < inter; ++k)
      out[i * inter + k] = apply_gated(gu[i * 2 * inter + k], gu[i * 2 * inter + inter + k], a);
}

void act_inplace(float* x, int64_t count, Activation a) {
#pragma omp parallel for schedule(static) if (count > 16384)
  for (int64_t i = 0; i < count; ++i) x[i] = apply_act(x[i], a);
}

void softcap(float* x, int64_t count, float cap) {
  for (int64_t i = 0; i < count; ++i) x[i] = cap * std::tanh(x[i] / cap);
}

void kv_write(const KVView& kv, const float* k, const float* v, int64_t ld, const int32_t* pos,
              int64_t n) {
  KILN_CHECK(!kv.k_scale || (kv.v_scale && kv.head_dim > 0 && kv.kv_dim % kv.head_dim == 0),
             "kv_write: an FP8 cache needs both scale pools and a head_dim dividing kv_dim");
  for (int64_t i = 0; i < n; ++i) {
    const int64_t slot = kv.slot(i, pos[i]);
    if (kv.k_scale) {  // FP8: each head's values to codes with their own scale
      const int64_t heads = kv.kv_dim / kv.head_dim;
      auto* kc = reinterpret_cast<uint8_t*>(kv.k) + slot * kv.kv_dim;
      auto* vc = reinterpret_cast<uint8_t*>(kv.v) + slot * kv.kv_dim;
      for (int64_t h = 0; h < heads; ++h) {
        for (auto [x, codes, scale] :
             {std::tuple{k, kc, kv.k_scale}, std::tuple{v, vc, kv.v_scale}})
          // A non-finite value makes the head NaN (its scale), so attention over it is NaN and
          // reported as NaN logits, never a finite wrong answer.
          if (!quantize_fp8_row(x + i * ld + h * kv.head_dim, kv.head_dim, codes + h * kv.head_dim,
                                scale + slot * heads + h)) {
            std::fill(codes + h * kv.head_dim, codes + (h + 1) * kv.head_dim, uint8_t{0});
            scale[slot * heads + h] = std::numeric_limits<float>::quiet_NaN();
          }
      }
      continue;
    }
    std::memcpy(kv.k + slot * kv.kv_dim, k + i * ld, size_t(kv.kv_dim) * 4);
    std::memcpy(kv.v + slot * kv.kv_dim, v + i * ld, size_t(kv.kv_dim) * 4);
  }
}

namespace {

// Head `kvo / head_dim` of the K or V row in `slot` as floats: in place for a float cache, else
// its codes times its scale (dequantize_fp8_row) into buf.
const float* cached_head(const float* pool, const float* scales, const KVView& kv, int64_t slot,
                         int64_t kvo, int64_t head_dim, float* buf) {
  if (!scales) return pool + slot * kv.kv_dim + kvo;
  const auto* codes = reinterpret_cast<const uint8_t*>(pool) + slot * kv.kv_dim + kvo;
  dequantize_fp8_row(codes, scales[slot * (kv.kv_dim / head_dim) + kvo / head_dim], head_dim, buf);
  return buf;
}

}  // namespace

void attention(const float* q, int64_t ldq, int64_t n, const int32_t* pos, const KVView& kv,
               int64_t heads, int64_t kv_heads, int64_t head_dim, float scale, float cap,
               int64_t window, const float* sinks, float* out, int64_t ldo) {
  const int64_t group = heads / kv_heads;
#pragma omp parallel for collapse(2) schedule(dynamic)
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t p = pos[i];
      const int64_t lo = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
      const int64_t len = p - lo + 1;
      float* s = scratch(size_t(len), 0);
      float* kbuf = scratch(size_t(head_dim), 2);  // a dequantized FP8 head
      const float* qh = q + i * ldq + h * head_dim;
      const int64_t kvo = (h / group) * head_dim;
      float mx = -INFINITY;
      for (int64_t j = 0; j < len; ++j) {
        const int64_t slot = kv.slot(i, lo + j);
        float x =
            dot(qh, cached_head(kv.k, kv.k_scale, kv, slot, kvo, head_dim, kbuf), head_dim) * scale;
        if (cap > 0) x = cap * std::tanh(x / cap);
        s[j] = x;
        mx = std::max(mx, x);
      }
      // A sink joins the softmax as one more logit with no value: max and sum include it.
      if (sinks) mx = std::max(mx, sinks[h]);
      float sum = sinks ? std::exp(sinks[h] - mx) : 0.0f;
      for (int64_t j = 0; j < len; ++j) sum += (s[j] = std::exp(s[j] - mx));
      const float inv = 1.0f / sum;
      float* o = out + i * ldo + h * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) o[d] = 0;
      for (int64_t j = 0; j < len; ++j) {
        const int64_t slot = kv.slot(i, lo + j);
        const float* vr = cached_head(kv.v, kv.v_scale, kv, slot, kvo, head_dim, kbuf);
        const float pj = s[j] * inv;
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) o[d] += pj * vr[d];
      }
    }
  }
}

}  // namespace kiln::cpu
