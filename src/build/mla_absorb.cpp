#include "build/mla_absorb.h"

#include <algorithm>
#include <vector>

#include "core/dtype.h"

namespace kiln {

PlannedTensor plan_absorbed(const ModelConfig& c, const std::shared_ptr<WeightSet>& wset,
                            const std::string& hf, const std::string& block_scale,
                            std::array<int64_t, 2> block, const std::string& name, DType dt) {
  const int64_t heads = c.num_heads, R = c.qk_rope_head_dim, L = c.kv_lora_rank;
  const int64_t N = c.qk_nope_head_dim, V = c.v_head_dim, D = R + L, QK = N + R;
  const bool q = name.ends_with("w_q_absorb");
  PlannedTensor pt;
  pt.name = name;
  pt.dtype = dt;
  pt.shape = q ? Shape{heads * D, QK} : Shape{heads * V, D};
  const bool inter = c.knobs.rope_interleaved;
  pt.fill = [=](int64_t row0, int64_t n, void* dst) {
    const Tensor t = wset->get(hf);
    const Tensor sc = block_scale.empty() ? Tensor{} : wset->get(block_scale);
    const int64_t nb = block[1] > 0 ? (L + block[1] - 1) / block[1] : 0;
    auto at = [&](int64_t r, int64_t col) {  // kv_b_proj[r][col] as F32
      float v = 0, s = 1;
      to_f32(t.dtype, static_cast<const char*>(t.data) + size_t(r * L + col) * dtype_size(t.dtype),
             &v, 1);
      if (!block_scale.empty())
        to_f32(sc.dtype,
               static_cast<const char*>(sc.data) +
                   size_t(r / block[0] * nb + col / block[1]) * dtype_size(sc.dtype),
               &s, 1);
      return v * s;
    };
    const int64_t cols = pt.shape[1];
    std::vector<float> row(static_cast<size_t>(cols));
    for (int64_t r = row0; r < row0 + n; ++r) {
      std::fill(row.begin(), row.end(), 0.0f);
      if (q) {
        const int64_t h = r / D, j = r % D;
        if (j < R)  // rope part: the query's own rope dims, in the graph's half-split order
          row[size_t(N + (!inter ? j : j < R / 2 ? 2 * j : 2 * (j - R / 2) + 1))] = 1.0f;
        else
          for (int64_t k = 0; k < N; ++k) row[size_t(k)] = at(h * (N + V) + k, j - R);
      } else {
        const int64_t h = r / V, o = r % V;
        for (int64_t t2 = 0; t2 < L; ++t2) row[size_t(R + t2)] = at(h * (N + V) + N + o, t2);
      }
      from_f32(dt, row.data(), static_cast<char*>(dst) + size_t((r - row0) * cols) * dtype_size(dt),
               row.size());
    }
  };
  pt.release = [wset, hf] { wset->drop_pages(hf); };
  return pt;
}

}  // namespace kiln
