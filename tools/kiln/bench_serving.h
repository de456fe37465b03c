// Shared parts of `kiln bench serve` (HTTP load generator) and `kiln bench offline` (the same
// workload through kiln::Scheduler in-process): the workload, request pacing and the metrics,
// named and defined as vLLM's benchmark_serving so results can be compared side by side.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace kiln::cli::bench {

// One request of the workload: token ids, or text the server (or the engine's tokenizer) turns
// into ids.
struct BenchRequest {
  std::vector<int32_t> ids;         // used when text is unset
  std::optional<std::string> text;  // a string prompt from a dataset
  int64_t prompt_len = -1;          // -1: not known until the server's usage / the tokenizer
  int64_t output_len = 0;
};

// What one request measured (seconds, from when it was sent / submitted).
struct RequestResult {
  bool success = false;
  int64_t prompt_len = 0;
  int64_t output_tokens = 0;
  double ttft = 0;          // to the first chunk / event carrying tokens
  double latency = 0;       // to the last chunk / event carrying tokens (vLLM's e2el)
  std::vector<double> itl;  // gaps between consecutive chunks / events carrying tokens
  std::string error;
};

struct WorkloadArgs {
  std::string dataset;
  int64_t random_input_len = 0, random_output_len = 0;
  double random_range_ratio = 0.0;
  int64_t num_prompts = 0;  // 0: 1000 random prompts, or every line of --dataset
  uint64_t seed = 0;
  int64_t max_concurrency = 0;  // 0: no limit
  std::string request_rate = "inf";
  bool ignore_eos = true;
  std::string format = "text";
  std::string percentiles = "90,99";
  bool save_detailed = false;
};

void add_workload_args(CLI::App* c, WorkloadArgs& w);
// Checks the options (one-line kiln::Error on bad input) and returns requests/second (inf: all at
// once).
double validate_workload_args(const WorkloadArgs& w);
// The requests: --dataset's lines, or random token-id prompts of vocab_size ids (seeded).
std::vector<BenchRequest> make_workload(const WorkloadArgs& w, int64_t vocab_size);

// Arrival times (seconds from the start) of n requests at `rate` per second: Poisson (exponential
// gaps from `seed`), all 0 when rate is infinite.
std::vector<double> arrival_times(int64_t n, double rate, uint64_t seed);

// vLLM's result dictionary (same keys) plus what this run was; per-request arrays only when
// w.save_detailed.
nlohmann::json compute_metrics(const std::vector<BenchRequest>& reqs,
                               const std::vector<RequestResult>& results, double duration_s,
                               const WorkloadArgs& w, double rate, const std::string& backend,
                               const std::string& model_id);
// Prints `m` as vLLM's table (w.format == "text") or as JSON, to stdout.
void print_metrics(const nlohmann::json& m, const WorkloadArgs& w);
// One stderr line about failed requests (the first error in full); true when none succeeded.
bool report_failures(const std::vector<RequestResult>& results);

// Percentile with linear interpolation (numpy's default); 0 for an empty list.
double percentile(std::vector<double> v, double p);

}  // namespace kiln::cli::bench
