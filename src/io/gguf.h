// GGUF (llama.cpp's model file): a validating mmap reader and the CPU dequantization of ggml's
// block formats. The reader checks the whole header before anything uses it (magic, version,
// counts, string and array lengths, value types, tensor ranks, dimensions, types, sizes, offsets,
// alignment, overlaps, duplicate names) and names the file and the field or tensor in a one-line
// kiln::Error. Mapping GGUF names and metadata onto kiln's architectures is build/gguf_checkpoint.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace kiln {

// ggml's tensor types, by their numbers in the file (ggml.h's enum ggml_type).
enum class GgmlType : uint32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q8_1 = 9,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  Q8_K = 15,
  BF16 = 30,
};

// "Q4_K", ... ; "type <n>" for a number kiln does not know.
std::string ggml_type_name(uint32_t type);
// Whether kiln reads (dequantizes) tensors of this type: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1,
// Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.
bool ggml_type_supported(uint32_t type);
// Elements per block (1 for F32/F16/BF16, 32 for Q4_0..Q8_0, 256 for the K types) and bytes per
// block. Only for supported types.
int64_t ggml_block_elems(GgmlType t);
size_t ggml_block_bytes(GgmlType t);
// Dequantizes n elements (a whole number of blocks) of type t at src into dst, exactly as ggml's
// dequantize_row_* (ggml-quants.c) computes them.
void ggml_dequantize(GgmlType t, const void* src, float* dst, int64_t n);

struct GgufTensorInfo {
  std::string name;
  GgmlType type = GgmlType::F32;
  // GGUF order: ne[0] is the contiguous (innermost) dimension, as ggml keeps it.
  std::vector<int64_t> ne;
  uint64_t offset = 0;  // from the start of the data area
  size_t nbytes = 0;
  // The row-major shape kiln (and safetensors) use: ne reversed, e.g. a weight [out, in].
  Shape shape() const { return Shape(ne.rbegin(), ne.rend()); }
  int64_t numel() const { return kiln::numel(shape()); }
};

class GgufFile {
 public:
  // Opens and validates `path` (GGUF version 2 or 3). Throws kiln::Error naming the file and
  // what is wrong.
  static std::shared_ptr<GgufFile> open(const std::filesystem::path& path);

  const std::filesystem::path& path() const { return path_; }
  uint32_t version() const { return version_; }
  // Every key-value pair: integers, floats, bools and strings as JSON values, arrays (of any
  // depth) as JSON arrays. Strings are kept byte for byte (they may not be valid UTF-8).
  const nlohmann::json& metadata() const { return metadata_; }
  // Tensors in file order.
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  // The tensor named `name`, or null.
  const GgufTensorInfo* find(const std::string& name) const;
  // The tensor's bytes in the mapping.
  const uint8_t* data(const GgufTensorInfo& t) const { return data_ + t.offset; }
  // The tensor as F32 [shape()] in a new buffer (dequantized or converted).
  Tensor to_f32(const GgufTensorInfo& t) const;
  // Lets the kernel drop the mapped pages of a tensor read once.
  void drop_pages(const GgufTensorInfo& t) const;
  // Hash of the header bytes (metadata and tensor infos): identifies the file cheaply.
  uint64_t header_hash() const { return header_hash_; }

  ~GgufFile();

 private:
  GgufFile() = default;
  std::filesystem::path path_;
  std::shared_ptr<void> map_;
  size_t size_ = 0;
  uint32_t version_ = 0;
  const uint8_t* data_ = nullptr;  // start of the data area
  size_t data_size_ = 0;           // bytes from data_ to the end of the file
  nlohmann::json metadata_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  uint64_t header_hash_ = 0;
};

// Whether `path` starts with the GGUF magic (a regular file).
bool is_gguf_file(const std::filesystem::path& path);

}  // namespace kiln
