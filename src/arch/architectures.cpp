// The architecture registry: the specs in src/arch/specs/*.json (compiled in, in the order of
// CMake's KILN_ARCH_SPECS) plus any added at run time with add_arch_spec (--arch-spec FILE).
// docs/architectures.md describes the format.
#include <algorithm>
#include <deque>
#include <fstream>
#include <iterator>
#include <mutex>
#include <utility>

#include "arch/registry.h"
#include "core/error.h"
#include "io/json.h"

namespace kiln {

namespace {

using json = nlohmann::json;

struct Embedded {
  const char* file;
  const char* text;
};
const Embedded kEmbedded[] = {
#include "arch_specs.inc"
};

// Specs are never freed (a Checkpoint holds a pointer to its spec); `order` is the lookup and
// matching order, a name added again replacing its entry in place.
struct Registry {
  std::mutex mu;
  std::deque<ArchSpec> store;
  std::vector<const ArchSpec*> order;
};

const std::vector<std::string> kSpecFields = {"name",
                                              "doc",
                                              "extends",
                                              "tensors",
                                              "ignored",
                                              "knobs",
                                              "keys",
                                              "knob_keys",
                                              "sliding_period",
                                              "default_act",
                                              "intermediate_mult",
                                              "norm_topk_default",
                                              "constants",
                                              "unsupported",
                                              "variants",
                                              "config_defaults"};

template <typename T>
T field(const json& j, const char* key, const std::string& file) {
  try {
    return j.at(key).get<T>();
  } catch (const json::exception&) {
    throw Error(cat(file, ": field '", key, "' has the wrong type"));
  }
}

TensorRule parse_rule(const json& r, const std::string& file) {
  // ["hf", "canonical"] or {"hf": ..., "canonical": ..., and the flags of TensorRule}
  if (r.is_array()) {
    if (r.size() != 2 || !r[0].is_string() || !r[1].is_string())
      throw Error(
          cat(file, ": a tensor rule must be [\"hf name\", \"canonical name\"] or an object"));
    return {r[0].get<std::string>(), r[1].get<std::string>()};
  }
  if (!r.is_object() || !r.contains("hf") || !r.contains("canonical"))
    throw Error(cat(file, ": a tensor rule object needs 'hf' and 'canonical'"));
  for (const auto& [k, v] : r.items())
    if (k != "hf" && k != "canonical" && k != "transpose" && k != "qkv_per_head" &&
        k != "stacked_experts" && k != "interleaved_gate_up")
      throw Error(cat(file, ": unknown tensor rule field '", k, "'"));
  TensorRule t{field<std::string>(r, "hf", file), field<std::string>(r, "canonical", file)};
  if (r.contains("transpose")) t.transpose = field<bool>(r, "transpose", file);
  if (r.contains("qkv_per_head")) t.qkv_per_head = field<bool>(r, "qkv_per_head", file);
  if (r.contains("stacked_experts")) t.stacked_experts = field<bool>(r, "stacked_experts", file);
  if (r.contains("interleaved_gate_up"))
    t.interleaved_gate_up = field<bool>(r, "interleaved_gate_up", file);
  return t;
}

// Parses one spec; `base` is the spec it extends (or nullptr). Knobs, keys, knob_keys,
// constants and config_defaults merge entry by entry over the base's (null removes a key or knob
// key); tensors merge by HF name (a rule for a name the base has replaces it); every other field,
// when present, replaces the base's.
ArchSpec parse_spec(const json& j, const std::string& file, const ArchSpec* base) {
  if (!j.is_object()) throw Error(cat(file, ": an architecture spec must be a JSON object"));
  for (const auto& [k, v] : j.items())
    if (std::find(kSpecFields.begin(), kSpecFields.end(), k) == kSpecFields.end())
      throw Error(cat(file, ": unknown field '", k, "'"));
  ArchSpec a = base ? *base : ArchSpec{};
  if (!j.contains("name") || !j["name"].is_string() || j["name"].get<std::string>().empty())
    throw Error(cat(file, ": missing field 'name' (the Hugging Face architectures[0])"));
  a.name = j["name"].get<std::string>();
  if (j.contains("knobs")) {
    json k = to_json_knobs(a.knobs);
    if (!j["knobs"].is_object()) throw Error(cat(file, ": field 'knobs' must be an object"));
    for (const auto& [name, v] : j["knobs"].items()) {
      if (!k.contains(name)) throw Error(cat(file, ": unknown knob '", name, "'"));
      k[name] = v;
    }
    a.knobs = knobs_from_json(k, file);
  }
  if (j.contains("tensors")) {
    if (!j["tensors"].is_array()) throw Error(cat(file, ": field 'tensors' must be a list"));
    for (const auto& r : j["tensors"]) {
      TensorRule t = parse_rule(r, file);
      auto it = std::find_if(a.tensors.begin(), a.tensors.end(),
                             [&](const TensorRule& x) { return x.hf == t.hf; });
      if (it != a.tensors.end())
        *it = t;
      else
        a.tensors.push_back(t);
    }
  }
  if (j.contains("ignored")) a.ignored = field<std::vector<std::string>>(j, "ignored", file);
  // keys / knob_keys merge entry by entry; null removes the base's entry.
  if (j.contains("keys")) {
    if (!j["keys"].is_object()) throw Error(cat(file, ": field 'keys' must be an object"));
    for (const auto& [k, v] : j["keys"].items()) {
      if (v.is_null())
        a.keys.erase(k);
      else if (v.is_array() &&
               std::all_of(v.begin(), v.end(), [](const json& x) { return x.is_string(); }))
        a.keys[k] = v.get<std::vector<std::string>>();
      else
        throw Error(cat(file, ": keys.", k, " must be a list of config keys (or null)"));
    }
  }
  if (j.contains("knob_keys")) {
    if (!j["knob_keys"].is_object())
      throw Error(cat(file, ": field 'knob_keys' must be an object"));
    for (const auto& [k, v] : j["knob_keys"].items()) {
      if (v.is_null())
        a.knob_keys.erase(k);
      else if (v.is_string())
        a.knob_keys[k] = v.get<std::string>();
      else
        throw Error(cat(file, ": knob_keys.", k, " must be a config key (or null)"));
    }
  }
  if (j.contains("sliding_period")) a.sliding_period = field<int>(j, "sliding_period", file);
  if (j.contains("default_act")) a.default_act = field<std::string>(j, "default_act", file);
  if (j.contains("intermediate_mult"))
    a.intermediate_mult = field<int64_t>(j, "intermediate_mult", file);
  if (j.contains("norm_topk_default"))
    a.norm_topk_default = field<bool>(j, "norm_topk_default", file);
  if (j.contains("constants"))
    for (const auto& [k, v] : field<std::map<std::string, int64_t>>(j, "constants", file))
      a.constants[k] = v;
  if (j.contains("unsupported")) a.unsupported = field<std::string>(j, "unsupported", file);
  if (j.contains("config_defaults")) {
    if (!j["config_defaults"].is_object())
      throw Error(cat(file, ": field 'config_defaults' must be an object"));
    for (const auto& [k, v] : j["config_defaults"].items()) a.config_defaults[k] = v;
  }
  if (j.contains("variants")) {
    if (!j["variants"].is_array()) throw Error(cat(file, ": field 'variants' must be a list"));
    a.variants.clear();
    for (const auto& v : j["variants"]) {
      if (!v.is_object() || !v.contains("when") || !v["when"].is_object() || v["when"].empty())
        throw Error(cat(file, ": a variant needs a non-empty 'when' object of config values"));
      json part = v;
      part.erase("when");
      for (const char* k : {"name", "extends", "variants"})
        if (part.contains(k)) throw Error(cat(file, ": a variant cannot set '", k, "'"));
      ArchSpec::Variant var{v["when"], part};
      a.variants.push_back(var);
    }
  }
  // Each variant must make a valid spec on its own over this one (checked now, not at build).
  for (const auto& v : a.variants) {
    json part = v.spec;
    part["name"] = a.name;
    ArchSpec probe = a;
    probe.variants.clear();
    (void)parse_spec(part, cat(file, " (variant when ", v.when.dump(), ")"), &probe);
  }
  if (a.tensors.empty()) throw Error(cat(file, ": the spec maps no tensors"));
  check_spec(a, file);
  return a;
}

const ArchSpec* find_locked(Registry& r, const std::string& name) {
  for (const ArchSpec* a : r.order)
    if (a->name == name) return a;
  return nullptr;
}

ArchSpec parse_locked(Registry& r, const json& j, const std::string& file) {
  const ArchSpec* base = nullptr;
  if (j.is_object() && j.contains("extends")) {
    if (!j["extends"].is_string()) throw Error(cat(file, ": field 'extends' must be a string"));
    const std::string b = j["extends"].get<std::string>();
    base = find_locked(r, b);
    if (!base) throw Error(cat(file, ": extends '", b, "', which is not a known architecture"));
  }
  return parse_spec(j, file, base);
}

const ArchSpec& add_locked(Registry& r, const json& j, const std::string& file) {
  r.store.push_back(parse_locked(r, j, file));
  const ArchSpec* a = &r.store.back();
  for (auto& p : r.order)
    if (p->name == a->name) return *(p = a);  // an override keeps its place in the order
  r.order.push_back(a);
  return *a;
}

Registry& registry() {
  static Registry* r = [] {
    auto* reg = new Registry;
    for (const Embedded& e : kEmbedded)
      add_locked(*reg, parse_json(e.text, cat("src/arch/specs/", e.file)),
                 cat("src/arch/specs/", e.file));
    return reg;
  }();
  return *r;
}

}  // namespace

const ArchSpec& specialize_arch(const ArchSpec& a, const json& config, const std::string& file,
                                std::set<std::string>* used_keys) {
  std::vector<size_t> picked;  // the matching variants, in order
  std::string key = cat(a.name, "#", static_cast<const void*>(&a), "#");
  for (size_t i = 0; i < a.variants.size(); ++i) {
    bool all = true;
    for (const auto& [k, want] : a.variants[i].when.items()) {
      if (used_keys && config.contains(k)) used_keys->insert(k);
      const json have = config.contains(k) && !config[k].is_null() ? config[k]
                        : a.config_defaults.contains(k)            ? a.config_defaults[k]
                                                                   : json();
      all = all && have == want;
    }
    if (all) {
      picked.push_back(i);
      key += cat(i, ",");
    }
  }
  const ArchSpec* out = &a;
  if (!picked.empty()) {
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mu);
    for (const ArchSpec& d : r.store)
      if (d.cache_key == key) out = &d;
    if (out == &a) {
      ArchSpec s = a;
      s.variants.clear();
      for (const size_t i : picked) {
        json part = a.variants[i].spec;
        part["name"] = a.name;
        s = parse_spec(part, file, &s);
      }
      s.cache_key = key;
      r.store.push_back(std::move(s));
      out = &r.store.back();
    }
  }
  if (!out->unsupported.empty())
    throw Error(cat(file, ": ", a.name, " ", out->unsupported, " is not supported"));
  return *out;
}

std::vector<std::string> supported_architectures() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  std::vector<std::string> names;
  for (const ArchSpec* a : r.order) names.push_back(a->name);
  return names;
}

std::vector<const ArchSpec*> all_arch_specs() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  return r.order;
}

const ArchSpec* try_find_arch(const std::string& name) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  return find_locked(r, name);
}

const ArchSpec& find_arch(const std::string& name) {
  if (const ArchSpec* a = try_find_arch(name)) return *a;
  std::string list;
  for (const auto& n : supported_architectures()) list += (list.empty() ? "" : ", ") + n;
  throw Error(cat("unsupported architecture '", name, "' (supported: ", list, ")"));
}

ArchSpec parse_arch_spec(const std::string& text, const std::string& file) {
  const json j = parse_json(text, file);
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  return parse_locked(r, j, file);
}

const ArchSpec& add_arch_spec(const std::string& text, const std::string& file) {
  const json j = parse_json(text, file);
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  return add_locked(r, j, file);
}

const ArchSpec& add_arch_spec_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(cat(path, ": cannot open"));
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  KILN_CHECK(text.size() <= (size_t(1) << 20), path,
             ": larger than 1 MiB (not an architecture spec)");
  return add_arch_spec(text, path);
}

}  // namespace kiln
