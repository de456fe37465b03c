// Engine folders: streamed builds, checksums and `verify`, interruption, rebuilds over an engine.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <functional>

#include "build/checkpoint.h"
#include "build/engine_file.h"
#include "core/error.h"
#include "kiln/kiln.h"
#include "test_util.h"

namespace kiln::test {
namespace {

using json = nlohmann::json;

std::vector<std::string> entries(const fs::path& dir) {
  std::vector<std::string> r;
  for (const auto& e : fs::directory_iterator(dir)) r.push_back(e.path().filename().string());
  std::sort(r.begin(), r.end());
  return r;
}

class StreamedBuild : public ::testing::TestWithParam<const char*> {};

// Rows made a few at a time (a tiny staging buffer, so chunks cut across fused Q/K/V and gate/up
// parts and transposed tensors) give the same bytes as the whole tensor made in memory.
TEST_P(StreamedBuild, ChunkedRowsEqualTheInMemoryBuild) {
  TempDir tmp;
  const Checkpoint ck = open_checkpoint(hf(GetParam()));
  for (DType dt : {DType::F32, DType::BF16}) {
    const WeightPlan plan = plan_weights(ck, dt);
    const auto held = materialize(plan);
    const fs::path out = tmp / (std::string("e") + std::string(dtype_name(dt)));
    write_engine_folder(out, plan, {nlohmann::json::object(), {}, {}, 64});
    auto file = SafetensorsFile::open(out / kEngineWeights);
    ASSERT_EQ(file->tensors().size(), held.size());
    for (const auto& [name, t] : held) {
      const Tensor got = file->get(name);
      ASSERT_EQ(got.shape, t.shape) << name;
      ASSERT_EQ(got.dtype, t.dtype) << name;
      EXPECT_EQ(std::memcmp(got.data, t.data, t.nbytes()), 0) << GetParam() << " " << name;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, StreamedBuild,
                         ::testing::Values("llama", "gemma2", "phi3", "gpt2", "mixtral",
                                           "qwen2_moe"));

TEST(EngineFile, DummyRowsAreIndependentOfTheChunking) {
  TempDir tmp;
  const Checkpoint ck = open_config(hf("qwen3") / "config.json");
  const WeightPlan plan = plan_dummy_weights(ck.config, DType::BF16, 5);
  const auto held = materialize(plan);
  write_engine_folder(tmp / "e", plan, {nlohmann::json::object(), {}, {}, 100});
  auto file = SafetensorsFile::open(tmp / "e" / kEngineWeights);
  for (const auto& [name, t] : held)
    EXPECT_EQ(std::memcmp(file->get(name).data, t.data, t.nbytes()), 0) << name;
}

TEST(EngineFile, VerifyChecksEveryTensor) {
  TempDir tmp;
  const fs::path e = tmp / "e";
  Engine::build_to(hf("llama"), e);
  EXPECT_GT(Engine::verify(e), 0u);
  // One flipped byte in the middle of the weights: load() cannot see it, verify() names it.
  const fs::path w = e / kEngineWeights;
  auto file = SafetensorsFile::open(w);
  const auto& [name, ti] = *std::next(file->tensors().begin(), 3);
  uint64_t data_bytes = 0;
  for (const auto& [n, t] : file->tensors()) data_bytes = std::max(data_bytes, t.end);
  const uint64_t at = fs::file_size(w) - data_bytes + ti.begin + 1;
  const std::string victim = name;
  file.reset();
  {
    std::fstream f(w, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(std::streamoff(at));
    char c = 0;
    f.read(&c, 1);
    c = char(c ^ 0x40);
    f.seekp(std::streamoff(at));
    f.write(&c, 1);
  }
  EXPECT_NO_THROW(Engine::load(e));
  const std::string err = error_of([&] { Engine::verify(e); });
  EXPECT_NE(err.find("1 tensor do not match"), std::string::npos) << err;
  EXPECT_NE(err.find(victim + " (checksum differs)"), std::string::npos) << err;
}

// The tokenizer and template files a build copies are checked by verify: present, unchanged.
TEST(EngineFile, VerifyChecksTheTokenizerFiles) {
  TempDir tmp;
  const fs::path e = tmp / "e";
  Engine::build_to(demo(), e);
  ASSERT_TRUE(fs::exists(e / "tokenizer.json"));
  EXPECT_GT(Engine::verify(e), 0u);
  const fs::path t = e / "tokenizer.json";
  std::string text;
  {
    std::ifstream in(t, std::ios::binary);
    text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  std::ofstream(t, std::ios::binary) << text << " ";  // still valid JSON, but not as built
  std::string err = error_of([&] { Engine::verify(e); });
  EXPECT_NE(err.find("tokenizer.json: checksum differs from the manifest's"), std::string::npos)
      << err;
  std::ofstream(t, std::ios::binary) << text.substr(0, text.size() / 2);  // truncated
  err = error_of([&] { Engine::verify(e); });
  EXPECT_NE(err.find("tokenizer.json"), std::string::npos) << err;
  fs::remove(t);
  err = error_of([&] { Engine::verify(e); });
  EXPECT_NE(err.find("tokenizer.json: missing (the engine's manifest lists it)"), std::string::npos)
      << err;
  std::ofstream(t, std::ios::binary) << text;  // restored: verifies again
  EXPECT_GT(Engine::verify(e), 0u);
}

TEST(EngineFile, ExtraOrMissingTensorsAreErrors) {
  TempDir tmp;
  const fs::path e = tmp / "e";
  Engine::build_to(hf("llama"), e);
  auto file = SafetensorsFile::open(e / kEngineWeights);
  std::vector<std::pair<std::string, Tensor>> ts;
  for (const auto& [name, ti] : file->tensors()) ts.push_back({name, file->get(name)});
  ts.push_back({"layers.0.stray", Tensor::zeros(DType::F32, {4})});
  write_safetensors(tmp / "w.safetensors", ts);
  file.reset();
  fs::rename(tmp / "w.safetensors", e / kEngineWeights);
  std::string err = error_of([&] { Engine::load(e); });
  EXPECT_NE(err.find("does not match its manifest: unexpected layers.0.stray"), std::string::npos)
      << err;
  err = error_of([&] { Engine::verify(e); });
  EXPECT_NE(err.find("unexpected layers.0.stray"), std::string::npos) << err;
}

TEST(EngineFile, RebuildReplacesOnlyWhatKilnWrote) {
  TempDir tmp;
  const fs::path e = tmp / "e";
  Engine::build_to(demo(), e);
  ASSERT_TRUE(fs::exists(e / "tokenizer.json"));
  std::ofstream(e / "NOTES.txt") << "mine\n";
  fs::create_directory(e / "runs");
  std::ofstream(e / "runs" / "log.txt") << "mine\n";
  // A dummy build from a bare config.json: no tokenizer files this time.
  fs::create_directory(tmp / "cfg");
  fs::copy_file(hf("qwen3") / "config.json", tmp / "cfg" / "config.json");
  Engine::build_dummy_to(tmp / "cfg" / "config.json", e, {}, 3);
  EXPECT_EQ(entries(e), (std::vector<std::string>{"NOTES.txt", "kiln-engine.json", "runs",
                                                  "weights.safetensors"}));
  EXPECT_TRUE(fs::exists(e / "runs" / "log.txt"));
  EXPECT_EQ(Engine::load(e).info().architecture, "Qwen3ForCausalLM");
  EXPECT_GT(Engine::verify(e), 0u);
  EXPECT_EQ(entries(tmp.path), (std::vector<std::string>{"cfg", "e"}));
  // A folder kiln did not write is never a target.
  fs::create_directory(tmp / "other");
  std::ofstream(tmp / "other" / "x") << "x";
  const std::string err = error_of([&] { Engine::build_to(hf("llama"), tmp / "other"); });
  EXPECT_NE(err.find("exists and is not a kiln engine; refusing to overwrite"), std::string::npos)
      << err;
}

TEST(EngineFile, InterruptedBuildLeavesNothingBehind) {
  TempDir tmp;
  // SIGINT as the first chunk is written (the build installs its handler for the write).
  const std::string err = error_of([&] {
    Engine::build_to(hf("llama"), tmp / "e", {}, [](const BuildProgress&) { raise(SIGINT); });
  });
  EXPECT_NE(err.find("build interrupted (SIGINT); nothing was written"), std::string::npos) << err;
  EXPECT_TRUE(entries(tmp.path).empty());
  // The same over an existing engine: it stays as it was.
  Engine::build_to(hf("llama"), tmp / "e");
  const auto before = fs::last_write_time(tmp / "e" / kEngineWeights);
  EXPECT_NE(error_of([&] {
              Engine::build_dummy_to(hf("qwen3") / "config.json", tmp / "e", {}, 0,
                                     [](const BuildProgress&) { raise(SIGTERM); });
            }).find("SIGTERM"),
            std::string::npos);
  EXPECT_EQ(entries(tmp.path), std::vector<std::string>{"e"});
  EXPECT_EQ(fs::last_write_time(tmp / "e" / kEngineWeights), before);
  EXPECT_EQ(Engine::load(tmp / "e").info().architecture, "LlamaForCausalLM");
}

TEST(EngineFile, TemporariesOfKilledBuildsAreRemoved) {
  TempDir tmp;
  const pid_t child = fork();
  if (child == 0) _exit(0);
  waitpid(child, nullptr, 0);  // a pid that no longer runs
  fs::create_directories(tmp / cat(".e.tmp-", child) / "junk");
  fs::create_directories(tmp / cat(".e.tmp-", getppid()));  // a live build: left alone
  fs::create_directories(tmp / ".other.tmp-1");             // another engine's: left alone
  Engine::build_to(hf("llama"), tmp / "e");
  EXPECT_EQ(entries(tmp.path),
            (std::vector<std::string>{cat(".e.tmp-", getppid()), ".other.tmp-1", "e"}));
}

// A manifest edited by hand: what the decoder indexes by (a layer entry per layer, each naming a
// rope of the table) and the sampling defaults are checked when the engine loads, each a one-line
// error naming the file and the field (these crashed or ran silently wrong before).
TEST(EngineFile, EditedManifestsAreNamedErrors) {
  TempDir tmp;
  const fs::path e = tmp / "e";
  Engine::build_to(hf("llama"), e);
  const json good = read_json(e / kEngineManifest);
  const auto load_with = [&](const std::function<void(json&)>& edit) {
    json m = good;
    edit(m);
    write_json(e / kEngineManifest, m);
    return error_of([&] { Engine::load(e); });
  };
  std::string err = load_with([](json& m) { m["model"]["ropes"] = json::array(); });
  EXPECT_NE(err.find("kiln-engine.json: model.layers[0].rope is 0, not one of the 0 entries"),
            std::string::npos)
      << err;
  err = load_with([](json& m) { m["model"]["layers"][0]["rope"] = 5; });
  EXPECT_NE(err.find("model.layers[0].rope is 5"), std::string::npos) << err;
  err = load_with([](json& m) { m["model"]["layers"].erase(m["model"]["layers"].size() - 1); });
  EXPECT_NE(err.find("model.layers has"), std::string::npos) << err;
  err = load_with([](json& m) { m["generation_defaults"] = {{"temperature", "hot"}}; });
  EXPECT_NE(err.find("kiln-engine.json: generation_defaults: temperature must be a number"),
            std::string::npos)
      << err;
  err = load_with([](json& m) { m["generation_defaults"] = json::array({1}); });
  EXPECT_NE(err.find("generation_defaults: not a JSON object"), std::string::npos) << err;
  // An unknown enum name is not read as the enum's first value.
  const std::pair<std::function<void(json&)>, const char*> unknown[] = {
      {[](json& m) { m["model"]["act"] = "mish"; }, "model.act is not a value this kiln reads"},
      {[](json& m) { m["model"]["ropes"][0]["type"] = "ntk"; }, "model.ropes[0].type is not"},
      {[](json& m) { m["model"]["knobs"]["norm"] = "batch"; }, "model.knobs.norm is not"},
      {[](json& m) { m["model"]["knobs"]["flash"] = true; }, "model.knobs.flash is not"}};
  for (const auto& [edit, want] : unknown) {
    err = load_with(edit);
    EXPECT_NE(err.find(cat("kiln-engine.json: ", want)), std::string::npos) << err;
  }
  // What a build refuses, a load refuses.
  err = load_with([](json& m) { m["model"]["num_kv_heads"] = 3; });
  EXPECT_NE(err.find("must be a multiple of num_key_value_heads (3)"), std::string::npos) << err;
  err = load_with([](json& m) { m["model"]["hidden_size"] = -64; });
  EXPECT_NE(err.find("model: hidden_size = -64 must be > 0"), std::string::npos) << err;
  err = load_with([](json& m) { m["model"]["norm_eps"] = 0; });
  EXPECT_NE(err.find("rms_norm_eps / layer_norm_eps must be a finite number > 0"),
            std::string::npos)
      << err;
  err = load_with([](json& m) { m["build"]["max_seq_len"] = 0; });
  EXPECT_NE(err.find("build.max_batch 1 and build.max_seq_len 0 must be >= 1"), std::string::npos)
      << err;
  // The manifest's frame: a list, or a version of another type.
  err = load_with([](json& m) { m = json::array(); });
  EXPECT_NE(err.find("kiln-engine.json: not a kiln engine manifest"), std::string::npos) << err;
  err = load_with([](json& m) { m["version"] = "1"; });
  EXPECT_NE(err.find("kiln-engine.json: engine format version \"1\" is not supported"),
            std::string::npos)
      << err;
  EXPECT_EQ(load_with([](json&) {}), "");  // the manifest as written still loads
}

// generation_config.json's sampling defaults and eos ids are checked at build time, by name.
TEST(EngineFile, BadGenerationConfigFailsTheBuild) {
  const std::pair<const char*, const char*> cases[] = {
      {R"({"do_sample": true, "temperature": "hot"})", "temperature must be a number"},
      {R"({"do_sample": "yes"})", "do_sample must be true or false"},
      {R"({"top_p": 2.0})", "top_p must be a number above 0 and at most 1"},
      {R"({"top_k": -5})", "top_k must be a non-negative integer"},
      {R"({"min_p": "x"})", "min_p must be a number"},
      {R"({"repetition_penalty": 0})", "repetition_penalty must be a number above 0"},
      {R"({"temperature": -1})", "temperature must be a number of at least 0"},
      {R"({"eos_token_id": ["a"]})", "eos_token_id \"a\" is not a token id"},
      {R"({"eos_token_id": -3})", "eos_token_id -3 is not a token id"}};
  for (const auto& [text, want] : cases) {
    TempDir tmp;
    copy_dir(hf("llama"), tmp / "m");
    std::ofstream(tmp / "m" / "generation_config.json") << text;
    const std::string err = error_of([&] { Engine::build_to(tmp / "m", tmp / "e"); });
    EXPECT_NE(err.find("generation_config.json: "), std::string::npos) << text << ": " << err;
    EXPECT_NE(err.find(want), std::string::npos) << text << ": " << err;
    EXPECT_FALSE(fs::exists(tmp / "e")) << text;
  }
}

TEST(EngineFile, BrokenTokenizerFailsTheBuild) {
  TempDir tmp;
  copy_dir(hf("llama"), tmp / "m");
  std::ofstream(tmp / "m" / "tokenizer.json") << "{\"model\": {\"type\": \"BPE\", \"vocab\": [";
  const std::string err = error_of([&] { Engine::build_to(tmp / "m", tmp / "e"); });
  EXPECT_NE(err.find("tokenizer.json"), std::string::npos) << err;
  EXPECT_FALSE(fs::exists(tmp / "e"));
}

TEST(EngineFile, BrokenChatTemplateFailsTheBuild) {
  // The error names the file the template came from, not only the Jinja line.
  TempDir tmp;
  copy_dir(hf("llama"), tmp / "m");
  std::ofstream(tmp / "m" / "chat_template.jinja")
      << "{% for m in messages %}{{ m.content }}{% if %}";
  std::string err = error_of([&] { Engine::build_to(tmp / "m", tmp / "e"); });
  EXPECT_NE(err.find("chat_template.jinja: chat template: "), std::string::npos) << err;
  EXPECT_NE(err.find("line 1"), std::string::npos) << err;
  EXPECT_FALSE(fs::exists(tmp / "e"));
  fs::remove(tmp / "m" / "chat_template.jinja");
  auto tc = fs::exists(tmp / "m" / "tokenizer_config.json")
                ? read_json(tmp / "m" / "tokenizer_config.json")
                : nlohmann::json::object();
  tc["chat_template"] = "{{ messages | bogus_filter }}{% endfor %}";
  write_json(tmp / "m" / "tokenizer_config.json", tc);
  err = error_of([&] { Engine::build_to(tmp / "m", tmp / "e"); });
  EXPECT_NE(err.find("tokenizer_config.json: chat template: "), std::string::npos) << err;
  EXPECT_FALSE(fs::exists(tmp / "e"));
}

TEST(EngineFile, QuantizedCheckpointsAreRefusedByName) {
  TempDir tmp;
  copy_dir(hf("llama"), tmp / "m");
  auto cfg = read_json(tmp / "m" / "config.json");
  cfg["quantization_config"] = {{"quant_method", "bitsandbytes"}, {"load_in_4bit", true}};
  write_json(tmp / "m" / "config.json", cfg);
  std::string err = error_of([&] { Engine::build_to(tmp / "m", tmp / "e"); });
  EXPECT_NE(err.find("quantization_config: quantized checkpoints ('bitsandbytes') are not "
                     "supported yet"),
            std::string::npos)
      << err;
  // GPT-OSS as OpenAI publishes it: MXFP4 experts (the gpt_oss fixture holds BF16 ones).
  copy_dir(hf("gpt_oss"), tmp / "oss");
  auto oss = read_json(tmp / "oss" / "config.json");
  oss["quantization_config"] = {{"quant_method", "mxfp4"},
                                {"modules_to_not_convert", {"model.layers.*.self_attn"}}};
  write_json(tmp / "oss" / "config.json", oss);
  err = error_of([&] { Engine::build_to(tmp / "oss", tmp / "e"); });
  EXPECT_NE(err.find("quantized checkpoints ('mxfp4') are not supported yet"), std::string::npos)
      << err;
  EXPECT_FALSE(fs::exists(tmp / "e"));
  // AWQ loads, but only in the variant kiln runs: 4 bits, GEMM packing, zero points, a group.
  cfg["quantization_config"] = {{"quant_method", "awq"}, {"bits", 4}};
  write_json(tmp / "m" / "config.json", cfg);
  err = error_of([&] { Engine::build_to(tmp / "m", tmp / "e"); });
  EXPECT_NE(err.find("quantization_config.group_size must be a multiple of 32"), std::string::npos)
      << err;
  cfg.erase("quantization_config");
  write_json(tmp / "m" / "config.json", cfg);
  // ModelOpt loads FP8 only (tests/test_quant.cpp has the FP8 checkpoints that load).
  write_json(tmp / "m" / "hf_quant_config.json", {{"quantization", {{"quant_algo", "W4A8_AWQ"}}}});
  err = error_of([&] { Engine::build_to(tmp / "m", tmp / "e"); });
  EXPECT_NE(err.find("hf_quant_config.json: quantization.quant_algo 'W4A8_AWQ': kiln loads "
                     "ModelOpt FP8 only"),
            std::string::npos)
      << err;
  EXPECT_FALSE(fs::exists(tmp / "e"));
}

TEST(EngineFile, ShortDiskIsRefusedBeforeWriting) {
  TempDir tmp;
  // Llama-3.1-8B's shape with 8000 layers: 1.7 trillion parameters, 3.2 TB in BF16.
  auto cfg = read_json(hf("llama") / "config.json");
  cfg["hidden_size"] = 4096;
  cfg["intermediate_size"] = 14336;
  cfg["num_attention_heads"] = 32;
  cfg["num_key_value_heads"] = 8;
  cfg["head_dim"] = 128;
  cfg["num_hidden_layers"] = 8000;
  cfg["vocab_size"] = 128256;
  write_json(tmp / "config.json", cfg);
  BuildConfig bc;
  bc.dtype = "bf16";
  const std::string err =
      error_of([&] { Engine::build_dummy_to(tmp / "config.json", tmp / "e", bc); });
  EXPECT_NE(err.find("the engine needs 3"), std::string::npos) << err;
  EXPECT_NE(err.find("GiB on disk but"), std::string::npos) << err;
  EXPECT_FALSE(fs::exists(tmp / "e"));
}

}  // namespace
}  // namespace kiln::test
