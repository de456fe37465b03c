// KILN_CUDA_PROFILE=1: GPU time per op kind of the CUDA backend, printed when it goes away.
#pragma once

#include <algorithm>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "backends/cuda/cuda_common.h"

namespace kiln {
namespace {

// GPU time per op kind, from events recorded around each outermost op on the stream. The time
// of an op includes any wait for its own launch, so a starved GPU shows up as slow small ops.
class OpProfile {
 public:
  explicit OpProfile(cudaStream_t s) : stream_(s) {}
  ~OpProfile() {
    for (auto& p : pending_) cudaEventDestroy(p.a), cudaEventDestroy(p.b);
    for (cudaEvent_t e : pool_) cudaEventDestroy(e);
  }
  void begin(const char* op) {
    if (depth_++) return;
    cur_ = {op, event(), event()};
    KILN_CUDA_CHECK(cudaEventRecord(cur_.a, stream_));
  }
  void end() {
    if (--depth_) return;
    KILN_CUDA_CHECK(cudaEventRecord(cur_.b, stream_));
    pending_.push_back(cur_);
  }
  // After the stream is synchronised.
  void harvest(bool forward_done) {
    for (auto& p : pending_) {
      float ms = 0;
      KILN_CUDA_CHECK(cudaEventElapsedTime(&ms, p.a, p.b));
      auto& t = total_[p.op];
      t.first += ms, t.second += 1;
      pool_.push_back(p.a), pool_.push_back(p.b);
    }
    pending_.clear();
    forwards_ += forward_done;
  }
  void report() const {
    if (total_.empty()) return;
    std::vector<std::pair<std::string, std::pair<double, int64_t>>> v(total_.begin(), total_.end());
    std::sort(v.begin(), v.end(), [](auto& a, auto& b) { return a.second.first > b.second.first; });
    double all = 0;
    for (auto& [k, t] : v) all += t.first;
    std::fprintf(stderr, "kiln CUDA profile: %lld forwards, %.3f ms GPU time per forward\n",
                 (long long)forwards_, all / double(std::max<int64_t>(forwards_, 1)));
    std::fprintf(stderr, "  %-12s %10s %10s %10s %12s\n", "op", "calls", "total ms", "avg us",
                 "ms/forward");
    for (auto& [k, t] : v)
      std::fprintf(stderr, "  %-12s %10lld %10.3f %10.2f %12.4f\n", k.c_str(), (long long)t.second,
                   t.first, 1e3 * t.first / double(t.second),
                   t.first / double(std::max<int64_t>(forwards_, 1)));
  }

 private:
  struct Span {
    const char* op;
    cudaEvent_t a, b;
  };
  cudaEvent_t event() {
    if (!pool_.empty()) {
      cudaEvent_t e = pool_.back();
      pool_.pop_back();
      return e;
    }
    cudaEvent_t e;
    KILN_CUDA_CHECK(cudaEventCreate(&e));
    return e;
  }
  cudaStream_t stream_;
  int depth_ = 0;
  Span cur_{};
  std::vector<Span> pending_;
  std::vector<cudaEvent_t> pool_;
  std::map<std::string, std::pair<double, int64_t>> total_;
  int64_t forwards_ = 0;
};

// Times the enclosing op when profiling is on.
struct Prof {
  Prof(OpProfile* p, const char* op) : p_(p) {
    if (p_) p_->begin(op);
  }
  ~Prof() {
    if (p_) p_->end();
  }
  OpProfile* p_;
};

}  // namespace
}  // namespace kiln
