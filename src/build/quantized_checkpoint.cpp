#include "build/quantized_checkpoint.h"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <numeric>

#include "core/error.h"
#include "io/json.h"

namespace kiln {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// AWQ's GEMM packing stores 8 4-bit values per int32 in the order 0 2 4 6 1 3 5 7: value k of
// a word sits at nibble kAwqNibble[k].
constexpr int kAwqNibble[8] = {0, 4, 1, 5, 2, 6, 3, 7};

// The 4-bit value for output column o of row r of an AWQ-packed [rows, cols / 8] int32 tensor.
uint8_t awq_value(const Tensor& t, int64_t r, int64_t o) {
  const int64_t words = t.shape[1];
  return uint8_t((read_u32(t, r * words + o / 8) >> (4 * kAwqNibble[o % 8])) & 15u);
}

// The parts of a weight fused along its output rows (each with .rows): calls f(part, its first
// engine row, a, b) for the rows [a, b) of each part that overlap engine rows [row0, row0 + n).
template <typename P, typename F>
void for_part_rows(const std::vector<P>& parts, int64_t row0, int64_t n, const F& f) {
  int64_t first = 0;
  for (const P& p : parts) {
    const int64_t a = std::max(row0, first), b = std::min(row0 + n, first + p.rows);
    if (a < b) f(p, first, a, b);
    first += p.rows;
  }
}

// q[k] when present and not null.
const json* field(const json& q, const char* k) {
  return q.contains(k) && !q[k].is_null() ? &q[k] : nullptr;
}

// The bits (4) and group size (a multiple of 32, at most 4096) AWQ and GPTQ both declare.
int64_t int4_group(const json& q, const std::string& f, const char* scheme) {
  const json* bits = field(q, "bits");
  KILN_CHECK(bits && bits->is_number_integer() && bits->get<int64_t>() == 4, f,
             ": quantization_config.bits: kiln loads 4-bit ", scheme, " only");
  const json* group = field(q, "group_size");
  KILN_CHECK(group && group->is_number_integer() && group->get<int64_t>() >= 32 &&
                 group->get<int64_t>() <= 4096 && group->get<int64_t>() % 32 == 0,
             f, ": quantization_config.group_size must be a multiple of 32 (at most 4096)");
  return group->get<int64_t>();
}

// AWQ: GEMM packing, 4 bits, zero points, groups of a multiple of 32, every linear packed.
void parse_awq(const json& q, const std::string& f, Checkpoint& ck) {
  const json* version = field(q, "version");
  const std::string ver = version && version->is_string() ? version->get<std::string>() : "gemm";
  KILN_CHECK(ver == "gemm" || ver == "GEMM", f, ": quantization_config.version '",
             ver.substr(0, 32), "': kiln loads AWQ in GEMM packing only");
  const int64_t group = int4_group(q, f, "AWQ");
  const json* zp = field(q, "zero_point");
  KILN_CHECK(!zp || (zp->is_boolean() && zp->get<bool>()), f,
             ": quantization_config.zero_point: kiln loads AWQ with zero points only");
  const json* keep = field(q, "modules_to_not_convert");
  KILN_CHECK(!keep || (keep->is_array() && keep->empty()), f,
             ": quantization_config.modules_to_not_convert: AWQ checkpoints with unquantized "
             "linear layers are not supported yet");
  ck.quant = WeightQuant::Int4;
  ck.quant_group = group;
}

// GPTQ (AutoGPTQ / GPTQModel): 4 bits in groups of a multiple of 32 along the inputs, in order
// or (desc_act) in the groups each module's g_idx gives.
void parse_gptq(const json& q, const std::string& f, Checkpoint& ck) {
  const int64_t group = int4_group(q, f, "GPTQ");
  const json* act = field(q, "desc_act");
  KILN_CHECK(!act || act->is_boolean(), f, ": quantization_config.desc_act must be true or false");
  ck.act_order = act && act->get<bool>();
  const json* fmt = field(q, "checkpoint_format");
  const std::string format = fmt && fmt->is_string() ? fmt->get<std::string>() : "gptq";
  KILN_CHECK(format == "gptq" || format == "gptq_v2", f,
             ": quantization_config.checkpoint_format '", format.substr(0, 32),
             "': kiln loads gptq and gptq_v2");
  ck.quant = WeightQuant::Int4;
  ck.quant_group = group;
  ck.gptq = true;
  ck.gptq_zero_offset = format == "gptq" ? 1 : 0;
}

// compressed-tensors (llm-compressor): every config group quantizes weights the same way, one of
//   8-bit float per tensor or channel (float-quantized / naive-quantized): fp8;
//   4-bit int in groups of a multiple of 32, symmetric or not (pack-quantized): int4-wo;
//   8-bit int per channel, symmetric (pack-quantized, int-quantized or naive-quantized): int8-wo.
// Activation settings are accepted whatever they say: kiln quantizes activations per token as
// each fp8 linear runs and keeps them in 16 bits for the weight-only schemes.
void parse_compressed_tensors(const json& q, const std::string& f, Checkpoint& ck) {
  const auto str = [](const json& j, const char* k) {
    return j.is_object() && j.contains(k) && j[k].is_string() ? j[k].get<std::string>()
                                                              : std::string("unset");
  };
  const std::string format = str(q, "format");
  KILN_CHECK(
      q.contains("config_groups") && q["config_groups"].is_object() && !q["config_groups"].empty(),
      f, ": quantization_config.config_groups: missing or empty");
  std::string scheme;  // of the first group; every other must match it
  int64_t group = 0;
  bool symmetric = true, act_order = false;
  for (const auto& [name, g] : q["config_groups"].items()) {
    const json w = g.is_object() && g.contains("weights") ? g["weights"] : json();
    const auto num = [&](const char* k) {
      return w.is_object() && w.contains(k) && w[k].is_number_integer() ? w[k].get<int64_t>() : 0;
    };
    const int64_t bits = num("num_bits"), gs = num("group_size");
    const std::string type = str(w, "type"), strategy = str(w, "strategy");
    const std::string where =
        cat(f, ": quantization_config.config_groups.", name.substr(0, 32), ".weights");
    const bool sym = !(w.is_object() && w.contains("symmetric") && w["symmetric"].is_boolean() &&
                       !w["symmetric"].get<bool>());
    std::string s;
    bool ao_group = false;
    if (bits == 8 && type == "float" && (strategy == "tensor" || strategy == "channel")) {
      s = "fp8";
    } else if (bits == 4 && type == "int" && strategy == "group") {
      KILN_CHECK(gs >= 32 && gs <= 4096 && gs % 32 == 0, where,
                 ".group_size must be a multiple of 32 (at most 4096)");
      // "group" (alias "dynamic", or true) groups inputs by weight_g_idx; "weight" (alias
      // "static") only changed the order GPTQ quantized in: groups stay contiguous.
      const json* ao = w.is_object() && w.contains("actorder") ? &w["actorder"] : nullptr;
      const std::string order = !ao || ao->is_null() ? "unset"
                                : ao->is_boolean()   ? (ao->get<bool>() ? "group" : "unset")
                                                     : str(w, "actorder");
      KILN_CHECK(order == "unset" || order == "weight" || order == "static" || order == "group" ||
                     order == "dynamic",
                 where, ".actorder '", order.substr(0, 16),
                 "' is not an ordering kiln knows (group, dynamic, weight, static)");
      ao_group = order == "group" || order == "dynamic";
      s = "int4";
    } else if (bits == 8 && type == "int" && strategy == "channel") {
      KILN_CHECK(sym, where, ".symmetric: kiln loads symmetric 8-bit integer weights only");
      s = "int8";
    } else {
      throw Error(cat(where, ": ", bits, "-bit ", type.substr(0, 16), " per ",
                      strategy.substr(0, 16),
                      " is not supported yet (kiln loads FP8 per tensor or channel, 4-bit "
                      "integers in groups, 8-bit integers per channel)"));
    }
    if (scheme.empty()) scheme = s, group = gs, symmetric = sym, act_order = ao_group;
    KILN_CHECK(
        s == scheme && (s != "int4" || (gs == group && sym == symmetric && ao_group == act_order)),
        where, ": differs from the first group's scheme (kiln runs one scheme per engine)");
  }
  const bool ok = scheme == "fp8" ? format == "unset" || format == "float-quantized" ||
                                        format == "naive-quantized"
                  : scheme == "int4" ? format == "pack-quantized"
                                     : format == "pack-quantized" || format == "int-quantized" ||
                                           format == "naive-quantized";
  KILN_CHECK(ok, f, ": quantization_config.format '", format.substr(0, 32), "' does not hold ",
             scheme,
             " weights the way kiln reads them (fp8: float-quantized; int4: "
             "pack-quantized; int8: pack-quantized or int-quantized)");
  if (scheme == "fp8") {
    ck.quant = WeightQuant::Fp8;
    return;
  }
  ck.quant = scheme == "int4" ? WeightQuant::Int4 : WeightQuant::Int8;
  ck.quant_group = scheme == "int4" ? group : 0;
  ck.ct_format = format == "pack-quantized" ? format : "int-quantized";
  ck.ct_symmetric = symmetric;
  ck.act_order = act_order;
}

}  // namespace

uint32_t read_u32(const Tensor& t, int64_t i) {  // mmapped data may be unaligned
  uint32_t v;
  std::memcpy(&v, static_cast<const char*>(t.data) + size_t(i) * 4, 4);
  return v;
}

std::string fp8_scale_name(const std::string& weight) {
  return weight.ends_with(".weight") ? weight.substr(0, weight.size() - 7) + ".weight_scale"
                                     : weight + "_scale";
}

void parse_quantization_config(const json& q, const std::string& f, Checkpoint& ck) {
  // Quantized checkpoints need their scheme's kernels; loading one as floats would read packed
  // integers as weights. AWQ and GPTQ (4 bits, groups) load as int4-wo; FP8 with
  // per-tensor or per-channel weight scales (compressed-tensors float-quantized, ModelOpt FP8,
  // fbgemm_fp8, fp8 without blocks) as fp8. Other schemes are refused by name.
  std::string method = "unnamed";
  if (q.is_object())
    for (const char* k : {"quant_method", "quant_algo", "format"})
      if (q.contains(k) && q[k].is_string()) {
        method = q[k].get<std::string>();
        break;
      }
  if (method == "awq") {
    parse_awq(q, f, ck);
  } else if (method == "gptq") {
    parse_gptq(q, f, ck);
  } else if (method == "compressed-tensors") {
    parse_compressed_tensors(q, f, ck);
  } else if (method == "fp8" || method == "fbgemm_fp8") {
    if (const json* b = field(q, "weight_block_size")) {
      KILN_CHECK(method == "fp8" && b->is_array() && b->size() == 2 &&
                     (*b)[0].is_number_integer() && (*b)[1].is_number_integer() &&
                     (*b)[0].get<int64_t>() >= 1 && (*b)[0].get<int64_t>() <= 65536 &&
                     (*b)[1].get<int64_t>() >= 1 && (*b)[1].get<int64_t>() <= 65536,
                 f, ": quantization_config.weight_block_size must be [rows, cols] (1 to 65536)");
      ck.fp8_block[0] = (*b)[0].get<int64_t>();
      ck.fp8_block[1] = (*b)[1].get<int64_t>();
      return;  // dequantized as it loads (Checkpoint::fp8_block)
    }
    ck.quant = WeightQuant::Fp8;
  } else if (method == "modelopt") {
    const json* algo = field(q, "quant_algo");
    const std::string a = algo && algo->is_string() ? algo->get<std::string>() : "unnamed";
    KILN_CHECK(a == "FP8", f, ": quantization_config.quant_algo '", a.substr(0, 32),
               "': kiln loads ModelOpt FP8 only");
    ck.quant = WeightQuant::Fp8;
  } else {
    throw Error(cat(f, ": quantization_config: quantized checkpoints ('", method.substr(0, 64),
                    "') are not supported yet; kiln loads AWQ, GPTQ, FP8 (compressed-tensors, "
                    "ModelOpt, per-tensor fp8) and F32, F16 and BF16 checkpoints"));
  }
}

void parse_hf_quant_config(const fs::path& qf, Checkpoint& ck) {
  std::ifstream in(qf, std::ios::binary);
  if (!in) throw Error(cat(qf.string(), ": cannot open"));
  const json j = parse_json(
      std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>()),
      qf.string());
  // ModelOpt's own description: {"quantization": {"quant_algo": ..., "kv_cache_quant_algo":
  // ...}}. FP8 loads as fp8; a KV-cache scheme's scales are not used (kiln's cache stays in
  // the engine dtype).
  const json* qz = j.is_object() && j.contains("quantization") ? &j["quantization"] : nullptr;
  const std::string algo =
      qz && qz->is_object() && qz->contains("quant_algo") && (*qz)["quant_algo"].is_string()
          ? (*qz)["quant_algo"].get<std::string>()
          : "unnamed";
  KILN_CHECK(algo == "FP8", qf.string(), ": quantization.quant_algo '", algo.substr(0, 32),
             "': kiln loads ModelOpt FP8 only");
  KILN_CHECK(ck.quant == WeightQuant::None || ck.quant == WeightQuant::Fp8, qf.string(),
             ": disagrees with config.json's quantization_config");
  ck.quant = WeightQuant::Fp8;
}

// An engine int4-wo weight (codes, scales, zeros) from AWQ or GPTQ modules fused along the
// output rows.
WeightPlan plan_int4_packed(const std::shared_ptr<WeightSet>& wset, const std::string& name,
                            const std::vector<std::string>& modules, const Checkpoint& ck) {
  struct P {
    std::string base;
    int64_t rows;
  };
  std::vector<P> parts;
  int64_t rows = 0, in = 0;
  const int64_t group = ck.quant_group;
  const bool gptq = ck.gptq, ct = !ck.ct_format.empty(), ct_sym = ck.ct_symmetric;
  const int zoff = ck.gptq_zero_offset;
  const std::string qname = ct ? ".weight_packed" : ".qweight";
  for (const std::string& base : modules) {
    // AWQ [in, out / 8], GPTQ [in / 8, out], compressed-tensors [out, in / 8]
    const Shape& qs = wset->info(base + qname).shape;
    const int64_t out = ct ? qs[0] : gptq ? qs[1] : 8 * qs[1];
    parts.push_back({base, out});
    rows += out;
    in = ct ? 8 * qs[1] : gptq ? 8 * qs[0] : qs[0];
  }
  const int64_t G = in / group;
  // Calls f(part, first engine row of the part, a, b) for the part rows overlapping [row0, row0+n).
  const auto each = [parts](int64_t row0, int64_t n, const auto& f) {
    for_part_rows(parts, row0, n, f);
  };
  // Act-order: engine column j holds input perm[j], the inputs sorted by group (stably), so that
  // column j is in group j / group as kiln's kernels read it; pos[c] is where input c goes. The
  // checkpoint was validated to have exactly `group` inputs per group, and fused parts must agree.
  std::vector<int32_t> perm(static_cast<size_t>(in)), pos(static_cast<size_t>(in));
  std::iota(perm.begin(), perm.end(), 0);
  if (ck.act_order) {
    const std::string gname = ct ? ".weight_g_idx" : ".g_idx";
    std::vector<int32_t> first_gidx;
    for (const P& p : parts) {
      const Tensor gi = wset->get(p.base + gname);
      std::vector<int32_t> g(static_cast<size_t>(in));
      for (int64_t c = 0; c < in; ++c) g[size_t(c)] = int32_t(read_u32(gi, c));
      if (first_gidx.empty()) first_gidx = g;
      KILN_CHECK(g == first_gidx, ck.dir.string(), ": ", p.base, gname, " differs from ",
                 parts[0].base, gname, ": kiln fuses these modules into ", name,
                 " and needs one input order for them (they share their input)");
    }
    std::stable_sort(perm.begin(), perm.end(), [&](int32_t a, int32_t b) {
      return first_gidx[size_t(a)] < first_gidx[size_t(b)];
    });
  }
  for (int64_t j = 0; j < in; ++j) pos[size_t(perm[size_t(j)])] = int32_t(j);
  PlannedTensor codes, scales, zeros, order;
  codes.name = name;
  codes.dtype = DType::U8;
  codes.shape = {rows, in / 2};
  codes.fill = [wset, each, in, gptq, ct, qname, pos](int64_t row0, int64_t n, void* dst) {
    auto* d = static_cast<uint8_t*>(dst);
    std::memset(d, 0, size_t(n * in / 2));
    each(row0, n, [&](const P& p, int64_t first, int64_t a, int64_t b) {
      const Tensor qw = wset->get(p.base + qname);
      if (ct) {  // word [o, c / 8] holds inputs c in order, each stored + 8, kiln's zero 8
        for (int64_t o = a; o < b; ++o)
          for (int64_t c = 0; c < in; ++c) {
            const int64_t j = pos[size_t(c)];
            d[(o - row0) * (in / 2) + j / 2] |=
                uint8_t(((read_u32(qw, (o - first) * (in / 8) + c / 8) >> (4 * (c % 8))) & 15u)
                        << (4 * (j % 2)));
          }
        return;
      }
      for (int64_t c = 0; c < in; ++c) {  // the packed rows are input features
        const int64_t j = pos[size_t(c)];
        for (int64_t o = a; o < b; ++o) {
          // GPTQ: input c is value c % 8 (in order) of word [c / 8, o].
          const uint8_t v =
              gptq ? uint8_t((read_u32(qw, (c / 8) * p.rows + (o - first)) >> (4 * (c % 8))) & 15u)
                   : awq_value(qw, c, o - first);
          d[(o - row0) * (in / 2) + j / 2] |= uint8_t(v << (4 * (j % 2)));
        }
      }
    });
  };
  scales.name = name + ".scale";
  scales.dtype = DType::F32;
  scales.shape = {rows, G};
  scales.fill = [wset, each, G, ct](int64_t row0, int64_t n, void* dst) {
    auto* d = static_cast<float*>(dst);
    each(row0, n, [&](const P& p, int64_t first, int64_t a, int64_t b) {
      if (ct) {  // weight_scale [out, G]: the engine's layout
        const Tensor sc = wset->get(p.base + ".weight_scale");
        to_f32(sc.dtype,
               static_cast<const char*>(sc.data) + size_t((a - first) * G) * dtype_size(sc.dtype),
               d + (a - row0) * G, size_t((b - a) * G));
        return;
      }
      const Tensor sc = wset->get(p.base + ".scales");  // [G, out]
      std::vector<float> row(static_cast<size_t>(b - a));
      const size_t es = dtype_size(sc.dtype);
      for (int64_t g = 0; g < G; ++g) {
        to_f32(sc.dtype, static_cast<const char*>(sc.data) + size_t(g * p.rows + a - first) * es,
               row.data(), row.size());
        for (int64_t o = a; o < b; ++o) d[(o - row0) * G + g] = row[size_t(o - a)];
      }
    });
  };
  zeros.name = name + ".zero";
  zeros.dtype = DType::U8;
  zeros.shape = {rows, G};
  zeros.fill = [wset, each, G, gptq, zoff, ct, ct_sym](int64_t row0, int64_t n, void* dst) {
    auto* d = static_cast<uint8_t*>(dst);
    each(row0, n, [&](const P& p, int64_t first, int64_t a, int64_t b) {
      if (ct) {
        if (ct_sym) {  // the stored offset: signed value + 8
          std::memset(d + (a - row0) * G, 8, size_t((b - a) * G));
          return;
        }
        // weight_zero_point [out / 8, G]: word [o / 8, g] holds outputs in order, each + 8, so
        // the stored nibble is kiln's zero.
        const Tensor zp = wset->get(p.base + ".weight_zero_point");
        for (int64_t o = a; o < b; ++o)
          for (int64_t g = 0; g < G; ++g) {
            const int64_t oo = o - first;
            d[(o - row0) * G + g] =
                uint8_t((read_u32(zp, (oo / 8) * G + g) >> (4 * (oo % 8))) & 15u);
          }
        return;
      }
      const Tensor qz = wset->get(p.base + ".qzeros");  // [G, out / 8]
      for (int64_t g = 0; g < G; ++g)
        for (int64_t o = a; o < b; ++o) {
          const int64_t oo = o - first;
          // GPTQ's v1 format stores zero - 1 (so a zero of 0 is stored as 15): add it back.
          d[(o - row0) * G + g] =
              gptq ? uint8_t(((read_u32(qz, g * (p.rows / 8) + oo / 8) >> (4 * (oo % 8))) + zoff) &
                             15u)
                   : awq_value(qz, g, oo);
        }
    });
  };
  zeros.release = [wset, parts] {
    for (const P& p : parts)
      for (const char* t : {".qweight", ".qzeros", ".scales", ".g_idx", ".weight_packed",
                            ".weight_scale", ".weight_zero_point"})
        if (wset->contains(p.base + t)) wset->drop_pages(p.base + t);
  };
  WeightPlan r;
  r.push_back(std::move(codes));
  r.push_back(std::move(scales));
  r.push_back(std::move(zeros));
  if (ck.act_order) {
    order.name = name + ".perm";
    order.dtype = DType::I32;
    order.shape = {in};
    order.fill = [perm](int64_t row0, int64_t n, void* dst) {
      std::memcpy(dst, perm.data() + row0, size_t(n) * 4);
    };
    r.push_back(std::move(order));
  }
  return r;
}

WeightPlan plan_int8_ct(const std::shared_ptr<WeightSet>& wset, const std::string& name,
                        const std::vector<std::string>& modules, const Checkpoint& ck) {
  struct P {
    std::string base;
    int64_t rows;
  };
  const bool packed = ck.ct_format == "pack-quantized";
  const std::string qname = packed ? ".weight_packed" : ".weight";
  std::vector<P> parts;
  int64_t rows = 0, in = 0;
  for (const std::string& base : modules) {
    const Shape& qs = wset->info(base + qname).shape;  // packed [out, in / 4]; plain [out, in]
    parts.push_back({base, qs[0]});
    rows += qs[0];
    in = packed ? 4 * qs[1] : qs[1];
  }
  const auto each = [parts](int64_t row0, int64_t n, const auto& f) {
    for_part_rows(parts, row0, n, f);
  };
  PlannedTensor codes, scales;
  codes.name = name;
  codes.dtype = DType::I8;
  codes.shape = {rows, in};
  codes.fill = [wset, each, in, packed, qname](int64_t row0, int64_t n, void* dst) {
    auto* d = static_cast<int8_t*>(dst);
    each(row0, n, [&](const P& p, int64_t first, int64_t a, int64_t b) {
      const Tensor qw = wset->get(p.base + qname);
      if (!packed) {
        std::memcpy(d + (a - row0) * in, static_cast<const int8_t*>(qw.data) + (a - first) * in,
                    size_t((b - a) * in));
        return;
      }
      for (int64_t o = a; o < b; ++o)  // word [o, c / 4] holds inputs c in order, each + 128
        for (int64_t c = 0; c < in; ++c)
          d[(o - row0) * in + c] = int8_t(
              int((read_u32(qw, (o - first) * (in / 4) + c / 4) >> (8 * (c % 4))) & 255u) - 128);
    });
  };
  scales.name = name + ".scale";
  scales.dtype = DType::F32;
  scales.shape = {rows};
  scales.fill = [wset, each](int64_t row0, int64_t n, void* dst) {
    auto* d = static_cast<float*>(dst);
    each(row0, n, [&](const P& p, int64_t first, int64_t a, int64_t b) {
      const Tensor sc = wset->get(p.base + ".weight_scale");  // [out, 1]
      to_f32(sc.dtype, static_cast<const char*>(sc.data) + size_t(a - first) * dtype_size(sc.dtype),
             d + (a - row0), size_t(b - a));
    });
  };
  scales.release = [wset, parts, qname] {
    for (const P& p : parts)
      wset->drop_pages(p.base + qname), wset->drop_pages(p.base + ".weight_scale");
  };
  WeightPlan r;
  r.push_back(std::move(codes));
  r.push_back(std::move(scales));
  return r;
}

// An engine fp8 weight (codes, per-row scales) from FP8 checkpoint weights fused along the
// output rows: the codes as published, each part's scale repeated over its rows (per tensor) or
// taken row by row (per channel). Nothing is requantized.
WeightPlan plan_fp8(const std::shared_ptr<WeightSet>& wset, const std::string& name,
                    const std::vector<std::string>& weights) {
  struct P {
    std::string weight, scale;
    int64_t rows;
  };
  std::vector<P> parts;
  int64_t rows = 0, in = 0;
  for (const std::string& hf : weights) {
    const Shape& s = wset->info(hf).shape;
    const std::string sc = fp8_scale_name(hf);
    parts.push_back({hf, sc, s[0]});
    rows += s[0];
    in = s[1];
  }
  const auto each = [parts](int64_t row0, int64_t n, const auto& f) {
    for_part_rows(parts, row0, n, f);
  };
  PlannedTensor codes, scales;
  codes.name = name;
  codes.dtype = DType::F8_E4M3;
  codes.shape = {rows, in};
  codes.fill = [wset, each, in](int64_t row0, int64_t n, void* dst) {
    each(row0, n, [&](const P& p, int64_t first, int64_t a, int64_t b) {
      const Tensor w = wset->get(p.weight);
      std::memcpy(static_cast<char*>(dst) + size_t((a - row0) * in),
                  static_cast<const char*>(w.data) + size_t((a - first) * in),
                  size_t((b - a) * in));
      wset->drop_pages(p.weight, uint64_t((a - first) * in), uint64_t((b - first) * in));
    });
  };
  scales.name = name + ".scale";
  scales.dtype = DType::F32;
  scales.shape = {rows};
  scales.fill = [wset, each](int64_t row0, int64_t n, void* dst) {
    auto* d = static_cast<float*>(dst);
    each(row0, n, [&](const P& p, int64_t first, int64_t a, int64_t b) {
      const Tensor sc = wset->get(p.scale);
      std::vector<float> v(static_cast<size_t>(sc.numel()));
      to_f32(sc.dtype, sc.data, v.data(), v.size());
      for (int64_t r = a; r < b; ++r) d[r - row0] = v.size() == 1 ? v[0] : v[size_t(r - first)];
    });
  };
  scales.release = [wset, parts] {
    for (const P& p : parts) wset->drop_pages(p.weight), wset->drop_pages(p.scale);
  };
  WeightPlan r;
  r.push_back(std::move(codes));
  r.push_back(std::move(scales));
  return r;
}

}  // namespace kiln
