// A plain tensor: dtype, shape and a pointer to contiguous row-major bytes. Storage is shared
// (a heap buffer, or a whole mmapped file kept alive by any tensor viewing into it).
#pragma once

#include <cstdint>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/quant.h"

namespace kiln {

using Shape = std::vector<int64_t>;

std::string shape_str(const Shape& s);
inline int64_t numel(const Shape& s) {
  return std::accumulate(s.begin(), s.end(), int64_t{1}, std::multiplies<>());
}

enum class Device : uint8_t { CPU, CUDA };

struct Tensor {
  DType dtype = DType::F32;
  Device device = Device::CPU;
  Shape shape;
  std::shared_ptr<void> storage;  // keeps `data` alive
  void* data = nullptr;
  // Quantized weights (core/quant.h): `quant` names the scheme, dtype and shape are those of the
  // stored codes (int8-wo: I8 [rows, cols]; int4-wo: U8 [rows, cols / 2], two codes a byte),
  // `scales` (F32) and `zero_points` (U8, int4-wo only) are [rows] or [rows, groups] on the same
  // device. None / null: a plain tensor.
  WeightQuant quant = WeightQuant::None;
  std::shared_ptr<Tensor> scales, zero_points;
  // Act-order int4 weights (GPTQ desc_act, compressed-tensors actorder "group"): I32 [in], the
  // stored columns are the inputs x[input_perm[j]], reordered so that each group's inputs are
  // contiguous; linear() gathers x through it first. Null: inputs in order.
  std::shared_ptr<Tensor> input_perm;

  int64_t numel() const { return kiln::numel(shape); }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype); }
  bool empty() const { return data == nullptr; }
  // Bytes of the data plus the scales, zeros and input order of a quantized weight.
  size_t weight_bytes() const {
    return nbytes() + (scales ? scales->nbytes() : 0) + (zero_points ? zero_points->nbytes() : 0) +
           (input_perm ? input_perm->nbytes() : 0);
  }
  // Input features of a weight matrix [out, in]: its last dimension, or the number of codes
  // packed in it.
  int64_t in_features() const { return quant == WeightQuant::Int4 ? 2 * shape[1] : shape[1]; }
  template <typename T>
  T* ptr() {
    return static_cast<T*>(data);
  }
  template <typename T>
  const T* ptr() const {
    return static_cast<const T*>(data);
  }

  // A zero-filled, 64-byte-aligned heap tensor.
  static Tensor zeros(DType t, Shape shape);
  // The same without the zero fill, for callers that write every element (so that the threads
  // writing it, not one memset, fault its pages in). Buffers of 2 MiB or more are 2 MiB-aligned
  // and asked for transparent huge pages: a model's weights are faulted in 512x fewer times.
  static Tensor uninitialized(DType t, Shape shape);
  // Wraps bytes owned by `owner` without copying.
  static Tensor view(DType t, Shape shape, std::shared_ptr<void> owner, void* data);
};

// Returns a copy converted to float dtype `to` (F32/F16/BF16 in, any float out).
Tensor convert(const Tensor& t, DType to);

}  // namespace kiln
