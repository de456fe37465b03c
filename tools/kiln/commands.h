// The kiln CLI: each subcommand lives in its own cmd_*.cpp and registers itself on the app.
#pragma once

#include <CLI/CLI.hpp>

namespace kiln::cli {

void register_model_commands(CLI::App& app);  // build, run, logits, bench (cmd_model.cpp)
void register_tokenize(CLI::App& app);        // tokenize (cmd_tokenize.cpp)

}  // namespace kiln::cli
