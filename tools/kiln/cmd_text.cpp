// Text in, text out: `kiln run --prompt` and `kiln chat`, on the serving path (the Scheduler):
// sampling settings are validated as the server validates them, every reply ends with a finish
// reason, and chat turns reuse the history's KV blocks through the prefix cache.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <iostream>
#include <mutex>
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

std::atomic<bool> g_interrupt{false};
extern "C" void on_sigint(int) {
  g_interrupt = true;
}

}  // namespace

void add_generation_args(CLI::App* c, GenerationArgs& a) {
  // llama.cpp's -n -1 (no limit) and -2 (until the context is full) both mean max_seq_len here.
  c->add_option("-n,--max-tokens", a.max_tokens,
                "tokens to generate (0, -1 or -2: up to max_seq_len, as llama.cpp's -n)")
      ->check(at_least(-2));
  c->add_flag("--ignore-eos", a.g.ignore_eos, "keep going past end-of-sequence tokens");
  c->add_option("--temperature", a.temperature, "0: greedy (default: generation_config.json)");
  c->add_option("--top-k", a.top_k, "0: off (default: generation_config.json)");
  c->add_option("--top-p", a.top_p, "in (0, 1]; 1: off (default: generation_config.json)");
  c->add_option("--min-p", a.min_p, "in [0, 1]; 0: off");
  c->add_option("--seed", a.seed, "sampling seed (default: random)");
  c->add_option("--presence-penalty", a.g.presence_penalty, "in [-2, 2]");
  c->add_option("--frequency-penalty", a.g.frequency_penalty, "in [-2, 2]");
  c->add_option("--repetition-penalty", a.repetition_penalty,
                "> 0; 1: off (default: generation_config.json)");
  c->add_option("--min-tokens", a.g.min_tokens, "no end of sequence before this many tokens");
  c->add_option("--stop", a.g.stop, "stop string (repeatable)");
}

GenerationParams GenerationArgs::params() const {
  GenerationParams p = g;
  if (temperature) p.temperature = *temperature;
  if (top_k) p.top_k = *top_k;
  if (top_p) p.top_p = *top_p;
  if (min_p) p.min_p = *min_p;
  if (seed) p.seed = *seed;
  if (repetition_penalty) p.repetition_penalty = *repetition_penalty;
  if (max_tokens > 0) p.max_tokens = max_tokens;
  return p;
}

Reply stream_reply(Scheduler& s, std::vector<int32_t> prompt, const GenerationParams& g,
                   const std::function<void(const RequestOutput&)>& on_event) {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<RequestOutput> q;
  const uint64_t id = s.submit(std::move(prompt), g, [&](const RequestOutput& o) {
    std::lock_guard<std::mutex> l(mu);
    q.push_back(o);
    cv.notify_all();
  });
  Reply r;
  bool cancelled = false;
  while (true) {
    std::unique_lock<std::mutex> l(mu);
    cv.wait_for(l, std::chrono::milliseconds(50), [&] { return !q.empty(); });
    if (g_interrupt && !cancelled) {  // Ctrl-C: stop this reply
      s.cancel(id);
      cancelled = true;
    }
    while (!q.empty()) {
      RequestOutput o = std::move(q.front());
      q.pop_front();
      l.unlock();
      r.ids.insert(r.ids.end(), o.token_ids.begin(), o.token_ids.end());
      r.text += o.text;
      if (on_event) on_event(o);
      l.lock();
      if (o.finish != FinishReason::None) {
        r.finish = o.finish;
        r.stop_reason = o.stop_reason;
        r.error = o.error;
        return r;
      }
    }
  }
}

void generate_text(Engine& e, const RuntimeConfig& rc, const std::string& text,
                   const GenerationParams& g) {
  Tokenizer tok = load_tokenizer(e);
  std::vector<int32_t> prompt = tok.encode(text, true);
  KILN_CHECK(!prompt.empty(), "the prompt is empty after tokenization");
  ServeConfig sc;
  sc.runtime = rc;
  start_engine(e, rc);
  Scheduler s(e, sc);
  const Reply r = stream_reply(s, prompt, g, [](const RequestOutput& o) {
    std::fputs(o.text.c_str(), stdout);
    std::fflush(stdout);
  });
  if (!r.text.empty() || r.error.empty()) std::printf("\n");  // an error alone is one line
  std::fflush(stdout);
  KILN_CHECK(r.error.empty(), r.error);
  print_finish(r);
}

void print_finish(const Reply& r) {
  std::fprintf(stderr, "[finish_reason: %s%s%s]\n", finish_reason_name(r.finish),
               r.stop_reason.empty() ? "" : ", stop: ", r.stop_reason.c_str());
}

void register_chat(CLI::App& app) {
  auto* c =
      app.add_subcommand("chat", "Interactive chat with the model's chat template (reads stdin)");
  static std::string model, system, dtype = "auto";
  static RuntimeConfig rc;
  static GenerationArgs ga;
  static BuildConfig bc;
  c->add_option("model", model, "kiln engine folder, Hugging Face model folder or GGUF file")
      ->required();
  c->add_option("--system", system, "system message");
  c->add_option("--dtype", dtype, "when building from an HF folder");
  add_arch_spec_arg(c, bc);
  add_generation_args(c, ga);
  ga.max_tokens = 256;
  add_runtime_args(c, rc);
  c->callback([&] {
    bc.dtype = dtype;
    Engine e = Engine::open(model, bc);
    Tokenizer tok = load_tokenizer(e);
    auto tmpl = ChatTemplate::from_dir(e.tokenizer_dir());
    KILN_CHECK(tmpl, e.tokenizer_dir().string(),
               ": no chat template (tokenizer_config.json chat_template or chat_template.jinja)");
    GenerationParams g = ga.params();
    g.max_tokens.reset();
    g.validate(e.info().vocab_size);
    start_engine(e, rc);
    ServeConfig sc;
    sc.runtime = rc;
    Scheduler s(e, sc);  // prefix caching on: each turn reuses the history's KV blocks
    const int64_t limit = e.info().max_seq_len;
    // Ctrl-C stops a reply; at the prompt it ends the program (the read is interrupted).
    struct sigaction sa {};
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, nullptr);
    nlohmann::json messages = nlohmann::json::array();
    auto reset = [&] {
      messages = nlohmann::json::array();
      if (!system.empty()) messages.push_back({{"role", "system"}, {"content", system}});
    };
    reset();
    const bool tty = isatty(0);
    std::string line;
    while (true) {
      if (tty) std::fputs("> ", stderr);
      g_interrupt = false;
      if (!std::getline(std::cin, line) || line == "/exit" || line == "/quit") break;
      if (line.empty()) continue;
      if (line == "/help") {
        std::fputs(
            "/clear  start a new conversation (forget the history)\n"
            "/exit   quit (also Ctrl-D)\n"
            "/help   this list\n"
            "Ctrl-C stops the reply being written.\n",
            stderr);
        continue;
      }
      if (line == "/clear") {
        reset();
        std::fputs("(conversation cleared)\n", stderr);
        continue;
      }
      if (line[0] == '/') {
        std::fprintf(stderr, "unknown command %s; /help lists them\n", line.c_str());
        continue;
      }
      messages.push_back({{"role", "user"}, {"content", line}});
      const std::vector<int32_t> prompt = tok.encode(tmpl->render(messages, true), false);
      const int64_t room = limit - int64_t(prompt.size());
      if (room <= 0) {
        messages.erase(messages.end() - 1);
        std::fprintf(stderr, "(the conversation is full: %zu of %lld tokens; /clear starts over)\n",
                     prompt.size(), (long long)limit);
        continue;
      }
      GenerationParams turn = g;
      turn.max_tokens = std::min<int64_t>(ga.max_tokens > 0 ? ga.max_tokens : room, room);
      const Reply r = stream_reply(s, prompt, turn, [](const RequestOutput& o) {
        std::fputs(o.text.c_str(), stdout);
        std::fflush(stdout);
      });
      std::printf("\n");
      std::fflush(stdout);
      KILN_CHECK(r.error.empty(), r.error);
      if (r.finish == FinishReason::Abort)
        std::fputs("(stopped)\n", stderr);
      else if (r.finish == FinishReason::Length && turn.max_tokens == room)
        std::fputs("(the conversation is full; /clear starts over)\n", stderr);
      messages.push_back({{"role", "assistant"}, {"content", tok.decode(r.ids, true)}});
    }
  });
}

}  // namespace kiln::cli
