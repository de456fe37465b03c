// kiln HTTP server: an OpenAI-compatible API over one Engine and its continuous-batching
// Scheduler (kiln/serving.h).
//
//   kiln::ServerConfig cfg;
//   cfg.model = "model.engine";                  // or a Hugging Face folder
//   kiln::Server server(cfg);
//   std::thread t([&] { server.run(); });        // listens, then loads the engine
//   ...
//   server.shutdown();                           // stop taking requests, finish the others
//   t.join();
//
// Endpoints: POST /v1/completions, POST /v1/chat/completions (both with SSE streaming),
// GET /v1/models, GET /health (503 while the engine loads), GET /metrics (Prometheus text, names
// prefixed `kiln:`), POST /tokenize, POST /detokenize, GET /tokenizer_info. Errors use OpenAI's
// body {"error": {"message", "type", "param", "code"}}.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "kiln/kiln.h"
#include "kiln/serving.h"

namespace kiln {

struct ServerConfig {
  std::string model;                     // engine folder or Hugging Face folder
  BuildConfig build;                     // when `model` is a Hugging Face folder
  ServeConfig serve;                     // scheduler and runtime settings
  std::string host = "127.0.0.1";        // loopback unless asked otherwise
  int port = 8000;                       // 0: any free port (see Server::port())
  std::string api_key;                   // non-empty: requests need "Authorization: Bearer <key>"
  std::string served_model_name;         // the name clients use; empty: `model` as given
  int64_t max_request_bytes = 16 << 20;  // larger request bodies get 413
  int http_threads = 256;                // connections served at once (each stream holds one)
  // Called with the engine once it is loaded, before the scheduler starts it (the CLI uses it to
  // start the engine itself and report the KV cache size). May be empty.
  std::function<void(Engine&)> on_engine_loaded;
};

class Server {
 public:
  explicit Server(ServerConfig cfg);
  // Stops the listener. Destroy only after run() has returned (or was never called).
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds (throws kiln::Error naming host:port when it cannot), starts answering requests, loads
  // the engine (meanwhile /health and the API answer 503, /metrics zeros) and serves until
  // shutdown(). Returns once every accepted request has been answered. Throws kiln::Error when
  // the engine cannot be loaded. Call it once.
  void run();
  // Begins a graceful stop: new generation requests get 503, queued and running ones finish,
  // then the listener closes and run() returns. Thread-safe; returns at once; idempotent.
  void shutdown();
  // True once the engine is loaded and the scheduler runs.
  bool ready() const;
  // The bound port (useful with port 0), once run() has bound; 0 before.
  int port() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace kiln
