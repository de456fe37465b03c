// The OpenAI-compatible HTTP server (kiln/server.h) on cpp-httplib.
//
// Threads: httplib serves each connection on a pool thread; the Scheduler runs the engine on its
// own thread and calls back there. Callbacks only copy the event into the request's Channel
// (a short lock and a notify) so the engine thread never waits on a client; the connection's
// thread turns events into JSON and writes them, and is the one that notices a client gone.
#include "server/server_impl.h"

#include <httplib.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <ctime>
#include <deque>
#include <fstream>
#include <mutex>
#include <random>
#include <thread>

#include "core/error.h"
#include "io/json.h"
#include "server/metrics.h"
#include "server/openai.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace kiln {

using server::dump;
using server::HttpError;
using server::json;
using Clock = std::chrono::steady_clock;

namespace {

double seconds(Clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

// One Scheduler event, stamped on the engine thread (so latencies exclude HTTP-side delays).
struct Item {
  int prompt = 0;  // which prompt of the HTTP request
  RequestOutput out;
  Clock::time_point t;
};

// Hands events from the engine thread to the connection's thread.
struct Channel {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Item> items;

  void push(int prompt, const RequestOutput& o) {
    Item it{prompt, o, Clock::now()};
    {
      std::lock_guard lk(mu);
      items.push_back(std::move(it));
    }
    cv.notify_one();
  }
  // Whatever arrived, waiting at most `wait` for the first event.
  std::deque<Item> take(std::chrono::milliseconds wait) {
    std::unique_lock lk(mu);
    cv.wait_for(lk, wait, [&] { return !items.empty(); });
    std::deque<Item> r;
    r.swap(items);
    return r;
  }
};

struct ChoiceState {
  std::string text;
  std::vector<int32_t> ids;
  std::vector<TokenLogprob> logprobs;
  FinishReason finish = FinishReason::None;
  std::string stop_reason;
  std::string error;  // why the engine aborted it, if it failed
  int64_t completion_tokens = 0;
  bool started = false;
  Clock::time_point last;
};

}  // namespace

namespace {

// The state of one HTTP generation request: its prompts, their n completions each, and what
// has arrived so far.
struct Job {
  Server::Impl* srv = nullptr;
  std::shared_ptr<Channel> ch = std::make_shared<Channel>();
  server::Prompts prompts;
  GenerationParams gp;
  int n = 1;
  bool echo = false;
  std::vector<uint64_t> ids;  // scheduler request id per submitted prompt
  std::vector<ChoiceState> choices;
  std::vector<int64_t> prompt_tokens, cached_tokens;
  std::vector<std::vector<std::optional<TokenLogprob>>> prompt_logprobs;
  size_t finished = 0;
  Clock::time_point t0;

  bool all_done() const { return finished == choices.size(); }

  // Submits every prompt; on a failure cancels those already queued and rethrows.
  void submit() {
    const size_t P = prompts.ids.size();
    choices.resize(P * size_t(n));
    prompt_tokens.assign(P, 0);
    cached_tokens.assign(P, 0);
    prompt_logprobs.resize(P);
    for (size_t p = 0; p < P; ++p) prompt_tokens[p] = int64_t(prompts.ids[p].size());
    t0 = Clock::now();
    try {
      for (size_t p = 0; p < P; ++p) {
        std::shared_ptr<Channel> c = ch;
        const int pi = int(p);
        ids.push_back(srv->sched->submit(prompts.ids[p], gp,
                                         [c, pi](const RequestOutput& o) { c->push(pi, o); }));
      }
    } catch (...) {
      cancel();
      throw;
    }
  }

  void cancel() {
    for (uint64_t id : ids) srv->sched->cancel(id);
  }
  // The client is gone (or the wait failed): abort what still runs, and count it as aborted
  // here since no one reads the events that follow.
  void cancel_unfinished() {
    if (all_done()) return;
    cancel();
    // Only completions of prompts the scheduler accepted: a request refused at submit (queue
    // full, 503) was never started, so it is no aborted completion.
    for (size_t c = 0; c < ids.size() * size_t(n); ++c) {
      ChoiceState& s = choices[c];
      if (s.finish != FinishReason::None) continue;
      s.finish = FinishReason::Abort;
      finished++;
      srv->metrics.count_finished(finish_reason_name(FinishReason::Abort));
    }
  }

  // Folds one event into the state and records its latencies; returns the choice index.
  size_t absorb(const Item& it) {
    const RequestOutput& o = it.out;
    const size_t c = size_t(it.prompt) * size_t(n) + size_t(o.index);
    KILN_CHECK(c < choices.size(), "scheduler event for an unknown completion index ", o.index);
    ChoiceState& s = choices[c];
    if (s.finish != FinishReason::None) return c;  // nothing follows a finish
    if (!s.started) {
      s.started = true;
      srv->metrics.observe_ttft(seconds(it.t - t0));
    } else {
      srv->metrics.observe_itl(seconds(it.t - s.last));
    }
    s.last = it.t;
    if (!o.prompt_logprobs.empty()) prompt_logprobs[size_t(it.prompt)] = o.prompt_logprobs;
    if (o.prompt_tokens > 0) prompt_tokens[size_t(it.prompt)] = o.prompt_tokens;
    cached_tokens[size_t(it.prompt)] = std::max(cached_tokens[size_t(it.prompt)], o.cached_tokens);
    s.text += o.text;
    s.ids.insert(s.ids.end(), o.token_ids.begin(), o.token_ids.end());
    s.logprobs.insert(s.logprobs.end(), o.logprobs.begin(), o.logprobs.end());
    s.completion_tokens = o.completion_tokens;
    if (o.finish != FinishReason::None) {
      s.finish = o.finish;
      s.stop_reason = o.stop_reason;
      s.error = o.error;
      finished++;
      srv->metrics.observe_e2e(seconds(it.t - t0));
      srv->metrics.count_finished(finish_reason_name(s.finish));
    }
    return c;
  }

  // A completion the engine aborted with an error (not a cancel) fails the whole response.
  void throw_engine_error() const {
    for (const ChoiceState& c : choices)
      if (!c.error.empty()) throw HttpError(500, cat("generation failed: ", c.error));
  }
  // The same for a stream, which has already sent 200: an error event, as vLLM sends it.
  static std::string error_event(const ChoiceState& s) {
    if (s.error.empty()) return "";
    return "data: " + dump(server::error_body(500, cat("generation failed: ", s.error))) + "\n\n";
  }

  json usage() const {
    int64_t pt = 0, ct = 0, cached = 0;
    for (size_t p = 0; p < prompt_tokens.size(); ++p)
      pt += prompt_tokens[p], cached += cached_tokens[p];
    for (const auto& c : choices) ct += c.completion_tokens;
    return {{"prompt_tokens", pt},
            {"completion_tokens", ct},
            {"total_tokens", pt + ct},
            {"prompt_tokens_details", {{"cached_tokens", cached}}}};
  }
};

json finish_json(const ChoiceState& s) {
  return s.finish == FinishReason::None ? json(nullptr) : json(finish_reason_name(s.finish));
}
json stop_reason_json(const ChoiceState& s) {
  return s.stop_reason.empty() ? json(nullptr) : json(s.stop_reason);
}

// A content provider that turns an exception into a closed stream: it runs inside httplib's
// writer, where nothing would catch it.
template <typename F>
httplib::ContentProviderWithoutLength guarded(F fn) {
  return [fn](size_t offset, httplib::DataSink& sink) {
    try {
      return fn(offset, sink);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "kiln: stream aborted: %s\n", e.what());
      return false;
    }
  };
}

std::string sse(const json& j) {
  return "data: " + dump(j) + "\n\n";
}

// The prompt's legacy logprobs for echo: a null first entry, then one per prompt token.
void append_prompt_logprobs(server::LegacyLogprobs& lp, const Tokenizer* tok,
                            const std::vector<int32_t>& ids,
                            const std::vector<std::optional<TokenLogprob>>& plp) {
  for (size_t i = 0; i < ids.size(); ++i) {
    const TokenLogprob* v = i < plp.size() && plp[i] ? &*plp[i] : nullptr;
    lp.append(tok, ids[i], v);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Routes

httplib::Server::Handler Server::Impl::api(bool needs_engine, bool needs_key, Handler fn) {
  return [this, needs_engine, needs_key, fn](const httplib::Request& req, httplib::Response& res) {
    try {
      if (needs_key && !cfg.api_key.empty()) {
        const std::string want = "Bearer " + cfg.api_key;
        if (req.get_header_value("Authorization") != want)
          throw HttpError(401, "invalid or missing API key (send Authorization: Bearer <key>)", "",
                          "invalid_api_key");
      }
      if (int64_t(req.body.size()) > cfg.max_request_bytes)
        throw HttpError(
            413, cat("request body over ", cfg.max_request_bytes, " bytes (--max-request-bytes)"));
      if (needs_engine && !is_ready.load(std::memory_order_acquire))
        throw HttpError(503, "the model is still loading");
      fn(req, res);
    } catch (const HttpError& e) {
      send_error(res, e.status, e.what(), e.param, e.code);
    } catch (const QueueFull& e) {
      send_error(res, 503, e.what());
    } catch (const json::exception& e) {
      send_error(res, 400, cat("invalid JSON: ", e.what()));
    } catch (const Error& e) {
      send_error(res, 400, e.what());
    } catch (const std::exception& e) {
      send_error(res, 500, e.what());
    }
  };
}

json Server::Impl::parse_body(const httplib::Request& req) {
  json body;
  try {
    body = parse_json(req.body, "the request body");
  } catch (const Error& e) {
    throw HttpError(400, cat("malformed JSON body: ", e.what()));
  }
  if (!body.is_object()) throw HttpError(400, "the JSON body must be an object");
  return body;
}

void Server::Impl::check_model(const json& body) const {
  if (auto m = server::get_string(body, "model"); m && *m != model_name)
    throw HttpError(404, cat("The model `", *m, "` does not exist."), "model", "model_not_found");
}

void Server::Impl::routes() {
  // Context length, checked here so the message names the limit in OpenAI's words.
  auto check_length = [this](size_t prompt_len, std::optional<int64_t> max_tokens,
                             const char* param) {
    const int64_t P = int64_t(prompt_len), M = max_tokens.value_or(1);
    if (P + M > max_seq_len) {
      if (max_tokens)
        throw HttpError(
            400,
            cat("This model's maximum context length is ", max_seq_len,
                " tokens. However, you requested ", P + M, " tokens (", P, " in the prompt, ", M,
                " for the completion). Please reduce the length of the prompt or "
                "max_tokens."),
            param);
      throw HttpError(400,
                      cat("This model's maximum context length is ", max_seq_len,
                          " tokens. However, your prompt has ", P,
                          " tokens, leaving no room for the completion."),
                      param);
    }
  };
  auto include_usage = [](const json& body, bool stream) {
    auto it = body.find("stream_options");
    if (it == body.end() || it->is_null()) return false;
    if (!stream) throw HttpError(400, "'stream_options' needs stream true", "stream_options");
    if (!it->is_object())
      throw HttpError(400, "'stream_options' must be an object", "stream_options");
    return server::get_bool(*it, "include_usage").value_or(false);
  };

  // Submits a job and runs it to its end on this thread (non-streaming responses).
  auto run_job = [this](Job& job) {
    begin_active();  // before submit: a draining server answers 503, not the scheduler's error
    struct Guard {
      Impl* s;
      Job& j;
      ~Guard() {
        j.cancel_unfinished();
        s->end_active();
      }
    } guard{this, job};
    job.submit();
    while (!job.all_done())
      for (const Item& it : job.ch->take(std::chrono::milliseconds(200))) job.absorb(it);
  };

  // ---- POST /v1/completions
  http.Post(
      "/v1/completions",
      api(true, true, [=, this](const httplib::Request& req, httplib::Response& res) {
        const json body = parse_body(req);
        check_model(body);
        if (auto s = server::get_string(body, "suffix"); s && !s->empty())
          throw HttpError(400, "'suffix' is not supported", "suffix");
        if (!body.contains("prompt")) throw HttpError(400, "'prompt' is required", "prompt");
        auto job = std::make_shared<Job>();
        job->srv = this;
        const bool add_special = server::get_bool(body, "add_special_tokens").value_or(true);
        job->prompts = server::parse_prompts(body["prompt"], tokenizer(), add_special);
        job->gp = server::parse_common_params(body);
        job->n = job->gp.n;
        job->echo = server::get_bool(body, "echo").value_or(false);
        // OpenAI's default is 16; an explicit null means "up to the context length".
        std::optional<int64_t> max_tokens = 16;
        if (body.contains("max_tokens")) max_tokens = server::get_int(body, "max_tokens");
        if (max_tokens && *max_tokens < 0)
          throw HttpError(400, cat("'max_tokens' must be >= 0, got ", *max_tokens), "max_tokens");
        job->gp.max_tokens = max_tokens;
        const std::optional<int64_t> logprobs = server::get_int(body, "logprobs");
        if (logprobs) {
          if (*logprobs < 0) throw HttpError(400, "'logprobs' must be >= 0", "logprobs");
          job->gp.logprobs = int(*logprobs);
          if (job->echo) job->gp.prompt_logprobs = int(*logprobs);
        }
        if (auto v = server::get_int(body, "prompt_logprobs")) job->gp.prompt_logprobs = int(*v);
        job->gp.detokenize = tok.has_value();
        const bool stream = server::get_bool(body, "stream").value_or(false);
        const bool usage_chunk = include_usage(body, stream);
        job->gp.validate(vocab_size);
        for (const auto& ids : job->prompts.ids) check_length(ids.size(), max_tokens, "prompt");
        for (const auto& ids : job->prompts.ids)
          for (int32_t t : ids)
            if (t >= vocab_size)
              throw HttpError(
                  400, cat("token id ", t, " is outside the vocabulary (size ", vocab_size, ")"),
                  "prompt");

        const std::string id = new_id("cmpl-");
        const int64_t created = int64_t(std::time(nullptr));
        const Tokenizer* tk = tokenizer();
        const bool want_lp = logprobs.has_value();

        if (!stream) {
          run_job(*job);
          job->throw_engine_error();
          json choices = json::array();
          for (size_t c = 0; c < job->choices.size(); ++c) {
            const size_t p = c / size_t(job->n);
            const ChoiceState& s = job->choices[c];
            std::string text = s.text;
            json lpj = nullptr;
            if (want_lp) {
              server::LegacyLogprobs lp;
              if (job->echo)
                append_prompt_logprobs(lp, tk, job->prompts.ids[p], job->prompt_logprobs[p]);
              for (size_t i = 0; i < s.ids.size(); ++i)
                lp.append(tk, s.ids[i], i < s.logprobs.size() ? &s.logprobs[i] : nullptr);
              lpj = lp.to_json();
            }
            if (job->echo) text = job->prompts.texts[p] + text;
            choices.push_back({{"index", c},
                               {"text", text},
                               {"logprobs", lpj},
                               {"finish_reason", finish_json(s)},
                               {"stop_reason", stop_reason_json(s)}});
          }
          send_json(res, 200,
                    {{"id", id},
                     {"object", "text_completion"},
                     {"created", created},
                     {"model", model_name},
                     {"choices", choices},
                     {"usage", job->usage()}});
          return;
        }

        // Streaming: submit now so queue-full and validation errors are still a plain JSON answer.
        begin_active();
        try {
          job->submit();
        } catch (...) {
          end_active();
          throw;
        }
        struct StreamState {
          std::vector<server::LegacyLogprobs> lps;  // per choice: text offsets carry across chunks
          std::vector<bool> echoed;
          std::deque<Item> deferred;  // echo events waiting for their prompt's logprobs
          bool done = false;
        };
        auto st = std::make_shared<StreamState>();
        st->lps.resize(job->choices.size());
        st->echoed.assign(job->choices.size(), false);
        res.set_chunked_content_provider(
            "text/event-stream",
            guarded([this, job, st, id, created, tk, want_lp, usage_chunk](
                        size_t, httplib::DataSink& sink) {
              if (st->done) return false;
              std::deque<Item> items = job->ch->take(std::chrono::milliseconds(50));
              if (items.empty() && st->deferred.empty()) return sink.is_writable();
              for (const Item& it : items) job->absorb(it);
              // Echoed prompt logprobs come with index 0's first event; hold other completions of
              // the prompt until they are there.
              // Once everything finished nothing more can come: what is held goes out as it is.
              items.insert(items.begin(), st->deferred.begin(), st->deferred.end());
              st->deferred.clear();
              std::vector<bool> held(job->choices.size(), false);  // keeps a completion's order
              std::string out;
              for (Item& it : items) {
                const size_t c = size_t(it.prompt) * size_t(job->n) + size_t(it.out.index);
                const size_t p = size_t(it.prompt);
                if (held[c] || (job->echo && !st->echoed[c] && want_lp && job->gp.prompt_logprobs &&
                                job->prompt_logprobs[p].empty() && !job->all_done())) {
                  held[c] = true;
                  st->deferred.push_back(std::move(it));
                  continue;
                }
                std::string text;
                server::LegacyLogprobs& lp = st->lps[c];
                lp.clear_keep_offset();
                if (job->echo && !st->echoed[c]) {
                  st->echoed[c] = true;
                  text = job->prompts.texts[p];
                  if (want_lp)
                    append_prompt_logprobs(lp, tk, job->prompts.ids[p], job->prompt_logprobs[p]);
                }
                text += it.out.text;
                if (want_lp)
                  for (size_t i = 0; i < it.out.token_ids.size(); ++i)
                    lp.append(tk, it.out.token_ids[i],
                              i < it.out.logprobs.size() ? &it.out.logprobs[i] : nullptr);
                const bool fin = it.out.finish != FinishReason::None;
                // A chunk per event that carries tokens, even with no text yet (a partial UTF-8
                // character, an engine without tokenizer files), as vLLM streams: clients time
                // tokens by chunks.
                if (text.empty() && !fin && lp.tokens.empty() && it.out.token_ids.empty()) continue;
                const ChoiceState& s = job->choices[c];
                out += sse({{"id", id},
                            {"object", "text_completion"},
                            {"created", created},
                            {"model", model_name},
                            {"choices",
                             {{{"index", c},
                               {"text", text},
                               {"logprobs", want_lp ? lp.to_json() : json(nullptr)},
                               {"finish_reason", fin ? finish_json(s) : json(nullptr)},
                               {"stop_reason", fin ? stop_reason_json(s) : json(nullptr)}}}}});
                if (fin) out += Job::error_event(s);
              }
              if (job->all_done() && st->deferred.empty()) {
                if (usage_chunk)
                  out += sse({{"id", id},
                              {"object", "text_completion"},
                              {"created", created},
                              {"model", model_name},
                              {"choices", json::array()},
                              {"usage", job->usage()}});
                out += "data: [DONE]\n\n";
                st->done = true;
              }
              if (!out.empty() && !sink.write(out.data(), out.size())) return false;
              if (st->done) sink.done();
              return true;
            }),
            [this, job](bool) {
              job->cancel_unfinished();  // the client went away: free its KV blocks now
              end_active();
            });
      }));

  // ---- POST /v1/chat/completions
  http.Post("/v1/chat/completions",
            api(true, true, [=, this](const httplib::Request& req, httplib::Response& res) {
              const json body = parse_body(req);
              check_model(body);
              if (!tok) throw HttpError(400, "this model has no tokenizer, so no chat", "messages");
              if (!tmpl) throw HttpError(400, "this model has no chat template", "messages");
              const json messages = server::chat_messages(body);
              json extra = json::object();
              if (auto it = body.find("chat_template_kwargs"); it != body.end() && !it->is_null()) {
                if (!it->is_object())
                  throw HttpError(400, "'chat_template_kwargs' must be an object",
                                  "chat_template_kwargs");
                extra = *it;
              }
              if (json tools = server::chat_tools(body); !tools.is_null())
                extra["tools"] = std::move(tools);
              const bool add_gen = server::get_bool(body, "add_generation_prompt").value_or(true);
              std::string rendered;
              try {
                rendered = tmpl->render(messages, add_gen, extra);
              } catch (const Error& e) {
                throw HttpError(400, cat("chat template: ", e.what()), "messages");
              }
              auto job = std::make_shared<Job>();
              job->srv = this;
              job->prompts.ids.push_back(tok->encode(rendered, false));
              job->prompts.texts.push_back(rendered);
              if (job->prompts.ids[0].empty())
                throw HttpError(400, "the rendered prompt is empty", "messages");
              job->gp = server::parse_common_params(body);
              job->n = job->gp.n;
              std::optional<int64_t> max_tokens = server::get_int(body, "max_completion_tokens");
              if (!max_tokens) max_tokens = server::get_int(body, "max_tokens");
              if (max_tokens && *max_tokens < 1)
                throw HttpError(400, cat("'max_tokens' must be >= 1, got ", *max_tokens),
                                "max_tokens");
              job->gp.max_tokens = max_tokens;
              const bool want_lp = server::get_bool(body, "logprobs").value_or(false);
              const std::optional<int64_t> top = server::get_int(body, "top_logprobs");
              if (top && !want_lp)
                throw HttpError(400, "'top_logprobs' needs logprobs true", "top_logprobs");
              if (top && (*top < 0 || *top > 20))
                throw HttpError(400, cat("'top_logprobs' must be in [0, 20], got ", *top),
                                "top_logprobs");
              if (want_lp) job->gp.logprobs = int(top.value_or(0));
              const bool stream = server::get_bool(body, "stream").value_or(false);
              const bool usage_chunk = include_usage(body, stream);
              job->gp.validate(vocab_size);
              check_length(job->prompts.ids[0].size(), max_tokens, "messages");

              const std::string id = new_id("chatcmpl-");
              const int64_t created = int64_t(std::time(nullptr));
              const Tokenizer* tk = tokenizer();

              if (!stream) {
                run_job(*job);
                job->throw_engine_error();
                json choices = json::array();
                for (size_t c = 0; c < job->choices.size(); ++c) {
                  const ChoiceState& s = job->choices[c];
                  json lpj = nullptr;
                  if (want_lp) {
                    json content = json::array();
                    for (const TokenLogprob& lp : s.logprobs)
                      content.push_back(server::chat_logprob(tk, lp));
                    lpj = {{"content", content}};
                  }
                  choices.push_back({{"index", c},
                                     {"message", {{"role", "assistant"}, {"content", s.text}}},
                                     {"logprobs", lpj},
                                     {"finish_reason", finish_json(s)},
                                     {"stop_reason", stop_reason_json(s)}});
                }
                send_json(res, 200,
                          {{"id", id},
                           {"object", "chat.completion"},
                           {"created", created},
                           {"model", model_name},
                           {"choices", choices},
                           {"usage", job->usage()}});
                return;
              }

              begin_active();
              try {
                job->submit();
              } catch (...) {
                end_active();
                throw;
              }
              struct StreamState {
                bool started = false, done = false;
              };
              auto st = std::make_shared<StreamState>();
              auto chunk = [this, id, created](json choice) {
                return sse({{"id", id},
                            {"object", "chat.completion.chunk"},
                            {"created", created},
                            {"model", model_name},
                            {"choices", json::array({std::move(choice)})}});
              };
              res.set_chunked_content_provider(
                  "text/event-stream",
                  guarded([this, job, st, id, created, tk, want_lp, usage_chunk, chunk](
                              size_t, httplib::DataSink& sink) {
                    if (st->done) return false;
                    std::string out;
                    if (!st->started) {
                      // The role comes first, before any token, as OpenAI streams it.
                      st->started = true;
                      for (size_t c = 0; c < job->choices.size(); ++c)
                        out += chunk({{"index", c},
                                      {"delta", {{"role", "assistant"}, {"content", ""}}},
                                      {"logprobs", nullptr},
                                      {"finish_reason", nullptr}});
                    } else {
                      std::deque<Item> items = job->ch->take(std::chrono::milliseconds(50));
                      if (items.empty()) return sink.is_writable();
                      for (const Item& it : items) {
                        const size_t c = job->absorb(it);
                        const ChoiceState& s = job->choices[c];
                        json lpj = nullptr;
                        if (want_lp && !it.out.logprobs.empty()) {
                          json content = json::array();
                          for (const TokenLogprob& lp : it.out.logprobs)
                            content.push_back(server::chat_logprob(tk, lp));
                          lpj = {{"content", content}};
                        }
                        if (!it.out.text.empty() || !lpj.is_null())
                          out += chunk({{"index", c},
                                        {"delta", {{"content", it.out.text}}},
                                        {"logprobs", lpj},
                                        {"finish_reason", nullptr}});
                        if (it.out.finish != FinishReason::None)
                          out += chunk({{"index", c},
                                        {"delta", json::object()},
                                        {"logprobs", nullptr},
                                        {"finish_reason", finish_json(s)},
                                        {"stop_reason", stop_reason_json(s)}});
                        if (it.out.finish != FinishReason::None) out += Job::error_event(s);
                      }
                    }
                    if (job->all_done()) {
                      if (usage_chunk)
                        out += sse({{"id", id},
                                    {"object", "chat.completion.chunk"},
                                    {"created", created},
                                    {"model", model_name},
                                    {"choices", json::array()},
                                    {"usage", job->usage()}});
                      out += "data: [DONE]\n\n";
                      st->done = true;
                    }
                    if (!out.empty() && !sink.write(out.data(), out.size())) return false;
                    if (st->done) sink.done();
                    return true;
                  }),
                  [this, job](bool) {
                    job->cancel_unfinished();
                    end_active();
                  });
            }));

  routes_info();

  // Errors httplib answers itself (unknown route 404, body over the limit 413, a request it
  // cannot parse 400) get OpenAI's body too.
  http.set_error_handler(
      httplib::Server::HandlerWithResponse([](const httplib::Request& req, httplib::Response& res) {
        if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
        std::string msg = cat("HTTP ", res.status);
        if (res.status == 404) msg = cat("no route ", req.method, " ", req.path);
        if (res.status == 413) msg = "request body too large (--max-request-bytes)";
        send_error(res, res.status, msg);
        return httplib::Server::HandlerResponse::Handled;
      }));
  http.set_exception_handler(
      [](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
        std::string msg = "internal error";
        try {
          std::rethrow_exception(ep);
        } catch (const std::exception& e) {
          msg = e.what();
        } catch (...) {
        }
        send_error(res, 500, msg);
      });
}

}  // namespace kiln
