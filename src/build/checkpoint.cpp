#include "build/checkpoint.h"

#include <array>
#include <cmath>
#include <cstring>
#include <fstream>
#include <set>

#include "build/awq.h"
#include "build/infer_family.h"
#include "build/mla_absorb.h"
#include "build/quantize.h"
#include "build/quantized_checkpoint.h"
#include "build/row_transform.h"
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
  return checkpoint_from_config(read_json(cfg_path), cfg_path.string());
}

}  // namespace

Checkpoint checkpoint_from_config(const json& c, const std::string& f, const ArchSpec* spec,
                                  std::set<std::string>* used_keys) {
  Checkpoint ck;
  if (!c.is_object()) throw Error(cat(f, ": not a JSON object"));
  if (!c.contains("architectures") || !c["architectures"].is_array() ||
      c["architectures"].empty() || !c["architectures"][0].is_string())
    throw Error(cat(f, ": missing config field 'architectures'"));
  if (c.contains("quantization_config")) parse_quantization_config(c["quantization_config"], f, ck);
  ck.spec = &specialize_arch(spec ? *spec : find_arch(c["architectures"][0].get<std::string>()), c,
                             f, used_keys);
  ck.config = resolve_config(*ck.spec, c, f, used_keys);
  for (const char* k : {"torch_dtype", "dtype"})
    if (c.contains(k) && c[k].is_string()) ck.config_dtype = c[k].get<std::string>();
  const std::string raw = c.dump();
  ck.config_hash = fnv1a(raw.data(), raw.size());
  return ck;
}

namespace {

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
  std::string hf;  // for AWQ: the module name, holding .qweight, .qzeros and .scales
  bool transpose;
  bool awq = false;
  bool fp8 = false;              // E4M3 codes with a ".weight_scale" beside them
  std::string block_scale = {};  // block-wise FP8: its .weight_scale_inv (dequantized on load)
  bool qkv_per_head = false;     // TensorRule::qkv_per_head
  int64_t slice = -1;            // TensorRule::stacked_experts: this expert's slice of hf
  bool interleaved = false;      // TensorRule::interleaved_gate_up
  bool flat = false;             // a [heads, head_dim] vector read flat
};

// Output rows are made in blocks of this many elements per thread: the float staging buffer.
constexpr int64_t kBlock = 4096;

// The checkpoint names behind canonical parts (AWQ / GPTQ: module names; FP8: weight names).
std::vector<std::string> hf_names(const std::vector<std::string>& parts,
                                  const std::map<std::string, Source>& src) {
  std::vector<std::string> r;
  for (const auto& p : parts) r.push_back(src.at(p).hf);
  return r;
}

// Converts n elements from `src` (dtype `from`) to `dst` (dtype `to`).
void convert_elems(DType from, const void* src, DType to, void* dst, int64_t n) {
  if (from == to) {
    std::memcpy(dst, src, size_t(n) * dtype_size(to));
    return;
  }
#pragma omp parallel for schedule(static) if (n > 8 * kBlock)
  for (int64_t i = 0; i < n; i += kBlock) {
    float buf[kBlock];
    const int64_t m = std::min(kBlock, n - i);
    to_f32(from, static_cast<const char*>(src) + size_t(i) * dtype_size(from), buf, size_t(m));
    from_f32(to, buf, static_cast<char*>(dst) + size_t(i) * dtype_size(to), size_t(m));
  }
}

// One checkpoint tensor feeding rows of an engine tensor, read from the mapped file on demand.
struct Part {
  std::string hf;
  bool transpose;
  int64_t rows;               // rows it contributes to the engine tensor
  std::string block_scale;    // block-wise FP8: values are code * scale_inv[r / bh, c / bw]
  int64_t block[2] = {0, 0};  // its {bh, bw}
  RowTransform transform = {};
  int64_t slice = -1;  // >= 0: slice `slice` of a stacked [experts, ...] tensor
  bool flat = false;   // Source::flat
};

// The source tensor of a part: hf itself, or its slice of a stacked tensor.
Tensor part_tensor(const WeightSet& ws, const std::string& hf, int64_t slice, bool flat = false) {
  const Tensor t = ws.get(hf);
  if (flat) return Tensor::view(t.dtype, {t.numel()}, t.storage, t.data);
  if (slice < 0) return t;
  const Shape s(t.shape.begin() + 1, t.shape.end());
  const size_t bytes = size_t(numel(s)) * dtype_size(t.dtype);
  return Tensor::view(t.dtype, s, t.storage, static_cast<char*>(t.data) + size_t(slice) * bytes);
}

}  // namespace

Checkpoint open_checkpoint(const fs::path& dir, bool with_weights) {
  if (!fs::is_directory(dir)) throw Error(cat(dir.string(), ": not a directory"));
  if (!fs::exists(dir / "config.json")) throw Error(cat(dir.string(), ": no config.json"));
  const json c = read_json(dir / "config.json");
  const std::string f = (dir / "config.json").string();
  const bool unknown = c.is_object() && c.contains("architectures") &&
                       c["architectures"].is_array() && !c["architectures"].empty() &&
                       c["architectures"][0].is_string() &&
                       !try_find_arch(c["architectures"][0].get<std::string>());
  Checkpoint ck = unknown && with_weights ? infer_family(c, dir, f) : checkpoint_from_config(c, f);
  ck.dir = dir;
  if (fs::exists(dir / "generation_config.json"))
    ck.generation_defaults =
        apply_generation_config(ck.config, read_json(dir / "generation_config.json"),
                                (dir / "generation_config.json").string());
  if (fs::exists(dir / "hf_quant_config.json"))
    parse_hf_quant_config(dir / "hf_quant_config.json", ck);
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

WeightPlan plan_weights(const Checkpoint& ck, DType dtype, const QuantScheme& qs,
                        const std::map<std::string, std::vector<float>>* awq_scales) {
  KILN_CHECK(ck.weights, ck.dir.string(), ": checkpoint has no weights");
  const ModelConfig& c = ck.config;
  const WeightSet& ws = *ck.weights;
  // awq: packed integer modules (AWQ, GPTQ or compressed-tensors), each module's packed tensor
  // standing for its .weight with scales (and zeros) beside it.
  const bool ct = !ck.ct_format.empty();
  const bool awq = ck.quant == WeightQuant::Int4 || ct, fp8 = ck.quant == WeightQuant::Fp8;
  const char* packing = ct ? "compressed-tensors" : ck.gptq ? "GPTQ" : "AWQ";
  WeightQuant q = qs.q;
  if (ck.quant != WeightQuant::None) {
    KILN_CHECK(q == WeightQuant::None || q == ck.quant, ck.dir.string(), ": the checkpoint is ",
               awq ? cat(packing, " ") : "", weight_quant_name(ck.quant), "; --quant ",
               weight_quant_name(q), " would requantize it (leave --quant out)");
    q = ck.quant;
  }
  // The group and input order are the checkpoint's (0 / none for float checkpoints).
  const QuantScheme scheme{q, ck.quant_group, ck.act_order, qs.lm_head};
  std::map<std::string, Source> src;  // canonical source name -> HF tensor
  std::vector<std::string> unexpected, missing, bad_shape;
  std::set<std::string> awq_parts;   // .qzeros / .scales tensors of AWQ modules that were mapped
  std::set<std::string> fp8_scales;  // .weight_scale tensors of FP8 weights that were mapped
  for (const auto& hf : ws.names()) {
    int64_t layer = -1, expert = -1;
    bool ignored = false;
    for (const auto& pat : ck.spec->ignored) ignored = ignored || match(pat, hf, &layer, &expert);
    if (ignored) continue;
    if (c.unused_layers > 0) {  // ModelConfig::unused_layers: any tensor of those layers
      const size_t k = hf.find("layers.");
      if (k != std::string::npos) {
        const int64_t l = std::atoll(hf.c_str() + k + 7);
        if (l >= c.num_layers && l < c.num_layers + c.unused_layers) continue;
      }
    }
    // AWQ: a module's .qweight stands for its .weight; .qzeros and .scales go with it.
    std::string name = hf;
    bool packed = false;
    if (awq && !ct &&
        (hf.ends_with(".qzeros") || hf.ends_with(".scales") || hf.ends_with(".g_idx")))
      continue;  // checked below
    if (ct && (hf.ends_with(".weight_scale") || hf.ends_with(".weight_zero_point") ||
               hf.ends_with(".weight_shape") || hf.ends_with(".weight_g_idx")))
      continue;                                          // checked below
    if (fp8 && hf.ends_with(".weight_scale")) continue;  // checked below
    const bool fp8_block = ck.fp8_block[0] > 0;
    if (fp8_block && hf.ends_with(".weight_scale_inv")) continue;  // checked below
    // Static activation scales of block-wise FP8: kiln computes in 16 bits.
    if (fp8_block && hf.ends_with(".input_scale")) continue;
    // Static activation and KV-cache scales: kiln scales activations per token as it runs and
    // keeps its KV cache in the engine dtype, so these are not used.
    if (fp8 && (hf.ends_with(".input_scale") || hf.ends_with(".input_scale_ub") ||
                hf.ends_with(".k_scale") || hf.ends_with(".v_scale")))
      continue;
    if (awq && !ct && hf.ends_with(".qweight")) {
      name = hf.substr(0, hf.size() - 8) + ".weight";
      packed = true;
    }
    if (ct && hf.ends_with(".weight_packed")) {
      name = hf.substr(0, hf.size() - 7);
      packed = true;
    }
    // compressed-tensors int-quantized: the I8 .weight is the packed tensor.
    if (ct && ck.ct_format == "int-quantized" && ws.info(hf).dtype == DType::I8) packed = true;
    const TensorRule* rule = nullptr;
    for (const auto& r : ck.spec->tensors)
      if (match(r.hf, name, &layer, &expert)) {
        rule = &r;
        break;
      }
    if (!rule || layer >= c.num_layers || expert >= c.num_experts + (expert < 0 ? 1 : 0)) {
      unexpected.push_back(hf);
      continue;
    }
    if (rule->stacked_experts) {
      // One tensor [num_experts, ...] for every expert of the layer: a source per expert.
      const TensorInfo& ti = ws.info(hf);
      Shape want = source_shape(c, subst(rule->canonical, layer, 0));
      if (rule->transpose) std::reverse(want.begin(), want.end());
      want.insert(want.begin(), c.num_experts);
      if (packed || !is_float(ti.dtype) || ti.dtype == DType::F8_E4M3 ||
          ti.dtype == DType::F8_E5M2 || ti.shape != want) {
        bad_shape.push_back(cat(hf, " ", dtype_name(ti.dtype), shape_str(ti.shape), " (expected ",
                                shape_str(want), " in a 16- or 32-bit float type)"));
        continue;
      }
      for (int64_t e = 0; e < c.num_experts; ++e) {
        Source& sr = src[subst(rule->canonical, layer, e)];
        sr = {hf, rule->transpose};
        sr.slice = e, sr.interleaved = rule->interleaved_gate_up;
      }
      continue;
    }
    const std::string canon = subst(rule->canonical, layer, expert);
    if (canon == "lm_head" && c.tie_word_embeddings) continue;  // a redundant copy of embed
    Shape want = source_shape(c, canon);
    if (want.empty()) {
      unexpected.push_back(hf);
      continue;
    }
    if (packed) {
      // AWQ: qweight I32 [in, out / 8]; GPTQ: qweight I32 [in / 8, out] and maybe g_idx I32
      // [in]. Both: qzeros I32 [in / g, out / 8], scales float [in / g, out].
      // compressed-tensors: see Checkpoint::ct_format.
      const std::string base = hf.substr(0, hf.rfind('.'));
      const int64_t out = want[0], in = want[1], g = ck.quant_group;
      const auto check = [&](const std::string& t, Shape shape, bool is_f,
                             DType type = DType::I32) {
        if (!ws.contains(t)) {
          missing.push_back(t);
          return false;
        }
        const TensorInfo& ti = ws.info(t);
        if (ti.shape != shape ||
            (is_f ? !is_float(ti.dtype) || ti.dtype == DType::F8_E4M3 || ti.dtype == DType::F8_E5M2
                  : ti.dtype != type)) {
          bad_shape.push_back(cat(t, " ", dtype_name(ti.dtype), shape_str(ti.shape), " (expected ",
                                  is_f ? "a float type" : dtype_name(type), shape_str(shape), ")"));
          return false;
        }
        awq_parts.insert(t);
        return true;
      };
      // g_idx I32 [in]: the group of each input. Act-order: every group holds exactly g inputs
      // (kiln sorts the columns by group); otherwise input c must be in group c / g.
      const auto check_groups = [&](const std::string& t, int64_t in, int64_t g) {
        if (!check(t, {in}, false)) return false;
        const Tensor gi = ws.get(t);
        std::vector<int64_t> count(size_t(in / g), 0);
        for (int64_t c = 0; c < in; ++c) {
          const int64_t k = int32_t(read_u32(gi, c));
          if (k < 0 || k >= in / g || (!ck.act_order && k != c / g) || ++count[size_t(k)] > g) {
            bad_shape.push_back(
                ck.act_order
                    ? cat(t, ": input ", c, " is in group ", k, ", but there are ", in / g,
                          " groups of ", g, " inputs")
                    : cat(t, ": input ", c, " is in group ", k, ", not ", c / g,
                          " (an act-order g_idx, but the quantization_config does not say so)"));
            return false;
          }
        }
        return true;
      };
      const bool int8 = ck.quant == WeightQuant::Int8;
      const int64_t rows_mult = ct && (int8 || ck.ct_symmetric) ? 1 : 8;
      const int64_t in_mult = int8 ? (ck.ct_format == "pack-quantized" ? 4 : 1) : g;
      if (rule->transpose || out % rows_mult != 0 || in % in_mult != 0) {
        bad_shape.push_back(cat(hf, ": ", packing, " packing needs ", out,
                                " outputs a multiple of ", rows_mult, " and ", in,
                                " inputs a multiple of ", in_mult));
        continue;
      }
      if (ct) {
        const int64_t G = int8 ? 1 : in / g;
        bool ok = ck.ct_format == "pack-quantized" ? check(hf, {out, in / (int8 ? 4 : 8)}, false)
                                                   : check(hf, {out, in}, false, DType::I8);
        ok = check(base + ".weight_scale", {out, G}, true) && ok;
        if (!int8 && !ck.ct_symmetric)
          ok = check(base + ".weight_zero_point", {out / 8, G}, false) && ok;
        if (ws.contains(base + ".weight_shape")) {  // (out, in) as the producer saw it
          const TensorInfo& si = ws.info(base + ".weight_shape");
          std::vector<int64_t> v;
          if (numel(si.shape) == 2 && (si.dtype == DType::I32 || si.dtype == DType::I64)) {
            const Tensor st = ws.get(base + ".weight_shape");
            for (int k = 0; k < 2; ++k)
              v.push_back(si.dtype == DType::I32 ? int64_t(int32_t(read_u32(st, k)))
                                                 : int64_t(read_u32(st, 2 * k)) |
                                                       int64_t(read_u32(st, 2 * k + 1)) << 32);
          }
          if (v != std::vector<int64_t>{out, in}) {
            bad_shape.push_back(cat(base, ".weight_shape does not say ", shape_str({out, in})));
            ok = false;
          }
          awq_parts.insert(base + ".weight_shape");
        }
        if (!int8 && (ck.act_order || ws.contains(base + ".weight_g_idx")))
          ok = check_groups(base + ".weight_g_idx", in, g) && ok;
        if (ok) src[canon] = {base, false, true};
        continue;
      }
      bool ok = check(hf, ck.gptq ? Shape{in / 8, out} : Shape{in, out / 8}, false) &
                check(base + ".qzeros", {in / g, out / 8}, false) &
                check(base + ".scales", {in / g, out}, true);
      if (ck.gptq && (ck.act_order || ws.contains(base + ".g_idx")))
        ok = check_groups(base + ".g_idx", in, g) && ok;
      if (ok) src[canon] = {base, false, true};
      continue;
    }
    if (rule->transpose) std::reverse(want.begin(), want.end());
    const TensorInfo& ti = ws.info(hf);
    // A vector stored as a matrix (per-head q/k norm weights, [heads, head_dim]) is read flat.
    const bool flat = want.size() == 1 && ti.shape.size() == 2 && numel(ti.shape) == want[0];
    if (ti.shape != want && !flat) {
      bad_shape.push_back(cat(hf, " ", shape_str(ti.shape), " (expected ", shape_str(want), ")"));
      continue;
    }
    if (!is_float(ti.dtype)) {
      bad_shape.push_back(cat(hf, " has dtype ", dtype_name(ti.dtype), " (expected a float type)"));
      continue;
    }
    if (fp8_block && ti.dtype == DType::F8_E4M3 && !rule->transpose) {
      // Block-wise FP8: code * weight_scale_inv of its [bh, bw] block.
      const std::string sc = fp8_scale_name(hf) + "_inv";
      const int64_t bh = ck.fp8_block[0], bw = ck.fp8_block[1];
      const Shape blocks = {(want[0] + bh - 1) / bh, (want[1] + bw - 1) / bw};
      if (!ws.contains(sc)) {
        missing.push_back(sc);
        continue;
      }
      const TensorInfo& si = ws.info(sc);
      if (!is_float(si.dtype) || si.dtype == DType::F8_E4M3 || si.dtype == DType::F8_E5M2 ||
          si.shape != blocks) {
        bad_shape.push_back(cat(sc, " ", dtype_name(si.dtype), shape_str(si.shape),
                                " (expected a float scale per ", bh, "x", bw, " block, ",
                                shape_str(blocks), ")"));
        continue;
      }
      fp8_scales.insert(sc);
      src[canon] = {hf, false, false, false, sc};
      continue;
    }
    if (ti.dtype == DType::F8_E4M3 || ti.dtype == DType::F8_E5M2) {
      // FP8 codes: they stand for code * weight_scale, one scale per tensor or per output row.
      const std::string sc = fp8_scale_name(hf);
      if (!fp8 || ti.dtype != DType::F8_E4M3 || rule->transpose) {
        bad_shape.push_back(cat(hf, " has dtype ", dtype_name(ti.dtype),
                                fp8 || fp8_block
                                    ? " (kiln loads E4M3 FP8 linear weights only)"
                                    : " but config.json has no FP8 quantization_config"));
        continue;
      }
      if (!ws.contains(sc)) {
        missing.push_back(sc);
        continue;
      }
      const TensorInfo& si = ws.info(sc);
      const int64_t n = numel(si.shape);
      if (!is_float(si.dtype) || si.dtype == DType::F8_E4M3 || si.dtype == DType::F8_E5M2 ||
          (n != 1 && (n != want[0] || si.shape[0] != want[0]))) {
        bad_shape.push_back(cat(sc, " ", dtype_name(si.dtype), shape_str(si.shape),
                                " (expected one scale, or one per output row of ", want[0], ")"));
        continue;
      }
      fp8_scales.insert(sc);
      src[canon] = {hf, false, false, true};
      continue;
    }
    src[canon] = {hf, rule->transpose};
    src[canon].qkv_per_head = rule->qkv_per_head;
    src[canon].interleaved = rule->interleaved_gate_up;
    src[canon].flat = flat;
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
    if (base == "w_q_absorb" || base == "w_o_absorb") {
      parts = {prefix + "wkv_b"};  // made from it at build (plan_absorbed)
    } else if (src.count(spec.name)) {
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
  if (awq || fp8 || ck.fp8_block[0] > 0)  // scale tensors whose weight was not mapped
    for (const auto& hf : ws.names())
      if (ct ? (hf.ends_with(".weight_scale") || hf.ends_with(".weight_zero_point") ||
                hf.ends_with(".weight_shape") || hf.ends_with(".weight_g_idx")) &&
                   !awq_parts.count(hf)
          : awq ? (hf.ends_with(".qzeros") || hf.ends_with(".scales") || hf.ends_with(".g_idx")) &&
                      !awq_parts.count(hf)
          : fp8 ? hf.ends_with(".weight_scale") && !fp8_scales.count(hf)
                : hf.ends_with(".weight_scale_inv") && !fp8_scales.count(hf)) {
        bool ignored = false;
        int64_t layer = -1, expert = -1;
        for (const auto& pat : ck.spec->ignored)
          ignored = ignored || match(pat, hf, &layer, &expert);
        if (!ignored) unexpected.push_back(hf);
      }

  if (!missing.empty() || !unexpected.empty() || !bad_shape.empty()) {
    std::string msg = cat(ck.dir.string(), ": checkpoint does not match ", ck.spec->name);
    if (!missing.empty())
      msg += cat("; missing weights (canonical names): ", join_limited(missing));
    if (!unexpected.empty()) msg += cat("; unexpected weights: ", join_limited(unexpected));
    if (!bad_shape.empty()) msg += cat("; wrong shapes: ", join_limited(bad_shape));
    throw Error(msg);
  }

  std::map<std::string, DType> planned_dtype;  // quantized weights are planned in F32 first
  for (const auto& spec : engine_layout(c))
    planned_dtype[spec.name] = quantizes(scheme, spec.role) ? DType::F32 : spec.dtype(dtype);
  std::map<std::string, WeightRole> role;
  for (const auto& spec : engine_layout(c)) role[spec.name] = spec.role;
  auto wset = std::make_shared<WeightSet>(ws);
  WeightPlan out;
  for (const auto& [name, part_names] : plan) {
    if (name.ends_with("w_q_absorb") || name.ends_with("w_o_absorb")) {
      const Source& s = src[part_names[0]];
      KILN_CHECK(!s.awq && !s.fp8 && !s.transpose && s.slice < 0, ck.dir.string(), ": ", s.hf,
                 ": kiln absorbs it into the MLA projections at build, which needs it in a float "
                 "type or block-wise FP8");
      out.push_back(plan_absorbed(c, wset, s.hf, s.block_scale, {ck.fp8_block[0], ck.fp8_block[1]},
                                  name, planned_dtype[name]));
      continue;
    }
    // Pre-quantized weights are copied as published: nothing reorders or scales them.
    // Init-capture: clang 14 cannot capture a structured binding by name.
    const auto as_published = [&, &parts = part_names] {
      for (const auto& p : parts)
        KILN_CHECK(row_transform(c, p, src[p].qkv_per_head, ck.dir.string(), src[p].interleaved)
                       .identity(),
                   ck.dir.string(), ": ", src[p].hf, " is quantized in the checkpoint, and ",
                   c.architecture, " reorders or scales it at build (not supported yet)");
    };
    if (fp8) {
      size_t n_fp8 = 0;
      for (const auto& p : part_names) n_fp8 += src[p].fp8;
      if (n_fp8) {
        const bool quantized = quantizes(scheme, role[name]);
        KILN_CHECK(quantized && n_fp8 == part_names.size(), ck.dir.string(), ": ", name,
                   quantized ? " is FP8 in part (kiln needs every part of a fused weight in FP8)"
                             : " is FP8 in the checkpoint, but kiln keeps this weight in the "
                               "engine dtype (not supported yet)");
        as_published();
        for (auto& t : plan_fp8(wset, name, hf_names(part_names, src))) out.push_back(std::move(t));
        continue;
      }
      // Dense linears the checkpoint left in 16 bits fall through: kiln quantizes them itself.
    }
    if (awq) {
      size_t n_packed = 0;
      for (const auto& p : part_names) n_packed += src[p].awq;
      const bool quantized = quantizes(scheme, role[name]);
      KILN_CHECK(n_packed == (quantized ? part_names.size() : 0), ck.dir.string(), ": ", name,
                 quantized ? cat(" is not ", packing,
                                 "-quantized in full (kiln needs every dense linear packed)")
                           : cat(" is ", packing,
                                 "-quantized, but kiln keeps this weight in the engine dtype "
                                 "(not supported yet)"));
      if (quantized) {
        as_published();
        for (auto& t : q == WeightQuant::Int8
                           ? plan_int8_ct(wset, name, hf_names(part_names, src), ck)
                           : plan_int4_packed(wset, name, hf_names(part_names, src), ck))
          out.push_back(std::move(t));
        continue;
      }
    }
    PlannedTensor pt;
    pt.name = name;
    pt.dtype = planned_dtype[name];
    std::vector<Part> parts;
    for (const auto& p : part_names) {
      Shape s = ws.info(src[p].hf).shape;
      if (src[p].slice >= 0) s.erase(s.begin());
      if (src[p].flat) s = {numel(s)};
      parts.push_back(
          {src[p].hf,
           src[p].transpose,
           src[p].transpose ? s.back() : s.front(),
           src[p].block_scale,
           {ck.fp8_block[0], ck.fp8_block[1]},
           row_transform(c, p, src[p].qkv_per_head, ck.dir.string(), src[p].interleaved),
           src[p].slice,
           src[p].flat});
      pt.shape = src[p].transpose ? Shape(s.rbegin(), s.rend()) : s;
    }
    pt.shape[0] = 0;
    for (const auto& p : parts) pt.shape[0] += p.rows;
    if (parts.size() == 1 && !parts[0].transpose && parts[0].transform.identity() &&
        ws.info(parts[0].hf).dtype == pt.dtype)  // nothing to convert
      pt.view = [wset, hf = parts[0].hf, sl = parts[0].slice, fl = parts[0].flat] {
        return part_tensor(*wset, hf, sl, fl);
      };
    const DType dt = pt.dtype;
    const size_t row_elems = size_t(numel(pt.shape) / std::max<int64_t>(pt.shape[0], 1));
    pt.fill = [wset, parts, dt, row_elems](int64_t row0, int64_t n, void* dst) {
      int64_t first = 0;  // first engine row of this part
      for (const Part& p : parts) {
        const int64_t a = std::max(row0, first), b = std::min(row0 + n, first + p.rows);
        if (a < b) {
          const Tensor t = part_tensor(*wset, p.hf, p.slice);
          // Pages of a slice are dropped with the whole tensor (release), not row by row.
          const bool drop = p.slice < 0;
          char* d = static_cast<char*>(dst) + size_t(a - row0) * row_elems * dtype_size(dt);
          const size_t es = dtype_size(t.dtype);
          if (!p.block_scale.empty()) {
            // Block-wise FP8: each row's codes times its blocks' scale_inv, in FP32 (rows
            // reordered and scaled by the part's transform: DeepSeek V3's wkv_a).
            const Tensor sc = wset->get(p.block_scale);
            const RowTransform& tr = p.transform;
            const int64_t C = int64_t(row_elems), bh = p.block[0], bw = p.block[1];
            const int64_t nb = (C + bw - 1) / bw;
            std::vector<float> row(static_cast<size_t>(C)), s(static_cast<size_t>(nb));
            for (int64_t r = a; r < b; ++r) {
              const int64_t sr = tr.perm.empty() ? r - first : tr.perm[size_t(r - first)];
              to_f32(t.dtype, static_cast<const char*>(t.data) + size_t(sr) * C, row.data(),
                     row.size());
              to_f32(
                  sc.dtype,
                  static_cast<const char*>(sc.data) + size_t(sr / bh * nb) * dtype_size(sc.dtype),
                  s.data(), s.size());
              for (int64_t c = 0; c < C; ++c) row[size_t(c)] *= s[size_t(c / bw)] * tr.scale;
              from_f32(dt, row.data(), d + size_t(r - a) * row_elems * dtype_size(dt), row.size());
            }
            if (drop && tr.perm.empty())
              wset->drop_pages(p.hf, uint64_t(a - first) * row_elems,
                               uint64_t(b - first) * row_elems);
          } else if (!p.transform.identity() && !p.transpose) {
            // Reordered or scaled rows (row_transform), one at a time through F32.
            const RowTransform& tr = p.transform;
            std::vector<float> row(row_elems);
            for (int64_t r = a; r < b; ++r) {
              const int64_t sr = tr.perm.empty() ? r - first : tr.perm[size_t(r - first)];
              to_f32(t.dtype, static_cast<const char*>(t.data) + size_t(sr) * row_elems * es,
                     row.data(), row_elems);
              if (tr.scale != 1.0f)
                for (float& v : row) v *= tr.scale;
              from_f32(dt, row.data(), d + size_t(r - a) * row_elems * dtype_size(dt), row_elems);
            }
          } else if (!p.transpose) {
            convert_elems(t.dtype,
                          static_cast<const char*>(t.data) + size_t(a - first) * row_elems * es, dt,
                          d, int64_t((b - a) * row_elems));
            // Read once: let the kernel drop these pages (mapped pages count as our memory).
            if (drop)
              wset->drop_pages(p.hf, uint64_t(a - first) * row_elems * es,
                               uint64_t(b - first) * row_elems * es);
          } else {
            // Engine rows [a, b) are source columns (reordered by the transform's perm): gather
            // them through a float staging tile, reading the span of columns they come from.
            const RowTransform& tr = p.transform;
            const int64_t R = t.shape[0], C = t.shape[1], w = b - a;
            auto col = [&](int64_t r) {
              return tr.perm.empty() ? r - first : tr.perm[size_t(r - first)];
            };
            int64_t c0 = col(a), c1 = col(a);
            for (int64_t r = a; r < b; ++r) c0 = std::min(c0, col(r)), c1 = std::max(c1, col(r));
            std::vector<float> tile(static_cast<size_t>(w * R)),
                row(static_cast<size_t>(c1 - c0 + 1));
            for (int64_t i = 0; i < R; ++i) {
              to_f32(t.dtype, static_cast<const char*>(t.data) + size_t(i * C + c0) * es,
                     row.data(), row.size());
              for (int64_t j = 0; j < w; ++j)
                tile[size_t(j * R + i)] = row[size_t(col(a + j) - c0)] * tr.scale;
            }
            from_f32(dt, tile.data(), d, tile.size());
          }
        }
        first += p.rows;
      }
    };
    pt.release = [wset, parts] {
      for (const Part& p : parts) wset->drop_pages(p.hf);
    };
    out.push_back(std::move(pt));
  }
  if (awq_scales) {
    KILN_CHECK(q == WeightQuant::Int4 && ck.quant == WeightQuant::None,
               "AWQ scales apply to int4 builds of float checkpoints");
    out = apply_awq(std::move(out), c, *awq_scales);
  }
  return q == WeightQuant::None ? out : quantize_plan(std::move(out), engine_layout(c, scheme));
}

WeightPlan plan_dummy_weights(const ModelConfig& c, DType dtype, uint64_t seed,
                              const QuantScheme& q) {
  WeightPlan out;
  const auto layout = engine_layout(c);
  for (size_t ti = 0; ti < layout.size(); ++ti) {
    const auto& spec = layout[ti];
    PlannedTensor pt;
    pt.name = spec.name;
    pt.dtype = quantizes(q, spec.role) ? DType::F32 : spec.dtype(dtype);
    pt.shape = spec.shape;
    const bool is_norm = !spec.matrix() && spec.name.find("norm") != std::string::npos &&
                         spec.name.find(".bias") == std::string::npos;
    const int64_t row_elems = numel(spec.shape) / std::max<int64_t>(pt.rows(), 1);
    const DType dt = pt.dtype;
    pt.fill = [=](int64_t row0, int64_t n, void* dst) {
      // splitmix64 over chunks of 2^16 elements, each seeded from (seed, tensor, chunk): element
      // i of chunk k uses state seed_k + (i + 1) * golden, so any range is made independently.
      constexpr int64_t kChunk = 1 << 16;
      constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;
      const float amp = 0.02f * std::sqrt(3.0f);  // uniform with std 0.02
      const int64_t e0 = row0 * row_elems, e1 = (row0 + n) * row_elems;
#pragma omp parallel for schedule(static)
      for (int64_t i0 = e0; i0 < e1; i0 += 1024) {
        float buf[1024];
        const int64_t m = std::min<int64_t>(1024, e1 - i0);
        for (int64_t k = 0; k < m; ++k) {
          const int64_t i = i0 + k;
          const uint64_t chunk_seed = seed ^ (uint64_t(ti) << 40) ^ uint64_t(i / kChunk) * kGolden;
          uint64_t z = chunk_seed + uint64_t(i % kChunk + 1) * kGolden;
          z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
          z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
          z ^= z >> 31;
          const float u = float(z >> 40) / float(1 << 24) * 2.0f - 1.0f;
          buf[k] = is_norm ? 1.0f + 0.1f * u : amp * u;
        }
        from_f32(dt, buf, static_cast<char*>(dst) + size_t(i0 - e0) * dtype_size(dt), size_t(m));
      }
    };
    out.push_back(std::move(pt));
  }
  return q.q == WeightQuant::None ? out : quantize_plan(std::move(out), engine_layout(c, q));
}

WeightPlan plan_held(const std::vector<std::pair<std::string, Tensor>>& tensors) {
  WeightPlan out;
  for (const auto& [name, t] : tensors) {
    PlannedTensor pt;
    pt.name = name;
    pt.dtype = t.dtype;
    pt.shape = t.shape;
    // Init-captures: clang 14 cannot capture a structured binding by name.
    pt.view = [t = t] { return t; };
    pt.fill = [t = t](int64_t row0, int64_t n, void* dst) {
      const size_t rb = t.nbytes() / size_t(std::max<int64_t>(t.shape.empty() ? 1 : t.shape[0], 1));
      std::memcpy(dst, static_cast<const char*>(t.data) + size_t(row0) * rb, size_t(n) * rb);
    };
    out.push_back(std::move(pt));
    // A quantized weight's scales, zeros and input order are engine tensors of their own.
    std::vector<std::pair<std::string, Tensor>> extra;
    if (t.scales) extra.push_back({name + ".scale", *t.scales});
    if (t.zero_points) extra.push_back({name + ".zero", *t.zero_points});
    if (t.input_perm) extra.push_back({name + ".perm", *t.input_perm});
    for (auto& p : plan_held(extra)) out.push_back(std::move(p));
  }
  return out;
}

std::vector<std::pair<std::string, Tensor>> materialize(const WeightPlan& plan) {
  std::vector<std::pair<std::string, Tensor>> out;
  for (const auto& pt : plan) {
    if (pt.view) {
      out.push_back({pt.name, pt.view()});
      continue;
    }
    Tensor t = Tensor::zeros(pt.dtype, pt.shape);
    pt.fill(0, pt.rows(), t.data);
    out.push_back({pt.name, t});
  }
  return out;
}

}  // namespace kiln
