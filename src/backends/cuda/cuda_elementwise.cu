// Elementwise and row-wise kernels of the CUDA backend: embeddings, norms, RoPE, activations,
// KV-cache writes and the MoE routing/combine steps. These move little data next to the matrix
// products, so they favour simplicity: one element (or one row) per thread (or block), FP32 math,
// one rounding on store. Grid-stride loops keep any count legal.
#include <algorithm>
#include <cfloat>

#include "backends/cuda/cuda_common.h"
#include "backends/cuda/cuda_kernels.h"

namespace kiln::cuda {

namespace {

constexpr int kThreads = 256;

unsigned grid_for(int64_t count) {
  const int64_t b = (count + kThreads - 1) / kThreads;
  return unsigned(std::clamp<int64_t>(b, 1, int64_t(1) << 20));
}

#define GRID_STRIDE(i, count)                                                   \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (count); \
       i += int64_t(gridDim.x) * blockDim.x)

// Loads element `i` of a table whose dtype is only known at run time (embedding tables).
__device__ __forceinline__ float load_any(const void* p, int dt, int64_t i) {
  if (dt == int(DType::F32)) return static_cast<const float*>(p)[i];
  if (dt == int(DType::F16)) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

template <typename T>
__global__ void embed_kernel(const void* table, int tdt, int64_t rows, int64_t dim,
                             const int32_t* ids, int64_t n, float scale, T* out, int64_t first) {
  pdl_begin();
  GRID_STRIDE(e, n * dim) {
    const int64_t i = e / dim, d = e % dim, id = int64_t(ids[i]) - first;
    // An id outside the table (kNonFiniteLogits fed back by a pipelined decode step) reads
    // nothing and gives zeros; the host sees the marker and stops.
    out[e] = id >= 0 && id < rows ? from_f<T>(load_any(table, tdt, id * dim + d) * scale)
                                  : from_f<T>(0.0f);
  }
}

template <typename T>
__global__ void add_rows_kernel(const void* table, int tdt, int64_t dim, const int32_t* rows,
                                int64_t n, T* x) {
  pdl_begin();
  GRID_STRIDE(e, n * dim) {
    const int64_t i = e / dim, d = e % dim;
    x[e] = from_f<T>(to_f(x[e]) + load_any(table, tdt, int64_t(rows[i]) * dim + d));
  }
}

// Sum over the TPR threads that share one vector; every one of them gets the total. With
// TPR == 32 a warp owns a vector; with larger TPR the block does and partials go through smem.
template <int TPR>
__device__ __forceinline__ float vec_sum(float v, float* red) {
  v = warp_sum(v);
  if constexpr (TPR == 32) {
    return v;
  } else {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float s = 0;
#pragma unroll
    for (int i = 0; i < TPR / 32; ++i) s += red[i];
    __syncthreads();  // `red` is reused by the next reduction
    return s;
  }
}

// Scale/bias of a norm; vectors of head index >= w2_from use w2 (q and k heads in one launch).
struct NormWeights {
  const float* w;
  const float* w2;
  int64_t w2_from;
  const float* b;
  const float* b2 = nullptr;  // the bias of heads >= w2_from (b when null)
  int64_t stride = 0;  // per-head weights and biases: `dim` (head h reads its own slice); 0: shared
};

// RMS / RMS(1+w) / LayerNorm over vectors of `dim` <= TPR * EPT; ADD first folds `delta` into
// the residual x (of type X: F32 for the residual stream, so it is not rounded between layers;
// else T). The vector, its
// weights and bias are loaded once into registers (independent loads in flight, then the
// reductions, then the stores): for decode one block per row is all the work there is, so
// latency, not bandwidth, sets the time.
// y may alias x: all reads happen before the first reduction's barrier, all writes after.
template <typename X, typename T, int TPR, int EPT, bool ADD>
__global__ void __launch_bounds__(TPR < 256 ? 256 : TPR)
    norm_kernel(X* x, const T* delta, int64_t nvec, int64_t heads, int dim, int64_t ldx, T* y,
                int64_t ldy, NormWeights nw, int kind, float eps) {
  pdl_begin();
  constexpr int kVecs = (TPR < 256 ? 256 : TPR) / TPR;
  __shared__ float red[TPR / 32];
  const int64_t vi = int64_t(blockIdx.x) * kVecs + threadIdx.x / TPR;
  const int t = threadIdx.x % TPR;
  const bool live = vi < nvec;
  const int len = live ? dim : 0;  // dead threads still join the reductions
  const int64_t r = live ? vi / heads : 0, h = live ? vi % heads : 0;
  X* xr = x + r * ldx + h * dim;
  T* yr = y + r * ldy + h * dim;
  const bool second = h >= nw.w2_from;
  const int64_t hw = (second ? h - nw.w2_from : h) * nw.stride;
  const float* __restrict__ w = (second ? nw.w2 : nw.w) + hw;
  const float* __restrict__ b = second && nw.b2 ? nw.b2 + hw : nw.b ? nw.b + hw : nullptr;
  const bool layer = kind == int(NormKind::Layer);
  const bool ident = kind == int(NormKind::None);  // y = x: no weight read
  const float off = kind == int(NormKind::RMSPlusOne) ? 1.0f : 0.0f;
  float v[EPT], wv[EPT], bv[EPT];
#pragma unroll
  for (int k = 0; k < EPT; ++k) {
    const int i = t + k * TPR;
    v[k] = i < len ? to_f(xr[i]) : 0.0f;
    wv[k] = i < len ? (ident ? 1.0f : w[i] + off) : 0.0f;
    bv[k] = i < len && b && !ident ? b[i] : 0.0f;
  }
  if constexpr (ADD) {
    float d[EPT];
#pragma unroll
    for (int k = 0; k < EPT; ++k)
      d[k] = t + k * TPR < len ? to_f(delta[r * ldx + t + k * TPR]) : 0.0f;
#pragma unroll
    for (int k = 0; k < EPT; ++k) {
      const X s = from_f<X>(v[k] + d[k]);
      v[k] = to_f(s);
      if (t + k * TPR < len) xr[t + k * TPR] = s;
    }
  }
  float acc = 0;
#pragma unroll
  for (int k = 0; k < EPT; ++k) acc += layer ? v[k] : v[k] * v[k];
  acc = vec_sum<TPR>(acc, red);
  float mean = 0, inv;
  if (layer) {
    mean = acc / float(dim);
    float var = 0;
#pragma unroll
    for (int k = 0; k < EPT; ++k)
      if (t + k * TPR < len) var += (v[k] - mean) * (v[k] - mean);
    var = vec_sum<TPR>(var, red);
    inv = 1.0f / sqrtf(var / float(dim) + eps);  // not rsqrtf: match the CPU's rounding
  } else {
    inv = ident ? 1.0f : 1.0f / sqrtf(acc / float(dim) + eps);
  }
#pragma unroll
  for (int k = 0; k < EPT; ++k) {
    const int i = t + k * TPR;
    if (i < len) yr[i] = from_f<T>((v[k] - mean) * inv * wv[k] + bv[k]);
  }
}

template <typename X, typename T, bool ADD, int TPR, int EPT>
void launch_norm_cfg(X* x, const T* delta, int64_t nvec, int64_t heads, int64_t dim, int64_t ldx,
                     T* y, int64_t ldy, const NormWeights& nw, NormKind kind, float eps,
                     cudaStream_t s) {
  constexpr int kBlock = TPR < 256 ? 256 : TPR, kVecs = kBlock / TPR;
  const unsigned blocks = unsigned((nvec + kVecs - 1) / kVecs);
  launch_kernel(norm_kernel<X, T, TPR, EPT, ADD>, blocks, kBlock, 0, s, x, delta, nvec, heads,
                int(dim), ldx, y, ldy, nw, int(kind), eps);
}

template <typename X, typename T, bool ADD>
void launch_norm(X* x, const T* delta, int64_t nvec, int64_t heads, int64_t dim, int64_t ldx, T* y,
                 int64_t ldy, const NormWeights& nw, NormKind kind, float eps, cudaStream_t s) {
  // A warp per head-sized vector, a block per hidden-sized one.
  if (dim <= 128)
    launch_norm_cfg<X, T, ADD, 32, 4>(x, delta, nvec, heads, dim, ldx, y, ldy, nw, kind, eps, s);
  else if (dim <= 512)
    launch_norm_cfg<X, T, ADD, 32, 16>(x, delta, nvec, heads, dim, ldx, y, ldy, nw, kind, eps, s);
  else if (dim <= 2048)
    launch_norm_cfg<X, T, ADD, 256, 8>(x, delta, nvec, heads, dim, ldx, y, ldy, nw, kind, eps, s);
  else if (dim <= 8192)
    launch_norm_cfg<X, T, ADD, 1024, 8>(x, delta, nvec, heads, dim, ldx, y, ldy, nw, kind, eps, s);
  else if (dim <= 32768)
    launch_norm_cfg<X, T, ADD, 1024, 32>(x, delta, nvec, heads, dim, ldx, y, ldy, nw, kind, eps, s);
  else
    throw Error(cat("CUDA norm: dimension ", dim, " exceeds the kernel's limit of 32768"));
}

template <typename T>
__global__ void add_kernel(T* x, const T* y, int64_t count) {
  pdl_begin();
  GRID_STRIDE(i, count) x[i] = from_f<T>(to_f(x[i]) + to_f(y[i]));
}

template <typename T>
__global__ void rope_kernel(T* x, int64_t n, int64_t ld, int64_t heads, int64_t head_dim,
                            int64_t half, const float* cos, const float* sin) {
  pdl_begin();
  GRID_STRIDE(e, n * heads * half) {
    const int64_t i = e / (heads * half), rem = e % (heads * half);
    const int64_t h = rem / half, k = rem % half;
    T* v = x + i * ld + h * head_dim;
    const float c = cos[i * half + k], sn = sin[i * half + k];
    const float a = to_f(v[k]), b = to_f(v[k + half]);
    v[k] = from_f<T>(a * c - b * sn);
    v[k + half] = from_f<T>(b * c + a * sn);
  }
}

// rope + kv_write in one launch. Threads [0, pairs) rotate one (a, b) pair each and, for k
// heads, also store it in the cache; then threads copy the unrotated dims of the k heads
// (partial rotary) and the v row. Each element is written by the thread that computed it.
template <typename T>
__global__ void rope_kv_kernel(T* x, int64_t n, int64_t ld, int64_t heads, int64_t k_from,
                               int64_t head_dim, int64_t half, const float* cos, const float* sin,
                               T* kpool, T* vpool, const int32_t* bt, int64_t bs, int64_t kv_dim,
                               const T* v, const int32_t* pos, const int32_t* seq,
                               int64_t bt_stride) {
  pdl_begin();
  const int64_t pairs = n * heads * half, rest = head_dim - 2 * half;
  const int64_t kheads = kv_dim / head_dim, kcopy = n * kheads * rest;
  GRID_STRIDE(e, pairs + kcopy + n * kv_dim) {
    if (e < pairs) {
      const int64_t i = e / (heads * half), rem = e % (heads * half);
      const int64_t h = rem / half, k = rem % half;
      T* hv = x + i * ld + h * head_dim;
      const float c = cos[i * half + k], sn = sin[i * half + k];
      const float a = to_f(hv[k]), b = to_f(hv[k + half]);
      const T ra = from_f<T>(a * c - b * sn), rb = from_f<T>(b * c + a * sn);
      hv[k] = ra;
      hv[k + half] = rb;
      if (h >= k_from) {
        T* kc =
            kpool + cache_slot(bt, bs, seq, bt_stride, pos, i) * kv_dim + (h - k_from) * head_dim;
        kc[k] = ra;
        kc[k + half] = rb;
      }
    } else if (e < pairs + kcopy) {
      const int64_t e2 = e - pairs, i = e2 / (kheads * rest), rem = e2 % (kheads * rest);
      const int64_t hk = rem / rest, d = 2 * half + rem % rest;
      kpool[cache_slot(bt, bs, seq, bt_stride, pos, i) * kv_dim + hk * head_dim + d] =
          x[i * ld + (k_from + hk) * head_dim + d];
    } else {
      const int64_t e3 = e - pairs - kcopy, i = e3 / kv_dim, d = e3 % kv_dim;
      vpool[cache_slot(bt, bs, seq, bt_stride, pos, i) * kv_dim + d] = v[i * ld + d];
    }
  }
}

// bias (MoE experts with biases): row i adds F32 bias[sel[i]][0, 2 inter) before the activation.
template <typename T>
__global__ void gated_act_kernel(const T* gu, int64_t n, int64_t inter, int a, T* out,
                                 const float* const* bias, const int32_t* sel) {
  pdl_begin();
  GRID_STRIDE(e, n * inter) {
    const int64_t i = e / inter, k = e % inter;
    const T* row = gu + i * 2 * inter;
    float g = to_f(row[k]), u = to_f(row[inter + k]);
    if (bias) {
      const float* b = bias[sel[i]];
      g += b[k], u += b[inter + k];
    }
    out[e] = from_f<T>(apply_gated(g, u, a));
  }
}

template <typename T>
__global__ void act_kernel(T* x, int64_t count, int a) {
  pdl_begin();
  GRID_STRIDE(i, count) x[i] = from_f<T>(apply_act(to_f(x[i]), a));
}

template <typename T>
__global__ void softcap_kernel(T* x, int64_t count, float cap) {
  pdl_begin();
  GRID_STRIDE(i, count) x[i] = from_f<T>(cap * tanhf(to_f(x[i]) / cap));
}

template <typename T>
__global__ void to_f32_kernel(const T* x, int64_t count, float* out) {
  pdl_begin();
  GRID_STRIDE(i, count) out[i] = to_f(x[i]);
}

template <typename T>
__global__ void bias_add_kernel(T* y, int64_t n, int64_t out, int64_t ldy, const float* bias) {
  pdl_begin();
  GRID_STRIDE(e, n * out) {
    const int64_t i = e / out, o = e % out;
    T* p = y + i * ldy + o;
    *p = from_f<T>(to_f(*p) + bias[o]);
  }
}

template <typename T>
__global__ void kv_write_kernel(T* kpool, T* vpool, const int32_t* bt, int64_t bs, int64_t kv_dim,
                                const T* k, const T* v, int64_t ld, const int32_t* pos, int64_t n,
                                const int32_t* seq, int64_t bt_stride) {
  pdl_begin();
  GRID_STRIDE(e, n * kv_dim) {
    const int64_t i = e / kv_dim, d = e % kv_dim;
    const int64_t slot = cache_slot(bt, bs, seq, bt_stride, pos, i);
    kpool[slot * kv_dim + d] = k[i * ld + d];
    vpool[slot * kv_dim + d] = v[i * ld + d];
  }
}

// One warp per row (Backend::MoeParams): scores p (softmax or sigmoid) and the choice values
// s = p + score_bias in shared memory; group-limited routing masks the groups outside the
// topk_groups best (a group's best s, or its two best summed under sigmoid) with -inf; then k
// rounds of argmax over s (ties to the lower index, as torch.topk / the CPU's stable sort do),
// each weighted by its p, renormalised and scaled.
template <typename T>
__global__ void moe_route_kernel(const T* logits, MoeRouteArgs r, int32_t* sel_row,
                                 int32_t* sel_expert, float* weights) {
  pdl_begin();
  // [E] scores, [E] choice values, [groups] group scores, [groups] chosen flags
  extern __shared__ float prob[];
  const int64_t E = r.E, k = r.k;
  float* ch = prob + E;
  float* gs = ch + E;
  float* keep = gs + r.groups;
  const int64_t i = blockIdx.x;
  const int lane = threadIdx.x;
  if (r.sigmoid) {
    for (int64_t e = lane; e < E; e += 32) prob[e] = 1.0f / (1.0f + expf(-to_f(logits[i * E + e])));
  } else {
    float mx = -INFINITY;
    for (int64_t e = lane; e < E; e += 32) {
      prob[e] = to_f(logits[i * E + e]);
      mx = fmaxf(mx, prob[e]);
    }
    mx = warp_max(mx);
    float sum = 0;
    for (int64_t e = lane; e < E; e += 32) sum += (prob[e] = expf(prob[e] - mx));
    sum = warp_sum(sum);
    for (int64_t e = lane; e < E; e += 32) prob[e] /= sum;
  }
  for (int64_t e = lane; e < E; e += 32) ch[e] = prob[e] + (r.score_bias ? r.score_bias[e] : 0.0f);
  __syncwarp();
  // Argmax over v[0, m) (ties to the lower index); every lane gets it. Nothing above -inf (NaN
  // logits): index 0, so no expert index is ever out of range (the NaN output is reported).
  auto argmax = [&](const float* v, int m) {
    float best = -INFINITY;
    int bi = m;
    for (int e = lane; e < m; e += 32)
      if (v[e] > best) best = v[e], bi = e;  // lane-local: ascending e keeps the lowest
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (ob > best || (ob == best && oi < bi)) best = ob, bi = oi;
    }
    return bi < m ? bi : 0;
  };
  if (r.groups > 1) {
    const int per = int(E / r.groups);
    for (int g = lane; g < r.groups; g += 32) {
      float a = -INFINITY, b = -INFINITY;  // the group's best two choice values
      for (int j = 0; j < per; ++j) {
        const float v = ch[g * per + j];
        if (v > a)
          b = a, a = v;
        else if (v > b)
          b = v;
      }
      gs[g] = r.sigmoid && per > 1 ? a + b : a;
      keep[g] = 0.0f;
    }
    __syncwarp();
    for (int t = 0; t < r.topk_groups; ++t) {
      const int g = argmax(gs, r.groups);
      __syncwarp();
      if (lane == 0) gs[g] = -INFINITY, keep[g] = 1.0f;  // chosen: out of the next rounds
      __syncwarp();
    }
    for (int64_t e = lane; e < E; e += 32)
      if (keep[e / per] == 0.0f) ch[e] = -INFINITY;
    __syncwarp();
  }
  float wsum = 0;
  for (int64_t j = 0; j < k; ++j) {
    const int bi = argmax(ch, int(E));
    const float w = prob[bi];
    __syncwarp();
    if (lane == 0) {
      sel_row[i * k + j] = int32_t(i);
      sel_expert[i * k + j] = int32_t(bi);
      weights[i * k + j] = w;
      ch[bi] = -INFINITY;  // taken
    }
    wsum += w;
    __syncwarp();
  }
  if (lane == 0) {
    const float inv = r.renorm ? 1.0f / (wsum + (r.sigmoid ? 1e-20f : 0.0f)) : 1.0f;
    for (int64_t j = 0; j < k; ++j) weights[i * k + j] *= inv * r.scaling;
  }
}

template <typename T>
__global__ void moe_combine_kernel(const T* ye, const float* weights, int64_t n, int64_t k,
                                   int64_t hidden, const T* ys, const T* gate, T* out,
                                   const float* const* bias, const int32_t* sel) {
  pdl_begin();
  GRID_STRIDE(e, n * hidden) {
    const int64_t i = e / hidden, d = e % hidden;
    float acc = 0;
    for (int64_t j = 0; j < k; ++j)
      acc += weights[i * k + j] *
             (to_f(ye[(i * k + j) * hidden + d]) + (bias ? bias[sel[i * k + j]][d] : 0.0f));
    if (ys) acc += (gate ? 1.0f / (1.0f + expf(-to_f(gate[i]))) : 1.0f) * to_f(ys[e]);
    out[e] = from_f<T>(acc);
  }
}

}  // namespace

void embed(DType act, const void* table, DType tdt, int64_t rows, int64_t dim, const int32_t* ids,
           int64_t n, float scale, void* out, cudaStream_t s, bool f32_out, int64_t first) {
  if (f32_out || act == DType::F32) {
    launch_kernel(embed_kernel<float>, grid_for(n * dim), kThreads, 0, s, table, int(tdt), rows,
                  dim, ids, n, scale, static_cast<float*>(out), first);
    return;
  }
  KILN_DISPATCH_ACT(
      act, launch_kernel(embed_kernel<T>, grid_for(n * dim), kThreads, 0, s, table, int(tdt), rows,
                         dim, ids, n, scale, static_cast<T*>(out), first));
}

void add_rows(DType act, const void* table, DType tdt, int64_t dim, const int32_t* rows, int64_t n,
              void* x, cudaStream_t s, bool f32_x) {
  if (f32_x || act == DType::F32) {
    launch_kernel(add_rows_kernel<float>, grid_for(n * dim), kThreads, 0, s, table, int(tdt), dim,
                  rows, n, static_cast<float*>(x));
    return;
  }
  KILN_DISPATCH_ACT(act, launch_kernel(add_rows_kernel<T>, grid_for(n * dim), kThreads, 0, s, table,
                                       int(tdt), dim, rows, n, static_cast<T*>(x)));
}

void norm(DType act, const void* x, int64_t rows, int64_t heads, int64_t dim, int64_t ldx, void* y,
          int64_t ldy, const float* w, const float* b, NormKind kind, float eps, cudaStream_t s,
          const float* w2, int64_t w2_from, bool f32_x, const float* b2, bool per_head) {
  if (rows * heads == 0) return;
  const NormWeights nw{w, w2 ? w2 : w, w2 ? w2_from : heads, b, b2, per_head ? dim : 0};
  if (f32_x && act != DType::F32) {
    KILN_DISPATCH_ACT(
        act, (launch_norm<float, T, false>(const_cast<float*>(static_cast<const float*>(x)),
                                           nullptr, rows * heads, heads, dim, ldx,
                                           static_cast<T*>(y), ldy, nw, kind, eps, s)));
    return;
  }
  KILN_DISPATCH_ACT(act, (launch_norm<T, T, false>(const_cast<T*>(static_cast<const T*>(x)),
                                                   nullptr, rows * heads, heads, dim, ldx,
                                                   static_cast<T*>(y), ldy, nw, kind, eps, s)));
}

void add_norm(DType act, void* residual, const void* delta, int64_t rows, int64_t dim,
              const float* w, const float* b, NormKind kind, float eps, void* y, cudaStream_t s,
              bool f32_residual) {
  if (rows == 0) return;
  if (f32_residual && act != DType::F32) {
    KILN_DISPATCH_ACT(
        act, (launch_norm<float, T, true>(
                 static_cast<float*>(residual), static_cast<const T*>(delta), rows, 1, dim, dim,
                 static_cast<T*>(y), dim, NormWeights{w, w, 1, b}, kind, eps, s)));
    return;
  }
  KILN_DISPATCH_ACT(act, (launch_norm<T, T, true>(
                             static_cast<T*>(residual), static_cast<const T*>(delta), rows, 1, dim,
                             dim, static_cast<T*>(y), dim, NormWeights{w, w, 1, b}, kind, eps, s)));
}

void add(DType act, void* x, const void* y, int64_t count, cudaStream_t s) {
  if (count == 0) return;
  KILN_DISPATCH_ACT(act, launch_kernel(add_kernel<T>, grid_for(count), kThreads, 0, s,
                                       static_cast<T*>(x), static_cast<const T*>(y), count));
}

void rope(DType act, void* x, int64_t n, int64_t ld, int64_t heads, int64_t head_dim,
          int64_t rot_dim, const float* cos, const float* sin, cudaStream_t s) {
  const int64_t half = rot_dim / 2;
  if (n * heads * half == 0) return;
  KILN_DISPATCH_ACT(act, launch_kernel(rope_kernel<T>, grid_for(n * heads * half), kThreads, 0, s,
                                       static_cast<T*>(x), n, ld, heads, head_dim, half, cos, sin));
}

void gated_act(DType act, const void* gu, int64_t n, int64_t inter, Activation a, void* out,
               cudaStream_t s, const float* const* bias, const int32_t* sel) {
  if (n * inter == 0) return;
  KILN_DISPATCH_ACT(act, launch_kernel(gated_act_kernel<T>, grid_for(n * inter), kThreads, 0, s,
                                       static_cast<const T*>(gu), n, inter, int(a),
                                       static_cast<T*>(out), bias, sel));
}

void act_inplace(DType act, void* x, int64_t count, Activation a, cudaStream_t s) {
  if (count == 0) return;
  KILN_DISPATCH_ACT(act, launch_kernel(act_kernel<T>, grid_for(count), kThreads, 0, s,
                                       static_cast<T*>(x), count, int(a)));
}

void softcap(DType act, void* x, int64_t count, float cap, cudaStream_t s) {
  if (count == 0) return;
  KILN_DISPATCH_ACT(act, launch_kernel(softcap_kernel<T>, grid_for(count), kThreads, 0, s,
                                       static_cast<T*>(x), count, cap));
}

template <typename T>
__global__ void from_f32_kernel(const float* x, int64_t count, T* out) {
  pdl_begin();
  GRID_STRIDE(i, count) out[i] = from_f<T>(x[i]);
}

void from_f32(DType act, const float* x, int64_t count, void* out, cudaStream_t s) {
  if (count == 0) return;
  KILN_DISPATCH_ACT(act, launch_kernel(from_f32_kernel<T>, grid_for(count), kThreads, 0, s, x,
                                       count, static_cast<T*>(out)));
}

void softcap_f32(float* x, int64_t count, float cap, cudaStream_t s) {
  if (count == 0) return;
  launch_kernel(softcap_kernel<float>, grid_for(count), kThreads, 0, s, x, count, cap);
}

void to_f32(DType act, const void* x, int64_t count, float* out, cudaStream_t s) {
  if (count == 0) return;
  KILN_DISPATCH_ACT(act, launch_kernel(to_f32_kernel<T>, grid_for(count), kThreads, 0, s,
                                       static_cast<const T*>(x), count, out));
}

void bias_add(DType act, void* y, int64_t n, int64_t out, int64_t ldy, const float* bias,
              cudaStream_t s) {
  if (n * out == 0) return;
  KILN_DISPATCH_ACT(act, launch_kernel(bias_add_kernel<T>, grid_for(n * out), kThreads, 0, s,
                                       static_cast<T*>(y), n, out, ldy, bias));
}

void kv_write(DType act, void* kpool, void* vpool, const int32_t* block_table, int64_t block_size,
              int64_t kv_dim, const void* k, const void* v, int64_t ld, const int32_t* pos,
              int64_t n, cudaStream_t s, const int32_t* seq, int64_t bt_stride) {
  if (n * kv_dim == 0) return;
  KILN_DISPATCH_ACT(act, launch_kernel(kv_write_kernel<T>, grid_for(n * kv_dim), kThreads, 0, s,
                                       static_cast<T*>(kpool), static_cast<T*>(vpool), block_table,
                                       block_size, kv_dim, static_cast<const T*>(k),
                                       static_cast<const T*>(v), ld, pos, n, seq, bt_stride));
}

void rope_kv_write(DType act, void* x, int64_t n, int64_t ld, int64_t heads, int64_t k_from,
                   int64_t head_dim, int64_t rot_dim, const float* cos, const float* sin,
                   void* kpool, void* vpool, const int32_t* block_table, int64_t block_size,
                   int64_t kv_dim, const void* v, const int32_t* pos, cudaStream_t s,
                   const int32_t* seq, int64_t bt_stride) {
  const int64_t half = rot_dim / 2;
  const int64_t count =
      n * heads * half + n * (kv_dim / head_dim) * (head_dim - 2 * half) + n * kv_dim;
  if (count == 0) return;
  KILN_DISPATCH_ACT(
      act, launch_kernel(rope_kv_kernel<T>, grid_for(count), kThreads, 0, s, static_cast<T*>(x), n,
                         ld, heads, k_from, head_dim, half, cos, sin, static_cast<T*>(kpool),
                         static_cast<T*>(vpool), block_table, block_size, kv_dim,
                         static_cast<const T*>(v), pos, seq, bt_stride));
}

void moe_route(DType act, const void* logits, int64_t n, const MoeRouteArgs& r, int32_t* sel_row,
               int32_t* sel_expert, float* weights, cudaStream_t s) {
  if (n == 0) return;
  KILN_CHECK(r.k >= 1 && r.k <= r.E, "MoE: top-k ", r.k, " outside [1, ", r.E, "]");
  KILN_CHECK(r.E <= 4096, "MoE: ", r.E, " experts exceed the router kernel's limit of 4096");
  KILN_CHECK(r.groups >= 1 && r.E % r.groups == 0 && r.topk_groups >= 1 &&
                 r.topk_groups <= r.groups && r.topk_groups * (r.E / r.groups) >= r.k,
             "MoE: ", r.groups, " groups choosing ", r.topk_groups, " cannot route ", r.k, " of ",
             r.E, " experts");
  const size_t smem = size_t(2 * r.E + 2 * r.groups) * 4;
  KILN_DISPATCH_ACT(act,
                    launch_kernel(moe_route_kernel<T>, unsigned(n), 32, smem, s,
                                  static_cast<const T*>(logits), r, sel_row, sel_expert, weights));
}

void moe_combine(DType act, const void* ye, const float* weights, int64_t n, int64_t k,
                 int64_t hidden, const void* ys, const void* gate, void* out, cudaStream_t s,
                 const float* const* bias, const int32_t* sel) {
  if (n * hidden == 0) return;
  KILN_DISPATCH_ACT(act, launch_kernel(moe_combine_kernel<T>, grid_for(n * hidden), kThreads, 0, s,
                                       static_cast<const T*>(ye), weights, n, k, hidden,
                                       static_cast<const T*>(ys), static_cast<const T*>(gate),
                                       static_cast<T*>(out), bias, sel));
}

}  // namespace kiln::cuda
