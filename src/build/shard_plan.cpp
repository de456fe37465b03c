#include "build/shard_plan.h"

#include <cstring>
#include <map>
#include <memory>

#include "core/error.h"

namespace kiln {

WeightPlan shard_plan(const WeightPlan& plan, const ModelConfig& c, const QuantScheme& q,
                      const Shard& s) {
  std::map<std::string, const PlannedTensor*> src;
  for (const PlannedTensor& pt : plan) src[pt.name] = &pt;
  std::map<std::string, WeightSpec> whole;
  for (const WeightSpec& w : engine_layout(c, q)) whole[w.name] = w;
  WeightPlan out;
  for (const WeightSpec& r : sharded_layout(c, q, s)) {
    auto it = src.find(r.name);
    KILN_CHECK(it != src.end(), "shard: the plan has no '", r.name, "'");
    const PlannedTensor& from = *it->second;
    const WeightSpec& w = whole.at(r.name);
    KILN_CHECK(from.shape == w.shape, "shard: ", r.name, " is ", shape_str(from.shape),
               " in the plan but ", shape_str(w.shape), " in the layout");
    PlannedTensor pt;
    pt.name = r.name;
    pt.dtype = from.dtype;
    pt.shape = r.shape;
    pt.release = from.release;
    const TpSplit& sp = w.split;
    const size_t row_bytes = from.row_bytes();
    if (sp.rank0 && s.tp_rank != 0) {  // a bias added once: zeros on the other ranks
      pt.fill = [row_bytes](int64_t, int64_t n, void* dst) {
        std::memset(dst, 0, size_t(n) * row_bytes);
      };
    } else if (sp.axis == TpSplit::Axis::None || s.tp == 1 || r.shape == w.shape) {
      pt.fill = from.fill;
      pt.view = from.view;
    } else if (sp.axis == TpSplit::Axis::Rows) {
      int64_t total = 0;
      auto ranges = std::make_shared<std::vector<std::pair<int64_t, int64_t>>>(
          tp_ranges(sp, w.shape[0], s.tp_rank, s.tp, total, r.name));
      const auto fill = from.fill;
      // Output row k is source row ranges[i].first + (k - start of range i); rows past the
      // ranges (the padded vocabulary) are zeros.
      pt.fill = [ranges, fill, row_bytes](int64_t row0, int64_t n, void* dst) {
        char* d = static_cast<char*>(dst);
        int64_t at = 0;  // output row where the current range starts
        for (const auto& [start, len] : *ranges) {
          const int64_t a = std::max(row0, at), b = std::min(row0 + n, at + len);
          if (a < b) fill(start + (a - at), b - a, d + size_t(a - row0) * row_bytes);
          at += len;
        }
        if (row0 + n > at) {
          const int64_t a = std::max(row0, at);
          std::memset(d + size_t(a - row0) * row_bytes, 0, size_t(row0 + n - a) * row_bytes);
        }
      };
    } else {
      // By input features: `in` of the weight (or of the weight this slot scales) maps onto the
      // stored columns (int4 codes: two a byte; group scales: one a group).
      const size_t dot = r.name.rfind('.');
      const bool slot = w.role == WeightRole::Scale || w.role == WeightRole::Zero;
      const WeightSpec& parent = slot ? whole.at(r.name.substr(0, dot)) : w;
      const int64_t in = parent.quant == WeightQuant::Int4 ? 2 * parent.shape[1] : parent.shape[1];
      const int64_t cols = w.shape[1], ocols = r.shape[1];
      const size_t es = dtype_size(from.dtype);
      int64_t total = 0;
      auto ranges = std::make_shared<std::vector<std::pair<int64_t, int64_t>>>();
      for (const auto& [start, len] : tp_ranges(sp, in, s.tp_rank, s.tp, total, r.name))
        ranges->push_back({start * cols / in, len * cols / in});
      const auto fill = from.fill;
      pt.fill = [ranges, fill, cols, ocols, es](int64_t row0, int64_t n, void* dst) {
        // Whole source rows a bounded batch at a time (at most 64 MiB beside the output).
        const int64_t batch =
            std::max<int64_t>(1, (int64_t(64) << 20) / int64_t(size_t(cols) * es));
        std::vector<char> whole_rows(size_t(std::min(n, batch) * cols) * es);
        for (int64_t b0 = 0; b0 < n; b0 += batch) {
          const int64_t m = std::min(batch, n - b0);
          fill(row0 + b0, m, whole_rows.data());
          for (int64_t i = 0; i < m; ++i) {
            char* d = static_cast<char*>(dst) + size_t((b0 + i) * ocols) * es;
            for (const auto& [start, len] : *ranges) {
              std::memcpy(d, whole_rows.data() + size_t(i * cols + start) * es, size_t(len) * es);
              d += size_t(len) * es;
            }
          }
        }
      };
    }
    out.push_back(std::move(pt));
  }
  return out;
}

}  // namespace kiln
