// Checkpoints quantized as published: AWQ and GPTQ (int4-wo) and FP8 (compressed-tensors,
// ModelOpt), each packed here from the llama fixture the way its producer writes it, loaded by
// kiln, and checked against the weights it stands for; variants kiln does not run are refused
// by name.
#include <cstring>
#include <map>
#include <numeric>
#include <random>

#include "build/checkpoint.h"
#include "build/engine_file.h"
#include "build/quantize.h"
#include "core/error.h"
#include "core/quant.h"
#include "graph/backend.h"
#include "kiln/kiln.h"
#include "test_util.h"

namespace kiln::test {
namespace {

// Group quantization of a linear weight as AWQ and GPTQ packers do it, with power-of-two scales
// so that every dequantized value (q - z) * s is exact in BF16: q [out, in], z and s [out, in /
// g], and the dequantized weight.
struct Int4Groups {
  std::vector<int32_t> q, z;
  std::vector<float> s, deq;
};
Int4Groups int4_groups(const Tensor& t, int64_t g) {
  const int64_t out = t.shape[0], in = t.shape[1], G = in / g;
  std::vector<float> w(static_cast<size_t>(out * in));
  to_f32(t.dtype, t.data, w.data(), w.size());
  Int4Groups r{std::vector<int32_t>(w.size()), std::vector<int32_t>(size_t(out * G)),
               std::vector<float>(size_t(out * G)), std::vector<float>(w.size())};
  for (int64_t o = 0; o < out; ++o)
    for (int64_t k = 0; k < G; ++k) {
      float lo = 0, hi = 0;
      for (int64_t c = k * g; c < (k + 1) * g; ++c)
        lo = std::min(lo, w[size_t(o * in + c)]), hi = std::max(hi, w[size_t(o * in + c)]);
      const float s = std::exp2(std::ceil(std::log2((hi - lo) / 15.0f)));
      const int z = int(std::clamp(std::nearbyint(-lo / s), 0.0f, 15.0f));
      r.s[size_t(o * G + k)] = s, r.z[size_t(o * G + k)] = z;
      for (int64_t c = k * g; c < (k + 1) * g; ++c) {
        const int qv =
            int(std::clamp(std::nearbyint(w[size_t(o * in + c)] / s) + float(z), 0.0f, 15.0f));
        r.q[size_t(o * in + c)] = qv;
        r.deq[size_t(o * in + c)] = float(qv - z) * s;
      }
    }
  return r;
}

// FP8 checkpoints as compressed-tensors (float-quantized) and ModelOpt write them, packed here
// from the llama fixture: every dense linear as E4M3 codes with a power-of-two weight_scale per
// tensor (per output channel for down_proj), plus static input scales kiln does not use. kiln
// must keep the codes as published, each row's scale its part's, and build an fp8 engine whose
// logits stay within the fp8 quality bound; other FP8 layouts are refused by name.
TEST(QuantFp8Checkpoint, LoadsAsPublished) {
  TempDir tmp;
  copy_dir(hf("llama"), tmp / "ct");
  auto file = SafetensorsFile::open(hf("llama") / "model.safetensors");
  std::vector<std::pair<std::string, Tensor>> ts;
  std::map<std::string, std::pair<Tensor, std::vector<float>>> published;  // codes, row scales
  for (const auto& [name, ti] : file->tensors()) {
    const Tensor t = file->get(name);
    if (name.find("_proj.weight") == std::string::npos) {
      ts.push_back({name, t});
      continue;
    }
    const int64_t out = t.shape[0], in = t.shape[1];
    const bool channel = name.find("down_proj") != std::string::npos;
    std::vector<float> w(static_cast<size_t>(out * in)), rs(static_cast<size_t>(out));
    to_f32(t.dtype, t.data, w.data(), w.size());
    float amax = 0;
    for (float v : w) amax = std::max(amax, std::fabs(v));
    Tensor codes = Tensor::zeros(DType::F8_E4M3, {out, in});
    for (int64_t o = 0; o < out; ++o) {
      float ra = amax;
      if (channel) {
        ra = 0;
        for (int64_t c = 0; c < in; ++c) ra = std::max(ra, std::fabs(w[size_t(o * in + c)]));
      }
      const float sc = std::exp2(std::ceil(std::log2(ra / 448.0f)));  // exact division
      rs[size_t(o)] = sc;
      for (int64_t c = 0; c < in; ++c)
        codes.ptr<uint8_t>()[o * in + c] = f32_to_e4m3(w[size_t(o * in + c)] / sc);
    }
    Tensor scale = channel ? Tensor::zeros(DType::F32, {out, 1}) : Tensor::zeros(DType::F32, {1});
    std::copy_n(rs.begin(), channel ? out : 1, scale.ptr<float>());
    const std::string base = name.substr(0, name.size() - 7);
    ts.push_back({name, codes});
    ts.push_back({base + ".weight_scale", scale});
    Tensor one = Tensor::zeros(DType::F32, {1});
    one.ptr<float>()[0] = 1.0f;
    ts.push_back({base + ".input_scale", one});
    published[name] = {codes, rs};
  }
  file.reset();
  write_safetensors(tmp / "ct" / "model.safetensors", ts);
  copy_dir(tmp / "ct", tmp / "mo");
  auto cfg = read_json(tmp / "ct" / "config.json");
  write_json(tmp / "mo" / "config.json", cfg);  // ModelOpt: described by hf_quant_config.json
  write_json(tmp / "mo" / "hf_quant_config.json",
             {{"producer", {{"name", "modelopt"}}},
              {"quantization", {{"quant_algo", "FP8"}, {"exclude_modules", {"lm_head"}}}}});
  cfg["quantization_config"] = {
      {"quant_method", "compressed-tensors"},
      {"format", "float-quantized"},
      {"config_groups",
       {{"group_0",
         {{"targets", {"Linear"}},
          {"weights",
           {{"num_bits", 8}, {"type", "float"}, {"strategy", "tensor"}, {"symmetric", true}}},
          {"input_activations",
           {{"num_bits", 8}, {"type", "float"}, {"strategy", "tensor"}, {"dynamic", false}}}}}}},
      {"ignore", {"lm_head"}}};
  write_json(tmp / "ct" / "config.json", cfg);

  BuildConfig bc;
  bc.dtype = "bf16";
  const ModelInfo built = Engine::build_to(tmp / "ct", tmp / "e", bc);
  EXPECT_EQ(built.quant, "fp8");
  // The engine holds the published codes; each row's scale is its part's (q, k, v fused).
  auto eng = SafetensorsFile::open(tmp / "e" / kEngineWeights);
  const int64_t L = cfg["num_hidden_layers"].get<int64_t>();
  for (int64_t l = 0; l < L; ++l) {
    const std::string p = cat("model.layers.", l, ".");
    for (const auto& [engine_name, parts] :
         std::vector<std::pair<std::string, std::vector<std::string>>>{
             {"wqkv", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}},
             {"wo", {"self_attn.o_proj"}},
             {"w_gate_up", {"mlp.gate_proj", "mlp.up_proj"}},
             {"w_down", {"mlp.down_proj"}}}) {
      const Tensor codes = eng->get(cat("layers.", l, ".", engine_name));
      const Tensor sc = eng->get(cat("layers.", l, ".", engine_name, ".scale"));
      ASSERT_EQ(codes.dtype, DType::F8_E4M3);
      int64_t row = 0;
      for (const auto& part : parts) {
        const auto& [pc, rs] = published.at(p + part + ".weight");
        const int64_t out = pc.shape[0], in = pc.shape[1];
        EXPECT_EQ(std::memcmp(static_cast<const uint8_t*>(codes.data) + row * in, pc.data,
                              size_t(out * in)),
                  0)
            << engine_name << " " << part;
        for (int64_t o = 0; o < out; ++o)
          ASSERT_EQ(sc.ptr<float>()[row + o], rs[size_t(o)]) << engine_name << " " << part;
        row += out;
      }
      EXPECT_EQ(row, codes.shape[0]);
    }
  }
  eng.reset();
  // ModelOpt's description gives the same engine; the logits stay within the fp8 bound.
  Engine ct = Engine::load(tmp / "e"), mo = Engine::build(tmp / "mo", bc);
  ct.start({.device = "cpu"});
  mo.start({.device = "cpu"});
  Reference ref = load_reference("llama");
  const int64_t V = ct.info().vocab_size;
  double num = 0, den = 0;
  for (size_t j = 0; j < ref.prompts.size(); ++j) {
    const std::vector<float> got = ct.logits(ref.prompts[j]);
    EXPECT_EQ(got, mo.logits(ref.prompts[j]));
    const float* want = ref.logits[j].ptr<float>();
    for (size_t i = 0; i < ref.prompts[j].size() * size_t(V); ++i)
      num += (double(got[i]) - want[i]) * (double(got[i]) - want[i]),
          den += double(want[i]) * want[i];
  }
  std::printf("[fp8 checkpoint] llama, compressed-tensors / ModelOpt layout: NMSE %.2e\n",
              num / den);
  EXPECT_LT(num / den, 2e-2);

  // Refusals, each by name.
  BuildConfig q8 = bc;
  q8.quant = "int8-wo";
  std::string err = error_of([&] { Engine::build(tmp / "ct", q8); });
  EXPECT_NE(err.find("the checkpoint is fp8; --quant int8-wo would requantize it"),
            std::string::npos)
      << err;
  auto bad = cfg;
  bad["quantization_config"]["config_groups"]["group_0"]["weights"]["type"] = "int";
  bad["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 4;
  write_json(tmp / "ct" / "config.json", bad);
  err = error_of([&] { Engine::build(tmp / "ct", bc); });
  EXPECT_NE(err.find("config_groups.group_0.weights: 4-bit int per tensor is not supported yet"),
            std::string::npos)
      << err;
  bad = cfg;
  bad["quantization_config"] = {{"quant_method", "fp8"}, {"weight_block_size", {128, 128}}};
  write_json(tmp / "ct" / "config.json", bad);
  err = error_of([&] { Engine::build(tmp / "ct", bc); });  // block-wise: its scales are _inv
  EXPECT_NE(err.find("model.layers.0.self_attn.q_proj.weight_scale_inv"), std::string::npos) << err;
  write_json(tmp / "mo" / "hf_quant_config.json", {{"quantization", {{"quant_algo", "NVFP4"}}}});
  err = error_of([&] { Engine::build(tmp / "mo", bc); });
  EXPECT_NE(err.find("quant_algo 'NVFP4': kiln loads ModelOpt FP8 only"), std::string::npos) << err;
  // FP8 codes without a quantization config, and a missing weight_scale.
  fs::remove(tmp / "mo" / "hf_quant_config.json");
  err = error_of([&] { Engine::build(tmp / "mo", bc); });
  EXPECT_NE(err.find("has dtype F8_E4M3 but config.json has no FP8 quantization_config"),
            std::string::npos)
      << err;
  write_json(tmp / "ct" / "config.json", cfg);
  std::vector<std::pair<std::string, Tensor>> missing;
  for (auto& [n, t] : ts)
    if (n != "model.layers.1.mlp.up_proj.weight_scale") missing.push_back({n, t});
  write_safetensors(tmp / "ct" / "model.safetensors", missing);
  err = error_of([&] { Engine::build(tmp / "ct", bc); });
  EXPECT_NE(err.find("missing weights"), std::string::npos) << err;
  EXPECT_NE(err.find("model.layers.1.mlp.up_proj.weight_scale"), std::string::npos) << err;
}

// Block-wise FP8 as DeepSeek-V3 and Qwen3-FP8 publish it (quant_method fp8, weight_block_size,
// E4M3 .weight with .weight_scale_inv per block), packed here from the llama fixture in 24 x 48
// blocks (several per tensor, partial ones at the edges: 64 = 2 * 24 + 16) with
// power-of-two scales, so every dequantized weight is exact in BF16. kiln dequantizes it as it
// loads: the engine must give bit for bit the logits of the plain checkpoint holding those
// weights, and --quant fp8 requantizes it per channel. The deepseek_v3 fixture in the same format
// (every projection and expert; its wkv_a rows are reordered and its wkv_b absorbed at build)
// must match its plain twin the same way.
class QuantFp8BlockCheckpoint : public ::testing::TestWithParam<const char*> {};

TEST_P(QuantFp8BlockCheckpoint, BlockWiseLoadsDequantized) {
  const std::string fx = GetParam();
  TempDir tmp;
  copy_dir(hf(fx), tmp / "blk");
  copy_dir(hf(fx), tmp / "plain");
  constexpr int64_t bh = 24, bw = 48;
  auto file = SafetensorsFile::open(hf(fx) / "model.safetensors");
  std::vector<std::pair<std::string, Tensor>> blk, plain;
  for (const auto& [name, ti] : file->tensors()) {
    const Tensor t = file->get(name);
    if (name.find("proj") == std::string::npos || !name.ends_with(".weight")) {
      blk.push_back({name, t});
      plain.push_back({name, t});
      continue;
    }
    const int64_t out = t.shape[0], in = t.shape[1], R = (out + bh - 1) / bh,
                  C = (in + bw - 1) / bw;
    std::vector<float> w(static_cast<size_t>(out * in));
    to_f32(t.dtype, t.data, w.data(), w.size());
    Tensor codes = Tensor::zeros(DType::F8_E4M3, {out, in});
    Tensor inv = Tensor::zeros(DType::F32, {R, C});
    Tensor deq = Tensor::zeros(DType::F32, {out, in});
    for (int64_t br = 0; br < R; ++br)
      for (int64_t bc = 0; bc < C; ++bc) {
        float amax = 0;
        for (int64_t r = br * bh; r < std::min(out, (br + 1) * bh); ++r)
          for (int64_t c = bc * bw; c < std::min(in, (bc + 1) * bw); ++c)
            amax = std::max(amax, std::fabs(w[size_t(r * in + c)]));
        const float s = std::exp2(std::ceil(std::log2(amax / 448.0f)));
        inv.ptr<float>()[br * C + bc] = s;
        for (int64_t r = br * bh; r < std::min(out, (br + 1) * bh); ++r)
          for (int64_t c = bc * bw; c < std::min(in, (bc + 1) * bw); ++c) {
            const uint8_t q = f32_to_e4m3(w[size_t(r * in + c)] / s);
            codes.ptr<uint8_t>()[r * in + c] = q;
            deq.ptr<float>()[r * in + c] = e4m3_to_f32(q) * s;
          }
      }
    const std::string base = name.substr(0, name.size() - 7);
    blk.push_back({name, codes});
    blk.push_back({base + ".weight_scale_inv", inv});
    plain.push_back({name, deq});
  }
  file.reset();
  write_safetensors(tmp / "blk" / "model.safetensors", blk);
  write_safetensors(tmp / "plain" / "model.safetensors", plain);
  auto cfg = read_json(tmp / "blk" / "config.json");
  cfg["quantization_config"] = {{"quant_method", "fp8"},
                                {"activation_scheme", "dynamic"},
                                {"fmt", "e4m3"},
                                {"weight_block_size", {bh, bw}}};
  write_json(tmp / "blk" / "config.json", cfg);

  BuildConfig bc;
  bc.dtype = "bf16";
  Engine e = Engine::build(tmp / "blk", bc), ref = Engine::build(tmp / "plain", bc);
  EXPECT_EQ(e.info().quant, "none");
  e.start({.device = "cpu"});
  ref.start({.device = "cpu"});
  for (const auto& p : std::vector<std::vector<int32_t>>{{5, 17, 300, 2, 99}, {1, 2, 3}})
    EXPECT_EQ(e.logits(p), ref.logits(p));
  BuildConfig f8 = bc;
  f8.quant = "fp8";
  EXPECT_EQ(Engine::build(tmp / "blk", f8).info().quant, "fp8");

  // A scale tensor of the wrong shape is named.
  for (auto& [n, t] : blk)
    if (n == "model.layers.0.mlp.down_proj.weight_scale_inv") t = Tensor::zeros(DType::F32, {1, 1});
  write_safetensors(tmp / "blk" / "model.safetensors", blk);
  const std::string err = error_of([&] { Engine::build(tmp / "blk", bc); });
  EXPECT_NE(err.find("model.layers.0.mlp.down_proj.weight_scale_inv F32[1, 1] (expected a float "
                     "scale per 24x48 block"),
            std::string::npos)
      << err;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, QuantFp8BlockCheckpoint,
                         ::testing::Values("llama", "deepseek_v3"));

// The llama fixture packed as a GPTQ checkpoint (AutoGPTQ's v1 format: qweight I32 [in / 8, out]
// with values in order along the inputs, qzeros I32 [in / g, out / 8] holding zero - 1, scales
// F16 [in / g, out], g_idx [in]) in `gptq`, with power-of-two scales so every dequantized weight is
// exact in BF16, and the plain checkpoint holding those dequantized weights in `plain`. With
// `act_order`, each module's inputs are grouped as GPTQ's desc_act does: a random order per
// input (q/k/v share one, as gate/up do, since they share the Hessian), g_idx[order[i]] = i / g.
// Returns the GPTQ tensors (for tests to spoil).
std::vector<std::pair<std::string, Tensor>> write_gptq(const fs::path& gptq, const fs::path& plain,
                                                       int64_t g, bool act_order) {
  copy_dir(hf("llama"), gptq);
  copy_dir(hf("llama"), plain);
  auto file = SafetensorsFile::open(hf("llama") / "model.safetensors");
  std::vector<std::pair<std::string, Tensor>> out_t, plain_t;
  std::map<std::string, std::vector<int64_t>> orders;  // by layer and input
  std::mt19937 rng(7);
  for (const auto& [name, ti] : file->tensors()) {
    const Tensor t = file->get(name);
    if (name.find("_proj.weight") == std::string::npos) {
      out_t.push_back({name, t});
      plain_t.push_back({name, t});
      continue;
    }
    const int64_t out = t.shape[0], in = t.shape[1], G = in / g;
    // Input key: the layer and which input the module reads.
    const std::string layer =
        name.substr(0, name.find(".self_attn") < name.find(".mlp") ? name.find(".self_attn")
                                                                   : name.find(".mlp"));
    const bool qkv = name.find("q_proj") != std::string::npos ||
                     name.find("k_proj") != std::string::npos ||
                     name.find("v_proj") != std::string::npos;
    const bool gu =
        name.find("gate_proj") != std::string::npos || name.find("up_proj") != std::string::npos;
    const std::string key = layer + (qkv ? "qkv" : gu ? "gate_up" : name);
    std::vector<int64_t>& order = orders[key];
    if (order.empty()) {
      order.resize(size_t(in));
      std::iota(order.begin(), order.end(), 0);
      if (act_order) std::shuffle(order.begin(), order.end(), rng);
    }
    // Quantize the columns in `order`: group k holds inputs order[k * g .. (k + 1) * g).
    Tensor tp = Tensor::zeros(DType::F32, t.shape);
    std::vector<float> w(static_cast<size_t>(out * in));
    to_f32(t.dtype, t.data, w.data(), w.size());
    for (int64_t o = 0; o < out; ++o)
      for (int64_t i = 0; i < in; ++i)
        tp.ptr<float>()[o * in + i] = w[size_t(o * in + order[size_t(i)])];
    const Int4Groups q = int4_groups(tp, g);
    Tensor qweight = Tensor::zeros(DType::I32, {in / 8, out});
    Tensor qzeros = Tensor::zeros(DType::I32, {G, out / 8});
    Tensor scales = Tensor::zeros(DType::F16, {G, out});
    Tensor gidx = Tensor::zeros(DType::I32, {in});
    Tensor d = Tensor::zeros(DType::F32, t.shape);
    auto* qw = reinterpret_cast<uint32_t*>(qweight.ptr<int32_t>());
    auto* qz = reinterpret_cast<uint32_t*>(qzeros.ptr<int32_t>());
    for (int64_t i = 0; i < in; ++i) gidx.ptr<int32_t>()[order[size_t(i)]] = int32_t(i / g);
    for (int64_t o = 0; o < out; ++o) {
      for (int64_t k = 0; k < G; ++k) {
        scales.ptr<uint16_t>()[k * out + o] = f32_to_f16(q.s[size_t(o * G + k)]);
        // v1 format: zero - 1
        qz[k * (out / 8) + o / 8] |= uint32_t((q.z[size_t(o * G + k)] - 1) & 15) << (4 * (o % 8));
      }
      for (int64_t i = 0; i < in; ++i) {  // input c = order[i], stored in its own place
        const int64_t c = order[size_t(i)];
        qw[(c / 8) * out + o] |= uint32_t(q.q[size_t(o * in + i)]) << (4 * (c % 8));
        d.ptr<float>()[o * in + c] = q.deq[size_t(o * in + i)];
      }
    }
    const std::string base = name.substr(0, name.size() - 7);
    out_t.push_back({base + ".qweight", qweight});
    out_t.push_back({base + ".qzeros", qzeros});
    out_t.push_back({base + ".scales", scales});
    out_t.push_back({base + ".g_idx", gidx});
    plain_t.push_back({name, d});
  }
  file.reset();
  write_safetensors(gptq / "model.safetensors", out_t);
  write_safetensors(plain / "model.safetensors", plain_t);
  auto cfg = read_json(gptq / "config.json");
  cfg["quantization_config"] = {{"quant_method", "gptq"}, {"bits", 4},
                                {"group_size", g},        {"desc_act", act_order},
                                {"sym", false},           {"checkpoint_format", "gptq"}};
  write_json(gptq / "config.json", cfg);
  return out_t;
}

// A GPTQ checkpoint without act-order must load as int4-wo and give bit for bit the logits of the
// plain checkpoint holding the dequantized weights. A shuffled g_idx without desc_act is refused.
TEST(QuantGptq, LoadsAsPublishedAndMatchesTheDequantizedWeights) {
  TempDir tmp;
  auto gptq = write_gptq(tmp / "gptq", tmp / "plain", 32, false);
  BuildConfig bc;
  bc.dtype = "bf16";
  Engine e = Engine::build(tmp / "gptq", bc);
  EXPECT_EQ(e.info().quant, "int4-wo");
  Engine ref = Engine::build(tmp / "plain", bc);
  e.start({.device = "cpu"});
  ref.start({.device = "cpu"});
  for (const auto& p : std::vector<std::vector<int32_t>>{{5, 17, 300, 2, 99}, {1, 2, 3}})
    EXPECT_EQ(e.logits(p), ref.logits(p));

  // A shuffled g_idx (act-order written without the flag) is refused.
  for (auto& [n, t] : gptq)
    if (n == "model.layers.0.mlp.down_proj.g_idx")
      std::swap(t.ptr<int32_t>()[0], t.ptr<int32_t>()[40]);
  write_safetensors(tmp / "gptq" / "model.safetensors", gptq);
  const std::string err = error_of([&] { Engine::build(tmp / "gptq", bc); });
  EXPECT_NE(err.find("model.layers.0.mlp.down_proj.g_idx: input 0 is in group 1, not 0 (an "
                     "act-order g_idx, but the quantization_config does not say so)"),
            std::string::npos)
      << err;
}

// Act-order GPTQ (desc_act, a shuffled g_idx per input): kiln stores each weight's columns sorted
// by group with the order as "<weight>.perm" and gathers the inputs through it, so the engine
// computes the plain checkpoint's products, summed in another order: logits agree to float
// rounding (NMSE < 1e-12). Built to a folder and loaded back, it must give the same logits. A
// g_idx that q/k/v do not share, or with a group of the wrong size, is refused by name.
TEST(QuantGptq, ActOrderLoadsAndMatchesTheDequantizedWeights) {
  TempDir tmp;
  auto gptq = write_gptq(tmp / "gptq", tmp / "plain", 32, true);
  BuildConfig bc;
  bc.dtype = "bf16";
  Engine e = Engine::build(tmp / "gptq", bc);
  EXPECT_EQ(e.info().quant, "int4-wo");
  Engine::build_to(tmp / "gptq", tmp / "engine", bc);
  Engine loaded = Engine::load(tmp / "engine");
  Engine ref = Engine::build(tmp / "plain", bc);
  e.start({.device = "cpu"});
  loaded.start({.device = "cpu"});
  ref.start({.device = "cpu"});
  for (const auto& p : std::vector<std::vector<int32_t>>{{5, 17, 300, 2, 99}, {1, 2, 3}}) {
    const auto a = e.logits(p), b = ref.logits(p);
    EXPECT_LT(nmse(a, b), 1e-12);
    EXPECT_EQ(loaded.logits(p), a);
  }

  const auto spoil = [&](const std::string& tensor, int i, int j) {
    auto t2 = gptq;
    for (auto& [n, t] : t2)
      if (n == tensor) {
        Tensor c = Tensor::zeros(t.dtype, t.shape);
        std::memcpy(c.data, t.data, t.nbytes());
        std::swap(c.ptr<int32_t>()[i], c.ptr<int32_t>()[j]);
        t = c;
      }
    write_safetensors(tmp / "gptq" / "model.safetensors", t2);
    return error_of([&] { Engine::build(tmp / "gptq", bc); });
  };
  // k_proj's groups differ from q_proj's (two inputs of different groups swap places).
  const auto* kg = [&] {
    for (auto& [n, t] : gptq)
      if (n == "model.layers.1.self_attn.k_proj.g_idx") return t.ptr<int32_t>();
    return static_cast<int32_t*>(nullptr);
  }();
  ASSERT_NE(kg, nullptr);
  int other = 1;
  while (kg[other] == kg[0]) ++other;
  std::string err = spoil("model.layers.1.self_attn.k_proj.g_idx", 0, other);
  EXPECT_NE(err.find("model.layers.1.self_attn.k_proj.g_idx differs from "
                     "model.layers.1.self_attn.q_proj.g_idx"),
            std::string::npos)
      << err;
  // A group of 33 inputs and one of 31.
  Tensor bad;
  for (auto& [n, t] : gptq)
    if (n == "model.layers.2.mlp.down_proj.g_idx") bad = t;
  auto t3 = gptq;
  for (auto& [n, t] : t3)
    if (n == "model.layers.2.mlp.down_proj.g_idx") {
      t = Tensor::zeros(DType::I32, bad.shape);
      std::memcpy(t.data, bad.data, bad.nbytes());
      for (int64_t c = 0; c < t.numel(); ++c)
        if (t.ptr<int32_t>()[c] == 1) {
          t.ptr<int32_t>()[c] = 0;
          break;
        }
    }
  write_safetensors(tmp / "gptq" / "model.safetensors", t3);
  err = error_of([&] { Engine::build(tmp / "gptq", bc); });
  EXPECT_NE(err.find("model.layers.2.mlp.down_proj.g_idx: input"), std::string::npos) << err;
  EXPECT_NE(err.find("but there are 4 groups of 32 inputs"), std::string::npos) << err;
}

// The act-order engine on the GPU (its inputs gathered by a kernel before the W4A16 GEMV in
// decode and before dequantize + cuBLASLt in prefill; decode replayed from CUDA graphs) against
// the CPU engine, to the tolerance CudaParity.WeightOnlyQuantMatchesTheCpuEngine holds int4-wo to.
TEST(QuantGptq, ActOrderRunsOnCudaAsOnTheCpu) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU visible";
  TempDir tmp;
  write_gptq(tmp / "gptq", tmp / "plain", 32, true);
  BuildConfig bc;
  bc.dtype = "bf16";
  Engine gpu = Engine::build(tmp / "gptq", bc), cpu = Engine::build(tmp / "gptq", bc);
  gpu.start({.device = "cuda"});
  cpu.start({.device = "cpu"});
  const int64_t V = gpu.info().vocab_size;
  for (const auto& p :
       std::vector<std::vector<int32_t>>{{5, 17, 300, 2, 99, 42, 7, 1, 13, 250, 4, 8}, {1, 2, 3}}) {
    const std::vector<float> want = cpu.logits(p), got = gpu.logits(p);
    Session s = gpu.session();
    for (size_t i = 0; i < p.size(); ++i) {
      EXPECT_LE(rel_err(got.data() + i * V, want.data() + i * V, V), 2e-2) << "prefill " << i;
      const std::vector<float> step = s.forward(std::span<const int32_t>(&p[i], 1));
      EXPECT_LE(rel_err(step.data(), want.data() + i * V, V), 2e-2) << "decode " << i;
    }
  }
}

// An AWQ checkpoint as AutoAWQ writes it (GEMM packing: qweight I32 [in, out / 8] with the value
// order 0 2 4 6 1 3 5 7 in each word, qzeros I32 [in / g, out / 8], scales F16 [in / g, out]),
// packed here from the llama fixture with power-of-two scales so that every dequantized weight
// (q - z) * s is exact in BF16. kiln must load it as int4-wo and give bit for bit the logits of
// the plain checkpoint holding those dequantized weights.
TEST(QuantAwq, LoadsAsPublishedAndMatchesTheDequantizedWeights) {
  TempDir tmp;
  copy_dir(hf("llama"), tmp / "awq");
  copy_dir(hf("llama"), tmp / "plain");
  constexpr int64_t g = 32;
  constexpr int kOrder[8] = {0, 2, 4, 6, 1, 3, 5, 7};  // AutoAWQ's AWQ_ORDER
  auto file = SafetensorsFile::open(hf("llama") / "model.safetensors");
  std::vector<std::pair<std::string, Tensor>> awq, plain;
  int packed = 0;
  for (const auto& [name, ti] : file->tensors()) {
    const Tensor t = file->get(name);
    const bool linear = name.find("_proj.weight") != std::string::npos;
    if (!linear) {
      awq.push_back({name, t});
      plain.push_back({name, t});
      continue;
    }
    ++packed;
    const int64_t out = t.shape[0], in = t.shape[1], G = in / g;
    const Int4Groups q = int4_groups(t, g);
    const std::vector<int32_t>&iq = q.q, &iz = q.z;
    const std::vector<float>&sc = q.s, &deq = q.deq;
    // intweight is [in, out] in AutoAWQ's pack (the transposed linear weight).
    Tensor qweight = Tensor::zeros(DType::I32, {in, out / 8});
    Tensor qzeros = Tensor::zeros(DType::I32, {G, out / 8});
    Tensor scales = Tensor::zeros(DType::F16, {G, out});
    for (int64_t c = 0; c < in; ++c)
      for (int64_t col = 0; col < out / 8; ++col) {
        uint32_t word = 0;
        for (int i = 0; i < 8; ++i)
          word |= uint32_t(iq[size_t((col * 8 + kOrder[i]) * in + c)]) << (4 * i);
        qweight.ptr<int32_t>()[c * (out / 8) + col] = int32_t(word);
      }
    for (int64_t k = 0; k < G; ++k) {
      for (int64_t col = 0; col < out / 8; ++col) {
        uint32_t word = 0;
        for (int i = 0; i < 8; ++i)
          word |= uint32_t(iz[size_t((col * 8 + kOrder[i]) * G + k)]) << (4 * i);
        qzeros.ptr<int32_t>()[k * (out / 8) + col] = int32_t(word);
      }
      for (int64_t o = 0; o < out; ++o)
        scales.ptr<uint16_t>()[k * out + o] = f32_to_f16(sc[size_t(o * G + k)]);
    }
    const std::string base = name.substr(0, name.size() - 7);
    awq.push_back({base + ".qweight", qweight});
    awq.push_back({base + ".qzeros", qzeros});
    awq.push_back({base + ".scales", scales});
    Tensor d = Tensor::zeros(DType::F32, t.shape);
    std::copy(deq.begin(), deq.end(), d.ptr<float>());
    plain.push_back({name, d});
  }
  // q, k, v, o, gate, up and down of every layer.
  ASSERT_EQ(packed, 7 * read_json(hf("llama") / "config.json")["num_hidden_layers"].get<int>());
  file.reset();
  write_safetensors(tmp / "awq" / "model.safetensors", awq);
  write_safetensors(tmp / "plain" / "model.safetensors", plain);
  auto cfg = read_json(tmp / "awq" / "config.json");
  cfg["quantization_config"] = {{"quant_method", "awq"}, {"bits", 4},
                                {"group_size", g},       {"zero_point", true},
                                {"version", "gemm"},     {"modules_to_not_convert", nullptr}};
  write_json(tmp / "awq" / "config.json", cfg);

  BuildConfig bc;
  bc.dtype = "bf16";
  const ModelInfo built = Engine::build_to(tmp / "awq", tmp / "e", bc);
  EXPECT_EQ(built.quant, "int4-wo");
  Engine e = Engine::load(tmp / "e"), ref = Engine::build(tmp / "plain", bc);
  e.start({.device = "cpu"});  // the CPU reference: the same weight values give the same bits
  ref.start({.device = "cpu"});
  EXPECT_EQ(e.info().num_params, ref.info().num_params);
  Reference r = load_reference("llama");
  for (const auto& p : r.prompts) {
    const std::vector<float> a = e.logits(p), b = ref.logits(p);
    ASSERT_EQ(a.size(), b.size());
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * 4), 0);
  }

  // Requantizing, other AWQ variants and half-quantized checkpoints are refused by name.
  BuildConfig q8 = bc;
  q8.quant = "int8-wo";
  std::string err = error_of([&] { Engine::build(tmp / "awq", q8); });
  EXPECT_NE(err.find("the checkpoint is AWQ int4-wo; --quant int8-wo would requantize it"),
            std::string::npos)
      << err;
  cfg["quantization_config"]["version"] = "gemv";
  write_json(tmp / "awq" / "config.json", cfg);
  err = error_of([&] { Engine::build(tmp / "awq", bc); });
  EXPECT_NE(err.find("quantization_config.version 'gemv': kiln loads AWQ in GEMM packing only"),
            std::string::npos)
      << err;
  cfg["quantization_config"]["version"] = "gemm";
  write_json(tmp / "awq" / "config.json", cfg);
  std::vector<std::pair<std::string, Tensor>> missing;
  for (auto& [n, t] : awq)
    if (n != "model.layers.1.mlp.up_proj.qzeros") missing.push_back({n, t});
  write_safetensors(tmp / "awq" / "model.safetensors", missing);
  err = error_of([&] { Engine::build(tmp / "awq", bc); });
  EXPECT_NE(err.find("model.layers.1.mlp.up_proj.qzeros"), std::string::npos) << err;
}

// compressed-tensors integer checkpoints as llm-compressor writes them (pack_to_int32: each value
// stored plus 2^(bits - 1), 32 / bits values a word in order along the inputs; zero points packed
// the same way along the outputs), packed here from the llama fixture with power-of-two scales
// so every dequantized weight is exact in BF16: W4A16 in groups (symmetric and with zero points)
// and W8A16 per channel (pack-quantized and int-quantized). Each must load as int4-wo / int8-wo
// and give bit for bit the logits of the plain checkpoint holding the dequantized weights;
// a missing or disordered g_idx and schemes kiln does not run are refused by name.
TEST(QuantCompressedTensors, IntCheckpointsLoadAsPublished) {
  TempDir tmp;
  constexpr int64_t g = 32;
  struct Variant {
    const char* dir;
    int bits;
    bool symmetric;
    const char* format;
  };
  for (const Variant v :
       {Variant{"w4sym", 4, true, "pack-quantized"}, Variant{"w4asym", 4, false, "pack-quantized"},
        Variant{"w8pack", 8, true, "pack-quantized"}, Variant{"w8int", 8, true, "int-quantized"}}) {
    SCOPED_TRACE(v.dir);
    const fs::path ct = tmp / v.dir, plain = tmp / (std::string(v.dir) + "-plain");
    copy_dir(hf("llama"), ct);
    copy_dir(hf("llama"), plain);
    auto file = SafetensorsFile::open(hf("llama") / "model.safetensors");
    std::vector<std::pair<std::string, Tensor>> cts, plains;
    for (const auto& [name, ti] : file->tensors()) {
      const Tensor t = file->get(name);
      if (name.find("_proj.weight") == std::string::npos) {
        cts.push_back({name, t});
        plains.push_back({name, t});
        continue;
      }
      const int64_t out = t.shape[0], in = t.shape[1], G = v.bits == 4 ? in / g : 1;
      const int64_t gs = v.bits == 4 ? g : in;  // inputs per scale
      std::vector<float> w(static_cast<size_t>(out * in)), deq(w.size());
      to_f32(t.dtype, t.data, w.data(), w.size());
      std::vector<int32_t> stored(w.size()), zstored(static_cast<size_t>(out * G), 0);
      Tensor scale = Tensor::zeros(DType::BF16, {out, G});
      const int qmax = v.bits == 4 ? 7 : 127, off = 1 << (v.bits - 1);
      if (v.symmetric) {
        for (int64_t o = 0; o < out; ++o)
          for (int64_t k = 0; k < G; ++k) {
            float amax = 0;
            for (int64_t c = k * gs; c < (k + 1) * gs; ++c)
              amax = std::max(amax, std::fabs(w[size_t(o * in + c)]));
            const float sc = std::exp2(std::ceil(std::log2(amax / float(qmax))));
            scale.ptr<uint16_t>()[o * G + k] = f32_to_bf16(sc);
            for (int64_t c = k * gs; c < (k + 1) * gs; ++c) {
              const int q = int(std::clamp(std::nearbyint(w[size_t(o * in + c)] / sc),
                                           float(-qmax - 1), float(qmax)));
              stored[size_t(o * in + c)] = q + off;
              deq[size_t(o * in + c)] = float(q) * sc;
            }
          }
      } else {  // AWQ-style groups: unsigned codes and zeros, signed ones stored + 8
        const Int4Groups q = int4_groups(t, g);
        for (size_t i = 0; i < w.size(); ++i) stored[i] = q.q[i], deq[i] = q.deq[i];
        for (int64_t i = 0; i < out * G; ++i) {
          scale.ptr<uint16_t>()[i] = f32_to_bf16(q.s[size_t(i)]);
          zstored[size_t(i)] = q.z[size_t(i)];
        }
      }
      const std::string base = name.substr(0, name.size() - 7);
      cts.push_back({base + ".weight_scale", scale});
      if (std::string(v.format) == "int-quantized") {
        Tensor q8 = Tensor::zeros(DType::I8, {out, in});
        for (size_t i = 0; i < w.size(); ++i) q8.ptr<int8_t>()[i] = int8_t(stored[i] - off);
        cts.push_back({name, q8});
      } else {
        const int per = 32 / v.bits;
        Tensor packed = Tensor::zeros(DType::I32, {out, in / per});
        auto* pw = reinterpret_cast<uint32_t*>(packed.ptr<int32_t>());
        for (int64_t o = 0; o < out; ++o)
          for (int64_t c = 0; c < in; ++c)
            pw[o * (in / per) + c / per] |= uint32_t(stored[size_t(o * in + c)])
                                            << (v.bits * (c % per));
        cts.push_back({base + ".weight_packed", packed});
        Tensor shape = Tensor::zeros(DType::I64, {2});
        shape.ptr<int64_t>()[0] = out, shape.ptr<int64_t>()[1] = in;
        cts.push_back({base + ".weight_shape", shape});
        if (!v.symmetric) {
          Tensor zp = Tensor::zeros(DType::I32, {out / 8, G});
          auto* zw = reinterpret_cast<uint32_t*>(zp.ptr<int32_t>());
          for (int64_t o = 0; o < out; ++o)
            for (int64_t k = 0; k < G; ++k)
              zw[(o / 8) * G + k] |= uint32_t(zstored[size_t(o * G + k)]) << (4 * (o % 8));
          cts.push_back({base + ".weight_zero_point", zp});
        }
      }
      Tensor d = Tensor::zeros(DType::F32, t.shape);
      std::copy(deq.begin(), deq.end(), d.ptr<float>());
      plains.push_back({name, d});
    }
    file.reset();
    write_safetensors(ct / "model.safetensors", cts);
    write_safetensors(plain / "model.safetensors", plains);
    auto cfg = read_json(ct / "config.json");
    nlohmann::json weights = {{"num_bits", v.bits},
                              {"type", "int"},
                              {"symmetric", v.symmetric},
                              {"strategy", v.bits == 4 ? "group" : "channel"},
                              {"group_size", v.bits == 4 ? nlohmann::json(g) : nlohmann::json()},
                              {"actorder", nullptr}};
    cfg["quantization_config"] = {
        {"quant_method", "compressed-tensors"},
        {"format", v.format},
        {"config_groups", {{"group_0", {{"targets", {"Linear"}}, {"weights", weights}}}}},
        {"ignore", {"lm_head"}}};
    write_json(ct / "config.json", cfg);

    BuildConfig bc;
    bc.dtype = "bf16";
    Engine e = Engine::build(ct, bc);
    EXPECT_EQ(e.info().quant, v.bits == 4 ? "int4-wo" : "int8-wo");
    Engine ref = Engine::build(plain, bc);
    e.start({.device = "cpu"});
    ref.start({.device = "cpu"});
    for (const auto& p : std::vector<std::vector<int32_t>>{{5, 17, 300, 2, 99}, {1, 2, 3}})
      EXPECT_EQ(e.logits(p), ref.logits(p));

    if (v.bits == 4 && v.symmetric) {  // refusals, on this checkpoint
      auto bad = cfg;
      bad["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = "group";
      write_json(ct / "config.json", bad);
      std::string err = error_of([&] { Engine::build(ct, bc); });  // act-order needs g_idx
      EXPECT_NE(err.find("missing weights (canonical names): "
                         "model.layers.0.mlp.down_proj.weight_g_idx"),
                std::string::npos)
          << err;
      bad["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = "sideways";
      write_json(ct / "config.json", bad);
      err = error_of([&] { Engine::build(ct, bc); });
      EXPECT_NE(err.find("weights.actorder 'sideways' is not an ordering kiln knows"),
                std::string::npos)
          << err;
      bad = cfg;
      bad["quantization_config"]["config_groups"]["group_1"] = {
          {"targets", {"re:.*down_proj"}},
          {"weights",
           {{"num_bits", 8}, {"type", "int"}, {"symmetric", true}, {"strategy", "channel"}}}};
      write_json(ct / "config.json", bad);
      err = error_of([&] { Engine::build(ct, bc); });
      EXPECT_NE(err.find("group_1.weights: differs from the first group's scheme"),
                std::string::npos)
          << err;
      bad = cfg;
      bad["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 2;
      write_json(ct / "config.json", bad);
      err = error_of([&] { Engine::build(ct, bc); });
      EXPECT_NE(err.find("2-bit int per group is not supported yet"), std::string::npos) << err;
      write_json(ct / "config.json", cfg);
      auto with_gidx = cts;
      with_gidx.push_back(
          {"model.layers.1.mlp.up_proj.weight_g_idx",
           Tensor::zeros(DType::I32,
                         {read_json(ct / "config.json")["hidden_size"].get<int64_t>()})});
      write_safetensors(ct / "model.safetensors", with_gidx);
      err = error_of([&] { Engine::build(ct, bc); });
      EXPECT_NE(err.find("model.layers.1.mlp.up_proj.weight_g_idx: input 32 is in group 0, not 1 "
                         "(an act-order g_idx, but the quantization_config does not say so)"),
                std::string::npos)
          << err;
    }
  }
}

}  // namespace
}  // namespace kiln::test
