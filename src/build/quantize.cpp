#include "build/quantize.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <memory>

#include "core/error.h"

namespace kiln {

namespace {

// Rows of F32 source converted per pass (bounds the staging buffer whatever the chunk asked for).
constexpr size_t kStageBytes = size_t(16) << 20;

// One quantized weight: its F32 source plan and the scales (and zeros) of the rows quantized so
// far, so the ".scale" / ".zero" tensors written after it do not convert the source again.
struct Quantizer {
  PlannedTensor src;
  WeightQuant q = WeightQuant::None;
  int64_t rows = 0, cols = 0, group = 0, groups = 1;  // groups per row (1: per channel)
  std::vector<float> scales;
  std::vector<uint8_t> zeros;
  std::vector<uint8_t> have;  // row r's scales are known

  size_t code_bytes() const { return size_t(q == WeightQuant::Int4 ? cols / 2 : cols); }
  // The per-row factors live only while this weight is being written (allocated on first use,
  // freed by free()), so a build holds one weight's scales, not the whole model's.
  void init() {
    if (!have.empty()) return;
    scales.assign(size_t(rows * groups), 0.0f);
    if (q == WeightQuant::Int4) zeros.assign(size_t(rows * groups), 0);
    have.assign(size_t(rows), 0);
  }
  void free() {
    std::vector<float>().swap(scales);
    std::vector<uint8_t>().swap(zeros);
    std::vector<uint8_t>().swap(have);
  }

  // Quantizes rows [row0, row0 + n): codes (may be null) gets their codes, scales[] / zeros[]
  // their factors.
  void run(int64_t row0, int64_t n, uint8_t* codes) {
    init();
    const int64_t step = std::max<int64_t>(
        1, int64_t(kStageBytes / (sizeof(float) * size_t(std::max<int64_t>(cols, 1)))));
    std::vector<float> stage(size_t(std::min(step, n) * cols));
    std::vector<uint8_t> tmp(codes ? 0 : size_t(std::min(step, n)) * code_bytes());
    for (int64_t a = row0; a < row0 + n; a += step) {
      const int64_t m = std::min(step, row0 + n - a);
      src.fill(a, m, stage.data());
      uint8_t* out = codes ? codes + size_t(a - row0) * code_bytes() : tmp.data();
      std::atomic<int64_t> bad{-1};
#pragma omp parallel for schedule(static)
      for (int64_t r = 0; r < m; ++r) {
        const float* w = stage.data() + r * cols;
        uint8_t* o = out + size_t(r) * code_bytes();
        const size_t at = size_t(a + r) * size_t(groups);
        const bool ok = q == WeightQuant::Int8
                            ? quantize_int8_row(w, cols, reinterpret_cast<int8_t*>(o), &scales[at])
                        : q == WeightQuant::Fp8
                            ? quantize_fp8_row(w, cols, o, &scales[at])
                            : quantize_int4_row(w, cols, group, o, &scales[at], &zeros[at]);
        if (!ok) {
          int64_t none = -1;
          bad.compare_exchange_strong(none, a + r);
        }
      }
      KILN_CHECK(bad.load() < 0, src.name, ": row ", bad.load(),
                 " holds a non-finite value; cannot quantize it");
      std::fill(have.begin() + a, have.begin() + a + m, uint8_t{1});
    }
  }
  // Makes sure rows [row0, row0 + n) have their scales: rows whose codes were not written first
  // (any other write order) are quantized again just for them.
  void ensure(int64_t row0, int64_t n) {
    init();
    for (int64_t r = row0; r < row0 + n;) {
      if (have[size_t(r)]) {
        ++r;
        continue;
      }
      int64_t e = r;
      while (e < row0 + n && !have[size_t(e)]) ++e;
      run(r, e - r, nullptr);
      r = e;
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
    // Unquantized weights, scales and zeros, and codes repacked from a quantized checkpoint.
    if (s.quant == WeightQuant::None || pt.dtype == quant_storage(s.quant)) {
      out.push_back(std::move(pt));
      continue;
    }
    KILN_CHECK(pt.dtype == DType::F32 && pt.shape.size() == 2, "quantize_plan: ", pt.name,
               " must be planned as a 2-D F32 matrix");
    auto qz = std::make_shared<Quantizer>();
    qz->q = s.quant;
    qz->rows = pt.shape[0];
    qz->cols = pt.shape[1];
    if (s.quant == WeightQuant::Int4) {
      // The layout's scale slot [rows, groups] says the group size.
      const auto sit = spec.find(pt.name + ".scale");
      KILN_CHECK(sit != spec.end() && sit->second->shape.size() == 2, "quantize_plan: ", pt.name,
                 " has no int4 scale slot");
      qz->groups = sit->second->shape[1];
      qz->group = qz->cols / qz->groups;
    }
    PlannedTensor codes;
    codes.name = pt.name;
    codes.dtype = quant_storage(s.quant);
    codes.shape = s.shape;  // the stored codes' shape
    codes.fill = [qz](int64_t row0, int64_t n, void* dst) {
      qz->run(row0, n, static_cast<uint8_t*>(dst));
    };
    PlannedTensor sc;
    sc.name = pt.name + ".scale";
    sc.dtype = DType::F32;
    sc.shape = s.quant == WeightQuant::Int4 ? Shape{qz->rows, qz->groups} : Shape{qz->rows};
    sc.fill = [qz](int64_t row0, int64_t n, void* dst) {
      qz->ensure(row0, n);
      std::copy_n(qz->scales.begin() + row0 * qz->groups, n * qz->groups, static_cast<float*>(dst));
    };
    // The last of the weight's tensors lets go of the source pages and of the factors.
    const std::function<void()> release = [qz, src_release = pt.release] {
      if (src_release) src_release();
      qz->free();
    };
    qz->src = std::move(pt);
    out.push_back(std::move(codes));
    if (s.quant == WeightQuant::Int4) {
      out.push_back(std::move(sc));
      PlannedTensor z;
      z.name = qz->src.name + ".zero";
      z.dtype = DType::U8;
      z.shape = {qz->rows, qz->groups};
      z.fill = [qz](int64_t row0, int64_t n, void* dst) {
        qz->ensure(row0, n);
        std::copy_n(qz->zeros.begin() + row0 * qz->groups, n * qz->groups,
                    static_cast<uint8_t*>(dst));
      };
      z.release = release;
      out.push_back(std::move(z));
    } else {
      sc.release = release;
      out.push_back(std::move(sc));
    }
  }
  return out;
}

std::vector<std::pair<std::string, Tensor>> attach_scales(
    std::vector<std::pair<std::string, Tensor>> w, WeightQuant q) {
  std::map<std::string, size_t> index;
  for (size_t i = 0; i < w.size(); ++i) index[w[i].first] = i;
  // The tensors that travel with a quantized weight, by suffix.
  static constexpr std::pair<const char*, std::shared_ptr<Tensor> Tensor::*> kSlots[] = {
      {".scale", &Tensor::scales}, {".zero", &Tensor::zero_points}, {".perm", &Tensor::input_perm}};
  const auto slot = [](const std::string& name)
      -> const std::pair<const char*, std::shared_ptr<Tensor> Tensor::*>* {
    for (const auto& s : kSlots)
      if (name.ends_with(s.first)) return &s;
    return nullptr;
  };
  for (auto& [name, t] : w) {
    const auto* s = slot(name);
    if (!s) continue;
    const std::string base = name.substr(0, name.size() - std::strlen(s->first));
    auto it = index.find(base);
    KILN_CHECK(it != index.end() && q != WeightQuant::None, name, ": ", s->first + 1,
               " of a weight that is not there");
    Tensor& wt = w[it->second].second;
    wt.*(s->second) = std::make_shared<Tensor>(t);
    wt.quant = q;
  }
  std::vector<std::pair<std::string, Tensor>> out;
  for (auto& [name, t] : w) {
    if (slot(name)) continue;
    if (t.input_perm) {  // linear() gathers inputs through it: it must be a permutation
      const Tensor& p = *t.input_perm;
      const int64_t in = t.in_features();
      std::vector<bool> seen(static_cast<size_t>(in), false);
      bool ok = p.dtype == DType::I32 && p.numel() == in;
      for (int64_t j = 0; ok && j < in; ++j) {
        const int32_t v = p.ptr<int32_t>()[j];
        ok = v >= 0 && v < in && !seen[size_t(v)];
        if (ok) seen[size_t(v)] = true;
      }
      KILN_CHECK(ok, name, ".perm: not a permutation of the ", in, " inputs");
    }
    out.push_back({name, std::move(t)});
  }
  return out;
}

}  // namespace kiln
