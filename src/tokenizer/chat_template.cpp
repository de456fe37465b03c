#include "tokenizer/chat_template.h"

#include <fstream>
#include <map>
#include <sstream>

#include "core/error.h"
#include "io/json.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  KILN_CHECK(in, "cannot read ", path.string());
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

ojson read_json(const fs::path& path) {
  return parse_json<ojson>(read_file(path), path.string());
}

// A special token as stored by transformers: a string, an AddedToken dict, or null.
std::string token_string(const ojson& cfg, const char* key, const fs::path& file) {
  auto it = cfg.find(key);
  if (it == cfg.end() || it->is_null()) return "";
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object()) {
    auto c = it->find("content");
    if (c != it->end() && c->is_string()) return c->get<std::string>();
  }
  throw Error(cat(file.string(), ": \"", key, "\" must be a string or a {\"content\": ...} dict"));
}

// Adds a tokenizer_config.json's "chat_template" value (string or list of {name, template}).
void add_templates(const ojson& value, const fs::path& file,
                   std::map<std::string, std::string>* out) {
  if (value.is_string()) {
    (*out)["default"] = value.get<std::string>();
    return;
  }
  KILN_CHECK(value.is_array(), file.string(), ": \"chat_template\" must be a string or a list");
  for (const auto& entry : value) {
    KILN_CHECK(entry.is_object() && entry.contains("name") && entry["name"].is_string() &&
                   entry.contains("template") && entry["template"].is_string(),
               file.string(),
               ": \"chat_template\" list entries need string \"name\" and \"template\"");
    (*out)[entry["name"].get<std::string>()] = entry["template"].get<std::string>();
  }
}

template <class Json>
std::string render_impl(const JinjaTemplate& tmpl, const ojson& special_tokens,
                        const Json& messages, bool add_generation_prompt, const Json& extra) {
  KILN_CHECK(messages.is_array(), "chat messages must be a JSON array");
  KILN_CHECK(extra.is_object() || extra.is_null(), "chat template variables must be a JSON object");
  // transformers: render(messages=..., tools=..., documents=..., add_generation_prompt=...,
  // **special_tokens_map, **kwargs).
  Json ctx = Json::object();
  ctx["messages"] = messages;
  ctx["tools"] = nullptr;
  ctx["documents"] = nullptr;
  ctx["add_generation_prompt"] = add_generation_prompt;
  for (auto it = special_tokens.begin(); it != special_tokens.end(); ++it) {
    ctx[it.key()] = Json::parse(it.value().dump());
  }
  if (extra.is_object()) {
    for (auto it = extra.begin(); it != extra.end(); ++it) ctx[it.key()] = it.value();
  }
  return tmpl.render(ctx);
}

}  // namespace

ChatTemplate::ChatTemplate(std::string source, std::string bos_token, std::string eos_token,
                           JinjaOptions opts)
    : source_(std::move(source)),
      bos_token_(std::move(bos_token)),
      eos_token_(std::move(eos_token)),
      template_(source_, opts) {
  if (!bos_token_.empty()) special_tokens_["bos_token"] = bos_token_;
  if (!eos_token_.empty()) special_tokens_["eos_token"] = eos_token_;
}

std::optional<ChatTemplate> ChatTemplate::from_dir(const fs::path& dir, std::string_view name,
                                                   JinjaOptions opts) {
  const fs::path config_path = dir / "tokenizer_config.json";
  ojson config = ojson::object();
  if (fs::exists(config_path)) {
    config = read_json(config_path);
    KILN_CHECK(config.is_object(), config_path.string(), ": expected a JSON object");
  }

  std::map<std::string, std::string> templates;
  std::string origin;
  if (fs::exists(dir / "chat_template.jinja")) {
    // transformers lets a standalone template file clobber the one in tokenizer_config.json.
    origin = (dir / "chat_template.jinja").string();
    templates["default"] = read_file(dir / "chat_template.jinja");
    const fs::path extra_dir = dir / "additional_chat_templates";
    if (fs::is_directory(extra_dir)) {
      for (const auto& entry : fs::directory_iterator(extra_dir)) {
        if (entry.path().extension() == ".jinja") {
          templates[entry.path().stem().string()] = read_file(entry.path());
        }
      }
    }
  } else if (config.contains("chat_template") && !config["chat_template"].is_null()) {
    origin = config_path.string();
    add_templates(config["chat_template"], config_path, &templates);
  } else if (fs::exists(dir / "chat_template.json")) {
    origin = (dir / "chat_template.json").string();
    ojson j = read_json(dir / "chat_template.json");
    KILN_CHECK(j.is_object() && j.contains("chat_template"), origin, ": missing \"chat_template\"");
    add_templates(j["chat_template"], dir / "chat_template.json", &templates);
  }
  if (templates.empty()) return std::nullopt;

  const std::string key = name.empty() ? "default" : std::string(name);
  auto it = templates.find(key);
  if (it == templates.end()) {
    std::string names;
    for (const auto& [n, t] : templates) names += (names.empty() ? "" : ", ") + n;
    if (name.empty()) {
      throw Error(cat(
          origin, ": several chat templates and none named \"default\" (available: ", names, ")"));
    }
    throw Error(cat(origin, ": no chat template named \"", key, "\" (available: ", names, ")"));
  }

  // A template that does not parse names where it came from (the Jinja error has only a line).
  std::optional<ChatTemplate> parsed;
  try {
    parsed.emplace(it->second, token_string(config, "bos_token", config_path),
                   token_string(config, "eos_token", config_path), opts);
  } catch (const Error& e) {
    throw Error(cat(origin, ": chat template", key == "default" ? "" : cat(" \"", key, "\""), ": ",
                    e.what()));
  }
  ChatTemplate& result = *parsed;
  for (const char* k : {"unk_token", "sep_token", "pad_token", "cls_token", "mask_token"}) {
    std::string tok = token_string(config, k, config_path);
    if (!tok.empty()) result.special_tokens_[k] = tok;
  }
  if (auto extra = config.find("additional_special_tokens");
      extra != config.end() && extra->is_array()) {
    ojson list = ojson::array();
    for (const auto& t : *extra) {
      if (t.is_string()) {
        list.push_back(t);
      } else if (t.is_object() && t.contains("content") && t["content"].is_string()) {
        list.push_back(t["content"]);
      }
    }
    result.special_tokens_["additional_special_tokens"] = std::move(list);
  }
  return parsed;
}

std::string ChatTemplate::render(const nlohmann::json& messages, bool add_generation_prompt,
                                 const nlohmann::json& extra) const {
  return render_impl(template_, special_tokens_, messages, add_generation_prompt, extra);
}

std::string ChatTemplate::render(const nlohmann::ordered_json& messages, bool add_generation_prompt,
                                 const nlohmann::ordered_json& extra) const {
  return render_impl(template_, special_tokens_, messages, add_generation_prompt, extra);
}

}  // namespace kiln
