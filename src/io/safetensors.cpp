#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.h"
#include "io/json.h"
#include "io/mapped_file.h"

namespace kiln {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// SAX handler that finds the first key repeated in the top-level object.
struct DuplicateKeys : SaxBase<json> {
  int depth = 0;
  std::set<std::string> seen;
  std::string dup;
  bool start_object(std::size_t) override { return ++depth, true; }
  bool end_object() override { return --depth, true; }
  bool start_array(std::size_t) override { return ++depth, true; }
  bool end_array() override { return --depth, true; }
  bool key(string_t& k) override {
    if (depth == 1 && !seen.insert(k).second && dup.empty()) dup = k;
    return true;
  }
};
constexpr uint64_t kMaxHeader = 100ull << 20;
}  // namespace

uint64_t fnv1a(const void* data, size_t n, uint64_t h) {
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

SafetensorsFile::~SafetensorsFile() = default;

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const fs::path& path) {
  const std::string f = path.string();
  MappedFile mf = map_file(path, 8, "safetensors");
  const size_t size = mf.size;
  std::shared_ptr<SafetensorsFile> r(new SafetensorsFile());
  r->path_ = path;
  r->size_ = size;
  r->map_ = mf.map;
  const auto* base = mf.data();

  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= uint64_t(base[i]) << (8 * i);
  if (n > kMaxHeader)
    throw Error(cat(f, ": safetensors header length ", n, " exceeds the 100 MB limit"));
  if (n > size - 8)
    throw Error(cat(f, ": truncated safetensors file: header length ", n, " but only ", size - 8,
                    " bytes follow"));
  const char* hdr = reinterpret_cast<const char*>(base + 8);
  r->header_hash_ = fnv1a(hdr, n);
  r->data_ = base + 8 + n;
  const uint64_t data_size = size - 8 - n;

  json j;
  std::string dup;
  try {
    // Duplicate names first, in a SAX pass (the DOM keeps only the last), then the DOM. (A parse
    // callback would do both in one pass, but nlohmann's callback parser rescans the parent at
    // every object's end: quadratic in the number of tensors.)
    DuplicateKeys sax;
    json::sax_parse(hdr, hdr + n, &sax);
    dup = sax.dup;
    j = json::parse(hdr, hdr + n);
  } catch (const json::exception& e) {
    throw Error(cat(f, ": safetensors header is not valid JSON: ", e.what()));
  }
  if (!dup.empty()) throw Error(cat(f, ": duplicate tensor name '", dup, "' in header"));
  if (!j.is_object()) throw Error(cat(f, ": safetensors header is not a JSON object"));

  std::vector<std::pair<std::pair<uint64_t, uint64_t>, std::string>> ranges;
  for (auto& [name, v] : j.items()) {
    if (name == "__metadata__") {
      if (!v.is_object()) throw Error(cat(f, ": __metadata__ is not an object"));
      for (auto& [k, s] : v.items()) {
        if (!s.is_string()) throw Error(cat(f, ": __metadata__.", k, " is not a string"));
        r->metadata_[k] = s.get<std::string>();
      }
      continue;
    }
    auto bad = [&, &name = name](const std::string& why) {  // clang 14: no binding captures
      return Error(cat(f, ": tensor '", name, "': ", why));
    };
    if (!v.is_object()) throw bad("entry is not an object");
    if (!v.contains("dtype") || !v["dtype"].is_string()) throw bad("missing dtype");
    TensorInfo ti;
    if (!parse_dtype(v["dtype"].get<std::string>(), &ti.dtype))
      throw bad(cat("unknown dtype '", v["dtype"].get<std::string>(), "'"));
    if (!v.contains("shape") || !v["shape"].is_array()) throw bad("missing shape");
    uint64_t elems = 1;
    for (auto& d : v["shape"]) {
      if (!d.is_number_unsigned()) throw bad("shape has a non-integer or negative dimension");
      uint64_t x = d.get<uint64_t>();
      if (x != 0 && elems > (uint64_t(1) << 62) / x) throw bad("shape overflows");
      elems *= x;
      ti.shape.push_back(int64_t(x));
    }
    // The byte size too: 2^62 F32 elements are 2^64 bytes, which wraps to 0 and would pass as an
    // empty range.
    if (elems > (uint64_t(1) << 62) / dtype_size(ti.dtype)) throw bad("shape overflows");
    auto& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
        !off[1].is_number_unsigned())
      throw bad("data_offsets must be [begin, end]");
    ti.begin = off[0].get<uint64_t>();
    ti.end = off[1].get<uint64_t>();
    if (ti.begin > ti.end) throw bad("data_offsets begin > end");
    if (ti.end > data_size)
      throw bad(cat("data_offsets end ", ti.end, " is past the end of the data (", data_size,
                    " bytes); file truncated?"));
    if (ti.end - ti.begin != elems * dtype_size(ti.dtype))
      throw bad(cat("byte size ", ti.end - ti.begin, " does not match ",
                    v["dtype"].get<std::string>(), " x ", shape_str(ti.shape), " = ",
                    elems * dtype_size(ti.dtype)));
    ranges.push_back({{ti.begin, ti.end}, name});
    r->tensors_[name] = std::move(ti);
  }
  // The data area must be exactly the tensors, back to back from byte 0, as Hugging Face's
  // reader requires: a gap or a tail means the header length or an offset is off, and the data
  // would be read shifted.
  std::sort(ranges.begin(), ranges.end());
  uint64_t at = 0;
  for (size_t i = 0; i < ranges.size(); ++i) {
    const auto& [range, name] = ranges[i];
    if (range.first < at)
      throw Error(cat(f, ": tensors '", ranges[i - 1].second, "' and '", name, "' overlap"));
    if (range.first > at)
      throw Error(cat(f, ": bytes ", at, "..", range.first,
                      " of the data area belong to no tensor ", "(tensor '", name, "' starts at ",
                      range.first, "); the header's offsets or length are wrong"));
    at = range.second;
  }
  if (at != data_size)
    throw Error(cat(f, ": the tensors end at byte ", at, " of the data area but the file has ",
                    data_size, " bytes after the header; the header length or offsets are wrong"));
  return r;
}

Tensor SafetensorsFile::get(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) throw Error(cat(path_.string(), ": no tensor '", name, "'"));
  const TensorInfo& ti = it->second;
  const uint8_t* p = data_ + ti.begin;
  // Reading a float through a misaligned pointer is undefined behaviour: copy such tensors.
  if (reinterpret_cast<uintptr_t>(p) % std::max<size_t>(dtype_size(ti.dtype), 1) == 0)
    return Tensor::view(ti.dtype, ti.shape, map_, const_cast<uint8_t*>(p));
  Tensor t = Tensor::zeros(ti.dtype, ti.shape);
  std::memcpy(t.data, p, ti.end - ti.begin);
  return t;
}

std::string safetensors_header(const std::vector<TensorEntry>& entries,
                               const std::map<std::string, std::string>& metadata) {
  json h = json::object();
  if (!metadata.empty()) h["__metadata__"] = metadata;
  uint64_t off = 0;
  for (const auto& e : entries) {
    const uint64_t n = uint64_t(numel(e.shape)) * dtype_size(e.dtype);
    h[e.name] = {
        {"dtype", dtype_name(e.dtype)}, {"shape", e.shape}, {"data_offsets", {off, off + n}}};
    off += n;
  }
  std::string hs = h.dump();
  while ((8 + hs.size()) % 64) hs.push_back(' ');
  std::string r(8, '\0');
  for (int i = 0; i < 8; ++i) r[size_t(i)] = char(uint8_t(uint64_t(hs.size()) >> (8 * i)));
  return r + hs;
}

void write_safetensors(const fs::path& path,
                       const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<TensorEntry> entries;
  for (const auto& [name, t] : tensors) entries.push_back({name, t.dtype, t.shape});
  const std::string hs = safetensors_header(entries, metadata);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw Error(cat(path.string(), ": cannot open for writing"));
  out.write(hs.data(), std::streamsize(hs.size()));
  for (const auto& [name, t] : tensors)
    out.write(static_cast<const char*>(t.data), std::streamsize(t.nbytes()));
  out.flush();
  if (!out) throw Error(cat(path.string(), ": write failed (disk full?)"));
}

void SafetensorsFile::drop_pages(const std::string& name, uint64_t begin, uint64_t end) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) return;
  const TensorInfo& ti = it->second;
  if (end <= begin) begin = 0, end = ti.end - ti.begin;
  end = std::min(end, ti.end - ti.begin);
  // Only whole pages inside the range: its neighbours may still be in use.
  const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  const uintptr_t b =
      (reinterpret_cast<uintptr_t>(data_ + ti.begin + begin) + page - 1) & ~(page - 1);
  const uintptr_t e = reinterpret_cast<uintptr_t>(data_ + ti.begin + end) & ~(page - 1);
  if (e > b) madvise(reinterpret_cast<void*>(b), e - b, MADV_DONTNEED);
}

WeightSet WeightSet::open_dir(const fs::path& dir) {
  WeightSet w;
  const fs::path index = dir / "model.safetensors.index.json", single = dir / "model.safetensors";
  if (fs::exists(index)) {
    std::ifstream in(index, std::ios::binary);
    if (!in) throw Error(cat(index.string(), ": cannot open"));
    const json j = parse_json(
        std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>()),
        index.string());
    if (!j.contains("weight_map") || !j["weight_map"].is_object())
      throw Error(cat(index.string(), ": missing object field 'weight_map'"));
    std::map<std::string, size_t> file_idx;
    for (auto& [name, file] : j["weight_map"].items()) {
      if (!file.is_string())
        throw Error(cat(index.string(), ": weight_map.", name, " is not a string"));
      const std::string fn = file.get<std::string>();
      if (fn.find('/') != std::string::npos || fn.find("..") != std::string::npos)
        throw Error(cat(index.string(), ": weight_map.", name, " names a file outside the folder"));
      auto it = file_idx.find(fn);
      if (it == file_idx.end()) {
        it = file_idx.emplace(fn, w.files_.size()).first;
        w.files_.push_back(SafetensorsFile::open(dir / fn));
      }
      if (!w.files_[it->second]->contains(name))
        throw Error(
            cat(index.string(), ": '", name, "' is listed in ", fn, " but not stored there"));
      w.where_[name] = it->second;
    }
  } else if (fs::exists(single)) {
    w.files_.push_back(SafetensorsFile::open(single));
    for (const auto& [name, ti] : w.files_[0]->tensors()) w.where_[name] = 0;
  } else if (fs::exists(dir / "pytorch_model.bin") ||
             fs::exists(dir / "pytorch_model.bin.index.json")) {
    throw Error(cat(dir.string(),
                    ": only safetensors checkpoints are supported (found pytorch_model.bin)"));
  } else {
    throw Error(cat(dir.string(), ": no model.safetensors or model.safetensors.index.json"));
  }
  return w;
}

WeightSet WeightSet::from_virtual(std::map<std::string, VirtualTensor> tensors, uint64_t identity) {
  WeightSet w;
  for (const auto& [name, v] : tensors) w.where_[name] = 0;
  w.virtual_ = std::make_shared<const std::map<std::string, VirtualTensor>>(std::move(tensors));
  w.made_ = std::make_shared<Made>();
  w.virtual_identity_ = identity;
  return w;
}

std::vector<std::string> WeightSet::names() const {
  std::vector<std::string> r;
  for (const auto& [n, i] : where_) r.push_back(n);
  return r;
}

const TensorInfo& WeightSet::info(const std::string& name) const {
  if (virtual_) return virtual_->at(name).info;
  return files_[where_.at(name)]->tensors().at(name);
}

Tensor WeightSet::get(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) throw Error(cat("no weight '", name, "' in the checkpoint"));
  if (!virtual_) return files_[it->second]->get(name);
  // Fused weights read their parts in turn, a few rows at a time: keep the last 4 made.
  constexpr size_t kKeep = 4;
  std::lock_guard<std::mutex> lock(made_->mu);
  auto& recent = made_->recent;
  for (size_t i = 0; i < recent.size(); ++i)
    if (recent[i].first == name) {
      std::rotate(recent.begin(), recent.begin() + long(i), recent.begin() + long(i) + 1);
      return recent.front().second;
    }
  Tensor t = virtual_->at(name).make();
  recent.insert(recent.begin(), {name, t});
  if (recent.size() > kKeep) recent.pop_back();
  return t;
}

void WeightSet::drop_pages(const std::string& name, uint64_t begin, uint64_t end) const {
  auto it = where_.find(name);
  if (it == where_.end()) return;
  if (!virtual_) return files_[it->second]->drop_pages(name, begin, end);
  if (end > begin) return;  // a range: the made tensor is still being read
  {
    std::lock_guard<std::mutex> lock(made_->mu);
    auto& recent = made_->recent;
    std::erase_if(recent, [&](const auto& e) { return e.first == name; });
  }
  if (const auto& r = virtual_->at(name).release) r();
}

uint64_t WeightSet::identity_hash() const {
  if (virtual_) return virtual_identity_;
  uint64_t h = fnv1a("kiln", 4);
  for (const auto& f : files_) {
    uint64_t x = f->header_hash();
    h = fnv1a(&x, 8, h);
  }
  return h;
}

}  // namespace kiln
