// CUDA backend entry points (kernels land with the CUDA backend work).
#include <cuda_runtime.h>

#include "graph/backend.h"

namespace kiln {

bool cuda_available() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

std::unique_ptr<Backend> make_cuda_backend(DType) { return nullptr; }

}  // namespace kiln
