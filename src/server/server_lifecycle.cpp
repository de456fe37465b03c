// The server's life: loading the engine behind a listening socket, the public Server methods,
// draining and shutdown.
#include <csignal>
#include <filesystem>
#include <fstream>

#include "server/server_impl.h"

namespace kiln {

// ---------------------------------------------------------------------------------------------
// Loading and shutdown

void Server::Impl::load() {
  engine = std::make_unique<Engine>(Engine::open(cfg.model, cfg.build));
  const ModelInfo mi = engine->info();
  max_seq_len = mi.max_seq_len;
  vocab_size = mi.vocab_size;
  const auto dir = engine->tokenizer_dir();
  // An engine without tokenizer files (e.g. --dummy-weights) serves token-id prompts only.
  if (!dir.empty() && (std::filesystem::exists(dir / "tokenizer.json") ||
                       std::filesystem::exists(dir / "tokenizer.model"))) {
    tok = Tokenizer::from_dir(dir);
    tmpl = ChatTemplate::from_dir(dir);
    std::ifstream f(dir / "tokenizer_config.json");
    if (f) {
      try {
        tokenizer_config = json::parse(f);
      } catch (const json::exception&) {
        tokenizer_config = json::object();  // the Tokenizer already reported real problems
      }
    }
  }
  if (cfg.on_engine_loaded) cfg.on_engine_loaded(*engine);
  sched = std::make_unique<Scheduler>(*engine, cfg.serve);
  max_seq_len = sched->max_seq_len();
}

void Server::Impl::drain_and_stop() {
  if (sched) sched->drain();  // every queued and running request finishes
  {
    // Their responses may still be being written; a stuck client cannot hold us past httplib's
    // write timeout per write, and the cap bounds the total.
    std::unique_lock lk(mu);
    cv.wait_for(lk, std::chrono::seconds(60), [&] { return active == 0; });
  }
  http.stop();
  if (listen_thread.joinable()) listen_thread.join();
}

// ---------------------------------------------------------------------------------------------

Server::Server(ServerConfig cfg) : impl_(std::make_unique<Impl>(std::move(cfg))) {}

Server::~Server() {
  shutdown();
  if (impl_->listen_thread.joinable()) {
    impl_->http.stop();
    impl_->listen_thread.join();
  }
}

bool Server::ready() const {
  return impl_->is_ready.load(std::memory_order_acquire);
}
int Server::port() const {
  return impl_->bound_port.load();
}

void Server::shutdown() {
  std::lock_guard lk(impl_->mu);
  impl_->stop_requested = true;
  impl_->cv.notify_all();
}

void Server::run() {
  Impl& s = *impl_;
  KILN_CHECK(s.cfg.max_request_bytes > 0, "--max-request-bytes must be positive");
  KILN_CHECK(s.cfg.http_threads > 0, "the HTTP thread count must be positive");
  const size_t threads = size_t(s.cfg.http_threads);
  s.http.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  s.http.set_payload_max_length(size_t(s.cfg.max_request_bytes));
  s.http.set_keep_alive_max_count(1000);
  // No Nagle: a response's headers, then each SSE chunk, are small separate writes; with Nagle
  // each would wait for the client's delayed ACK (40 ms on Linux), which showed as ~80 ms of
  // TTFT on every request. (Accepted sockets inherit the option from the listening socket.)
  s.http.set_tcp_nodelay(true);
  s.routes();
  // httplib listens with a backlog of 5, compiled into Debian's library: a burst of clients
  // (64 streams opening at once) would see dropped SYNs and second-long connect retries. The
  // socket-options hook hands us the listening socket, and listen() again raises the backlog.
  int listen_fd = -1;
  s.http.set_socket_options([&listen_fd](socket_t fd) {
    httplib::default_socket_options(fd);
    listen_fd = fd;
  });
  int port = s.cfg.port;
  if (port == 0) {
    port = s.http.bind_to_any_port(s.cfg.host);
  } else if (!s.http.bind_to_port(s.cfg.host, port)) {
    port = -1;
  }
  KILN_CHECK(port > 0, "cannot listen on ", s.cfg.host, ":", s.cfg.port,
             " (address in use, or not an address of this machine)");
  if (listen_fd >= 0) ::listen(listen_fd, 1024);
  s.bound_port = port;
  s.listen_thread = std::thread([&s] { s.http.listen_after_bind(); });
  std::fprintf(stderr, "kiln: listening on http://%s:%d; loading %s\n", s.cfg.host.c_str(), port,
               s.cfg.model.c_str());
  try {
    s.load();
  } catch (...) {
    s.http.stop();
    s.listen_thread.join();
    throw;
  }
  s.is_ready.store(true, std::memory_order_release);
  std::fprintf(stderr, "kiln: serving %s as '%s' (max_seq_len %lld)\n", s.cfg.model.c_str(),
               s.model_name.c_str(), (long long)s.max_seq_len);
  {
    std::unique_lock lk(s.mu);
    s.cv.wait(lk, [&] { return s.stop_requested; });
  }
  std::fprintf(stderr, "kiln: shutting down: finishing %d request(s)\n", [&] {
    std::lock_guard lk(s.mu);
    return s.active;
  }());
  s.drain_and_stop();
  s.sched.reset();
}

}  // namespace kiln
