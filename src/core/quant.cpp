#include "core/quant.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace kiln {

WeightQuant parse_weight_quant(std::string_view s) {
  if (s == "none") return WeightQuant::None;
  if (s == "int8-wo") return WeightQuant::Int8;
  if (s == "int4-wo") return WeightQuant::Int4;
  throw Error(cat("unknown quantization '", s, "' (expected none, int8-wo or int4-wo)"));
}

std::string_view weight_quant_name(WeightQuant q) {
  switch (q) {
    case WeightQuant::None:
      return "none";
    case WeightQuant::Int8:
      return "int8-wo";
    case WeightQuant::Int4:
      return "int4-wo";
  }
  return "?";
}

DType quant_storage(WeightQuant q) {
  KILN_CHECK(q != WeightQuant::None, "quant_storage: no storage type for ", weight_quant_name(q));
  return q == WeightQuant::Int8 ? DType::I8 : DType::U8;
}

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
  bool finite = true;
  for (int64_t c = 0; c < cols; ++c) {
    finite &= std::isfinite(w[c]);
    amax = std::max(amax, std::fabs(w[c]));
  }
  if (!finite) return false;
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

}  // namespace kiln
