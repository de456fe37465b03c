// Collectives between the ranks of a tensor- or pipeline-parallel model: the few that the shared
// decoder issues (all-reduce of partial sums, all-gather of vocabulary slices, send / recv of the
// residual stream between stages). Buffers are device memory of the rank's backend; calls are
// ordered after the work the rank issued before them (NCCL: on the backend's stream), and every
// rank of a group must make the same calls in the same order, as with NCCL.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace kiln {

class Backend;

class Comm {
 public:
  virtual ~Comm() = default;
  virtual int rank() const = 0;  // in this group, 0 .. size() - 1
  virtual int size() const = 0;
  // buf (count elements of t: F32, F16 or BF16) becomes the elementwise sum over the group; every
  // rank gets the same bits.
  virtual void all_reduce_sum(void* buf, int64_t count, DType t) = 0;
  // recv[r * bytes, (r + 1) * bytes) = rank r's `send`, on every rank.
  virtual void all_gather(const void* send, void* recv, size_t bytes) = 0;
  // Point to point with rank `peer` of this group; a send is matched by the peer's recv of the
  // same size, in order.
  virtual void send(const void* buf, size_t bytes, int peer) = 0;
  virtual void recv(void* buf, size_t bytes, int peer) = 0;
  // From another thread, when a peer is known to be gone: makes calls waiting on it fail rather
  // than wait forever (ncclCommAbort). The comm is unusable afterwards.
  virtual void abort() {}
};

// NCCL groups (CUDA builds; without CUDA both throw kiln::Error): the unique id one rank makes
// (ncclUniqueId's 128 bytes) and hands to every rank, and this rank's member of a group of
// `size` over CUDA backend `be`, whose stream the collectives go on (Backend::stream).
std::vector<char> nccl_unique_id();
std::unique_ptr<Comm> make_nccl_comm(Backend& be, const std::vector<char>& id, int rank, int size);

// The CPU emulation of a multi-GPU node: ranks are threads of this process, and these groups
// move bytes through shared memory (sums in rank order, so every rank gets the same bits). A
// rank that throws calls abort(), and every rank waiting in a collective then throws a
// kiln::Error naming it, instead of waiting forever.
class ThreadWorld {
 public:
  explicit ThreadWorld(int size);
  ~ThreadWorld();
  int size() const;
  // A group of these world ranks (ascending); `me` is the calling rank's world rank.
  std::unique_ptr<Comm> group(const std::vector<int>& ranks, int me);
  void abort(int rank, const std::string& why);

  struct State;

 private:
  std::shared_ptr<State> s_;
};

}  // namespace kiln
