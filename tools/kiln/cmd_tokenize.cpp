// `kiln tokenize`: encode stdin text to ids or decode ids to text with a model's tokenizer.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <iterator>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "commands.h"
#include "core/error.h"
#include "io/gguf.h"
#include "io/json.h"
#include "tokenizer/gguf_tokenizer.h"
#include "tokenizer/tokenizer.h"

namespace kiln::cli {

namespace {

using json = nlohmann::json;

struct TokenizeArgs {
  std::string dir;
  bool special = false;
  bool decode = false;
  bool jsonl = false;
};

std::string dump(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::vector<int32_t> ids_of(const json& j, const std::string& where) {
  KILN_CHECK(j.is_array(), where, ": expected a JSON array of token ids");
  std::vector<int32_t> ids;
  ids.reserve(j.size());
  for (const json& v : j) {
    KILN_CHECK(v.is_number_integer(), where, ": token ids must be integers, got ", dump(v));
    // Never wrapped to 32 bits (2^32 + 5 is not token 5); ids past the vocabulary decode to
    // nothing, as in Hugging Face's decode.
    KILN_CHECK(v.is_number_unsigned() && v.get<uint64_t>() <= uint64_t(INT32_MAX), where,
               ": token id ", dump(v), " is outside [0, 2^31)");
    ids.push_back(int32_t(v.get<uint64_t>()));
  }
  return ids;
}

std::vector<int32_t> parse_ids(const std::string& text, const std::string& where) {
  return ids_of(parse_json(text, cat(where, " (expected a JSON array of token ids)")), where);
}

// The tokenizer of a folder, or of a GGUF file's metadata (written out as Hugging Face files into
// a temporary folder, as a build does).
Tokenizer open_tokenizer(const std::string& path) {
  if (!std::filesystem::is_regular_file(path)) return Tokenizer::from_dir(path);
  KILN_CHECK(is_gguf_file(path), path, ": not a folder or a GGUF file");
  std::string tmpl = (std::filesystem::temp_directory_path() / "kiln-tok-XXXXXX").string();
  KILN_CHECK(mkdtemp(tmpl.data()), "cannot make a temporary folder");
  struct Remove {
    std::string dir;
    ~Remove() {
      std::error_code ec;
      std::filesystem::remove_all(dir, ec);
    }
  } remove{tmpl};
  write_gguf_tokenizer(GgufFile::open(path)->metadata(), tmpl, path);
  return Tokenizer::from_dir(tmpl);
}

void run_tokenize(const TokenizeArgs& a) {
  Tokenizer tk = open_tokenizer(a.dir);
  // Encoding: --special adds the template's special tokens. Decoding: --special keeps special
  // tokens in the text (otherwise they are skipped).
  if (!a.jsonl) {
    std::string in((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
    if (a.decode) {
      std::string text = tk.decode(parse_ids(in, "stdin"), !a.special);
      std::fwrite(text.data(), 1, text.size(), stdout);
    } else {
      std::string out = dump(json(tk.encode(in, a.special))) + "\n";
      std::fwrite(out.data(), 1, out.size(), stdout);
    }
    return;
  }
  // Besides strings (or id arrays with --decode), a line may be an object that picks the
  // operation itself: {"text": "...", "special": bool} or {"ids": [...], "special": bool}. The
  // differential test uses this to run every check through one process.
  std::string line;
  for (size_t n = 1; std::getline(std::cin, line); ++n) {
    std::string where = cat("stdin line ", n);
    json j = parse_json(line, where);
    bool decode = a.decode, special = a.special;
    if (j.is_object()) {
      if (j.contains("special")) special = j["special"].get<bool>();
      decode = j.contains("ids");
      KILN_CHECK(decode || (j.contains("text") && j["text"].is_string()), where,
                 ": an object line needs \"text\" (a string) or \"ids\"");
      j = decode ? j["ids"] : j["text"];
    }
    std::string out;
    if (decode) {
      out = dump(json(tk.decode(ids_of(j, where), !special)));
    } else {
      KILN_CHECK(j.is_string(), where, ": expected a JSON string to encode");
      out = dump(json(tk.encode(j.get<std::string>(), special)));
    }
    out += '\n';
    std::fwrite(out.data(), 1, out.size(), stdout);
    std::fflush(stdout);
  }
}

}  // namespace

void register_tokenize(CLI::App& app) {
  auto args = std::make_shared<TokenizeArgs>();
  CLI::App* cmd = app.add_subcommand(
      "tokenize", "Encode stdin text to token ids (JSON array), or decode ids with --decode");
  cmd->add_option("dir", args->dir, "model, engine or tokenizer folder, or a GGUF file")
      ->required();
  cmd->add_flag("--special", args->special,
                "encode: add the special tokens of the template (e.g. <bos>); "
                "decode: keep special tokens in the text");
  cmd->add_flag("--decode", args->decode, "read a JSON array of ids and print the text");
  cmd->add_flag("--jsonl", args->jsonl,
                "one JSON value per line in and out (strings to encode, id arrays to decode)");
  cmd->callback([args] { run_tokenize(*args); });
}

}  // namespace kiln::cli
