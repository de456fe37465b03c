#include "build/quantize.h"

#include <algorithm>
#include <atomic>
#include <map>
#include <memory>

#include "core/error.h"

namespace kiln {

namespace {

// Rows of F32 source converted per pass (bounds the staging buffer whatever the chunk asked for).
constexpr size_t kStageBytes = size_t(16) << 20;

// One quantized weight: its F32 source plan and the scales of the rows quantized so far, so the
// ".scale" tensor written after it does not convert the source a second time.
struct Quantizer {
  PlannedTensor src;
  int64_t rows = 0, cols = 0;
  std::vector<float> scales;
  std::vector<uint8_t> have;  // row r's scale is known

  // Quantizes rows [row0, row0 + n): q (may be null) gets the int8 rows, scales[] the scales.
  void run(int64_t row0, int64_t n, int8_t* q) {
    const int64_t step = std::max<int64_t>(
        1, int64_t(kStageBytes / (sizeof(float) * size_t(std::max<int64_t>(cols, 1)))));
    std::vector<float> stage(size_t(std::min(step, n) * cols));
    std::vector<int8_t> tmp(q ? 0 : size_t(std::min(step, n) * cols));
    for (int64_t a = row0; a < row0 + n; a += step) {
      const int64_t m = std::min(step, row0 + n - a);
      src.fill(a, m, stage.data());
      int8_t* out = q ? q + (a - row0) * cols : tmp.data();
      std::atomic<int64_t> bad{-1};
#pragma omp parallel for schedule(static)
      for (int64_t r = 0; r < m; ++r) {
        float s = 0.0f;
        if (!quantize_int8_row(stage.data() + r * cols, cols, out + r * cols, &s)) {
          int64_t none = -1;
          bad.compare_exchange_strong(none, a + r);
        }
        scales[size_t(a + r)] = s;
      }
      KILN_CHECK(bad.load() < 0, src.name, ": row ", bad.load(),
                 " holds a non-finite value; cannot quantize it");
      std::fill(have.begin() + a, have.begin() + a + m, uint8_t{1});
    }
  }
};

}  // namespace

WeightPlan quantize_plan(WeightPlan plan, const std::vector<WeightSpec>& layout) {
  std::map<std::string, const WeightSpec*> spec;
  for (const auto& s : layout) spec[s.name] = &s;
  WeightPlan out;
  for (PlannedTensor& pt : plan) {
    auto it = spec.find(pt.name);
    KILN_CHECK(it != spec.end(), "quantize_plan: ", pt.name, " is not in the engine layout");
    const WeightSpec& s = *it->second;
    if (s.quant == WeightQuant::None) {
      out.push_back(std::move(pt));
      continue;
    }
    KILN_CHECK(s.quant == WeightQuant::Int8 && pt.dtype == DType::F32 && pt.shape.size() == 2,
               "quantize_plan: ", pt.name, " must be planned as a 2-D F32 matrix");
    auto qz = std::make_shared<Quantizer>();
    qz->rows = pt.shape[0];
    qz->cols = pt.shape[1];
    qz->scales.assign(size_t(qz->rows), 0.0f);
    qz->have.assign(size_t(qz->rows), 0);
    PlannedTensor q;
    q.name = pt.name;
    q.dtype = quant_storage(s.quant);
    q.shape = pt.shape;
    q.fill = [qz](int64_t row0, int64_t n, void* dst) {
      qz->run(row0, n, static_cast<int8_t*>(dst));
    };
    PlannedTensor sc;
    sc.name = pt.name + ".scale";
    sc.dtype = DType::F32;
    sc.shape = {qz->rows};
    sc.fill = [qz](int64_t row0, int64_t n, void* dst) {
      // Rows whose weight chunk was not written first (any other write order) are quantized
      // again just for their scales.
      for (int64_t r = row0; r < row0 + n;) {
        if (qz->have[size_t(r)]) {
          ++r;
          continue;
        }
        int64_t e = r;
        while (e < row0 + n && !qz->have[size_t(e)]) ++e;
        qz->run(r, e - r, nullptr);
        r = e;
      }
      std::copy_n(qz->scales.begin() + row0, n, static_cast<float*>(dst));
    };
    sc.release = pt.release;
    qz->src = std::move(pt);
    out.push_back(std::move(q));
    out.push_back(std::move(sc));
  }
  return out;
}

std::vector<std::pair<std::string, Tensor>> attach_scales(
    std::vector<std::pair<std::string, Tensor>> w) {
  std::map<std::string, size_t> index;
  for (size_t i = 0; i < w.size(); ++i) index[w[i].first] = i;
  std::vector<std::pair<std::string, Tensor>> out;
  for (auto& [name, t] : w) {
    if (!name.ends_with(".scale")) continue;
    const std::string base = name.substr(0, name.size() - 6);
    auto it = index.find(base);
    KILN_CHECK(it != index.end(), name, ": scales of a weight that is not there");
    w[it->second].second.scales = std::make_shared<Tensor>(t);
  }
  for (auto& [name, t] : w)
    if (!name.ends_with(".scale")) out.push_back({name, std::move(t)});
  return out;
}

}  // namespace kiln
