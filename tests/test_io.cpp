// Safetensors validation, HF config parsing (transformers 4 and 5 styles) and bad-input errors.
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>

#include "arch/registry.h"
#include "build/checkpoint.h"
#include "core/error.h"
#include "graph/rope.h"
#include "kiln/kiln.h"
#include "test_util.h"

namespace kiln::test {
namespace {

// Writes a safetensors file from a raw header string and `data_bytes` zero bytes.
void write_raw(const fs::path& p, const std::string& header, size_t data_bytes) {
  std::ofstream o(p, std::ios::binary);
  uint64_t n = header.size();
  o.write(reinterpret_cast<const char*>(&n), 8);
  o << header;
  std::string zeros(data_bytes, '\0');
  o << zeros;
}

TEST(Safetensors, RoundTripAllDtypesAndMetadata) {
  TempDir tmp;
  std::vector<std::pair<std::string, Tensor>> ts;
  const DType all[] = {DType::F32,     DType::F16, DType::BF16, DType::F8_E4M3,
                       DType::F8_E5M2, DType::I8,  DType::U8,   DType::I16,
                       DType::I32,     DType::I64, DType::BOOL};
  for (DType d : all) {
    Tensor t = Tensor::zeros(d, {3, 5});
    for (size_t i = 0; i < t.nbytes(); ++i) static_cast<uint8_t*>(t.data)[i] = uint8_t(i * 7 + 1);
    ts.push_back({"t_" + std::string(dtype_name(d)), t});
  }
  write_safetensors(tmp / "a.safetensors", ts, {{"format", "pt"}});
  auto f = SafetensorsFile::open(tmp / "a.safetensors");
  EXPECT_EQ(f->metadata().at("format"), "pt");
  for (const auto& [name, t] : ts) {
    Tensor g = f->get(name);
    EXPECT_EQ(g.dtype, t.dtype);
    EXPECT_EQ(g.shape, t.shape);
    EXPECT_EQ(std::memcmp(g.data, t.data, t.nbytes()), 0) << name;
  }
}

TEST(Safetensors, UnalignedDataIsCopiedNotMisread) {
  TempDir tmp;
  // A 1-byte U8 tensor first puts the F32 tensor at an odd offset.
  std::string h =
      R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"F32","shape":[2],"data_offsets":[1,9]}})";
  std::ofstream o(tmp / "u.safetensors", std::ios::binary);
  uint64_t n = h.size();
  o.write(reinterpret_cast<const char*>(&n), 8);
  o << h;
  const float v[2] = {1.5f, -2.25f};
  o.put(7);
  o.write(reinterpret_cast<const char*>(v), 8);
  o.close();
  auto f = SafetensorsFile::open(tmp / "u.safetensors");
  Tensor b = f->get("b");
  EXPECT_EQ(reinterpret_cast<uintptr_t>(b.data) % 4, 0u);
  EXPECT_EQ(b.ptr<float>()[0], 1.5f);
  EXPECT_EQ(b.ptr<float>()[1], -2.25f);
}

TEST(Safetensors, HeaderValidation) {
  TempDir tmp;
  const fs::path p = tmp / "x.safetensors";
  struct Case {
    std::string header;
    size_t data;
    std::string expect;
  } cases[] = {
      {"{not json", 0, "not valid JSON"},
      {"[1,2]", 0, "not a JSON object"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}})", 8, "past the end"},
      {R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8, "does not match"},
      {R"({"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", 8, "unknown dtype"},
      {R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8, "negative"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8, "begin > end"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
       16, "duplicate tensor name 'a'"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
       16, "overlap"},
      {R"({"a":{"shape":[2],"data_offsets":[0,8]}})", 8, "missing dtype"},
      // Element counts whose byte size wraps 64 bits to 0 (found by fuzz/fuzz_safetensors.cpp).
      {R"({"a":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]}})", 0,
       "shape overflows"},
      {R"({"a":{"dtype":"I64","shape":[1073741824,2147483648],"data_offsets":[0,0]}})", 0,
       "shape overflows"},
      {R"({"__metadata__":{"k":1}})", 0, "__metadata__.k is not a string"},
      // The data area is exactly the tensors, back to back from byte 0.
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})",
       20, "bytes 8..12 of the data area belong to no tensor"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12,
       "bytes 0..4 of the data area belong to no tensor"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 12,
       "the tensors end at byte 8 of the data area but the file has 12 bytes"},
      // A name with a NUL and a newline: escaped, so the message is whole and one line.
      {std::string(R"({"a\u0000b\nc":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)") +
           R"("a\u0000b\nc":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
       16, "duplicate tensor name 'a\\x00b\\nc'"},
  };
  for (const auto& c : cases) {
    write_raw(p, c.header, c.data);
    std::string m = one_line_error([&] { SafetensorsFile::open(p); });
    EXPECT_TRUE(contains_text(m, c.expect)) << c.header << " -> " << m;
    EXPECT_TRUE(contains_text(m, p.string())) << m;
  }
  // A header length 8 bytes short of the header (its padding read as data): the data would be
  // read shifted; refused.
  {
    const std::string h = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
    std::ofstream o(p, std::ios::binary | std::ios::trunc);
    const uint64_t n = h.size();
    o.write(reinterpret_cast<const char*>(&n), 8);
    o << h << std::string(8, ' ') << std::string(8, '\0');
  }
  EXPECT_TRUE(contains_text(one_line_error([&] { SafetensorsFile::open(p); }),
                            "the tensors end at byte 8"));
  // Header length beyond the file, beyond 100 MB, and a file shorter than 8 bytes.
  {
    std::ofstream o(p, std::ios::binary | std::ios::trunc);
    uint64_t n = 1000;
    o.write(reinterpret_cast<const char*>(&n), 8);
    o << "{}";
  }
  EXPECT_TRUE(contains_text(one_line_error([&] { SafetensorsFile::open(p); }), "truncated"));
  {
    std::ofstream o(p, std::ios::binary | std::ios::trunc);
    uint64_t n = 200ull << 20;
    o.write(reinterpret_cast<const char*>(&n), 8);
  }
  EXPECT_TRUE(contains_text(one_line_error([&] { SafetensorsFile::open(p); }), "100 MB"));
  std::ofstream(p, std::ios::trunc) << "abc";
  EXPECT_TRUE(contains_text(one_line_error([&] { SafetensorsFile::open(p); }), "truncated"));
  EXPECT_TRUE(contains_text(
      one_line_error([&] { SafetensorsFile::open(tmp / "nope.safetensors"); }), "cannot open"));
}

// A header of 100k tensors opens in linear time. (Duplicate-name detection through nlohmann's
// parse callback rescanned the parent object at every entry's end: 50k entries took 138 s.)
// The bound is a complexity guard, not a speed goal: linear takes well under a second here.
TEST(Safetensors, ManyEntriesParseInLinearTime) {
  TempDir tmp;
  const fs::path p = tmp / "many.safetensors";
  constexpr int kN = 100000;
  std::string h = "{";
  for (int i = 0; i < kN; ++i)
    h += cat(i ? "," : "", "\"t", i, "\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[",
             4 * i, ",", 4 * i + 4, "]}");
  h += "}";
  write_raw(p, h, 4 * size_t(kN));
  const auto t0 = std::chrono::steady_clock::now();
  const auto f = SafetensorsFile::open(p);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(f->tensors().size(), size_t(kN));
  EXPECT_LT(s, 20.0) << "opening a 100k-entry header took " << s << " s";
}

TEST(Safetensors, ShardedCheckpointMatchesSingleFile) {
  TempDir tmp;
  copy_dir(hf("qwen3"), tmp / "m");
  auto single = SafetensorsFile::open(tmp / "m" / "model.safetensors");
  std::vector<std::pair<std::string, Tensor>> a, b;
  nlohmann::json map;
  for (const auto& [name, ti] : single->tensors()) {
    bool first =
        name.find("layers.0.") != std::string::npos || name.find("embed") != std::string::npos;
    (first ? a : b).push_back({name, single->get(name)});
    map[name] = first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  write_safetensors(tmp / "m" / "model-00001-of-00002.safetensors", a);
  write_safetensors(tmp / "m" / "model-00002-of-00002.safetensors", b);
  fs::remove(tmp / "m" / "model.safetensors");
  write_json(tmp / "m" / "model.safetensors.index.json", {{"metadata", {}}, {"weight_map", map}});
  BuildConfig bc;
  bc.dtype = "f32";
  Engine sharded = Engine::build(tmp / "m", bc);
  Engine whole = Engine::build(hf("qwen3"), bc);
  const std::vector<int32_t> p = {1, 200, 3};
  EXPECT_EQ(sharded.logits(p), whole.logits(p));
  // A name listed in the index but absent from its shard is reported.
  map["model.norm.weight"] = "model-00001-of-00002.safetensors";
  write_json(tmp / "m" / "model.safetensors.index.json", {{"weight_map", map}});
  EXPECT_TRUE(
      contains_text(one_line_error([&] { Engine::build(tmp / "m", bc); }), "not stored there"));
}

TEST(Config, TransformersFourAndFiveStyles) {
  auto resolve = [](const fs::path& p) {
    auto j = read_json(p);
    return resolve_config(find_arch(j["architectures"][0]), j, p.string());
  };
  ModelConfig l31 = resolve(data("configs/meta-llama__Llama-3.1-8B-Instruct.json"));
  EXPECT_EQ(l31.head_dim, 128);  // absent from this config: hidden_size / heads, as transformers
  EXPECT_EQ(l31.ropes[0].type, RopeType::Llama3);
  EXPECT_EQ(l31.ropes[0].theta, 500000.0);
  EXPECT_EQ(l31.ropes[0].original_max_position_embeddings, 8192);
  EXPECT_EQ(l31.eos_token_ids, (std::vector<int64_t>{128001, 128008, 128009}));
  ModelConfig q3 = resolve(data("configs/Qwen__Qwen3-0.6B.json"));
  EXPECT_EQ(q3.head_dim, 128);  // explicit field, not 1024 / 16
  EXPECT_TRUE(q3.knobs.qk_norm);
  EXPECT_TRUE(q3.tie_word_embeddings);
  EXPECT_EQ(q3.ropes[0].theta, 1000000.0);
  EXPECT_EQ(q3.layers[5].sliding_window, 0);
  // DeepSeek-V2-Lite (transformers 4 style, from ../shared/configs): MLA over one latent head of
  // 512 + 64, no query LoRA, greedy routing (n_group ignored), yarn mscale in the attention scale.
  ModelConfig dv2 = resolve(data("configs/deepseek-ai__DeepSeek-V2-Lite.json"));
  EXPECT_TRUE(dv2.knobs.mla);
  EXPECT_EQ(dv2.num_kv_heads, 1);
  EXPECT_EQ(dv2.head_dim, 576);
  EXPECT_EQ(dv2.q_lora_rank, 0);
  EXPECT_EQ(dv2.moe_groups, 1);
  EXPECT_EQ(dv2.shared_expert_intermediate_size, 2 * 1408);
  EXPECT_FALSE(dv2.layers[0].moe);
  EXPECT_TRUE(dv2.layers[1].moe);
  EXPECT_EQ(dv2.ropes[0].type, RopeType::Yarn);
  const double ms = 0.1 * 0.707 * std::log(40.0) + 1.0;
  EXPECT_NEAR(dv2.attn_scale, ms * ms / std::sqrt(192.0), 1e-12);
  ModelConfig q25 = resolve(data("configs/Qwen__Qwen2.5-7B-Instruct.json"));
  EXPECT_TRUE(q25.knobs.qkv_bias);
  for (const auto& l : q25.layers) EXPECT_EQ(l.sliding_window, 0);  // use_sliding_window false
  ModelConfig m7 = resolve(data("configs/mistralai__Mistral-7B-Instruct-v0.3.json"));
  EXPECT_EQ(m7.layers[0].sliding_window, 0);                     // sliding_window: null
  ModelConfig swa = resolve(hf("mistral_swa") / "config.json");  // transformers 5
  EXPECT_EQ(swa.layers[2].sliding_window, 8);
  ModelConfig r31 = resolve(hf("llama31_rope") / "config.json");
  EXPECT_EQ(r31.ropes[0].type, RopeType::Llama3);
  EXPECT_EQ(r31.ropes[0].factor, 8.0);

  // Other rope types parse from both spellings.
  auto j = read_json(hf("llama") / "config.json");
  j.erase("rope_parameters");
  j["rope_theta"] = 1234.0;
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  auto lin = resolve_config(find_arch("LlamaForCausalLM"), j, "c");
  EXPECT_EQ(lin.ropes[0].type, RopeType::Linear);
  EXPECT_EQ(lin.ropes[0].theta, 1234.0);
  j["rope_scaling"] = {{"rope_type", "dynamic"}, {"factor", 2.0}};
  EXPECT_EQ(resolve_config(find_arch("LlamaForCausalLM"), j, "c").ropes[0].type, RopeType::Dynamic);
  j["rope_scaling"] = {
      {"rope_type", "yarn"}, {"factor", 4.0}, {"original_max_position_embeddings", 64}};
  EXPECT_EQ(resolve_config(find_arch("LlamaForCausalLM"), j, "c").ropes[0].type, RopeType::Yarn);
  j["rope_scaling"] = {{"rope_type", "weird"}};
  EXPECT_TRUE(
      contains_text(one_line_error([&] { resolve_config(find_arch("LlamaForCausalLM"), j, "c"); }),
                    "unsupported rope type 'weird'"));
}

// Values that parse but break the model (NaN or degenerate logits) and sizes beyond what kiln
// can hold are refused at build, naming the field.
TEST(Config, RangesAreChecked) {
  using json = nlohmann::json;
  const fs::path src = hf("llama") / "config.json";
  const json base = read_json(src);
  auto error_for = [&](const std::function<void(json&)>& edit) {
    json j = base;
    edit(j);
    return one_line_error([&] { resolve_config(find_arch(j["architectures"][0]), j, "cfg.json"); });
  };
  struct Case {
    std::function<void(json&)> edit;
    std::string expect;
  };
  const std::vector<Case> cases = {
      {[](json& j) { j["rms_norm_eps"] = 0.0; }, "rms_norm_eps / layer_norm_eps must be a finite"},
      {[](json& j) { j["rms_norm_eps"] = -1e-6; }, "rms_norm_eps / layer_norm_eps must be"},
      {[](json& j) { j["rms_norm_eps"] = 5.0; }, "is above 1"},
      {[](json& j) { j["rope_parameters"]["rope_theta"] = 0.0; },
       "rope_theta must be a finite number > 1"},
      {[](json& j) { j["rope_parameters"]["rope_theta"] = -10000.0; }, "rope_theta must be"},
      {[](json& j) {
         j.erase("rope_parameters");
         j["rope_theta"] = 1.0;
       },
       "rope_theta must be"},
      {[](json& j) { j["query_pre_attn_scalar"] = 0.0; }, "query_pre_attn_scalar"},
      {[](json& j) { j["final_logit_softcapping"] = 1e-30; }, "final_logit_softcapping must be 0"},
      {[](json& j) { j["attn_logit_softcapping"] = -5.0; }, "attn_logit_softcapping must be 0"},
      {[](json& j) { j["partial_rotary_factor"] = 3.0; },
       "partial_rotary_factor must be in (0, 1]"},
      {[&](json& j) {
         j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 0.0}};
         j.erase("rope_parameters");
       },
       "rope scaling factor must be"},
      {[](json& j) {
         j["rope_scaling"] = {{"rope_type", "llama3"},
                              {"factor", 8.0},
                              {"low_freq_factor", 4.0},
                              {"high_freq_factor", 4.0},
                              {"original_max_position_embeddings", 64}};
         j.erase("rope_parameters");
       },
       "must be above low_freq_factor"},
      {[](json& j) { j["vocab_size"] = int64_t(1) << 33; }, "vocab_size = 8589934592 is beyond"},
      {[](json& j) { j["max_position_embeddings"] = int64_t(1) << 40; },
       "max_position_embeddings = 1099511627776 is beyond"},
      {[](json& j) {
         j["num_hidden_layers"] = 16000;
         j["hidden_size"] = 1 << 20;
         j["num_attention_heads"] = 1 << 13;
         j["num_key_value_heads"] = 1 << 13;
         j["head_dim"] = 128;
       },
       "parameters"},
      {[](json& j) { j["num_hidden_layers"] = int64_t(1) << 40; }, "num_hidden_layers = "},
  };
  for (const Case& c : cases) {
    const std::string m = error_for(c.edit);
    EXPECT_TRUE(contains_text(m, c.expect)) << "expected '" << c.expect << "' in: " << m;
    EXPECT_TRUE(contains_text(m, "cfg.json")) << m;
  }
  // The fixture and every real config of a known architecture pass.
  EXPECT_NO_THROW(resolve_config(find_arch(base["architectures"][0]), base, "cfg.json"));
  int real = 0;
  for (const auto& e : fs::directory_iterator(data("configs"))) {
    const json j = read_json(e.path());
    const ArchSpec* spec = nullptr;
    try {
      spec = &find_arch(j["architectures"][0]);
    } catch (const Error&) {
      continue;  // an architecture kiln does not have yet
    }
    EXPECT_NO_THROW(resolve_config(*spec, j, e.path().string())) << e.path();
    ++real;
  }
  EXPECT_GE(real, 10);
}

// Fields of the wrong JSON type name the file and the field, never json's exception text.
TEST(Config, WrongTypesNameTheField) {
  using json = nlohmann::json;
  const json base = read_json(hf("llama") / "config.json");
  const std::vector<std::pair<json, std::string>> cases = {
      {{{"hidden_act", 5}}, "field 'hidden_act' must be a string"},
      {{{"eos_token_id", "x"}}, "field 'eos_token_id' must be an integer or a list of integers"},
      {{{"eos_token_id", {1, "x"}}}, "field 'eos_token_id' must be a list of integers"},
      {{{"layer_types", {1, 2}}}, "field 'layer_types' must be a list of strings"},
      {{{"rope_scaling", {{"rope_type", "longrope"}, {"short_factor", "a"}, {"long_factor", {1}}}}},
       "field 'short_factor' must be a list of numbers"},
      {{{"rope_scaling", {{"rope_type", "yarn"}, {"factor", 2}, {"mscale", "x"}}}},
       "field 'mscale' must be a number"},
      {{{"rope_scaling", "yarn"}}, "field 'rope_scaling' must be an object, not string"},
      {{{"rope_parameters", 10000}}, "field 'rope_parameters' must be an object, not number"},
      // One factor per rotated pair (the fixture's head_dim is 16: 8 pairs).
      {{{"rope_scaling",
         {{"rope_type", "longrope"}, {"short_factor", {1, 1}}, {"long_factor", {1, 1}}}}},
       "longrope short_factor and long_factor have 2 and 2 entries; the rotary dimension 16 "
       "needs 8 each"},
  };
  for (const auto& [edit, want] : cases) {
    json j = base;
    j.update(edit);
    if (edit.contains("rope_scaling")) j.erase("rope_parameters");
    if (edit.contains("rope_parameters")) j.erase("rope_scaling");
    const std::string m =
        one_line_error([&] { resolve_config(find_arch(j["architectures"][0]), j, "cfg.json"); });
    EXPECT_TRUE(contains_text(m, "cfg.json: " + want)) << "expected '" << want << "' in: " << m;
    EXPECT_FALSE(contains_text(m, "json.exception")) << m;
  }
}

TEST(Config, RealConfigsOfTheBreadthFamilies) {
  auto resolve = [](const std::string& name) {
    const fs::path p = data("configs/" + name + ".json");
    auto j = read_json(p);
    return resolve_config(find_arch(j["architectures"][0]), j, p.string());
  };
  ModelConfig phi = resolve("microsoft__Phi-3.5-mini-instruct");
  EXPECT_EQ(phi.ropes[0].type, RopeType::LongRope);
  EXPECT_EQ(phi.ropes[0].original_max_position_embeddings, 4096);  // top-level field
  EXPECT_EQ(phi.ropes[0].long_factor.size(), 48u);
  double af = 0;
  auto inv_short = rope_inv_freq(phi.ropes[0], 96, phi.max_position_embeddings, 100, &af);
  auto inv_long = rope_inv_freq(phi.ropes[0], 96, phi.max_position_embeddings, 5000, &af);
  EXPECT_NEAR(af, std::sqrt(1 + std::log(32.0) / std::log(4096.0)), 1e-12);
  EXPECT_NE(inv_short, inv_long);  // long factors past original_max_position_embeddings
  ModelConfig g2 = resolve("google__gemma-2-9b-it");  // transformers 4: no layer_types
  EXPECT_EQ(g2.layers[0].sliding_window, 4096);
  EXPECT_EQ(g2.layers[1].sliding_window, 0);
  EXPECT_EQ(g2.attn_softcap, 50.0);
  EXPECT_EQ(g2.final_softcap, 30.0);
  EXPECT_DOUBLE_EQ(g2.attn_scale, 1.0 / 16.0);  // query_pre_attn_scalar 256
  EXPECT_EQ(g2.act, Activation::GeluTanh);
  ModelConfig g3 = resolve("google__gemma-3-1b-it");
  for (int i = 0; i < 12; ++i) {
    const bool global = (i + 1) % 6 == 0;
    EXPECT_EQ(g3.layers[size_t(i)].sliding_window, global ? 0 : 512) << i;
    EXPECT_EQ(g3.ropes[size_t(g3.layers[size_t(i)].rope)].theta, global ? 1e6 : 1e4) << i;
  }
  ModelConfig gpt2 = resolve("openai-community__gpt2");
  EXPECT_EQ(gpt2.hidden_size, 768);
  EXPECT_EQ(gpt2.intermediate_size, 3072);  // n_inner absent: 4 x n_embd
  EXPECT_EQ(gpt2.ropes[0].type, RopeType::None);
  EXPECT_TRUE(gpt2.tie_word_embeddings);
  ModelConfig moe = resolve("Qwen__Qwen3-30B-A3B");
  EXPECT_EQ(moe.num_experts, 128);
  EXPECT_EQ(moe.experts_per_token, 8);
  EXPECT_TRUE(moe.norm_topk_prob);
  EXPECT_TRUE(moe.layers[0].moe);
  for (const char* n : {"microsoft__phi-4", "HuggingFaceTB__SmolLM2-1.7B-Instruct",
                        "meta-llama__Llama-3.2-1B-Instruct"})
    EXPECT_GT(resolve(n).num_layers, 0) << n;
}

TEST(Config, RopeScalingVariantsChangeLogits) {
  // linear / dynamic / yarn must run and differ from plain RoPE on the llama fixture.
  BuildConfig bc;
  bc.dtype = "f32";
  Engine base = Engine::build(hf("llama"), bc);
  std::vector<int32_t> p(40);
  for (size_t i = 0; i < p.size(); ++i) p[i] = int32_t(i * 7 % 500);
  const auto ref = base.logits(p);
  for (nlohmann::json rp :
       {nlohmann::json{{"rope_type", "linear"}, {"factor", 2.0}, {"rope_theta", 10000.0}},
        nlohmann::json{{"rope_type", "dynamic"}, {"factor", 2.0}, {"rope_theta", 10000.0}},
        nlohmann::json{{"rope_type", "yarn"},
                       {"factor", 4.0},
                       {"rope_theta", 10000.0},
                       {"original_max_position_embeddings", 64}}}) {
    TempDir tmp;
    copy_dir(hf("llama"), tmp / "m");
    auto c = read_json(tmp / "m" / "config.json");
    c["rope_parameters"] = rp;
    if (rp["rope_type"] == "dynamic") c["max_position_embeddings"] = 32;  // 40 > 32 triggers NTK
    write_json(tmp / "m" / "config.json", c);
    BuildConfig b2 = bc;
    if (rp["rope_type"] == "dynamic") {
      std::vector<int32_t> q(p.begin(), p.begin() + 32);
      EXPECT_EQ(Engine::build(tmp / "m", b2).logits(q).size(), q.size() * 512);
      continue;
    }
    auto got = Engine::build(tmp / "m", b2).logits(p);
    EXPECT_GT(rel_err(got.data(), ref.data(), int64_t(ref.size())), 1e-3) << rp.dump();
  }
}

// The bad inputs the foundation issue lists, each through the CLI: exit status 1, one line.
class BadInput : public ::testing::Test {
 protected:
  TempDir tmp;
  fs::path model() {
    copy_dir(hf("llama"), tmp / "m");
    return tmp / "m";
  }
  void expect_error(const std::string& args, const std::string& part) {
    std::string out;
    int rc = run_cli(args, &out);
    EXPECT_EQ(rc, 1) << args << "\n" << out;
    EXPECT_TRUE(out.rfind("kiln: error: ", 0) == 0) << out;
    EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << out;
    EXPECT_TRUE(contains_text(out, part)) << "expected '" << part << "' in: " << out;
    EXPECT_FALSE(fs::exists(tmp / "engine")) << "a failed build left an engine behind";
  }
};

TEST_F(BadInput, TruncatedSafetensors) {
  fs::path m = model();
  fs::resize_file(m / "model.safetensors", fs::file_size(m / "model.safetensors") / 2);
  expect_error("build " + m.string() + " -o " + (tmp / "engine").string(),
               "past the end of the data");
}

TEST_F(BadInput, OffsetPastEnd) {
  fs::path m = model();
  write_raw(m / "model.safetensors", R"({"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})",
            4);
  expect_error("build " + m.string() + " -o " + (tmp / "engine").string(),
               "data_offsets end 16 is past the end");
}

TEST_F(BadInput, WrongShapeAndMissingWeightAllReported) {
  fs::path m = model();
  auto f = SafetensorsFile::open(m / "model.safetensors");
  std::vector<std::pair<std::string, Tensor>> ts;
  for (const auto& [name, ti] : f->tensors()) {
    if (name == "model.layers.1.mlp.up_proj.weight" ||
        name == "model.layers.2.self_attn.o_proj.weight")
      continue;
    Tensor t = f->get(name);
    if (name == "model.layers.0.self_attn.k_proj.weight") t.shape = {64, 32};  // transposed
    ts.push_back({name, t});
  }
  ts.push_back({"model.layers.0.mlp.extra.weight", Tensor::zeros(DType::F32, {2})});
  write_safetensors(tmp / "w.safetensors", ts);
  f.reset();
  fs::rename(tmp / "w.safetensors", m / "model.safetensors");
  std::string out;
  EXPECT_EQ(run_cli("build " + m.string() + " -o " + (tmp / "engine").string(), &out), 1);
  EXPECT_TRUE(contains_text(out, "layers.1.w_up")) << out;
  EXPECT_TRUE(contains_text(out, "layers.2.wo")) << out;
  EXPECT_TRUE(
      contains_text(out, "model.layers.0.self_attn.k_proj.weight [64, 32] (expected [32, 64])"))
      << out;
  EXPECT_TRUE(contains_text(out, "unexpected weights: model.layers.0.mlp.extra.weight")) << out;
  EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << out;
  EXPECT_FALSE(fs::exists(tmp / "engine"));
}

TEST_F(BadInput, DeeplyNestedConfig) {
  fs::path m = model();
  std::ifstream in(m / "config.json");
  std::string c((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  c.insert(c.rfind('}'), ", \"unused\": " + std::string(300000, '[') + std::string(300000, ']'));
  std::ofstream(m / "config.json", std::ios::trunc) << c;
  expect_error("build " + m.string() + " -o " + (tmp / "engine").string(),
               "config.json: JSON nested deeper than 128 levels");
}

// An architecture in no table is built only when a known family explains every config key and
// tensor (test_arch_specs.cpp); here one key is left unexplained.
TEST_F(BadInput, UnknownArchitecture) {
  fs::path m = model();
  auto c = read_json(m / "config.json");
  c["architectures"] = {"FooForCausalLM"};
  c["foo_mode"] = 3;
  write_json(m / "config.json", c);
  expect_error("build " + m.string() + " -o " + (tmp / "engine").string(),
               "architecture 'FooForCausalLM' is not in kiln's tables and no known family "
               "explains this checkpoint; closest: LlamaForCausalLM (config keys it does not "
               "read: foo_mode)");
}

TEST_F(BadInput, MissingConfigField) {
  fs::path m = model();
  auto c = read_json(m / "config.json");
  c.erase("num_attention_heads");
  write_json(m / "config.json", c);
  expect_error("build " + m.string() + " -o " + (tmp / "engine").string(),
               "config.json: missing config field 'num_attention_heads'");
}

TEST_F(BadInput, PromptLongerThanMaxPositions) {
  fs::path m = model();
  std::string ids = "1";
  for (int i = 1; i < 257; ++i) ids += ",5";
  expect_error("run " + m.string() + " --prompt-ids " + ids,
               "prompt has 257 tokens but the engine allows at most 256");
  expect_error("run " + m.string() + " --prompt-ids 1,2,x", "'x' is not a token id");
  expect_error("run " + m.string() + " --prompt-ids 1,512", "outside the vocabulary");
  expect_error("run " + (tmp / "nowhere").string() + " --prompt-ids 1",
               "no such file or directory");
}

// `kiln --version`: kiln's version, the commit, the engine format, and the CUDA libraries (or
// that there are none), on stdout with exit status 0.
TEST(Cli, Version) {
  std::string out;
  EXPECT_EQ(run_cli("--version", &out), 0) << out;
  EXPECT_EQ(out.rfind("kiln " + build_info().version + " (commit ", 0), 0u) << out;
  EXPECT_TRUE(contains_text(out, cat("engine format ", build_info().engine_format))) << out;
  EXPECT_TRUE(contains_text(out, "cuBLASLt") || contains_text(out, "built without CUDA")) << out;
  EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << out;
}

// Argument errors read like every other error: one `kiln: error:` line, exit status 1.
TEST(Cli, ArgumentErrorsAreOneLine) {
  for (const std::string args :
       {"build " + hf("llama").string(), std::string("run --bogus x"), std::string("")}) {
    std::string out;
    EXPECT_EQ(run_cli(args, &out), 1) << args << ": " << out;
    EXPECT_EQ(out.rfind("kiln: error: ", 0), 0u) << out;
    EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << out;
  }
}

TEST(Cli, BuildRunLogitsEndToEnd) {
  TempDir tmp;
  std::string out;
  ASSERT_EQ(run_cli("build " + hf("llama").string() + " -o " + (tmp / "e").string(), &out), 0)
      << out;
  Reference ref = load_reference("llama");
  std::string ids;
  for (size_t i = 0; i < ref.prompts[1].size(); ++i)
    ids += (i ? "," : "") + std::to_string(ref.prompts[1][i]);
  ASSERT_EQ(run_cli("run " + (tmp / "e").string() + " --prompt-ids " + ids +
                        " --max-tokens 16 --ignore-eos --temperature 0",
                    &out),
            0)
      << out;
  std::string want;
  for (size_t i = 0; i < 16; ++i) want += (i ? "," : "") + std::to_string(ref.greedy[1][i]);
  // stdout: the ids; stderr: the finish reason (and on a GPU, the KV cache report first).
  EXPECT_NE(out.find(want + "\n[finish_reason: length]\n"), std::string::npos) << out;
  ASSERT_EQ(run_cli("logits " + (tmp / "e").string() + " --prompt-ids " + ids + " --out " +
                        (tmp / "l.safetensors").string(),
                    &out),
            0)
      << out;
  auto f = SafetensorsFile::open(tmp / "l.safetensors");
  Tensor l = f->get("logits");
  ASSERT_EQ(l.shape, (Shape{int64_t(ref.prompts[1].size()), 512}));
  for (int64_t i = 0; i < l.shape[0]; ++i)
    EXPECT_LE(rel_err(l.ptr<float>() + i * 512, ref.logits[1].ptr<float>() + i * 512, 512), 1e-5);
}

}  // namespace
}  // namespace kiln::test
