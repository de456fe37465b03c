// kiln::cuda::upload_all (engine load): exact bytes after the round trip for tensors of odd
// sizes, dtypes and host alignments, zero-size ones and aliases, more bytes than the staging
// buffers hold (so buffers are reused), sources in a mapped safetensors file (pread) and in heap
// memory, with pread on and off. Skips when no GPU is visible; compiles without CUDA.
#include <cstdlib>
#include <cstring>
#include <random>

#include "core/error.h"
#include "graph/backend.h"
#include "test_util.h"

#ifdef KILN_HAVE_CUDA
#include <cuda_runtime.h>

#include "backends/cuda/cuda_upload.h"
#endif

namespace kiln::test {
namespace {

#ifdef KILN_HAVE_CUDA

// Deterministic bytes for (seed, position).
void fill(uint8_t* p, size_t n, uint64_t seed) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    std::memcpy(p + i, &x, 8);
  }
  for (x ^= x << 13, x ^= x >> 7, x ^= x << 17; i < n; ++i, x >>= 8) p[i] = uint8_t(x);
}

std::vector<uint8_t> expected(size_t n, uint64_t seed) {
  std::vector<uint8_t> v(n);
  fill(v.data(), n, seed);
  return v;
}

std::vector<uint8_t> download(const Tensor& t) {
  std::vector<uint8_t> v(t.nbytes());
  if (!v.empty()) {
    EXPECT_EQ(cudaMemcpy(v.data(), t.data, v.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  }
  return v;
}

class CudaUpload : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU visible";
    ASSERT_EQ(cudaStreamCreate(&s), cudaSuccess);
  }
  void TearDown() override {
    if (s) cudaStreamDestroy(s);
    unsetenv("KILN_UPLOAD_PREAD");
    unsetenv("KILN_UPLOAD_THREADS");
  }
  // Every device tensor: on CUDA, 256-byte aligned, same dtype and shape, one shared owner.
  void check_layout(const std::vector<Tensor>& dev, const std::vector<DType>& dt,
                    const std::vector<Shape>& sh) {
    ASSERT_EQ(dev.size(), dt.size());
    for (size_t i = 0; i < dev.size(); ++i) {
      EXPECT_EQ(dev[i].device, Device::CUDA) << i;
      EXPECT_EQ(dev[i].dtype, dt[i]) << i;
      EXPECT_EQ(dev[i].shape, sh[i]) << i;
      EXPECT_NE(dev[i].data, nullptr) << i;
      EXPECT_EQ(reinterpret_cast<uintptr_t>(dev[i].data) % 256, 0u) << i;
      EXPECT_EQ(dev[i].storage.get(), dev[0].storage.get()) << i;
    }
  }
  cudaStream_t s = nullptr;
};

TEST_F(CudaUpload, HeapTensorsOddSizesAlignmentsAndReuse) {
  // (dtype, shape): zero-size ones, scalars, odd byte counts; ~600 MB in all, far more than the
  // staging buffers, with single tensors larger than a buffer.
  const std::vector<std::pair<DType, Shape>> spec = {
      {DType::BF16, {4096, 14336}},  // 117 MB
      {DType::F32, {0}},
      {DType::U8, {300000007}},  // 300 MB, odd
      {DType::F32, {}},
      {DType::F16, {3, 5, 7}},
      {DType::I64, {2, 0, 3}},
      {DType::BF16, {1234567}},
      {DType::F32, {4096}},
      {DType::U8, {1}},
      {DType::I8, {255}},
      {DType::F32, {9999991}},  // 40 MB
      {DType::F16, {8388608 + 1}},
      {DType::BOOL, {17}},
      {DType::I32, {1 << 20}},
      {DType::BF16, {50000000}},  // 100 MB
  };
  std::vector<DType> dts;
  std::vector<Shape> shapes;
  std::vector<Tensor> dev;
  {
    // One host arena, each tensor at an odd offset (1..7 bytes past a 64-byte boundary) and
    // placed in reverse order of `spec`, so address order differs from argument order.
    std::vector<size_t> off(spec.size());
    size_t arena = 0;
    for (size_t i = spec.size(); i-- > 0;) {
      arena = (arena + 63) / 64 * 64 + 1 + i % 7;
      off[i] = arena;
      arena += size_t(numel(spec[i].second)) * dtype_size(spec[i].first);
    }
    std::shared_ptr<void> mem(std::malloc(arena + 64), std::free);
    ASSERT_TRUE(mem);
    auto* base = static_cast<uint8_t*>(mem.get());
    std::vector<Tensor> host;
    for (size_t i = 0; i < spec.size(); ++i) {
      host.push_back(Tensor::view(spec[i].first, spec[i].second, mem, base + off[i]));
      fill(base + off[i], host.back().nbytes(), i + 1);
      dts.push_back(spec[i].first);
      shapes.push_back(spec[i].second);
    }
    // Aliases: the same bytes twice, and a tensor inside another.
    host.push_back(host[6]);
    dts.push_back(spec[6].first), shapes.push_back(spec[6].second);
    host.push_back(Tensor::view(DType::U8, {1000}, mem, base + off[2] + 1000));
    dts.push_back(DType::U8), shapes.push_back({1000});
    std::vector<const Tensor*> ptrs;
    for (const Tensor& t : host) ptrs.push_back(&t);
    setenv("KILN_UPLOAD_THREADS", "5", 1);
    dev = cuda::upload_all(ptrs, s);
  }  // host tensors, pointer vector and arena are gone now
  check_layout(dev, dts, shapes);
  for (size_t i = 0; i < spec.size(); ++i)
    EXPECT_TRUE(download(dev[i]) == expected(dev[i].nbytes(), i + 1)) << "tensor " << i;
  EXPECT_TRUE(download(dev[spec.size()]) == expected(dev[6].nbytes(), 7));
  const std::vector<uint8_t> big = expected(300000007, 3), part = download(dev[spec.size() + 1]);
  EXPECT_TRUE(std::equal(part.begin(), part.end(), big.begin() + 1000));
}

TEST_F(CudaUpload, MappedSafetensorsFileWithAndWithoutPread) {
  TempDir tmp;
  // Odd sizes back to back: some tensors start misaligned for their dtype, so the reader
  // returns heap copies for those and views into the mapping for the rest.
  std::vector<std::pair<std::string, Tensor>> ts;
  const std::vector<std::pair<DType, Shape>> spec = {
      {DType::U8, {3}},  {DType::F32, {1000, 1001}},  {DType::BF16, {7}},
      {DType::F16, {0}}, {DType::BF16, {4096, 4099}}, {DType::U8, {9000001}},
      {DType::F32, {5}}, {DType::I64, {333}},         {DType::BF16, {12345678}},
  };
  for (size_t i = 0; i < spec.size(); ++i) {
    Tensor t = Tensor::zeros(spec[i].first, spec[i].second);
    fill(static_cast<uint8_t*>(t.data), t.nbytes(), 100 + i);
    ts.push_back({"t" + std::to_string(i), t});
  }
  write_safetensors(tmp / "w.safetensors", ts);
  ts.clear();
  for (const char* pread : {"1", "0"}) {
    setenv("KILN_UPLOAD_PREAD", pread, 1);
    std::vector<Tensor> dev;
    std::vector<DType> dts;
    std::vector<Shape> shapes;
    {
      auto file = SafetensorsFile::open(tmp / "w.safetensors");
      std::vector<Tensor> host;
      for (size_t i = spec.size(); i-- > 0;) host.push_back(file->get("t" + std::to_string(i)));
      std::vector<const Tensor*> ptrs;
      for (const Tensor& t : host)
        ptrs.push_back(&t), dts.push_back(t.dtype), shapes.push_back(t.shape);
      dev = cuda::upload_all(ptrs, s);
    }  // the mapping is gone
    check_layout(dev, dts, shapes);
    for (size_t j = 0; j < dev.size(); ++j) {
      const size_t i = spec.size() - 1 - j;
      EXPECT_TRUE(download(dev[j]) == expected(dev[j].nbytes(), 100 + i))
          << "tensor " << i << " pread " << pread;
    }
  }
}

TEST_F(CudaUpload, EmptyAndZeroSizedInputs) {
  EXPECT_TRUE(cuda::upload_all({}, s).empty());
  Tensor a = Tensor::zeros(DType::F32, {0}), b = Tensor::zeros(DType::BF16, {4, 0});
  std::vector<Tensor> dev = cuda::upload_all({&a, &b}, s);
  check_layout(dev, {DType::F32, DType::BF16}, {{0}, {4, 0}});
}

TEST_F(CudaUpload, RejectsDeviceTensors) {
  Tensor a = Tensor::zeros(DType::F32, {4});
  std::vector<Tensor> dev = cuda::upload_all({&a}, s);
  const Tensor* p = &dev[0];
  EXPECT_THROW(cuda::upload_all({&a, p}, s), Error);
  EXPECT_THROW(cuda::upload_all({nullptr}, s), Error);
}

#else

TEST(CudaUpload, NeedsCuda) {
  GTEST_SKIP() << "built without CUDA";
}

#endif

}  // namespace
}  // namespace kiln::test
