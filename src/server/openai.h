// OpenAI / vLLM request parsing and response pieces for the HTTP server (src/server/server.cpp).
// Kept apart from the HTTP plumbing so the mapping JSON <-> GenerationParams reads in one place.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "kiln/serving.h"
#include "tokenizer/tokenizer.h"

namespace kiln::server {

using json = nlohmann::json;

// An error answered with OpenAI's body {"error": {"message", "type", "param", "code"}}.
struct HttpError : std::runtime_error {
  HttpError(int status, std::string message, std::string param = "", std::string code = "")
      : std::runtime_error(std::move(message)),
        status(status),
        param(std::move(param)),
        code(std::move(code)) {}
  int status;
  std::string param;  // the request field at fault, if any
  std::string code;   // OpenAI's machine-readable code, if any
};

// {"error": {...}} for `status` (the type follows OpenAI: invalid_request_error,
// authentication_error, not_found_error, server_error...).
json error_body(int status, const std::string& message, const std::string& param = "",
                const std::string& code = "");

// Serializes with invalid UTF-8 replaced (token strings of partial characters), never throwing.
std::string dump(const json& j);

// The request's "messages", checked, with text-part lists joined into one string (templates of
// text-only models expect strings). Throws HttpError 400 naming "messages". Roles are any string,
// as vLLM allows (templates define their own, e.g. Llama 3.1's "ipython").
json chat_messages(const json& body);

// The request's "tools" for the chat template (null when absent), each checked to be a function
// tool with a name. kiln puts tools in the prompt but does not constrain decoding, so a
// "tool_choice" that would force a call ("required" or a named function) is refused.
json chat_tools(const json& body);

// Reads `key` of `body` (absent or null: nullopt); a value of the wrong type is a 400 naming it.
std::optional<int64_t> get_int(const json& body, const char* key);
std::optional<double> get_number(const json& body, const char* key);
std::optional<bool> get_bool(const json& body, const char* key);
std::optional<std::string> get_string(const json& body, const char* key);

// The sampling fields both endpoints share (temperature, top_p, top_k, min_p, seed, penalties,
// logit_bias, stop, stop_token_ids, ignore_eos, min_tokens, n, skip_special_tokens,
// include_stop_str_in_output). max_tokens and logprobs differ per endpoint and are read there.
// Fields asking for structured output (response_format other than "text", vLLM's guided_*)
// are refused: kiln has no guided decoding, and answering as if they were honoured is wrong.
GenerationParams parse_common_params(const json& body);

// A completions prompt: string, list of strings, token id list or list of id lists. Strings are
// tokenized with `tok` (add_special_tokens as given); `texts` gets each prompt's text for echo
// (the string itself, or the ids decoded).
struct Prompts {
  std::vector<std::vector<int32_t>> ids;
  std::vector<std::string> texts;
};
Prompts parse_prompts(const json& prompt, const Tokenizer* tok, bool add_special_tokens);

// Token text for logprobs (one token decoded alone, special tokens kept).
std::string token_text(const Tokenizer* tok, int32_t id);
// Log-probabilities as JSON numbers: -inf (a masked token) becomes -9999 like vLLM, since JSON
// has no infinity.
double finite_logprob(float lp);
// Length in Unicode code points (Python's len, which text_offset counts in).
int64_t utf8_length(const std::string& s);

// Legacy completions logprobs {"tokens", "token_logprobs", "top_logprobs", "text_offset"}:
// append() adds tokens (a missing logprob, the first prompt token, gives nulls).
struct LegacyLogprobs {
  json tokens = json::array(), token_logprobs = json::array(), top_logprobs = json::array(),
       text_offset = json::array();
  int64_t offset = 0;  // text_offset of the next token
  void append(const Tokenizer* tok, int32_t id, const TokenLogprob* lp);
  json to_json() const;
  void clear_keep_offset();  // a streamed chunk's logprobs restart, offsets go on
};

// One chat-format logprobs entry {"token", "logprob", "bytes", "top_logprobs": [...]}.
json chat_logprob(const Tokenizer* tok, const TokenLogprob& lp);

}  // namespace kiln::server
