// Float arithmetic that gives bit-identical results on the host (g++) and on CUDA devices, so a
// CPU reference and a kernel built from the same source agree exactly.
//
// Why not expf / a * b + c: libm's and CUDA's expf round differently, and nvcc contracts
// a * b + c into one FMA by default (g++ does under -ffp-contract=fast), which changes the
// rounding of the sum. Everything here is built from single correctly rounded operations: an
// explicit fused multiply-add where a product feeds a sum, and otherwise plain operations that
// have no product-feeding-sum shape for a compiler to contract. On the device the *_rn
// intrinsics also pin the rounding against --use_fast_math.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define KILN_HD __host__ __device__ __forceinline__
#else
#define KILN_HD inline
#endif

namespace kiln {

KILN_HD float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

KILN_HD uint32_t float_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

KILN_HD float fma_rn(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, c);
#else
  return std::fmaf(a, b, c);
#endif
}

KILN_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

KILN_HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

KILN_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

KILN_HD float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

KILN_HD double dmul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// e^x, within 2 ulp of the true value for results of normal range; 0 for x <= -86 (results
// below ~2^-124, so no subnormal is ever produced), -inf and NaN; +inf above ~88.72. The same
// bits on host and device.
KILN_HD float kiln_expf(float x) {
  if (!(x > -86.0f)) return 0.0f;
  if (x > 88.72283f) return bits_float(0x7f800000u);
  // n = round(x / ln 2) by the 1.5 * 2^23 shifter: one rounding inside the FMA, and the
  // integer read from the sum's low mantissa bits (no float-to-int conversion to disagree on).
  constexpr float kShifter = 12582912.0f;
  const float j = fma_rn(x, 1.44269504f, kShifter);
  const int32_t n = int32_t(float_bits(j)) - int32_t(float_bits(kShifter));
  const float fn = sub_rn(j, kShifter);
  // r = x - n ln 2 in two steps (Cody-Waite; the high part has few bits, so n * hi is exact).
  float r = fma_rn(-fn, 0.693359375f, x);
  r = fma_rn(-fn, -2.12194440e-4f, r);
  // e^r = 1 + r + r^2 P(r) on |r| <= ln2 / 2 (Cephes expf coefficients).
  float p = 1.9875691500e-4f;
  p = fma_rn(p, r, 1.3981999507e-3f);
  p = fma_rn(p, r, 8.3334519073e-3f);
  p = fma_rn(p, r, 4.1665795894e-2f);
  p = fma_rn(p, r, 1.6666665459e-1f);
  p = fma_rn(p, r, 5.0000001201e-1f);
  const float y = add_rn(fma_rn(p, mul_rn(r, r), r), 1.0f);
  // y * 2^n in two exact power-of-two steps: n reaches 128, past a single float's exponent.
  const int32_t h = n / 2;
  const float s1 = bits_float(uint32_t(h + 127) << 23);
  const float s2 = bits_float(uint32_t(n - h + 127) << 23);
  return mul_rn(mul_rn(y, s1), s2);
}

}  // namespace kiln
