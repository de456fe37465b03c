#include "build/checkpoint.h"

#include <cmath>
#include <cstring>
#include <fstream>
#include <set>

#include "core/error.h"
#include "graph/layout.h"
#include "io/json.h"

namespace kiln {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

json read_json(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) throw Error(cat(p.string(), ": cannot open"));
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return parse_json(text, p.string());
}

Checkpoint from_config(const fs::path& cfg_path) {
  Checkpoint ck;
  const std::string f = cfg_path.string();
  json c = read_json(cfg_path);
  if (!c.is_object()) throw Error(cat(f, ": not a JSON object"));
  if (!c.contains("architectures") || !c["architectures"].is_array() ||
      c["architectures"].empty() || !c["architectures"][0].is_string())
    throw Error(cat(f, ": missing config field 'architectures'"));
  ck.spec = &find_arch(c["architectures"][0].get<std::string>());
  ck.config = resolve_config(*ck.spec, c, f);
  for (const char* k : {"torch_dtype", "dtype"})
    if (c.contains(k) && c[k].is_string()) ck.config_dtype = c[k].get<std::string>();
  const std::string raw = c.dump();
  ck.config_hash = fnv1a(raw.data(), raw.size());
  return ck;
}

// Matches `name` against a pattern with {layer}/{expert} placeholders.
bool match(const std::string& pat, const std::string& name, int64_t* layer, int64_t* expert) {
  size_t i = 0, j = 0;
  while (i < pat.size()) {
    if (pat[i] == '{') {
      size_t close = pat.find('}', i);
      std::string key = pat.substr(i + 1, close - i - 1);
      size_t k = j;
      while (k < name.size() && std::isdigit(static_cast<unsigned char>(name[k]))) ++k;
      if (k == j || k - j > 9) return false;
      int64_t v = std::stoll(name.substr(j, k - j));
      (key == "layer" ? *layer : *expert) = v;
      i = close + 1;
      j = k;
    } else {
      if (j >= name.size() || pat[i] != name[j]) return false;
      ++i, ++j;
    }
  }
  return j == name.size();
}

std::string subst(std::string s, int64_t layer, int64_t expert) {
  for (auto [key, v] : {std::pair{"{layer}", layer}, std::pair{"{expert}", expert}}) {
    size_t p = s.find(key);
    if (p != std::string::npos) s.replace(p, std::strlen(key), std::to_string(v));
  }
  return s;
}

struct Source {
  std::string hf;
  bool transpose;
};

Tensor to_engine(const Tensor& t, bool transpose, DType dtype) {
  if (!transpose) return t.dtype == dtype ? t : convert(t, dtype);
  Tensor f = convert(t, DType::F32);
  const int64_t r = t.shape[0], c = t.shape[1];
  Tensor tr = Tensor::zeros(DType::F32, {c, r});
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < c; ++j) tr.ptr<float>()[j * r + i] = f.ptr<float>()[i * c + j];
  return dtype == DType::F32 ? tr : convert(tr, dtype);
}

Tensor concat_rows(const std::vector<Tensor>& parts, DType dtype) {
  Shape s = parts[0].shape;
  s[0] = 0;
  for (const auto& p : parts) s[0] += p.shape[0];
  Tensor r = Tensor::zeros(dtype, s);
  size_t off = 0;
  for (const auto& p : parts) {
    std::memcpy(static_cast<char*>(r.data) + off, p.data, p.nbytes());
    off += p.nbytes();
  }
  return r;
}

std::string join_limited(const std::vector<std::string>& v) {
  std::string r;
  for (size_t i = 0; i < v.size() && i < 12; ++i) r += (i ? ", " : "") + v[i];
  if (v.size() > 12) r += cat(" ... and ", v.size() - 12, " more");
  return r;
}

}  // namespace

Checkpoint open_checkpoint(const fs::path& dir, bool with_weights) {
  if (!fs::is_directory(dir)) throw Error(cat(dir.string(), ": not a directory"));
  if (!fs::exists(dir / "config.json")) throw Error(cat(dir.string(), ": no config.json"));
  Checkpoint ck = from_config(dir / "config.json");
  ck.dir = dir;
  if (fs::exists(dir / "generation_config.json"))
    ck.generation_defaults =
        apply_generation_config(ck.config, read_json(dir / "generation_config.json"),
                                (dir / "generation_config.json").string());
  if (with_weights) ck.weights = WeightSet::open_dir(dir);
  return ck;
}

Checkpoint open_config(const fs::path& config_json) {
  if (!fs::is_regular_file(config_json)) throw Error(cat(config_json.string(), ": no such file"));
  Checkpoint ck = from_config(config_json);
  const fs::path gen = config_json.parent_path() / "generation_config.json";
  if (fs::exists(gen))
    ck.generation_defaults = apply_generation_config(ck.config, read_json(gen), gen.string());
  return ck;
}

std::vector<std::pair<std::string, Tensor>> convert_weights(const Checkpoint& ck, DType dtype) {
  KILN_CHECK(ck.weights, ck.dir.string(), ": checkpoint has no weights");
  const ModelConfig& c = ck.config;
  const WeightSet& ws = *ck.weights;
  std::map<std::string, Source> src;  // canonical source name -> HF tensor
  std::vector<std::string> unexpected, missing, bad_shape;
  for (const auto& hf : ws.names()) {
    int64_t layer = -1, expert = -1;
    bool ignored = false;
    for (const auto& pat : ck.spec->ignored) ignored = ignored || match(pat, hf, &layer, &expert);
    if (ignored) continue;
    const TensorRule* rule = nullptr;
    for (const auto& r : ck.spec->tensors)
      if (match(r.hf, hf, &layer, &expert)) {
        rule = &r;
        break;
      }
    if (!rule || layer >= c.num_layers || expert >= c.num_experts + (expert < 0 ? 1 : 0)) {
      unexpected.push_back(hf);
      continue;
    }
    const std::string canon = subst(rule->canonical, layer, expert);
    if (canon == "lm_head" && c.tie_word_embeddings) continue;  // a redundant copy of embed
    Shape want = source_shape(c, canon);
    if (want.empty()) {
      unexpected.push_back(hf);
      continue;
    }
    if (rule->transpose) std::reverse(want.begin(), want.end());
    const TensorInfo& ti = ws.info(hf);
    if (ti.shape != want) {
      bad_shape.push_back(cat(hf, " ", shape_str(ti.shape), " (expected ", shape_str(want), ")"));
      continue;
    }
    if (!is_float(ti.dtype)) {
      bad_shape.push_back(cat(hf, " has dtype ", dtype_name(ti.dtype), " (expected a float type)"));
      continue;
    }
    src[canon] = {hf, rule->transpose};
  }

  // Each engine tensor comes from itself or from the parts it fuses.
  static const std::map<std::string, std::vector<std::string>> kFused = {
      {"wqkv", {"wq", "wk", "wv"}},
      {"bqkv", {"bq", "bk", "bv"}},
      {"w_gate_up", {"w_gate", "w_up"}},
      {"b_gate_up", {"b_gate", "b_up"}}};
  std::set<std::string> used;
  std::vector<std::pair<std::string, std::vector<std::string>>> plan;
  for (const auto& spec : engine_layout(c)) {
    const size_t dot = spec.name.rfind('.');
    const std::string prefix = dot == std::string::npos ? "" : spec.name.substr(0, dot + 1);
    const std::string base = dot == std::string::npos ? spec.name : spec.name.substr(dot + 1);
    std::vector<std::string> parts;
    if (src.count(spec.name)) {
      parts = {spec.name};
    } else if (kFused.count(base) && spec.name.find(".bias") == std::string::npos) {
      for (const auto& p : kFused.at(base)) parts.push_back(prefix + p);
    } else {
      parts = {spec.name};
    }
    bool ok = true;
    for (const auto& p : parts)
      if (!src.count(p)) {
        missing.push_back(p);
        ok = false;
      }
    if (!ok) continue;
    for (const auto& p : parts) used.insert(p);
    plan.push_back({spec.name, parts});
  }
  for (const auto& [canon, s] : src)
    if (!used.count(canon)) unexpected.push_back(s.hf);

  if (!missing.empty() || !unexpected.empty() || !bad_shape.empty()) {
    std::string msg = cat(ck.dir.string(), ": checkpoint does not match ", ck.spec->name);
    if (!missing.empty())
      msg += cat("; missing weights (canonical names): ", join_limited(missing));
    if (!unexpected.empty()) msg += cat("; unexpected weights: ", join_limited(unexpected));
    if (!bad_shape.empty()) msg += cat("; wrong shapes: ", join_limited(bad_shape));
    throw Error(msg);
  }

  std::map<std::string, bool> is_matrix;
  for (const auto& spec : engine_layout(c)) is_matrix[spec.name] = spec.matrix;
  std::vector<std::pair<std::string, Tensor>> out;
  for (const auto& [name, parts] : plan) {
    const DType dt = is_matrix[name] ? dtype : DType::F32;
    std::vector<Tensor> ts;
    for (const auto& p : parts) ts.push_back(to_engine(ws.get(src[p].hf), src[p].transpose, dt));
    out.push_back({name, ts.size() == 1 ? ts[0] : concat_rows(ts, dt)});
  }
  return out;
}

std::vector<std::pair<std::string, Tensor>> dummy_weights(const ModelConfig& c, DType dtype,
                                                          uint64_t seed) {
  std::vector<std::pair<std::string, Tensor>> out;
  const auto layout = engine_layout(c);
  for (size_t ti = 0; ti < layout.size(); ++ti) {
    const auto& spec = layout[ti];
    Tensor t = Tensor::zeros(spec.matrix ? dtype : DType::F32, spec.shape);
    const int64_t n = t.numel();
    const bool is_norm = !spec.matrix && spec.name.find("norm") != std::string::npos &&
                         spec.name.find(".bias") == std::string::npos;
    const float amp = 0.02f * std::sqrt(3.0f);  // uniform with std 0.02
    constexpr int64_t kChunk = 1 << 16;
#pragma omp parallel for schedule(static)
    for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
      uint64_t s = seed ^ (uint64_t(ti) << 40) ^ uint64_t(c0 / kChunk) * 0x9E3779B97F4A7C15ull;
      float buf[1024];
      for (int64_t i = c0; i < std::min(n, c0 + kChunk); i += 1024) {
        const int64_t m = std::min<int64_t>(1024, std::min(n, c0 + kChunk) - i);
        for (int64_t k = 0; k < m; ++k) {
          s += 0x9E3779B97F4A7C15ull;  // splitmix64
          uint64_t z = s;
          z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
          z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
          z ^= z >> 31;
          const float u = float(z >> 40) / float(1 << 24) * 2.0f - 1.0f;
          buf[k] = is_norm ? 1.0f + 0.1f * u : amp * u;
        }
        from_f32(t.dtype, buf, static_cast<char*>(t.data) + size_t(i) * dtype_size(t.dtype),
                 size_t(m));
      }
    }
    out.push_back({spec.name, t});
  }
  return out;
}

}  // namespace kiln
