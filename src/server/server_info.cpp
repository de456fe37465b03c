// The server's informational endpoints: /v1/models, /health, /metrics, /tokenize,
// /detokenize and /tokenizer_info (vLLM's shapes).
#include <ctime>

#include "server/server_impl.h"

namespace kiln {

void Server::Impl::routes_info() {
  // ---- GET /v1/models
  http.Get("/v1/models", api(true, true, [this](const httplib::Request&, httplib::Response& res) {
             send_json(res, 200,
                       {{"object", "list"},
                        {"data",
                         {{{"id", model_name},
                           {"object", "model"},
                           {"created", int64_t(std::time(nullptr))},
                           {"owned_by", "kiln"},
                           {"root", cfg.model},
                           {"parent", nullptr},
                           {"max_model_len", max_seq_len}}}}});
           }));

  // ---- GET /health: 503 until the engine runs (load balancers wait for 200), 503 when draining.
  http.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    bool stopping;
    {
      std::lock_guard lk(mu);
      stopping = stop_requested;
    }
    if (!is_ready.load(std::memory_order_acquire))
      send_error(res, 503, "the model is still loading");
    else if (stopping)
      send_error(res, 503, "the server is shutting down");
    else
      res.status = 200;
  });

  // ---- GET /metrics
  http.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    const SchedulerStats st =
        is_ready.load(std::memory_order_acquire) ? sched->stats() : SchedulerStats{};
    res.set_content(metrics.render(st, model_name), "text/plain; version=0.0.4; charset=utf-8");
  });

  // ---- POST /tokenize (vLLM): {"prompt"} or {"messages"} -> {"count", "max_model_len", "tokens"}
  http.Post(
      "/tokenize", api(true, true, [=, this](const httplib::Request& req, httplib::Response& res) {
        const json body = parse_body(req);
        check_model(body);
        if (!tok) throw HttpError(400, "this model has no tokenizer");
        std::vector<int32_t> ids;
        if (body.contains("messages")) {
          if (!tmpl) throw HttpError(400, "this model has no chat template", "messages");
          const json& m = body["messages"];
          if (!m.is_array()) throw HttpError(400, "'messages' must be a list", "messages");
          json extra = body.value("chat_template_kwargs", json::object());
          if (!extra.is_object())
            throw HttpError(400, "'chat_template_kwargs' must be an object",
                            "chat_template_kwargs");
          const bool add_gen = server::get_bool(body, "add_generation_prompt").value_or(true);
          const std::string text = tmpl->render(m, add_gen, extra);
          ids = tok->encode(text, server::get_bool(body, "add_special_tokens").value_or(false));
        } else {
          auto p = server::get_string(body, "prompt");
          if (!p) throw HttpError(400, "'prompt' (a string) or 'messages' is required", "prompt");
          ids = tok->encode(*p, server::get_bool(body, "add_special_tokens").value_or(true));
        }
        json r = {{"count", ids.size()},
                  {"max_model_len", max_seq_len},
                  {"tokens", ids},
                  {"token_strs", nullptr}};
        if (server::get_bool(body, "return_token_strs").value_or(false)) {
          json strs = json::array();
          for (int32_t t : ids) strs.push_back(tok->id_to_token(t));
          r["token_strs"] = strs;
        }
        send_json(res, 200, r);
      }));

  // ---- POST /detokenize (vLLM): {"tokens"} -> {"prompt"}
  http.Post(
      "/detokenize",
      api(true, true, [=, this](const httplib::Request& req, httplib::Response& res) {
        const json body = parse_body(req);
        check_model(body);
        if (!tok) throw HttpError(400, "this model has no tokenizer");
        auto it = body.find("tokens");
        if (it == body.end() || !it->is_array())
          throw HttpError(400, "'tokens' must be a list of token ids", "tokens");
        std::vector<int32_t> ids;
        for (const json& v : *it) {
          if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= vocab_size)
            throw HttpError(400, cat("'tokens': ", dump(v), " is not a token id of this model"),
                            "tokens");
          ids.push_back(v.get<int32_t>());
        }
        send_json(res, 200, {{"prompt", tok->decode(ids, false)}});
      }));

  // ---- GET /tokenizer_info (vLLM): tokenizer_config.json's settings plus the chat template.
  http.Get("/tokenizer_info",
           api(true, true, [this](const httplib::Request&, httplib::Response& res) {
             if (!tok) throw HttpError(404, "this model has no tokenizer");
             json r = tokenizer_config;
             r.erase("added_tokens_decoder");  // large and internal to transformers
             if (!r.contains("tokenizer_class")) r["tokenizer_class"] = "PreTrainedTokenizerFast";
             if (tmpl) r["chat_template"] = tmpl->source();
             r["vocab_size"] = tok->vocab_size();
             r["model_max_length"] = max_seq_len;
             send_json(res, 200, r);
           }));
}

}  // namespace kiln
