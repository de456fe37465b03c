// Hugging Face chat templates: turns a list of chat messages into the prompt string exactly as
// transformers' tokenizer.apply_chat_template(..., tokenize=False) does.
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "tokenizer/jinja.h"

namespace kiln {

class ChatTemplate {
 public:
  // Loads the template the way transformers does: <dir>/chat_template.jinja (with named extras
  // in <dir>/additional_chat_templates/<name>.jinja) takes precedence over tokenizer_config.json's
  // "chat_template" (a string, or a list of {"name", "template"}), then <dir>/chat_template.json
  // (processor format). `name` picks a named template; empty means "default". Special tokens
  // (bos_token, eos_token, unk/pad/sep/cls/mask_token, additional_special_tokens; plain strings
  // or AddedToken {"content": ...} dicts) come from tokenizer_config.json.
  // Returns nullopt when the directory has no template; throws kiln::Error for malformed files, a
  // missing named template or template syntax errors.
  static std::optional<ChatTemplate> from_dir(const std::filesystem::path& dir,
                                              std::string_view name = "", JinjaOptions opts = {});

  // An empty bos/eos token is left undefined in the template, as transformers does for unset
  // special tokens. Throws kiln::Error on template syntax errors.
  ChatTemplate(std::string source, std::string bos_token, std::string eos_token,
               JinjaOptions opts = {});

  // `messages`: JSON array of {"role", "content", ...}. `extra`: additional template variables
  // (tools, documents, enable_thinking, date_string, ...), which override the defaults. The
  // template also sees `tools` and `documents` (None unless given), `add_generation_prompt` and
  // the special tokens. Pass ordered_json when tool schemas must keep their key order (Python
  // dicts do; nlohmann::json sorts keys). Throws kiln::Error when rendering fails, including the
  // template's own raise_exception().
  std::string render(const nlohmann::json& messages, bool add_generation_prompt,
                     const nlohmann::json& extra = nlohmann::json::object()) const;
  std::string render(const nlohmann::ordered_json& messages, bool add_generation_prompt,
                     const nlohmann::ordered_json& extra = nlohmann::ordered_json::object()) const;

  const std::string& source() const { return source_; }
  const std::string& bos_token() const { return bos_token_; }
  const std::string& eos_token() const { return eos_token_; }

 private:
  std::string source_;
  std::string bos_token_;
  std::string eos_token_;
  // Special tokens passed as template variables (bos/eos plus those from_dir found).
  nlohmann::ordered_json special_tokens_ = nlohmann::ordered_json::object();
  JinjaTemplate template_;
};

}  // namespace kiln
