// Architectures in no table: the known family that explains a checkpoint, if any
// (docs/architectures.md, "Architectures in no table").
#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

#include "build/checkpoint.h"

namespace kiln {

// architectures[0] of `config` (the folder's config.json, read from `file`) has no spec: the
// first family (all_arch_specs order) whose config reading succeeds, that reads every config key
// but inert ones, and whose names map every tensor of `dir` with the shapes it needs, with
// Checkpoint::inferred saying so. Otherwise kiln::Error naming, for the closest family, each key
// and tensor it does not explain.
Checkpoint infer_family(const nlohmann::json& config, const std::filesystem::path& dir,
                        const std::string& file);

}  // namespace kiln
