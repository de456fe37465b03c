// kiln bench serve (load generator for an OpenAI-compatible /v1/completions server) and kiln bench
// offline (the same workload in-process through kiln::Scheduler). Metrics as vLLM's
// benchmark_serving: bench_serving.h.
#include <httplib.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <mutex>
#include <nlohmann/json.hpp>
#include <regex>
#include <thread>

#include "bench_serving.h"
#include "commands.h"
#include "core/error.h"
#include "kiln/serving.h"
#include "tokenizer/tokenizer.h"

namespace kiln::cli {

namespace {

using Clock = std::chrono::steady_clock;
using bench::BenchRequest;
using bench::RequestResult;

double since(Clock::time_point t0, Clock::time_point t) {
  return std::chrono::duration<double>(t - t0).count();
}

// ---------------------------------------------------------------------------------------------
// serve

struct Url {
  std::string origin;  // scheme://host[:port], what httplib::Client takes
  std::string path;    // the completions endpoint
};

Url parse_url(const std::string& s) {
  static const std::regex re(R"(^(https?://[^/?#]+)(/[^?#]*)?$)");
  std::smatch m;
  KILN_CHECK(std::regex_match(s, m, re), "--url: expected http[s]://host[:port][/path] (got '", s,
             "')");
  Url u{m[1].str(), m[2].str()};
  // A bare server address means its completions endpoint.
  if (u.path.empty() || u.path == "/") u.path = "/v1/completions";
  return u;
}

struct ServeArgs {
  std::string url = "http://127.0.0.1:8000";
  std::string model;
  int64_t vocab_size = 0;
  double timeout_s = 300;
  bench::WorkloadArgs w;
};

std::unique_ptr<httplib::Client> make_client(const Url& u, double timeout_s) {
  auto c = std::make_unique<httplib::Client>(u.origin);
  const auto t = std::chrono::duration<double>(timeout_s);
  c->set_connection_timeout(std::chrono::duration_cast<std::chrono::microseconds>(
      std::min(t, std::chrono::duration<double>(10.0))));
  // Bounds every wait for the next bytes (a prefill under load can take a while), not the
  // request's whole duration.
  c->set_read_timeout(std::chrono::duration_cast<std::chrono::microseconds>(t));
  c->set_write_timeout(std::chrono::duration_cast<std::chrono::microseconds>(t));
  c->set_keep_alive(true);
  // Headers and body go out as separate writes: with Nagle's algorithm the body would wait for
  // the server's delayed ACK (40 ms on Linux), and every TTFT would carry it.
  c->set_tcp_nodelay(true);
  return c;
}

// GET a JSON document from the server; nullopt when it is not there.
std::optional<nlohmann::json> get_json(const Url& u, const std::string& path, double timeout_s) {
  auto c = make_client(u, std::min(timeout_s, 30.0));
  auto res = c->Get(path);
  if (!res || res->status != 200) return std::nullopt;
  try {
    return nlohmann::json::parse(res->body);
  } catch (const nlohmann::json::exception&) {
    return std::nullopt;
  }
}

// Streams one request and measures it the way vLLM's async_request_openai_completions does: TTFT
// at the first `data:` chunk with choices, ITL between such chunks, latency at the last one.
RequestResult send_one(httplib::Client& cli, const Url& u, const std::string& model,
                       const BenchRequest& r, bool ignore_eos) {
  nlohmann::json body = {{"max_tokens", r.output_len},
                         {"temperature", 0.0},
                         {"stream", true},
                         {"stream_options", {{"include_usage", true}}},
                         {"ignore_eos", ignore_eos}};
  if (r.text)
    body["prompt"] = *r.text;
  else
    body["prompt"] = r.ids;
  if (!model.empty()) body["model"] = model;

  RequestResult out;
  out.prompt_len = std::max<int64_t>(r.prompt_len, 0);
  int status = 0;
  std::string buf, error_body;
  bool first = false;
  int64_t chunks = 0;
  std::optional<int64_t> usage_completion, usage_prompt;
  Clock::time_point st, last;  // st: when the request is sent

  auto on_line = [&](std::string_view line, Clock::time_point now) -> bool {
    if (line.rfind("data:", 0) != 0) return true;  // SSE comments, event names, ids
    std::string_view data = line.substr(5);
    while (!data.empty() && data.front() == ' ') data.remove_prefix(1);
    if (data == "[DONE]") return true;  // vLLM does not require it either
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(data);
    } catch (const nlohmann::json::exception&) {
      out.error = cat("a chunk is not JSON: ", std::string(data.substr(0, 200)));
      return false;
    }
    if (j.contains("error")) {
      out.error = cat("server error in stream: ", j["error"].dump());
      return false;
    }
    if (j.contains("choices") && j["choices"].is_array() && !j["choices"].empty()) {
      if (!first) {
        first = true;
        out.ttft = since(st, now);
      } else {
        out.itl.push_back(since(last, now));
      }
      last = now;
      ++chunks;
    }
    if (j.contains("usage") && j["usage"].is_object()) {
      const auto& us = j["usage"];
      if (us.contains("completion_tokens") && us["completion_tokens"].is_number_integer())
        usage_completion = us["completion_tokens"].get<int64_t>();
      if (us.contains("prompt_tokens") && us["prompt_tokens"].is_number_integer())
        usage_prompt = us["prompt_tokens"].get<int64_t>();
    }
    return true;
  };

  httplib::Request req;
  req.method = "POST";
  req.path = u.path;
  req.body = body.dump();
  req.set_header("Content-Type", "application/json");
  req.set_header("Accept", "text/event-stream");
  req.response_handler = [&](const httplib::Response& res) {
    status = res.status;
    return true;
  };
  req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
    const auto now = Clock::now();
    if (status != 200) {
      if (error_body.size() < 1000) error_body.append(data, std::min<size_t>(n, 1000));
      return true;
    }
    buf.append(data, n);
    size_t pos;
    while ((pos = buf.find('\n')) != std::string::npos) {
      std::string_view line(buf.data(), pos);
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
      const bool ok = line.empty() || on_line(line, now);
      buf.erase(0, pos + 1);
      if (!ok) return false;
    }
    return true;
  };

  st = Clock::now();
  auto res = cli.send(req);
  if (!out.error.empty()) return out;
  if (!res) {
    // httplib names the failed stage: Connection (nothing answers), Read (timed out), ...
    out.error = cat("HTTP client: ", httplib::to_string(res.error()), " error");
    return out;
  }
  if (status != 200) {
    while (!error_body.empty() && (error_body.back() == '\n' || error_body.back() == '\r'))
      error_body.pop_back();
    out.error = cat("HTTP ", status, ": ", error_body);
    return out;
  }
  if (!first) {
    out.error = "the stream carried no chunk with choices (no first token)";
    return out;
  }
  out.latency = since(st, last);
  out.output_tokens = usage_completion ? *usage_completion : chunks;
  if (r.prompt_len < 0 && usage_prompt) out.prompt_len = *usage_prompt;
  out.success = true;
  return out;
}

void run_serve(const ServeArgs& a) {
  const double rate = bench::validate_workload_args(a.w);
  KILN_CHECK(a.timeout_s > 0, "--timeout must be > 0");
  const Url u = parse_url(a.url);

  // The server must answer before anything else: a wrong URL is one clear line, not K failures.
  int64_t vocab = a.vocab_size;
  if (a.w.dataset.empty() && vocab <= 0) {
    auto info = get_json(u, "/tokenizer_info", a.timeout_s);
    KILN_CHECK(info && info->contains("vocab_size") && (*info)["vocab_size"].is_number_integer(),
               "random prompts need the vocabulary size: GET ", u.origin,
               "/tokenizer_info gave no vocab_size; pass --vocab-size N");
    vocab = (*info)["vocab_size"].get<int64_t>();
  }
  std::string model = a.model;
  if (model.empty()) {
    // vLLM needs --model; kiln serves one model, so its name can come from /v1/models.
    if (auto models = get_json(u, "/v1/models", a.timeout_s);
        models && models->contains("data") && (*models)["data"].is_array() &&
        !(*models)["data"].empty() && (*models)["data"][0].contains("id"))
      model = (*models)["data"][0]["id"].get<std::string>();
  }
  const std::vector<BenchRequest> reqs = bench::make_workload(a.w, vocab);

  // One warm-up request (the first prompt, as vLLM's initial test run), not counted: checks the
  // endpoint and the model name end to end before the clock starts.
  {
    auto c = make_client(u, a.timeout_s);
    BenchRequest warm = reqs[0];
    warm.output_len = std::min<int64_t>(warm.output_len, 8);
    RequestResult r = send_one(*c, u, model, warm, a.w.ignore_eos);
    KILN_CHECK(r.success, "the warm-up request to ", u.origin, u.path, " failed: ", r.error);
  }

  const size_t n = reqs.size();
  const std::vector<double> arrive = bench::arrival_times(int64_t(n), rate, a.w.seed);
  const size_t slots = a.w.max_concurrency > 0 ? std::min(n, size_t(a.w.max_concurrency)) : n;
  std::fprintf(stderr, "kiln: bench serve: %zu requests to %s%s, concurrency %zu, rate %s\n", n,
               u.origin.c_str(), u.path.c_str(), slots, a.w.request_rate.c_str());

  std::vector<RequestResult> results(n);
  std::mutex mu;
  std::condition_variable cv;
  std::deque<size_t> ready;  // arrived requests waiting for a free slot
  bool all_arrived = false;
  const auto t0 = Clock::now();
  // A thread per slot: each takes the next arrived request, so arrivals keep their Poisson times
  // and wait for a slot as vLLM's semaphore makes them.
  std::vector<std::thread> workers;
  for (size_t s = 0; s < slots; ++s) {
    workers.emplace_back([&] {
      auto c = make_client(u, a.timeout_s);
      for (;;) {
        size_t i;
        {
          std::unique_lock lk(mu);
          cv.wait(lk, [&] { return !ready.empty() || all_arrived; });
          if (ready.empty()) return;
          i = ready.front();
          ready.pop_front();
        }
        results[i] = send_one(*c, u, model, reqs[i], a.w.ignore_eos);
      }
    });
  }
  for (size_t i = 0; i < n; ++i) {
    std::this_thread::sleep_until(
        t0 + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(arrive[i])));
    std::lock_guard lk(mu);
    ready.push_back(i);
    cv.notify_one();
  }
  {
    std::lock_guard lk(mu);
    all_arrived = true;
  }
  cv.notify_all();
  for (auto& t : workers) t.join();
  const double duration = since(t0, Clock::now());

  const bool none = bench::report_failures(results);
  bench::print_metrics(
      bench::compute_metrics(reqs, results, duration, a.w, rate, "kiln-serve", model), a.w);
  KILN_CHECK(!none, "bench serve: every request failed");
}

// ---------------------------------------------------------------------------------------------
// offline

struct OfflineArgs {
  std::string model;
  BuildConfig bc;
  ServeConfig sc;
  bool no_prefix_cache = false;
  std::string step_log;  // CSV of every engine step
  bool dummy = false;    // --dummy-weights: model is a config.json
  bench::WorkloadArgs w;
};

// Per-request timing filled on the engine thread by the scheduler's callback.
struct Tracker {
  Clock::time_point submitted, last;
  bool first = false, done = false;
  RequestResult r;
};

// Where the run's time went, on stderr: decode-only steps (count, mean batch, mean time),
// steps with prompt chunks, and the time between steps (host work while the GPU idles). With
// `path`, every step as CSV.
void report_steps(const std::vector<StepInfo>& steps, double duration, const std::string& path) {
  double t_dec = 0, t_mix = 0;
  int64_t n_dec = 0, rows_dec = 0;
  for (const StepInfo& s : steps) {
    if (s.prefill_seqs == 0) {
      ++n_dec, rows_dec += s.decodes, t_dec += s.seconds;
    } else {
      t_mix += s.seconds;
    }
  }
  const int64_t n_mix = int64_t(steps.size()) - n_dec;
  std::fprintf(stderr,
               "kiln: steps: %lld decode-only (mean %.1f sequences, %.2f ms each, %.2f s), %lld "
               "with prompt chunks (%.2f ms each, %.2f s); %.2f s outside steps\n",
               (long long)n_dec, n_dec ? double(rows_dec) / double(n_dec) : 0.0,
               n_dec ? t_dec / double(n_dec) * 1e3 : 0.0, t_dec, (long long)n_mix,
               n_mix ? t_mix / double(n_mix) * 1e3 : 0.0, t_mix, duration - t_dec - t_mix);
  if (path.empty()) return;
  std::FILE* f = std::fopen(path.c_str(), "w");
  KILN_CHECK(f, path, ": cannot open for writing");
  std::fprintf(f, "step,decodes,prefill_seqs,prefill_tokens,ms\n");
  for (size_t i = 0; i < steps.size(); ++i)
    std::fprintf(f, "%zu,%lld,%lld,%lld,%.3f\n", i, (long long)steps[i].decodes,
                 (long long)steps[i].prefill_seqs, (long long)steps[i].prefill_tokens,
                 steps[i].seconds * 1e3);
  KILN_CHECK(std::fclose(f) == 0, path, ": write failed");
}

void run_offline(OfflineArgs& a) {
  const double rate = bench::validate_workload_args(a.w);
  KILN_CHECK(!a.model.empty(),
             "bench offline needs a model (engine, Hugging Face folder or GGUF file)");
  Engine e = open_bench_engine(a.model, a.bc, a.dummy);
  const ModelInfo info = e.info();
  std::vector<BenchRequest> reqs = bench::make_workload(a.w, info.vocab_size);
  const bool has_tokenizer = !e.tokenizer_dir().empty();
  bool any_text = false;
  for (const auto& r : reqs) any_text |= r.text.has_value();
  if (any_text) {
    KILN_CHECK(has_tokenizer, "--dataset has text prompts but the engine has no tokenizer files");
    // As the server does: the model's tokenizer with its special tokens (BOS).
    const Tokenizer tok = Tokenizer::from_dir(e.tokenizer_dir());
    for (auto& r : reqs)
      if (r.text) {
        r.ids = tok.encode(*r.text, true);
        r.prompt_len = int64_t(r.ids.size());
        r.text.reset();
      }
  }
  for (size_t i = 0; i < reqs.size(); ++i) {
    for (int32_t t : reqs[i].ids)
      KILN_CHECK(t < info.vocab_size, "request ", i, ": token id ", t,
                 " is outside the vocabulary (size ", info.vocab_size, ")");
    KILN_CHECK(reqs[i].prompt_len + reqs[i].output_len <= info.max_seq_len, "request ", i,
               ": prompt ", reqs[i].prompt_len, " + output ", reqs[i].output_len,
               " tokens exceed the engine's max_seq_len ", info.max_seq_len);
  }

  ServeConfig sc = a.sc;
  sc.prefix_cache = !a.no_prefix_cache;
  // Every request may be queued at once (rate inf, no concurrency limit).
  sc.max_queue = std::max<int64_t>(sc.max_queue, int64_t(reqs.size()) + 1);
  start_engine(e, sc.engine_runtime());
  // Steps of the timed run (appended on the engine thread; read after the scheduler is idle).
  std::vector<StepInfo> steps;
  std::mutex step_mu;
  bool timing = false;
  sc.on_step = [&](const StepInfo& si) {
    std::lock_guard lk(step_mu);
    if (timing) steps.push_back(si);
  };
  // Declared before the scheduler: its destructor aborts what is left (after an error), and those
  // callbacks still touch these.
  std::mutex mu;
  std::condition_variable cv;
  int64_t in_flight = 0;
  const size_t n = reqs.size();
  std::vector<Tracker> tr(n);
  Tracker warm;
  Scheduler sched(e, sc);

  GenerationParams base;
  base.temperature = 0.0f;
  base.ignore_eos = a.w.ignore_eos;
  // Text costs what a server pays for it; engines without tokenizer files (dummy weights) skip it.
  base.detokenize = has_tokenizer;

  auto submit = [&](Tracker& t, const BenchRequest& r) {
    GenerationParams gp = base;
    gp.max_tokens = r.output_len;
    t.r.prompt_len = r.prompt_len;
    t.submitted = Clock::now();
    sched.submit(r.ids, gp, [&t, &mu, &cv, &in_flight](const RequestOutput& o) {
      const auto now = Clock::now();
      if (!o.token_ids.empty()) {
        if (!t.first) {
          t.first = true;
          t.r.ttft = since(t.submitted, now);
        } else {
          t.r.itl.push_back(since(t.last, now));
        }
        t.last = now;
        t.r.output_tokens += int64_t(o.token_ids.size());
      }
      if (o.finish == FinishReason::None) return;
      {
        std::lock_guard lk(mu);
        t.done = true;
        t.r.success = t.first && o.finish != FinishReason::Abort;
        if (t.r.success)
          t.r.latency = since(t.submitted, t.last);
        else
          t.r.error = t.first
                          ? "aborted"
                          : cat("finished (", finish_reason_name(o.finish), ") without a token");
        --in_flight;
      }
      cv.notify_all();
    });
  };

  // Warm-up (the first prompt, up to 8 tokens; not counted): first-use costs such as CUDA graph
  // capture stay out of the timings, as vLLM's serving benchmark does with its test request.
  {
    BenchRequest r = reqs[0];
    r.output_len = std::min<int64_t>(r.output_len, 8);
    {
      std::lock_guard lk(mu);
      ++in_flight;
    }
    submit(warm, r);
    std::unique_lock lk(mu);
    cv.wait(lk, [&] { return warm.done; });
    KILN_CHECK(warm.r.success, "the warm-up request failed: ", warm.r.error);
  }

  const std::vector<double> arrive = bench::arrival_times(int64_t(n), rate, a.w.seed);
  std::fprintf(stderr, "kiln: bench offline: %zu requests on %s, concurrency %s, rate %s\n", n,
               e.device_name().c_str(),
               a.w.max_concurrency > 0 ? std::to_string(a.w.max_concurrency).c_str() : "unlimited",
               a.w.request_rate.c_str());
  {
    std::lock_guard lk(step_mu);
    timing = true;
  }
  const auto t0 = Clock::now();
  for (size_t i = 0; i < n; ++i) {
    std::this_thread::sleep_until(
        t0 + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(arrive[i])));
    {
      std::unique_lock lk(mu);
      if (a.w.max_concurrency > 0) cv.wait(lk, [&] { return in_flight < a.w.max_concurrency; });
      ++in_flight;
    }
    try {
      submit(tr[i], reqs[i]);
    } catch (const Error& ex) {
      throw Error(cat("request ", i, ": ", ex.what()));
    }
  }
  {
    std::unique_lock lk(mu);
    cv.wait(lk, [&] { return in_flight == 0; });
  }
  const double duration = since(t0, Clock::now());
  {
    std::lock_guard lk(step_mu);  // the engine thread may still report the last step
    timing = false;
    report_steps(steps, duration, a.step_log);
  }

  std::vector<RequestResult> results;
  results.reserve(n);
  for (auto& t : tr) results.push_back(std::move(t.r));
  const bool none = bench::report_failures(results);
  bench::print_metrics(
      bench::compute_metrics(reqs, results, duration, a.w, rate, "kiln-offline", a.model), a.w);
  KILN_CHECK(!none, "bench offline: every request failed");
}

}  // namespace

void register_bench_subcommands(CLI::App* bench) {
  {
    auto* c = bench->add_subcommand(
        "serve", "Load-test an OpenAI-compatible server (/v1/completions, streamed; vLLM metrics)");
    static ServeArgs a;
    c->add_option("--url", a.url,
                  "server address, or its completions endpoint (default path /v1/completions)");
    c->add_option("--model", a.model, "model name to send (default: the first of /v1/models)");
    c->add_option("--vocab-size", a.vocab_size,
                  "random prompts: token ids drawn from [0, N) (default: GET /tokenizer_info)");
    c->add_option("--timeout", a.timeout_s, "seconds to wait for the server's next bytes");
    bench::add_workload_args(c, a.w);
    c->callback([&] { run_serve(a); });
  }
  {
    auto* c = bench->add_subcommand(
        "offline", "The serving workload in-process through the scheduler (vLLM metrics)");
    static OfflineArgs a;
    c->add_option("model", a.model, "kiln engine folder, Hugging Face model folder or GGUF file")
        ->required();
    c->add_option("--dtype", a.bc.dtype,
                  "weight dtype when building from an HF folder: auto, f32, f16, bf16");
    c->add_option("--max-seq-len", a.bc.max_seq_len,
                  "when building from an HF folder (0: max_position_embeddings)");
    c->add_option("--quant", a.bc.quant,
                  "when building from an HF folder: none, int8-wo, int4-wo, int4-awq, fp8");
    c->add_flag("--quant-lm-head", a.bc.quant_lm_head,
                "with --quant: the LM head too (TensorRT-LLM's --quantize_lm_head)");
    c->add_option("--kv-cache-dtype", a.bc.kv_cache_dtype,
                  "when building from an HF folder: auto or fp8 (E4M3 KV cache)");
    c->add_option("--calib", a.bc.calib, "--quant int4-awq: text file to calibrate on");
    add_arch_spec_arg(c, a.bc);
    c->add_flag("--dummy-weights", a.dummy,
                "model is a config.json (or a folder with one): seeded random weights of its "
                "shape, built in memory");
    add_runtime_args(c, a.sc.runtime);
    c->add_option("--max-num-seqs", a.sc.max_num_seqs,
                  "sequences per step (0: 256 on a GPU, 16 on the CPU)");
    c->add_option("--max-num-tokens", a.sc.max_num_tokens,
                  "tokens per step, the chunked-prefill budget (0: 8192 / 2048)");
    c->add_flag("--no-prefix-cache", a.no_prefix_cache, "do not share prompt blocks");
    c->add_option("--step-log", a.step_log, "write every engine step of the run as CSV");
    bench::add_workload_args(c, a.w);
    c->callback([&] { run_offline(a); });
  }
}

}  // namespace kiln::cli
