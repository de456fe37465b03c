// The kiln CLI: each subcommand lives in its own cmd_*.cpp and registers itself on the app.
#pragma once

#include <CLI/CLI.hpp>
#include <string>

#include "kiln/kiln.h"

namespace kiln::cli {

void register_model_commands(CLI::App& app);  // build, run, logits, bench (cmd_model.cpp)
void register_tokenize(CLI::App& app);        // tokenize (cmd_tokenize.cpp)
void register_chat(CLI::App& app);            // chat (cmd_text.cpp)

// Starts the engine on the device `rc` names; on a GPU, reports to stderr what is resident and
// how large the KV cache is.
void start_engine(Engine& e, const RuntimeConfig& rc);
// --device, --threads, --kv-cache-fraction, --kv-cache-tokens.
void add_runtime_args(CLI::App* c, RuntimeConfig& rc);

// Tokenizes `text` with the engine's tokenizer, generates and streams the decoded text to stdout.
void generate_text(Engine& e, const RuntimeConfig& rc, const std::string& text, SamplingParams sp);

}  // namespace kiln::cli
