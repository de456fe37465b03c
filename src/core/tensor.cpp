#include "core/tensor.h"

#include <cstdlib>
#include <cstring>
#include <new>

#include "core/error.h"

namespace kiln {

std::string shape_str(const Shape& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

Tensor Tensor::zeros(DType t, Shape shape) {
  Tensor r;
  r.dtype = t;
  r.shape = std::move(shape);
  size_t bytes = (r.nbytes() + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes ? bytes : 64);
  if (!p) throw std::bad_alloc();
  std::memset(p, 0, bytes);
  r.storage = std::shared_ptr<void>(p, std::free);
  r.data = p;
  return r;
}

Tensor Tensor::view(DType t, Shape shape, std::shared_ptr<void> owner, void* data) {
  Tensor r;
  r.dtype = t;
  r.shape = std::move(shape);
  r.storage = std::move(owner);
  r.data = data;
  return r;
}

Tensor convert(const Tensor& t, DType to) {
  if (t.dtype == to) {
    Tensor r = Tensor::zeros(to, t.shape);
    std::memcpy(r.data, t.data, t.nbytes());
    return r;
  }
  Tensor r = Tensor::zeros(to, t.shape);
  const size_t n = size_t(t.numel()), chunk = 1 << 16;
  std::vector<float> buf(std::min(n, chunk));
  for (size_t i = 0; i < n; i += chunk) {
    size_t m = std::min(chunk, n - i);
    to_f32(t.dtype, static_cast<const char*>(t.data) + i * dtype_size(t.dtype), buf.data(), m);
    from_f32(to, buf.data(), static_cast<char*>(r.data) + i * dtype_size(to), m);
  }
  return r;
}

}  // namespace kiln
