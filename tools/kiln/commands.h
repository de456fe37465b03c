// The kiln CLI: each subcommand lives in its own cmd_*.cpp and registers itself on the app.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "kiln/kiln.h"
#include "kiln/serving.h"

namespace kiln::cli {

// An integer option's lower bound, said plainly (CLI11's NonNegativeNumber prints the largest
// double as its upper end).
inline CLI::Validator at_least(int64_t lo) {
  return CLI::Validator(
      [lo](std::string& s) -> std::string {
        int64_t v = 0;
        if (!CLI::detail::lexical_cast(s, v)) return "'" + s + "' is not an integer";
        return v < lo ? "must be >= " + std::to_string(lo) + " (got " + s + ")" : std::string();
      },
      ">= " + std::to_string(lo));
}

void register_model_commands(CLI::App& app);  // build, run, logits, bench (cmd_model.cpp)
void register_tokenize(CLI::App& app);        // tokenize (cmd_tokenize.cpp)
void register_chat(CLI::App& app);            // chat (cmd_text.cpp)
void register_serve(CLI::App& app);           // serve (cmd_serve.cpp)
void register_eval(CLI::App& app);            // eval (cmd_eval.cpp)
// bench serve / bench offline (cmd_bench_serve.cpp), under cmd_model.cpp's `bench`.
void register_bench_subcommands(CLI::App* bench);

// A model argument (engine folder, Hugging Face folder or GGUF file) with the build options
// that apply when it is built in memory, and the runtime options.
struct ModelArgs {
  std::string model;
  BuildConfig bc;
  RuntimeConfig rc;
};
void add_model_args(CLI::App* c, ModelArgs& a);
// --arch-spec FILE, repeatable: architecture specs to add before building (docs/architectures.md).
void add_arch_spec_arg(CLI::App* c, BuildConfig& bc);

// Starts the engine on the device `rc` names; on a GPU, reports to stderr what is resident and
// how large the KV cache is.
void start_engine(Engine& e, const RuntimeConfig& rc);
// --device, --threads, --kv-cache-fraction, --kv-cache-tokens.
void add_runtime_args(CLI::App* c, RuntimeConfig& rc);

// The engine a benchmark runs: `model` opened as an engine or Hugging Face folder, or with
// `dummy` (--dummy-weights, vLLM's --load-format dummy) seeded random weights of the shape its
// config.json (the file, or the one in the folder) describes, built in memory: real shapes
// without a checkpoint or the disk an engine folder needs (a 70B fp8 engine is ~70 GB).
Engine open_bench_engine(const std::string& model, const BuildConfig& bc, bool dummy);

// Sampling and stopping flags shared by run and chat (validated by the scheduler as the
// server validates them).
struct GenerationArgs {
  GenerationParams g;
  std::optional<float> temperature, top_p, min_p, repetition_penalty;
  std::optional<int> top_k;
  std::optional<uint64_t> seed;
  int64_t max_tokens = 16;
  GenerationParams params() const;
};
void add_generation_args(CLI::App* c, GenerationArgs& a);

// One reply streamed through the scheduler; Ctrl-C (SIGINT, when chat installed its handler)
// cancels it.
struct Reply {
  std::vector<int32_t> ids;
  std::string text;
  FinishReason finish = FinishReason::None;
  std::string stop_reason, error;
};
Reply stream_reply(Scheduler& s, std::vector<int32_t> prompt, const GenerationParams& g,
                   const std::function<void(const RequestOutput&)>& on_event);
// "[finish_reason: ...]" on stderr.
void print_finish(const Reply& r);

// Tokenizes `text` with the engine's tokenizer, generates and streams the decoded text to stdout.
void generate_text(Engine& e, const RuntimeConfig& rc, const std::string& text,
                   const GenerationParams& g);

}  // namespace kiln::cli
