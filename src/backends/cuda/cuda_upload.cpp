// Bulk weight upload: see cuda_upload.h.
//
// Measured on the device machine (H100, virtio disk, 16 cores): the disk reads 1.7-2.0 GB/s,
// best as one sequential stream (dd); 8-16 threads reading interleaved chunks got 10-20% less.
// Warm page-cache copies reach 25-40 GB/s with 8-16 threads (6 GB/s with one), pinned H2D
// ~50 GB/s (pageable 8.5), cudaMallocHost ~0.35 ms per MiB, and munmap of a fully faulted-in
// 15 GiB mapping 0.2-0.7 s. Hence: one sequential prefetch stream into the page cache, several
// threads copying from the cache with pread (no faults, nothing to unmap later), and little
// pinned memory (the disk, not the copy engine, is the limit).
#include "backends/cuda/cuda_upload.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "backends/cuda/cuda_common.h"
#include "backends/cuda/cuda_quant_linear.h"
#include "core/error.h"

namespace kiln::cuda {

namespace {

constexpr size_t kAlign = 256;              // device offset of every tensor
constexpr size_t kChunk = size_t(8) << 20;  // staging buffer size, one unit of work
constexpr int kMaxThreads = 16;
constexpr size_t kBlock = size_t(16) << 20;  // prefetch read size
constexpr size_t kLeadBlocks = 64;           // prefetch at most 1 GiB ahead of the copies

size_t align_up(size_t v, size_t a) {
  return (v + a - 1) / a * a;
}

int env_int(const char* name, int def) {
  const char* e = std::getenv(name);
  return e && *e ? std::atoi(e) : def;
}

// A read-only file mapping of this process (adjacent VMAs of one file merged).
struct Mapping {
  uintptr_t start, end;
  uint64_t offset;  // file offset of `start`
  unsigned long long inode;
  std::string path;
};

std::vector<Mapping> readonly_file_mappings() {
  std::vector<Mapping> r;
  FILE* f = std::fopen("/proc/self/maps", "re");
  if (!f) return r;
  char* line = nullptr;
  size_t cap = 0;
  while (getline(&line, &cap, f) > 0) {
    unsigned long long start = 0, end = 0, off = 0, inode = 0;
    unsigned maj = 0, min = 0;
    char perms[8] = {};
    int n = 0;
    if (std::sscanf(line, "%llx-%llx %7s %llx %x:%x %llu %n", &start, &end, perms, &off, &maj, &min,
                    &inode, &n) < 7 ||
        n <= 0)
      continue;
    std::string path(line + n);
    while (!path.empty() && (path.back() == '\n' || path.back() == ' ')) path.pop_back();
    // Private writable mappings may hold copied-on-write pages that differ from the file.
    if (inode == 0 || path.empty() || path[0] != '/' || perms[0] != 'r' || perms[1] == 'w')
      continue;
    if (!r.empty() && r.back().end == start && r.back().inode == inode && r.back().path == path &&
        r.back().offset + (r.back().end - r.back().start) == off) {
      r.back().end = uintptr_t(end);
      continue;
    }
    r.push_back({uintptr_t(start), uintptr_t(end), off, inode, std::move(path)});
  }
  std::free(line);
  std::fclose(f);
  return r;
}

// A file some tensors are read from, and where.
struct Source {
  int fd = -1;
  std::string path;
  uint64_t size = 0;
};

struct Item {
  size_t index;  // in `host`
  const uint8_t* src;
  size_t bytes;
  size_t dst = 0;     // device offset
  int file = -1;      // index into the sources, or -1: memcpy from `src`
  uint64_t foff = 0;  // file offset of src
  // Prefetch run holding the item: its first block and file offset.
  size_t block0 = 0;
  uint64_t run_foff = 0;
};

// A part of one item placed in a chunk's staging buffer.
struct Piece {
  uint32_t item;
  size_t off, len, stage;
};

// Reads exactly n bytes at file offset `off`.
void pread_all(int fd, const std::string& path, uint8_t* dst, size_t n, uint64_t off) {
  while (n) {
    const ssize_t r = ::pread(fd, dst, n, off_t(off));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0)
      throw Error(cat(path, ": read of ", n, " bytes at offset ", off, " failed: ",
                      r < 0 ? std::strerror(errno) : "unexpected end of file (file changed?)"));
    dst += r, n -= size_t(r), off += uint64_t(r);
  }
}

// Files behind the items' sources: each item lying inside a read-only file mapping is bound to
// an open descriptor of that file, after checking it is the mapped file (inode, size, and the
// first page of content). Items elsewhere, or if anything does not match, stay memcpy items.
std::vector<Source> bind_files(std::vector<Item>& items) {
  std::vector<Source> srcs;
  if (env_int("KILN_UPLOAD_PREAD", 1) == 0) return srcs;
  const std::vector<Mapping> maps = readonly_file_mappings();
  if (maps.empty()) return srcs;
  struct Opened {
    const Mapping* m;
    int file;  // -1: unusable
  };
  std::vector<Opened> opened;
  for (Item& it : items) {
    if (it.bytes == 0) continue;
    const uintptr_t a = reinterpret_cast<uintptr_t>(it.src);
    auto m = std::upper_bound(maps.begin(), maps.end(), a,
                              [](uintptr_t v, const Mapping& x) { return v < x.start; });
    if (m == maps.begin()) continue;
    --m;
    if (a < m->start || a + it.bytes > m->end) continue;
    const uint64_t foff = m->offset + (a - m->start);
    auto o = std::find_if(opened.begin(), opened.end(), [&](const Opened& x) {
      return x.m->inode == m->inode && x.m->path == m->path;
    });
    if (o == opened.end()) {
      int file = -1;
      const int fd = ::open(m->path.c_str(), O_RDONLY | O_CLOEXEC);
      struct stat st {};
      if (fd >= 0 && ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
          static_cast<unsigned long long>(st.st_ino) == m->inode) {
        // Same bytes as the mapping where this (the first) item starts?
        const size_t n = std::min<size_t>(it.bytes, 4096);
        std::vector<uint8_t> probe(n);
        const ssize_t r = ::pread(fd, probe.data(), n, off_t(foff));
        if (r == ssize_t(n) && std::memcmp(probe.data(), it.src, n) == 0) {
          file = int(srcs.size());
          srcs.push_back({fd, m->path, uint64_t(st.st_size)});
        }
      }
      if (file < 0 && fd >= 0) ::close(fd);
      opened.push_back({&*m, file});
      o = opened.end() - 1;
    }
    if (o->file < 0 || srcs[size_t(o->file)].size < foff + it.bytes) continue;
    it.file = o->file;
    it.foff = foff;
  }
  return srcs;
}

// A range of one file read by the prefetcher in one call; `addr` is where it is mapped.
struct Block {
  int file;
  uint64_t foff;
  size_t len;
  const uint8_t* addr;
};

// File-backed items (in address order) merged into runs of contiguous file bytes, cut into
// blocks of at most kBlock. Records each item's run in block0 / run_foff.
std::vector<Block> make_blocks(std::vector<Item>& items) {
  std::vector<Block> blocks;
  for (size_t i = 0; i < items.size();) {
    if (items[i].file < 0 || items[i].bytes == 0) {
      ++i;
      continue;
    }
    // A run: same file, each item starting inside or right at the end of the run so far, at
    // the address that the file offset implies (one mapping).
    const int file = items[i].file;
    const uint64_t foff = items[i].foff;
    const uint8_t* addr = items[i].src;
    uint64_t end = foff + items[i].bytes;
    size_t j = i + 1;
    for (; j < items.size(); ++j) {
      const Item& n = items[j];
      if (n.bytes == 0) continue;
      if (n.file != file || n.foff < foff || n.foff > end || n.src != addr + (n.foff - foff)) break;
      end = std::max(end, n.foff + n.bytes);
    }
    for (size_t k = i; k < j; ++k) items[k].block0 = blocks.size(), items[k].run_foff = foff;
    for (uint64_t o = foff; o < end; o += kBlock)
      blocks.push_back({file, o, size_t(std::min<uint64_t>(kBlock, end - o)), addr + (o - foff)});
    i = j;
  }
  return blocks;
}

// Whether every page of the block is in the page cache.
bool resident(const Block& b, std::vector<unsigned char>& vec) {
  static const size_t page = size_t(sysconf(_SC_PAGESIZE));
  const uintptr_t a = reinterpret_cast<uintptr_t>(b.addr), a0 = a / page * page;
  const size_t len = b.len + (a - a0), pages = (len + page - 1) / page;
  vec.resize(pages);
  if (::mincore(reinterpret_cast<void*>(a0), len, vec.data()) != 0) return false;
  for (unsigned char v : vec)
    if (!(v & 1)) return false;
  return true;
}

// Reads blocks in order on its own thread, one sequential stream like `dd` (what the disk is
// fastest at), skipping blocks already in the page cache; the copy threads then read from the
// cache. Advisory: a failed read just ends it. `limit()` (optional) is the number of blocks it
// may have started; it waits for more while at it.
class Prefetcher {
 public:
  Prefetcher(std::vector<Block> blocks, std::vector<int> fds, std::function<size_t()> limit)
      : blocks_(std::move(blocks)), fds_(std::move(fds)), limit_(std::move(limit)) {
    th_ = std::thread([this] { run(); });
  }
  ~Prefetcher() {
    stop_ = true;
    th_.join();
  }
  // Ends it soon (after the read in progress); waiters are released.
  void cancel() { stop_ = true; }
  // Waits until the first n blocks are done, or the prefetcher has ended.
  void wait_for(size_t n) {
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [&] { return done_ >= n || ended_; });
  }

 private:
  void run() {
    try {
      std::vector<uint8_t> buf(kBlock);
      std::vector<unsigned char> vec;
      for (size_t i = 0; i < blocks_.size() && !stop_; ++i) {
        while (limit_ && i >= limit_() && !stop_)
          std::this_thread::sleep_for(std::chrono::microseconds(500));
        if (stop_) break;
        const Block& b = blocks_[i];
        if (!resident(b, vec)) {
          const int fd = fds_[size_t(b.file)];
          for (size_t got = 0; got < b.len;) {
            const ssize_t r = ::pread(fd, buf.data(), b.len - got, off_t(b.foff + got));
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) throw std::runtime_error("prefetch read failed");
            got += size_t(r);
          }
        }
        {
          std::lock_guard<std::mutex> lk(mu_);
          done_ = i + 1;
        }
        cv_.notify_all();
      }
    } catch (...) {
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      ended_ = true;
    }
    cv_.notify_all();
  }

  std::vector<Block> blocks_;
  std::vector<int> fds_;
  std::function<size_t()> limit_;
  std::mutex mu_;
  std::condition_variable cv_;
  size_t done_ = 0;
  bool ended_ = false;
  std::atomic<bool> stop_{false};
  std::thread th_;
};

// Owns the pinned staging buffers and their events; on destruction waits for the copies still
// reading them, then frees them.
struct Staging {
  cudaStream_t stream = nullptr;
  uint8_t* host = nullptr;
  std::vector<cudaEvent_t> done;  // one per buffer: its last copy to the device finished
  ~Staging() {
    if (host || !done.empty()) cudaStreamSynchronize(stream);
    for (cudaEvent_t e : done) cudaEventDestroy(e);
    if (host) cudaFreeHost(host);
  }
};

// Closes descriptors on destruction.
struct Fds {
  std::vector<int> fd;
  ~Fds() {
    for (int f : fd)
      if (f >= 0) ::close(f);
  }
};

// Every tensor of `host` as a plain tensor (quantized weights' codes only).
std::vector<Tensor> upload_plain(const std::vector<const Tensor*>& host, cudaStream_t s) {
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  const bool verbose = env_int("KILN_UPLOAD_VERBOSE", 0) != 0;

  // Items in source-address order (file order for a mapped safetensors file); device offsets
  // follow that order.
  std::vector<Item> items;
  items.reserve(host.size());
  for (size_t i = 0; i < host.size(); ++i) {
    const Tensor* t = host[i];
    KILN_CHECK(t != nullptr, "upload: null tensor #", i);
    KILN_CHECK(t->device == Device::CPU, "upload: tensor #", i, " is already on a device");
    const size_t bytes = t->nbytes();
    KILN_CHECK(bytes == 0 || t->data != nullptr, "upload: tensor #", i, " has no data");
    items.push_back({i, static_cast<const uint8_t*>(t->data), bytes});
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    return std::less<const uint8_t*>()(a.src, b.src);
  });
  size_t total = 0;
  for (Item& it : items) {
    total = align_up(total, kAlign);
    it.dst = total;
    total += it.bytes;
  }

  void* dev = nullptr;
  KILN_CUDA_CHECK(cudaMalloc(&dev, std::max(total, kAlign)));
  std::shared_ptr<void> owner(dev, [](void* p) { cudaFree(p); });
  auto* base = static_cast<uint8_t*>(dev);

  // Chunks of at most kChunk staging bytes, pieces packed back to back.
  std::vector<Piece> pieces;
  std::vector<size_t> chunk_begin;  // first piece of each chunk; one more entry at the end
  size_t fill = kChunk;
  for (size_t k = 0; k < items.size(); ++k)
    for (size_t done = 0; done < items[k].bytes;) {
      if (fill == kChunk) chunk_begin.push_back(pieces.size()), fill = 0;
      const size_t len = std::min(kChunk - fill, items[k].bytes - done);
      pieces.push_back({uint32_t(k), done, len, fill});
      fill += len, done += len;
    }
  const size_t chunks = chunk_begin.size();
  chunk_begin.push_back(pieces.size());

  Fds files;
  std::vector<Source> srcs;
  size_t pread_bytes = 0;
  int threads = 0;
  bool prefetched = false;
  if (chunks > 0) {
    srcs = bind_files(items);
    for (const Source& f : srcs) files.fd.push_back(f.fd);
    for (const Item& it : items)
      if (it.file >= 0) pread_bytes += it.bytes;
    std::vector<Block> blocks;
    if (env_int("KILN_UPLOAD_PREFETCH", 1) != 0) blocks = make_blocks(items);
    // Prefetch blocks that must be done before each chunk is read.
    std::vector<size_t> need(chunks, 0);
    for (size_t c = 0; c < chunks && !blocks.empty(); ++c)
      for (size_t p = chunk_begin[c]; p < chunk_begin[c + 1]; ++p) {
        const Item& it = items[pieces[p].item];
        if (it.file < 0) continue;
        const uint64_t last = it.foff + pieces[p].off + pieces[p].len - 1;
        need[c] = std::max(need[c], it.block0 + size_t((last - it.run_foff) / kBlock) + 1);
      }

    int device = 0;
    KILN_CUDA_CHECK(cudaGetDevice(&device));
    const int hw = int(std::max(1u, std::thread::hardware_concurrency()));
    threads = env_int("KILN_UPLOAD_THREADS", std::min(hw, 8));
    threads = int(std::clamp<int64_t>(threads, 1, std::min<int64_t>(kMaxThreads, int64_t(chunks))));
    // Each thread holds at most one buffer while filling it, so the free list never runs dry;
    // the two spare buffers let a copy finish while its successors are being filled.
    const int nbuf = int(std::min<size_t>(size_t(threads) + 2, chunks));

    Staging st;
    st.stream = s;
    KILN_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&st.host), size_t(nbuf) * kChunk));
    for (int b = 0; b < nbuf; ++b) {
      cudaEvent_t e;
      KILN_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming | cudaEventBlockingSync));
      st.done.push_back(e);
    }

    std::mutex mu;              // guards free_bufs and error
    std::deque<int> free_bufs;  // oldest-issued first
    for (int b = 0; b < nbuf; ++b) free_bufs.push_back(b);
    std::exception_ptr error;
    std::atomic<bool> failed{false};
    std::atomic<size_t> next{0};
    // The prefetcher stays within kLeadBlocks of the furthest chunk taken, so the copies never
    // wait for it to come back.
    std::atomic<size_t> max_need{0};
    std::unique_ptr<Prefetcher> prefetch;
    if (!blocks.empty()) {
      prefetch = std::make_unique<Prefetcher>(std::move(blocks), files.fd,
                                              [&] { return max_need.load() + kLeadBlocks; });
      prefetched = true;
    }

    auto fail = [&] {
      std::lock_guard<std::mutex> lk(mu);
      if (!error) error = std::current_exception();
      failed = true;
      if (prefetch) prefetch->cancel();
    };

    auto worker = [&] {
      try {
        // The runtime's current device is per thread: without this a new thread would use
        // (and create a context on) device 0.
        KILN_CUDA_CHECK(cudaSetDevice(device));
        Fds own;  // a descriptor per thread and file: separate readahead state
        own.fd.assign(srcs.size(), -1);
        auto fd_of = [&](int file) {
          int& f = own.fd[size_t(file)];
          if (f < 0) {
            f = ::open(cat("/proc/self/fd/", srcs[size_t(file)].fd).c_str(), O_RDONLY | O_CLOEXEC);
            if (f < 0) f = ::dup(srcs[size_t(file)].fd);
            if (f < 0)
              throw Error(cat(srcs[size_t(file)].path, ": cannot open: ", std::strerror(errno)));
          }
          return f;
        };
        while (!failed.load(std::memory_order_relaxed)) {
          const size_t c = next.fetch_add(1);
          if (c >= chunks) break;
          if (prefetch && need[c]) {
            size_t m = max_need.load();
            while (m < need[c] && !max_need.compare_exchange_weak(m, need[c])) {
            }
            prefetch->wait_for(need[c]);
          }
          int b;
          {
            std::lock_guard<std::mutex> lk(mu);
            b = free_bufs.front();  // never empty: see nbuf
            free_bufs.pop_front();
          }
          struct Release {  // back to the free list, also when this chunk fails
            std::mutex& mu;
            std::deque<int>& q;
            int b;
            ~Release() {
              std::lock_guard<std::mutex> lk(mu);
              q.push_back(b);
            }
          } release{mu, free_bufs, b};
          KILN_CUDA_CHECK(cudaEventSynchronize(st.done[size_t(b)]));  // its previous copy
          uint8_t* buf = st.host + size_t(b) * kChunk;
          const size_t p0 = chunk_begin[c], p1 = chunk_begin[c + 1];
          // Fill: runs of pieces contiguous in the source become one read.
          for (size_t p = p0; p < p1;) {
            const Item& it = items[pieces[p].item];
            const size_t stage = pieces[p].stage;
            size_t len = pieces[p].len;
            size_t q = p + 1;
            if (it.file >= 0) {
              uint64_t end = it.foff + pieces[p].off + len;
              for (; q < p1; ++q) {
                const Item& nx = items[pieces[q].item];
                if (nx.file != it.file || nx.foff + pieces[q].off != end) break;
                len += pieces[q].len, end += pieces[q].len;
              }
              pread_all(fd_of(it.file), srcs[size_t(it.file)].path, buf + stage, len,
                        it.foff + pieces[p].off);
            } else {
              std::memcpy(buf + stage, it.src + pieces[p].off, len);
            }
            p = q;
          }
          // Copy: runs contiguous on the device become one copy.
          for (size_t p = p0; p < p1;) {
            const size_t stage = pieces[p].stage;
            size_t dst = items[pieces[p].item].dst + pieces[p].off, len = pieces[p].len;
            size_t q = p + 1;
            for (; q < p1 && items[pieces[q].item].dst + pieces[q].off == dst + len; ++q)
              len += pieces[q].len;
            KILN_CUDA_CHECK(
                cudaMemcpyAsync(base + dst, buf + stage, len, cudaMemcpyHostToDevice, s));
            p = q;
          }
          KILN_CUDA_CHECK(cudaEventRecord(st.done[size_t(b)], s));
        }
      } catch (...) {
        fail();
      }
    };

    {
      // Joined before anything they use goes away, also when starting one of them throws.
      struct Pool {
        std::vector<std::thread> t;
        ~Pool() {
          for (auto& x : t) x.join();
        }
      } pool;
      try {
        for (int i = 0; i < threads; ++i) pool.t.emplace_back(worker);
      } catch (...) {
        failed = true;
        throw;
      }
    }
    if (error) std::rethrow_exception(error);  // ~Staging drains the copies, ~owner frees
    KILN_CUDA_CHECK(cudaStreamSynchronize(s));
  }

  std::vector<Tensor> out(host.size());
  for (const Item& it : items) {
    const Tensor* t = host[it.index];
    out[it.index] = Tensor::view(t->dtype, t->shape, owner, base + it.dst);
    out[it.index].device = Device::CUDA;
  }
  if (verbose) {
    const double dt = std::chrono::duration<double>(clock::now() - t0).count();
    std::fprintf(stderr,
                 "kiln upload: %zu tensors, %.3f GB (%.3f GB by pread, %zu files%s), %d threads, "
                 "%.3f s, %.2f GB/s\n",
                 host.size(), double(total) / 1e9, double(pread_bytes) / 1e9, srcs.size(),
                 prefetched ? ", prefetched" : "", threads, dt,
                 double(total) / 1e9 / std::max(dt, 1e-9));
  }
  return out;
}

}  // namespace

std::vector<Tensor> upload_all(const std::vector<const Tensor*>& host, cudaStream_t s) {
  // Quantized weights' scales, zeros and input orders go up in the same bulk copy, after the
  // weights.
  std::vector<const Tensor*> all = host;
  struct Extra {
    size_t weight, scales = 0, zeros = 0, perm = 0;  // indices in `all` (0: none)
  };
  std::vector<Extra> extra;
  for (size_t i = 0; i < host.size(); ++i) {
    // (A null entry is left for upload_plain to refuse by name.)
    if (!host[i] || host[i]->quant == WeightQuant::None) continue;
    Extra e{i};
    if (host[i]->scales) e.scales = all.size(), all.push_back(host[i]->scales.get());
    if (host[i]->zero_points) e.zeros = all.size(), all.push_back(host[i]->zero_points.get());
    if (host[i]->input_perm) e.perm = all.size(), all.push_back(host[i]->input_perm.get());
    extra.push_back(e);
  }
  std::vector<Tensor> dev = upload_plain(all, s);
  for (const Extra& e : extra) {
    Tensor& t = dev[e.weight];
    t.quant = host[e.weight]->quant;
    if (e.scales) t.scales = std::make_shared<Tensor>(dev[e.scales]);
    if (e.zeros) t.zero_points = std::make_shared<Tensor>(dev[e.zeros]);
    if (e.perm) t.input_perm = std::make_shared<Tensor>(dev[e.perm]);
    relayout_quant_weight(t, s);
  }
  dev.resize(host.size());
  return dev;
}

}  // namespace kiln::cuda
