#include "backends/cuda/cuda_expert_tables.h"

#include "backends/cuda/cuda_common.h"

namespace kiln::cuda {

ExpertTables::~ExpertTables() {
  for (auto& [k, t] : tables_) cudaFree(t.first);
}

const void* const* ExpertTables::get(const Tensor* const* ts, int64_t E, DType want, bool capturing,
                                     cudaStream_t s) {
  auto& [d, made] = tables_[ts[0]->data];
  std::vector<const void*> h(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) {
    KILN_CHECK(ts[e]->dtype == want && ts[e]->shape == ts[0]->shape,
               "CUDA MoE: experts must share one shape and dtype ", dtype_name(want));
    h[size_t(e)] = ts[e]->data;
  }
  if (!d || made != h) {
    KILN_CHECK(!capturing, "CUDA MoE: expert table made during a graph capture");
    if (d) {
      KILN_CUDA_CHECK(cudaStreamSynchronize(s));  // earlier launches may still read it
      KILN_CUDA_CHECK(cudaFree(d));
      d = nullptr;
    }
    KILN_CUDA_CHECK(cudaMalloc(&d, h.size() * sizeof(void*)));
    KILN_CUDA_CHECK(
        cudaMemcpyAsync(d, h.data(), h.size() * sizeof(void*), cudaMemcpyHostToDevice, s));
    made = std::move(h);
  }
  return static_cast<const void* const*>(d);
}

}  // namespace kiln::cuda
