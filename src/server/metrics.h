// Prometheus text exposition for the HTTP server's /metrics: histograms the server measures from
// Scheduler events, rendered next to the Scheduler's own counters (vLLM-like names, `kiln:`).
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "kiln/serving.h"

namespace kiln::server {

// A cumulative histogram with fixed upper bounds (seconds).
struct Histogram {
  explicit Histogram(std::vector<double> bounds)
      : bounds(std::move(bounds)), counts(this->bounds.size() + 1, 0) {}
  void observe(double v);
  void render(std::string& out, const std::string& name, const std::string& help,
              const std::string& labels) const;

  std::vector<double> bounds;
  std::vector<uint64_t> counts;  // per bucket (not cumulative); the last is +Inf
  double sum = 0;
  uint64_t count = 0;
};

// Everything /metrics shows that the Scheduler does not count itself. Thread-safe.
class Metrics {
 public:
  Metrics();
  void observe_ttft(double s);
  void observe_itl(double s);
  void observe_e2e(double s);
  void count_finished(const std::string& reason);
  // The exposition text; `stats` is a Scheduler snapshot (or zeros while loading).
  std::string render(const SchedulerStats& stats, const std::string& model_name) const;

 private:
  mutable std::mutex mu_;
  Histogram ttft_, itl_, e2e_;
  std::map<std::string, int64_t> finished_;  // finish reason -> completions
};

}  // namespace kiln::server
