#include "core/dtype.h"

#include <cmath>
#include <limits>

#include "core/error.h"

namespace kiln {

namespace {
struct Info {
  DType t;
  const char* name;
  size_t size;
};
constexpr Info kInfo[] = {
    {DType::F32, "F32", 4},         {DType::F16, "F16", 2},         {DType::BF16, "BF16", 2},
    {DType::F8_E4M3, "F8_E4M3", 1}, {DType::F8_E5M2, "F8_E5M2", 1}, {DType::I8, "I8", 1},
    {DType::U8, "U8", 1},           {DType::I16, "I16", 2},         {DType::I32, "I32", 4},
    {DType::I64, "I64", 8},         {DType::BOOL, "BOOL", 1}};

float f8_to_f32(uint8_t v, int exp_bits, int man_bits, bool e4m3) {
  int bias = (1 << (exp_bits - 1)) - 1;
  int sign = v >> 7, exp = (v >> man_bits) & ((1 << exp_bits) - 1), man = v & ((1 << man_bits) - 1);
  float r;
  if (e4m3 && exp == 15 && man == 7) return std::numeric_limits<float>::quiet_NaN();
  if (!e4m3 && exp == 31)
    return man ? std::numeric_limits<float>::quiet_NaN()
               : (sign ? -1.f : 1.f) * std::numeric_limits<float>::infinity();
  if (exp == 0)
    r = std::ldexp(float(man), 1 - bias - man_bits);
  else
    r = std::ldexp(float(man | (1 << man_bits)), exp - bias - man_bits);
  return sign ? -r : r;
}
}  // namespace

size_t dtype_size(DType t) {
  return kInfo[int(t)].size;
}
std::string_view dtype_name(DType t) {
  return kInfo[int(t)].name;
}

bool parse_dtype(std::string_view name, DType* out) {
  for (const auto& i : kInfo)
    if (name == i.name) {
      *out = i.t;
      return true;
    }
  return false;
}

DType parse_float_dtype(std::string_view name, std::string_view what) {
  if (name == "f32" || name == "float32" || name == "F32") return DType::F32;
  if (name == "f16" || name == "float16" || name == "half" || name == "F16") return DType::F16;
  if (name == "bf16" || name == "bfloat16" || name == "BF16") return DType::BF16;
  throw Error(cat(what, ": unsupported dtype '", name, "' (expected f32, f16 or bf16)"));
}

bool is_float(DType t) {
  return t == DType::F32 || t == DType::F16 || t == DType::BF16 || t == DType::F8_E4M3 ||
         t == DType::F8_E5M2;
}

void to_f32(DType from, const void* src, float* dst, size_t n) {
  switch (from) {
    case DType::F32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::F16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
      return;
    }
    case DType::BF16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
      return;
    }
    case DType::F8_E4M3:
    case DType::F8_E5M2: {
      const auto* s = static_cast<const uint8_t*>(src);
      bool e4 = from == DType::F8_E4M3;
      for (size_t i = 0; i < n; ++i) dst[i] = f8_to_f32(s[i], e4 ? 4 : 5, e4 ? 3 : 2, e4);
      return;
    }
    default:
      throw Error(cat("cannot convert ", dtype_name(from), " to F32"));
  }
}

void from_f32(DType to, const float* src, void* dst, size_t n) {
  switch (to) {
    case DType::F32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::F16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = f32_to_f16(src[i]);
      return;
    }
    case DType::BF16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
      return;
    }
    default:
      throw Error(cat("cannot convert F32 to ", dtype_name(to)));
  }
}

}  // namespace kiln
