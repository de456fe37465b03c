// Safetensors: a validating mmap reader, a writer, and a multi-file (sharded) view.
#pragma once

#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace kiln {

struct TensorInfo {
  DType dtype;
  Shape shape;
  uint64_t begin = 0, end = 0;  // byte offsets within the data area
};

// One .safetensors file, memory-mapped. open() validates the whole header: the 8-byte length
// (inside the file, at most 100 MB), well-formed JSON, known dtypes, offsets inside the data area,
// bytes == dtype size x shape, no overlapping ranges and no duplicate names. Any violation throws
// kiln::Error naming the file and the tensor.
class SafetensorsFile {
 public:
  static std::shared_ptr<SafetensorsFile> open(const std::filesystem::path& path);

  const std::filesystem::path& path() const { return path_; }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  // Zero-copy view into the mapping when the data is suitably aligned, an aligned copy otherwise.
  Tensor get(const std::string& name) const;
  // Lets the kernel drop the mapped pages of a tensor read once (a build streaming a checkpoint):
  // they count as the process's memory until then. Tensors viewing them stay valid (re-read).
  // Only bytes [begin, end) of the tensor when end > begin.
  void drop_pages(const std::string& name, uint64_t begin = 0, uint64_t end = 0) const;
  // Hash of the header bytes: identifies the file's contents cheaply.
  uint64_t header_hash() const { return header_hash_; }

  ~SafetensorsFile();

 private:
  SafetensorsFile() = default;
  std::filesystem::path path_;
  std::shared_ptr<void> map_;
  size_t size_ = 0;
  const uint8_t* data_ = nullptr;  // start of the data area
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
  uint64_t header_hash_ = 0;
};

// One tensor of a file about to be written.
struct TensorEntry {
  std::string name;
  DType dtype;
  Shape shape;
};

// The first bytes of a safetensors file holding `entries` back to back: the 8-byte length and
// the JSON header, padded so the data area starts 64-byte aligned.
std::string safetensors_header(const std::vector<TensorEntry>& entries,
                               const std::map<std::string, std::string>& metadata = {});

// Writes tensors (in the given order, back to back) with optional __metadata__. The header is
// padded so the data area starts 64-byte aligned. Writes to `path` directly; callers that need
// atomicity write into a temporary folder.
void write_safetensors(const std::filesystem::path& path,
                       const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// All weights of a checkpoint folder: model.safetensors, or the shards listed by
// model.safetensors.index.json (every listed name must be in its shard).
// A tensor another format holds (a GGUF tensor, dequantized or rearranged on the way): what it
// will be, and how to make it.
struct VirtualTensor {
  TensorInfo info;  // dtype and shape of what make() returns (begin/end unused)
  std::function<Tensor()> make;
  std::function<void()> release;  // lets go of the source's pages (may be empty)
};

class WeightSet {
 public:
  static WeightSet open_dir(const std::filesystem::path& dir);
  // Tensors made on demand. A build reads a tensor a few rows at a time, calling get() for each
  // range: the last few tensors made are kept until drop_pages(name) (whole tensor) lets them go.
  static WeightSet from_virtual(std::map<std::string, VirtualTensor> tensors, uint64_t identity);
  std::vector<std::string> names() const;
  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const;
  Tensor get(const std::string& name) const;
  void drop_pages(const std::string& name, uint64_t begin = 0, uint64_t end = 0) const;
  // Combined identity of all files (for engine manifests).
  uint64_t identity_hash() const;
  const std::vector<std::shared_ptr<SafetensorsFile>>& files() const { return files_; }

 private:
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> where_;
  // from_virtual: the tensors, and the last ones made (most recent first; shared so that copies
  // of the set share it).
  struct Made {
    std::mutex mu;
    std::vector<std::pair<std::string, Tensor>> recent;
  };
  std::shared_ptr<const std::map<std::string, VirtualTensor>> virtual_;
  std::shared_ptr<Made> made_;
  uint64_t virtual_identity_ = 0;
};

uint64_t fnv1a(const void* data, size_t n, uint64_t h = 1469598103934665603ull);

}  // namespace kiln
