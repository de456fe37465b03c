// Process-wide CUDA facts and helpers the backend and its kernels share: error reporting,
// whether launches use programmatic dependent launch, whether a GPU is there and which
// runtime, driver and cuBLASLt versions kiln runs on (`kiln --version`).
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>
#include <utility>

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

void allow_dynamic_smem(const void* kernel, size_t bytes) {
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> done;
  int dev = 0;
  KILN_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  if (!done.insert({kernel, dev}).second) return;
  const cudaError_t e =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (e != cudaSuccess) done.erase({kernel, dev});
  KILN_CUDA_CHECK(e);
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
