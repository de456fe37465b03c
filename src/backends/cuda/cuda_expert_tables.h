// Device arrays of MoE experts' weight (or bias) pointers, one per layer and kind, for the
// gathered GEMVs and the bias epilogues that pick an expert per (row, choice).
#pragma once

#include <cuda_runtime.h>

#include <map>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace kiln::cuda {

class ExpertTables {
 public:
  ExpertTables() = default;
  ~ExpertTables();
  ExpertTables(const ExpertTables&) = delete;
  ExpertTables& operator=(const ExpertTables&) = delete;

  // The table of ts[0..E)'s data pointers, each tensor of dtype `want` and one shape (else
  // kiln::Error). Made once and kept, keyed by expert 0's pointer; rebuilt when the pointers
  // differ from those it was made of (tensors freed and others allocated at the same address,
  // as between tests), which may not happen during a graph capture (an engine runs every layer
  // before it captures). The copy is ordered on stream `s`.
  const void* const* get(const Tensor* const* ts, int64_t E, DType want, bool capturing,
                         cudaStream_t s);

 private:
  std::map<const void*, std::pair<void*, std::vector<const void*>>> tables_;
};

}  // namespace kiln::cuda
