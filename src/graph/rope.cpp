#include "graph/rope.h"

#include <algorithm>
#include <cmath>

namespace kiln {

std::vector<double> rope_inv_freq(const RopeConfig& r, int64_t dim, int64_t max_pos,
                                  int64_t seq_len, double* attention_factor) {
  const int64_t half = dim / 2;
  double base = r.theta;
  *attention_factor = 1.0;
  if (r.type == RopeType::Dynamic && seq_len > max_pos) {
    base *= std::pow(r.factor * double(seq_len) / double(max_pos) - (r.factor - 1.0),
                     double(dim) / double(dim - 2));
  }
  std::vector<double> inv(static_cast<size_t>(half));
  // transformers computes the exponents in float32; rounding them the same way keeps the
  // tables within an ulp of the reference.
  for (int64_t i = 0; i < half; ++i)
    inv[size_t(i)] = 1.0 / std::pow(base, double(float(2 * i) / float(dim)));

  switch (r.type) {
    case RopeType::None:
    case RopeType::Default:
    case RopeType::Dynamic:
      break;
    case RopeType::Linear:
      for (auto& f : inv) f /= r.factor;
      break;
    case RopeType::Llama3: {
      const double old = double(r.original_max_position_embeddings);
      const double low_wl = old / r.low_freq_factor, high_wl = old / r.high_freq_factor;
      for (auto& f : inv) {
        const double wl = 2 * M_PI / f;
        if (wl > low_wl) {
          f /= r.factor;
        } else if (wl >= high_wl) {
          const double s =
              (old / wl - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
          f = (1 - s) * f / r.factor + s * f;
        }
      }
      break;
    }
    case RopeType::Yarn: {
      double factor = r.factor;
      double orig =
          double(r.original_max_position_embeddings ? r.original_max_position_embeddings : max_pos);
      if (r.original_max_position_embeddings && r.original_max_position_embeddings != max_pos)
        factor = double(max_pos) / orig;
      auto mscale = [](double s, double m) { return s <= 1 ? 1.0 : 0.1 * m * std::log(s) + 1.0; };
      if (r.attention_factor)
        *attention_factor = *r.attention_factor;
      else if (r.mscale && r.mscale_all_dim)
        *attention_factor = mscale(factor, *r.mscale) / mscale(factor, *r.mscale_all_dim);
      else
        *attention_factor = mscale(factor, 1.0);
      auto corr = [&](double rot) {
        return double(dim) * std::log(orig / (rot * 2 * M_PI)) / (2 * std::log(r.theta));
      };
      double low = corr(r.beta_fast), high = corr(r.beta_slow);
      if (r.truncate) low = std::floor(low), high = std::ceil(high);
      low = std::max(low, 0.0);
      high = std::min(high, double(dim - 1));
      if (low == high) high += 0.001;
      for (int64_t i = 0; i < half; ++i) {
        const double ramp = std::clamp((double(i) - low) / (high - low), 0.0, 1.0);
        const double extrap_w = 1 - ramp;
        const double f = inv[size_t(i)];
        inv[size_t(i)] = f / factor * (1 - extrap_w) + f * extrap_w;
      }
      break;
    }
    case RopeType::LongRope: {
      const double orig = double(r.original_max_position_embeddings);
      const double factor = double(max_pos) / orig;
      if (r.attention_factor)
        *attention_factor = *r.attention_factor;
      else
        *attention_factor = factor <= 1 ? 1.0 : std::sqrt(1 + std::log(factor) / std::log(orig));
      const auto& ext = seq_len > int64_t(orig) ? r.long_factor : r.short_factor;
      for (int64_t i = 0; i < half && size_t(i) < ext.size(); ++i) inv[size_t(i)] /= ext[size_t(i)];
      break;
    }
  }
  return inv;
}

void rope_tables(const RopeConfig& r, int64_t dim, int64_t max_pos, const int32_t* pos, int64_t n,
                 float* cos, float* sin) {
  int64_t seq_len = 0;
  for (int64_t i = 0; i < n; ++i) seq_len = std::max<int64_t>(seq_len, pos[i] + 1);
  double af = 1;
  const std::vector<double> inv = rope_inv_freq(r, dim, max_pos, seq_len, &af);
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < half; ++k) {
      // Angles are formed in float32 as transformers does (inv_freq.float() @ positions).
      const float ang = float(inv[size_t(k)]) * float(pos[i]);
      cos[i * half + k] = float(std::cos(double(ang)) * af);
      sin[i * half + k] = float(std::sin(double(ang)) * af);
    }
}

}  // namespace kiln
