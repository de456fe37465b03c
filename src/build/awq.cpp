#include "build/awq.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/quant.h"

namespace kiln {

namespace {

std::string layer_prefix(int64_t l) {
  return "layers." + std::to_string(l) + ".";
}

}  // namespace

std::vector<std::string> awq_weights(const ModelConfig& c) {
  std::vector<std::string> r;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    if (c.layers[size_t(l)].moe) continue;
    const std::string p = layer_prefix(l);
    r.push_back(p + "wqkv");
    if (c.num_heads == c.num_kv_heads) r.push_back(p + "wo");
    r.push_back(p + (c.knobs.gated_mlp ? "w_gate_up" : "w_up"));
    if (c.knobs.gated_mlp) r.push_back(p + "w_down");
  }
  return r;
}

AwqChoice awq_search(const float* w, int64_t out, int64_t in, int64_t group, const ActStats& st,
                     int grid) {
  KILN_CHECK(int64_t(st.abs_sum.size()) == in && st.rows > 0 && st.sample_rows > 0 &&
                 int64_t(st.sample.size()) == st.sample_rows * in && group > 0 && in % group == 0,
             "AWQ search: no calibration statistics for a weight of ", in, " inputs");
  const int64_t m = st.sample_rows;
  // The output error is summed over at most kRows rows of W, evenly spaced: alpha is one number
  // per linear, and 512 rows rank 20 candidates as all 28,672 of a gate_up would, at a 56th of
  // the cost (the search would otherwise take ~30 min on 2 cores for 8B).
  constexpr int64_t kRows = 512;
  const int64_t rows = std::min(out, kRows);
  std::vector<float> mean(static_cast<size_t>(in));
  for (int64_t c = 0; c < in; ++c)
    mean[size_t(c)] = std::max(float(st.abs_sum[size_t(c)] / double(st.rows)), 1e-4f);
  AwqChoice best;
  for (int k = 0; k < grid; ++k) {
    const float alpha = float(k) / float(grid);
    // s = mean^alpha, normalized so that max(s) * min(s) = 1 (AutoAWQ's choice: the scaled
    // weight's range stays centred on the original's).
    std::vector<float> s(static_cast<size_t>(in));
    float lo = INFINITY, hi = 0;
    for (int64_t c = 0; c < in; ++c) {
      s[size_t(c)] = std::pow(mean[size_t(c)], alpha);
      lo = std::min(lo, s[size_t(c)]), hi = std::max(hi, s[size_t(c)]);
    }
    const float norm = std::sqrt(lo * hi);
    for (float& v : s) v /= norm;
    double err = 0;
#pragma omp parallel for schedule(static) reduction(+ : err)
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t o = i * out / rows;  // evenly spaced rows (all of them when out <= kRows)
      // The row as the engine will hold it, over s, minus the float row: the error weights.
      std::vector<float> ws(static_cast<size_t>(in)), d(ws.size()), sc(size_t(in / group));
      std::vector<uint8_t> q(size_t(in / 2)), z(sc.size());
      const float* wr = w + o * in;
      for (int64_t c = 0; c < in; ++c) ws[size_t(c)] = wr[c] * s[size_t(c)];
      if (!quantize_int4_row(ws.data(), in, group, q.data(), sc.data(), z.data())) {
        err += INFINITY;
        continue;
      }
      dequantize_int4_row(q.data(), sc.data(), z.data(), group, in, d.data());
      for (int64_t c = 0; c < in; ++c) d[size_t(c)] = d[size_t(c)] / s[size_t(c)] - wr[c];
      const float* dp = d.data();
      for (int64_t t = 0; t < m; ++t) {
        const float* x = st.sample.data() + t * in;
        float y = 0;
#pragma omp simd reduction(+ : y)
        for (int64_t c = 0; c < in; ++c) y += x[c] * dp[c];
        err += double(y) * y;
      }
    }
    if (k == 0) best.err_rtn = err;
    if (k == 0 || err < best.err) {
      best.err = err;
      best.alpha = alpha;
      best.scale = std::move(s);
    }
  }
  return best;
}

WeightPlan apply_awq(WeightPlan plan, const ModelConfig& c, const AwqScales& scales) {
  // Per tensor: columns to multiply, and ranges of rows (vector elements) to divide.
  struct RowDiv {
    int64_t first;
    std::vector<float> by;
    bool plus_one;  // Gemma's norm weight w stands for 1 + w
  };
  std::map<std::string, std::vector<float>> col;
  std::map<std::string, std::vector<RowDiv>> rows;
  const std::vector<std::string> ok = awq_weights(c);
  const int64_t qd = c.q_dim(), kvd = c.kv_dim(), I = c.intermediate_size;
  const bool plus_one = c.knobs.norm == NormKind::RMSPlusOne;
  for (const auto& [name, s] : scales) {
    KILN_CHECK(std::find(ok.begin(), ok.end(), name) != ok.end(), "AWQ: ", name,
               " has no input scale kiln can fold");
    for (float v : s) KILN_CHECK(std::isfinite(v) && v > 0, "AWQ: ", name, ": a scale of ", v);
    col[name] = s;
    const std::string p = name.substr(0, name.rfind('.') + 1), base = name.substr(p.size());
    if (base == "wqkv" || base == "w_gate_up" || base == "w_up") {
      const std::string norm = p + (base == "wqkv" ? "attn_norm" : "ffn_norm");
      rows[norm].push_back({0, s, plus_one});
      rows[norm + ".bias"].push_back({0, s, false});
    } else if (base == "w_down") {  // h = act(gate) * up: up's rows carry 1 / s
      rows[p + "w_gate_up"].push_back({I, s, false});
      rows[p + "b_gate_up"].push_back({I, s, false});
    } else {  // wo reads the heads' mixes of v rows, one v channel per input
      rows[p + "wqkv"].push_back({qd + kvd, s, false});
      rows[p + "bqkv"].push_back({qd + kvd, s, false});
    }
  }
  for (PlannedTensor& pt : plan) {
    const auto ci = col.find(pt.name);
    const auto ri = rows.find(pt.name);
    if (ci == col.end() && ri == rows.end()) continue;
    KILN_CHECK(pt.dtype == DType::F32, "AWQ: ", pt.name, " is planned as ", dtype_name(pt.dtype),
               ", not F32");
    const int64_t elems = pt.rows() ? numel(pt.shape) / pt.rows() : 0;
    std::vector<float> cs = ci == col.end() ? std::vector<float>() : ci->second;
    std::vector<RowDiv> rd = ri == rows.end() ? std::vector<RowDiv>() : ri->second;
    KILN_CHECK(cs.empty() || int64_t(cs.size()) == elems, "AWQ: ", pt.name, " has ", elems,
               " inputs, its scale ", cs.size());
    for (const RowDiv& r : rd)
      KILN_CHECK(r.first + int64_t(r.by.size()) <= pt.rows(), "AWQ: ", pt.name,
                 " is too small for the scale folded into it");
    pt.view = nullptr;  // the values change: no view of the source
    pt.fill = [fill = pt.fill, cs, rd, elems](int64_t row0, int64_t n, void* dst) {
      fill(row0, n, dst);
      auto* d = static_cast<float*>(dst);
      for (const RowDiv& r : rd)
        for (int64_t i = std::max(row0, r.first);
             i < std::min(row0 + n, r.first + int64_t(r.by.size())); ++i) {
          float* row = d + (i - row0) * elems;
          const float by = r.by[size_t(i - r.first)];
          for (int64_t e = 0; e < elems; ++e)
            row[e] = r.plus_one ? (1.0f + row[e]) / by - 1.0f : row[e] / by;
        }
      if (!cs.empty())
        for (int64_t i = 0; i < n; ++i)
          for (int64_t e = 0; e < elems; ++e) d[i * elems + e] *= cs[size_t(e)];
    };
  }
  return plan;
}

}  // namespace kiln
