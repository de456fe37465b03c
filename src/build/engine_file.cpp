#include "build/engine_file.h"

#include <fcntl.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <set>

#include "core/error.h"
#include "io/json.h"
#include "io/safetensors.h"

// xxHash (Debian libxxhash-dev) used header-only: XXH3 hashes at memory speed, so checksums add
// nothing noticeable to a build that writes at disk speed.
#define XXH_INLINE_ALL
#include <xxhash.h>

namespace kiln {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr const char* kChecksumAlgorithm = "xxh3-64";

std::string hex64(uint64_t v) {
  char b[17];
  std::snprintf(b, sizeof b, "%016llx", static_cast<unsigned long long>(v));
  return b;
}

// The XXH3 of a whole (small: tokenizer, template) file, streamed.
std::string hash_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) throw Error(cat(p.string(), ": cannot open"));
  XXH3_state_t st;
  XXH3_64bits_reset(&st);
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), std::streamsize(buf.size()));
    XXH3_64bits_update(&st, buf.data(), size_t(in.gcount()));
  }
  return hex64(XXH3_64bits_digest(&st));
}

std::string gib(double b) {
  char s[32];
  std::snprintf(s, sizeof s, "%.2f GiB", b / double(1ull << 30));
  return s;
}

// SIGINT/SIGTERM while a build writes: remembered, and the write loop stops at the next chunk.
std::atomic<int> g_signal{0};
extern "C" void on_signal(int sig) {
  g_signal.store(sig);
}

// Installs the handlers for its lifetime, restoring the previous ones after.
class SignalGuard {
 public:
  SignalGuard() {
    g_signal.store(0);
    struct sigaction sa {};
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int_);
    sigaction(SIGTERM, &sa, &old_term_);
  }
  ~SignalGuard() {
    sigaction(SIGINT, &old_int_, nullptr);
    sigaction(SIGTERM, &old_term_, nullptr);
  }
  SignalGuard(const SignalGuard&) = delete;
  SignalGuard& operator=(const SignalGuard&) = delete;

 private:
  struct sigaction old_int_ {
  }, old_term_{};
};

int64_t mem_available() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  int64_t kb = 0;
  std::string unit;
  while (in >> key >> kb >> unit)
    if (key == "MemAvailable:") return kb * 1024;
  return -1;  // unknown: no check
}

// Removes temporaries (".<name>.tmp-<pid>", ".<name>.old-<pid>") that builds into `out` left
// when they were killed: their process no longer exists.
void remove_stale_temporaries(const fs::path& parent, const std::string& name) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(parent, ec)) {
    const std::string f = e.path().filename().string();
    for (const std::string& prefix : {"." + name + ".tmp-", "." + name + ".old-"}) {
      if (f.rfind(prefix, 0) != 0) continue;
      const std::string pid = f.substr(prefix.size());
      if (pid.empty() || pid.size() > 9 || pid.find_first_not_of("0123456789") != std::string::npos)
        continue;
      if (kill(pid_t(std::stol(pid)), 0) != 0 && errno == ESRCH) fs::remove_all(e.path(), ec);
    }
  }
}

// Files the engine at `out` says kiln wrote (older manifests: kiln's own file names).
std::set<std::string> kiln_files(const fs::path& out) {
  std::set<std::string> r;
  try {
    std::ifstream in(out / kEngineManifest, std::ios::binary);
    const json m = parse_json(
        std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>()),
        (out / kEngineManifest).string());
    if (m.contains("files") && m["files"].is_array()) {
      for (const auto& f : m["files"])
        if (f.is_string() && fs::path(f.get<std::string>()).filename() == f.get<std::string>())
          r.insert(f.get<std::string>());
      return r;
    }
  } catch (const Error&) {
  }
  r = {kEngineManifest, kEngineWeights};
  for (const auto& f : engine_tokenizer_files()) r.insert(f);
  return r;
}

class FileWriter {
 public:
  explicit FileWriter(const fs::path& p) : path_(p) {
    fd_ = ::open(p.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd_ < 0) throw Error(cat(p.string(), ": cannot open for writing: ", std::strerror(errno)));
  }
  ~FileWriter() {
    if (fd_ >= 0) ::close(fd_);
  }
  void write(const void* data, size_t n) {
    const char* p = static_cast<const char*>(data);
    while (n) {
      const ssize_t w = ::write(fd_, p, n);
      if (w < 0 && errno == EINTR) continue;  // a signal: the loop above checks it
      if (w <= 0) throw Error(cat(path_.string(), ": write failed: ", std::strerror(errno)));
      p += w;
      n -= size_t(w);
    }
  }
  // Data on disk before the folder is moved into place.
  void close() {
    if (::fsync(fd_) != 0 || ::close(fd_) != 0) {
      fd_ = -1;
      throw Error(cat(path_.string(), ": write failed: ", std::strerror(errno)));
    }
    fd_ = -1;
  }

 private:
  fs::path path_;
  int fd_ = -1;
};

}  // namespace

void write_engine_folder(const fs::path& out, const WeightPlan& plan, EngineFolder folder) {
  write_engine_folder(out, {{kEngineWeights, plan}}, std::move(folder));
}

void write_engine_folder(const fs::path& out,
                         const std::vector<std::pair<std::string, WeightPlan>>& weight_files,
                         EngineFolder folder) {
  if (fs::exists(out) && !fs::exists(out / kEngineManifest) &&
      !(fs::is_directory(out) && fs::is_empty(out)))
    throw Error(cat(out.string(), ": exists and is not a kiln engine; refusing to overwrite"));
  const fs::path parent = fs::absolute(out).parent_path();
  fs::create_directories(parent);
  remove_stale_temporaries(parent, out.filename().string());

  // What will be written, and whether it fits.
  std::vector<std::string> headers;
  size_t max_row = 0, tensors = 0;
  uint64_t weight_bytes = 0, need_disk = 1 << 20;  // + manifest
  for (const auto& [file, plan] : weight_files) {
    std::vector<TensorEntry> entries;
    for (const auto& pt : plan) {
      entries.push_back({pt.name, pt.dtype, pt.shape});
      max_row = std::max(max_row, pt.row_bytes());
      weight_bytes += pt.nbytes();
    }
    headers.push_back(safetensors_header(entries, {{"format", "kiln"}}));
    need_disk += headers.back().size();
    tensors += plan.size();
  }
  need_disk += weight_bytes;
  std::vector<fs::path> copies;
  if (!folder.tokenizer_dir.empty() && fs::absolute(folder.tokenizer_dir) != fs::absolute(out))
    for (const auto& f : engine_tokenizer_files())
      if (fs::is_regular_file(folder.tokenizer_dir / f)) {
        copies.push_back(folder.tokenizer_dir / f);
        need_disk += fs::file_size(folder.tokenizer_dir / f);
      }
  struct statvfs vfs {};
  if (statvfs(parent.c_str(), &vfs) == 0) {
    const double free_disk = double(vfs.f_bavail) * double(vfs.f_frsize);
    if (double(need_disk) > free_disk)
      throw Error(cat(out.string(), ": the engine needs ", gib(double(need_disk)), " on disk but ",
                      parent.string(), " has ", gib(free_disk), " free"));
  }
  // The staging buffer, and a transposed tensor's float tile of the same rows.
  const size_t chunk = std::max(folder.chunk_bytes, max_row);
  const int64_t need_mem = int64_t(3 * chunk);
  const int64_t avail = mem_available();
  if (avail >= 0 && need_mem > avail)
    throw Error(cat(out.string(), ": the build needs ", gib(double(need_mem)),
                    " of memory to stage tensor rows but ", gib(double(avail)), " is available"));

  SignalGuard signals;
  const fs::path tmp = parent / cat(".", out.filename().string(), ".tmp-", getpid());
  auto check_signal = [&] {
    if (const int sig = g_signal.load())
      throw Error(cat(out.string(), ": build interrupted (", sig == SIGINT ? "SIGINT" : "SIGTERM",
                      "); nothing was written"));
  };
  try {
    fs::remove_all(tmp);
    fs::create_directory(tmp);
    json checksums = json::object(), files = json::array();
    BuildProgress pr;
    pr.bytes_total = weight_bytes;
    pr.tensors_total = tensors;
    std::vector<char> buf(chunk);
    for (size_t f = 0; f < weight_files.size(); ++f) {
      const auto& [file, plan] = weight_files[f];
      json& sums = weight_files.size() == 1 ? checksums : checksums[file];
      sums = json::object();
      files.push_back(file);
      FileWriter w(tmp / file);
      w.write(headers[f].data(), headers[f].size());
      for (const auto& pt : plan) {
        XXH3_state_t st;
        XXH3_64bits_reset(&st);
        const size_t rb = pt.row_bytes();
        const int64_t step = rb ? std::max<int64_t>(1, int64_t(chunk / rb)) : 1;
        for (int64_t r = 0; r < pt.rows(); r += step) {
          check_signal();
          const int64_t n = std::min(step, pt.rows() - r);
          pt.fill(r, n, buf.data());
          XXH3_64bits_update(&st, buf.data(), size_t(n) * rb);
          w.write(buf.data(), size_t(n) * rb);
          pr.bytes_done += uint64_t(n) * rb;
          if (folder.progress) folder.progress(pr);
        }
        if (pt.release) pt.release();
        sums[pt.name] = hex64(XXH3_64bits_digest(&st));
        ++pr.tensors_done;
      }
      w.close();
    }
    check_signal();
    json copied = json::object();  // the tokenizer and template files, checksummed too
    for (const auto& f : copies) {
      fs::copy_file(f, tmp / f.filename(), fs::copy_options::overwrite_existing);
      files.push_back(f.filename().string());
      copied[f.filename().string()] = hash_file(tmp / f.filename());
    }
    files.push_back(kEngineManifest);
    // One file: "weights" names it and "tensors" holds its checksums; several (one per rank):
    // "weights" lists them and "files" holds each one's checksums.
    if (weight_files.size() == 1) {
      folder.manifest["weights"] = weight_files[0].first;
      folder.manifest["checksums"] = {{"algorithm", kChecksumAlgorithm}, {"tensors", checksums}};
    } else {
      json names = json::array();
      for (const auto& [file, plan] : weight_files) names.push_back(file);
      folder.manifest["weights"] = names;
      folder.manifest["checksums"] = {{"algorithm", kChecksumAlgorithm}, {"files", checksums}};
    }
    folder.manifest["checksums"]["copies"] = copied;
    folder.manifest["files"] = files;
    {
      std::ofstream mo(tmp / kEngineManifest);
      mo << folder.manifest.dump(2) << "\n";
      mo.close();
      if (!mo) throw Error(cat((tmp / kEngineManifest).string(), ": write failed"));
    }
    check_signal();
    if (!fs::exists(out)) {
      fs::rename(tmp, out);
      return;
    }
    // Over an existing engine: move the new files in (manifest last), then remove what the old
    // engine wrote and this one does not; anything else in the folder is the user's.
    const std::set<std::string> old = kiln_files(out);
    std::set<std::string> now;
    for (const auto& f : files) now.insert(f.get<std::string>());
    for (const auto& f : files)
      if (f != kEngineManifest) fs::rename(tmp / f.get<std::string>(), out / f.get<std::string>());
    fs::rename(tmp / kEngineManifest, out / kEngineManifest);
    for (const auto& f : old)
      if (!now.count(f)) fs::remove(out / f);
    fs::remove(tmp);
  } catch (const fs::filesystem_error& e) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw Error(cat(out.string(), ": cannot write engine: ", e.code().message()));
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw;
  }
}

uint64_t verify_checksums(const fs::path& dir, const json& manifest,
                          const std::function<void(const BuildProgress&)>& progress) {
  const std::string mf = (dir / kEngineManifest).string();
  const json& ck = manifest.contains("checksums") ? manifest["checksums"] : json();
  const bool ok = ck.is_object() && ck.value("algorithm", "") == kChecksumAlgorithm;
  // The tokenizer and template files the build copied: present, and (engines since the copies
  // were checksummed) unchanged.
  if (ok && ck.contains("copies") && ck["copies"].is_object())
    for (const auto& [file, sum] : ck["copies"].items()) {
      KILN_CHECK(fs::path(file).filename() == file, mf, ": copied file '", file,
                 "' is not a file of the folder");
      const fs::path p = dir / file;
      KILN_CHECK(fs::is_regular_file(p), p.string(), ": missing (the engine's manifest lists it)");
      KILN_CHECK(sum.is_string() && sum.get<std::string>() == hash_file(p), p.string(),
                 ": checksum differs from the manifest's (the file was changed after the build)");
    }
  if (ok && ck.contains("files") && ck["files"].is_object()) {  // one weight file per rank
    uint64_t bytes = 0;
    for (const auto& [file, sums] : ck["files"].items()) {
      KILN_CHECK(fs::path(file).filename() == file, mf, ": weight file '", file,
                 "' is not a file of the folder");
      bytes += verify_file(dir, file, sums, progress);
    }
    return bytes;
  }
  if (!ok || !ck.contains("tensors") || !ck["tensors"].is_object())
    throw Error(cat(mf, ": no ", kChecksumAlgorithm,
                    " checksums (written by an older kiln?); rebuild the engine to verify it"));
  return verify_file(dir, kEngineWeights, ck["tensors"], progress);
}

uint64_t verify_file(const fs::path& dir, const std::string& weights, const json& tensor_sums,
                     const std::function<void(const BuildProgress&)>& progress) {
  const json* sums = &tensor_sums;
  KILN_CHECK(sums->is_object(), (dir / kEngineManifest).string(), ": checksums of ", weights,
             " are not an object");
  auto file = SafetensorsFile::open(dir / weights);
  BuildProgress pr;
  for (const auto& [name, ti] : file->tensors()) pr.bytes_total += ti.end - ti.begin;
  pr.tensors_total = file->tensors().size();
  std::vector<std::string> bad;
  for (const auto& [name, ti] : file->tensors()) {
    const Tensor t = file->get(name);
    XXH3_state_t st;
    XXH3_64bits_reset(&st);
    for (size_t off = 0; off < t.nbytes(); off += kWriteChunkBytes) {
      const size_t n = std::min(kWriteChunkBytes, t.nbytes() - off);
      XXH3_64bits_update(&st, static_cast<const char*>(t.data) + off, n);
      file->drop_pages(name, off, off + n);  // read once: keep the resident set small
      pr.bytes_done += n;
      if (progress) progress(pr);
    }
    ++pr.tensors_done;
    const auto it = sums->find(name);
    if (it == sums->end() || !it->is_string())
      bad.push_back(cat(name, " (no checksum in the manifest)"));
    else if (it->get<std::string>() != hex64(XXH3_64bits_digest(&st)))
      bad.push_back(cat(name, " (checksum differs)"));
  }
  for (const auto& [name, v] : sums->items())
    if (!file->contains(name)) bad.push_back(cat(name, " (in the manifest, not in the weights)"));
  if (!bad.empty()) {
    throw Error(cat((dir / weights).string(), ": ", bad.size(), " tensor",
                    bad.size() == 1 ? "" : "s",
                    " do not match the manifest: ", join_limited(bad, 8, "; ")));
  }
  return pr.bytes_done;
}

}  // namespace kiln
