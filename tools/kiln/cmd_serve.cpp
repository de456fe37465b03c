// `kiln serve`: the OpenAI-compatible HTTP server (kiln/server.h) with graceful SIGTERM/SIGINT.
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <thread>

#include "commands.h"
#include "core/error.h"
#include "kiln/server.h"

namespace kiln::cli {

namespace {

// Signals are taken by one thread with sigwait (nothing async-signal-unsafe runs in a handler):
// the first SIGTERM/SIGINT starts a graceful drain, a second one exits at once.
void watch_signals(Server& server, sigset_t set) {
  std::thread([&server, set] {
    int sig = 0;
    if (sigwait(&set, &sig) != 0) return;
    if (!server.ready()) {
      // Still loading: nothing is in flight, and loading cannot be interrupted.
      std::fprintf(stderr, "kiln: signal %d while loading; exiting\n", sig);
      std::_Exit(0);
    }
    std::fprintf(stderr, "kiln: signal %d: draining (again to exit at once)\n", sig);
    server.shutdown();
    if (sigwait(&set, &sig) == 0) std::_Exit(1);
  }).detach();
}

}  // namespace

void register_serve(CLI::App& app) {
  auto* c = app.add_subcommand("serve", "OpenAI-compatible HTTP server (continuous batching)");
  static ServerConfig cfg;
  static bool no_prefix_cache = false;
  c->add_option("model", cfg.model, "kiln engine folder, Hugging Face model folder or GGUF file")
      ->required();
  c->add_option("--host", cfg.host, "address to listen on (default: loopback only)")
      ->default_val("127.0.0.1");
  c->add_option("--port", cfg.port, "TCP port (0: any free port)")
      ->default_val(8000)
      ->check(CLI::Range(0, 65535));
  c->add_option("--api-key", cfg.api_key, "require 'Authorization: Bearer <key>'");
  c->add_option("--served-model-name", cfg.served_model_name,
                "model name clients send (default: the model path)");
  c->add_option("--max-queue", cfg.serve.max_queue, "waiting requests before 503")
      ->check(at_least(1));
  c->add_option("--max-num-seqs", cfg.serve.max_num_seqs,
                "sequences per engine step (0: 256 on a GPU, 16 on the CPU)")
      ->check(at_least(0));
  c->add_option("--max-num-tokens", cfg.serve.max_num_tokens,
                "tokens per engine step, the chunked-prefill budget (0: 8192 / 2048)")
      ->check(at_least(0));
  c->add_flag("--no-prefix-cache", no_prefix_cache, "do not share prompt blocks between requests");
  c->add_option("--max-request-bytes", cfg.max_request_bytes, "larger request bodies get 413")
      ->check(at_least(1));
  c->add_option("--dtype", cfg.build.dtype, "weight dtype when building from an HF folder");
  c->add_option("--max-seq-len", cfg.build.max_seq_len,
                "when building from an HF folder (0: max_position_embeddings)");
  c->add_option("--quant", cfg.build.quant,
                "when building from an HF folder: none, int8-wo, int4-wo, int4-awq, fp8");
  c->add_flag("--quant-lm-head", cfg.build.quant_lm_head,
              "with --quant: the LM head too (TensorRT-LLM's --quantize_lm_head)");
  c->add_option("--kv-cache-dtype", cfg.build.kv_cache_dtype,
                "when building from an HF folder: auto or fp8 (E4M3 KV cache)");
  c->add_option("--calib", cfg.build.calib, "--quant int4-awq: text file to calibrate on");
  add_arch_spec_arg(c, cfg.build);
  add_runtime_args(c, cfg.serve.runtime);
  c->callback([&] {
    cfg.serve.prefix_cache = !no_prefix_cache;
    // Reports the device and KV cache size like the other commands; the scheduler then finds
    // the engine started.
    cfg.on_engine_loaded = [](Engine& e) { start_engine(e, cfg.serve.engine_runtime()); };
    // Block the signals before any thread exists so every thread inherits the mask and only the
    // watcher receives them.
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set, nullptr);
    signal(SIGPIPE, SIG_IGN);  // a client that hung up is a failed write, not a dead server
    Server server(cfg);
    watch_signals(server, set);
    server.run();
    std::fprintf(stderr, "kiln: stopped\n");
  });
}

}  // namespace kiln::cli
