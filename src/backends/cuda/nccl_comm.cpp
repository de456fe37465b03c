// Comm over NCCL (graph/comm.h): collectives on the CUDA backend's stream, after the work issued
// before them, so they need no synchronisation and can be captured in CUDA graphs.
#include <nccl.h>

#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "graph/backend.h"
#include "graph/comm.h"

namespace kiln {

namespace {

void check(ncclResult_t r, const char* what) {
  if (r == ncclSuccess || r == ncclInProgress) return;
  const char* last = ncclGetLastError(nullptr);
  throw Error(
      cat("NCCL ", what, ": ", ncclGetErrorString(r), last && *last ? ": " : "", last ? last : ""));
}

ncclDataType_t nccl_type(DType t) {
  switch (t) {
    case DType::F32:
      return ncclFloat32;
    case DType::F16:
      return ncclFloat16;
    case DType::BF16:
      return ncclBfloat16;
    default:
      throw Error(cat("NCCL all-reduce of ", dtype_name(t), " elements"));
  }
}

class NcclComm final : public Comm {
 public:
  NcclComm(Backend& be, const std::vector<char>& id, int rank, int size)
      : be_(be), rank_(rank), size_(size) {
    KILN_CHECK(id.size() == sizeof(ncclUniqueId), "an NCCL unique id is ", sizeof(ncclUniqueId),
               " bytes, not ", id.size());
    KILN_CHECK(rank >= 0 && rank < size, "NCCL rank ", rank, " of ", size);
    ncclUniqueId u;
    std::memcpy(&u, id.data(), sizeof u);
    // NVLink multicast (NVLS) stays off unless asked for: it needs fabric support that lent
    // machines do not all have, and kiln's all-reduces are small.
    setenv("NCCL_NVLS_ENABLE", "0", 0);
    check(ncclCommInitRank(&comm_, size, u, rank), "init");
  }
  ~NcclComm() override {
    if (comm_) ncclCommDestroy(comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void all_reduce_sum(void* buf, int64_t count, DType t) override {
    alive();
    check(ncclAllReduce(buf, buf, size_t(count), nccl_type(t), ncclSum, comm_, stream()),
          "all-reduce");
  }
  void all_gather(const void* send, void* recv, size_t bytes) override {
    alive();
    check(ncclAllGather(send, recv, bytes, ncclChar, comm_, stream()), "all-gather");
  }
  void send(const void* buf, size_t bytes, int peer) override {
    alive();
    check(ncclSend(buf, bytes, ncclChar, peer, comm_, stream()), "send");
  }
  void recv(void* buf, size_t bytes, int peer) override {
    alive();
    check(ncclRecv(buf, bytes, ncclChar, peer, comm_, stream()), "recv");
  }
  void abort() override {
    if (comm_) ncclCommAbort(comm_);
    comm_ = nullptr;
  }

 private:
  void alive() const { KILN_CHECK(comm_, "NCCL: the group was aborted (a rank ended)"); }
  // The backend's stream, with its deferred work issued first.
  cudaStream_t stream() { return static_cast<cudaStream_t>(be_.stream()); }
  Backend& be_;
  int rank_, size_;
  ncclComm_t comm_ = nullptr;
};

}  // namespace

std::vector<char> nccl_unique_id() {
  ncclUniqueId u;
  check(ncclGetUniqueId(&u), "unique id");
  std::vector<char> id(sizeof u);
  std::memcpy(id.data(), &u, sizeof u);
  return id;
}

std::unique_ptr<Comm> make_nccl_comm(Backend& be, const std::vector<char>& id, int rank, int size) {
  KILN_CHECK(be.device() == Device::CUDA, "NCCL needs a CUDA backend, not ", be.name());
  return std::make_unique<NcclComm>(be, id, rank, size);
}

}  // namespace kiln
