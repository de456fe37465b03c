// libFuzzer target: tokenizer.json load, then encode / decode / streaming decode.
// Input: tokenizer.json, a NUL byte, the text to encode, and optionally a second NUL byte and a
// tokenizer_config.json (then the folder is loaded with Tokenizer::from_dir, as kiln does).
// kiln::Error is the expected rejection.
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

#include "core/error.h"
#include "fuzz_util.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer_exercise.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace fs = std::filesystem;
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  const auto [json_text, rest] = kiln::fuzz::split_once(in, '\0');
  const auto [text, config] = kiln::fuzz::split_once(rest, '\0');
  const bool with_config = rest.find('\0') != std::string_view::npos;
  const fs::path dir = kiln::fuzz::scratch_dir() / "tok";
  fs::create_directories(dir);
  const fs::path json_path = kiln::fuzz::write_file("tok/tokenizer.json", json_text);
  if (with_config)
    kiln::fuzz::write_file("tok/tokenizer_config.json", config);
  else
    fs::remove(dir / "tokenizer_config.json");
  try {
    const kiln::Tokenizer tk =
        with_config ? kiln::Tokenizer::from_dir(dir) : kiln::Tokenizer::from_json_file(json_path);
    kiln::fuzz::exercise_tokenizer(tk, text);
  } catch (const kiln::Error&) {
  }
  return 0;
}
