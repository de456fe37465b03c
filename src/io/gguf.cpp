#include "io/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <new>
#include <string_view>

#include "core/error.h"
#include "io/mapped_file.h"
#include "io/safetensors.h"

namespace kiln {

namespace fs = std::filesystem;
using json = nlohmann::json;

static_assert(std::endian::native == std::endian::little, "GGUF files are read little-endian");

namespace {

// ---------------------------------------------------------------------------------------------
// ggml types

struct TypeTraits {
  const char* name;
  int64_t block_elems;  // 0: kiln does not read the type
  size_t block_bytes;
};

// By ggml.h's enum ggml_type; numbers without a name were removed from ggml.
constexpr TypeTraits kTypes[] = {
    {"F32", 1, 4},      {"F16", 1, 2},      {"Q4_0", 32, 18},   {"Q4_1", 32, 20},
    {nullptr, 0, 0},    {nullptr, 0, 0},    {"Q5_0", 32, 22},   {"Q5_1", 32, 24},
    {"Q8_0", 32, 34},   {"Q8_1", 0, 0},     {"Q2_K", 256, 84},  {"Q3_K", 256, 110},
    {"Q4_K", 256, 144}, {"Q5_K", 256, 176}, {"Q6_K", 256, 210}, {"Q8_K", 0, 0},
    {"IQ2_XXS", 0, 0},  {"IQ2_XS", 0, 0},   {"IQ3_XXS", 0, 0},  {"IQ1_S", 0, 0},
    {"IQ4_NL", 0, 0},   {"IQ3_S", 0, 0},    {"IQ2_S", 0, 0},    {"IQ4_XS", 0, 0},
    {"I8", 0, 0},       {"I16", 0, 0},      {"I32", 0, 0},      {"I64", 0, 0},
    {"F64", 0, 0},      {"IQ1_M", 0, 0},    {"BF16", 1, 2},     {nullptr, 0, 0},
    {nullptr, 0, 0},    {nullptr, 0, 0},    {"TQ1_0", 0, 0},    {"TQ2_0", 0, 0},
    {nullptr, 0, 0},    {nullptr, 0, 0},    {nullptr, 0, 0},    {"MXFP4", 0, 0},
    {"NVFP4", 0, 0},    {"Q1_0", 0, 0},     {"Q2_0", 0, 0},
};
constexpr uint32_t kNumTypes = sizeof(kTypes) / sizeof(kTypes[0]);
constexpr const char* kSupportedList =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";

const TypeTraits* traits(uint32_t type) {
  return type < kNumTypes && kTypes[type].name ? &kTypes[type] : nullptr;
}

// ---------------------------------------------------------------------------------------------
// GGUF metadata values

// gguf.h's enum gguf_type.
enum ValueType : uint32_t {
  kU8 = 0,
  kI8 = 1,
  kU16 = 2,
  kI16 = 3,
  kU32 = 4,
  kI32 = 5,
  kF32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kU64 = 10,
  kI64 = 11,
  kF64 = 12,
};
constexpr const char* kValueTypeNames[] = {"uint8",  "int8",    "uint16", "int16",  "uint32",
                                           "int32",  "float32", "bool",   "string", "array",
                                           "uint64", "int64",   "float64"};
constexpr uint32_t kNumValueTypes = 13;
// Arrays of arrays are read up to this depth (llama.cpp reads none; gguf-py writes them).
constexpr int kMaxArrayDepth = 4;
// Sizes and element counts must stay below this (as safetensors.cpp checks): no overflow anywhere.
constexpr uint64_t kMaxBytes = uint64_t(1) << 62;

std::string value_type_name(uint32_t t) {
  return t < kNumValueTypes ? kValueTypeNames[t] : cat("type ", t);
}

// The fewest bytes a value of type t takes in the file (a string: its length; an array: its
// element type and count).
uint64_t min_value_bytes(uint32_t t) {
  switch (t) {
    case kU8:
    case kI8:
    case kBool:
      return 1;
    case kU16:
    case kI16:
      return 2;
    case kU32:
    case kI32:
    case kF32:
      return 4;
    case kArray:
      return 12;
    default:  // string length, 64-bit values
      return 8;
  }
}

// A key or tensor name for an error message: quoted, bytes outside printable ASCII escaped, a
// long one cut.
std::string shown(std::string_view s) {
  constexpr size_t kMax = 96;
  std::string r = "'";
  for (size_t i = 0; i < std::min(s.size(), kMax); ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7f && c != '\\' && c != '\'') {
      r += char(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      r += buf;
    }
  }
  if (s.size() > kMax) return cat(r, "...' (", s.size(), " bytes)");
  return r + '\'';
}

// Reads the header from the mapping, every read checked against the bytes left. Errors name the
// file and what is being read (`where`: the key or tensor).
struct Cursor {
  const std::string& file;
  const uint8_t* base;
  size_t size;
  size_t pos = 0;
  std::string where;

  size_t left() const { return size - pos; }
  [[noreturn]] void fail(const std::string& msg) const {
    throw Error(cat(file, ": ", where, where.empty() ? "" : ": ", msg));
  }
  void need(size_t n, const char* what) const {
    if (n > left())
      fail(cat("truncated file: ", what, " at byte ", pos, " needs ", n, " bytes, ", left(),
               " left"));
  }
  template <typename T>
  T get(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, base + pos, sizeof v);
    pos += sizeof v;
    return v;
  }
  std::string_view str(const char* what) {
    const uint64_t n = get<uint64_t>(what);
    if (n > left())
      fail(cat(what, " length ", n, " exceeds the ", left(),
               " bytes left in the file (truncated or corrupt)"));
    std::string_view s(reinterpret_cast<const char*>(base + pos), size_t(n));
    pos += size_t(n);
    return s;
  }

  // One value of type t as JSON; `depth`: how many arrays enclose it.
  json value(uint32_t t, int depth) {
    switch (t) {
      case kU8:
        return get<uint8_t>("uint8 value");
      case kI8:
        return get<int8_t>("int8 value");
      case kU16:
        return get<uint16_t>("uint16 value");
      case kI16:
        return get<int16_t>("int16 value");
      case kU32:
        return get<uint32_t>("uint32 value");
      case kI32:
        return get<int32_t>("int32 value");
      case kU64:
        return get<uint64_t>("uint64 value");
      case kI64:
        return get<int64_t>("int64 value");
      case kF32:
        return double(get<float>("float32 value"));
      case kF64:
        return get<double>("float64 value");
      case kBool:
        return get<uint8_t>("bool value") != 0;  // any non-zero byte, as llama.cpp reads it
      case kString:
        return std::string(str("string"));
      case kArray: {
        if (depth >= kMaxArrayDepth)
          fail(cat("arrays nested deeper than ", kMaxArrayDepth, " levels are not supported"));
        const uint32_t et = get<uint32_t>("array element type");
        if (et >= kNumValueTypes) fail(cat("unknown array element type ", et));
        const uint64_t n = get<uint64_t>("array length");
        // Checked before anything is allocated for it.
        if (n > left() / min_value_bytes(et))
          fail(cat("array length ", n, " of ", value_type_name(et), " exceeds what the ", left(),
                   " bytes left in the file could hold (truncated or corrupt)"));
        json::array_t a;
        a.reserve(size_t(n));
        for (uint64_t i = 0; i < n; ++i) a.push_back(value(et, depth + 1));
        return json(std::move(a));
      }
      default:
        fail(cat("unknown value type ", t));
    }
  }
};

std::string ne_str(const std::vector<int64_t>& ne) {
  std::string r = "[";
  for (size_t i = 0; i < ne.size(); ++i) r += cat(i ? ", " : "", ne[i]);
  return r + "]";
}

// Minimum bytes of one key-value pair (key length, a 1-byte key, value type, a 1-byte value) and
// of one tensor info (name length, a 1-byte name, n_dims, one dimension, type, offset).
constexpr uint64_t kMinKvBytes = 8 + 1 + 4 + 1;
constexpr uint64_t kMinTensorInfoBytes = 8 + 1 + 4 + 8 + 4 + 8;

}  // namespace

// ---------------------------------------------------------------------------------------------
// Types

std::string ggml_type_name(uint32_t type) {
  const TypeTraits* t = traits(type);
  return t ? t->name : cat("type ", type);
}

bool ggml_type_supported(uint32_t type) {
  const TypeTraits* t = traits(type);
  return t && t->block_elems > 0;
}

int64_t ggml_block_elems(GgmlType t) {
  KILN_CHECK(ggml_type_supported(uint32_t(t)), "ggml type ", ggml_type_name(uint32_t(t)),
             " is not supported");
  return kTypes[uint32_t(t)].block_elems;
}

size_t ggml_block_bytes(GgmlType t) {
  KILN_CHECK(ggml_type_supported(uint32_t(t)), "ggml type ", ggml_type_name(uint32_t(t)),
             " is not supported");
  return kTypes[uint32_t(t)].block_bytes;
}

// ---------------------------------------------------------------------------------------------
// Reader

GgufFile::~GgufFile() = default;

std::shared_ptr<GgufFile> GgufFile::open(const fs::path& path) {
  const std::string f = path.string();
  MappedFile mf = map_file(path, 4, "GGUF");
  const size_t size = mf.size;
  std::shared_ptr<GgufFile> r(new GgufFile());
  r->path_ = path;
  r->size_ = size;
  r->map_ = mf.map;
  const auto* base = mf.data();

  Cursor c{f, base, size, 0, {}};
  if (std::memcmp(base, "GGUF", 4) != 0)
    c.fail(cat("not a GGUF file (starts with ", shown({reinterpret_cast<const char*>(base), 4}),
               ", not 'GGUF')"));
  c.pos = 4;
  const uint32_t version = c.get<uint32_t>("version");
  if (version != 2 && version != 3) {
    if (version == 1) c.fail("GGUF version 1 is not supported (kiln reads versions 2 and 3)");
    if (version != 0 && (version & 0xffff) == 0)
      c.fail(cat("GGUF version ", version, " is not supported (a big-endian file?)"));
    c.fail(cat("GGUF version ", version, " is not supported (kiln reads versions 2 and 3)"));
  }
  r->version_ = version;
  const uint64_t n_tensors = c.get<uint64_t>("tensor_count");
  const uint64_t n_kv = c.get<uint64_t>("kv_count");
  if (n_tensors > c.left() / kMinTensorInfoBytes)
    c.fail(cat("tensor_count ", n_tensors, " is more than the ", c.left(),
               " bytes left in the file could hold (truncated or corrupt)"));
  if (n_kv > (c.left() - n_tensors * kMinTensorInfoBytes) / kMinKvBytes)
    c.fail(cat("kv_count ", n_kv, " is more than the ", c.left(),
               " bytes left in the file could hold (truncated or corrupt)"));

  // Key-value pairs.
  uint64_t alignment = 32;
  for (uint64_t i = 0; i < n_kv; ++i) {
    c.where = cat("key #", i);
    const std::string key(c.str("key"));
    if (key.empty()) c.fail("empty key");
    c.where = cat("key ", shown(key));
    if (r->metadata_.contains(key)) c.fail("duplicate key");
    const uint32_t type = c.get<uint32_t>("value type");
    if (type >= kNumValueTypes) c.fail(cat("unknown value type ", type));
    json v = c.value(type, 0);
    if (key == "general.alignment") {
      if (type != kU32) c.fail(cat("must be of type uint32, not ", value_type_name(type)));
      alignment = v.get<uint64_t>();
      if (alignment == 0 || (alignment & (alignment - 1)) != 0)
        c.fail(cat("alignment ", alignment, " is not a power of two"));
    }
    r->metadata_[key] = std::move(v);
  }
  if (n_kv == 0) r->metadata_ = json::object();

  // Tensor infos.
  for (uint64_t i = 0; i < n_tensors; ++i) {
    c.where = cat("tensor #", i);
    GgufTensorInfo t;
    t.name = std::string(c.str("tensor name"));
    if (t.name.empty()) c.fail("empty tensor name");
    c.where = cat("tensor ", shown(t.name));
    if (r->index_.count(t.name)) c.fail("duplicate tensor name");
    const uint32_t n_dims = c.get<uint32_t>("n_dims");
    if (n_dims < 1 || n_dims > 4) c.fail(cat("n_dims ", n_dims, " is not in 1..4"));
    // Dimensions of 0 are allowed, as llama.cpp allows them (an empty tensor). The product of the
    // others must not overflow either: numel() multiplies them all, in another order.
    uint64_t elems = 1, nonzero = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      const uint64_t x = c.get<uint64_t>("dimension");
      if (x > kMaxBytes || (x && nonzero > kMaxBytes / x))
        c.fail(cat("dimension ", d, " (", x, ") makes the element count overflow"));
      if (x) nonzero *= x;
      elems *= x;
      t.ne.push_back(int64_t(x));
    }
    const uint32_t type = c.get<uint32_t>("ggml type");
    if (!traits(type))
      c.fail(cat("unknown ggml type ", type, " (kiln reads ", kSupportedList, ")"));
    if (!ggml_type_supported(type))
      c.fail(cat("ggml type ", ggml_type_name(type), " is not supported (kiln reads ",
                 kSupportedList, ")"));
    t.type = GgmlType(type);
    const TypeTraits& tt = kTypes[type];
    if (t.ne[0] % tt.block_elems != 0)
      c.fail(cat("ne ", ne_str(t.ne), ": ne[0] = ", t.ne[0], " is not a multiple of the ", tt.name,
                 " block size ", tt.block_elems));
    const uint64_t blocks = elems / uint64_t(tt.block_elems);
    if (blocks > kMaxBytes / tt.block_bytes)
      c.fail(cat("ne ", ne_str(t.ne), ": the size in bytes overflows"));
    t.nbytes = size_t(blocks * tt.block_bytes);
    t.offset = c.get<uint64_t>("data offset");
    if (t.offset % alignment != 0)
      c.fail(cat("data offset ", t.offset, " is not a multiple of the alignment ", alignment));
    r->index_[t.name] = r->tensors_.size();
    r->tensors_.push_back(std::move(t));
  }
  c.where.clear();

  // The data area: the header's end padded to the alignment (llama.cpp requires the padding only
  // when there are tensors).
  const size_t header_end = c.pos;
  r->header_hash_ = fnv1a(base, header_end);
  const uint64_t data_start = (uint64_t(header_end) + alignment - 1) / alignment * alignment;
  if (n_tensors > 0 && data_start > size)
    c.fail(cat("truncated file: the data area starts at byte ", data_start,
               " (the header's end padded to the alignment ", alignment, ") but the file has ",
               size, " bytes"));
  const size_t data_offset = size_t(std::min<uint64_t>(data_start, size));
  r->data_ = base + data_offset;
  r->data_size_ = size - data_offset;

  std::vector<std::pair<std::pair<uint64_t, uint64_t>, size_t>> ranges;
  for (size_t i = 0; i < r->tensors_.size(); ++i) {
    const GgufTensorInfo& t = r->tensors_[i];
    if (t.offset > r->data_size_ || t.nbytes > r->data_size_ - t.offset)
      throw Error(cat(f, ": tensor ", shown(t.name), ": its ", t.nbytes, " bytes at offset ",
                      t.offset, " are past the end of the data area (", r->data_size_,
                      " bytes); file truncated?"));
    if (t.nbytes) ranges.push_back({{t.offset, t.offset + t.nbytes}, i});
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    if (ranges[i].first.first < ranges[i - 1].first.second)
      throw Error(cat(f, ": tensors ", shown(r->tensors_[ranges[i - 1].second].name), " and ",
                      shown(r->tensors_[ranges[i].second].name), " overlap"));
  return r;
}

const GgufTensorInfo* GgufFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

Tensor GgufFile::to_f32(const GgufTensorInfo& t) const {
  // `t` may come from another file: it must at least describe bytes inside this one.
  KILN_CHECK(
      ggml_type_supported(uint32_t(t.type)) && !t.ne.empty() && t.offset <= data_size_ &&
          t.nbytes <= data_size_ - t.offset &&
          size_t(t.numel() / ggml_block_elems(t.type)) * ggml_block_bytes(t.type) == t.nbytes,
      path_.string(), ": tensor ", shown(t.name), " does not describe bytes of this file");
  // Every element is written below (by the threads that dequantize it, so that they, not one
  // memset, fault the pages in): no zero fill.
  Tensor r = Tensor::uninitialized(DType::F32, t.shape());
  const int64_t row = t.ne[0], rows = row ? t.numel() / row : 0;
  const size_t row_bytes = size_t(row / ggml_block_elems(t.type)) * ggml_block_bytes(t.type);
  const uint8_t* src = data(t);
  float* dst = r.ptr<float>();
#pragma omp parallel for schedule(static) if (rows > 1 && t.numel() >= (int64_t(1) << 16))
  for (int64_t i = 0; i < rows; ++i)
    ggml_dequantize(t.type, src + i * row_bytes, dst + i * row, row);
  return r;
}

void GgufFile::drop_pages(const GgufTensorInfo& t) const {
  if (t.offset > data_size_ || t.nbytes > data_size_ - t.offset) return;
  // Only whole pages inside the tensor: its neighbours may still be in use.
  const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  const uintptr_t b = (reinterpret_cast<uintptr_t>(data_ + t.offset) + page - 1) & ~(page - 1);
  const uintptr_t e = reinterpret_cast<uintptr_t>(data_ + t.offset + t.nbytes) & ~(page - 1);
  if (e > b) madvise(reinterpret_cast<void*>(b), e - b, MADV_DONTNEED);
}

bool is_gguf_file(const fs::path& path) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) return false;
  std::ifstream in(path, std::ios::binary);
  char m[4];
  return in.read(m, 4) && std::memcmp(m, "GGUF", 4) == 0;
}

// ---------------------------------------------------------------------------------------------
// Dequantization: ports of ggml-quants.c's dequantize_row_*, the same float operations in the
// same order. Blocks are read byte by byte (memcpy for the fp16 fields): the mapping guarantees
// no alignment. Each function dequantizes one block `b` into y.
//
// A compiler may contract `a * b + c` into one FMA (GCC does in C++ with -march=native; ggml's C
// is built without): that changes nothing here, because every such product is exact in float (an
// fp16 scale, 11 significant bits, times a scale of at most 6 bits times a quant of at most 5
// bits). A format whose product can round needs -ffp-contract=off to stay bit-exact.

namespace {

float fp16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return f16_to_f32(h);
}

// Q4_0, 32 weights in 18 bytes: d (fp16), qs[16]. Weight j is the low nibble of qs[j], weight
// j + 16 its high nibble; x = (q - 8) * d.
void block_q4_0(const uint8_t* b, float* y) {
  const float d = fp16_at(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    const int x0 = (qs[j] & 0x0F) - 8;
    const int x1 = (qs[j] >> 4) - 8;
    y[j] = x0 * d;
    y[j + 16] = x1 * d;
  }
}

// Q4_1, 32 weights in 20 bytes: d, m (fp16), qs[16] as Q4_0; x = q * d + m.
void block_q4_1(const uint8_t* b, float* y) {
  const float d = fp16_at(b), m = fp16_at(b + 2);
  const uint8_t* qs = b + 4;
  for (int j = 0; j < 16; ++j) {
    const int x0 = qs[j] & 0x0F;
    const int x1 = qs[j] >> 4;
    y[j] = x0 * d + m;
    y[j + 16] = x1 * d + m;
  }
}

// Q5_0, 32 weights in 22 bytes: d (fp16), qh (uint32: bit j is the 5th bit of weight j),
// qs[16] (low 4 bits, as Q4_0); x = (q - 16) * d.
void block_q5_0(const uint8_t* b, float* y) {
  const float d = fp16_at(b);
  uint32_t qh;
  std::memcpy(&qh, b + 2, 4);
  const uint8_t* qs = b + 6;
  for (int j = 0; j < 16; ++j) {
    const uint8_t xh_0 = ((qh >> (j + 0)) << 4) & 0x10;
    const uint8_t xh_1 = ((qh >> (j + 12))) & 0x10;
    const int32_t x0 = ((qs[j] & 0x0F) | xh_0) - 16;
    const int32_t x1 = ((qs[j] >> 4) | xh_1) - 16;
    y[j] = x0 * d;
    y[j + 16] = x1 * d;
  }
}

// Q5_1, 32 weights in 24 bytes: d, m (fp16), qh (uint32), qs[16] as Q5_0; x = q * d + m.
void block_q5_1(const uint8_t* b, float* y) {
  const float d = fp16_at(b), m = fp16_at(b + 2);
  uint32_t qh;
  std::memcpy(&qh, b + 4, 4);
  const uint8_t* qs = b + 8;
  for (int j = 0; j < 16; ++j) {
    const uint8_t xh_0 = ((qh >> (j + 0)) << 4) & 0x10;
    const uint8_t xh_1 = ((qh >> (j + 12))) & 0x10;
    const int x0 = (qs[j] & 0x0F) | xh_0;
    const int x1 = (qs[j] >> 4) | xh_1;
    y[j] = x0 * d + m;
    y[j + 16] = x1 * d + m;
  }
}

// Q8_0, 32 weights in 34 bytes: d (fp16), qs[32] (int8); x = q * d.
void block_q8_0(const uint8_t* b, float* y) {
  const float d = fp16_at(b);
  const auto* qs = reinterpret_cast<const int8_t*>(b + 2);
  for (int j = 0; j < 32; ++j) y[j] = qs[j] * d;
}

// Q2_K, 256 weights in 84 bytes: scales[16] (low nibble: scale, high nibble: min, of each group
// of 16), qs[64] (2 bits a weight), d, dmin (fp16). Each 128 weights use 32 bytes of qs: groups
// at shifts 0, 2, 4, 6 of bytes 0..15, then of bytes 16..31, alternately. x = d*sc * q - dmin*m.
void block_q2_K(const uint8_t* b, float* y) {
  const uint8_t* scales = b;
  const uint8_t* q = b + 16;
  const float d = fp16_at(b + 80), min = fp16_at(b + 82);
  int is = 0;
  float dl, ml;
  for (int n = 0; n < 256; n += 128) {
    int shift = 0;
    for (int j = 0; j < 4; ++j) {
      uint8_t sc = scales[is++];
      dl = d * (sc & 0xF);
      ml = min * (sc >> 4);
      for (int l = 0; l < 16; ++l) *y++ = dl * ((int8_t)((q[l] >> shift) & 3)) - ml;
      sc = scales[is++];
      dl = d * (sc & 0xF);
      ml = min * (sc >> 4);
      for (int l = 0; l < 16; ++l) *y++ = dl * ((int8_t)((q[l + 16] >> shift) & 3)) - ml;
      shift += 2;
    }
    q += 32;
  }
}

// Q3_K, 256 weights in 110 bytes: hmask[32] (the 3rd bit: weight 32*k + l is bit k of
// hmask[l]; a clear bit subtracts 4), qs[64] (low 2 bits, laid out as Q2_K), scales[12] (16
// 6-bit scales: low nibbles in bytes 0..7, top 2 bits in bytes 8..11), d (fp16).
// x = d * (scale - 32) * q.
void block_q3_K(const uint8_t* b, float* y) {
  constexpr uint32_t kmask1 = 0x03030303, kmask2 = 0x0f0f0f0f;
  const uint8_t* hm = b;
  const uint8_t* q = b + 32;
  const float d_all = fp16_at(b + 108);
  uint32_t aux[4];
  std::memcpy(aux, b + 96, 12);
  const uint32_t tmp = aux[2];
  aux[2] = ((aux[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4);
  aux[3] = ((aux[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4);
  aux[0] = (aux[0] & kmask2) | (((tmp >> 0) & kmask1) << 4);
  aux[1] = (aux[1] & kmask2) | (((tmp >> 2) & kmask1) << 4);
  int8_t scales[16];
  std::memcpy(scales, aux, 16);
  uint8_t m = 1;
  int is = 0;
  float dl;
  for (int n = 0; n < 256; n += 128) {
    int shift = 0;
    for (int j = 0; j < 4; ++j) {
      dl = d_all * (scales[is++] - 32);
      for (int l = 0; l < 16; ++l)
        *y++ = dl * ((int8_t)((q[l + 0] >> shift) & 3) - ((hm[l + 0] & m) ? 0 : 4));
      dl = d_all * (scales[is++] - 32);
      for (int l = 0; l < 16; ++l)
        *y++ = dl * ((int8_t)((q[l + 16] >> shift) & 3) - ((hm[l + 16] & m) ? 0 : 4));
      shift += 2;
      m <<= 1;
    }
    q += 32;
  }
}

// The 6-bit scale and min of group j (of 8) in the 12 packed bytes of Q4_K and Q5_K: groups 0..3
// in the low 6 bits of bytes 0..3 (scales) and 4..7 (mins); groups 4..7 in the nibbles of bytes
// 8..11 with their top 2 bits in the top bits of bytes 0..7.
void scale_min_k4(int j, const uint8_t* q, uint8_t* d, uint8_t* m) {
  if (j < 4) {
    *d = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4);
  }
}

// Q4_K, 256 weights in 144 bytes: d, dmin (fp16), scales[12] (8 groups of 32, see scale_min_k4),
// qs[128]: each 64 weights use 32 bytes, low nibbles then high nibbles. x = d*sc * q - dmin*m.
void block_q4_K(const uint8_t* b, float* y) {
  const float d = fp16_at(b), min = fp16_at(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* q = b + 16;
  int is = 0;
  uint8_t sc, m;
  for (int j = 0; j < 256; j += 64) {
    scale_min_k4(is + 0, scales, &sc, &m);
    const float d1 = d * sc;
    const float m1 = min * m;
    scale_min_k4(is + 1, scales, &sc, &m);
    const float d2 = d * sc;
    const float m2 = min * m;
    for (int l = 0; l < 32; ++l) *y++ = d1 * (q[l] & 0xF) - m1;
    for (int l = 0; l < 32; ++l) *y++ = d2 * (q[l] >> 4) - m2;
    q += 32;
    is += 2;
  }
}

// Q5_K, 256 weights in 176 bytes: d, dmin (fp16), scales[12] as Q4_K, qh[32] (the 5th bit:
// weight 32*k + l is bit k of qh[l]), qs[128] as Q4_K. x = d*sc * q - dmin*m.
void block_q5_K(const uint8_t* b, float* y) {
  const float d = fp16_at(b), min = fp16_at(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* ql = b + 48;
  int is = 0;
  uint8_t sc, m;
  uint8_t u1 = 1, u2 = 2;
  for (int j = 0; j < 256; j += 64) {
    scale_min_k4(is + 0, scales, &sc, &m);
    const float d1 = d * sc;
    const float m1 = min * m;
    scale_min_k4(is + 1, scales, &sc, &m);
    const float d2 = d * sc;
    const float m2 = min * m;
    for (int l = 0; l < 32; ++l) *y++ = d1 * ((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
    for (int l = 0; l < 32; ++l) *y++ = d2 * ((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
    ql += 32;
    is += 2;
    u1 <<= 2;
    u2 <<= 2;
  }
}

// Q6_K, 256 weights in 210 bytes: ql[128] (low 4 bits), qh[64] (top 2 bits), scales[16] (int8,
// one per 16 weights), d (fp16). Each 128 weights use 64 bytes of ql and 32 of qh: weight l,
// l+32, l+64, l+96 take the low nibble of ql[l], of ql[l+32], the high nibble of ql[l], of
// ql[l+32], and bits 0-1, 2-3, 4-5, 6-7 of qh[l]. x = d * scale * (q - 32).
void block_q6_K(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const auto* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = fp16_at(b + 208);
  for (int n = 0; n < 256; n += 128) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int8_t q1 = (int8_t)((ql[l + 0] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int8_t q2 = (int8_t)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int8_t q3 = (int8_t)((ql[l + 0] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int8_t q4 = (int8_t)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l + 0] = d * sc[is + 0] * q1;
      y[l + 32] = d * sc[is + 2] * q2;
      y[l + 64] = d * sc[is + 4] * q3;
      y[l + 96] = d * sc[is + 6] * q4;
    }
    y += 128;
    ql += 64;
    qh += 32;
    sc += 8;
  }
}

template <void (*Block)(const uint8_t*, float*), int64_t Elems, size_t Bytes>
void blocks(const uint8_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n / Elems; ++i) Block(src + size_t(i) * Bytes, dst + i * Elems);
}

}  // namespace

void ggml_dequantize(GgmlType t, const void* src, float* dst, int64_t n) {
  KILN_CHECK(ggml_type_supported(uint32_t(t)), "ggml type ", ggml_type_name(uint32_t(t)),
             " is not supported (kiln reads ", kSupportedList, ")");
  KILN_CHECK(n >= 0 && n % ggml_block_elems(t) == 0, "ggml_dequantize: ", n,
             " elements is not a whole number of ", ggml_type_name(uint32_t(t)), " blocks");
  const auto* s = static_cast<const uint8_t*>(src);
  switch (t) {
    case GgmlType::F32:
      std::memcpy(dst, s, size_t(n) * 4);
      break;
    case GgmlType::F16:
      for (int64_t i = 0; i < n; ++i) dst[i] = fp16_at(s + 2 * i);
      break;
    case GgmlType::BF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, s + 2 * i, 2);
        dst[i] = bf16_to_f32(h);
      }
      break;
    case GgmlType::Q4_0:
      blocks<block_q4_0, 32, 18>(s, dst, n);
      break;
    case GgmlType::Q4_1:
      blocks<block_q4_1, 32, 20>(s, dst, n);
      break;
    case GgmlType::Q5_0:
      blocks<block_q5_0, 32, 22>(s, dst, n);
      break;
    case GgmlType::Q5_1:
      blocks<block_q5_1, 32, 24>(s, dst, n);
      break;
    case GgmlType::Q8_0:
      blocks<block_q8_0, 32, 34>(s, dst, n);
      break;
    case GgmlType::Q2_K:
      blocks<block_q2_K, 256, 84>(s, dst, n);
      break;
    case GgmlType::Q3_K:
      blocks<block_q3_K, 256, 110>(s, dst, n);
      break;
    case GgmlType::Q4_K:
      blocks<block_q4_K, 256, 144>(s, dst, n);
      break;
    case GgmlType::Q5_K:
      blocks<block_q5_K, 256, 176>(s, dst, n);
      break;
    case GgmlType::Q6_K:
      blocks<block_q6_K, 256, 210>(s, dst, n);
      break;
    default:
      break;  // refused above
  }
}

}  // namespace kiln
