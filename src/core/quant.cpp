#include "core/quant.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace kiln {

WeightQuant parse_weight_quant(std::string_view s) {
  if (s == "none") return WeightQuant::None;
  if (s == "int8-wo") return WeightQuant::Int8;
  throw Error(cat("unknown quantization '", s, "' (expected none or int8-wo)"));
}

std::string_view weight_quant_name(WeightQuant q) {
  switch (q) {
    case WeightQuant::None:
      return "none";
    case WeightQuant::Int8:
      return "int8-wo";
  }
  return "?";
}

DType quant_storage(WeightQuant q) {
  KILN_CHECK(q == WeightQuant::Int8, "quant_storage: no storage type for ", weight_quant_name(q));
  return DType::I8;
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
