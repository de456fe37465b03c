// libFuzzer target: an HTTP request body as the server parses it, without an engine.
//
// The body goes through what the routes of src/server/server.cpp and server_info.cpp do before
// anything reaches the scheduler: parse_json with the nesting limit, then the /v1/completions
// (parse_prompts, parse_common_params, max_tokens / logprobs / stream_options,
// GenerationParams::validate, the context and vocabulary checks), /v1/chat/completions (message
// normalisation, chat template render, encode) and /tokenize + /detokenize steps, all with the
// demo model's tokenizer and ChatML template; then the response pieces that need no engine
// (legacy and chat logprobs of the prompt tokens, echo text, dump with invalid UTF-8 replaced).
// The route bodies are inline lambdas, so their glue is mirrored here: keep it in step.
//
// Expected rejections: server::HttpError (a 4xx answer) and kiln::Error (the routes answer 400).
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "fuzz_util.h"
#include "io/json.h"
#include "kiln/serving.h"
#include "server/openai.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace {

using json = nlohmann::json;
using kiln::server::HttpError;
namespace srv = kiln::server;

constexpr int64_t kMaxSeqLen = 2048;

struct Model {
  kiln::Tokenizer tok = kiln::Tokenizer::from_dir(KILN_FUZZ_DEMO_DIR);
  std::optional<kiln::ChatTemplate> tmpl = kiln::ChatTemplate::from_dir(KILN_FUZZ_DEMO_DIR);
  int64_t vocab = int64_t(tok.vocab_size());
};

const Model& model() {
  static const Model m;
  return m;
}

// Server::Impl::parse_body
json parse_body(std::string_view text) {
  json body;
  try {
    body = kiln::parse_json(text, "the request body");
  } catch (const kiln::Error& e) {
    throw HttpError(400, kiln::cat("malformed JSON body: ", e.what()));
  }
  if (!body.is_object()) throw HttpError(400, "the JSON body must be an object");
  if (auto m = srv::get_string(body, "model"); m && *m != "demo")
    throw HttpError(404, "no such model", "model", "model_not_found");
  return body;
}

void check_length(size_t prompt_len, std::optional<int64_t> max_tokens) {
  if (int64_t(prompt_len) + max_tokens.value_or(1) > kMaxSeqLen)
    throw HttpError(400, "context length exceeded", "prompt");
}

bool include_usage(const json& body, bool stream) {
  auto it = body.find("stream_options");
  if (it == body.end() || it->is_null()) return false;
  if (!stream) throw HttpError(400, "'stream_options' needs stream true", "stream_options");
  if (!it->is_object()) throw HttpError(400, "'stream_options' must be an object");
  return srv::get_bool(*it, "include_usage").value_or(false);
}

// Logprobs of the prompt as echo would print them, with made-up values (incl. -inf and NaN).
void fake_logprobs(const std::vector<int32_t>& ids, int top) {
  const kiln::Tokenizer* tk = &model().tok;
  srv::LegacyLogprobs lp;
  json chat = json::array();
  for (size_t i = 0; i < ids.size() && i < 64; ++i) {
    kiln::TokenLogprob t;
    t.id = ids[i];
    t.logprob = i % 3 == 0 ? -INFINITY : i % 3 == 1 ? NAN : -float(i);
    for (int k = 0; k < top && size_t(k) < ids.size(); ++k) t.top.push_back({ids[size_t(k)], -1.f});
    lp.append(tk, ids[i], i == 0 ? nullptr : &t);
    chat.push_back(srv::chat_logprob(tk, t));
  }
  (void)srv::dump(lp.to_json());
  (void)srv::dump(chat);
}

void completions(const json& body) {
  const Model& m = model();
  if (auto s = srv::get_string(body, "suffix"); s && !s->empty())
    throw HttpError(400, "'suffix' is not supported", "suffix");
  if (!body.contains("prompt")) throw HttpError(400, "'prompt' is required", "prompt");
  const bool add_special = srv::get_bool(body, "add_special_tokens").value_or(true);
  const srv::Prompts prompts = srv::parse_prompts(body["prompt"], &m.tok, add_special);
  KILN_FUZZ_ASSERT(!prompts.ids.empty() && prompts.ids.size() == prompts.texts.size());
  kiln::GenerationParams gp = srv::parse_common_params(body);
  const bool echo = srv::get_bool(body, "echo").value_or(false);
  std::optional<int64_t> max_tokens = 16;
  if (body.contains("max_tokens")) max_tokens = srv::get_int(body, "max_tokens");
  if (max_tokens && *max_tokens < 0) throw HttpError(400, "'max_tokens' must be >= 0");
  gp.max_tokens = max_tokens;
  const std::optional<int64_t> logprobs = srv::get_int(body, "logprobs");
  if (logprobs) {
    if (*logprobs < 0) throw HttpError(400, "'logprobs' must be >= 0", "logprobs");
    gp.logprobs = int(*logprobs);
    if (echo) gp.prompt_logprobs = int(*logprobs);
  }
  if (auto v = srv::get_int(body, "prompt_logprobs")) gp.prompt_logprobs = int(*v);
  const bool stream = srv::get_bool(body, "stream").value_or(false);
  (void)include_usage(body, stream);
  gp.validate(m.vocab);
  for (const auto& ids : prompts.ids) check_length(ids.size(), max_tokens);
  for (const auto& ids : prompts.ids)
    for (int32_t t : ids)
      if (t >= m.vocab) throw HttpError(400, "token id outside the vocabulary", "prompt");
  for (size_t p = 0; p < prompts.ids.size(); ++p) {
    fake_logprobs(prompts.ids[p], gp.logprobs.value_or(0) > 5 ? 5 : gp.logprobs.value_or(0));
    (void)srv::dump(json{{"text", prompts.texts[p]}});
  }
}

void chat(const json& body) {
  const Model& m = model();
  KILN_FUZZ_ASSERT(m.tmpl.has_value());
  const json messages = srv::chat_messages(body);
  json extra = json::object();
  if (auto it = body.find("chat_template_kwargs"); it != body.end() && !it->is_null()) {
    if (!it->is_object()) throw HttpError(400, "'chat_template_kwargs' must be an object");
    extra = *it;
  }
  if (auto it = body.find("tools"); it != body.end() && !it->is_null()) extra["tools"] = *it;
  const bool add_gen = srv::get_bool(body, "add_generation_prompt").value_or(true);
  const std::string rendered = m.tmpl->render(messages, add_gen, extra);
  const std::vector<int32_t> ids = m.tok.encode(rendered, false);
  if (ids.empty()) throw HttpError(400, "the rendered prompt is empty", "messages");
  kiln::GenerationParams gp = srv::parse_common_params(body);
  std::optional<int64_t> max_tokens = srv::get_int(body, "max_completion_tokens");
  if (!max_tokens) max_tokens = srv::get_int(body, "max_tokens");
  if (max_tokens && *max_tokens < 1) throw HttpError(400, "'max_tokens' must be >= 1");
  gp.max_tokens = max_tokens;
  const bool want_lp = srv::get_bool(body, "logprobs").value_or(false);
  const std::optional<int64_t> top = srv::get_int(body, "top_logprobs");
  if (top && !want_lp) throw HttpError(400, "'top_logprobs' needs logprobs true");
  if (top && (*top < 0 || *top > 20)) throw HttpError(400, "'top_logprobs' out of range");
  if (want_lp) gp.logprobs = int(top.value_or(0));
  const bool stream = srv::get_bool(body, "stream").value_or(false);
  (void)include_usage(body, stream);
  gp.validate(m.vocab);
  check_length(ids.size(), max_tokens);
  if (want_lp) fake_logprobs(ids, int(top.value_or(0)));
}

// POST /tokenize and /detokenize (src/server/server_info.cpp).
void tokenize(const json& body) {
  const Model& m = model();
  std::vector<int32_t> ids;
  if (body.contains("messages")) {
    const json& msgs = body["messages"];
    if (!msgs.is_array()) throw HttpError(400, "'messages' must be a list", "messages");
    json extra = body.value("chat_template_kwargs", json::object());
    if (!extra.is_object()) throw HttpError(400, "'chat_template_kwargs' must be an object");
    const bool add_gen = srv::get_bool(body, "add_generation_prompt").value_or(true);
    const std::string text = m.tmpl->render(msgs, add_gen, extra);
    ids = m.tok.encode(text, srv::get_bool(body, "add_special_tokens").value_or(false));
  } else {
    auto p = srv::get_string(body, "prompt");
    if (!p) throw HttpError(400, "'prompt' (a string) or 'messages' is required", "prompt");
    ids = m.tok.encode(*p, srv::get_bool(body, "add_special_tokens").value_or(true));
  }
  json r = {{"count", ids.size()}, {"tokens", ids}};
  if (srv::get_bool(body, "return_token_strs").value_or(false)) {
    json strs = json::array();
    for (int32_t t : ids) strs.push_back(m.tok.id_to_token(t));
    r["token_strs"] = strs;
  }
  (void)srv::dump(r);
}

void detokenize(const json& body) {
  const Model& m = model();
  auto it = body.find("tokens");
  if (it == body.end() || !it->is_array())
    throw HttpError(400, "'tokens' must be a list of token ids", "tokens");
  std::vector<int32_t> ids;
  for (const json& v : *it) {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= m.vocab)
      throw HttpError(400, "not a token id of this model", "tokens");
    ids.push_back(v.get<int32_t>());
  }
  (void)srv::dump(json{{"prompt", m.tok.decode(ids, false)}});
}

// One route: the answer is a response or an expected 4xx; anything else escapes (a finding).
template <typename F>
void route(F&& f) {
  try {
    f();
  } catch (const HttpError& e) {
    KILN_FUZZ_ASSERT(e.status >= 400 && e.status < 500);
    (void)srv::dump(srv::error_body(e.status, e.what(), e.param, e.code));
  } catch (const kiln::Error& e) {
    (void)srv::dump(srv::error_body(400, e.what()));
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  (void)model();  // loaded once, outside the routes: its failure is not the input's
  json body;
  try {
    body = parse_body(std::string_view(reinterpret_cast<const char*>(data), size));
  } catch (const HttpError&) {
    return 0;
  }
  if (body.contains("prompt")) route([&] { completions(body); });
  if (body.contains("messages")) route([&] { chat(body); });
  route([&] { tokenize(body); });
  if (body.contains("tokens")) route([&] { detokenize(body); });
  return 0;
}
