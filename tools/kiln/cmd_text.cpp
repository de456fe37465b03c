// Text in, text out: `kiln run --prompt` and `kiln chat`.
#include <unistd.h>

#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "core/error.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace kiln::cli {

namespace {

Tokenizer load_tokenizer(const Engine& e) {
  const auto dir = e.tokenizer_dir();
  KILN_CHECK(!dir.empty(), "this engine has no tokenizer files; use --prompt-ids");
  return Tokenizer::from_dir(dir);
}

// Streams decoded text as tokens arrive; returns the ids generated.
std::vector<int32_t> stream(Engine& e, const Tokenizer& tok, const std::vector<int32_t>& prompt,
                            SamplingParams sp) {
  if (auto eos = tok.eos_token_id()) sp.stop_token_ids.push_back(*eos);
  KILN_CHECK(int64_t(prompt.size()) <= e.info().max_seq_len, "prompt has ", prompt.size(),
             " tokens but the engine allows at most ", e.info().max_seq_len, " (max_seq_len)");
  StreamDecoder dec(tok, true);
  auto out = e.generate(prompt, sp, [&](int32_t t) {
    std::fputs(dec.push(t).c_str(), stdout);
    std::fflush(stdout);
    return true;
  });
  std::fputs(dec.flush().c_str(), stdout);
  return out;
}

}  // namespace

void generate_text(Engine& e, const RuntimeConfig& rc, const std::string& text, SamplingParams sp) {
  Tokenizer tok = load_tokenizer(e);
  std::vector<int32_t> prompt = tok.encode(text, true);
  KILN_CHECK(!prompt.empty(), "the prompt is empty after tokenization");
  start_engine(e, rc);
  stream(e, tok, prompt, sp);
  std::printf("\n");
}

void register_chat(CLI::App& app) {
  auto* c =
      app.add_subcommand("chat", "Interactive chat with the model's chat template (reads stdin)");
  static std::string model, system, dtype = "auto";
  static RuntimeConfig rc;
  static SamplingParams sp;
  static float temperature = -1;
  c->add_option("model", model, "kiln engine folder or Hugging Face model folder")->required();
  c->add_option("--system", system, "system message");
  c->add_option("--max-tokens", sp.max_tokens, "tokens per reply")->default_val(256);
  c->add_option("--temperature", temperature, "0: greedy (default: generation_config.json)");
  c->add_option("--seed", sp.seed, "sampling seed");
  c->add_option("--dtype", dtype, "when building from an HF folder");
  add_runtime_args(c, rc);
  c->callback([&] {
    if (temperature >= 0) sp.temperature = temperature;
    BuildConfig bc;
    bc.dtype = dtype;
    Engine e = Engine::open(model, bc);
    Tokenizer tok = load_tokenizer(e);
    auto tmpl = ChatTemplate::from_dir(e.tokenizer_dir());
    KILN_CHECK(tmpl, e.tokenizer_dir().string(),
               ": no chat template (tokenizer_config.json chat_template or chat_template.jinja)");
    start_engine(e, rc);
    nlohmann::json messages = nlohmann::json::array();
    if (!system.empty()) messages.push_back({{"role", "system"}, {"content", system}});
    const bool tty = isatty(0);
    std::string line;
    while (true) {
      if (tty) std::fputs("> ", stderr);
      if (!std::getline(std::cin, line) || line == "/exit") break;
      if (line.empty()) continue;
      messages.push_back({{"role", "user"}, {"content", line}});
      const std::string rendered = tmpl->render(messages, true);
      std::vector<int32_t> prompt = tok.encode(rendered, false);
      std::vector<int32_t> out = stream(e, tok, prompt, sp);
      std::printf("\n");
      std::fflush(stdout);
      messages.push_back({{"role", "assistant"}, {"content", tok.decode(out, true)}});
    }
  });
}

}  // namespace kiln::cli
