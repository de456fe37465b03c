// libFuzzer target: config.json (and, after the first NUL byte, generation_config.json) through
// open_config, the path of `kiln build --dummy-weights --config` (architecture lookup,
// resolve_config, generation defaults), then the engine layout it implies and the manifest
// round trip (to_json / model_config_from_json, as an engine is saved and loaded).
// kiln::Error is the expected rejection.
#include <cstdint>
#include <filesystem>
#include <string_view>

#include "arch/model_config.h"
#include "build/checkpoint.h"
#include "core/error.h"
#include "fuzz_util.h"
#include "graph/layout.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto [config, gen] =
      kiln::fuzz::split_once(std::string_view(reinterpret_cast<const char*>(data), size), '\0');
  const auto path = kiln::fuzz::write_file("config.json", config);
  const auto gen_path = kiln::fuzz::scratch_dir() / "generation_config.json";
  if (gen.empty())
    std::filesystem::remove(gen_path);
  else
    kiln::fuzz::write_file("generation_config.json", gen);
  try {
    kiln::Checkpoint ck = kiln::open_config(path);
    const kiln::ModelConfig& c = ck.config;
    KILN_FUZZ_ASSERT(ck.spec != nullptr);
    KILN_FUZZ_ASSERT(c.num_layers > 0 && int64_t(c.layers.size()) == c.num_layers);
    KILN_FUZZ_ASSERT(c.hidden_size > 0 && c.vocab_size > 0 && c.num_heads > 0);
    KILN_FUZZ_ASSERT(c.num_kv_heads > 0 && c.num_heads % c.num_kv_heads == 0);
    KILN_FUZZ_ASSERT(!c.ropes.empty());
    for (const auto& l : c.layers) KILN_FUZZ_ASSERT(l.rope >= 0 && size_t(l.rope) < c.ropes.size());
    // The layout has ~3 entries per layer and expert; configs kiln accepts may ask for millions
    // of tiny experts (a memory-hungry build, not a parser bug): the harness skips those.
    const int64_t experts = c.num_experts > 0 ? c.num_experts : 0;
    if (c.num_layers * (experts + 2) <= (int64_t(1) << 16)) {
      for (const auto& w : kiln::engine_layout(c))
        for (int64_t d : w.shape) KILN_FUZZ_ASSERT(d >= 0);
    }
    const nlohmann::json j = kiln::to_json(c);
    const kiln::ModelConfig back = kiln::model_config_from_json(j);
    KILN_FUZZ_ASSERT(kiln::to_json(back) == j);
  } catch (const kiln::Error&) {
  }
  return 0;
}
