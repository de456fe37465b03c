// kiln build / run / logits / bench.
#include <omp.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <numeric>
#include <random>

#include "commands.h"
#include "core/error.h"
#include "core/tensor.h"
#include "io/safetensors.h"
#include "kiln/kiln.h"

namespace kiln::cli {

namespace {

struct ModelArgs {
  std::string model;
  BuildConfig bc;
  RuntimeConfig rc;
};

void add_model_args(CLI::App* c, ModelArgs& a) {
  c->add_option("model", a.model, "kiln engine folder or Hugging Face model folder")->required();
  c->add_option("--dtype", a.bc.dtype, "weight dtype when building from an HF folder: auto, f32, f16, bf16");
  c->add_option("--max-seq-len", a.bc.max_seq_len, "when building from an HF folder (0: max_position_embeddings)");
  c->add_option("--device", a.rc.device, "auto, cpu or cuda");
  c->add_option("--threads", a.rc.threads, "CPU threads (0: all cores)");
}

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

}  // namespace

void register_model_commands(CLI::App& app) {
  // build
  {
    auto* c = app.add_subcommand("build", "Build an engine from a Hugging Face folder (or dummy weights)");
    static std::string src, out, config;
    static BuildConfig bc;
    static bool dummy = false;
    static uint64_t seed = 0;
    c->add_option("hf_dir", src, "Hugging Face model folder");
    c->add_option("-o,--output", out, "engine folder to write")->required();
    c->add_option("--dtype", bc.dtype, "auto, f32, f16 or bf16");
    c->add_option("--max-batch", bc.max_batch, "concurrent sequences");
    c->add_option("--max-seq-len", bc.max_seq_len, "0: max_position_embeddings");
    c->add_flag("--dummy-weights", dummy, "seeded random weights of the shape --config describes");
    c->add_option("--config", config, "config.json for --dummy-weights");
    c->add_option("--seed", seed, "seed for --dummy-weights");
    c->callback([&] {
      auto t0 = std::chrono::steady_clock::now();
      Engine e = [&] {
        if (dummy) {
          KILN_CHECK(!config.empty(), "--dummy-weights needs --config <config.json>");
          return Engine::build_dummy(config, bc, seed);
        }
        KILN_CHECK(!src.empty(), "build needs a Hugging Face folder (or --dummy-weights --config)");
        return Engine::build(src, bc);
      }();
      e.save(out);
      const ModelInfo i = e.info();
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const double p = double(i.num_params);
      std::printf("built %s (%s, %.3f %s params, %s) -> %s in %.2f s\n", i.architecture.c_str(),
                  i.dtype.c_str(), p >= 1e9 ? p / 1e9 : p / 1e6, p >= 1e9 ? "B" : "M",
                  human_bytes(double(i.weight_bytes)).c_str(), out.c_str(), s);
    });
  }
  // run
  {
    auto* c = app.add_subcommand("run", "Generate from prompt token ids");
    static ModelArgs a;
    static std::string ids;
    static SamplingParams sp;
    static float temperature = -1, top_p = -1;
    static int top_k = -1;
    add_model_args(c, a);
    static std::string text;
    auto* o_ids = c->add_option("--prompt-ids", ids, "comma-separated token ids");
    auto* o_text = c->add_option("--prompt", text, "prompt text (tokenized with the model's tokenizer)");
    o_ids->excludes(o_text);
    c->add_option("--max-tokens", sp.max_tokens, "tokens to generate");
    c->add_flag("--ignore-eos", sp.ignore_eos, "keep going past end-of-sequence tokens");
    c->add_option("--temperature", temperature, "0: greedy (default: generation_config.json)");
    c->add_option("--top-k", top_k, "0: off");
    c->add_option("--top-p", top_p, "1: off");
    c->add_option("--seed", sp.seed, "sampling seed");
    c->callback([&] {
      if (temperature >= 0) sp.temperature = temperature;
      if (top_k >= 0) sp.top_k = top_k;
      if (top_p >= 0) sp.top_p = top_p;
      KILN_CHECK(!ids.empty() || !text.empty(), "run needs --prompt or --prompt-ids");
      Engine e = Engine::open(a.model, a.bc);
      if (!text.empty()) {
        generate_text(e, a.rc, text, sp);
        return;
      }
      std::vector<int32_t> prompt = parse_ids(ids);
      check_ids(e, prompt);
      e.start(a.rc);
      std::vector<int32_t> out = e.generate(prompt, sp);
      for (size_t i = 0; i < out.size(); ++i) std::printf("%s%d", i ? "," : "", out[i]);
      std::printf("\n");
    });
  }
  // logits
  {
    auto* c = app.add_subcommand("logits", "Write the logits of every prompt position");
    static ModelArgs a;
    static std::string ids, out;
    add_model_args(c, a);
    c->add_option("--prompt-ids", ids, "comma-separated token ids")->required();
    c->add_option("--out", out, "safetensors file to write (one F32 tensor 'logits' [seq, vocab])")->required();
    c->callback([&] {
      std::vector<int32_t> prompt = parse_ids(ids);
      Engine e = Engine::open(a.model, a.bc);
      check_ids(e, prompt);
      e.start(a.rc);
      std::vector<float> lg = e.logits(prompt);
      Tensor t = Tensor::zeros(DType::F32, {int64_t(prompt.size()), e.info().vocab_size});
      std::copy(lg.begin(), lg.end(), t.ptr<float>());
      write_safetensors(out, {{"logits", t}});
    });
  }
  // bench
  {
    auto* c = app.add_subcommand("bench", "Prompt-processing and generation speed (llama-bench style)");
    static ModelArgs a;
    static int64_t pp = 512, tg = 128;
    static int reps = 3;
    add_model_args(c, a);
    c->add_option("-p,--n-prompt", pp, "prompt tokens (0: skip)");
    c->add_option("-n,--n-gen", tg, "generated tokens (0: skip)");
    c->add_option("-r,--repetitions", reps, "timed repetitions after one warm-up");
    c->callback([&] {
      Engine e = Engine::open(a.model, a.bc);
      e.start(a.rc);
      const ModelInfo info = e.info();
      KILN_CHECK(pp + tg + 1 <= info.max_seq_len, "bench needs ", pp + tg + 1,
                 " positions but the engine allows ", info.max_seq_len);
      std::mt19937 rng(1234);
      std::uniform_int_distribution<int32_t> tok(0, int32_t(info.vocab_size - 1));
      std::printf("| model | size | params | backend | threads | test | t/s |\n");
      std::printf("| --- | ---: | ---: | --- | ---: | ---: | ---: |\n");
      auto run = [&](const char* label, int64_t n, bool prompt) {
        if (n <= 0) return;
        std::vector<double> rates;
        for (int r = 0; r <= reps; ++r) {
          Session s = e.session(n + 1);
          std::vector<int32_t> ids(size_t(prompt ? n : 1));
          for (auto& t : ids) t = tok(rng);
          if (!prompt) s.forward(ids);
          auto t0 = std::chrono::steady_clock::now();
          if (prompt) {
            s.forward(ids);
          } else {
            for (int64_t i = 0; i < n; ++i) {
              int32_t t = tok(rng);
              s.forward(std::span<const int32_t>(&t, 1));
            }
          }
          double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
          if (r > 0) rates.push_back(double(n) / sec);  // r == 0 is the warm-up
        }
        const double mean = std::accumulate(rates.begin(), rates.end(), 0.0) / double(rates.size());
        double var = 0;
        for (double x : rates) var += (x - mean) * (x - mean);
        const double sd = rates.size() > 1 ? std::sqrt(var / double(rates.size() - 1)) : 0.0;
        std::printf("| %s %s | %s | %.2f B | %s | %d | %s%lld | %.2f ± %.2f |\n",
                    info.architecture.c_str(), info.dtype.c_str(),
                    human_bytes(double(info.weight_bytes)).c_str(), double(info.num_params) / 1e9,
                    e.device_name().c_str(), omp_get_max_threads(), label, (long long)n, mean, sd);
        std::fflush(stdout);
      };
      run("pp", pp, true);
      run("tg", tg, false);
    });
  }
}

}  // namespace kiln::cli
