#include "build/gguf_checkpoint.h"

#include <cmath>
#include <cstring>
#include <map>

#include "core/error.h"
#include "io/gguf.h"
#include "tokenizer/gguf_tokenizer.h"

namespace kiln {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// One GGUF architecture: the Hugging Face class it is, how llama.cpp converted it, and the
// per-layer tensor names that differ from the common ones (kLayerNames).
struct GgufFamily {
  const char* gguf;
  const char* hf;
  bool permuted_qk = false;    // LlamaModel's Q/K rotary permutation
  bool norm_plus_one = false;  // Gemma: norms stored as 1 + w
  const char* act = "silu";
  std::vector<std::pair<const char*, const char*>> layer_names;  // overrides
  int64_t swa_period = 0;      // llama.cpp's sliding-window layer period (Gemma 3)
  int64_t big_layers = 0;      // layer count of the 27B model (attention scale rule)
  double local_rope_base = 0;  // Gemma 3's sliding layers
};

// blk.{l}.<gguf> -> model.layers.{l}.<hf>, for every family unless overridden.
const std::vector<std::pair<const char*, const char*>> kLayerNames = {
    {"attn_norm.weight", "input_layernorm.weight"},
    {"attn_q.weight", "self_attn.q_proj.weight"},
    {"attn_q.bias", "self_attn.q_proj.bias"},
    {"attn_k.weight", "self_attn.k_proj.weight"},
    {"attn_k.bias", "self_attn.k_proj.bias"},
    {"attn_v.weight", "self_attn.v_proj.weight"},
    {"attn_v.bias", "self_attn.v_proj.bias"},
    {"attn_output.weight", "self_attn.o_proj.weight"},
    {"attn_output.bias", "self_attn.o_proj.bias"},
    {"attn_q_norm.weight", "self_attn.q_norm.weight"},
    {"attn_k_norm.weight", "self_attn.k_norm.weight"},
    {"ffn_norm.weight", "post_attention_layernorm.weight"},
    {"ffn_gate.weight", "mlp.gate_proj.weight"},
    {"ffn_up.weight", "mlp.up_proj.weight"},
    {"ffn_down.weight", "mlp.down_proj.weight"},
};

const std::vector<std::pair<const char*, const char*>> kGemma2Names = {
    {"post_attention_norm.weight", "post_attention_layernorm.weight"},
    {"ffn_norm.weight", "pre_feedforward_layernorm.weight"},
    {"post_ffw_norm.weight", "post_feedforward_layernorm.weight"},
};

const std::vector<GgufFamily>& families() {
  using Names = std::vector<std::pair<const char*, const char*>>;
  const Names phi3 = {{"attn_qkv.weight", "self_attn.qkv_proj.weight"},
                      {"ffn_up.weight", "mlp.gate_up_proj.weight"}};
  // gguf, hf, permuted_qk, norm_plus_one, act, layer_names, swa_period, big_layers,
  // local_rope_base
  static const std::vector<GgufFamily> f = {
      {"llama", "LlamaForCausalLM", true, false, "silu", {}, 0, 0, 0},
      {"qwen2", "Qwen2ForCausalLM", false, false, "silu", {}, 0, 0, 0},
      {"qwen3", "Qwen3ForCausalLM", false, false, "silu", {}, 0, 0, 0},
      {"gemma", "GemmaForCausalLM", false, true, "gelu_pytorch_tanh", {}, 0, 0, 0},
      {"gemma2", "Gemma2ForCausalLM", false, true, "gelu_pytorch_tanh", kGemma2Names, 0, 46, 0},
      {"gemma3", "Gemma3ForCausalLM", false, true, "gelu_pytorch_tanh", kGemma2Names, 6, 62,
       10000.0},
      {"phi3", "Phi3ForCausalLM", false, false, "silu", phi3, 0, 0, 0},
  };
  return f;
}

std::string known_families() {
  std::string r;
  for (const auto& f : families()) r += cat(r.empty() ? "" : ", ", f.gguf);
  return r;
}

// Undoes LlamaModel.permute on a [rows, cols] F32 weight: HF row (h, i, j) is GGUF row (h, j, i)
// for the `heads` heads of rows / heads rows each (i: which half, j: the pair within the half).
void unpermute_rows(float* w, int64_t rows, int64_t cols, int64_t heads) {
  const int64_t d = rows / heads, half = d / 2;
  std::vector<float> src(w, w + rows * cols);
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < 2; ++i)
      for (int64_t j = 0; j < half; ++j)
        std::memcpy(w + (h * d + i * half + j) * cols, src.data() + (h * d + j * 2 + i) * cols,
                    size_t(cols) * 4);
}

// The HF row r of a weight whose rows LlamaModel.permute interleaved over `heads` heads comes
// from this GGUF row (identity when heads is 0).
int64_t source_row(int64_t r, int64_t rows, int64_t heads) {
  if (!heads) return r;
  const int64_t d = rows / heads, half = d / 2, h = r / d, i = (r % d) / half, j = r % half;
  return h * d + j * 2 + i;
}

// A Q4_0 weight [out, in] (blocks of 32: an F16 scale d, then 16 bytes whose low nibbles are
// codes 0..15 and high nibbles codes 16..31; value (q - 8) * d) as compressed-tensors
// pack-quantized int4: <base>.weight_packed I32 [out, in / 8] (8 codes a word, in order along the
// inputs, code k at bits 4k; stored values q = signed value + 8), .weight_scale F32 [out, in /
// 32] and .weight_shape.
void add_q4_0_as_packed(const std::shared_ptr<GgufFile>& g, const GgufTensorInfo& t,
                        const std::string& base, int64_t perm_heads,
                        std::map<std::string, VirtualTensor>& vts) {
  const int64_t out = t.ne[1], in = t.ne[0], blocks = in / 32;
  constexpr size_t kBlock = 18;
  VirtualTensor packed, scale, shape;
  packed.info.dtype = DType::I32;
  packed.info.shape = {out, in / 8};
  packed.make = [g, t, out, in, blocks, perm_heads] {
    Tensor r = Tensor::zeros(DType::I32, {out, in / 8});
    auto* w = reinterpret_cast<uint32_t*>(r.ptr<int32_t>());
    for (int64_t o = 0; o < out; ++o) {
      const uint8_t* row = g->data(t) + size_t(source_row(o, out, perm_heads)) * blocks * kBlock;
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* qs = row + b * kBlock + 2;
        uint8_t code[32];
        for (int j = 0; j < 16; ++j) code[j] = qs[j] & 15, code[j + 16] = qs[j] >> 4;
        for (int k = 0; k < 4; ++k) {
          uint32_t word = 0;
          for (int c = 0; c < 8; ++c) word |= uint32_t(code[k * 8 + c]) << (4 * c);
          w[o * (in / 8) + b * 4 + k] = word;
        }
      }
    }
    return r;
  };
  scale.info.dtype = DType::F32;
  scale.info.shape = {out, blocks};
  scale.make = [g, t, out, blocks, perm_heads] {
    Tensor r = Tensor::zeros(DType::F32, {out, blocks});
    for (int64_t o = 0; o < out; ++o) {
      const uint8_t* row = g->data(t) + size_t(source_row(o, out, perm_heads)) * blocks * kBlock;
      for (int64_t b = 0; b < blocks; ++b) {
        uint16_t d;
        std::memcpy(&d, row + b * kBlock, 2);
        r.ptr<float>()[o * blocks + b] = f16_to_f32(d);
      }
    }
    return r;
  };
  shape.info.dtype = DType::I64;
  shape.info.shape = {2};
  shape.make = [out, in] {
    Tensor r = Tensor::zeros(DType::I64, {2});
    r.ptr<int64_t>()[0] = out, r.ptr<int64_t>()[1] = in;
    return r;
  };
  packed.release = [g, t] { g->drop_pages(t); };
  vts[base + ".weight_packed"] = std::move(packed);
  vts[base + ".weight_scale"] = std::move(scale);
  vts[base + ".weight_shape"] = std::move(shape);
}

}  // namespace

Checkpoint open_gguf_checkpoint(const fs::path& file, const fs::path& tokenizer_dir,
                                GgufSummary* summary) {
  const std::string where = file.string();
  std::shared_ptr<GgufFile> g = GgufFile::open(file);
  const json& meta = g->metadata();
  const auto str = [&](const std::string& k) {
    auto it = meta.find(k);
    return it != meta.end() && it->is_string() ? it->get<std::string>() : std::string();
  };
  const std::string arch = str("general.architecture");
  KILN_CHECK(!arch.empty(), where, ": no general.architecture in the metadata");
  const GgufFamily* fam = nullptr;
  for (const auto& f : families())
    if (arch == f.gguf) fam = &f;
  KILN_CHECK(fam, where, ": general.architecture '", arch.substr(0, 32),
             "' is not one kiln maps from GGUF yet (known: ", known_families(), ")");
  const std::string p = arch + ".";
  const auto num = [&](const std::string& k) -> const json* {
    auto it = meta.find(p + k);
    if (it == meta.end()) return nullptr;
    KILN_CHECK(it->is_number(), where, ": ", p, k, " is not a number");
    return &*it;
  };
  const auto integer = [&](const std::string& k, std::optional<int64_t> def = {}) -> int64_t {
    const json* v = num(k);
    if (!v) {
      KILN_CHECK(def, where, ": missing metadata ", p, k);
      return *def;
    }
    KILN_CHECK(v->is_number_integer() && v->get<int64_t>() > 0, where, ": ", p, k,
               " must be a positive integer");
    return v->get<int64_t>();
  };
  const auto real = [&](const std::string& k, double def) {
    const json* v = num(k);
    return v ? v->get<double>() : def;
  };

  // The config.json a Hugging Face folder of this model would hold.
  const GgufTensorInfo* embd = g->find("token_embd.weight");
  KILN_CHECK(embd && embd->ne.size() == 2, where,
             ": missing tensor token_embd.weight (the token embeddings)");
  const int64_t hidden = integer("embedding_length"), layers = integer("block_count"),
                heads = integer("attention.head_count"),
                kv_heads = integer("attention.head_count_kv", heads);
  KILN_CHECK(embd->ne[0] == hidden, where, ": token_embd.weight has rows of ", embd->ne[0],
             ", not ", p, "embedding_length ", hidden);
  const int64_t head_dim = integer("attention.key_length", hidden / heads);
  KILN_CHECK(integer("attention.value_length", head_dim) == head_dim, where, ": ", p,
             "attention.value_length differs from the key length (not supported)");
  const int64_t rope_dims = integer("rope.dimension_count", head_dim);
  KILN_CHECK(rope_dims == head_dim, where, ": ", p, "rope.dimension_count ", rope_dims,
             " rotates part of each head (", head_dim, "): not supported from GGUF yet");
  json c = {{"architectures", {fam->hf}},
            {"model_type", arch},
            {"hidden_size", hidden},
            {"num_hidden_layers", layers},
            {"intermediate_size", integer("feed_forward_length")},
            {"num_attention_heads", heads},
            {"num_key_value_heads", kv_heads},
            {"head_dim", head_dim},
            {"rms_norm_eps", real("attention.layer_norm_rms_epsilon", 1e-6)},
            {"max_position_embeddings", integer("context_length", 2048)},
            {"rope_theta", real("rope.freq_base", 10000.0)},
            {"vocab_size", embd->ne[1]},
            {"tie_word_embeddings", g->find("output.weight") == nullptr},
            {"hidden_act", fam->act},
            {"hidden_activation", fam->act}};
  // 0 stands for "none" (the converter writes a null sliding_window as 0).
  if (const json* w = num("attention.sliding_window"); w && w->get<double>() != 0)
    c["sliding_window"] = integer("attention.sliding_window");
  for (const char* k : {"attn_logit_softcapping", "final_logit_softcapping"})
    if (num(k)) c[k] = real(k, 0.0);
  if (fam->swa_period)
    c["sliding_window_pattern"] = integer("attention.sliding_window_pattern", fam->swa_period);
  if (fam->local_rope_base > 0)
    c["rope_local_base_freq"] = real("rope.freq_base_swa", fam->local_rope_base);
  if (fam->big_layers)
    c["query_pre_attn_scalar"] = layers == fam->big_layers ? hidden / heads : head_dim;
  const std::string scaling = str(p + "rope.scaling.type");
  if (!scaling.empty() && scaling != "none") {
    KILN_CHECK(scaling == "linear" || scaling == "yarn", where, ": ", p, "rope.scaling.type '",
               scaling.substr(0, 16), "' is not supported from GGUF yet (linear, yarn)");
    json rs = {{"rope_type", scaling}, {"factor", real("rope.scaling.factor", 1.0)}};
    if (scaling == "yarn")
      rs["original_max_position_embeddings"] = integer("rope.scaling.original_context_length");
    c["rope_scaling"] = rs;
  }
  // Per-dimension frequency divisors: Llama 3.x's rope scaling is stored as rope_freqs [dims /
  // 2] (llama.cpp divides each frequency by it), Phi-3's long-context rope as rope_factors_long
  // and _short. Both are transformers' "longrope" arithmetic (inverse frequency / factor) with
  // the attention factor llama.cpp uses: 1 for rope_freqs, the file's for Phi-3.
  const auto factors = [&](const char* name) {
    const GgufTensorInfo* t = g->find(name);
    KILN_CHECK(t->ne.size() == 1 && t->ne[0] == head_dim / 2, where, ": tensor ", name,
               " must hold ", head_dim / 2, " factors");
    const Tensor f = g->to_f32(*t);
    std::vector<double> v(f.ptr<float>(), f.ptr<float>() + f.numel());
    for (double x : v)
      KILN_CHECK(std::isfinite(x) && x > 0, where, ": tensor ", name, " holds a factor ", x);
    return v;
  };
  if (g->find("rope_freqs.weight")) {
    KILN_CHECK(!c.contains("rope_scaling"), where, ": both rope_freqs and ", p,
               "rope.scaling.type are set");
    const std::vector<double> f = factors("rope_freqs.weight");
    c["rope_scaling"] = {{"rope_type", "longrope"},
                         {"short_factor", f},
                         {"long_factor", f},
                         {"attention_factor", 1.0},
                         {"original_max_position_embeddings", c["max_position_embeddings"]}};
  } else if (g->find("rope_factors_long.weight") || g->find("rope_factors_short.weight")) {
    KILN_CHECK(g->find("rope_factors_long.weight") && g->find("rope_factors_short.weight"), where,
               ": rope_factors_long and rope_factors_short come together");
    json rs = {
        {"rope_type", "longrope"},
        {"short_factor", factors("rope_factors_short.weight")},
        {"long_factor", factors("rope_factors_long.weight")},
        {"original_max_position_embeddings", integer("rope.scaling.original_context_length")}};
    if (num("rope.scaling.attn_factor"))
      rs["attention_factor"] = real("rope.scaling.attn_factor", 1);
    c["rope_scaling"] = rs;
  }

  GgufTokenizer tok = write_gguf_tokenizer(meta, tokenizer_dir, where);
  if (tok.bos_id >= 0) c["bos_token_id"] = tok.bos_id;
  if (!tok.eog_ids.empty()) c["eos_token_id"] = tok.eog_ids;
  KILN_CHECK(tok.vocab_size <= embd->ne[1], where, ": the tokenizer has ", tok.vocab_size,
             " tokens but token_embd.weight only ", embd->ne[1], " rows");

  Checkpoint ck = checkpoint_from_config(c, where);
  ck.dir = file;

  // The tensors under Hugging Face names.
  std::map<std::string, std::string> names;  // GGUF -> HF
  names["token_embd.weight"] = "model.embed_tokens.weight";
  names["output_norm.weight"] = "model.norm.weight";
  names["output.weight"] = "lm_head.weight";
  std::vector<std::string> unexpected;
  for (const GgufTensorInfo& t : g->tensors()) {
    if (names.count(t.name)) continue;
    if (t.name == "rope_freqs.weight" || t.name == "rope_factors_long.weight" ||
        t.name == "rope_factors_short.weight")
      continue;  // in the config (rope_scaling)
    int64_t l = -1;
    size_t used = 0;
    if (t.name.starts_with("blk.") && std::sscanf(t.name.c_str() + 4, "%ld.%zn", &l, &used) == 1 &&
        l >= 0 && l < layers) {
      const std::string rest = t.name.substr(4 + used);
      const char* hf = nullptr;
      for (const auto& [a, b] : fam->layer_names)
        if (rest == a) hf = b;
      if (!hf)
        for (const auto& [a, b] : kLayerNames)
          if (rest == a) hf = b;
      if (hf) {
        names[t.name] = cat("model.layers.", l, ".", hf);
        continue;
      }
    }
    unexpected.push_back(t.name);
  }
  KILN_CHECK(unexpected.empty(), where, ": tensors kiln does not map for ", arch, ": ",
             join_limited(unexpected));

  // Q4_0 codes are kiln's int4-wo in groups of 32 exactly ((q - 8) * d, d an F16 scale): when
  // every dense linear is Q4_0 they are kept, presented as compressed-tensors pack-quantized
  // int4 (symmetric, stored values q, scale d), which the build repacks as it does a published
  // int4 checkpoint. Any other mix is dequantized whole (kiln runs one scheme per engine).
  const auto is_linear = [](const std::string& hf) {
    for (const char* s :
         {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
          "up_proj.weight", "down_proj.weight", "qkv_proj.weight", "gate_up_proj.weight"})
      if (hf.ends_with(s)) return true;
    return false;
  };
  int linears = 0, q4_0 = 0;
  for (const auto& [gname, hf] : names)
    if (const GgufTensorInfo* t = g->find(gname); t && is_linear(hf))
      ++linears, q4_0 += t->type == GgmlType::Q4_0 && t->ne.size() == 2;
  const bool keep_q4_0 = linears > 0 && q4_0 == linears;
  if (keep_q4_0) {
    ck.quant = WeightQuant::Int4;
    ck.quant_group = 32;
    ck.ct_format = "pack-quantized";
    ck.ct_symmetric = true;
  }

  std::map<std::string, VirtualTensor> vts;
  std::map<std::string, int> dequantized, stored, kept;
  for (const auto& [gname, hf] : names) {
    const GgufTensorInfo* t = g->find(gname);
    if (!t) continue;  // a missing weight is named by the build's own check
    KILN_CHECK(t->ne.size() <= 2, where, ": tensor ", gname, " has ", t->ne.size(),
               " dimensions (kiln maps vectors and matrices)");
    const bool norm = gname.ends_with("norm.weight");
    const bool shift = fam->norm_plus_one && norm;
    int64_t perm_heads = 0;
    if (fam->permuted_qk && t->ne.size() == 2) {
      if (gname.ends_with("attn_q.weight")) perm_heads = heads;
      if (gname.ends_with("attn_k.weight")) perm_heads = kv_heads;
    }
    if (fam->permuted_qk && (gname.ends_with("attn_q.bias") || gname.ends_with("attn_k.bias")))
      perm_heads = gname.ends_with("attn_q.bias") ? heads : kv_heads;
    if (keep_q4_0 && is_linear(hf)) {
      ++kept[ggml_type_name(uint32_t(t->type))];
      add_q4_0_as_packed(g, *t, hf.substr(0, hf.size() - 7), perm_heads, vts);
      continue;
    }
    const bool plain =
        t->type == GgmlType::F32 || t->type == GgmlType::F16 || t->type == GgmlType::BF16;
    ++(plain ? stored : dequantized)[ggml_type_name(uint32_t(t->type))];
    VirtualTensor v;
    v.info.shape = t->shape();
    const GgufTensorInfo info = *t;
    if (plain && !shift && !perm_heads) {
      v.info.dtype = t->type == GgmlType::F32   ? DType::F32
                     : t->type == GgmlType::F16 ? DType::F16
                                                : DType::BF16;
      const DType dt = v.info.dtype;
      v.make = [g, info, dt] {
        // The mapping stays alive through g; the data area is 32-byte aligned and every
        // tensor offset a multiple of the alignment.
        return Tensor::view(dt, info.shape(), g, const_cast<uint8_t*>(g->data(info)));
      };
    } else {
      v.info.dtype = DType::F32;
      v.make = [g, info, shift, perm_heads] {
        Tensor f = g->to_f32(info);
        float* d = f.ptr<float>();
        if (shift)
          for (int64_t i = 0; i < f.numel(); ++i) d[i] -= 1.0f;
        if (perm_heads) {
          const int64_t rows = f.shape[0], cols = f.shape.size() == 2 ? f.shape[1] : 1;
          unpermute_rows(d, rows, cols, perm_heads);
        }
        return f;
      };
    }
    v.release = [g, info] { g->drop_pages(info); };
    vts[hf] = std::move(v);
  }
  ck.weights = WeightSet::from_virtual(std::move(vts), g->header_hash());
  if (summary) {
    summary->architecture = arch;
    const auto list = [](const std::map<std::string, int>& m) {
      std::string r;
      for (const auto& [t, k] : m) r += cat(r.empty() ? "" : ", ", t, " x", k);
      return r;
    };
    std::vector<std::string> parts;
    if (!kept.empty()) parts.push_back(cat(list(kept), " kept as int4-wo (groups of 32)"));
    if (!dequantized.empty())
      parts.push_back(cat(list(dequantized), " dequantized (no kiln kernel for them)"));
    if (!stored.empty()) parts.push_back(cat(list(stored), " as stored"));
    for (const auto& p : parts) summary->types += cat(summary->types.empty() ? "" : "; ", p);
  }
  return ck;
}

}  // namespace kiln
