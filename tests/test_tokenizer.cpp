// Tokenizer tests: every fixture case of Llama 3, Qwen3 and Gemma 3 must match what Hugging Face
// produced, plus streaming decode, error reporting, and small component checks.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "core/error.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/tokenizer_impl.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

const fs::path kData = KILN_TEST_DATA;

// Decompressed copies of the fixture tokenizers, made once per test process.
class FixtureDir {
 public:
  static FixtureDir& get() {
    static FixtureDir d;
    return d;
  }
  // Returns a directory holding tokenizer.json + tokenizer_config.json for `name`; fails the
  // test (never skips) when the fixture is missing.
  fs::path prepare(const std::string& name) {
    auto it = done_.find(name);
    if (it != done_.end()) return it->second;
    fs::path src = kData / "tokenizers" / name;
    EXPECT_TRUE(fs::exists(src / "tokenizer.json.xz")) << "missing fixture " << src;
    EXPECT_TRUE(fs::exists(src / "tokenizer_config.json")) << "missing fixture " << src;
    fs::path dst = root_ / name;
    fs::create_directories(dst);
    std::string cmd = "xz -dc '" + (src / "tokenizer.json.xz").string() + "' > '" +
                      (dst / "tokenizer.json").string() + "'";
    EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
    fs::copy_file(src / "tokenizer_config.json", dst / "tokenizer_config.json",
                  fs::copy_options::overwrite_existing);
    done_[name] = dst;
    return dst;
  }
  const fs::path& root() const { return root_; }
  ~FixtureDir() {
    std::error_code ec;
    fs::remove_all(root_, ec);
  }

 private:
  FixtureDir() {
    root_ = fs::temp_directory_path() / ("kiln_tok_test_" + std::to_string(getpid()));
    fs::create_directories(root_);
  }
  fs::path root_;
  std::map<std::string, fs::path> done_;
};

const kiln::Tokenizer& tokenizer(const std::string& name) {
  static std::map<std::string, kiln::Tokenizer> cache;
  auto it = cache.find(name);
  if (it == cache.end())
    it = cache.emplace(name, kiln::Tokenizer::from_dir(FixtureDir::get().prepare(name))).first;
  return it->second;
}

json cases(const std::string& name) {
  fs::path p = kData / "tokenizers" / (name + ".json");
  std::ifstream f(p);
  EXPECT_TRUE(f.good()) << "missing fixture " << p;
  if (!f) return json::array();
  return json::parse(f)["cases"];
}

std::vector<int32_t> ids_of(const json& j) {
  return j.get<std::vector<int32_t>>();
}

bool valid_utf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    auto c = static_cast<unsigned char>(s[i]);
    size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    for (size_t k = 1; k < n; ++k)
      if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
    i += n;
  }
  return true;
}

class TokenizerFixture : public ::testing::TestWithParam<std::string> {};

TEST_P(TokenizerFixture, EncodeMatchesHuggingFace) {
  const auto& tk = tokenizer(GetParam());
  json cs = cases(GetParam());
  ASSERT_EQ(cs.size(), 198u);
  int bad = 0;
  for (const json& c : cs) {
    std::string text = c["text"];
    auto got = tk.encode(text, false);
    if (got != ids_of(c["ids"])) {
      ++bad;
      ADD_FAILURE() << "encode(special=false) mismatch for " << json(text).dump().substr(0, 200);
    }
    got = tk.encode(text, true);
    if (got != ids_of(c["ids_with_special"])) {
      ++bad;
      ADD_FAILURE() << "encode(special=true) mismatch for " << json(text).dump().substr(0, 200);
    }
  }
  EXPECT_EQ(bad, 0);
}

// The fixtures' `decoded` is transformers' tokenizer.decode(ids) with its default
// skip_special_tokens=False (special tokens written in the text come back verbatim).
TEST_P(TokenizerFixture, DecodeMatchesHuggingFace) {
  const auto& tk = tokenizer(GetParam());
  int bad = 0;
  for (const json& c : cases(GetParam())) {
    auto ids = ids_of(c["ids"]);
    std::string got = tk.decode(ids, false);
    if (got != c["decoded"].get<std::string>()) {
      ++bad;
      ADD_FAILURE() << "decode mismatch for " << c["text"].dump().substr(0, 200) << ": got "
                    << json(got).dump().substr(0, 200);
    }
    // Dropping the template's special tokens gives the same text back.
    auto with = ids_of(c["ids_with_special"]);
    std::string text = c["text"];
    if (text.find("<|") == std::string::npos && text.find("<start_of_turn>") == std::string::npos)
      EXPECT_EQ(tk.decode(with, true), got);
  }
  EXPECT_EQ(bad, 0);
}

TEST_P(TokenizerFixture, StreamDecoderMatchesDecode) {
  const auto& tk = tokenizer(GetParam());
  for (const json& c : cases(GetParam())) {
    auto ids = ids_of(c["ids_with_special"]);
    for (bool skip : {true, false}) {
      kiln::StreamDecoder sd(tk, skip);
      std::string all;
      for (int32_t id : ids) {
        std::string part = sd.push(id);
        ASSERT_TRUE(valid_utf8(part)) << "broken UTF-8 mid-stream in " << c["text"].dump();
        all += part;
      }
      all += sd.flush();
      ASSERT_EQ(all, tk.decode(ids, skip)) << c["text"].dump().substr(0, 200);
    }
  }
}

TEST_P(TokenizerFixture, VocabRoundTrip) {
  const auto& tk = tokenizer(GetParam());
  EXPECT_GT(tk.vocab_size(), 100000u);
  for (int32_t id : {0, 1, 2, 100, 1000, 50000, static_cast<int32_t>(tk.vocab_size()) - 1}) {
    std::string t = tk.id_to_token(id);
    ASSERT_FALSE(t.empty()) << id;
    EXPECT_EQ(tk.token_to_id(t), id) << t;
  }
  EXPECT_EQ(tk.id_to_token(-1), "");
  EXPECT_EQ(tk.id_to_token(static_cast<int32_t>(tk.vocab_size()) + 10), "");
  EXPECT_FALSE(tk.token_to_id("\x01no such token\x02").has_value());
}

INSTANTIATE_TEST_SUITE_P(Tokenizer, TokenizerFixture,
                         ::testing::Values("llama3", "qwen3", "gemma3"));

// encode/decode are const and thread-safe (per-thread caches and regex match data).
TEST(TokenizerConcurrency, ParallelEncodeMatchesSerial) {
  const auto& tk = tokenizer("llama3");
  json cs = cases("llama3");
  std::vector<std::vector<int32_t>> want;
  for (const json& c : cs) want.push_back(ids_of(c["ids"]));
  std::vector<int> bad(4, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 3; ++rep)
        for (size_t i = t; i < cs.size(); i += (rep + 1))
          if (tk.encode(cs[i]["text"].get<std::string>(), false) != want[i]) ++bad[t];
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad, std::vector<int>(4, 0));
}

TEST(TokenizerConfig, BosEosFromConfig) {
  EXPECT_EQ(tokenizer("llama3").bos_token(), "<|begin_of_text|>");
  EXPECT_EQ(tokenizer("llama3").eos_token(), "<|end_of_text|>");
  EXPECT_EQ(tokenizer("llama3").bos_token_id(), 128000);
  EXPECT_EQ(tokenizer("qwen3").bos_token(), std::nullopt);
  EXPECT_EQ(tokenizer("qwen3").eos_token(), "<|im_end|>");
  EXPECT_EQ(tokenizer("gemma3").bos_token(), "<bos>");
  EXPECT_EQ(tokenizer("gemma3").eos_token(), "<end_of_turn>");
  EXPECT_EQ(tokenizer("gemma3").encode("hi", true).front(), 2);
  EXPECT_TRUE(tokenizer("qwen3").is_special(151645));
  EXPECT_FALSE(tokenizer("qwen3").is_special(151667));  // <think> is added but not special
}

TEST(TokenizerStream, HoldsBackIncompleteUtf8) {
  const auto& tk = tokenizer("llama3");
  // An emoji is several byte-level tokens; nothing may be emitted until it is complete.
  auto ids = tk.encode("a\xF0\x9F\x98\x80\xF0\x9F\x8E\x89 b", false);
  kiln::StreamDecoder sd(tk);
  std::string all;
  for (int32_t id : ids) {
    std::string part = sd.push(id);
    EXPECT_TRUE(valid_utf8(part));
    EXPECT_EQ(part.find("\xEF\xBF\xBD"), std::string::npos);
    all += part;
  }
  all += sd.flush();
  EXPECT_EQ(all, "a\xF0\x9F\x98\x80\xF0\x9F\x8E\x89 b");
  // A truncated sequence is flushed as U+FFFD at the end only.
  kiln::StreamDecoder sd2(tk);
  auto partial = tk.encode("\xF0\x9F\x98\x80", false);
  ASSERT_GT(partial.size(), 1u);
  EXPECT_EQ(sd2.push(partial[0]), "");
  EXPECT_EQ(sd2.flush(), "\xEF\xBF\xBD");
}

TEST(TokenizerStream, HoldsBackAtMostMaxHeldIds) {
  // Bytes that never complete a character, and skipped special tokens, are not held back forever:
  // the window (re-decoded on every push) stays bounded.
  const auto& tk = tokenizer("llama3");
  const auto lead = tk.encode("\xF0\x9F\x98\x80", false);  // first token: an incomplete lead
  kiln::StreamDecoder sd(tk);
  std::string out;
  size_t pushes = 0;
  while (out.empty() && pushes < 4 * kiln::StreamDecoder::kMaxHeld) {
    out += sd.push(lead[0]);
    ++pushes;
  }
  EXPECT_EQ(pushes, kiln::StreamDecoder::kMaxHeld);
  EXPECT_NE(out.find("\xEF\xBF\xBD"), std::string::npos);
  EXPECT_TRUE(valid_utf8(out));
  // Skipped special tokens between words do not change the text.
  kiln::StreamDecoder sd2(tk);
  std::string all = sd2.push(tk.encode("hi", false)[0]);
  for (size_t i = 0; i < 3 * kiln::StreamDecoder::kMaxHeld; ++i) all += sd2.push(128000);
  for (int32_t id : tk.encode(" there", false)) all += sd2.push(id);
  all += sd2.flush();
  EXPECT_EQ(all, "hi there");
}

TEST(TokenizerErrors, InvalidUtf8Input) {
  try {
    tokenizer("qwen3").encode("ab\xC3(", false);
    FAIL() << "expected kiln::Error";
  } catch (const kiln::Error& e) {
    EXPECT_NE(std::string(e.what()).find("UTF-8"), std::string::npos);
  }
}

fs::path write_file(const std::string& name, const std::string& content) {
  fs::path p = FixtureDir::get().root() / name;
  fs::create_directories(p.parent_path());
  std::ofstream(p) << content;
  return p;
}

std::string load_error(const fs::path& p) {
  try {
    kiln::Tokenizer::from_json_file(p);
  } catch (const kiln::Error& e) {
    return e.what();
  }
  return "";
}

const char* kTinyModel =
    R"("model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]})";

TEST(TokenizerErrors, UnknownComponentNamesTypeAndFile) {
  for (const char* field : {"normalizer", "pre_tokenizer", "decoder", "post_processor"}) {
    fs::path p = write_file(
        std::string("bad_") + field + ".json",
        std::string("{\"") + field + "\": {\"type\": \"Frobnicate\"}, " + kTinyModel + "}");
    std::string err = load_error(p);
    EXPECT_NE(err.find("Frobnicate"), std::string::npos) << err;
    EXPECT_NE(err.find(p.string()), std::string::npos) << err;
    EXPECT_NE(err.find(field), std::string::npos) << err;
    EXPECT_EQ(err.find('\n'), std::string::npos) << err;
  }
  fs::path p = write_file("bad_model.json", R"({"model": {"type": "WordPiece", "vocab": {}}})");
  EXPECT_NE(load_error(p).find("WordPiece"), std::string::npos);
}

TEST(TokenizerErrors, BadFilesNameTheFile) {
  fs::path p = write_file("truncated.json", "{\"model\": {");
  std::string err = load_error(p);
  EXPECT_NE(err.find(p.string()), std::string::npos) << err;
  EXPECT_EQ(err.find('\n'), std::string::npos) << err;
  err = load_error(FixtureDir::get().root() / "does_not_exist.json");
  EXPECT_NE(err.find("does_not_exist.json"), std::string::npos) << err;
  p = write_file("bad_merge.json",
                 R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a zz"]}})");
  err = load_error(p);
  EXPECT_NE(err.find("zz"), std::string::npos) << err;
  EXPECT_THROW(kiln::Tokenizer::from_dir(FixtureDir::get().root() / "empty_dir_missing"),
               kiln::Error);
}

// A field of the wrong type is one line naming the file and the field, never nlohmann's
// "[json.exception.type_error.302] type must be string, but is number".
TEST(TokenizerErrors, WrongFieldTypesNameTheField) {
  const std::string model = kTinyModel;
  const std::string bpe = R"("model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, )";
  struct {
    std::string doc, message;
  } cases[] = {
      {"{" + bpe + R"("merges": ["a b"], "byte_fallback": "yes"}})",
       "model.byte_fallback must be true or false, not string"},
      {"{" + bpe + R"("merges": [["a", 1]]}})", "model.merges[0][1] must be a string, not number"},
      {"{" + bpe + R"("merges": [], "dropout": "0"}})",
       "model.dropout must be a number, not string"},
      {"{" + bpe + R"("merges": [], "unk_token": 3}})", "model.unk_token must be a string"},
      {R"({"model": {"type": "Unigram", "vocab": [["a", "x"]]}})",
       "model.vocab[0][1] must be a number, not string"},
      {R"({"model": {"type": 5, "vocab": {}}})", "model.type must be a string, not number"},
      {R"({"model": {"type": "BPE", "vocab": {}}})", "model.merges is missing"},
      {"{" + model + R"(, "normalizer": {"type": "Sequence", "normalizers": [{"type": "Lowercase"},
         {"type": "Replace", "pattern": {"String": "a"}, "content": 5}]}})",
       "normalizer.normalizers[1].content must be a string, not number"},
      {"{" + model + R"(, "normalizer": {"type": "Prepend"}})", "normalizer.prepend is missing"},
      {"{" + model + R"(, "normalizer": {"type": "Sequence", "normalizers": {}}})",
       "normalizer.normalizers must be an array, not object"},
      {"{" + model + R"(, "normalizer": {"type": "Strip", "strip_left": 1}})",
       "normalizer.strip_left must be true or false, not number"},
      {"{" + model + R"(, "pre_tokenizer": {"type": "Split", "pattern": {"Regex": 1},
         "behavior": "Isolated"}})",
       "pre_tokenizer.pattern.Regex must be a string, not number"},
      {"{" + model + R"(, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
         {"type": "Split", "pattern": {"String": " "}, "behavior": null}]}})",
       "pre_tokenizer.pretokenizers[0].behavior must be a string, not null"},
      {"{" + model + R"(, "pre_tokenizer": {"type": "Metaspace", "prepend_scheme": 1}})",
       "pre_tokenizer.prepend_scheme must be a string"},
      {"{" + model + R"(, "decoder": {"type": "Strip", "content": " ", "start": -1}})",
       "decoder.start must be a non-negative integer, not number"},
      {"{" + model + R"(, "decoder": {"type": "Sequence", "decoders": [{"type": "BPEDecoder",
         "suffix": []}]}})",
       "decoder.decoders[0].suffix must be a string, not array"},
      {"{" + model + R"(, "post_processor": {"type": "TemplateProcessing",
         "single": [{"SpecialToken": {"id": 3}}]}})",
       "post_processor.single[0].SpecialToken.id must be a string, not number"},
      {"{" + model + R"(, "post_processor": {"type": "TemplateProcessing",
         "single": [{"SpecialToken": {"id": "x"}}], "special_tokens": {"x": {"ids": 1}}}})",
       R"(post_processor.special_tokens["x"].ids must be an array, not number)"},
      {"{" + model + R"(, "added_tokens": [{"id": 0, "content": "a"},
         {"id": 1, "content": "b", "special": "no"}]})",
       "added_tokens[1].special must be true or false, not string"},
      // Post-processor ids must name tokens (fuzz/regressions/tokenizer_json/bert_sep_not_a_token).
      // The added token "y" gets id 3, the next after the model's (HF ignores the file's 4).
      {"{" + model + R"(, "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 6],
         "cls": ["a", 0]}})",
       "post_processor adds token id 6, which is neither in model.vocab nor in added_tokens"},
      {"{" + model + R"(, "post_processor": {"type": "Sequence", "processors": [
         {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "x"}}, {"Sequence": {}}],
          "special_tokens": {"x": {"ids": [4]}}}]}, "added_tokens": [{"id": 4, "content": "y"}]})",
       "post_processor adds token id 4, which is neither in model.vocab nor in added_tokens"},
  };
  int n = 0;
  for (const auto& c : cases) {
    const fs::path p = write_file("field_" + std::to_string(n++) + ".json", c.doc);
    std::string err = load_error(p);
    EXPECT_NE(err.find(p.string() + ": " + c.message), std::string::npos) << c.doc << "\n" << err;
    EXPECT_EQ(err.find("json.exception"), std::string::npos) << err;
    EXPECT_EQ(err.find('\n'), std::string::npos) << err;
  }
  // tokenizer_config.json too.
  const fs::path dir = FixtureDir::get().root() / "bad_config";
  fs::create_directories(dir);
  std::ofstream(dir / "tokenizer.json") << "{" << model << "}";
  std::ofstream(dir / "tokenizer_config.json") << R"({"tokenizer_class": 5})";
  std::string err;
  try {
    kiln::Tokenizer::from_dir(dir);
  } catch (const kiln::Error& e) {
    err = e.what();
  }
  EXPECT_NE(err.find("tokenizer_config.json: tokenizer_class must be a string, not number"),
            std::string::npos)
      << err;
  std::ofstream(dir / "tokenizer_config.json") << "[]";
  err = "";
  try {
    kiln::Tokenizer::from_dir(dir);
  } catch (const kiln::Error& e) {
    err = e.what();
  }
  EXPECT_NE(err.find("tokenizer_config.json: expected a JSON object"), std::string::npos) << err;
}

std::string run_cli(const std::string& args, const std::string& input, int* rc);  // below

// Documents nested deeper than 128 levels (a million-deep Sequence overflowed the stack while
// building components) are refused in one line, whatever the nesting is.
TEST(TokenizerErrors, DeepNestingIsRefused) {
  const int n = 200000;
  std::string doc = R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "normalizer": )";
  for (int i = 0; i < n; ++i) doc += R"({"type": "Sequence", "normalizers": [)";
  doc += R"({"type": "Lowercase"})";
  for (int i = 0; i < n; ++i) doc += "]}";
  doc += "}";
  std::string err = load_error(write_file("deep.json", doc));
  EXPECT_NE(err.find("deep.json: JSON nested deeper than 128 levels"), std::string::npos) << err;
  // Unused fields count too, and so does `kiln tokenize` input.
  err = load_error(write_file("deep_unused.json", std::string("{") + kTinyModel + R"(, "x": )" +
                                                      std::string(n, '[') + std::string(n, ']') +
                                                      "}"));
  EXPECT_NE(err.find("nested deeper than 128"), std::string::npos) << err;
  int rc = 0;
  const std::string qdir = "'" + FixtureDir::get().prepare("qwen3").string() + "'";
  const std::string out =
      run_cli(qdir + " --decode", std::string(n, '[') + std::string(n, ']'), &rc);
  EXPECT_NE(rc, 0) << out;
  EXPECT_NE(out.find("nested deeper than 128"), std::string::npos) << out;
  // Nesting within the limit still loads (a Sequence of Sequences, 40 deep).
  doc = R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "normalizer": )";
  for (int i = 0; i < 40; ++i) doc += R"({"type": "Sequence", "normalizers": [)";
  doc += R"({"type": "Lowercase"})";
  for (int i = 0; i < 40; ++i) doc += "]}";
  doc += "}";
  EXPECT_EQ(load_error(write_file("nested_ok.json", doc)), "");
}

// Token ids beyond 32 bits (or past kiln's table limit) in tokenizer.json, tokenizer.model and
// `kiln tokenize --decode` input are refused, never wrapped onto another token.
TEST(TokenizerErrors, SparseVocabIdsAreBelowVocabSize) {
  // vocab_size() is 1 + the largest id, also when the vocab's ids have gaps (it was the entry
  // count, so the engine's "every id fits the model" check could pass an id it should not).
  // An added token still gets the id after the entry count, as HF gives it.
  const fs::path p = write_file("sparse_ids.json", R"({"model": {"type": "BPE",
      "vocab": {"a": 0, "b": 5}, "merges": []}, "added_tokens": [{"id": 9, "content": "<x>"}]})");
  const auto tk = kiln::Tokenizer::from_json_file(p);
  EXPECT_EQ(tk.encode("b", false), std::vector<int32_t>{5});
  EXPECT_EQ(tk.token_to_id("<x>"), 2);
  EXPECT_EQ(tk.vocab_size(), 6u);
}

TEST(TokenizerErrors, IdsBeyondThirtyTwoBits) {
  const std::string big = "4294967301";  // 2^32 + 5: wraps to 5 as int32
  std::string err = load_error(write_file(
      "big_vocab.json",
      R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": )" + big + R"(}, "merges": []}})"));
  EXPECT_NE(err.find("model.vocab[\"b\"] = 4294967301 is outside [0, 4194304)"), std::string::npos)
      << err;
  err = load_error(write_file("sparse_vocab.json",
                              R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 2000000000},
                              "merges": []}})"));
  EXPECT_NE(err.find("is outside"), std::string::npos) << err;  // a 2G-entry table, refused
  err = load_error(write_file(
      "big_post.json", std::string("{") + kTinyModel +
                           R"(, "post_processor": {"type": "BertProcessing", "sep": ["b", )" + big +
                           R"(], "cls": ["a", 0]}})"));
  EXPECT_NE(err.find("post_processor.sep id = 4294967301"), std::string::npos) << err;

  // tokenizer.model: a second trainer_spec whose bos_id (field 41) is 2^32 + 1.
  const fs::path src = kData / "tokenizers" / "spm_bpe" / "tokenizer.model";
  std::ifstream in(src, std::ios::binary);
  std::string model((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto varint = [](uint64_t v) {
    std::string b;
    for (; v >= 0x80; v >>= 7) b.push_back(char(0x80 | (v & 0x7f)));
    b.push_back(char(v));
    return b;
  };
  const std::string spec = varint(41 << 3) + varint((uint64_t(1) << 32) + 1);
  model += varint(2 << 3 | 2) + varint(spec.size()) + spec;
  const fs::path dir = FixtureDir::get().root() / "big_spm";
  fs::create_directories(dir);
  std::ofstream(dir / "tokenizer.model", std::ios::binary) << model;
  err = "";
  try {
    kiln::Tokenizer::from_dir(dir);
  } catch (const kiln::Error& e) {
    err = e.what();
  }
  EXPECT_NE(err.find("trainer_spec.bos_id = 4294967297 is not a token id"), std::string::npos)
      << err;

  int rc = 0;
  const std::string qdir = "'" + FixtureDir::get().prepare("qwen3").string() + "'";
  std::string out = run_cli(qdir + " --decode", "[1, " + big + "]", &rc);
  EXPECT_NE(rc, 0) << out;
  EXPECT_NE(out.find("token id 4294967301 is outside [0, 2^31)"), std::string::npos) << out;
  out = run_cli(qdir + " --decode", "[-3]", &rc);
  EXPECT_NE(rc, 0) << out;
  EXPECT_NE(out.find("token id -3 is outside"), std::string::npos) << out;
}

// A SentencePiece BPE model (no tokenizer.json): ids and text must match sentencepiece itself.
TEST(TokenizerSentencePiece, MatchesSentencePiece) {
  fs::path dir = kData / "tokenizers" / "spm_bpe";
  ASSERT_TRUE(fs::exists(dir / "tokenizer.model")) << "missing fixture " << dir;
  auto tk = kiln::Tokenizer::from_dir(dir);
  std::ifstream f(kData / "tokenizers" / "spm_bpe.json");
  ASSERT_TRUE(f.good());
  json j = json::parse(f);
  ASSERT_GE(j["cases"].size(), 40u);
  int32_t bos = j["bos_id"];
  EXPECT_EQ(tk.bos_token_id(), bos);
  for (const json& c : j["cases"]) {
    std::string text = c["text"];
    auto ids = ids_of(c["ids"]);
    EXPECT_EQ(tk.encode(text, false), ids) << json(text).dump();
    auto with = ids;
    with.insert(with.begin(), bos);
    EXPECT_EQ(tk.encode(text, true), with) << json(text).dump();
    EXPECT_EQ(tk.decode(with, true), c["decoded"].get<std::string>()) << json(text).dump();
  }
  EXPECT_EQ(tk.encode("<s>a", false).front(), bos);  // control pieces are special tokens
}

std::string proto_varint(uint64_t v) {
  std::string b;
  for (; v >= 0x80; v >>= 7) b.push_back(char(0x80 | (v & 0x7f)));
  b.push_back(char(v));
  return b;
}

std::string proto_bytes(int field, const std::string& v) {
  return proto_varint(uint64_t(field) << 3 | 2) + proto_varint(v.size()) + v;
}

// A SentencePiece Unigram tokenizer.model with these (piece, type) entries: 1 normal, 2 unknown,
// 3 control, 4 user-defined. Scores fall with the index; unk/bos/eos ids are 0/1/2.
fs::path spm_unigram(const std::string& name,
                     const std::vector<std::pair<std::string, int>>& pieces) {
  std::string model;
  for (size_t i = 0; i < pieces.size(); ++i) {
    const float score = -float(i);
    std::string score_bytes(4, '\0');
    std::memcpy(score_bytes.data(), &score, 4);
    model +=
        proto_bytes(1, proto_bytes(1, pieces[i].first) + proto_varint(2 << 3 | 5) + score_bytes +
                           proto_varint(3 << 3) + proto_varint(uint64_t(pieces[i].second)));
  }
  model += proto_bytes(2, proto_varint(3 << 3) + proto_varint(1));  // model_type UNIGRAM
  fs::path p = FixtureDir::get().root() / name;
  std::ofstream(p, std::ios::binary) << model;
  return p;
}

// Pieces that are partial UTF-8 sequences must never make encoding read or write out of bounds.
// A user-defined piece is matched in the raw text, so one like "\x82" would cut "€" into
// segments that end mid-character: the model is refused. The Unigram model itself steps by whole
// characters only where they are complete (run under KILN_SANITIZE to see the old overflow).
TEST(TokenizerSentencePiece, PartialUtf8PiecesStayInBounds) {
  const std::vector<std::pair<std::string, int>> base = {
      {"<unk>", 2}, {"<s>", 3}, {"</s>", 3}, {"\xE2\x96\x81", 1}, {"a", 1}};
  auto ok = base;
  ok.push_back({"\xE2\x82\xAC", 4});  // "€", user-defined
  auto tk = kiln::Tokenizer::from_sentencepiece_file(spm_unigram("ok.model", ok));
  EXPECT_EQ(tk.encode("a\xE2\x82\xAC", false), (std::vector<int32_t>{3, 4, 5}));

  auto bad = base;
  bad.push_back({"\x82", 4});
  const fs::path p = spm_unigram("partial_piece.model", bad);
  try {
    auto t = kiln::Tokenizer::from_sentencepiece_file(p);
    t.encode("a\xE2\x82\xAC", false);  // what the refused piece would have done
    ADD_FAILURE() << "expected kiln::Error";
  } catch (const kiln::Error& e) {
    EXPECT_NE(
        std::string(e.what()).find(p.string() + ": piece 5 (user-defined) is not valid UTF-8"),
        std::string::npos)
        << e.what();
  }

  // Unigram on text that is not valid UTF-8: a lead byte at the very end, a stray continuation
  // byte. Pieces: 0 <unk>, 1 "a", 2 "b", 3 "\xE2" (a lone lead byte).
  auto m = kiln::tok::make_unigram({"<unk>", "a", "b", "\xE2"}, {0, -1, -1, -1}, 0, false);
  std::vector<int32_t> out;
  m->encode("a\xE2", out);  // used to write best[4] of a 3-entry table
  EXPECT_EQ(out, (std::vector<int32_t>{1, 3}));
  out.clear();
  m->encode(
      "a\x82"
      "b",
      out);  // used to swallow the 'b' into a 2-byte "character"
  EXPECT_EQ(out, (std::vector<int32_t>{1, 0, 2}));
  out.clear();
  m->encode("\xE2\x82", out);  // truncated 3-byte sequence: a piece, then an unknown byte
  EXPECT_EQ(out, (std::vector<int32_t>{3, 0}));
}

TEST(TokenizerComponents, MetaspaceByteFallbackPipeline) {
  // A Llama-2 style pipeline: Metaspace pre-tokenizer, byte fallback, Metaspace-like decoding.
  fs::path p = write_file("llama2_style.json", R"({
    "added_tokens": [{"id": 0, "content": "<s>", "special": true, "normalized": false,
                      "lstrip": false, "rstrip": false, "single_word": false}],
    "normalizer": {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
    "pre_tokenizer": null,
    "post_processor": {"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [], "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}},
    "decoder": {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
    "model": {"type": "BPE", "byte_fallback": true, "fuse_unk": true, "unk_token": "<unk>",
      "vocab": {"<s>": 0, "<unk>": 1, "<0xC3>": 2, "<0xA9>": 3, "\u2581": 4, "h": 5, "i": 6,
                "\u2581h": 7, "\u2581hi": 8},
      "merges": [["\u2581", "h"], ["\u2581h", "i"]]}})");
  auto tk = kiln::Tokenizer::from_json_file(p);
  EXPECT_EQ(tk.encode("hi hi", true), (std::vector<int32_t>{0, 8, 8}));
  // 'é' is not in the vocab: byte fallback; 'z' has no byte tokens: unk.
  EXPECT_EQ(tk.encode("h\xC3\xA9z", false), (std::vector<int32_t>{7, 2, 3, 1}));
  EXPECT_EQ(tk.decode(std::vector<int32_t>{0, 8, 8, 2, 3}, true), "hi hi\xC3\xA9");
  EXPECT_EQ(tk.decode(std::vector<int32_t>{8, 2}, true), "hi\xEF\xBF\xBD");
  // Special token in the text, then the next segment gets its own prepended marker.
  EXPECT_EQ(tk.encode("hi<s>hi", false), (std::vector<int32_t>{8, 0, 8}));
}

std::string run_cli(const std::string& args, const std::string& input, int* rc) {
  fs::path in = FixtureDir::get().root() / "cli_input.txt";
  std::ofstream(in, std::ios::binary) << input;
  std::string cmd =
      std::string("'") + KILN_CLI + "' tokenize " + args + " < '" + in.string() + "' 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n;
  while (p && (n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  *rc = p ? pclose(p) : -1;
  return out;
}

TEST(TokenizerCli, EncodeDecodeJsonl) {
  const auto& tk = tokenizer("qwen3");
  std::string dir = "'" + FixtureDir::get().prepare("qwen3").string() + "'";
  int rc = 0;
  std::string text = "Hello <|im_start|>wörld\n";
  std::string out = run_cli(dir + " --special", text, &rc);
  ASSERT_EQ(rc, 0) << out;
  EXPECT_EQ(json::parse(out).get<std::vector<int32_t>>(), tk.encode(text, true));
  out = run_cli(dir + " --decode", json(tk.encode(text, false)).dump(), &rc);
  ASSERT_EQ(rc, 0) << out;
  EXPECT_EQ(out, tk.decode(tk.encode(text, false), true));
  out = run_cli(dir + " --jsonl", "\"a b\"\n{\"ids\": [64, 293], \"special\": true}\n", &rc);
  ASSERT_EQ(rc, 0) << out;
  EXPECT_EQ(out, json(tk.encode("a b", false)).dump() + "\n\"a b\"\n");
  out = run_cli(dir + " --decode", "[1, 2", &rc);
  EXPECT_NE(rc, 0);
  EXPECT_NE(out.find("kiln: error: stdin"), std::string::npos) << out;
}

}  // namespace
