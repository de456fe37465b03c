#include "core/quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/error.h"

namespace kiln {

WeightQuant parse_weight_quant(std::string_view s) {
  if (s == "none") return WeightQuant::None;
  if (s == "int8-wo") return WeightQuant::Int8;
  if (s == "int4-wo") return WeightQuant::Int4;
  if (s == "fp8") return WeightQuant::Fp8;
  throw Error(
      cat("unknown quantization '", s, "' (expected none, int8-wo, int4-wo, int4-awq or fp8)"));
}

std::string_view weight_quant_name(WeightQuant q) {
  switch (q) {
    case WeightQuant::None:
      return "none";
    case WeightQuant::Int8:
      return "int8-wo";
    case WeightQuant::Int4:
      return "int4-wo";
    case WeightQuant::Fp8:
      return "fp8";
  }
  return "?";
}

DType quant_storage(WeightQuant q) {
  KILN_CHECK(q != WeightQuant::None, "quant_storage: no storage type for ", weight_quant_name(q));
  if (q == WeightQuant::Fp8) return DType::F8_E4M3;
  return q == WeightQuant::Int8 ? DType::I8 : DType::U8;
}

namespace {
// max |w| over a row; false when the row holds a non-finite value.
bool row_amax(const float* w, int64_t cols, float* amax) {
  bool finite = true;
  float m = 0.0f;
  for (int64_t c = 0; c < cols; ++c) {
    finite &= std::isfinite(w[c]);
    m = std::max(m, std::fabs(w[c]));
  }
  *amax = m;
  return finite;
}
}  // namespace

int64_t int4_group(int64_t cols) {
  for (int64_t g : {128, 64, 32})
    if (cols % g == 0) return g;
  return 0;
}

bool quantize_int4_row(const float* w, int64_t cols, int64_t group, uint8_t* q, float* scales,
                       uint8_t* zeros) {
  std::fill(q, q + cols / 2, uint8_t{0});
  for (int64_t g0 = 0; g0 < cols; g0 += group) {
    float lo = 0.0f, hi = 0.0f;  // the range always holds 0, so a zero weight stays exact
    for (int64_t c = g0; c < g0 + group; ++c) {
      if (!std::isfinite(w[c])) return false;
      lo = std::min(lo, w[c]);
      hi = std::max(hi, w[c]);
    }
    const float s = (hi - lo) / 15.0f;
    const int64_t gi = g0 / group;
    scales[gi] = s;
    const float z = s > 0.0f ? std::clamp(std::nearbyint(-lo / s), 0.0f, 15.0f) : 0.0f;
    zeros[gi] = uint8_t(z);
    for (int64_t c = g0; c < g0 + group; ++c) {
      const float code = s > 0.0f ? std::clamp(std::nearbyint(w[c] / s) + z, 0.0f, 15.0f) : 0.0f;
      q[c / 2] |= uint8_t(uint8_t(code) << (4 * (c % 2)));
    }
  }
  return true;
}

bool quantize_int8_row(const float* w, int64_t cols, int8_t* q, float* scale) {
  float amax = 0.0f;
  if (!row_amax(w, cols, &amax)) return false;
  const float s = amax / 127.0f;
  *scale = s;
  if (s == 0.0f) {
    std::fill(q, q + cols, int8_t{0});
    return true;
  }
  // Divide (not multiply by 127 / amax): q is then the nearest integer to w / scale, the value
  // the dequantized weight is compared with. The clamp only guards rounding at +-amax.
  for (int64_t c = 0; c < cols; ++c)
    q[c] = int8_t(std::clamp(std::nearbyint(w[c] / s), -127.0f, 127.0f));
  return true;
}

uint8_t f32_to_e4m3(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint8_t sign = uint8_t((u >> 24) & 0x80);
  const uint32_t ax = u & 0x7fffffffu;
  if (ax > 0x7f800000u) return 0x7f;           // NaN
  if (ax > 0x43e00000u) return sign | 0x7e;    // above 448 (inf included): saturate
  if (ax < 0x3c800000u) {                      // below 2^-6: subnormal codes, steps of 2^-9
    const float a = std::fabs(f) * 512.0f;     // exact (a power of two), < 8
    return sign | uint8_t(std::nearbyint(a));  // 8 is the smallest normal's code: still right
  }
  // Normal: keep 3 of the 23 mantissa bits, rounding to nearest even; a carry moves into the
  // exponent. Rebias 127 -> 7 (120 << 3 in code units).
  uint32_t r = ax >> 20;
  const uint32_t rem = ax & 0xfffffu;
  if (rem > 0x80000u || (rem == 0x80000u && (r & 1))) ++r;
  r -= 120u << 3;
  return sign | uint8_t(r);  // at most 0x7e: 448 and below never round past 448
}

namespace {
struct E4M3Table {
  float v[256];
  E4M3Table() {
    for (int i = 0; i < 256; ++i) {
      const int e = (i >> 3) & 15, m = i & 7;
      float a = e == 0 ? std::ldexp(float(m), -9) : std::ldexp(float(8 + m), e - 10);
      if (e == 15 && m == 7) a = std::numeric_limits<float>::quiet_NaN();
      v[i] = (i & 0x80) ? -a : a;
    }
  }
};
const E4M3Table kE4M3;
}  // namespace

float e4m3_to_f32(uint8_t v) {
  return kE4M3.v[v];
}

bool quantize_fp8_row(const float* w, int64_t cols, uint8_t* q, float* scale) {
  float amax = 0.0f;
  if (!row_amax(w, cols, &amax)) return false;
  // Multiply by the reciprocal, computed once, as the GPU kernels do (one division per row, not
  // per element); both give the same codes. Rows below kFp8TinyRow quantize to zeros: their
  // reciprocal would overflow.
  if (amax < kFp8TinyRow) {
    *scale = 0.0f;
    std::fill(q, q + cols, uint8_t{0});
    return true;
  }
  *scale = amax / kE4M3Max;
  const float inv = kE4M3Max / amax;
  for (int64_t c = 0; c < cols; ++c) q[c] = f32_to_e4m3(w[c] * inv);
  return true;
}

}  // namespace kiln
