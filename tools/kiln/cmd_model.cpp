// kiln build / run / logits / bench.
#include <omp.h>

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>

#include "commands.h"
#include "core/error.h"
#include "core/tensor.h"
#include "io/safetensors.h"
#include "kiln/kiln.h"

namespace kiln::cli {

void add_model_args(CLI::App* c, ModelArgs& a) {
  c->add_option("model", a.model, "kiln engine folder, Hugging Face model folder or GGUF file")
      ->required();
  c->add_option("--dtype", a.bc.dtype,
                "weight dtype when building from an HF folder or GGUF file: auto, f32, f16, bf16");
  c->add_option("--max-seq-len", a.bc.max_seq_len, "when building (0: max_position_embeddings)");
  c->add_option("--quant", a.bc.quant, "when building: none, int8-wo, int4-wo, int4-awq, fp8");
  c->add_flag("--quant-lm-head", a.bc.quant_lm_head,
              "with --quant: the LM head too (TensorRT-LLM's --quantize_lm_head)");
  c->add_option("--kv-cache-dtype", a.bc.kv_cache_dtype,
                "when building: auto or fp8 (E4M3 KV cache)");
  c->add_option("--calib", a.bc.calib, "--quant int4-awq: text file to calibrate on");
  add_arch_spec_arg(c, a.bc);
  add_runtime_args(c, a.rc);
}

void add_arch_spec_arg(CLI::App* c, BuildConfig& bc) {
  c->add_option("--arch-spec", bc.arch_specs,
                "when building: an architecture spec (JSON) adding or replacing a family; "
                "repeatable (docs/architectures.md)");
}

namespace {

std::vector<int32_t> parse_ids(const std::string& s) {
  std::vector<int32_t> r;
  size_t i = 0;
  while (i <= s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    std::string tok = s.substr(i, j - i);
    tok.erase(0, tok.find_first_not_of(" \t"));
    tok.erase(tok.find_last_not_of(" \t") + 1);
    char* end = nullptr;
    long v = tok.empty() ? -1 : std::strtol(tok.c_str(), &end, 10);
    if (tok.empty() || *end || v < 0 || v > INT32_MAX)
      throw Error(cat("--prompt-ids: '", tok, "' is not a token id (expected e.g. 1,2,3)"));
    r.push_back(int32_t(v));
    i = j + 1;
  }
  return r;
}

void check_ids(const Engine& e, const std::vector<int32_t>& ids) {
  const int64_t V = e.info().vocab_size;
  for (int32_t t : ids)
    KILN_CHECK(t < V, "--prompt-ids: token id ", t, " is outside the vocabulary (size ", V, ")");
}

std::string human_bytes(double b) {
  char s[32];
  std::snprintf(s, sizeof s, "%.2f GiB", b / (1024.0 * 1024 * 1024));
  if (b < 1024.0 * 1024 * 1024) std::snprintf(s, sizeof s, "%.2f MiB", b / (1024.0 * 1024));
  return s;
}

double mean_of(const std::vector<double>& v) {
  return std::accumulate(v.begin(), v.end(), 0.0) / double(std::max<size_t>(v.size(), 1));
}

double sd_of(const std::vector<double>& v) {
  if (v.size() < 2) return 0.0;
  const double m = mean_of(v);
  double var = 0;
  for (double x : v) var += (x - m) * (x - m);
  return std::sqrt(var / double(v.size() - 1));
}

std::vector<int64_t> parse_list(const std::string& s, const char* what) {
  std::vector<int64_t> r;
  size_t i = 0;
  while (i <= s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    const std::string tok = s.substr(i, j - i);
    char* end = nullptr;
    const long long v = tok.empty() ? -1 : std::strtoll(tok.c_str(), &end, 10);
    if (tok.empty() || *end || v < 0)
      throw Error(cat(what, ": '", tok, "' is not a count (expected e.g. 1,8,32)"));
    r.push_back(v);
    i = j + 1;
  }
  return r;
}

// Progress of a long build or verify on stderr: a bar redrawn in place on a terminal, a plain
// line every 10% otherwise (logs). Quiet for work under a second or two.
class ProgressLine {
 public:
  explicit ProgressLine(const char* what) : what_(what), tty_(isatty(fileno(stderr))) {}
  ProgressFn fn() {
    return [this](const BuildProgress& p) { update(p); };
  }
  void update(const BuildProgress& p) {
    if (!p.bytes_total) return;
    const auto now = std::chrono::steady_clock::now();
    if (now - t0_ < std::chrono::seconds(2)) return;
    const int pct = int(100.0 * double(p.bytes_done) / double(p.bytes_total));
    if (tty_) {
      if (now - last_ < std::chrono::milliseconds(100) && p.bytes_done < p.bytes_total) return;
      last_ = now;
      const int w = 30, fill = pct * w / 100;
      std::fprintf(stderr, "\r%s [%s%s] %3d%% %s / %s, tensor %zu/%zu", what_,
                   std::string(size_t(fill), '#').c_str(),
                   std::string(size_t(w - fill), '.').c_str(), pct,
                   human_bytes(double(p.bytes_done)).c_str(),
                   human_bytes(double(p.bytes_total)).c_str(), p.tensors_done, p.tensors_total);
      drawn_ = true;
    } else if (pct / 10 > printed_ / 10 || (printed_ < 0 && pct >= 0)) {
      printed_ = pct;
      std::fprintf(stderr, "kiln: %s %d%% (%s of %s)\n", what_, pct,
                   human_bytes(double(p.bytes_done)).c_str(),
                   human_bytes(double(p.bytes_total)).c_str());
    }
  }
  void finish() {
    if (drawn_) std::fprintf(stderr, "\n");
    drawn_ = false;
  }
  ~ProgressLine() { finish(); }

 private:
  const char* what_;
  bool tty_;
  bool drawn_ = false;
  int printed_ = -1;
  std::chrono::steady_clock::time_point t0_ = std::chrono::steady_clock::now(), last_{};
};

}  // namespace

Engine open_bench_engine(const std::string& model, const BuildConfig& bc, bool dummy) {
  if (!dummy) return Engine::open(model, bc);
  const std::filesystem::path p = std::filesystem::is_directory(model)
                                      ? std::filesystem::path(model) / "config.json"
                                      : std::filesystem::path(model);
  KILN_CHECK(!Engine::is_engine_dir(model), model,
             ": is a built engine; --dummy-weights takes a config.json (or a folder with one)");
  return Engine::build_dummy(p, bc);
}

void add_runtime_args(CLI::App* c, RuntimeConfig& rc) {
  c->add_option("--device", rc.device, "auto, cpu or cuda");
  c->add_option("--threads", rc.threads, "CPU threads (0: all cores)");
  c->add_option("--kv-cache-fraction", rc.kv_cache_fraction,
                "GPU: share of the memory free after the weights given to the KV cache");
  c->add_option("--kv-cache-tokens", rc.kv_cache_tokens,
                "KV cache size in tokens (0: from --kv-cache-fraction)");
  c->add_option("--tp", rc.tp,
                "tensor-parallel ranks (the weights are sharded at start; on the CPU the ranks "
                "are threads, see docs/parallel.md)")
      ->check(CLI::Range(1, 256));
  c->add_option("--pp", rc.pp, "pipeline-parallel stages (layers split evenly)")
      ->check(CLI::Range(1, 256));
  c->add_option("--dist-init", rc.dist_init,
                "ranks as processes: host:port where rank 0 (this process) listens; the others "
                "are started here, or by mpirun (docs/parallel.md)");
  c->add_flag("--nccl", rc.nccl,
              "one GPU: issue the tensor-parallel collectives through NCCL anyway (a group of "
              "one), to check the NCCL path");
}

void start_engine(Engine& e, const RuntimeConfig& rc) {
  e.start(rc);
  const RuntimeInfo r = e.runtime_info();
  if (r.free_bytes_before_kv <= 0) return;  // the CPU: nothing sized from free memory
  std::string how = r.kv_cache_fraction > 0 ? cat(r.kv_cache_fraction, " of ",
                                                  human_bytes(double(r.free_bytes_before_kv)),
                                                  " free after the weights")
                                            : std::string("--kv-cache-tokens");
  const std::string kv = e.info().kv_cache_dtype == "fp8" ? " fp8" : "";
  std::fprintf(stderr, "kiln: %s: weights %s; KV cache %lld tokens, %s%s (%s); CUDA graphs %s\n",
               r.device.c_str(), human_bytes(double(r.weight_bytes)).c_str(),
               (long long)r.kv_cache_tokens, human_bytes(double(r.kv_cache_bytes)).c_str(),
               kv.c_str(), how.c_str(), r.cuda_graphs ? "on" : "off");
}

void register_model_commands(CLI::App& app) {
  // build
  {
    auto* c = app.add_subcommand(
        "build", "Build an engine from a Hugging Face folder or a GGUF file (or dummy weights)");
    static std::string src, out, config;
    static BuildConfig bc;
    static bool dummy = false;
    static uint64_t seed = 0;
    c->add_option("model", src, "Hugging Face model folder or GGUF file");
    c->add_option("-o,--output", out, "engine folder to write")->required();
    c->add_option("--dtype", bc.dtype, "auto, f32, f16 or bf16");
    c->add_option("--max-batch", bc.max_batch, "concurrent sequences");
    c->add_option("--max-seq-len", bc.max_seq_len, "0: max_position_embeddings");
    c->add_option("--quant", bc.quant,
                  "weight quantization of the linear layers: none, int8-wo, int4-wo, int4-awq "
                  "(int4-wo with activation-aware scales calibrated on text), fp8 (with a "
                  "16-bit --dtype)")
        ->capture_default_str();
    c->add_flag("--quant-lm-head", bc.quant_lm_head,
                "with --quant: the LM head too (TensorRT-LLM's --quantize_lm_head)");
    c->add_option("--calib", bc.calib,
                  "--quant int4-awq: UTF-8 text file to calibrate on, its first 512 tokens "
                  "(default: a built-in text of prose, dialogue, code and numbers)");
    c->add_option("--kv-cache-dtype", bc.kv_cache_dtype,
                  "KV cache elements: auto (the engine dtype) or fp8 (E4M3 with a scale per "
                  "token and KV head; with a 16-bit --dtype)")
        ->capture_default_str();
    add_arch_spec_arg(c, bc);
    c->add_option("--tp", bc.tp,
                  "tensor-parallel ranks: one weight file per rank, each holding its shard "
                  "(docs/parallel.md)")
        ->check(CLI::Range(1, 256));
    c->add_option("--pp", bc.pp, "pipeline-parallel stages (with --tp: tp x pp weight files)")
        ->check(CLI::Range(1, 256));
    c->add_flag("--dummy-weights", dummy, "seeded random weights of the shape --config describes");
    c->add_option("--config", config, "config.json for --dummy-weights");
    c->add_option("--seed", seed, "seed for --dummy-weights");
    c->callback([&] {
      auto t0 = std::chrono::steady_clock::now();
      KILN_CHECK(!dummy || !config.empty(), "--dummy-weights needs --config <config.json>");
      KILN_CHECK(dummy || !src.empty(),
                 "build needs a Hugging Face folder or a GGUF file (or --dummy-weights --config)");
      KILN_CHECK(!dummy || src.empty(),
                 "--dummy-weights takes --config, not a Hugging Face folder");
      KILN_CHECK(dummy || config.empty(), "--config is for --dummy-weights");
      KILN_CHECK(dummy || seed == 0, "--seed is for --dummy-weights");
      ProgressLine bar("writing");
      const ModelInfo i = dummy ? Engine::build_dummy_to(config, out, bc, seed, bar.fn())
                                : Engine::build_to(src, out, bc, bar.fn());
      bar.finish();
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const double p = double(i.num_params);
      std::string kind = i.quant == "none" ? i.dtype : i.dtype + ", " + i.quant;
      if (i.quant_lm_head) kind += " with the LM head";
      if (i.kv_cache_dtype != "auto") kind += ", kv " + i.kv_cache_dtype;
      std::printf("built %s (%s, %.3f %s params, %s) -> %s in %.2f s\n", i.architecture.c_str(),
                  kind.c_str(), p >= 1e9 ? p / 1e9 : p / 1e6, p >= 1e9 ? "B" : "M",
                  human_bytes(double(i.weight_bytes)).c_str(), out.c_str(), s);
      if (!i.calibration.empty()) std::printf("%s\n", i.calibration.c_str());
      if (!i.conversion.empty()) std::printf("%s\n", i.conversion.c_str());
    });
  }
  // verify
  {
    auto* c = app.add_subcommand(
        "verify",
        "Check an engine folder: manifest, tensor names and shapes, per-tensor checksums");
    static std::string dir;
    c->add_option("engine", dir, "kiln engine folder")->required();
    c->callback([&] {
      auto t0 = std::chrono::steady_clock::now();
      ProgressLine bar("verifying");
      const uint64_t bytes = Engine::verify(dir, bar.fn());
      bar.finish();
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::printf("%s: ok (%s of weights match their checksums, %.2f s)\n", dir.c_str(),
                  human_bytes(double(bytes)).c_str(), s);
    });
  }
  // run
  {
    auto* c = app.add_subcommand("run", "Generate from a prompt (text or token ids)");
    static ModelArgs a;
    static std::string ids;
    static GenerationArgs ga;
    add_model_args(c, a);
    static std::string text;
    auto* o_ids = c->add_option("--prompt-ids", ids, "comma-separated token ids");
    auto* o_text =
        c->add_option("-p,--prompt", text, "prompt text (tokenized with the model's tokenizer)");
    o_ids->excludes(o_text);
    add_generation_args(c, ga);
    c->callback([&] {
      KILN_CHECK(!ids.empty() || !text.empty(), "run needs --prompt or --prompt-ids");
      Engine e = Engine::open(a.model, a.bc);
      GenerationParams g = ga.params();
      g.validate(e.info().vocab_size);
      if (!text.empty()) {
        generate_text(e, a.rc, text, g);
        return;
      }
      std::vector<int32_t> prompt = parse_ids(ids);
      check_ids(e, prompt);
      start_engine(e, a.rc);
      ServeConfig sc;
      sc.runtime = a.rc;
      Scheduler s(e, sc);
      g.detokenize = false;
      const Reply r = stream_reply(s, prompt, g, nullptr);
      KILN_CHECK(r.error.empty() || !r.ids.empty(), r.error);  // nothing to print: one line
      for (size_t i = 0; i < r.ids.size(); ++i) std::printf("%s%d", i ? "," : "", r.ids[i]);
      std::printf("\n");
      std::fflush(stdout);
      KILN_CHECK(r.error.empty(), r.error);
      print_finish(r);
    });
  }
  // logits
  {
    auto* c = app.add_subcommand("logits", "Write the logits of every prompt position");
    static ModelArgs a;
    static std::string ids, out;
    add_model_args(c, a);
    c->add_option("--prompt-ids", ids, "comma-separated token ids")->required();
    c->add_option("--out", out, "safetensors file to write (one F32 tensor 'logits' [seq, vocab])")
        ->required();
    c->callback([&] {
      std::vector<int32_t> prompt = parse_ids(ids);
      Engine e = Engine::open(a.model, a.bc);
      check_ids(e, prompt);
      start_engine(e, a.rc);
      std::vector<float> lg = e.logits(prompt);
      const int64_t V = e.info().vocab_size;
      for (size_t i = 0; i < lg.size(); ++i)  // NaN logits are an error, not a file of NaNs
        if (!std::isfinite(lg[i]))
          throw Error(cat("the model produced non-finite logits (NaN or inf) at prompt position ",
                          int64_t(i) / V, "; its weights or config are broken"));
      Tensor t = Tensor::zeros(DType::F32, {int64_t(prompt.size()), V});
      std::copy(lg.begin(), lg.end(), t.ptr<float>());
      write_safetensors(out, {{"logits", t}});
    });
  }
  // bench
  {
    auto* c =
        app.add_subcommand("bench", "Prompt-processing and generation speed (llama-bench style)");
    static ModelArgs a;
    static int64_t pp = 512, tg = 128, depth = 0;
    static int reps = 3;
    static std::string batches = "1", format = "md";
    static bool dummy = false;
    add_model_args(c, a);
    c->add_flag("--dummy-weights", dummy,
                "model is a config.json (or a folder with one): seeded random weights of its "
                "shape, built in memory");
    // `bench serve` / `bench offline` run without this command's model: required is checked in
    // the callback, so the positional does not demand a value there.
    c->get_option("model")->required(false);
    register_bench_subcommands(c);
    c->add_option("-p,--n-prompt", pp, "prompt tokens (0: skip)")->check(at_least(0));
    c->add_option("-n,--n-gen", tg, "generated tokens per sequence (0: skip)")->check(at_least(0));
    c->add_option("-b,--batch", batches, "sequences decoding together, e.g. 1,8,32 (tg only)");
    c->add_option("-d,--n-depth", depth,
                  "tokens in each sequence's KV cache before tg starts (llama-bench's depth; "
                  "prefilled untimed)")
        ->check(at_least(0));
    c->add_option("-r,--repetitions", reps, "timed repetitions after one warm-up");
    c->add_option("-o,--output", format, "md or json");
    c->callback([c] {
      if (!c->get_subcommands().empty()) return;  // serve / offline ran
      KILN_CHECK(!a.model.empty(),
                 "bench needs a model (engine, Hugging Face folder or GGUF file)");
      KILN_CHECK(format == "md" || format == "json", "-o: expected md or json (got '", format,
                 "')");
      KILN_CHECK(reps >= 1, "-r must be >= 1");
      const std::vector<int64_t> bs = parse_list(batches, "--batch");
      int64_t bmax = 1;
      for (int64_t b : bs) {
        KILN_CHECK(b >= 1, "--batch: counts must be >= 1");
        bmax = std::max(bmax, b);
      }
      Engine e = open_bench_engine(a.model, a.bc, dummy);
      const ModelInfo info = e.info();
      KILN_CHECK(pp + 1 <= info.max_seq_len && depth + tg + 1 <= info.max_seq_len, "bench needs ",
                 std::max(pp, depth + tg) + 1, " positions but the engine allows ",
                 info.max_seq_len);
      // Only what the runs need, unless asked otherwise: starts fast, leaves the GPU's memory.
      RuntimeConfig rc = a.rc;
      if (rc.kv_cache_tokens == 0)
        rc.kv_cache_tokens = std::max({pp + 1, bmax * (depth + tg + 16), info.max_seq_len});
      start_engine(e, rc);
      std::mt19937 rng(1234);
      std::uniform_int_distribution<int32_t> tok(0, int32_t(info.vocab_size - 1));
      const std::string device = e.device_name();
      const int threads = device == "CPU" ? omp_get_max_threads() : 0;
      // Ranks in the backend column, as llama-bench names its split: "CUDA tp2", "CPU tp2 pp2".
      std::string backend = device;
      if (rc.tp > 1) backend += " tp" + std::to_string(rc.tp);
      if (rc.pp > 1) backend += " pp" + std::to_string(rc.pp);
      nlohmann::json rows = nlohmann::json::array();
      if (format == "md") {
        std::printf("| model | size | params | backend | threads | test | batch | t/s |\n");
        std::printf("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |\n");
      }
      auto report = [&](const std::string& test, int64_t n_prompt, int64_t n_gen, int64_t batch,
                        const std::vector<double>& rates) {
        const double mean = mean_of(rates), sd = sd_of(rates);
        std::string kind = info.quant == "none" ? info.dtype : info.dtype + " " + info.quant;
        if (info.quant_lm_head) kind += "+head";
        if (info.kv_cache_dtype != "auto") kind += " kv-" + info.kv_cache_dtype;
        if (format == "md") {
          const double np = double(info.num_params);
          std::printf("| %s %s | %s | %.2f %s | %s | %d | %s | %lld | %.2f ± %.2f |\n",
                      info.architecture.c_str(), kind.c_str(),
                      human_bytes(double(info.weight_bytes)).c_str(),
                      np >= 1e9 ? np / 1e9 : np / 1e6, np >= 1e9 ? "B" : "M", backend.c_str(),
                      threads, test.c_str(), (long long)batch, mean, sd);
          std::fflush(stdout);
        }
        rows.push_back({{"model", info.architecture + " " + kind},
                        {"architecture", info.architecture},
                        {"dtype", info.dtype},
                        {"quant", info.quant},
                        {"quant_lm_head", info.quant_lm_head},
                        {"kv_cache_dtype", info.kv_cache_dtype},
                        {"model_size", info.weight_bytes},
                        {"model_n_params", info.num_params},
                        {"backend", device},
                        {"tp", std::max(1, rc.tp)},
                        {"pp", std::max(1, rc.pp)},
                        {"n_threads", threads},
                        {"test", test},
                        {"n_prompt", n_prompt},
                        {"n_gen", n_gen},
                        {"n_depth", n_gen > 0 ? depth : 0},
                        {"n_batch", batch},
                        {"avg_ts", mean},
                        {"stddev_ts", sd},
                        {"samples_ts", rates}});
      };
      auto seconds = [](auto t0) {
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      };
      SamplingParams greedy;
      greedy.temperature = 0.0f;
      if (pp > 0) {
        std::vector<double> rates;
        for (int r = 0; r <= reps; ++r) {  // r == 0 is the warm-up
          Session s = e.session(pp + 1);
          s.set_sampling(greedy);
          std::vector<int32_t> ids(static_cast<size_t>(pp));
          for (auto& t : ids) t = tok(rng);
          auto t0 = std::chrono::steady_clock::now();
          s.next(ids);  // prefill + the first token, read back
          const double sec = seconds(t0);
          if (r > 0) rates.push_back(double(pp) / sec);
        }
        report(cat("pp", pp), pp, 0, 1, rates);
      }
      if (tg > 0) {
        for (int64_t b : bs) {
          std::vector<double> rates;
          for (int r = 0; r <= reps; ++r) {
            // Each sequence starts from one token; then tg greedy steps of the whole batch, every
            // token sampled on the device and read back (the device one step ahead), as a
            // server streams them.
            std::vector<Session> ss;
            std::vector<Session*> ptrs;
            ss.reserve(size_t(b));
            for (int64_t i = 0; i < b; ++i) {
              ss.push_back(e.session(depth + tg + 1));
              ss.back().set_sampling(greedy);
            }
            for (auto& s : ss) ptrs.push_back(&s);
            std::vector<int32_t> cur(static_cast<size_t>(b));
            if (depth > 0) {  // each sequence's context, prefilled before the clock starts
              std::vector<int32_t> ctx(static_cast<size_t>(depth));
              for (int64_t i = 0; i < b; ++i) {
                for (auto& t : ctx) t = tok(rng);
                cur[size_t(i)] = ss[size_t(i)].next(ctx);
              }
            } else {
              for (auto& t : cur) t = tok(rng);
              cur = e.step(ptrs, cur);
            }
            int64_t steps = 0;
            auto t0 = std::chrono::steady_clock::now();
            e.decode(ptrs, cur, tg, [&](std::span<const int32_t>) { return ++steps > 0; });
            const double sec = seconds(t0);
            KILN_CHECK(steps == tg, "bench: ", steps, " of ", tg, " steps ran");
            if (r > 0) rates.push_back(double(b * tg) / sec);
          }
          report(depth > 0 ? cat("tg", tg, " @ d", depth) : cat("tg", tg), 0, tg, b, rates);
        }
      }
      if (format == "json") std::printf("%s\n", rows.dump(2).c_str());
    });
  }
}

}  // namespace kiln::cli
