// A whole file mapped read-only, shared by the validating readers (safetensors, GGUF).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>

namespace kiln {

struct MappedFile {
  std::shared_ptr<void> map;  // unmapped when the last owner lets go
  size_t size = 0;
  const uint8_t* data() const { return static_cast<const uint8_t*>(map.get()); }
};

// Maps `path` (MAP_PRIVATE, read-only). A file shorter than `min_size` bytes is refused as a
// truncated `kind` file; every failure is a kiln::Error naming the file.
MappedFile map_file(const std::filesystem::path& path, size_t min_size, const char* kind);

}  // namespace kiln
