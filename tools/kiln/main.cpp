// kiln command-line entry point: parses arguments and turns every kiln::Error into one line.
#include <cstdio>
#include <exception>

#include "commands.h"
#include "core/error.h"

int main(int argc, char** argv) {
  CLI::App app{"kiln: build a Hugging Face checkpoint into an inference engine and run it"};
  app.require_subcommand(1);
  kiln::cli::register_model_commands(app);
  kiln::cli::register_tokenize(app);
  kiln::cli::register_chat(app);
  kiln::cli::register_serve(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const kiln::Error& e) {
    std::fprintf(stderr, "kiln: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kiln: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
