// Workload, pacing and metrics shared by `kiln bench serve` and `kiln bench offline`.
#include "bench_serving.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <numeric>

#include "core/error.h"

namespace kiln::cli::bench {

namespace {

std::vector<double> parse_percentiles(const std::string& s) {
  std::vector<double> r;
  size_t i = 0;
  while (i <= s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    const std::string tok = s.substr(i, j - i);
    char* end = nullptr;
    const double v = tok.empty() ? -1 : std::strtod(tok.c_str(), &end);
    if (tok.empty() || *end || !(v > 0 && v < 100))
      throw Error(cat("--metric-percentiles: '", tok, "' is not a percentile in (0, 100)"));
    r.push_back(v);
    i = j + 1;
  }
  return r;
}

// "90" for 90.0, "99.9" for 99.9: vLLM's p-word in key names.
std::string p_word(double p) {
  if (p == std::floor(p)) return std::to_string(int64_t(p));
  char s[32];
  std::snprintf(s, sizeof s, "%g", p);
  return s;
}

double mean_or_0(const std::vector<double>& v) {
  return v.empty() ? 0.0 : std::accumulate(v.begin(), v.end(), 0.0) / double(v.size());
}

// Population standard deviation (numpy's np.std, as vLLM reports).
double std_or_0(const std::vector<double>& v) {
  if (v.empty()) return 0.0;
  const double m = mean_or_0(v);
  double s = 0;
  for (double x : v) s += (x - m) * (x - m);
  return std::sqrt(s / double(v.size()));
}

std::vector<int32_t> json_ids(const nlohmann::json& j, const std::string& where) {
  std::vector<int32_t> ids;
  for (const auto& t : j) {
    KILN_CHECK(t.is_number_integer() && t.get<int64_t>() >= 0 && t.get<int64_t>() <= INT32_MAX,
               where, ": 'prompt' ids must be non-negative integers");
    ids.push_back(t.get<int32_t>());
  }
  return ids;
}

std::vector<BenchRequest> load_dataset(const std::string& path) {
  std::ifstream f(path);
  KILN_CHECK(f.good(), "--dataset: cannot open ", path);
  std::vector<BenchRequest> reqs;
  std::string line;
  for (int64_t lineno = 1; std::getline(f, line); ++lineno) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = cat(path, ":", lineno);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      throw Error(cat(where, ": not a JSON object (", e.what(), ")"));
    }
    KILN_CHECK(j.is_object(), where, ": expected a JSON object with 'prompt' and 'output_len'");
    BenchRequest r;
    KILN_CHECK(j.contains("prompt"), where, ": missing 'prompt'");
    const auto& p = j["prompt"];
    if (p.is_string()) {
      r.text = p.get<std::string>();
      KILN_CHECK(!r.text->empty(), where, ": 'prompt' is empty");
    } else {
      KILN_CHECK(p.is_array() && !p.empty(), where,
                 ": 'prompt' must be a string or a non-empty list of token ids");
      r.ids = json_ids(p, where);
      r.prompt_len = int64_t(r.ids.size());
    }
    KILN_CHECK(j.contains("output_len") && j["output_len"].is_number_integer() &&
                   j["output_len"].get<int64_t>() >= 1,
               where, ": 'output_len' must be an integer >= 1");
    r.output_len = j["output_len"].get<int64_t>();
    if (j.contains("prompt_len")) {
      KILN_CHECK(j["prompt_len"].is_number_integer() && j["prompt_len"].get<int64_t>() >= 1, where,
                 ": 'prompt_len' must be an integer >= 1");
      const int64_t pl = j["prompt_len"].get<int64_t>();
      KILN_CHECK(r.text || pl == r.prompt_len, where, ": 'prompt_len' is ", pl,
                 " but 'prompt' has ", r.prompt_len, " ids");
      r.prompt_len = pl;
    }
    reqs.push_back(std::move(r));
  }
  KILN_CHECK(!reqs.empty(), "--dataset: ", path, " holds no requests");
  return reqs;
}

}  // namespace

void add_workload_args(CLI::App* c, WorkloadArgs& w) {
  c->add_option("--dataset", w.dataset,
                "JSONL, one object a line: prompt (text or token ids), output_len[, prompt_len]");
  c->add_option("--random-input-len", w.random_input_len, "random prompts: token ids per prompt");
  c->add_option("--random-output-len", w.random_output_len, "random prompts: tokens to generate");
  c->add_option("--random-range-ratio", w.random_range_ratio,
                "random prompts: lengths drawn from [len*(1-r), len*(1+r)] (0: exact)");
  c->add_option("--num-prompts", w.num_prompts,
                "requests (default: 1000 random prompts, or every --dataset line)");
  c->add_option("--seed", w.seed, "seed of the random prompts and of the arrival times");
  c->add_option("--max-concurrency", w.max_concurrency, "requests in flight at most (0: no limit)");
  c->add_option("--request-rate", w.request_rate,
                "requests per second, Poisson arrivals (inf: all at once)");
  c->add_flag("--ignore-eos,!--no-ignore-eos", w.ignore_eos,
              "generate exactly output_len tokens (default on)");
  c->add_option("--metric-percentiles", w.percentiles, "percentiles to report, e.g. 90,99");
  c->add_flag("--save-detailed", w.save_detailed,
              "JSON: also per-request input_lens, output_lens, ttfts, itls, errors");
  c->add_option("-o,--output", w.format, "text (vLLM's table) or json");
}

double validate_workload_args(const WorkloadArgs& w) {
  KILN_CHECK(w.format == "text" || w.format == "json", "-o: expected text or json (got '", w.format,
             "')");
  const bool random = w.random_input_len > 0 || w.random_output_len > 0;
  KILN_CHECK(random != !w.dataset.empty(),
             "give either --dataset FILE or --random-input-len N --random-output-len M");
  if (random)
    KILN_CHECK(w.random_input_len >= 1 && w.random_output_len >= 1,
               "--random-input-len and --random-output-len must both be >= 1");
  KILN_CHECK(w.random_range_ratio >= 0 && w.random_range_ratio < 1,
             "--random-range-ratio must be in [0, 1) (got ", w.random_range_ratio, ")");
  KILN_CHECK(w.num_prompts >= 0, "--num-prompts must be >= 1");
  KILN_CHECK(w.max_concurrency >= 0, "--max-concurrency must be >= 0 (0: no limit)");
  parse_percentiles(w.percentiles);
  if (w.request_rate == "inf") return std::numeric_limits<double>::infinity();
  char* end = nullptr;
  const double r = std::strtod(w.request_rate.c_str(), &end);
  KILN_CHECK(!w.request_rate.empty() && !*end && r > 0 && std::isfinite(r),
             "--request-rate: expected a positive number or inf (got '", w.request_rate, "')");
  return r;
}

std::vector<BenchRequest> make_workload(const WorkloadArgs& w, int64_t vocab_size) {
  if (!w.dataset.empty()) {
    std::vector<BenchRequest> reqs = load_dataset(w.dataset);
    if (w.num_prompts > 0) {
      KILN_CHECK(w.num_prompts <= int64_t(reqs.size()), "--num-prompts ", w.num_prompts, " but ",
                 w.dataset, " holds only ", reqs.size(), " requests");
      reqs.resize(size_t(w.num_prompts));
    }
    return reqs;
  }
  KILN_CHECK(vocab_size >= 1, "random prompts need the vocabulary size");
  const int64_t n = w.num_prompts > 0 ? w.num_prompts : 1000;
  std::mt19937_64 rng(w.seed);
  // vLLM's RandomDataset bounds: [int(len * (1 - r)), int(len * (1 + r))], at least 1.
  auto len_dist = [&](int64_t len) {
    const auto lo = std::max<int64_t>(1, int64_t(double(len) * (1 - w.random_range_ratio)));
    const auto hi = std::max<int64_t>(lo, int64_t(double(len) * (1 + w.random_range_ratio)));
    return std::uniform_int_distribution<int64_t>(lo, hi);
  };
  auto in_len = len_dist(w.random_input_len), out_len = len_dist(w.random_output_len);
  std::uniform_int_distribution<int32_t> tok(0, int32_t(vocab_size - 1));
  std::vector<BenchRequest> reqs(static_cast<size_t>(n));
  for (auto& r : reqs) {
    r.prompt_len = in_len(rng);
    r.output_len = out_len(rng);
    r.ids.resize(size_t(r.prompt_len));
    for (auto& t : r.ids) t = tok(rng);
  }
  return reqs;
}

std::vector<double> arrival_times(int64_t n, double rate, uint64_t seed) {
  std::vector<double> t(size_t(n), 0.0);
  if (!std::isfinite(rate)) return t;
  // A stream of its own, so the prompts do not change with the rate.
  std::mt19937_64 rng(seed ^ 0x9e3779b97f4a7c15ull);
  std::exponential_distribution<double> gap(rate);
  double now = 0;
  for (auto& x : t) {
    x = now;
    now += gap(rng);
  }
  return t;
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const double pos = p / 100.0 * double(v.size() - 1);
  const size_t lo = size_t(std::floor(pos)), hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - double(lo));
}

nlohmann::json compute_metrics(const std::vector<BenchRequest>& reqs,
                               const std::vector<RequestResult>& results, double duration_s,
                               const WorkloadArgs& w, double rate, const std::string& backend,
                               const std::string& model_id) {
  int64_t completed = 0, total_input = 0, total_output = 0;
  std::vector<double> ttfts, tpots, itls, e2els;
  nlohmann::json input_lens = nlohmann::json::array(), output_lens = nlohmann::json::array(),
                 ttft_list = nlohmann::json::array(), itl_list = nlohmann::json::array(),
                 errors = nlohmann::json::array();
  for (const RequestResult& r : results) {
    const int64_t out = r.success ? r.output_tokens : 0;
    input_lens.push_back(r.prompt_len);
    output_lens.push_back(out);
    ttft_list.push_back(r.success ? r.ttft : 0.0);
    itl_list.push_back(r.itl);
    errors.push_back(r.error);
    if (!r.success) continue;
    ++completed;
    total_input += r.prompt_len;
    total_output += out;
    // vLLM: TPOT = (e2el - ttft) / (output tokens - 1), over requests with more than one token.
    if (out > 1) tpots.push_back((r.latency - r.ttft) / double(out - 1));
    itls.insert(itls.end(), r.itl.begin(), r.itl.end());
    ttfts.push_back(r.ttft);
    e2els.push_back(r.latency);
  }
  const double dur = std::max(duration_s, 1e-9);
  nlohmann::json m;
  m["backend"] = backend;
  m["model_id"] = model_id;
  m["num_prompts"] = int64_t(reqs.size());
  m["request_rate"] = std::isfinite(rate) ? nlohmann::json(rate) : nlohmann::json("inf");
  m["max_concurrency"] = w.max_concurrency > 0 ? nlohmann::json(w.max_concurrency) : nullptr;
  m["duration"] = duration_s;
  m["completed"] = completed;
  m["failed"] = int64_t(results.size()) - completed;
  m["total_input_tokens"] = total_input;
  m["total_output_tokens"] = total_output;
  m["request_throughput"] = double(completed) / dur;
  m["output_throughput"] = double(total_output) / dur;
  m["total_token_throughput"] = double(total_input + total_output) / dur;
  const std::vector<double> ps = parse_percentiles(w.percentiles);
  auto add = [&](const char* name, const std::vector<double>& v) {
    const std::string n = name;
    m["mean_" + n + "_ms"] = mean_or_0(v) * 1000;
    m["median_" + n + "_ms"] = percentile(v, 50) * 1000;
    m["std_" + n + "_ms"] = std_or_0(v) * 1000;
    for (double p : ps) m["p" + p_word(p) + "_" + n + "_ms"] = percentile(v, p) * 1000;
  };
  add("ttft", ttfts);
  add("tpot", tpots);
  add("itl", itls);
  add("e2el", e2els);
  if (w.save_detailed) {
    m["input_lens"] = input_lens;
    m["output_lens"] = output_lens;
    m["ttfts"] = ttft_list;
    m["itls"] = itl_list;
    m["errors"] = errors;
  }
  return m;
}

void print_metrics(const nlohmann::json& m, const WorkloadArgs& w) {
  if (w.format == "json") {
    std::printf("%s\n", m.dump(2).c_str());
    return;
  }
  // vLLM's layout: "{:<40} {:<10}" rows under centred 50-column headers.
  auto header = [](const std::string& s, char fill) {
    const size_t n = 50, left = (n - std::min(n, s.size())) / 2;
    std::printf("%s%s%s\n", std::string(left, fill).c_str(), s.c_str(),
                std::string(n - std::min(n, s.size()) - left, fill).c_str());
  };
  auto row_i = [](const std::string& k, int64_t v) {
    std::printf("%-40s %-10lld\n", k.c_str(), (long long)v);
  };
  auto row_f = [](const std::string& k, double v) { std::printf("%-40s %-10.2f\n", k.c_str(), v); };
  header(" Serving Benchmark Result ", '=');
  row_i("Successful requests:", m["completed"].get<int64_t>());
  if (m["failed"].get<int64_t>() > 0) row_i("Failed requests:", m["failed"].get<int64_t>());
  if (!m["max_concurrency"].is_null())
    row_i("Maximum request concurrency:", m["max_concurrency"].get<int64_t>());
  if (m["request_rate"].is_number())
    row_f("Request rate configured (RPS):", m["request_rate"].get<double>());
  row_f("Benchmark duration (s):", m["duration"].get<double>());
  row_i("Total input tokens:", m["total_input_tokens"].get<int64_t>());
  row_i("Total generated tokens:", m["total_output_tokens"].get<int64_t>());
  row_f("Request throughput (req/s):", m["request_throughput"].get<double>());
  row_f("Output token throughput (tok/s):", m["output_throughput"].get<double>());
  row_f("Total Token throughput (tok/s):", m["total_token_throughput"].get<double>());
  const std::vector<double> ps = parse_percentiles(w.percentiles);
  auto metric = [&](const std::string& key, const std::string& name, const std::string& title) {
    header(title, '-');
    row_f("Mean " + name + " (ms):", m["mean_" + key + "_ms"].get<double>());
    row_f("Median " + name + " (ms):", m["median_" + key + "_ms"].get<double>());
    for (double p : ps)
      row_f("P" + p_word(p) + " " + name + " (ms):",
            m["p" + p_word(p) + "_" + key + "_ms"].get<double>());
  };
  metric("ttft", "TTFT", "Time to First Token");
  metric("tpot", "TPOT", "Time per Output Token (excl. 1st token)");
  metric("itl", "ITL", "Inter-token Latency");
  metric("e2el", "E2EL", "End-to-end Latency");
  std::printf("%s\n", std::string(50, '=').c_str());
  std::fflush(stdout);
}

bool report_failures(const std::vector<RequestResult>& results) {
  int64_t failed = 0;
  const RequestResult* first = nullptr;
  for (const auto& r : results)
    if (!r.success) {
      ++failed;
      if (!first) first = &r;
    }
  if (failed == 0) return false;
  std::fprintf(stderr, "kiln: bench: %lld of %zu requests failed; the first: %s\n",
               (long long)failed, results.size(), first->error.c_str());
  return failed == int64_t(results.size());
}

}  // namespace kiln::cli::bench
