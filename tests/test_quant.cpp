// Weight quantization (int8-wo, int4-wo, fp8): the row numerics, the CPU reference against a plain
// dequantized weight, layouts, streamed builds and engine files. Quality against each fixture's
// HF reference is in test_quant_quality.cpp.
#include <cstring>
#include <limits>
#include <map>
#include <numeric>
#include <random>

#include "backends/cpu/cpu_ops.h"
#include "build/checkpoint.h"
#include "build/engine_file.h"
#include "build/quantize.h"
#include "core/error.h"
#include "core/quant.h"
#include "graph/layout.h"
#include "kiln/kiln.h"
#include "test_util.h"

namespace kiln::test {
namespace {

TEST(QuantInt8, RowsRoundToTheNearestStep) {
  std::mt19937 rng(3);
  std::normal_distribution<float> d(0.0f, 0.02f);
  const int64_t cols = 777;
  std::vector<float> w(static_cast<size_t>(cols));
  for (auto& x : w) x = d(rng);
  w[5] = -0.1f;  // the row's largest magnitude, negative
  std::vector<int8_t> q(static_cast<size_t>(cols));
  float s = -1.0f;
  ASSERT_TRUE(quantize_int8_row(w.data(), cols, q.data(), &s));
  EXPECT_EQ(s, 0.1f / 127.0f);
  EXPECT_EQ(q[5], -127);
  std::vector<float> back(static_cast<size_t>(cols));
  dequantize_int8_row(q.data(), s, cols, back.data());
  for (int64_t c = 0; c < cols; ++c) {
    EXPECT_LE(std::fabs(back[size_t(c)] - w[size_t(c)]), 0.5f * s * (1.0f + 1e-6f)) << c;
    // Nearest: no other step is closer.
    EXPECT_LE(std::fabs(w[size_t(c)] / s - float(q[size_t(c)])), 0.5f + 1e-4f) << c;
  }
  // A row of zeros has scale 0 and codes 0; a non-finite value is refused.
  std::vector<float> z(8, 0.0f);
  std::vector<int8_t> qz(8, 9);
  ASSERT_TRUE(quantize_int8_row(z.data(), 8, qz.data(), &s));
  EXPECT_EQ(s, 0.0f);
  EXPECT_EQ(qz, std::vector<int8_t>(8, 0));
  z[3] = std::nanf("");
  EXPECT_FALSE(quantize_int8_row(z.data(), 8, qz.data(), &s));
  z[3] = INFINITY;
  EXPECT_FALSE(quantize_int8_row(z.data(), 8, qz.data(), &s));
}

TEST(QuantInt8, SchemeNames) {
  EXPECT_EQ(parse_weight_quant("int8-wo"), WeightQuant::Int8);
  EXPECT_EQ(parse_weight_quant("int4-wo"), WeightQuant::Int4);
  EXPECT_EQ(parse_weight_quant("fp8"), WeightQuant::Fp8);
  EXPECT_EQ(parse_weight_quant("none"), WeightQuant::None);
  const std::string err = error_of([] { parse_weight_quant("int3"); });
  EXPECT_NE(
      err.find("unknown quantization 'int3' (expected none, int8-wo, int4-wo, int4-awq or fp8)"),
      std::string::npos)
      << err;
}

// The CPU reference over int8 weights is exactly the F32 linear over the dequantized weights,
// for every batch size (the tiling pads tails) and with a bias.
TEST(QuantInt8, CpuLinearEqualsTheDequantizedWeight) {
  std::mt19937 rng(11);
  std::normal_distribution<float> d(0.0f, 1.0f);
  const int64_t in = 67, out = 13;
  std::vector<float> w(static_cast<size_t>(in * out)), bias(static_cast<size_t>(out)),
      scales(static_cast<size_t>(out)), deq(w.size());
  std::vector<int8_t> q(w.size());
  for (auto& x : w) x = d(rng);
  for (auto& x : bias) x = d(rng);
  for (int64_t r = 0; r < out; ++r) {
    ASSERT_TRUE(quantize_int8_row(&w[size_t(r * in)], in, &q[size_t(r * in)], &scales[size_t(r)]));
    dequantize_int8_row(&q[size_t(r * in)], scales[size_t(r)], in, &deq[size_t(r * in)]);
  }
  for (int64_t n : {1, 3, 4, 9}) {
    std::vector<float> x(size_t(n * in)), a(size_t(n * out)), b(a.size());
    for (auto& v : x) v = d(rng);
    cpu::linear(x.data(), n, in, in, q.data(), DType::I8, out, bias.data(), a.data(), out,
                {WeightQuant::Int8, scales.data()});
    cpu::linear(x.data(), n, in, in, deq.data(), DType::F32, out, bias.data(), b.data(), out);
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * 4), 0) << "n=" << n;
  }
  EXPECT_THROW(
      cpu::linear(deq.data(), 1, in, in, q.data(), DType::I8, out, nullptr, deq.data(), out),
      Error);
}

// E4M3 conversions: every finite code round-trips, the table agrees with the safetensors reader's
// decoding, and rounding is to nearest even with saturation at 448 (the GPU's satfinite).
TEST(QuantFp8, E4M3ConversionsFollowTheFormat) {
  for (int c = 0; c < 256; ++c) {
    const uint8_t v = uint8_t(c);
    float ref = 0;
    to_f32(DType::F8_E4M3, &v, &ref, 1);
    if ((c & 0x7f) == 0x7f) {
      EXPECT_TRUE(std::isnan(e4m3_to_f32(v))) << c;
      continue;
    }
    EXPECT_EQ(e4m3_to_f32(v), ref) << c;
    EXPECT_EQ(f32_to_e4m3(ref), v) << c;
    // Halfway to the next code up in magnitude: ties go to the even code.
    if ((c & 0x7f) < 0x7e) {
      const uint8_t up = uint8_t(c + 1);
      const float mid = 0.5f * (ref + e4m3_to_f32(up));
      EXPECT_EQ(f32_to_e4m3(mid), (c & 1) ? up : v) << c;
      EXPECT_EQ(f32_to_e4m3(std::nextafter(mid, 0.0f)), v) << c;
      EXPECT_EQ(f32_to_e4m3(std::nextafter(mid, 2.0f * mid)), up) << c;
    }
  }
  EXPECT_EQ(e4m3_to_f32(0x7e), 448.0f);
  EXPECT_EQ(e4m3_to_f32(0x01), std::ldexp(1.0f, -9));
  EXPECT_EQ(f32_to_e4m3(464.0f), 0x7e);
  EXPECT_EQ(f32_to_e4m3(1e9f), 0x7e);
  EXPECT_EQ(f32_to_e4m3(-INFINITY), 0xfe);
  EXPECT_EQ(f32_to_e4m3(std::nanf("")), 0x7f);
  EXPECT_EQ(f32_to_e4m3(std::ldexp(1.0f, -11)), 0x00);  // a quarter step: 0
}

TEST(QuantFp8, RowsScaleToTheLargestCode) {
  std::mt19937 rng(5);
  std::normal_distribution<float> d(0.0f, 0.02f);
  const int64_t cols = 333;
  std::vector<float> w(static_cast<size_t>(cols)), back(w.size());
  for (auto& x : w) x = d(rng);
  w[7] = 0.2f;
  std::vector<uint8_t> q(w.size());
  float s = -1;
  ASSERT_TRUE(quantize_fp8_row(w.data(), cols, q.data(), &s));
  EXPECT_EQ(s, 0.2f / 448.0f);
  EXPECT_EQ(q[7], 0x7e);
  dequantize_fp8_row(q.data(), s, cols, back.data());
  for (int64_t c = 0; c < cols; ++c)  // 3 mantissa bits: within half a step, 1/16 relative
    EXPECT_LE(std::fabs(back[size_t(c)] - w[size_t(c)]),
              std::max(std::fabs(w[size_t(c)]) / 16.0f, std::ldexp(s, -10)) * 1.0001f)
        << c;
  std::vector<float> z(4, 0.0f);
  ASSERT_TRUE(quantize_fp8_row(z.data(), 4, q.data(), &s));
  EXPECT_EQ(s, 0.0f);
  EXPECT_EQ(q[0], 0);
  z[2] = std::nanf("");
  EXPECT_FALSE(quantize_fp8_row(z.data(), 4, q.data(), &s));
}

// The CPU reference over fp8 weights is the F32 linear over the dequantized weights applied to
// x with each row quantized to E4M3 (its own scale) and dequantized; a NaN row stays NaN.
TEST(QuantFp8, CpuLinearQuantizesActivationsPerRow) {
  std::mt19937 rng(12);
  std::normal_distribution<float> d(0.0f, 1.0f);
  const int64_t in = 67, out = 13;
  std::vector<float> w(static_cast<size_t>(in * out)), bias(static_cast<size_t>(out)),
      scales(static_cast<size_t>(out)), deq(w.size());
  std::vector<uint8_t> q(w.size());
  for (auto& x : w) x = d(rng);
  for (auto& x : bias) x = d(rng);
  for (int64_t r = 0; r < out; ++r) {
    ASSERT_TRUE(quantize_fp8_row(&w[size_t(r * in)], in, &q[size_t(r * in)], &scales[size_t(r)]));
    dequantize_fp8_row(&q[size_t(r * in)], scales[size_t(r)], in, &deq[size_t(r * in)]);
  }
  for (int64_t n : {1, 3, 4, 9}) {
    const int64_t ldx = in + 5;
    std::vector<float> x(size_t(n * ldx)), xq(size_t(n * in)), a(size_t(n * out)), b(a.size());
    for (auto& v : x) v = d(rng) * 30.0f;
    std::vector<uint8_t> codes(static_cast<size_t>(in));
    for (int64_t t = 0; t < n; ++t) {
      float sx = 0;
      ASSERT_TRUE(quantize_fp8_row(&x[size_t(t * ldx)], in, codes.data(), &sx));
      dequantize_fp8_row(codes.data(), sx, in, &xq[size_t(t * in)]);
    }
    cpu::linear(x.data(), n, in, ldx, q.data(), DType::F8_E4M3, out, bias.data(), a.data(), out,
                {WeightQuant::Fp8, scales.data()});
    cpu::linear(xq.data(), n, in, in, deq.data(), DType::F32, out, bias.data(), b.data(), out);
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * 4), 0) << "n=" << n;
    if (n > 1) {
      x[size_t(ldx + 2)] = std::nanf("");
      cpu::linear(x.data(), n, in, ldx, q.data(), DType::F8_E4M3, out, bias.data(), a.data(), out,
                  {WeightQuant::Fp8, scales.data()});
      EXPECT_TRUE(std::isnan(a[size_t(out)]));
      EXPECT_EQ(a[0], b[0]);
    }
  }
}

// Roles, not names, decide what a scheme quantizes; each quantized weight has its scale (and
// zero) slots, shaped by the scheme.
TEST(QuantInt8, LayoutQuantizesTheDenseLinearsOnly) {
  for (WeightQuant wq : {WeightQuant::Int8, WeightQuant::Int4, WeightQuant::Fp8})
    for (const char* arch : {"llama", "qwen2_moe", "gpt2"}) {
      const ModelConfig c = open_config(hf(arch) / "config.json").config;
      const auto plain = engine_layout(c);
      const auto q = engine_layout(c, wq);
      const size_t slots = wq == WeightQuant::Int4 ? 2 : 1;
      size_t quantized = 0, p = 0;
      for (size_t i = 0; i < q.size(); ++i, ++p) {
        const WeightSpec& s = q[i];
        ASSERT_LT(p, plain.size());
        EXPECT_EQ(s.name, plain[p].name);
        const bool dense = s.role == WeightRole::ColumnLinear || s.role == WeightRole::RowLinear;
        EXPECT_EQ(s.quant == wq, dense) << arch << " " << s.name;
        if (!dense) {
          EXPECT_EQ(s.shape, plain[p].shape) << s.name;
          EXPECT_EQ(s.dtype(DType::BF16), s.matrix() ? DType::BF16 : DType::F32) << s.name;
          continue;
        }
        ++quantized;
        const int64_t rows = plain[p].shape[0], cols = plain[p].shape[1];
        ASSERT_LT(i + slots, q.size());
        const WeightSpec& sc = q[i + 1];
        EXPECT_EQ(sc.name, s.name + ".scale");
        EXPECT_EQ(sc.role, WeightRole::Scale);
        EXPECT_EQ(sc.dtype(DType::BF16), DType::F32);
        if (wq != WeightQuant::Int4) {
          EXPECT_EQ(s.dtype(DType::BF16), wq == WeightQuant::Int8 ? DType::I8 : DType::F8_E4M3);
          EXPECT_EQ(s.shape, plain[p].shape);
          EXPECT_EQ(sc.shape, Shape{rows});
        } else {
          const int64_t g = int4_group(cols);
          EXPECT_EQ(s.dtype(DType::BF16), DType::U8);
          EXPECT_EQ(s.shape, (Shape{rows, cols / 2}));
          EXPECT_EQ(sc.shape, (Shape{rows, cols / g}));
          EXPECT_EQ(q[i + 2].name, s.name + ".zero");
          EXPECT_EQ(q[i + 2].role, WeightRole::Zero);
          EXPECT_EQ(q[i + 2].dtype(DType::BF16), DType::U8);
          EXPECT_EQ(q[i + 2].shape, (Shape{rows, cols / g}));
        }
        i += slots;
      }
      EXPECT_EQ(q.size(), plain.size() + slots * quantized) << arch;
      EXPECT_GE(quantized, size_t(2 * c.num_layers)) << arch;  // at least wqkv and wo per layer
    }
}

// int4 groups need input sizes that are multiples of 32: anything else is refused by name.
TEST(QuantInt4, OddInputSizesAreRefused) {
  ModelConfig c = open_config(hf("llama") / "config.json").config;
  c.intermediate_size = 100;
  const std::string err = error_of([&] { engine_layout(c, WeightQuant::Int4); });
  EXPECT_NE(err.find("--quant int4-wo: layers.0.w_down has 100 input features, not a multiple of "
                     "32"),
            std::string::npos)
      << err;
}

// A quantized build streamed through a tiny staging buffer writes the same bytes as the plan
// made whole in memory, with scales written after their weight or not.
TEST(QuantInt8, StreamedBuildEqualsTheInMemoryBuild) {
  TempDir tmp;
  for (WeightQuant wq : {WeightQuant::Int8, WeightQuant::Int4, WeightQuant::Fp8})
    for (const char* arch : {"llama", "gpt2", "qwen2_moe"}) {
      const Checkpoint ck = open_checkpoint(hf(arch));
      const WeightPlan plan = plan_weights(ck, DType::BF16, wq);
      const auto held = materialize(plan_weights(ck, DType::BF16, wq));
      const fs::path out = tmp / (std::string(arch) + std::string(weight_quant_name(wq)));
      write_engine_folder(out, plan, {nlohmann::json::object(), {}, {}, 100});
      auto file = SafetensorsFile::open(out / kEngineWeights);
      ASSERT_EQ(file->tensors().size(), held.size());
      for (const auto& [name, t] : held) {
        const Tensor got = file->get(name);
        ASSERT_EQ(got.dtype, t.dtype) << name;
        ASSERT_EQ(got.shape, t.shape) << name;
        EXPECT_EQ(std::memcmp(got.data, t.data, t.nbytes()), 0) << arch << " " << name;
      }
      // Scales asked for before their weight (another write order) are the same.
      WeightPlan again = plan_weights(ck, DType::BF16, wq);
      for (auto& pt : again)
        if (pt.name.ends_with(".scale") || pt.name.ends_with(".zero")) {
          std::vector<uint8_t> s(pt.nbytes());
          pt.fill(0, pt.shape[0], s.data());
          const auto it = std::find_if(held.begin(), held.end(),
                                       [&](const auto& h) { return h.first == pt.name; });
          ASSERT_NE(it, held.end());
          EXPECT_EQ(std::memcmp(s.data(), it->second.data, s.size()), 0) << pt.name;
        }
    }
}

// A weight holding a NaN cannot be quantized: the build names the tensor and row.
TEST(QuantInt8, NonFiniteWeightsFailTheBuild) {
  TempDir tmp;
  copy_dir(hf("llama"), tmp / "m");
  auto file = SafetensorsFile::open(tmp / "m" / "model.safetensors");
  std::vector<std::pair<std::string, Tensor>> ts;
  for (const auto& [name, ti] : file->tensors()) {
    Tensor t = convert(file->get(name), file->get(name).dtype);
    if (name == "model.layers.1.mlp.down_proj.weight") {
      std::vector<float> f(static_cast<size_t>(t.numel()));
      to_f32(t.dtype, t.data, f.data(), f.size());
      f[size_t(t.shape[1] * 3 + 1)] = std::nanf("");
      from_f32(t.dtype, f.data(), t.data, f.size());
    }
    ts.push_back({name, t});
  }
  file.reset();
  write_safetensors(tmp / "m" / "model.safetensors", ts);
  BuildConfig bc;
  bc.dtype = "bf16";
  bc.quant = "int8-wo";
  const std::string err = error_of([&] { Engine::build_to(tmp / "m", tmp / "e", bc); });
  EXPECT_NE(err.find("layers.1.w_down: row 3 holds a non-finite value"), std::string::npos) << err;
  EXPECT_FALSE(fs::exists(tmp / "e"));
}

TEST(QuantInt8, EngineFilesRoundTripAndAreChecked) {
  TempDir tmp;
  BuildConfig bc;
  bc.dtype = "bf16";
  bc.quant = "int8-wo";
  const ModelInfo built = Engine::build_to(hf("qwen3"), tmp / "e", bc);
  EXPECT_EQ(built.quant, "int8-wo");
  EXPECT_EQ(read_json(tmp / "e" / kEngineManifest)["build"]["quant"], "int8-wo");
  EXPECT_GT(Engine::verify(tmp / "e"), 0u);
  Engine disk = Engine::load(tmp / "e");
  Engine mem = Engine::build(hf("qwen3"), bc);
  EXPECT_EQ(disk.info().quant, "int8-wo");
  EXPECT_EQ(disk.info().weight_bytes, built.weight_bytes);
  EXPECT_EQ(disk.info().num_params, built.num_params);
  EXPECT_EQ(mem.info().weight_bytes, built.weight_bytes);
  // Fewer bytes than the bf16 engine: the dense linears are 1 byte per weight plus a scale.
  BuildConfig plain;
  plain.dtype = "bf16";
  EXPECT_LT(built.weight_bytes, Engine::build(hf("qwen3"), plain).info().weight_bytes);
  const std::vector<int32_t> p = {5, 17, 300, 2, 99, 42, 7};
  const std::vector<float> a = disk.logits(p), b = mem.logits(p);
  ASSERT_EQ(a.size(), b.size());
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * 4), 0);
  // save() of a quantized engine writes the scales again.
  mem.save(tmp / "s");
  EXPECT_EQ(Engine::load(tmp / "s").logits(p), a);

  // Build options are refused on a built engine; --quant needs a 16-bit engine dtype.
  std::string err = error_of([&] { Engine::open(tmp / "e", bc); });
  EXPECT_NE(err.find("--dtype applies only when building"), std::string::npos) << err;
  BuildConfig q_only;
  q_only.quant = "int8-wo";
  err = error_of([&] { Engine::open(tmp / "e", q_only); });
  EXPECT_NE(err.find("--quant applies only when building"), std::string::npos) << err;
  // With f32 activations a quantized engine is the CPU reference's: CUDA refuses it by name.
  BuildConfig f32;
  f32.dtype = "f32";
  f32.quant = "int8-wo";
  Engine e32 = Engine::build(hf("qwen3"), f32);
  err = error_of([&] { e32.start({.device = "cuda"}); });
  EXPECT_NE(err.find("--device cuda: this engine holds int8-wo weights with f32 activations"),
            std::string::npos)
      << err;
  e32.start({.device = "auto"});
  EXPECT_EQ(e32.logits(p).size(), p.size() * size_t(e32.info().vocab_size));

  // A scale tensor missing from the weights file is named.
  auto file = SafetensorsFile::open(tmp / "e" / kEngineWeights);
  std::vector<std::pair<std::string, Tensor>> ts;
  for (const auto& [name, ti] : file->tensors())
    if (name != "layers.0.wo.scale") ts.push_back({name, file->get(name)});
  write_safetensors(tmp / "w.safetensors", ts);
  file.reset();
  fs::rename(tmp / "w.safetensors", tmp / "e" / kEngineWeights);
  err = error_of([&] { Engine::load(tmp / "e"); });
  EXPECT_NE(err.find("missing layers.0.wo.scale"), std::string::npos) << err;
  // An unknown scheme in the manifest is named.
  auto man = read_json(tmp / "s" / kEngineManifest);
  man["build"]["quant"] = "int2";
  write_json(tmp / "s" / kEngineManifest, man);
  err = error_of([&] { Engine::load(tmp / "s"); });
  EXPECT_NE(err.find("build.quant 'int2' is not a scheme this kiln runs"), std::string::npos)
      << err;
}

// The int4-wo engine file: codes, scales and zeros round-trip; a missing zero tensor is named;
// the parameter count is that of the unquantized model.
TEST(QuantInt4, EngineFilesRoundTripAndAreChecked) {
  TempDir tmp;
  BuildConfig bc;
  bc.dtype = "bf16";
  bc.quant = "int4-wo";
  const ModelInfo built = Engine::build_to(hf("qwen3"), tmp / "e", bc);
  EXPECT_EQ(built.quant, "int4-wo");
  EXPECT_GT(Engine::verify(tmp / "e"), 0u);
  Engine disk = Engine::load(tmp / "e"), mem = Engine::build(hf("qwen3"), bc);
  BuildConfig plain;
  plain.dtype = "bf16";
  const ModelInfo bf16 = Engine::build(hf("qwen3"), plain).info();
  EXPECT_EQ(built.num_params, bf16.num_params);
  EXPECT_EQ(disk.info().num_params, bf16.num_params);
  EXPECT_EQ(disk.info().weight_bytes, built.weight_bytes);
  BuildConfig q8 = bc;
  q8.quant = "int8-wo";
  EXPECT_LT(built.weight_bytes, Engine::build(hf("qwen3"), q8).info().weight_bytes);
  const std::vector<int32_t> p = {5, 17, 300, 2, 99, 42, 7};
  const std::vector<float> a = disk.logits(p);
  EXPECT_EQ(a, mem.logits(p));
  mem.save(tmp / "s");
  EXPECT_EQ(Engine::load(tmp / "s").logits(p), a);
  auto file = SafetensorsFile::open(tmp / "e" / kEngineWeights);
  std::vector<std::pair<std::string, Tensor>> ts;
  for (const auto& [name, ti] : file->tensors())
    if (name != "layers.1.w_gate_up.zero") ts.push_back({name, file->get(name)});
  write_safetensors(tmp / "w.safetensors", ts);
  file.reset();
  fs::rename(tmp / "w.safetensors", tmp / "e" / kEngineWeights);
  const std::string err = error_of([&] { Engine::load(tmp / "e"); });
  EXPECT_NE(err.find("missing layers.1.w_gate_up.zero"), std::string::npos) << err;
}

// The fp8 engine file: E4M3 codes and scales round-trip, the engine is about half the bf16 one,
// and a missing scale is named.
TEST(QuantFp8, EngineFilesRoundTripAndAreChecked) {
  TempDir tmp;
  BuildConfig bc;
  bc.dtype = "bf16";
  bc.quant = "fp8";
  const ModelInfo built = Engine::build_to(hf("qwen3"), tmp / "e", bc);
  EXPECT_EQ(built.quant, "fp8");
  EXPECT_EQ(read_json(tmp / "e" / kEngineManifest)["build"]["quant"], "fp8");
  EXPECT_GT(Engine::verify(tmp / "e"), 0u);
  Engine disk = Engine::load(tmp / "e"), mem = Engine::build(hf("qwen3"), bc);
  BuildConfig q8 = bc;
  q8.quant = "int8-wo";
  const ModelInfo i8 = Engine::build(hf("qwen3"), q8).info();
  EXPECT_EQ(built.weight_bytes, i8.weight_bytes);  // one byte a weight and one scale a row
  EXPECT_EQ(built.num_params, i8.num_params);
  const std::vector<int32_t> p = {5, 17, 300, 2, 99, 42, 7};
  const std::vector<float> a = disk.logits(p);
  EXPECT_EQ(a, mem.logits(p));
  for (float v : a) ASSERT_TRUE(std::isfinite(v));
  auto file = SafetensorsFile::open(tmp / "e" / kEngineWeights);
  EXPECT_EQ(file->get("layers.0.w_down").dtype, DType::F8_E4M3);
  std::vector<std::pair<std::string, Tensor>> ts;
  for (const auto& [name, ti] : file->tensors())
    if (name != "layers.1.w_down.scale") ts.push_back({name, file->get(name)});
  write_safetensors(tmp / "w.safetensors", ts);
  file.reset();
  fs::rename(tmp / "w.safetensors", tmp / "e" / kEngineWeights);
  const std::string err = error_of([&] { Engine::load(tmp / "e"); });
  EXPECT_NE(err.find("missing layers.1.w_down.scale"), std::string::npos) << err;
}

// The FP8 KV cache on the CPU: each (token, head) stores quantize_fp8_row's codes and scale, and
// attention over it is attention over those values dequantized (the reference the GPU kernels
// are held to); a non-finite value makes its head's attention NaN, never a finite answer.
TEST(QuantKvFp8, CpuCacheHoldsCodesAndScales) {
  const int64_t heads = 4, kv_heads = 2, hd = 16, kvd = kv_heads * hd, bs = 4, n = 11;
  const std::vector<int32_t> table = {3, 1, 2};  // out of pool order
  const int64_t slots = 4 * bs;
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> k(size_t(n * kvd)), v(k.size()), q(size_t(n * heads * hd));
  for (auto* x : {&k, &v, &q})
    for (float& f : *x) f = nd(rng);
  for (int64_t d = 0; d < hd; ++d) k[size_t(3 * kvd + hd + d)] *= 1000.0f;  // an outlier head
  std::vector<uint8_t> kc(size_t(slots * kvd)), vc(kc.size());
  std::vector<float> ks(size_t(slots * kv_heads)), vs(ks.size());
  cpu::KVView f8{reinterpret_cast<float*>(kc.data()),
                 reinterpret_cast<float*>(vc.data()),
                 table.data(),
                 bs,
                 kvd,
                 nullptr,
                 0,
                 ks.data(),
                 vs.data(),
                 hd};
  std::vector<int32_t> pos(static_cast<size_t>(n));
  std::iota(pos.begin(), pos.end(), 0);
  cpu::kv_write(f8, k.data(), v.data(), kvd, pos.data(), n);
  // The same values dequantized into a float cache.
  std::vector<float> kf(size_t(slots * kvd), 0.0f), vf(kf.size(), 0.0f);
  cpu::KVView f32{kf.data(), vf.data(), table.data(), bs, kvd};
  for (int64_t i = 0; i < n; ++i) {
    const int64_t slot = f32.slot(i, i);
    for (int64_t h = 0; h < kv_heads; ++h) {
      uint8_t codes[hd];
      float scale = 0;
      ASSERT_TRUE(quantize_fp8_row(k.data() + i * kvd + h * hd, hd, codes, &scale));
      ASSERT_EQ(std::memcmp(codes, kc.data() + slot * kvd + h * hd, hd), 0) << i << " " << h;
      ASSERT_EQ(scale, ks[size_t(slot * kv_heads + h)]) << i << " " << h;
      dequantize_fp8_row(kc.data() + slot * kvd + h * hd, ks[size_t(slot * kv_heads + h)], hd,
                         kf.data() + slot * kvd + h * hd);
      dequantize_fp8_row(vc.data() + slot * kvd + h * hd, vs[size_t(slot * kv_heads + h)], hd,
                         vf.data() + slot * kvd + h * hd);
    }
  }
  // The outlier head costs only its own precision: the other head of that token keeps its scale.
  EXPECT_GT(ks[size_t(f32.slot(3, 3) * kv_heads + 1)], 100 * ks[size_t(f32.slot(3, 3) * kv_heads)]);
  const float scale = 0.25f;
  std::vector<float> got(q.size()), want(q.size());
  cpu::attention(q.data(), heads * hd, n, pos.data(), f8, heads, kv_heads, hd, scale, 0, 0, nullptr,
                 got.data(), heads * hd);
  cpu::attention(q.data(), heads * hd, n, pos.data(), f32, heads, kv_heads, hd, scale, 0, 0,
                 nullptr, want.data(), heads * hd);
  // The same values in the same order; only the vectorised dot product's split into lanes may
  // differ (it follows the operands' alignment), so equal to float rounding.
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_NEAR(got[i], want[i], 1e-6f * (1.0f + std::fabs(want[i]))) << i;
  // A NaN in token 5's V head 0: rows from position 5 on read it in heads 0-1 (group 2).
  v[size_t(5 * kvd + 2)] = std::numeric_limits<float>::quiet_NaN();
  cpu::kv_write(f8, k.data() + 5 * kvd, v.data() + 5 * kvd, kvd, pos.data() + 5, 1);
  cpu::attention(q.data(), heads * hd, n, pos.data(), f8, heads, kv_heads, hd, scale, 0, 0, nullptr,
                 got.data(), heads * hd);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t h = 0; h < heads; ++h) {
      const float o = got[size_t(i * heads * hd + h * hd)];
      EXPECT_EQ(std::isnan(o), i >= 5 && h < 2) << i << " " << h;
    }
}

// --kv-cache-dtype fp8 is recorded in the engine, read back, checked, and refused where it
// cannot apply.
TEST(QuantKvFp8, EnginesRecordItAndBadSettingsAreRefused) {
  TempDir tmp;
  BuildConfig bc;
  bc.dtype = "bf16";
  bc.kv_cache_dtype = "fp8";
  EXPECT_EQ(Engine::build_to(hf("llama"), tmp / "e", bc).kv_cache_dtype, "fp8");
  EXPECT_EQ(read_json(tmp / "e" / kEngineManifest)["build"]["kv_cache_dtype"], "fp8");
  Engine disk = Engine::load(tmp / "e");
  EXPECT_EQ(disk.info().kv_cache_dtype, "fp8");
  disk.start({.device = "cpu", .kv_cache_tokens = 256});
  const std::vector<int32_t> p = {5, 17, 300, 2, 99, 42, 7};
  Engine mem = Engine::build(hf("llama"), bc);
  mem.start({.device = "cpu"});
  EXPECT_EQ(disk.logits(p), mem.logits(p));
  // One byte an element plus a scale per token and head, against the CPU's F32 cache.
  BuildConfig plain = bc;
  plain.kv_cache_dtype = "auto";
  Engine b16 = Engine::build(hf("llama"), plain);
  b16.start({.device = "cpu", .kv_cache_tokens = 256});
  const ModelInfo mi = disk.info();
  const auto cfg = read_json(hf("llama") / "config.json");
  const int64_t kv_heads = cfg["num_key_value_heads"];
  const int64_t kvd =
      kv_heads * (cfg["hidden_size"].get<int64_t>() / cfg["num_attention_heads"].get<int64_t>());
  const int64_t tokens = disk.runtime_info().kv_cache_tokens + 16;  // and the padding block
  EXPECT_EQ(disk.runtime_info().kv_cache_bytes, 2 * mi.num_layers * tokens * (kvd + 4 * kv_heads));
  EXPECT_EQ(b16.runtime_info().kv_cache_bytes, 2 * mi.num_layers * tokens * kvd * 4);
  BuildConfig only_kv;
  only_kv.kv_cache_dtype = "fp8";
  EXPECT_NE(error_of([&] { Engine::open(tmp / "e", only_kv); }).find("--kv-cache-dtype"),
            std::string::npos);
  BuildConfig f32 = bc;
  f32.dtype = "f32";
  EXPECT_NE(error_of([&] { Engine::build(hf("llama"), f32); }).find("16-bit"), std::string::npos);
  BuildConfig bad = bc;
  bad.kv_cache_dtype = "int4";
  EXPECT_NE(error_of([&] { Engine::build(hf("llama"), bad); }).find("'int4'"), std::string::npos);
  auto man = read_json(tmp / "e" / kEngineManifest);
  man["build"]["kv_cache_dtype"] = "fp4";
  write_json(tmp / "e" / kEngineManifest, man);
  const std::string err = error_of([&] { Engine::load(tmp / "e"); });
  EXPECT_NE(err.find("build.kv_cache_dtype 'fp4'"), std::string::npos) << err;
}

}  // namespace
}  // namespace kiln::test

namespace kiln::test {
namespace {

// The CPU reference's routing rules (Backend::MoeParams) on hand-made scores, so each rule is
// checked by itself: group-limited softmax (a group scores its best), sigmoid with a correction
// bias (a group scores its two best), and ties to the lower index.
TEST(CpuMoeRoute, GroupsBiasAndTies) {
  using P = Backend::MoeParams;
  std::vector<int64_t> chosen;
  // Softmax, 8 experts in 4 groups of 2, the best 2 groups, top 3. The global top 3 are 7, 0, 2
  // (logits 5, 4.9, 4.8); the groups' bests are 4.9 (g0), 4.8 (g1), 1 (g2), 5 (g3): groups 3
  // and 0 stay, so the third pick is expert 1 (4.7), not 2.
  {
    std::vector<float> l = {4.9f, 4.7f, 4.8f, 0.0f, 1.0f, 0.0f, 0.0f, 5.0f};
    P p;
    p.num_experts = 8, p.top_k = 3, p.groups = 4, p.topk_groups = 2;
    cpu::moe_route(l.data(), 8, p, nullptr, chosen);
    EXPECT_EQ(chosen, (std::vector<int64_t>{7, 0, 1}));
    float sum = 0;
    for (float v : l) sum += v;
    EXPECT_NEAR(sum, 1.0f, 1e-6f);  // l became the softmax scores
    p.groups = 1;                   // no limit: the global top 3
    l = {4.9f, 4.7f, 4.8f, 0.0f, 1.0f, 0.0f, 0.0f, 5.0f};
    cpu::moe_route(l.data(), 8, p, nullptr, chosen);
    EXPECT_EQ(chosen, (std::vector<int64_t>{7, 0, 2}));
  }
  // Sigmoid with a correction bias: the bias decides the choice (expert 3 over expert 0), the
  // scores stay unbiased; groups of 2 score their two best summed.
  {
    std::vector<float> l = {2.0f, -3.0f, -3.0f, 1.0f};
    const std::vector<float> bias = {0.0f, 0.0f, 0.0f, 0.5f};
    P p;
    p.num_experts = 4, p.top_k = 1, p.scoring = Routing::SigmoidTopK;
    cpu::moe_route(l.data(), 4, p, bias.data(), chosen);
    EXPECT_EQ(chosen, (std::vector<int64_t>{3}));  // 0.731 + 0.5 > 0.881
    EXPECT_NEAR(l[3], 1.0f / (1.0f + std::exp(-1.0f)), 1e-6f);
    // Groups {0, 1} and {2, 3}: sums 0.881 + 0.047 against 0.047 + 1.231: group 1 wins.
    l = {2.0f, -3.0f, -3.0f, 1.0f};
    p.groups = 2, p.topk_groups = 1, p.top_k = 2;
    cpu::moe_route(l.data(), 4, p, bias.data(), chosen);
    EXPECT_EQ(chosen, (std::vector<int64_t>{3, 2}));
  }
  // Equal scores: the lower index first (torch.topk's order, and the CUDA kernel's).
  {
    std::vector<float> l = {1.0f, 3.0f, 3.0f, 3.0f};
    P p;
    p.num_experts = 4, p.top_k = 2;
    cpu::moe_route(l.data(), 4, p, nullptr, chosen);
    EXPECT_EQ(chosen, (std::vector<int64_t>{1, 2}));
  }
}

}  // namespace
}  // namespace kiln::test
