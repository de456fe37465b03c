// --quant int4-awq: the scale search (build/awq.h), the folding of 1 / s into the ops that
// produce each linear's input, and calibration through kiln itself (runtime/calibrate.h).
#include <cstring>
#include <fstream>
#include <random>

#include "build/awq.h"
#include "build/checkpoint.h"
#include "build/quantize.h"
#include "core/quant.h"
#include "kiln/kiln.h"
#include "runtime/calibrate.h"
#include "test_util.h"

namespace kiln::test {
namespace {

// A weight whose inputs include a few channels with 30x larger activations, as LLMs' linears
// have: the search must pick alpha > 0 and cut the output error well below plain int4's, and it
// never does worse than plain int4 (alpha 0 is on the grid).
TEST(QuantAwq, SearchScalesOutlierChannels) {
  const int64_t out = 48, in = 256, rows = 64;
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> w(size_t(out * in));
  for (float& v : w) v = nd(rng) / 16.0f;
  ActStats st;
  st.abs_sum.assign(size_t(in), 0.0);
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t c = 0; c < in; ++c) {
      const float x = nd(rng) * (c % 37 == 5 ? 30.0f : 1.0f);
      st.sample.push_back(x);
      st.abs_sum[size_t(c)] += std::fabs(x);
    }
    ++st.rows, ++st.sample_rows;
  }
  const AwqChoice a = awq_search(w.data(), out, in, 64, st);
  EXPECT_GT(a.alpha, 0.0f);
  EXPECT_LT(a.err, 0.5 * a.err_rtn) << "alpha " << a.alpha;
  ASSERT_EQ(int64_t(a.scale.size()), in);
  EXPECT_GT(a.scale[5], a.scale[6]);  // the outlier channel's weights are scaled up

  // Uniform activations: nothing to gain, and the search does not lose.
  for (float& x : st.sample) x = nd(rng);
  std::fill(st.abs_sum.begin(), st.abs_sum.end(), double(rows));
  const AwqChoice u = awq_search(w.data(), out, in, 64, st);
  EXPECT_LE(u.err, u.err_rtn);
}

// Folding 1 / s into the norms, the up rows of w_gate_up and (multi-head attention) the v rows of
// wqkv, with s on every foldable weight, leaves the function unchanged: the F32 logits of the
// scaled model equal the original's to float rounding. Across the fixture families that differ
// where it matters: llama (GQA: wo is not scaled), gpt2 (LayerNorm with bias, MHA, an ungated
// MLP: w_up only), gemma (norms stored as w for 1 + w), qwen2 (q/k/v biases).
TEST(QuantAwq, FoldingKeepsTheFunction) {
  for (const char* arch : {"llama", "gpt2", "gemma", "qwen2"}) {
    SCOPED_TRACE(arch);
    const Checkpoint ck = open_checkpoint(hf(arch));
    const ModelConfig& c = ck.config;
    AwqScales s;
    std::mt19937 rng(2);
    std::uniform_real_distribution<float> u(0.25f, 4.0f);
    for (const std::string& name : awq_weights(c)) {
      int64_t in = 0;
      for (const auto& spec : engine_layout(c))
        if (spec.name == name) in = spec.shape[1];
      ASSERT_GT(in, 0) << name;
      std::vector<float> v(static_cast<size_t>(in));
      for (float& x : v) x = u(rng);
      s[name] = v;
    }
    const bool mha = c.num_heads == c.num_kv_heads;
    EXPECT_EQ(s.count("layers.0.wo"), mha ? 1u : 0u);
    const auto plain = attach_scales(materialize(plan_weights(ck, DType::F32)), WeightQuant::None);
    const auto scaled = attach_scales(materialize(apply_awq(plan_weights(ck, DType::F32), c, s)),
                                      WeightQuant::None);
    int64_t changed = 0;
    for (size_t i = 0; i < plain.size(); ++i)
      changed +=
          std::memcmp(plain[i].second.data, scaled[i].second.data, plain[i].second.nbytes()) != 0;
    EXPECT_GE(changed, int64_t(s.size()));  // every scaled weight and what it folds into
    const std::vector<int32_t> p = {5, 17, 300, 2, 99, 42, 7, 1};
    const auto a = cpu_forward(c, plain, p), b = cpu_forward(c, scaled, p);
    const int64_t V = c.vocab_size;
    for (size_t t = 0; t < p.size(); ++t)
      EXPECT_LT(rel_err(b.data() + t * V, a.data() + t * V, V), 1e-5) << "position " << t;
  }
}

// The llama fixture with the demo model's tokenizer (same 512-token vocabulary) builds with
// --quant int4-awq on the built-in text and on a --calib file: an int4-wo engine whose manifest
// says what calibration did, whose logits stay within QuantQuality's int4 bound of the F32 engine,
// and which kiln loads back with the same description. Bad settings are refused by name.
TEST(QuantAwq, BuildsCalibratedEngines) {
  TempDir tmp;
  copy_dir(hf("llama"), tmp / "m");
  for (const char* f : {"tokenizer.json", "tokenizer_config.json"})
    fs::copy_file(demo() / f, tmp / "m" / f);
  BuildConfig bc;
  bc.dtype = "bf16";
  bc.quant = "int4-awq";
  const ModelInfo info = Engine::build_to(tmp / "m", tmp / "e", bc);
  EXPECT_EQ(info.quant, "int4-wo");
  EXPECT_NE(info.calibration.find("AWQ on 512 tokens of the built-in text: "), std::string::npos)
      << info.calibration;
  Engine e = Engine::load(tmp / "e");
  EXPECT_EQ(e.info().calibration, info.calibration);
  BuildConfig f32;
  f32.dtype = "f32";
  Engine ref = Engine::build(tmp / "m", f32);
  e.start({.device = "cpu"});
  ref.start({.device = "cpu"});
  const std::vector<int32_t> p = {5, 17, 300, 2, 99, 42, 7, 1};
  EXPECT_LT(nmse(e.logits(p), ref.logits(p)), 5e-2);  // QuantQuality's int4 bound

  std::string text;
  for (int i = 0; i < 40; ++i) text += "The quick brown fox jumps over the lazy dog. ";
  write_text(tmp / "calib.txt", text);
  bc.calib = (tmp / "calib.txt").string();
  Engine own = Engine::build(tmp / "m", bc);
  EXPECT_NE(own.info().calibration.find("tokens of " + bc.calib), std::string::npos)
      << own.info().calibration;

  write_text(tmp / "short.txt", "Too short.");
  bc.calib = (tmp / "short.txt").string();
  std::string err = error_of([&] { Engine::build(tmp / "m", bc); });
  EXPECT_NE(err.find("short.txt: "), std::string::npos) << err;
  EXPECT_NE(err.find("tokens; AWQ calibration needs at least 64"), std::string::npos) << err;
  bc.calib = (tmp / "missing.txt").string();
  err = error_of([&] { Engine::build(tmp / "m", bc); });
  EXPECT_NE(err.find("missing.txt: cannot open"), std::string::npos) << err;
  bc.quant = "int4-wo";
  err = error_of([&] { Engine::build(tmp / "m", bc); });
  EXPECT_NE(err.find("--calib is for --quant int4-awq"), std::string::npos) << err;
  bc.calib.clear();
  bc.quant = "int4-awq";
  err = error_of([&] { Engine::build(hf("llama"), bc); });  // no tokenizer
  EXPECT_NE(err.find("--quant int4-awq calibrates on text and needs the model's tokenizer"),
            std::string::npos)
      << err;
  err = error_of([&] { Engine::build_dummy(hf("llama") / "config.json", bc); });
  EXPECT_NE(err.find("dummy weights have nothing to calibrate"), std::string::npos) << err;
}

// A GGUF file's float weights calibrate with the tokenizer the file carries (written beside the
// temporary checkpoint), as a Hugging Face folder's do with its tokenizer files.
TEST(QuantAwq, CalibratesGgufWithItsOwnTokenizer) {
  BuildConfig bc;
  bc.dtype = "f32";
  bc.quant = "int4-awq";
  Engine e = Engine::build(data("gguf/llama.gguf"), bc);
  EXPECT_EQ(e.info().quant, "int4-wo");
  EXPECT_NE(e.info().calibration.find("AWQ on 512 tokens of the built-in text: "),
            std::string::npos)
      << e.info().calibration;
  bc.quant = "none";
  Engine ref = Engine::build(data("gguf/llama.gguf"), bc);
  e.start({.device = "cpu"});
  ref.start({.device = "cpu"});
  const std::vector<int32_t> p = {5, 17, 300, 2, 99, 42, 7, 1};
  EXPECT_LT(nmse(e.logits(p), ref.logits(p)), 5e-2);  // QuantQuality's int4 bound
}

}  // namespace
}  // namespace kiln::test
