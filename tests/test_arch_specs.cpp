// Architectures as data: the spec files kiln ships, --arch-spec files, and checkpoints whose
// architecture is in no table (matched to a known family, or refused naming what is unexplained).
#include "arch/registry.h"
#include "kiln/kiln.h"
#include "test_util.h"

namespace kiln::test {
namespace {

fs::path example_spec(const std::string& name) {
  return fs::path(KILN_TEST_DATA).parent_path().parent_path() / "docs/examples" / name;
}

// Prefill logits of every reference prompt within FP32 tolerance of transformers' float64 ones,
// and the greedy continuations identical.
void expect_matches_reference(Engine& e, const std::string& fixture) {
  const Reference ref = load_reference(fixture);
  e.start({.device = "cpu"});
  const int64_t V = e.info().vocab_size;
  double worst = 0;
  for (size_t j = 0; j < ref.prompts.size(); ++j) {
    const auto& p = ref.prompts[j];
    const std::vector<float> got = e.logits(p);
    for (size_t i = 0; i < p.size(); ++i)
      worst = std::max(worst, rel_err(got.data() + i * V, ref.logits[j].ptr<float>() + i * V, V));
    SamplingParams sp;
    sp.temperature = 0;
    sp.max_tokens = int64_t(ref.greedy[j].size());
    sp.ignore_eos = true;
    EXPECT_EQ(e.generate(p, sp), ref.greedy[j]) << fixture << " prompt " << j;
  }
  EXPECT_LE(worst, 1e-5) << fixture;
  std::printf("[arch] %-10s %s: prefill max rel err %.2e\n", fixture.c_str(),
              e.info().architecture.c_str(), worst);
}

TEST(ArchSpecs, EveryShippedFamilyIsListed) {
  const auto names = supported_architectures();
  for (const char* n :
       {"LlamaForCausalLM", "Gemma3ForCausalLM", "GPT2LMHeadModel", "Qwen3MoeForCausalLM",
        "GPTNeoXForCausalLM", "Cohere2ForCausalLM", "Olmo2ForCausalLM"})
    EXPECT_NE(std::find(names.begin(), names.end(), n), names.end()) << n;
  // Extending merges: Gemma 3 has Gemma's norms and Gemma 2's sandwich norms.
  const ArchSpec& g3 = find_arch("Gemma3ForCausalLM");
  EXPECT_EQ(g3.knobs.norm, NormKind::RMSPlusOne);
  EXPECT_TRUE(g3.knobs.post_ffn_norm && g3.knobs.qk_norm);
  EXPECT_EQ(g3.sliding_period, 6);
}

// The worked example of docs/architectures.md: a family added by a spec file, checked against
// transformers' own forward of a checkpoint of that family.
TEST(ArchSpecs, ASpecFileAddsAFamily) {
  BuildConfig bc;
  bc.dtype = "f32";
  // Not in the tables: refused, naming the key no family reads.
  const std::string err = one_line_error([&] { Engine::build(hf("ernie4_5"), bc); });
  EXPECT_TRUE(contains_text(err, "'Ernie4_5ForCausalLM' is not in kiln's tables")) << err;
  EXPECT_TRUE(contains_text(err, "use_bias")) << err;
  EXPECT_TRUE(contains_text(err, "unexpected weights: model.layers.0.mlp.down_proj.bias")) << err;
  bc.arch_specs = {example_spec("Ernie4_5ForCausalLM.json").string()};
  Engine e = Engine::build(hf("ernie4_5"), bc);
  EXPECT_EQ(e.info().architecture, "Ernie4_5ForCausalLM");
  EXPECT_TRUE(e.info().conversion.empty());
  expect_matches_reference(e, "ernie4_5");
}

TEST(ArchSpecs, ARespecifiedNameReplacesTheFamily) {
  // parse_arch_spec checks without registering.
  const ArchSpec parsed = parse_arch_spec(
      R"({"name": "KilnParsedOnlyForCausalLM", "extends": "Qwen2ForCausalLM"})", "p.json");
  EXPECT_TRUE(parsed.knobs.qkv_bias);
  EXPECT_EQ(try_find_arch("KilnParsedOnlyForCausalLM"), nullptr);
  add_arch_spec(R"({"name": "KilnTestOnlyForCausalLM", "extends": "LlamaForCausalLM"})", "a.json");
  EXPECT_FALSE(find_arch("KilnTestOnlyForCausalLM").knobs.qkv_bias);
  const size_t n = supported_architectures().size();
  add_arch_spec(R"({"name": "KilnTestOnlyForCausalLM", "extends": "LlamaForCausalLM",
                    "knobs": {"qkv_bias": true}})",
                "b.json");
  EXPECT_TRUE(find_arch("KilnTestOnlyForCausalLM").knobs.qkv_bias);
  EXPECT_EQ(supported_architectures().size(), n);
}

TEST(ArchSpecs, BadSpecsAreRefusedNamingTheFileAndField) {
  const std::pair<const char*, const char*> cases[] = {
      {R"([1, 2])", "must be a JSON object"},
      {R"({"extends": "LlamaForCausalLM"})", "missing field 'name'"},
      {R"({"name": "X", "extends": "NoSuchForCausalLM"})", "'NoSuchForCausalLM', which is not"},
      {R"({"name": "X", "extends": "LlamaForCausalLM", "colour": 1})", "unknown field 'colour'"},
      {R"({"name": "X", "extends": "LlamaForCausalLM", "knobs": {"wings": true}})",
       "unknown knob 'wings'"},
      {R"({"name": "X", "extends": "LlamaForCausalLM", "knobs": {"norm": "rsm"}})",
       "knob 'norm' must be one of"},
      {R"({"name": "X", "extends": "LlamaForCausalLM", "knobs": {"qk_norm": 1}})",
       "knob 'qk_norm' must be true or false"},
      {R"({"name": "X", "tensors": [["a.weight", "layers.{layer}.wq"]]})",
       "same {layer} / {expert} placeholders"},
      {R"({"name": "X", "tensors": [["m.{layer}.w", "layers.{layer}.wz"]]})",
       "not a canonical name"},
      {R"({"name": "X", "tensors": [["m.{layer}.w"]]})", "a tensor rule must be"},
      {R"({"name": "X", "extends": "LlamaForCausalLM", "keys": {"heads": ["n_head"]}})",
       "not a hyper-parameter kiln reads"},
      {R"({"name": "X", "extends": "LlamaForCausalLM", "knob_keys": {"rope": "use_rope"}})",
       "'knob_keys' has 'rope'"},
      {R"({"name": "X", "extends": "LlamaForCausalLM", "default_act": "swoosh"})",
       "unsupported activation 'swoosh'"},
      {R"({"name": "X", "tensors": []})", "maps no tensors"},
      {R"({"name": "X", "extends": "LlamaForCausalLM", "sliding_period": "2"})",
       "'sliding_period' has the wrong type"},
      {R"({"name": )", "invalid JSON"},
      {R"({"name": "X", "extends": "LlamaForCausalLM", "variants": [{"when": {}}]})",
       "a variant needs a non-empty 'when'"},
      {R"({"name": "X", "extends": "LlamaForCausalLM",
           "variants": [{"when": {"a": 1}, "knobs": {"wings": true}}]})",
       "variant when {\"a\":1}"},
      {R"({"name": "X", "extends": "LlamaForCausalLM", "constants": {"hidden_size": 8}})",
       "'constants' can fix num_kv_heads"},
      {R"({"name": "X", "extends": "LlamaForCausalLM", "tensors": [{"hf": "m.{layer}.e",
           "canonical": "layers.{layer}.w_down", "stacked_experts": true}]})",
       "stacked_experts needs {layer} in both names and {expert} in the canonical name only"},
      {R"({"name": "X", "extends": "LlamaForCausalLM", "tensors": [{"hf": "m.{layer}.d",
           "canonical": "layers.{layer}.w_down", "interleaved_gate_up": true}]})",
       "interleaved_gate_up is for w_gate_up / b_gate_up"},
      {R"({"name": "X", "extends": "LlamaForCausalLM", "tensors": [{"hf": "m.{layer}.d",
           "canonical": "layers.{layer}.w_down", "stacked": true}]})",
       "unknown tensor rule field 'stacked'"},
      {R"({"name": "X", "extends": "LlamaForCausalLM", "knobs": {"routing": "sigmoid"}})",
       "knob 'routing' must be one of"},
  };
  for (const auto& [text, want] : cases) {
    const std::string err = one_line_error([&] { add_arch_spec(text, "my_spec.json"); });
    EXPECT_TRUE(contains_text(err, "my_spec.json")) << text << " -> " << err;
    EXPECT_TRUE(contains_text(err, want)) << text << " -> " << err;
  }
  EXPECT_EQ(try_find_arch("X"), nullptr);
  EXPECT_TRUE(contains_text(one_line_error([] { add_arch_spec_file("/nonexistent/spec.json"); }),
                            "/nonexistent/spec.json: cannot open"));
}

// One name, three layouts told apart by config values (the Falcon spec's variants; parity of
// each layout is in test_parity.cpp); the one kiln has no mechanism for is refused by name.
TEST(ArchSpecs, VariantsSelectALayoutFromConfigValues) {
  const ArchSpec& falcon = find_arch("FalconForCausalLM");
  const nlohmann::json mq = {{"multi_query", true}, {"parallel_attn", true}};
  const ArchSpec& a = specialize_arch(falcon, mq, "config.json", nullptr);
  EXPECT_EQ(a.constants.at("num_kv_heads"), 1);
  EXPECT_TRUE(a.knobs.parallel_block && a.knobs.shared_block_norm);
  EXPECT_EQ(&specialize_arch(falcon, mq, "config.json", nullptr), &a);  // cached
  const ArchSpec& b = specialize_arch(
      falcon, {{"new_decoder_architecture", true}, {"num_kv_heads", 8}}, "config.json", nullptr);
  EXPECT_TRUE(b.knobs.parallel_block);
  EXPECT_FALSE(b.knobs.shared_block_norm);
  EXPECT_EQ(b.constants.count("num_kv_heads"), 0u);
  BuildConfig bc;
  bc.dtype = "f32";
  TempDir tmp;
  copy_dir(hf("falcon_seq"), tmp / "m");
  auto cfg = read_json(tmp / "m" / "config.json");
  cfg["alibi"] = true;
  write_json(tmp / "m" / "config.json", cfg);
  EXPECT_TRUE(contains_text(one_line_error([&] { Engine::build(tmp / "m", bc); }),
                            "FalconForCausalLM with ALiBi position biases (alibi: true) is not "
                            "supported"));
}

// OLMo 3 is not in the tables: OLMo 2's names and keys explain it (its sliding-window layers are
// layer_types, which every family reads), and the engine computes what transformers does.
TEST(Unregistered, AFamilyThatAKnownOneExplainsBuildsAndMatchesTransformers) {
  BuildConfig bc;
  bc.dtype = "f32";
  Engine e = Engine::build(hf("olmo3"), bc);
  EXPECT_EQ(e.info().architecture, "Olmo2ForCausalLM");
  EXPECT_TRUE(contains_text(e.info().conversion,
                            "Olmo3ForCausalLM is not in kiln's tables: built as Olmo2ForCausalLM"))
      << e.info().conversion;
  expect_matches_reference(e, "olmo3");
}

// StableLM is not in the tables and no family explains it (LayerNorm biases, use_qkv_bias,
// use_parallel_residual, qk_layernorm): refused, naming each key and tensor for the closest.
TEST(Unregistered, AnUnexplainedKeyOrTensorIsRefusedByName) {
  BuildConfig bc;
  bc.dtype = "f32";
  std::string err = one_line_error([&] { Engine::build(hf("stablelm"), bc); });
  EXPECT_TRUE(contains_text(err, "'StableLmForCausalLM' is not in kiln's tables")) << err;
  EXPECT_TRUE(contains_text(err,
                            "config keys it does not read: qk_layernorm, "
                            "use_parallel_residual, use_qkv_bias"))
      << err;
  EXPECT_TRUE(contains_text(err, "unexpected weights: model.layers.0.input_layernorm.bias")) << err;
  EXPECT_TRUE(contains_text(err, "--arch-spec")) << err;
  // A Llama checkpoint under another name: explained by Llama, until its config has a key no
  // family reads.
  TempDir tmp;
  copy_dir(hf("llama"), tmp / "m");
  auto cfg = read_json(tmp / "m" / "config.json");
  cfg["architectures"] = {"MyLlamaForCausalLM"};
  write_json(tmp / "m" / "config.json", cfg);
  Engine ok = Engine::build(tmp / "m", bc);
  EXPECT_EQ(ok.info().architecture, "LlamaForCausalLM");
  cfg["layer_scale"] = 0.5;  // a key no family reads
  write_json(tmp / "m" / "config.json", cfg);
  err = one_line_error([&] { Engine::build(tmp / "m", bc); });
  EXPECT_TRUE(contains_text(err, "config keys it does not read: layer_scale")) << err;
}

}  // namespace
}  // namespace kiln::test
