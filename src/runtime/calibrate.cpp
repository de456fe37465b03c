#include "runtime/calibrate.h"

#include <algorithm>
#include <map>

#include "build/quantize.h"
#include "core/error.h"
#include "core/quant.h"
#include "graph/decoder.h"
#include "graph/layout.h"
#include "runtime/kv_cache.h"
#include "tokenizer/tokenizer.h"

namespace kiln {

namespace {

// Sample rows kept per linear for the error search: enough to rank alphas, few enough that the
// search (out x in x rows multiply-adds per alpha) stays minutes on a 2-core machine for 8B.
constexpr int64_t kSampleRows = 64;

}  // namespace

std::vector<float> cpu_forward(const ModelConfig& c,
                               const std::vector<std::pair<std::string, Tensor>>& weights,
                               std::span<const int32_t> tokens, LinearObserver observe) {
  const int64_t n = int64_t(tokens.size()), V = c.vocab_size, bs = 16;
  KILN_CHECK(n > 0 && n <= c.max_position_embeddings, "cpu_forward: ", n,
             " tokens (the model allows 1 to ", c.max_position_embeddings, ")");
  std::unique_ptr<Backend> be = make_cpu_backend(std::move(observe));
  std::vector<const Tensor*> host;
  for (const auto& [name, t] : weights) host.push_back(&t);
  DeviceWeights dw(weights, be->upload_all(host));
  const int64_t blocks = (n + bs - 1) / bs;
  KVCache cache(*be, c, blocks + 1, bs, false);
  Decoder dec(*be, c, dw, cache, n);
  dec.prepare(n, 1, n);
  const std::vector<int32_t> table = cache.take(blocks);
  Batch b;
  b.add(tokens, 0, table, true, true);
  const float* d = dec.forward(b);
  std::vector<float> out(static_cast<size_t>(n * V));
  be->to_host(out.data(), d, out.size() * 4);
  return out;
}

AwqCalibration calibrate_awq(const Checkpoint& ck, const std::filesystem::path& tokenizer_dir,
                             DType dtype, const std::string& text, const std::string& text_name,
                             int64_t max_tokens) {
  const ModelConfig& c = ck.config;
  KILN_CHECK(ck.weights, "--quant int4-awq calibrates a checkpoint's own weights (not dummy ones)");
  KILN_CHECK(ck.quant == WeightQuant::None && ck.fp8_block[0] == 0, ck.dir.string(),
             ": --quant int4-awq calibrates float weights; this checkpoint is already quantized");
  Tokenizer tok = [&] {
    try {
      return Tokenizer::from_dir(tokenizer_dir);
    } catch (const Error& e) {
      throw Error(
          cat("--quant int4-awq calibrates on text and needs the model's tokenizer: ", e.what()));
    }
  }();
  std::vector<int32_t> ids = tok.encode(text, true);
  constexpr int64_t kMinTokens = 64;
  KILN_CHECK(int64_t(ids.size()) >= kMinTokens, text_name, ": ", ids.size(),
             " tokens; AWQ calibration needs at least ", kMinTokens);
  if (int64_t(ids.size()) > max_tokens) ids.resize(size_t(max_tokens));
  for (int32_t id : ids)
    KILN_CHECK(id >= 0 && id < c.vocab_size, text_name, ": token id ", id,
               " is outside the model's vocabulary of ", c.vocab_size);
  const int64_t chunk = std::min<int64_t>(c.max_position_embeddings, 512);
  const int64_t total = int64_t(ids.size());

  // The float model (the engine dtype, no quantization) with its linears watched.
  const auto weights = attach_scales(materialize(plan_weights(ck, dtype)), WeightQuant::None);
  std::map<const void*, std::string> watched;
  const std::vector<std::string> targets = awq_weights(c);
  for (const auto& [name, t] : weights)
    if (std::find(targets.begin(), targets.end(), name) != targets.end()) watched[t.data] = name;
  std::map<std::string, ActStats> stats;
  const int64_t stride = std::max<int64_t>(1, total / kSampleRows);
  LinearObserver observe = [&](const float* x, int64_t n, int64_t ldx, const Tensor& w) {
    const auto it = watched.find(w.data);
    if (it == watched.end()) return;
    const int64_t in = w.in_features();
    ActStats& s = stats[it->second];
    if (s.abs_sum.empty()) s.abs_sum.assign(size_t(in), 0.0);
    for (int64_t t = 0; t < n; ++t, ++s.rows) {
      const float* r = x + t * ldx;
      for (int64_t k = 0; k < in; ++k) s.abs_sum[size_t(k)] += std::fabs(r[k]);
      if (s.rows % stride == stride / 2 && s.sample_rows < kSampleRows) {
        s.sample.insert(s.sample.end(), r, r + in);
        ++s.sample_rows;
      }
    }
  };
  for (int64_t i = 0; i < total; i += chunk)
    (void)cpu_forward(
        c, weights,
        std::span<const int32_t>(ids).subspan(size_t(i), size_t(std::min(chunk, total - i))),
        observe);

  AwqCalibration r;
  r.tokens = total;
  for (const auto& [name, t] : weights) {
    const auto it = stats.find(name);
    if (it == stats.end()) continue;
    const int64_t out = t.shape[0], in = t.shape[1];
    std::vector<float> w(static_cast<size_t>(out * in));
    to_f32(t.dtype, t.data, w.data(), w.size());
    const AwqChoice best = awq_search(w.data(), out, in, int4_group(in), it->second);
    r.err += best.err;
    r.err_rtn += best.err_rtn;
    r.scaled += best.alpha > 0;
    r.scales[name] = best.scale;
  }
  KILN_CHECK(r.scales.size() == targets.size(), "AWQ calibration saw ", r.scales.size(), " of ",
             targets.size(), " linears");
  return r;
}

}  // namespace kiln
