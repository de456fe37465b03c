// ThreadWorld: collectives between ranks that are threads of one process (graph/comm.h).
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>

#include "core/dtype.h"
#include "core/error.h"
#include "graph/comm.h"

namespace kiln {

namespace {

// A collective that waits this long for the other ranks is a bug (a rank skipped a call):
// an error, not a hang.
constexpr auto kWaitLimit = std::chrono::seconds(300);

struct GroupState {
  std::vector<int> ranks;
  int arrived = 0;
  uint64_t gen = 0;
  std::vector<const void*> slots;
};

}  // namespace

struct ThreadWorld::State {
  int size = 0;
  std::mutex m;
  std::condition_variable cv;
  bool aborted = false;
  std::string why;
  std::map<std::vector<int>, std::unique_ptr<GroupState>> groups;
  std::map<std::pair<int, int>, std::deque<std::vector<char>>> mail;  // (from, to) world ranks

  [[noreturn]] void fail() { throw Error(why); }
  // Waits under `lk` until pred() or an abort; throws on an abort or after kWaitLimit.
  template <typename P>
  void wait(std::unique_lock<std::mutex>& lk, P pred, const char* what) {
    if (!cv.wait_for(lk, kWaitLimit, [&] { return aborted || pred(); }))
      throw Error(cat("rank waited ", kWaitLimit.count(), " s in ", what,
                      " for the other ranks: they do not make the same calls"));
    if (aborted) fail();
  }
  void barrier(GroupState& g) {
    std::unique_lock lk(m);
    if (aborted) fail();
    const uint64_t gen = g.gen;
    if (++g.arrived == int(g.ranks.size())) {
      g.arrived = 0;
      ++g.gen;
      cv.notify_all();
      return;
    }
    wait(
        lk, [&] { return g.gen != gen; }, "a collective");
  }
};

namespace {

class ThreadComm final : public Comm {
 public:
  ThreadComm(std::shared_ptr<ThreadWorld::State> s, GroupState* g, int me)
      : s_(std::move(s)), g_(g), me_(me) {}
  int rank() const override { return me_; }
  int size() const override { return int(g_->ranks.size()); }

  void all_reduce_sum(void* buf, int64_t count, DType t) override {
    if (size() == 1) return;
    post(buf);
    // Every rank sums all ranks' buffers in rank order into its own copy: the same bits on
    // every rank.
    std::vector<float> sum(static_cast<size_t>(count), 0.0f), part(static_cast<size_t>(count));
    for (const void* p : g_->slots) {
      if (t == DType::F32) {
        const auto* f = static_cast<const float*>(p);
        for (int64_t i = 0; i < count; ++i) sum[size_t(i)] += f[i];
      } else {
        to_f32(t, p, part.data(), size_t(count));
        for (int64_t i = 0; i < count; ++i) sum[size_t(i)] += part[size_t(i)];
      }
    }
    s_->barrier(*g_);  // everyone has read every buffer
    if (t == DType::F32)
      std::memcpy(buf, sum.data(), size_t(count) * 4);
    else
      from_f32(t, sum.data(), buf, size_t(count));
  }

  void all_gather(const void* send, void* recv, size_t bytes) override {
    post(send);
    for (size_t r = 0; r < g_->slots.size(); ++r)
      std::memcpy(static_cast<char*>(recv) + r * bytes, g_->slots[r], bytes);
    s_->barrier(*g_);
  }

  void send(const void* buf, size_t bytes, int peer) override {
    std::lock_guard lk(s_->m);
    if (s_->aborted) s_->fail();
    const char* p = static_cast<const char*>(buf);
    s_->mail[{world(me_), world(peer)}].emplace_back(p, p + bytes);
    s_->cv.notify_all();
  }

  void recv(void* buf, size_t bytes, int peer) override {
    std::unique_lock lk(s_->m);
    auto& q = s_->mail[{world(peer), world(me_)}];
    s_->wait(
        lk, [&] { return !q.empty(); }, "a receive");
    KILN_CHECK(q.front().size() == bytes, "rank ", world(me_), " expected ", bytes,
               " bytes from rank ", world(peer), " but ", q.front().size(), " were sent");
    std::memcpy(buf, q.front().data(), bytes);
    q.pop_front();
  }

 private:
  int world(int r) const { return g_->ranks[size_t(r)]; }
  // Publishes this rank's buffer and waits until every rank has published its own.
  void post(const void* p) {
    {
      std::lock_guard lk(s_->m);
      g_->slots[size_t(me_)] = p;
    }
    s_->barrier(*g_);
  }

  std::shared_ptr<ThreadWorld::State> s_;
  GroupState* g_;
  int me_;
};

}  // namespace

ThreadWorld::ThreadWorld(int size) : s_(std::make_shared<State>()) {
  KILN_CHECK(size >= 1, "a world of ", size, " ranks");
  s_->size = size;
}

ThreadWorld::~ThreadWorld() = default;

int ThreadWorld::size() const {
  return s_->size;
}

std::unique_ptr<Comm> ThreadWorld::group(const std::vector<int>& ranks, int me) {
  std::lock_guard lk(s_->m);
  auto& g = s_->groups[ranks];
  if (!g) {
    g = std::make_unique<GroupState>();
    g->ranks = ranks;
    g->slots.assign(ranks.size(), nullptr);
  }
  int idx = -1;
  for (size_t i = 0; i < ranks.size(); ++i) {
    KILN_CHECK(ranks[i] >= 0 && ranks[i] < s_->size, "rank ", ranks[i], " is not in the world");
    if (ranks[i] == me) idx = int(i);
  }
  KILN_CHECK(idx >= 0, "rank ", me, " is not in the group it joins");
  return std::make_unique<ThreadComm>(s_, g.get(), idx);
}

#ifndef KILN_HAVE_CUDA
std::vector<char> nccl_unique_id() {
  throw Error("NCCL needs a CUDA build of kiln");
}
std::unique_ptr<Comm> make_nccl_comm(Backend&, const std::vector<char>&, int, int) {
  throw Error("NCCL needs a CUDA build of kiln");
}
#endif

void ThreadWorld::abort(int rank, const std::string& why) {
  std::lock_guard lk(s_->m);
  if (s_->aborted) return;
  s_->aborted = true;
  s_->why = cat("rank ", rank, " failed: ", why);
  s_->cv.notify_all();
}

}  // namespace kiln
