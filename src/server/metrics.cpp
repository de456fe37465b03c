// Prometheus text exposition for /metrics (see metrics.h).
#include "server/metrics.h"

#include <algorithm>
#include <cstdio>

namespace kiln::server {

namespace {

std::string num(double v) {
  char b[64];
  std::snprintf(b, sizeof b, "%.17g", v);
  return b;
}

// A label value with Prometheus' escapes (backslash, quote, newline).
std::string escape(const std::string& s) {
  std::string r;
  for (char c : s) {
    if (c == '\\' || c == '"') r += '\\';
    if (c == '\n') {
      r += "\\n";
      continue;
    }
    r += c;
  }
  return r;
}

void scalar(std::string& out, const std::string& name, const char* type, const std::string& help,
            const std::string& labels, double v) {
  out += "# HELP " + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
  out += name + "{" + labels + "} " + num(v) + "\n";
}

}  // namespace

void Histogram::observe(double v) {
  const size_t i = size_t(std::lower_bound(bounds.begin(), bounds.end(), v) - bounds.begin());
  counts[i]++;  // le is inclusive: v == bound falls in that bucket
  sum += v;
  count++;
}

void Histogram::render(std::string& out, const std::string& name, const std::string& help,
                       const std::string& labels) const {
  out += "# HELP " + name + " " + help + "\n# TYPE " + name + " histogram\n";
  uint64_t cum = 0;
  for (size_t i = 0; i <= bounds.size(); ++i) {
    cum += counts[i];
    const std::string le = i < bounds.size() ? num(bounds[i]) : "+Inf";
    out += name + "_bucket{" + labels + ",le=\"" + le + "\"} " + std::to_string(cum) + "\n";
  }
  out += name + "_sum{" + labels + "} " + num(sum) + "\n";
  out += name + "_count{" + labels + "} " + std::to_string(count) + "\n";
}

// Bucket bounds as vLLM's (seconds), so dashboards built for it read these the same way.
Metrics::Metrics()
    : ttft_({0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,  0.25,  0.5,   0.75,
             1.0,   2.5,   5.0,  7.5,  10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0}),
      itl_({0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            20.0, 40.0, 80.0}),
      e2e_({0.3,  0.5,  0.8,  1.0,  1.5,   2.0,   2.5,   5.0,   10.0,   15.0,  20.0,
            30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0}) {}

void Metrics::observe_ttft(double s) {
  std::lock_guard lk(mu_);
  ttft_.observe(s);
}

void Metrics::observe_itl(double s) {
  std::lock_guard lk(mu_);
  itl_.observe(s);
}

void Metrics::observe_e2e(double s) {
  std::lock_guard lk(mu_);
  e2e_.observe(s);
}

void Metrics::count_finished(const std::string& reason) {
  std::lock_guard lk(mu_);
  finished_[reason]++;
}

std::string Metrics::render(const SchedulerStats& st, const std::string& model_name) const {
  const std::string L = "model_name=\"" + escape(model_name) + "\"";
  std::string out;
  scalar(out, "kiln:num_requests_running", "gauge", "Sequences in the running batch.", L,
         double(st.running));
  scalar(out, "kiln:num_requests_waiting", "gauge", "Requests waiting to be scheduled.", L,
         double(st.waiting));
  scalar(out, "kiln:kv_cache_usage_perc", "gauge", "KV cache usage (1 means 100 percent).", L,
         st.kv_blocks_total > 0 ? double(st.kv_blocks_used) / double(st.kv_blocks_total) : 0.0);
  scalar(out, "kiln:prefix_cache_queries_total", "counter",
         "Prompt tokens looked up in the prefix cache.", L, double(st.prefix_queries));
  scalar(out, "kiln:prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.",
         L, double(st.prefix_hits));
  scalar(out, "kiln:prompt_tokens_total", "counter", "Prefill tokens processed.", L,
         double(st.prompt_tokens));
  scalar(out, "kiln:generation_tokens_total", "counter", "Generation tokens processed.", L,
         double(st.generation_tokens));
  scalar(out, "kiln:num_preemptions_total", "counter", "Sequences preempted for KV blocks.", L,
         double(st.preemptions));
  std::lock_guard lk(mu_);
  out +=
      "# HELP kiln:request_success_total Completions finished, by finish reason.\n"
      "# TYPE kiln:request_success_total counter\n";
  for (const char* r : {"stop", "length", "abort"}) {
    auto it = finished_.find(r);
    out += "kiln:request_success_total{" + L + ",finished_reason=\"" + r + "\"} " +
           std::to_string(it == finished_.end() ? 0 : it->second) + "\n";
  }
  ttft_.render(out, "kiln:time_to_first_token_seconds", "Time to first token (s).", L);
  itl_.render(out, "kiln:inter_token_latency_seconds", "Time between engine outputs (s).", L);
  e2e_.render(out, "kiln:e2e_request_latency_seconds", "Request latency, submit to finish (s).", L);
  return out;
}

}  // namespace kiln::server
