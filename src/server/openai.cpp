// OpenAI / vLLM request parsing and response pieces (see openai.h).
#include "server/openai.h"

#include <cmath>
#include <limits>

#include "core/error.h"

namespace kiln::server {

namespace {

const char* error_type(int status) {
  switch (status) {
    case 400:
      return "invalid_request_error";
    case 401:
      return "authentication_error";
    case 404:
      return "not_found_error";
    case 413:
      return "invalid_request_error";
    case 503:
      return "server_error";
    default:
      return status >= 500 ? "server_error" : "invalid_request_error";
  }
}

[[noreturn]] void bad_type(const char* key, const char* expected, const json& v) {
  throw HttpError(400, cat("'", key, "' must be ", expected, ", got ", dump(v)), key);
}

// Token ids from a JSON array; `what` names the field in errors.
std::vector<int32_t> id_list(const json& a, const char* what) {
  std::vector<int32_t> ids;
  ids.reserve(a.size());
  for (const json& v : a) {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 ||
        v.get<int64_t>() > std::numeric_limits<int32_t>::max())
      throw HttpError(
          400, cat("'", what, "' token ids must be non-negative integers, got ", dump(v)), what);
    ids.push_back(v.get<int32_t>());
  }
  return ids;
}

std::vector<std::string> string_or_list(const json& body, const char* key) {
  std::vector<std::string> r;
  if (!body.contains(key) || body[key].is_null()) return r;
  const json& v = body[key];
  if (v.is_string()) {
    r.push_back(v.get<std::string>());
    return r;
  }
  if (!v.is_array()) bad_type(key, "a string or a list of strings", v);
  for (const json& s : v) {
    if (!s.is_string()) bad_type(key, "a string or a list of strings", v);
    r.push_back(s.get<std::string>());
  }
  return r;
}

json bytes_of(const std::string& s) {
  json b = json::array();
  for (unsigned char c : s) b.push_back(int(c));
  return b;
}

}  // namespace

json error_body(int status, const std::string& message, const std::string& param,
                const std::string& code) {
  return {{"error",
           {{"message", message},
            {"type", error_type(status)},
            {"param", param.empty() ? json(nullptr) : json(param)},
            {"code", code.empty() ? json(status) : json(code)}}}};
}

std::string dump(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

json chat_messages(const json& body) {
  auto mit = body.find("messages");
  if (mit == body.end() || !mit->is_array() || mit->empty())
    throw HttpError(400, "'messages' must be a non-empty list", "messages");
  json messages = json::array();
  for (const json& m : *mit) {
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string())
      throw HttpError(400, "each message needs a string 'role'", "messages");
    json mm = m;
    if (m.contains("content") && m["content"].is_array()) {
      std::string text;
      for (const json& part : m["content"]) {
        if (!part.is_object() || !part.contains("type") || part["type"] != "text" ||
            !part.contains("text") || !part["text"].is_string())
          throw HttpError(400, "only text content parts are supported", "messages");
        if (!text.empty()) text += "\n";
        text += part["text"].get<std::string>();
      }
      mm["content"] = text;
    } else if (m.contains("content") && !m["content"].is_string() && !m["content"].is_null()) {
      throw HttpError(400, "message 'content' must be a string or a list of parts", "messages");
    }
    messages.push_back(std::move(mm));
  }
  return messages;
}

json chat_tools(const json& body) {
  auto it = body.find("tools");
  if (it == body.end() || it->is_null()) return nullptr;
  if (!it->is_array()) bad_type("tools", "a list of tools", *it);
  for (const json& t : *it)
    if (!t.is_object() || t.value("type", json()) != "function" || !t.contains("function") ||
        !t["function"].is_object() || !t["function"].contains("name") ||
        !t["function"]["name"].is_string())
      throw HttpError(400,
                      cat("each tool must be {\"type\": \"function\", \"function\": {\"name\": "
                          "...}}, got ",
                          dump(t)),
                      "tools");
  if (auto c = body.find("tool_choice");
      c != body.end() && !c->is_null() && !(c->is_string() && (*c == "auto" || *c == "none")))
    throw HttpError(400,
                    cat("'tool_choice' ", dump(*c),
                        " is not supported: kiln does not constrain decoding to a tool call (use "
                        "\"auto\" or \"none\")"),
                    "tool_choice");
  return *it;
}

std::optional<int64_t> get_int(const json& body, const char* key) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (it->is_number_integer()) return it->get<int64_t>();
  // 16.0 is an integer to Python clients that build requests from floats.
  if (it->is_number_float()) {
    const double d = it->get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9e15) return int64_t(d);
  }
  bad_type(key, "an integer", *it);
}

std::optional<double> get_number(const json& body, const char* key) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_number()) bad_type(key, "a number", *it);
  return it->get<double>();
}

std::optional<bool> get_bool(const json& body, const char* key) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_boolean()) bad_type(key, "a boolean", *it);
  return it->get<bool>();
}

std::optional<std::string> get_string(const json& body, const char* key) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_string()) bad_type(key, "a string", *it);
  return it->get<std::string>();
}

GenerationParams parse_common_params(const json& body) {
  GenerationParams p;
  if (auto v = get_number(body, "temperature")) p.temperature = float(*v);
  if (auto v = get_number(body, "top_p")) p.top_p = float(*v);
  if (auto v = get_int(body, "top_k")) {
    if (*v < -1 || *v > std::numeric_limits<int>::max())
      throw HttpError(400, cat("'top_k' must be -1, 0 or positive, got ", *v), "top_k");
    p.top_k = int(*v);
  }
  if (auto v = get_number(body, "min_p")) p.min_p = float(*v);
  if (auto v = get_int(body, "seed")) {
    // OpenAI allows any 64-bit integer; a negative seed maps onto the unsigned stream space.
    p.seed = uint64_t(*v);
  }
  if (auto v = get_number(body, "presence_penalty")) p.presence_penalty = float(*v);
  if (auto v = get_number(body, "frequency_penalty")) p.frequency_penalty = float(*v);
  if (auto v = get_number(body, "repetition_penalty")) p.repetition_penalty = float(*v);
  if (auto it = body.find("logit_bias"); it != body.end() && !it->is_null()) {
    if (!it->is_object()) bad_type("logit_bias", "an object of token id -> bias", *it);
    for (const auto& [k, v] : it->items()) {
      char* end = nullptr;
      const long long id = std::strtoll(k.c_str(), &end, 10);
      if (k.empty() || *end || id < 0 || id > std::numeric_limits<int32_t>::max())
        throw HttpError(400, cat("'logit_bias' keys must be token ids, got '", k, "'"),
                        "logit_bias");
      if (!v.is_number()) bad_type("logit_bias", "an object of token id -> number", *it);
      p.logit_bias.emplace_back(int32_t(id), v.get<float>());
    }
  }
  p.stop = string_or_list(body, "stop");
  if (auto it = body.find("stop_token_ids"); it != body.end() && !it->is_null()) {
    if (!it->is_array()) bad_type("stop_token_ids", "a list of token ids", *it);
    p.stop_token_ids = id_list(*it, "stop_token_ids");
  }
  if (auto v = get_bool(body, "ignore_eos")) p.ignore_eos = *v;
  if (auto v = get_int(body, "min_tokens")) p.min_tokens = *v;
  if (auto v = get_int(body, "n")) {
    if (*v < 1 || *v > 1024) throw HttpError(400, cat("'n' must be in [1, 1024], got ", *v), "n");
    p.n = int(*v);
  }
  if (auto v = get_int(body, "best_of"); v && *v != p.n)
    throw HttpError(400, "'best_of' other than n is not supported", "best_of");
  if (auto v = get_bool(body, "skip_special_tokens")) p.skip_special_tokens = *v;
  if (auto v = get_bool(body, "include_stop_str_in_output")) p.include_stop_str_in_output = *v;
  if (auto it = body.find("response_format"); it != body.end() && !it->is_null()) {
    if (!it->is_object() || !it->contains("type") || !(*it)["type"].is_string())
      bad_type("response_format", "an object with a string 'type'", *it);
    if ((*it)["type"] != "text")
      throw HttpError(400,
                      cat("'response_format' of type '", (*it)["type"].get<std::string>(),
                          "' is not supported: kiln has no structured (guided) decoding"),
                      "response_format");
  }
  for (const char* k :
       {"guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs"})
    if (auto it = body.find(k); it != body.end() && !it->is_null())
      throw HttpError(400, cat("'", k, "' is not supported: kiln has no guided decoding"), k);
  return p;
}

Prompts parse_prompts(const json& prompt, const Tokenizer* tok, bool add_special_tokens) {
  Prompts r;
  auto add_text = [&](const std::string& s) {
    if (!tok) throw HttpError(400, "this model has no tokenizer: send token ids", "prompt");
    std::vector<int32_t> ids;
    try {
      ids = tok->encode(s, add_special_tokens);
    } catch (const Error& e) {
      throw HttpError(400, cat("'prompt': ", e.what()), "prompt");
    }
    r.ids.push_back(std::move(ids));
    r.texts.push_back(s);
  };
  auto add_ids = [&](const json& a) {
    r.ids.push_back(id_list(a, "prompt"));
    r.texts.push_back(tok ? tok->decode(r.ids.back(), false) : std::string());
  };
  if (prompt.is_string()) {
    add_text(prompt.get<std::string>());
  } else if (prompt.is_array() && !prompt.empty()) {
    if (prompt[0].is_string()) {
      for (const json& s : prompt) {
        if (!s.is_string()) bad_type("prompt", "a list of strings", prompt);
        add_text(s.get<std::string>());
      }
    } else if (prompt[0].is_array()) {
      for (const json& a : prompt) {
        if (!a.is_array()) bad_type("prompt", "a list of token id lists", prompt);
        add_ids(a);
      }
    } else {
      add_ids(prompt);
    }
  } else {
    throw HttpError(400,
                    "'prompt' must be a string, a list of strings, a list of token ids or a list "
                    "of token id lists (non-empty)",
                    "prompt");
  }
  for (const auto& ids : r.ids)
    if (ids.empty()) throw HttpError(400, "'prompt' is empty (no tokens)", "prompt");
  return r;
}

std::string token_text(const Tokenizer* tok, int32_t id) {
  if (!tok) return cat("token_id:", id);
  const int32_t one[1] = {id};
  return tok->decode(one, false);
}

double finite_logprob(float lp) {
  return std::isfinite(lp) ? double(lp) : -9999.0;
}

int64_t utf8_length(const std::string& s) {
  int64_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

void LegacyLogprobs::append(const Tokenizer* tok, int32_t id, const TokenLogprob* lp) {
  const std::string s = token_text(tok, id);
  tokens.push_back(s);
  text_offset.push_back(offset);
  offset += utf8_length(s);
  if (!lp) {
    token_logprobs.push_back(nullptr);
    top_logprobs.push_back(nullptr);
    return;
  }
  token_logprobs.push_back(finite_logprob(lp->logprob));
  json top = json::object();
  for (const auto& [tid, tlp] : lp->top) {
    const std::string ts = token_text(tok, tid);
    if (!top.contains(ts)) top[ts] = finite_logprob(tlp);  // most likely first: keep the best
  }
  top_logprobs.push_back(std::move(top));
}

json LegacyLogprobs::to_json() const {
  return {{"tokens", tokens},
          {"token_logprobs", token_logprobs},
          {"top_logprobs", top_logprobs},
          {"text_offset", text_offset}};
}

void LegacyLogprobs::clear_keep_offset() {
  tokens = json::array();
  token_logprobs = json::array();
  top_logprobs = json::array();
  text_offset = json::array();
}

json chat_logprob(const Tokenizer* tok, const TokenLogprob& lp) {
  const std::string s = token_text(tok, lp.id);
  json top = json::array();
  for (const auto& [tid, tlp] : lp.top) {
    const std::string ts = token_text(tok, tid);
    top.push_back({{"token", ts}, {"logprob", finite_logprob(tlp)}, {"bytes", bytes_of(ts)}});
  }
  return {{"token", s},
          {"logprob", finite_logprob(lp.logprob)},
          {"bytes", bytes_of(s)},
          {"top_logprobs", std::move(top)}};
}

}  // namespace kiln::server
