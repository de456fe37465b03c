// Chat templates: the real Llama 3 / Qwen3 / Gemma 3 templates must reproduce transformers'
// renderings exactly, and ChatTemplate::from_dir must find templates where transformers does.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include <unistd.h>

#include "core/error.h"
#include "tokenizer/chat_template.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

const fs::path kFixtures = KILN_TEST_DATA;

ojson read_json(const fs::path& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in) << path;
  return ojson::parse(in);
}

void write_file(const fs::path& path, const std::string& text) {
  fs::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary) << text;
}

// A fresh, empty directory under the system temp dir, removed on destruction.
struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() /
           ("kiln_chat_template_" + std::to_string(::getpid()) + "_" + std::to_string(counter()++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  static int& counter() {
    static int n = 0;
    return n;
  }
};

void expect_fixture_chats(const std::string& name) {
  auto tmpl = ChatTemplate::from_dir(kFixtures / "tokenizers" / name);
  ASSERT_TRUE(tmpl.has_value()) << name;
  const ojson fixture = read_json(kFixtures / "tokenizers" / (name + ".json"));
  ASSERT_TRUE(fixture.contains("chat"));
  ASSERT_FALSE(fixture["chat"].empty());
  for (const auto& chat : fixture["chat"]) {
    SCOPED_TRACE(chat["messages"].dump());
    // The fixtures were rendered by transformers 5.17 with add_generation_prompt=True.
    EXPECT_EQ(tmpl->render(chat["messages"], true), chat["rendered"].get<std::string>());
  }
}

TEST(ChatTemplateFixtures, Llama3MatchesTransformers) {
  expect_fixture_chats("llama3");
}
TEST(ChatTemplateFixtures, Qwen3MatchesTransformers) {
  expect_fixture_chats("qwen3");
}
TEST(ChatTemplateFixtures, Gemma3MatchesTransformers) {
  expect_fixture_chats("gemma3");
}

// Builds the template a golden/diff case names: a tokenizer dir or a .jinja file.
ChatTemplate load_case_template_uncached(const ojson& c, const ojson& tokens, int64_t now) {
  JinjaOptions opts;
  opts.now = now;
  const std::string name = c["template"].get<std::string>();
  if (name.size() > 6 && name.substr(name.size() - 6) == ".jinja") {
    std::ifstream in(kFixtures / "chat_templates" / name, std::ios::binary);
    std::ostringstream ss;
    ss << in.rdbuf();
    const ojson& tok = tokens[name];
    return ChatTemplate(ss.str(), tok[0].get<std::string>(), tok[1].get<std::string>(), opts);
  }
  auto t = ChatTemplate::from_dir(kFixtures / name, "", opts);
  if (!t) throw Error("no chat template in " + name);
  return *t;
}

// Parsing Gemma 3's 1 MB tokenizer_config.json per case would dominate the run time.
const ChatTemplate& load_case_template(const ojson& c, const ojson& tokens, int64_t now) {
  static std::map<std::pair<std::string, int64_t>, ChatTemplate> cache;
  auto key = std::make_pair(c["template"].get<std::string>(), now);
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, load_case_template_uncached(c, tokens, now)).first;
  return it->second;
}

// bos/eos of the stand-alone templates (mirrors JINJA_TOKENS in tests/chat_template_diff.py).
ojson jinja_tokens() {
  return ojson::parse(R"({
    "chatml.jinja": ["", "<|im_end|>"],
    "zephyr.jinja": ["<s>", "</s>"],
    "phi3_style.jinja": ["<s>", "<|endoftext|>"],
    "llama31_style.jinja": ["<|begin_of_text|>", "<|eot_id|>"],
    "mistral_tools_style.jinja": ["<s>", "</s>"],
    "deepseek_style.jinja": ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"],
    "features_style.jinja": ["<bos>", "<eos>"]
  })");
}

// Conversations with tools, tool calls, reasoning, multimodal content and invalid role orders,
// rendered by jinja2 (tests/chat_template_diff.py --write-golden).
TEST(ChatTemplateGolden, MatchesJinja2) {
  const ojson golden = read_json(kFixtures / "chat_templates" / "golden.json");
  const ojson tokens = jinja_tokens();
  const int64_t now = golden["now"].get<int64_t>();
  ASSERT_GE(golden["cases"].size(), 100u);
  for (const auto& c : golden["cases"]) {
    SCOPED_TRACE(c.dump());
    const ChatTemplate tmpl = load_case_template(c, tokens, now);
    if (c.contains("rendered")) {
      EXPECT_EQ(tmpl.render(c["messages"], c["add_generation_prompt"].get<bool>(), c["extra"]),
                c["rendered"].get<std::string>());
    } else {
      EXPECT_THROW(tmpl.render(c["messages"], c["add_generation_prompt"].get<bool>(), c["extra"]),
                   Error);
    }
  }
}

TEST(ChatTemplate, Qwen3ToolsAndThinking) {
  auto tmpl = ChatTemplate::from_dir(kFixtures / "tokenizers" / "qwen3");
  ASSERT_TRUE(tmpl);
  const ojson messages = ojson::parse(R"([{"role": "user", "content": "Weather?"}])");
  ojson extra = ojson::parse(R"({"enable_thinking": false, "tools": [
      {"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}]})");
  EXPECT_EQ(tmpl->render(messages, true, extra),
            "<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the "
            "user query.\n\nYou are provided with function signatures within <tools></tools> XML "
            "tags:\n<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"w\", "
            "\"parameters\": {\"type\": \"object\"}}}\n</tools>\n\nFor each function call, return "
            "a json object with function name and arguments within <tool_call></tool_call> XML "
            "tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
            "<args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nWeather?<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n\n</think>\n\n");
  EXPECT_EQ(tmpl->render(messages, false), "<|im_start|>user\nWeather?<|im_end|>\n");
}

TEST(ChatTemplate, TemplateErrorsSurface) {
  auto gemma = ChatTemplate::from_dir(kFixtures / "tokenizers" / "gemma3");
  ASSERT_TRUE(gemma);
  const ojson bad = ojson::parse(R"([{"role": "assistant", "content": "I speak first"}])");
  try {
    gemma->render(bad, true);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(
        std::string(e.what()).find("raised an error at line 19: Conversation roles must alternate"),
        std::string::npos)
        << e.what();
  }
  EXPECT_THROW(gemma->render(ojson::object(), true), Error);  // messages must be an array
  EXPECT_THROW(ChatTemplate("{% if %}", "", ""), Error);
}

TEST(ChatTemplate, SpecialTokensAndVariables) {
  ChatTemplate t(
      "{{ bos_token }}|{{ eos_token }}|{{ bos_token is defined }}|{{ tools }}|{{ documents }}|"
      "{{ add_generation_prompt }}|{{ extra_var }}",
      "<s>", "", {});
  EXPECT_EQ(t.render(ojson::array(), true, ojson{{"extra_var", 7}}), "<s>||True|None|None|True|7");
  // Caller variables override the defaults, as transformers' keyword arguments do.
  EXPECT_EQ(t.render(ojson::array(), false, ojson{{"tools", ojson::array()}, {"bos_token", "B"}}),
            "B||True|[]|None|False|");
  ChatTemplate empty("{{ bos_token is defined }}", "", "");
  EXPECT_EQ(empty.render(nlohmann::json::array(), false), "False");
}

TEST(ChatTemplate, FromDirFindsTemplatesLikeTransformers) {
  TempDir dir;
  EXPECT_FALSE(ChatTemplate::from_dir(dir.path).has_value());  // nothing there

  // tokenizer_config.json: a string template, AddedToken-style special tokens.
  write_file(dir.path / "tokenizer_config.json", R"({
      "chat_template": "cfg:{{ bos_token }}{{ eos_token }}{{ unk_token }}{{ additional_special_tokens }}",
      "bos_token": {"__type": "AddedToken", "content": "<B>", "lstrip": false},
      "eos_token": "<E>", "unk_token": "<U>", "pad_token": null,
      "additional_special_tokens": ["<x>", {"content": "<y>"}]})");
  auto t = ChatTemplate::from_dir(dir.path);
  ASSERT_TRUE(t);
  EXPECT_EQ(t->bos_token(), "<B>");
  EXPECT_EQ(t->eos_token(), "<E>");
  EXPECT_EQ(t->render(ojson::array(), false), "cfg:<B><E><U>['<x>', '<y>']");
  EXPECT_EQ(ChatTemplate::from_dir(dir.path, "default")->render(ojson::array(), false),
            "cfg:<B><E><U>['<x>', '<y>']");
  EXPECT_THROW(ChatTemplate::from_dir(dir.path, "tool_use"), Error);

  // A list of named templates.
  write_file(dir.path / "tokenizer_config.json", R"({"chat_template": [
      {"name": "default", "template": "plain"}, {"name": "tool_use", "template": "tools"}]})");
  EXPECT_EQ(ChatTemplate::from_dir(dir.path)->render(ojson::array(), false), "plain");
  EXPECT_EQ(ChatTemplate::from_dir(dir.path, "tool_use")->render(ojson::array(), false), "tools");
  try {
    ChatTemplate::from_dir(dir.path, "rag");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no chat template named \"rag\" (available: default, "
                                         "tool_use)"),
              std::string::npos)
        << e.what();
  }
  write_file(dir.path / "tokenizer_config.json",
             R"({"chat_template": [{"name": "a", "template": "A"}]})");
  EXPECT_THROW(ChatTemplate::from_dir(dir.path), Error);  // no "default"

  // chat_template.jinja clobbers the config's template; extras come from
  // additional_chat_templates/.
  write_file(dir.path / "chat_template.jinja", "file:{{ eos_token }}\n");
  write_file(dir.path / "additional_chat_templates" / "rag.jinja", "rag");
  write_file(dir.path / "tokenizer_config.json", R"({"chat_template": "cfg", "eos_token": "<E>"})");
  EXPECT_EQ(ChatTemplate::from_dir(dir.path)->render(ojson::array(), false), "file:<E>");
  EXPECT_EQ(ChatTemplate::from_dir(dir.path, "rag")->render(ojson::array(), false), "rag");

  // chat_template.json (processor format) is the last resort.
  TempDir proc;
  write_file(proc.path / "chat_template.json", R"({"chat_template": "proc"})");
  EXPECT_EQ(ChatTemplate::from_dir(proc.path)->render(ojson::array(), false), "proc");

  // Malformed files are errors that name the file.
  TempDir broken;
  write_file(broken.path / "tokenizer_config.json", "{not json");
  try {
    ChatTemplate::from_dir(broken.path);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tokenizer_config.json: invalid JSON"), std::string::npos)
        << e.what();
  }
  write_file(broken.path / "tokenizer_config.json", R"({"chat_template": 5})");
  EXPECT_THROW(ChatTemplate::from_dir(broken.path), Error);
}

// Driver for tests/chat_template_diff.py: renders the cases in $KILN_CHAT_TEMPLATE_CASES and
// writes {ok, rendered | error} per case to $KILN_CHAT_TEMPLATE_OUT. Skipped otherwise.
TEST(ChatTemplateDiff, RenderCases) {
  const char* in_path = std::getenv("KILN_CHAT_TEMPLATE_CASES");
  const char* out_path = std::getenv("KILN_CHAT_TEMPLATE_OUT");
  if (!in_path || !out_path) GTEST_SKIP() << "driven by tests/chat_template_diff.py";
  const ojson input = read_json(in_path);
  const ojson tokens = jinja_tokens();
  const int64_t now = input["now"].get<int64_t>();
  ojson results = ojson::array();
  for (const auto& c : input["cases"]) {
    ojson r;
    try {
      const ChatTemplate tmpl = load_case_template(c, tokens, now);
      r["rendered"] =
          tmpl.render(c["messages"], c["add_generation_prompt"].get<bool>(), c["extra"]);
      r["ok"] = true;
    } catch (const Error& e) {
      r["ok"] = false;
      r["error"] = e.what();
    }
    results.push_back(std::move(r));
  }
  std::ofstream(out_path) << results.dump(-1, ' ', false, ojson::error_handler_t::replace);
}

}  // namespace
}  // namespace kiln
