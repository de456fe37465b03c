// libFuzzer target: a chat template (the input is the Jinja source) parsed by ChatTemplate and
// rendered over a fixed conversation (system, user, assistant with a tool call, tool, user) with
// add_generation_prompt true and a tools list, as `/v1/chat/completions` renders it.
// kiln::Error is the expected rejection (syntax errors, sandbox limits, raise_exception).
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "fuzz_util.h"
#include "tokenizer/chat_template.h"

namespace {

const nlohmann::ordered_json& messages() {
  static const auto m = nlohmann::ordered_json::parse(R"([
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi! What's 2+2?"},
    {"role": "assistant", "content": "4", "tool_calls": [{"type": "function", "function":
      {"name": "add", "arguments": {"a": 2, "b": 2}}}]},
    {"role": "tool", "content": "4", "name": "add"},
    {"role": "user", "content": "Thanks \u00e9\u65e5 \ud83c\udf89"}
  ])");
  return m;
}

const nlohmann::ordered_json& extra() {
  static const auto e = nlohmann::ordered_json::parse(R"({
    "tools": [{"type": "function", "function": {"name": "add", "description": "Adds.",
      "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
      "b": {"type": "integer"}}, "required": ["a", "b"]}}}],
    "enable_thinking": false
  })");
  return e;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  kiln::JinjaOptions opts;
  opts.now = 1700000000;  // strftime_now() reproducible
  try {
    const kiln::ChatTemplate t(std::string(reinterpret_cast<const char*>(data), size), "<s>",
                               "</s>", opts);
    const std::string out = t.render(messages(), true, extra());
    KILN_FUZZ_ASSERT(out.size() <= opts.max_output_bytes);
  } catch (const kiln::Error&) {
  }
  return 0;
}
