// Text in, text out on the repo's demo model: `kiln run --prompt` and `kiln chat`.
#include "kiln/kiln.h"
#include "test_util.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace kiln::test {
namespace {

TEST(TextCli, RunPromptMatchesTokenizeGenerateDecode) {
  Tokenizer tok = Tokenizer::from_dir(demo());
  const std::string text = "Hello from kiln, the engine builder.";
  std::vector<int32_t> ids = tok.encode(text, true);
  ASSERT_EQ(ids.front(), 1);  // <s> from the post-processor
  Engine e = Engine::build(demo(), {});
  SamplingParams sp;
  sp.temperature = 0;
  sp.max_tokens = 12;
  sp.stop_token_ids = {*tok.eos_token_id()};
  std::vector<int32_t> out = e.generate(ids, sp);
  const bool eos = !out.empty() && out.back() == *tok.eos_token_id();
  std::string want =
      tok.decode(out, true) + "\n[finish_reason: " + (eos ? "stop" : "length") + "]\n";
  std::string got;
  ASSERT_EQ(run_cli("run " + demo().string() + " --prompt \"" + text +
                        "\" --max-tokens 12 --temperature 0",
                    &got),
            0)
      << got;
  EXPECT_EQ(got, want);
  // llama.cpp's short forms, -p and -n, mean the same.
  std::string short_form;
  ASSERT_EQ(
      run_cli("run " + demo().string() + " -p \"" + text + "\" -n 12 --temperature 0", &short_form),
      0)
      << short_form;
  EXPECT_EQ(short_form, want);
}

TEST(TextCli, ChatRendersHistoryAndAnswersEachTurn) {
  TempDir tmp;
  std::string out;
  ASSERT_EQ(run_cli("build " + demo().string() + " -o " + (tmp / "e").string(), &out), 0) << out;
  // The engine folder carries the tokenizer and template.
  EXPECT_TRUE(fs::exists(tmp / "e" / "tokenizer.json"));
  auto tmpl = ChatTemplate::from_dir(tmp / "e");
  ASSERT_TRUE(tmpl.has_value());
  nlohmann::json msgs = {{{"role", "user"}, {"content", "hi"}}};
  EXPECT_EQ(tmpl->render(msgs, true), "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
  std::ofstream(tmp / "in.txt") << "hi\nhow are you?\n";
  ASSERT_EQ(run_cli("chat " + (tmp / "e").string() +
                        " --system 'be brief' --max-tokens 8 --temperature 0 < " +
                        (tmp / "in.txt").string(),
                    &out),
            0)
      << out;
  EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 2) << out;
}

TEST(TextCli, TokenizeRoundTrip) {
  TempDir tmp;
  std::ofstream(tmp / "t.txt") << "kiln builds engines";
  std::string ids, text;
  ASSERT_EQ(run_cli("tokenize " + demo().string() + " < " + (tmp / "t.txt").string(), &ids), 0)
      << ids;
  std::ofstream(tmp / "ids.json") << ids;
  ASSERT_EQ(
      run_cli("tokenize " + demo().string() + " --decode < " + (tmp / "ids.json").string(), &text),
      0)
      << text;
  EXPECT_EQ(text.substr(0, 19), "kiln builds engines");
}

}  // namespace
}  // namespace kiln::test
