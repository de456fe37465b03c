// A Hugging Face model folder opened for building: config resolved through the architecture
// table, weights mapped to canonical names and validated all at once.
#pragma once

#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>

#include "arch/registry.h"
#include "core/tensor.h"
#include "io/safetensors.h"

namespace kiln {

struct Checkpoint {
  std::filesystem::path dir;
  const ArchSpec* spec = nullptr;
  ModelConfig config;
  nlohmann::json generation_defaults = nlohmann::json::object();
  std::string config_dtype;  // "torch_dtype"/"dtype" of config.json, if any
  uint64_t config_hash = 0;
  std::optional<WeightSet> weights;  // absent for dummy-weight builds
};

// Reads config.json (+ generation_config.json) from `dir`; `with_weights` also opens the
// safetensors. Throws kiln::Error naming the file and field.
Checkpoint open_checkpoint(const std::filesystem::path& dir, bool with_weights = true);
// A weightless checkpoint from a config.json file (for dummy-weight builds).
Checkpoint open_config(const std::filesystem::path& config_json);

// Maps the checkpoint's tensors onto engine_layout(config): renames, transposes, fuses QKV and
// gate/up, converts matrices to `dtype` and vectors to F32. Every missing, unexpected or
// mis-shaped weight is reported in one kiln::Error.
std::vector<std::pair<std::string, Tensor>> convert_weights(const Checkpoint& ck, DType dtype);

// Seeded random weights in engine layout (matrices ~ U with std 0.02, norm weights 1).
std::vector<std::pair<std::string, Tensor>> dummy_weights(const ModelConfig& c, DType dtype,
                                                          uint64_t seed);

}  // namespace kiln
