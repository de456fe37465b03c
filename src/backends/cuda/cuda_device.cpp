// Process-wide CUDA facts and helpers the backend and its kernels share: error reporting,
// whether launches use programmatic dependent launch, whether a GPU is there and which
// runtime, driver and cuBLASLt versions kiln runs on (`kiln --version`).
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "backends/cuda/cuda_common.h"
#include "graph/backend.h"

namespace kiln {

namespace cuda {

void throw_error(const char* file, int line, const char* expr, const char* what) {
  cudaGetLastError();  // reset a non-sticky error so later launch checks do not repeat it
  const char* base = std::strrchr(file, '/');
  throw Error(cat("CUDA error at ", base ? base + 1 : file, ":", line, ": ", expr, ": ", what));
}

bool pdl_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("KILN_CUDA_PDL");
    return !(e && std::strcmp(e, "0") == 0);
  }();
  return on;
}

namespace {
// Streams whose last work from this thread was a copy or memset (see memcpy_async); one or two.
thread_local std::vector<cudaStream_t> copied_on;
void mark(cudaStream_t s) {
  if (std::find(copied_on.begin(), copied_on.end(), s) == copied_on.end()) copied_on.push_back(s);
}
}  // namespace

cudaError_t memcpy_async(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                         cudaStream_t s) {
  mark(s);
  return cudaMemcpyAsync(dst, src, bytes, kind, s);
}

cudaError_t memcpy_2d_async(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                            size_t rows, cudaMemcpyKind kind, cudaStream_t s) {
  mark(s);
  return cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, rows, kind, s);
}

cudaError_t memset_async(void* dst, int value, size_t bytes, cudaStream_t s) {
  mark(s);
  return cudaMemsetAsync(dst, value, bytes, s);
}

bool take_copy_mark(cudaStream_t s) {
  if (copied_on.empty()) return false;  // the common case: one load, no search
  const auto it = std::find(copied_on.begin(), copied_on.end(), s);
  if (it == copied_on.end()) return false;
  copied_on.erase(it);
  return true;
}

}  // namespace cuda

bool cuda_available() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

void cuda_use_device(int local_rank) {
  int n = 0;
  KILN_CUDA_CHECK(cudaGetDeviceCount(&n));
  KILN_CHECK(n > 0, "no CUDA GPU visible");
  KILN_CUDA_CHECK(cudaSetDevice(local_rank % n));
}

std::string cuda_versions() {
  int rt = 0, drv = 0;
  cudaRuntimeGetVersion(&rt);
  cudaDriverGetVersion(&drv);  // 0 without a driver
  const size_t lt = cublasLtGetVersion();
  auto v = [](int x) { return cat(x / 1000, ".", x % 1000 / 10); };
  return cat("CUDA runtime ", v(rt), ", driver ", drv ? v(drv) : std::string("none"), ", cuBLASLt ",
             lt / 10000, ".", lt / 100 % 100, ".", lt % 100);
}

}  // namespace kiln
