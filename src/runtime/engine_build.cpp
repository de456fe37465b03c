// Engine, build side: from a Hugging Face folder, a GGUF file or dummy weights to an engine in
// memory or an engine folder; loading and verifying engine folders. (engine.cpp runs them.)
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "build/checkpoint.h"
#include "build/engine_file.h"
#include "build/gguf_checkpoint.h"
#include "build/quantize.h"
#include "build/shard_plan.h"
#include "core/error.h"
#include "graph/layout.h"
#include "io/gguf.h"
#include "io/json.h"
#include "kiln/kiln.h"
#include "runtime/calibrate.h"
#include "runtime/engine_impl.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace kiln {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr const char* kManifest = kEngineManifest;
constexpr const char* kWeights = kEngineWeights;

std::string hex(uint64_t v) {
  char b[17];
  std::snprintf(b, sizeof b, "%016llx", static_cast<unsigned long long>(v));
  return b;
}

}  // namespace

std::string dtype_label(DType t) {
  return t == DType::F32 ? "f32" : t == DType::F16 ? "f16" : t == DType::BF16 ? "bf16" : "?";
}

std::string calibration_line(const json& a) {
  if (!a.is_object()) return "";
  const double ratio = a.value("sample_error_vs_int4", 1.0);
  return cat("AWQ on ", a.value("tokens", int64_t{0}), " tokens of ",
             a.value("text", std::string("?")), ": ", a.value("scaled", int64_t{0}), " of ",
             a.value("linears", int64_t{0}), " linears scaled, sample output error ",
             std::lround(ratio * 100), "% of plain int4's");
}

namespace {

// What a build from `ck` (resolved with `bc`) records, without its weights.
std::unique_ptr<Engine::Impl> prepare(const Checkpoint& ck, const BuildConfig& bc,
                                      const fs::path& tokenizer_dir, json source) {
  KILN_CHECK(!bc.quant_lm_head || ck.quant == WeightQuant::None || !ck.weights, ck.dir.string(),
             ": the checkpoint is quantized as published (", weight_quant_name(ck.quant),
             "); --quant-lm-head is for models kiln quantizes");
  auto impl = std::make_unique<Engine::Impl>();
  impl->config = ck.config;
  impl->resolve_build(bc, ck.config_dtype);
  if (ck.quant != WeightQuant::None) {  // quantized as published: kiln keeps its scheme
    KILN_CHECK(impl->quant == WeightQuant::None || impl->quant == ck.quant, ck.dir.string(),
               ": the checkpoint is ",
               !ck.ct_format.empty()           ? "compressed-tensors "
               : ck.quant == WeightQuant::Int4 ? (ck.gptq ? "GPTQ " : "AWQ ")
                                               : "",
               weight_quant_name(ck.quant), "; --quant ", weight_quant_name(impl->quant),
               " would requantize it (leave --quant out)");
    KILN_CHECK(!impl->awq, ck.dir.string(), ": the checkpoint is already quantized (",
               weight_quant_name(ck.quant), "); --quant int4-awq would requantize it");
    impl->quant = ck.quant;
    // Dummy weights from a quantized config are quantized by kiln, in its default groups.
    impl->quant_group = ck.weights ? ck.quant_group : 0;
    impl->act_order = ck.weights && ck.act_order;
  }
  KILN_CHECK(!impl->awq || ck.weights,
             "--quant int4-awq calibrates a checkpoint's weights on text; dummy weights have "
             "nothing to calibrate (use --quant int4-wo)");
  impl->generation_defaults = ck.generation_defaults;
  impl->tokenizer_dir = tokenizer_dir;
  impl->source = std::move(source);
  return impl;
}

json source_of(const Checkpoint& ck, const fs::path& hf_dir) {
  return {{"path", fs::absolute(hf_dir).string()},
          {"config_hash", hex(ck.config_hash)},
          {"weights_hash", hex(ck.weights->identity_hash())}};
}

// A checkpoint to build from: a Hugging Face folder, or a GGUF file whose tokenizer files are
// written into a temporary folder that lives as long as `owner`.
struct BuildSource {
  Checkpoint ck;
  fs::path tokenizer_dir;
  std::shared_ptr<void> owner;
  std::string conversion;
};

void add_arch_specs(const BuildConfig& bc) {
  for (const auto& f : bc.arch_specs) add_arch_spec_file(f);
}

BuildSource open_source(const fs::path& path) {
  BuildSource s;
  if (!fs::is_regular_file(path)) {
    s.ck = open_checkpoint(path);
    s.tokenizer_dir = path;
    s.conversion = s.ck.inferred;
    return s;
  }
  KILN_CHECK(is_gguf_file(path), path.string(),
             ": not a GGUF file (no GGUF magic), a kiln engine or a Hugging Face folder");
  std::string tmpl = (fs::temp_directory_path() / "kiln-gguf-XXXXXX").string();
  KILN_CHECK(mkdtemp(tmpl.data()), "cannot make a temporary folder in ",
             fs::temp_directory_path().string());
  const fs::path dir = tmpl;
  s.owner = std::shared_ptr<void>(new fs::path(dir), [](void* p) {
    auto* d = static_cast<fs::path*>(p);
    std::error_code ec;
    fs::remove_all(*d, ec);
    delete d;
  });
  GgufSummary sum;
  s.ck = open_gguf_checkpoint(path, dir, &sum);
  s.tokenizer_dir = dir;
  s.conversion = cat("GGUF ", sum.architecture, ": ", sum.types);
  return s;
}

json dummy_source_of(const Checkpoint& ck, const fs::path& config_json, uint64_t seed) {
  return {{"path", fs::absolute(config_json).string()},
          {"config_hash", hex(ck.config_hash)},
          {"dummy_seed", seed}};
}

json manifest_of(const Engine::Impl& m) {
  return {{"format", "kiln-engine"},
          {"version", kEngineFormatVersion},
          {"kiln_version", build_info().version},
          {"model", to_json(m.config)},
          {"build",
           {{"dtype", dtype_label(m.dtype)},
            {"quant", weight_quant_name(m.quant)},
            {"quant_group", m.quant_group},
            {"act_order", m.act_order},
            {"quant_lm_head", m.quant_lm_head},
            {"awq", m.awq_info},
            {"kv_cache_dtype", m.kv_fp8 ? "fp8" : "auto"},
            {"max_batch", m.max_batch},
            {"max_seq_len", m.max_seq_len}}},
          {"source", m.source},
          {"generation_defaults", m.generation_defaults},
          {"parallel", {{"tp", m.tp}, {"pp", m.pp}}}};
}

// Rank r's weight file of a sharded engine.
std::string rank_file(int r, int world) {
  return cat("rank", r, "-of-", world, ".safetensors");
}

// A tokenizer or chat template shipped with the checkpoint must load at build time, not fail a
// later run.
void check_tokenizer(const fs::path& dir) {
  if (fs::is_regular_file(dir / "tokenizer.json") || fs::is_regular_file(dir / "tokenizer.model"))
    (void)Tokenizer::from_dir(dir);
  (void)ChatTemplate::from_dir(dir);
}

ModelInfo write_plan(const Engine::Impl& m, const WeightPlan& plan, const fs::path& out,
                     const ProgressFn& progress) {
  const EngineFolder folder{manifest_of(m), m.tokenizer_dir, progress, kWriteChunkBytes};
  if (m.tp * m.pp == 1) {
    write_engine_folder(out, plan, folder);
  } else {  // one file per rank, each streamed from the same source rows
    std::vector<std::pair<std::string, WeightPlan>> files;
    for (int r = 0; r < m.tp * m.pp; ++r)
      files.emplace_back(rank_file(r, m.tp * m.pp),
                         shard_plan(plan, m.config, m.scheme(), Shard::of(r, m.tp, m.pp)));
    write_engine_folder(out, files, folder);
  }
  ModelInfo i = info_without_weights(m);
  for (const auto& pt : plan) {
    if (pt.name.ends_with(".scale") || pt.name.ends_with(".zero") ||
        pt.name.ends_with(".perm")) {  // bytes, not parameters
      i.weight_bytes += int64_t(pt.nbytes());
      continue;
    }
    // int4-wo codes are U8 bytes of two parameters each.
    const bool packed = m.quant == WeightQuant::Int4 && pt.dtype == DType::U8;
    i.num_params += numel(pt.shape) * (packed ? 2 : 1);
    i.weight_bytes += int64_t(pt.nbytes());
  }
  return i;
}

}  // namespace

namespace {

// The weight plan of a checkpoint build: for int4-awq, the AWQ scales calibrated first
// (runtime/calibrate.h) and recorded in m.awq_info.
WeightPlan checkpoint_plan(const Checkpoint& ck, Engine::Impl& m) {
  if (!m.awq) return plan_weights(ck, m.dtype, m.scheme());
  std::string text = kDefaultCalibText, name = "the built-in text";
  if (!m.calib.empty()) {
    std::ifstream in(m.calib, std::ios::binary);
    KILN_CHECK(in, "--calib ", m.calib, ": cannot open");
    text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    KILN_CHECK(text.size() <= (size_t(64) << 20), "--calib ", m.calib,
               ": larger than 64 MiB (kiln reads its first 512 tokens)");
    name = m.calib;
  }
  const AwqCalibration cal = calibrate_awq(ck, m.tokenizer_dir, m.dtype, text, name);
  m.awq_info = {{"text", m.calib.empty() ? "the built-in text" : m.calib},
                {"tokens", cal.tokens},
                {"linears", int64_t(cal.scales.size())},
                {"scaled", cal.scaled},
                {"sample_error_vs_int4", cal.err_rtn > 0 ? cal.err / cal.err_rtn : 1.0}};
  return plan_weights(ck, m.dtype, m.scheme(), &cal.scales);
}

}  // namespace

namespace {

void check_in_memory(const BuildConfig& bc) {
  KILN_CHECK(bc.tp == 1 && bc.pp == 1,
             "--tp / --pp at build time write one weight file per rank (kiln build -o DIR); to "
             "run sharded from a Hugging Face folder, give --tp / --pp to run, chat or serve");
}

}  // namespace

Engine Engine::build(const fs::path& hf_dir, const BuildConfig& bc) {
  check_in_memory(bc);
  add_arch_specs(bc);
  BuildSource s = open_source(hf_dir);
  auto impl = prepare(s.ck, bc, s.tokenizer_dir, source_of(s.ck, hf_dir));
  impl->tokenizer_owner = s.owner;
  impl->conversion = s.conversion;
  impl->weights = attach_scales(materialize(checkpoint_plan(s.ck, *impl)), impl->quant);
  return Engine(std::move(impl));
}

Engine Engine::build_dummy(const fs::path& config_json, const BuildConfig& bc, uint64_t seed) {
  check_in_memory(bc);
  add_arch_specs(bc);
  Checkpoint ck = open_config(config_json);
  auto impl = prepare(ck, bc, config_json.parent_path(), dummy_source_of(ck, config_json, seed));
  impl->weights = attach_scales(
      materialize(plan_dummy_weights(ck.config, impl->dtype, seed, impl->scheme())), impl->quant);
  return Engine(std::move(impl));
}

ModelInfo Engine::build_to(const fs::path& hf_dir, const fs::path& out, const BuildConfig& bc,
                           const ProgressFn& progress) {
  add_arch_specs(bc);
  BuildSource s = open_source(hf_dir);
  auto impl = prepare(s.ck, bc, s.tokenizer_dir, source_of(s.ck, hf_dir));
  impl->conversion = s.conversion;
  // Every weight problem, before writing.
  const WeightPlan plan = checkpoint_plan(s.ck, *impl);
  check_tokenizer(s.tokenizer_dir);
  return write_plan(*impl, plan, out, progress);
}

ModelInfo Engine::build_dummy_to(const fs::path& config_json, const fs::path& out,
                                 const BuildConfig& bc, uint64_t seed, const ProgressFn& progress) {
  add_arch_specs(bc);
  Checkpoint ck = open_config(config_json);
  auto impl = prepare(ck, bc, config_json.parent_path(), dummy_source_of(ck, config_json, seed));
  check_tokenizer(config_json.parent_path());
  return write_plan(*impl, plan_dummy_weights(ck.config, impl->dtype, seed, impl->scheme()), out,
                    progress);
}

bool Engine::is_engine_dir(const fs::path& dir) {
  return fs::exists(dir / kManifest);
}

Engine Engine::open(const fs::path& dir, const BuildConfig& bc) {
  if (is_engine_dir(dir)) {
    // Build options say how to build: an engine is built already, and silently ignoring them
    // would run something other than what was asked for.
    const BuildConfig none;
    for (auto [set, opt] : {std::pair{bc.dtype != none.dtype, "--dtype"},
                            std::pair{bc.max_seq_len != none.max_seq_len, "--max-seq-len"},
                            std::pair{bc.quant != none.quant, "--quant"},
                            std::pair{bc.quant_lm_head, "--quant-lm-head"},
                            std::pair{bc.calib != none.calib, "--calib"},
                            std::pair{bc.kv_cache_dtype != none.kv_cache_dtype, "--kv-cache-dtype"},
                            std::pair{bc.max_batch != none.max_batch, "--max-batch"},
                            std::pair{!bc.arch_specs.empty(), "--arch-spec"}})
      KILN_CHECK(!set, dir.string(), ": is a built engine; ", opt,
                 " applies only when building from a Hugging Face folder (rebuild with kiln "
                 "build to change it)");
    return load(dir);
  }
  if (!fs::exists(dir)) throw Error(cat(dir.string(), ": no such file or directory"));
  if (fs::is_regular_file(dir)) return build(dir, bc);  // a GGUF file (or an error naming it)
  if (fs::is_directory(dir) && !fs::exists(dir / "config.json"))
    throw Error(cat(dir.string(), ": neither a kiln engine (", kManifest,
                    ") nor a Hugging Face folder (config.json)"));
  return build(dir, bc);
}

void Engine::save(const fs::path& out) const {
  KILN_CHECK(impl_->rank_weights.empty(),
             "a sharded engine is written by kiln build --tp / --pp, not saved");
  write_plan(*impl_, plan_held(impl_->weights), out, {});
}

namespace {

json read_manifest(const fs::path& dir) {
  const fs::path mf = dir / kManifest;
  std::ifstream in(mf, std::ios::binary);
  if (!in) throw Error(cat(mf.string(), ": cannot open (not a kiln engine folder?)"));
  return parse_json(
      std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>()),
      mf.string());
}

}  // namespace

Engine Engine::load(const fs::path& dir) {
  const fs::path mf = dir / kManifest;
  const json man = read_manifest(dir);
  if (!man.is_object() || !man.contains("format") || man["format"] != "kiln-engine")
    throw Error(cat(mf.string(), ": not a kiln engine manifest"));
  if (!man.contains("version") || man["version"] != kEngineFormatVersion)
    throw Error(cat(mf.string(), ": engine format version ",
                    man.contains("version") ? man["version"].dump() : "(none)",
                    " is not supported (this kiln reads version ", kEngineFormatVersion,
                    "); rebuild the engine"));
  auto impl = std::make_unique<Impl>();
  try {
    try {
      impl->config = model_config_from_json(man.at("model"));
    } catch (const Error& e) {
      throw Error(cat(mf.string(), ": ", e.what()));
    }
    const json& b = man.at("build");
    impl->dtype = parse_float_dtype(b.at("dtype").get<std::string>(), mf.string());
    const std::string quant = b.value("quant", std::string("none"));
    if (quant != "none" && quant != "int8-wo" && quant != "int4-wo" && quant != "fp8")
      throw Error(cat(mf.string(), ": build.quant '", quant,
                      "' is not a scheme this kiln runs (none, int8-wo, int4-wo, fp8)"));
    impl->quant = parse_weight_quant(quant);
    impl->quant_group = b.value("quant_group", int64_t{0});
    impl->act_order = b.value("act_order", false);
    if (b.contains("awq")) impl->awq_info = b["awq"];
    if (impl->act_order && impl->quant != WeightQuant::Int4)
      throw Error(cat(mf.string(), ": build.act_order is for int4-wo engines only"));
    impl->quant_lm_head = b.value("quant_lm_head", false);
    if (impl->quant_lm_head && (impl->quant == WeightQuant::None || impl->act_order))
      throw Error(cat(mf.string(), ": build.quant_lm_head is for engines kiln quantized itself"));
    const std::string kvd = b.value("kv_cache_dtype", std::string("auto"));
    if (kvd != "auto" && kvd != "fp8")
      throw Error(cat(mf.string(), ": build.kv_cache_dtype '", kvd,
                      "' is not one this kiln runs (auto, fp8)"));
    impl->kv_fp8 = kvd == "fp8";
    impl->max_batch = b.at("max_batch").get<int64_t>();
    impl->max_seq_len = b.at("max_seq_len").get<int64_t>();
    if (impl->max_batch < 1 || impl->max_seq_len < 1 ||
        impl->max_seq_len > impl->config.max_position_embeddings)
      throw Error(cat(mf.string(), ": build.max_batch ", impl->max_batch, " and build.max_seq_len ",
                      impl->max_seq_len, " must be >= 1, max_seq_len at most the model's ",
                      impl->config.max_position_embeddings, " positions"));
    impl->source = man.at("source");
    impl->generation_defaults = man.value("generation_defaults", json::object());
    check_generation_defaults(impl->generation_defaults, mf.string() + ": generation_defaults");
    if (man.contains("parallel")) {
      impl->tp = man["parallel"].at("tp").get<int>();
      impl->pp = man["parallel"].at("pp").get<int>();
    }
  } catch (const json::exception& e) {
    throw Error(cat(mf.string(), ": malformed manifest: ", e.what()));
  }
  check_shardable(impl->config, impl->tp, impl->pp);
  // Each weight file holds exactly its layout: the whole engine's, or one rank's shard.
  auto read = [&](const fs::path& path, const std::vector<WeightSpec>& layout) {
    auto file = SafetensorsFile::open(path);
    std::vector<std::string> problems;
    std::set<std::string> expected;
    for (const auto& spec : layout) expected.insert(spec.name);
    for (const auto& [name, ti] : file->tensors())
      if (!expected.count(name)) problems.push_back("unexpected " + name);
    std::vector<std::pair<std::string, Tensor>> w;
    for (const auto& spec : layout) {
      if (!file->contains(spec.name)) {
        problems.push_back("missing " + spec.name);
        continue;
      }
      Tensor t = file->get(spec.name);
      const DType want = spec.dtype(impl->dtype);
      if (t.shape != spec.shape || t.dtype != want) {
        problems.push_back(cat(spec.name, " is ", dtype_name(t.dtype), shape_str(t.shape),
                               " (expected ", dtype_name(want), shape_str(spec.shape), ")"));
        continue;
      }
      w.push_back({spec.name, t});
    }
    if (!problems.empty())
      throw Error(
          cat(path.string(), ": does not match its manifest: ", join_limited(problems, 8, "; ")));
    return attach_scales(std::move(w), impl->quant);
  };
  const int world = impl->tp * impl->pp;
  if (world == 1) {
    impl->weights = read(dir / kWeights, engine_layout(impl->config, impl->scheme()));
  } else {
    for (int r = 0; r < world; ++r)
      impl->rank_weights.push_back(
          read(dir / rank_file(r, world),
               sharded_layout(impl->config, impl->scheme(), Shard::of(r, impl->tp, impl->pp))));
  }
  impl->tokenizer_dir = dir;
  return Engine(std::move(impl));
}

uint64_t Engine::verify(const fs::path& dir, const ProgressFn& progress) {
  (void)load(dir);       // manifest, and names, dtypes and shapes exactly as the layout says
  check_tokenizer(dir);  // parses (engines from before the copies were checksummed too)
  return verify_checksums(dir, read_manifest(dir), progress);
}

}  // namespace kiln
