// Engine folders on disk: written by streaming a weight plan through a bounded buffer, and
// verified against the per-tensor checksums their manifest records.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "build/checkpoint.h"
#include "kiln/kiln.h"

namespace kiln {

constexpr const char* kEngineManifest = "kiln-engine.json";
constexpr const char* kEngineWeights = "weights.safetensors";
// Files copied from the source folder when present (tokenizer, chat template, sampling defaults).
inline const std::vector<std::string>& engine_tokenizer_files() {
  static const std::vector<std::string> k = {"tokenizer.json",        "tokenizer_config.json",
                                             "tokenizer.model",       "special_tokens_map.json",
                                             "chat_template.jinja",   "chat_template.json",
                                             "generation_config.json"};
  return k;
}

// Bytes of the staging buffer a write streams tensors through (a tensor row larger than this is
// staged whole).
constexpr size_t kWriteChunkBytes = size_t(64) << 20;

struct EngineFolder {
  nlohmann::json manifest;              // kiln writes "checksums" and "files" into it
  std::filesystem::path tokenizer_dir;  // copy its tokenizer files (may be empty)
  std::function<void(const BuildProgress&)> progress;
  size_t chunk_bytes = kWriteChunkBytes;  // staging buffer (tests make it tiny)
};

// Writes the engine folder `out` from `plan`:
// - first estimates disk (the whole folder) and memory (the staging buffer) and throws with both
//   figures when the free space or available memory is short;
// - converts each tensor a chunk of rows at a time, hashing it (XXH3-64) into the manifest, and
//   reports progress after each chunk;
// - writes into a temporary folder next to `out` that SIGINT, SIGTERM or any error removes
//   ("nothing was written"); temporaries of killed builds into the same folder are removed first;
// - then moves the new files into place, manifest last. Over an existing engine it replaces and
//   removes only files that engine's manifest says kiln wrote, never others.
void write_engine_folder(const std::filesystem::path& out, const WeightPlan& plan,
                         EngineFolder folder);
// The same with several weight files, each with its plan (a sharded engine: one per rank). The
// manifest's "weights" then lists them and its checksums are per file.
void write_engine_folder(const std::filesystem::path& out,
                         const std::vector<std::pair<std::string, WeightPlan>>& weight_files,
                         EngineFolder folder);

// Re-hashes every tensor of the engine folder's weights file against its manifest's checksums,
// and the tokenizer and template files the build copied. Throws kiln::Error listing the tensors
// that differ (or that the manifest has no checksum for), or naming the copied file.
// Returns the number of bytes checked.
uint64_t verify_checksums(const std::filesystem::path& dir, const nlohmann::json& manifest,
                          const std::function<void(const BuildProgress&)>& progress = {});
// One weight file of the folder against its tensors' checksums.
uint64_t verify_file(const std::filesystem::path& dir, const std::string& weights,
                     const nlohmann::json& tensor_sums,
                     const std::function<void(const BuildProgress&)>& progress = {});

}  // namespace kiln
