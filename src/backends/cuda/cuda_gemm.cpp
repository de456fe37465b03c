#include "backends/cuda/cuda_gemm.h"

#include <cstdio>

#include "backends/cuda/cuda_common.h"

namespace kiln::cuda {

namespace {

// Largest power of two (<= 256) dividing the address: what cuBLASLt's kernels may assume.
int alignment(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  int r = 256;
  while (r > 1 && a % uintptr_t(r)) r /= 2;
  return r;
}

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::F32:
      return CUDA_R_32F;
    case DType::F16:
      return CUDA_R_16F;
    case DType::BF16:
      return CUDA_R_16BF;
    case DType::F8_E4M3:
      return CUDA_R_8F_E4M3;
    default:
      throw Error("cuBLASLt: matrix dtype must be F32, F16, BF16 or F8_E4M3");
  }
}

}  // namespace

LtGemm::LtGemm(cudaStream_t s) : stream_(s) {
  KILN_CUBLAS_CHECK(cublasLtCreate(&handle_));
  workspace_bytes_ = size_t(32) << 20;  // what NVIDIA recommends for Hopper
  KILN_CUDA_CHECK(cudaMalloc(&workspace_, workspace_bytes_));
}

LtGemm::~LtGemm() {
  // Destructors must not throw: errors here are dropped.
  for (auto& [k, p] : plans_) {
    if (!p.ok) continue;
    cublasLtMatrixLayoutDestroy(p.a);
    cublasLtMatrixLayoutDestroy(p.b);
    cublasLtMatrixLayoutDestroy(p.c);
    cublasLtMatmulDescDestroy(p.op);
  }
  cudaFree(workspace_);
  cublasLtDestroy(handle_);
}

const LtGemm::Plan& LtGemm::plan(const Key& key) {
  const Plan& p = find_plan(key);
  if (!p.ok)
    throw Error(cat("cuBLASLt: no algorithm for ", dtype_name(DType(key.dt)), " product [", key.n,
                    " x ", key.k, "] . [", key.m, " x ", key.k, "]^T (ldx ", key.ldx, ", ldy ",
                    key.ldy, ")"));
  return p;
}

const LtGemm::Plan& LtGemm::find_plan(const Key& key, const float* sa, const float* sb) {
  auto it = plans_.find(key);
  if (it != plans_.end()) return it->second;
  Plan p;
  const cudaDataType_t t = cuda_type(DType(key.dt));
  KILN_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  // Column-major view: y^T [out x n] = W [in x out]^T . x^T [in x n].
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  KILN_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
  KILN_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
  const bool fp8 = DType(key.dt) == DType::F8_E4M3;
  if (fp8) {
    // One scale per row of W (M) and per token (N). The heuristic wants the scale pointers set;
    // each call sets its own again.
    const cublasLtMatmulMatrixScale_t mode = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
    KILN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode,
                                                     sizeof mode));
    KILN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode,
                                                     sizeof mode));
    KILN_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sa, sizeof sa));
    KILN_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sb, sizeof sb));
  }
  KILN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.a, t, uint64_t(key.k), uint64_t(key.m), key.k));
  KILN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.b, t, uint64_t(key.k), uint64_t(key.n), key.ldx));
  KILN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.c, cuda_type(DType(key.yt)), uint64_t(key.m),
                                               uint64_t(key.n), key.ldy));
  cublasLtMatmulPreference_t pref = nullptr;
  KILN_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t ws = workspace_bytes_;
  const uint32_t aw = uint32_t(key.align_w), ax = uint32_t(key.align_x), ay = uint32_t(key.align_y);
  cublasLtMatmulHeuristicResult_t res{};
  int found = 0;
  cublasStatus_t st = cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &aw,
                                              sizeof aw);
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ax,
                                              sizeof ax);
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ay,
                                              sizeof ay);
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ay,
                                              sizeof ay);
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulAlgoGetHeuristic(handle_, p.op, p.a, p.b, p.c, p.c, pref, 1, &res, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (st != CUBLAS_STATUS_SUCCESS || found == 0) {
    cublasLtMatrixLayoutDestroy(p.a);
    cublasLtMatrixLayoutDestroy(p.b);
    cublasLtMatrixLayoutDestroy(p.c);
    cublasLtMatmulDescDestroy(p.op);
    // Unsupported combinations come back as NOT_SUPPORTED or as no result: no algorithm. FP8
    // scale modes depend on the cuBLAS version and card; their callers have a fallback, so any
    // refusal is "no algorithm", said once per shape.
    if (fp8) {
      std::fprintf(stderr,
                   "kiln: cuBLASLt has no FP8 algorithm for [%lld x %lld] . [%lld x %lld]^T "
                   "(status %d); using the FP8 GEMV\n",
                   (long long)key.n, (long long)key.k, (long long)key.m, (long long)key.k, int(st));
    } else if (st != CUBLAS_STATUS_NOT_SUPPORTED) {
      KILN_CUBLAS_CHECK(st);
    }
    return plans_.emplace(key, Plan{}).first->second;
  }
  p.algo = res.algo;
  p.ok = true;
  return plans_.emplace(key, p).first->second;
}

void LtGemm::run(DType dt, const void* x, int64_t n, int64_t ldx, const void* w, int64_t in,
                 int64_t out, void* y, int64_t ldy, bool f32_out) {
  if (n == 0 || out == 0) return;
  const Key key{
      int(dt),     int(f32_out ? DType::F32 : dt), out, n, in, ldx, ldy, alignment(x), alignment(w),
      alignment(y)};
  const Plan& p = plan(key);
  const float alpha = 1.0f, beta = 0.0f;
  KILN_CUBLAS_CHECK(cublasLtMatmul(handle_, p.op, &alpha, w, p.a, x, p.b, &beta, y, p.c, y, p.c,
                                   &p.algo, workspace_, workspace_bytes_, stream_));
}

bool LtGemm::run_fp8(const void* xq, int64_t n, int64_t ldx, const float* sx, const void* w,
                     const float* sw, int64_t in, int64_t out, DType yt, void* y, int64_t ldy) {
  if (n == 0 || out == 0) return true;
  const Key key{int(DType::F8_E4M3), int(yt),      out,         n, in, ldx, ldy,
                alignment(xq),       alignment(w), alignment(y)};
  const Plan& p = find_plan(key, sw, sx);
  if (!p.ok) return false;
  // A is W (scales per row of the op(A) = M side), B the tokens.
  KILN_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sw, sizeof sw));
  KILN_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sx, sizeof sx));
  const float alpha = 1.0f, beta = 0.0f;
  KILN_CUBLAS_CHECK(cublasLtMatmul(handle_, p.op, &alpha, w, p.a, xq, p.b, &beta, y, p.c, y, p.c,
                                   &p.algo, workspace_, workspace_bytes_, stream_));
  return true;
}

}  // namespace kiln::cuda
