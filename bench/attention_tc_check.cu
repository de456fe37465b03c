// Stand-alone device check and timing of the tensor-core attention kernel (cuda_attention_tc.cu)
// against an FP64 host reference and the CUDA-core kernel (cuda_attention.cu). Not built by
// CMake (bench/*.cpp only); build by hand:
//
//   nvcc -O3 -std=c++17 -arch=sm_90a --expt-relaxed-constexpr -Isrc -Iinclude \
//     bench/attention_tc_check.cu src/backends/cuda/cuda_attention_tc.cu \
//     src/backends/cuda/cuda_attention.cu src/core/dtype.cpp -o attn_check
//   ./attn_check            # all checks, then timings; exit status 1 if any check fails
//   KILN_CUDA_ATTN_TC_ROWS=64|128 ./attn_check   # the same with the rows per block forced
//
// (cuda_common.h includes arch/model_config.h, which includes <nlohmann/json.hpp>; where that
// header is missing, a stub `namespace nlohmann { struct json {}; }` on the include path does.)
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "backends/cuda/cuda_attention_tc.h"
#include "backends/cuda/cuda_common.h"
#include "backends/cuda/cuda_kernels.h"

// The two backend hooks cuda_common.h declares (cuda_backend.cu defines them in kiln).
namespace kiln::cuda {
void throw_error(const char* file, int line, const char* expr, const char* what) {
  cudaGetLastError();
  throw Error(cat("CUDA error at ", file, ":", line, ": ", expr, ": ", what));
}
bool pdl_enabled() {
  return true;
}
}  // namespace kiln::cuda

using namespace kiln;
using namespace kiln::cuda;

#define CK(x) KILN_CUDA_CHECK(x)

namespace {

int g_sms = 0;

uint16_t to_bits(float f, DType dt) {
  uint16_t u;
  if (dt == DType::BF16) {
    __nv_bfloat16 b = __float2bfloat16_rn(f);
    memcpy(&u, &b, 2);
  } else {
    __half h = __float2half_rn(f);
    memcpy(&u, &h, 2);
  }
  return u;
}
float from_bits(uint16_t u, DType dt) {
  if (dt == DType::BF16) {
    __nv_bfloat16 b;
    memcpy(&b, &u, 2);
    return __bfloat162float(b);
  }
  __half h;
  memcpy(&h, &u, 2);
  return __half2float(h);
}
uint16_t nan_bits(DType dt) {
  return dt == DType::BF16 ? 0x7fc0 : 0x7e00;
}

struct Case {
  DType dt = DType::BF16;
  int D = 128, n = 64, heads = 8, kv = 2;
  int off = 0;  // positions off .. off + n - 1 (keys before them already cached)
  int window = 0;
  float softcap = 0.0f;
  int bs = 16;
  bool random_pos = false;  // positions drawn uniformly from [0, off + n)
  float qmag = 1.0f;        // q magnitude (large: peaky softmax, soft-cap active)
  const char* note = "";
};

// Device state of one problem: inputs, both outputs, workspace for the CUDA-core kernel.
struct Problem {
  Case c;
  int kv_len = 0, group = 0;
  int64_t ldq = 0, ldo = 0, kv_dim = 0;
  std::vector<uint16_t> hq, hk, hv;  // hk/hv: whole pools
  std::vector<int32_t> hpos, hbt;
  void *q = nullptr, *kp = nullptr, *vp = nullptr, *out_tc = nullptr, *out_ref = nullptr;
  int32_t *pos = nullptr, *bt = nullptr;
  float* ws = nullptr;
  int* counters = nullptr;
  AttnLaunch a{};

  explicit Problem(const Case& cs, uint64_t seed) : c(cs) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> U(-1.0f, 1.0f);
    group = c.heads / c.kv;
    kv_len = c.off + c.n;
    ldq = int64_t(c.heads + 2 * c.kv) * c.D;  // q inside a fused qkv row
    ldo = int64_t(c.heads) * c.D;
    kv_dim = int64_t(c.kv) * c.D;
    const int need = (kv_len + c.bs - 1) / c.bs, nblocks = need + 3;
    std::vector<int32_t> perm(nblocks);
    for (int i = 0; i < nblocks; ++i) perm[i] = i;
    std::shuffle(perm.begin(), perm.end(), rng);
    const int bt_len = need + 2;
    hbt.assign(bt_len, 0);
    for (int i = 0; i < bt_len; ++i) hbt[i] = i < need ? perm[i] : perm[need];  // poison block
    // Pools start as NaN: any read of an unwritten slot (position >= kv_len) poisons the output.
    const size_t pool = size_t(nblocks) * c.bs * kv_dim;
    hk.assign(pool, nan_bits(c.dt));
    hv.assign(pool, nan_bits(c.dt));
    for (int t = 0; t < kv_len; ++t) {
      const size_t slot = size_t(hbt[t / c.bs]) * c.bs + t % c.bs;
      for (int64_t d = 0; d < kv_dim; ++d) {
        hk[slot * kv_dim + d] = to_bits(U(rng), c.dt);
        hv[slot * kv_dim + d] = to_bits(U(rng), c.dt);
      }
    }
    hq.assign(size_t(c.n) * ldq, nan_bits(c.dt));  // k/v parts of the qkv row: NaN, never read
    for (int i = 0; i < c.n; ++i)
      for (int64_t d = 0; d < int64_t(c.heads) * c.D; ++d)
        hq[i * ldq + d] = to_bits(c.qmag * U(rng), c.dt);
    hpos.resize(c.n);
    std::uniform_int_distribution<int> P(0, kv_len - 1);
    for (int i = 0; i < c.n; ++i) hpos[i] = c.random_pos ? P(rng) : c.off + i;
    if (c.random_pos) hpos[rng() % c.n] = kv_len - 1;  // max(pos) + 1 == kv_len

    CK(cudaMalloc(&q, hq.size() * 2));
    CK(cudaMalloc(&kp, pool * 2));
    CK(cudaMalloc(&vp, pool * 2));
    CK(cudaMalloc(&out_tc, size_t(c.n) * ldo * 2));
    CK(cudaMalloc(&out_ref, size_t(c.n) * ldo * 2));
    CK(cudaMalloc(&pos, size_t(c.n) * 4));
    CK(cudaMalloc(&bt, hbt.size() * 4));
    CK(cudaMemcpy(q, hq.data(), hq.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(kp, hk.data(), pool * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(vp, hv.data(), pool * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(pos, hpos.data(), size_t(c.n) * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(bt, hbt.data(), hbt.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemset(out_tc, 0xff, size_t(c.n) * ldo * 2));  // NaN until written
    CK(cudaMemset(out_ref, 0xff, size_t(c.n) * ldo * 2));

    a.q = q;
    a.ldq = ldq;
    a.n = c.n;
    a.pos = pos;
    a.kpool = kp;
    a.vpool = vp;
    a.block_table = bt;
    a.block_size = c.bs;
    a.kv_dim = kv_dim;
    a.heads = c.heads;
    a.kv_heads = c.kv;
    a.head_dim = c.D;
    a.scale = 1.0f / std::sqrt(float(c.D));
    a.softcap = c.softcap;
    a.window = c.window;
    a.kv_len = kv_len;
    a.ldo = ldo;
    const size_t wsb = attention_workspace(a, g_sms), nc = attention_counters(a, g_sms);
    if (wsb) CK(cudaMalloc(&ws, wsb));
    if (nc) {
      CK(cudaMalloc(&counters, nc * 4));
      CK(cudaMemset(counters, 0, nc * 4));
    }
  }
  ~Problem() {
    cudaFree(q), cudaFree(kp), cudaFree(vp), cudaFree(out_tc), cudaFree(out_ref);
    cudaFree(pos), cudaFree(bt), cudaFree(ws), cudaFree(counters);
  }
  bool run_tc(cudaStream_t s) {
    AttnLaunch b = a;
    b.out = out_tc;
    return attention_tc(c.dt, b, s);
  }
  void run_old(cudaStream_t s) {  // the CUDA-core kernel: attention() with the tc path off
    AttnLaunch b = a;
    b.out = out_ref;
    set_attention_tc_enabled(false);
    attention(c.dt, b, ws, counters, g_sms, s);
    set_attention_tc_enabled(true);
  }

  // FP64 reference of row i, head h (rounded inputs) into r[D].
  void reference(int i, int h, double* r) const {
    const int D = c.D, kvh = h / group, p = hpos[i];
    const int lo = c.window > 0 ? std::max(0, p - c.window + 1) : 0;
    std::vector<double> qd(D), sc(p - lo + 1);
    for (int d = 0; d < D; ++d) qd[d] = from_bits(hq[i * ldq + int64_t(h) * D + d], c.dt);
    double mx = -INFINITY;
    for (int t = lo; t <= p; ++t) {
      const size_t base = (size_t(hbt[t / c.bs]) * c.bs + t % c.bs) * kv_dim + size_t(kvh) * D;
      double s = 0;
      for (int d = 0; d < D; ++d) s += qd[d] * from_bits(hk[base + d], c.dt);
      s *= double(a.scale);
      if (c.softcap > 0) s = c.softcap * std::tanh(s / c.softcap);
      sc[t - lo] = s;
      mx = std::max(mx, s);
    }
    double l = 0;
    for (double& s : sc) l += (s = std::exp(s - mx));
    for (int d = 0; d < D; ++d) r[d] = 0;
    for (int t = lo; t <= p; ++t) {
      const size_t base = (size_t(hbt[t / c.bs]) * c.bs + t % c.bs) * kv_dim + size_t(kvh) * D;
      const double w = sc[t - lo] / l;
      for (int d = 0; d < D; ++d) r[d] += w * from_bits(hv[base + d], c.dt);
    }
  }
};

std::string dname(DType dt) {
  return dt == DType::BF16 ? "bf16" : "f16";
}

// Runs one case: tc vs FP64 reference (all rows when n <= 160, else 96 sampled), tc vs the
// CUDA-core kernel (all rows). Returns pass.
bool check(const Case& c, uint64_t seed, cudaStream_t s) {
  Problem pb(c, seed);
  const bool handled = pb.run_tc(s);
  pb.run_old(s);
  CK(cudaStreamSynchronize(s));
  const size_t cnt = size_t(c.n) * pb.ldo;
  std::vector<uint16_t> otc(cnt), oold(cnt);
  CK(cudaMemcpy(otc.data(), pb.out_tc, cnt * 2, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(oold.data(), pb.out_ref, cnt * 2, cudaMemcpyDeviceToHost));
  std::vector<int> rows;
  if (c.n <= 160) {
    for (int i = 0; i < c.n; ++i) rows.push_back(i);
  } else {
    std::mt19937 r(seed + 7);
    for (int k = 0; k < 64; ++k) rows.push_back(int(r() % c.n));
    for (int i = 0; i < 16; ++i) rows.push_back(i);
    for (int i = c.n - 16; i < c.n; ++i) rows.push_back(i);
    std::sort(rows.begin(), rows.end());
    rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
  }
  // FP64 reference, rows spread over threads.
  const int H = c.heads, D = c.D;
  std::vector<double> ref(rows.size() * H * D);
  {
    const int nt = std::max(1u, std::min(16u, std::thread::hardware_concurrency()));
    std::vector<std::thread> th;
    for (int w = 0; w < nt; ++w)
      th.emplace_back([&, w] {
        for (size_t k = w; k < rows.size(); k += nt)
          for (int h = 0; h < H; ++h) pb.reference(rows[k], h, &ref[(k * H + h) * D]);
      });
    for (auto& t : th) t.join();
  }
  double e_tc = 0, e_old = 0, nr = 0, e_to = 0, n_old = 0;
  bool nan = false;
  for (size_t k = 0; k < rows.size(); ++k)
    for (int h = 0; h < H; ++h)
      for (int d = 0; d < D; ++d) {
        const size_t o = size_t(rows[k]) * pb.ldo + size_t(h) * D + d;
        const double r = ref[(k * H + h) * D + d];
        const double x = from_bits(otc[o], c.dt), y = from_bits(oold[o], c.dt);
        e_tc += (x - r) * (x - r), e_old += (y - r) * (y - r), nr += r * r;
      }
  for (size_t o = 0; o < cnt; ++o) {
    const double x = from_bits(otc[o], c.dt), y = from_bits(oold[o], c.dt);
    if (!std::isfinite(x)) nan = true;
    e_to += (x - y) * (x - y), n_old += y * y;
  }
  e_tc = std::sqrt(e_tc / nr), e_old = std::sqrt(e_old / nr), e_to = std::sqrt(e_to / n_old);
  const double tol = c.dt == DType::BF16 ? 1e-2 : 2e-3;
  const bool ok = handled && !nan && e_tc <= tol && e_to <= 2 * tol;
  std::printf(
      "%s %-4s D=%3d n=%4d heads=%2d kv=%d off=%4d win=%3d cap=%4.1f bs=%2d%s q*%.0f %-10s | "
      "tc-ref %.2e  old-ref %.2e  tc-old %.2e%s%s\n",
      ok ? "PASS" : "FAIL", dname(c.dt).c_str(), c.D, c.n, c.heads, c.kv, c.off, c.window,
      c.softcap, c.bs, c.random_pos ? " randpos" : "", c.qmag, c.note, e_tc, e_old, e_to,
      handled ? "" : "  NOT HANDLED", nan ? "  NON-FINITE" : "");
  std::fflush(stdout);
  return ok;
}

// Median per-launch ms (20 samples of `reps` back-to-back launches).
template <typename F>
double time_ms(F f, cudaStream_t s, int reps) {
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  for (int i = 0; i < 3; ++i) f();
  std::vector<float> v;
  for (int k = 0; k < 20; ++k) {
    CK(cudaEventRecord(e0, s));
    for (int r = 0; r < reps; ++r) f();
    CK(cudaEventRecord(e1, s));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    v.push_back(ms / reps);
  }
  std::sort(v.begin(), v.end());
  cudaEventDestroy(e0), cudaEventDestroy(e1);
  return v[v.size() / 2];
}

void bench(const Case& c, cudaStream_t s) {
  Problem pb(c, 1234);
  if (!pb.run_tc(s)) {
    std::printf("bench %s: not handled\n", c.note);
    return;
  }
  const double t_tc = time_ms([&] { pb.run_tc(s); }, s, 10);
  const double t_old = time_ms([&] { pb.run_old(s); }, s, c.n >= 1024 ? 2 : 5);
  // Causal FLOPs: 4 * D * heads per (row, visible key) pair.
  double pairs = 0;
  for (int i = 0; i < c.n; ++i) {
    const int p = pb.hpos[i];
    pairs += c.window > 0 ? std::min(p + 1, c.window) : p + 1;
  }
  const double flops = 4.0 * pairs * c.D * c.heads;
  const char* cfg = std::getenv("KILN_CUDA_ATTN_TC_ROWS");
  std::printf(
      "bench rows=%-4s %-22s %-4s D=%3d n=%4d off=%4d h=%2d kv=%2d | old %7.4f ms %5.1f TF/s "
      "| tc %7.4f ms %5.1f TF/s | %5.1fx\n",
      cfg ? cfg : "auto", c.note, dname(c.dt).c_str(), c.D, c.n, c.off, c.heads, c.kv, t_old,
      flops / t_old / 1e9, t_tc, flops / t_tc / 1e9, t_old / t_tc);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  // Modes: (none) checks then timings; "checks"; "bench"; "sanitize" (a few small cases, for
  // compute-sanitizer).
  const std::string mode = argc > 1 ? argv[1] : "";
  const bool do_checks = mode.empty() || mode == "checks",
             do_bench = mode.empty() || mode == "bench";
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  g_sms = prop.multiProcessorCount;
  std::printf("device %s, %d SMs\n", prop.name, g_sms);
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  int fails = 0, total = 0;
  uint64_t seed = 1;
  auto run = [&](const Case& c) {
    ++total;
    try {
      if (!check(c, seed++, s)) ++fails;
    } catch (const std::exception& e) {
      std::printf("FAIL (exception) %s\n", e.what());
      ++fails;
    }
  };

  if (mode == "sanitize") {
    Case c;
    c.n = 100, c.heads = 8, c.kv = 2, c.off = 37, c.bs = 5;
    run(c);
    c = Case();
    c.dt = DType::F16, c.D = 256, c.n = 70, c.heads = 4, c.kv = 2, c.off = 10, c.window = 20;
    run(c);
    c = Case();
    c.D = 64, c.n = 33, c.heads = 16, c.kv = 1;
    run(c);
    c = Case();
    c.D = 80, c.n = 64, c.heads = 4, c.kv = 4, c.off = 30, c.random_pos = true;
    run(c);
    std::printf("sanitize cases: %d / %d passed\n", total - fails, total);
    return fails ? 1 : 0;
  }
  if (do_checks) {
    // Declined launches.
    {
      Case c;
      c.n = 64;
      Problem pb(c, 99);
      AttnLaunch b = pb.a;
      b.out = pb.out_tc;
      const bool f32 = attention_tc(DType::F32, b, s);
      AttnLaunch b2 = b;
      b2.seq = pb.pos;
      const bool seq = attention_tc(DType::BF16, b2, s);
      AttnLaunch b3 = b;
      b3.ldq = 4;
      const bool mis = attention_tc(DType::BF16, b3, s);
      AttnLaunch b4 = b;
      b4.head_dim = 72, b4.kv_dim = 72 * 2;
      const bool d72 = attention_tc(DType::BF16, b4, s);
      const bool ok = !f32 && !seq && !mis && !d72;
      std::printf("%s declines F32 / seq / misaligned ldq / D=72\n", ok ? "PASS" : "FAIL");
      ++total, fails += !ok;
    }
    // Full grid: dtype x D x n x group, positions 0 .. n-1.
    for (DType dt : {DType::BF16, DType::F16})
      for (int D : {64, 128, 256})
        for (int n : {1, 17, 64, 100, 512, 1000})
          for (int g : {1, 4, 8}) {
            Case c;
            c.dt = dt, c.D = D, c.n = n, c.kv = 2, c.heads = 2 * g;
            run(c);
          }
    // Chunked prefill, windows, soft-cap, odd head dims, block sizes, random positions, big
    // groups, peaky softmax.
    for (DType dt : {DType::BF16, DType::F16}) {
      auto mk = [&](int D, int n, int heads, int kv, int off, const char* note) {
        Case c;
        c.dt = dt, c.D = D, c.n = n, c.heads = heads, c.kv = kv, c.off = off, c.note = note;
        return c;
      };
      run(mk(128, 100, 8, 2, 300, "chunk"));
      run(mk(128, 512, 8, 2, 777, "chunk"));
      run(mk(64, 17, 4, 4, 1000, "chunk"));
      run(mk(256, 64, 8, 1, 129, "chunk mqa"));
      {
        Case c = mk(128, 512, 8, 2, 0, "window");
        c.window = 64;
        run(c);
        c.window = 200, c.off = 300;
        run(c);
        c = mk(256, 1000, 4, 2, 0, "window");
        c.window = 100;
        run(c);
        c = mk(64, 100, 4, 1, 50, "window");
        c.window = 1;
        run(c);
      }
      {
        Case c = mk(256, 512, 8, 4, 0, "softcap");
        c.softcap = 5.0f, c.qmag = 8.0f;
        run(c);
        c = mk(128, 100, 8, 2, 200, "softcap+win");
        c.softcap = 30.0f, c.window = 40, c.qmag = 4.0f;
        run(c);
      }
      run(mk(80, 100, 8, 2, 0, "D80"));
      run(mk(96, 512, 32, 32, 0, "D96 mha"));
      run(mk(96, 64, 8, 2, 500, "D96 chunk"));
      {
        Case c = mk(128, 100, 8, 2, 37, "bs");
        c.bs = 32;
        run(c);
        c.bs = 5;
        run(c);
        c.bs = 1;
        run(c);
      }
      {
        Case c = mk(128, 100, 8, 2, 400, "random pos");
        c.random_pos = true;
        run(c);
        c = mk(64, 333, 16, 1, 100, "random pos");
        c.random_pos = true, c.window = 50;
        run(c);
      }
      run(mk(128, 64, 16, 1, 0, "group 16"));
      run(mk(128, 37, 32, 1, 60, "group 32"));
      {
        Case c = mk(128, 512, 8, 2, 0, "peaky");
        c.qmag = 12.0f;
        run(c);
      }
    }
    // CUDA-graph capture of the tc launch gives the same bytes.
    {
      Case c;
      c.n = 300, c.heads = 8, c.kv = 2, c.off = 50;
      Problem pb(c, 4242);
      pb.run_tc(s);
      CK(cudaStreamSynchronize(s));
      const size_t cnt = size_t(c.n) * pb.ldo;
      std::vector<uint16_t> o1(cnt), o2(cnt);
      CK(cudaMemcpy(o1.data(), pb.out_tc, cnt * 2, cudaMemcpyDeviceToHost));
      CK(cudaMemset(pb.out_tc, 0, cnt * 2));
      cudaGraph_t g;
      cudaGraphExec_t ge;
      CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
      const bool h = pb.run_tc(s);
      CK(cudaStreamEndCapture(s, &g));
      CK(cudaGraphInstantiate(&ge, g, 0));
      CK(cudaGraphLaunch(ge, s));
      CK(cudaStreamSynchronize(s));
      CK(cudaMemcpy(o2.data(), pb.out_tc, cnt * 2, cudaMemcpyDeviceToHost));
      const bool ok = h && o1 == o2;
      std::printf("%s graph capture replay identical\n", ok ? "PASS" : "FAIL");
      ++total, fails += !ok;
      cudaGraphExecDestroy(ge), cudaGraphDestroy(g);
    }
    std::printf("checks: %d / %d passed\n", total - fails, total);
  }

  if (!do_bench) return fails ? 1 : 0;
  // Timings.
  auto bc = [](DType dt, int D, int n, int heads, int kv, int off, const char* note) {
    Case c;
    c.dt = dt, c.D = D, c.n = n, c.heads = heads, c.kv = kv, c.off = off, c.note = note;
    return c;
  };
  bench(bc(DType::BF16, 128, 512, 32, 8, 0, "llama8b pp512"), s);
  bench(bc(DType::BF16, 128, 2048, 32, 8, 0, "llama8b pp2048"), s);
  bench(bc(DType::F16, 128, 512, 32, 8, 0, "llama8b pp512 f16"), s);
  bench(bc(DType::BF16, 128, 512, 16, 8, 0, "qwen3-0.6b pp512"), s);
  bench(bc(DType::BF16, 256, 512, 8, 4, 0, "gemma2-2b pp512"), s);
  bench(bc(DType::BF16, 64, 512, 12, 12, 0, "gpt2 pp512"), s);
  bench(bc(DType::BF16, 128, 512, 32, 8, 1536, "llama8b chunk 512@1536"), s);
  for (int n : {16, 32, 64, 128})
    for (int off : {512, 4096}) bench(bc(DType::BF16, 128, n, 32, 8, off, "llama8b small n"), s);
  CK(cudaStreamDestroy(s));
  return fails ? 1 : 0;
}
