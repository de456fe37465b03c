// Server::Impl, shared by the server's translation units (server.cpp: loading, generation
// endpoints, shutdown; server_info.cpp: the model, health, metrics and tokenizer endpoints).
#pragma once

#include <httplib.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>

#include "core/error.h"
#include "kiln/server.h"
#include "kiln/serving.h"
#include "server/metrics.h"
#include "server/openai.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace kiln {

using server::dump;
using server::HttpError;
using server::json;

inline void send_json(httplib::Response& res, int status, const json& j) {
  res.status = status;
  res.set_content(dump(j), "application/json");
}

inline void send_error(httplib::Response& res, int status, const std::string& msg,
                       const std::string& param = "", const std::string& code = "") {
  send_json(res, status, server::error_body(status, msg, param, code));
}

struct Server::Impl {
  explicit Impl(ServerConfig c) : cfg(std::move(c)) {
    model_name = cfg.served_model_name.empty() ? cfg.model : cfg.served_model_name;
  }

  ServerConfig cfg;
  std::string model_name;
  httplib::Server http;
  std::thread listen_thread;
  std::atomic<int> bound_port{0};
  std::atomic<bool> is_ready{false};

  std::unique_ptr<Engine> engine;
  std::unique_ptr<Scheduler> sched;
  std::optional<Tokenizer> tok;
  std::optional<ChatTemplate> tmpl;
  json tokenizer_config = json::object();
  int64_t max_seq_len = 0, vocab_size = 0;

  // Shutdown and in-flight generation requests (counted until their last byte is written).
  std::mutex mu;
  std::condition_variable cv;
  bool stop_requested = false;
  int active = 0;

  server::Metrics metrics;
  std::atomic<uint64_t> next_id{0};
  uint64_t id_salt = std::random_device{}();

  const Tokenizer* tokenizer() const { return tok ? &*tok : nullptr; }
  std::string new_id(const char* prefix) {
    char b[64];
    std::snprintf(b, sizeof b, "%s%016llx%08llx", prefix, (unsigned long long)id_salt,
                  (unsigned long long)next_id.fetch_add(1));
    return b;
  }

  void begin_active() {
    std::lock_guard lk(mu);
    if (stop_requested) throw HttpError(503, "the server is shutting down");
    active++;
  }
  void end_active() {
    std::lock_guard lk(mu);
    active--;
    cv.notify_all();
  }

  void load();
  void routes();       // generation endpoints and error handlers (server.cpp)
  void routes_info();  // models, health, metrics, tokenizer endpoints (server_info.cpp)
  void drain_and_stop();

  using Handler = std::function<void(const httplib::Request&, httplib::Response&)>;
  // Wraps a handler: API key, body size, readiness, and every error as an OpenAI error body.
  httplib::Server::Handler api(bool needs_engine, bool needs_key, Handler fn);
  static json parse_body(const httplib::Request& req);
  void check_model(const json& body) const;
};

}  // namespace kiln
