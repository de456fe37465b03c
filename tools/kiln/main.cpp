// kiln command-line entry point: parses arguments and turns every kiln::Error into one line.
#include <cstdio>
#include <exception>
#include <new>
#include <stdexcept>
#include <string>

#include "commands.h"
#include "core/error.h"
#include "kiln/kiln.h"

namespace {

// One line on stderr, whatever the message holds.
int fail(std::string msg) {
  for (char& c : msg)
    if (c == '\n' || c == '\r') c = ' ';
  std::fprintf(stderr, "kiln: error: %s\n", msg.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"kiln: build a Hugging Face checkpoint into an inference engine and run it"};
  app.require_subcommand(1);
  // --help shows each option's default (subcommands inherit this when they are created).
  app.option_defaults()->always_capture_default();
  app.set_version_flag("--version", [] {
    const kiln::BuildInfo b = kiln::build_info();
    return kiln::cat("kiln ", b.version, " (commit ", b.commit, "), engine format ",
                     b.engine_format,
                     b.cuda.empty() ? std::string(", built without CUDA") : ", " + b.cuda);
  });
  kiln::cli::register_model_commands(app);
  kiln::cli::register_tokenize(app);
  kiln::cli::register_chat(app);
  kiln::cli::register_serve(app);
  kiln::cli::register_eval(app);
  try {
    // A rank > 0 of a multi-process engine (started by kiln itself or by mpirun) takes its
    // model and orders from rank 0, whatever its command line says.
    if (kiln::serve_as_rank()) return 0;
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    // Argument errors as every other error: one line, exit status 1 (CLI11 would print two
    // lines and exit with its own codes).
    return fail(std::string(e.what()) + " (kiln --help lists the options)");
  } catch (const kiln::Error& e) {
    return fail(e.what());
  } catch (const std::bad_alloc&) {
    // A size that slipped past the checks, or a machine too small for what was asked.
    return fail("out of memory: the input asks for more than this machine can allocate");
  } catch (const std::length_error& e) {
    return fail(std::string("a size in the input is too large (") + e.what() + ")");
  } catch (const std::exception& e) {
    return fail(e.what());
  }
  return 0;
}
