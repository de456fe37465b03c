// libFuzzer target: an architecture spec (`--arch-spec FILE`, docs/architectures.md) and, after
// the first NUL byte, a config.json read through it: parse_arch_spec (extends, merges, variants,
// every name checked), then resolve_config with the spec as parsed (variants are parsed and
// checked but not applied: specialize_arch caches into the registry). Nothing is added to the
// registry, so memory stays flat over a run.
// kiln::Error is the expected rejection.
#include <cstdint>
#include <string>
#include <string_view>

#include "arch/registry.h"
#include "core/error.h"
#include "fuzz_util.h"
#include "io/json.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto [spec_text, config_text] =
      kiln::fuzz::split_once(std::string_view(reinterpret_cast<const char*>(data), size), '\0');
  try {
    const kiln::ArchSpec a = kiln::parse_arch_spec(std::string(spec_text), "spec.json");
    KILN_FUZZ_ASSERT(!a.name.empty() && !a.tensors.empty());
    if (config_text.empty()) return 0;
    const nlohmann::json c = kiln::parse_json(config_text, "config.json");
    const kiln::ModelConfig m = kiln::resolve_config(a, c, "config.json");
    KILN_FUZZ_ASSERT(m.num_layers > 0 && int64_t(m.layers.size()) == m.num_layers);
    for (const auto& l : m.layers) KILN_FUZZ_ASSERT(l.rope >= 0 && size_t(l.rope) < m.ropes.size());
    KILN_FUZZ_ASSERT(m.num_kv_heads > 0 && m.num_heads % m.num_kv_heads == 0);
  } catch (const kiln::Error&) {
  }
  return 0;
}
