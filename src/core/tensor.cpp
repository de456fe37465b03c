#include "core/tensor.h"

#include <cstdlib>
#include <cstring>
#include <new>

#include <sys/mman.h>

#include "core/error.h"

namespace kiln {

std::string shape_str(const Shape& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

Tensor Tensor::uninitialized(DType t, Shape shape) {
  Tensor r;
  r.dtype = t;
  r.shape = std::move(shape);
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t bytes = r.nbytes();
  const size_t align = bytes >= kHuge ? kHuge : 64;
  const size_t padded = bytes ? (bytes + align - 1) / align * align : align;
  void* p = std::aligned_alloc(align, padded);
  if (!p) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  // Advice only: where transparent huge pages are off this changes nothing.
  if (align == kHuge) madvise(p, padded, MADV_HUGEPAGE);
#endif
  r.storage = std::shared_ptr<void>(p, std::free);
  r.data = p;
  return r;
}

Tensor Tensor::zeros(DType t, Shape shape) {
  Tensor r = uninitialized(t, std::move(shape));
  std::memset(r.data, 0, r.nbytes());
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
