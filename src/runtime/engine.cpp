// Engine: build from a checkpoint, save/load the engine folder, run sessions on a backend.
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>

#include "build/checkpoint.h"
#include "core/error.h"
#include "graph/decoder.h"
#include "graph/layout.h"
#include "kiln/kiln.h"

namespace kiln {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr const char* kManifest = "kiln-engine.json";
constexpr const char* kWeights = "weights.safetensors";
constexpr int kFormatVersion = 1;
const char* const kTokenizerFiles[] = {"tokenizer.json",          "tokenizer_config.json",
                                       "tokenizer.model",         "special_tokens_map.json",
                                       "chat_template.jinja",     "chat_template.json",
                                       "generation_config.json"};

std::string hex(uint64_t v) {
  char b[17];
  std::snprintf(b, sizeof b, "%016llx", static_cast<unsigned long long>(v));
  return b;
}

std::string dtype_label(DType t) {
  return t == DType::F32 ? "f32" : t == DType::F16 ? "f16" : t == DType::BF16 ? "bf16" : "?";
}

}  // namespace

struct Engine::Impl {
  ModelConfig config;
  DType dtype = DType::F32;
  int64_t max_batch = 1, max_seq_len = 0;
  json source;
  json generation_defaults = json::object();
  fs::path tokenizer_dir;
  std::vector<std::pair<std::string, Tensor>> weights;  // host, engine layout

  // Runtime, created by start().
  std::unique_ptr<Backend> backend;
  std::unique_ptr<DeviceWeights> dweights;
  std::unique_ptr<Decoder> decoder;

  void resolve_build(const BuildConfig& bc, const std::string& config_dtype) {
    std::string d = bc.dtype;
    if (d == "auto") d = config_dtype.empty() ? "f32" : config_dtype;
    dtype = parse_float_dtype(d, "build dtype");
    KILN_CHECK(bc.max_batch >= 1, "max_batch must be >= 1 (got ", bc.max_batch, ")");
    max_batch = bc.max_batch;
    max_seq_len = bc.max_seq_len ? bc.max_seq_len : config.max_position_embeddings;
    KILN_CHECK(max_seq_len >= 1 && max_seq_len <= config.max_position_embeddings, "max_seq_len ",
               max_seq_len, " must be between 1 and the model's max_position_embeddings (",
               config.max_position_embeddings, ")");
  }
};

struct Session::State {
  Engine::Impl* engine;
  std::unique_ptr<KVCache> cache;
  Sequence seq;
  ~State() {
    if (cache) cache->give_back(seq.blocks);
  }
};

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Engine::Engine(Engine&&) noexcept = default;
Engine& Engine::operator=(Engine&&) noexcept = default;
Engine::~Engine() = default;

Engine Engine::build(const fs::path& hf_dir, const BuildConfig& bc) {
  Checkpoint ck = open_checkpoint(hf_dir);
  auto impl = std::make_unique<Impl>();
  impl->config = ck.config;
  impl->resolve_build(bc, ck.config_dtype);
  impl->weights = convert_weights(ck, impl->dtype);
  impl->generation_defaults = ck.generation_defaults;
  impl->tokenizer_dir = hf_dir;
  impl->source = {{"path", fs::absolute(hf_dir).string()},
                  {"config_hash", hex(ck.config_hash)},
                  {"weights_hash", hex(ck.weights->identity_hash())}};
  return Engine(std::move(impl));
}

Engine Engine::build_dummy(const fs::path& config_json, const BuildConfig& bc, uint64_t seed) {
  Checkpoint ck = open_config(config_json);
  auto impl = std::make_unique<Impl>();
  impl->config = ck.config;
  impl->resolve_build(bc, ck.config_dtype);
  impl->weights = dummy_weights(ck.config, impl->dtype, seed);
  impl->generation_defaults = ck.generation_defaults;
  impl->tokenizer_dir = config_json.parent_path();
  impl->source = {{"path", fs::absolute(config_json).string()},
                  {"config_hash", hex(ck.config_hash)},
                  {"dummy_seed", seed}};
  return Engine(std::move(impl));
}

bool Engine::is_engine_dir(const fs::path& dir) { return fs::exists(dir / kManifest); }

Engine Engine::open(const fs::path& dir, const BuildConfig& bc) {
  if (is_engine_dir(dir)) return load(dir);
  if (!fs::exists(dir)) throw Error(cat(dir.string(), ": no such file or directory"));
  if (fs::is_directory(dir) && !fs::exists(dir / "config.json"))
    throw Error(cat(dir.string(), ": neither a kiln engine (", kManifest,
                    ") nor a Hugging Face folder (config.json)"));
  return build(dir, bc);
}

void Engine::save(const fs::path& out) const {
  const Impl& m = *impl_;
  if (fs::exists(out) && !is_engine_dir(out) && !(fs::is_directory(out) && fs::is_empty(out)))
    throw Error(cat(out.string(), ": exists and is not a kiln engine; refusing to overwrite"));
  const fs::path parent = fs::absolute(out).parent_path();
  fs::create_directories(parent);
  const fs::path tmp = parent / cat(".", out.filename().string(), ".tmp-", getpid());
  fs::remove_all(tmp);
  try {
    fs::create_directory(tmp);
    write_safetensors(tmp / kWeights, m.weights, {{"format", "kiln"}});
    json man = {{"format", "kiln-engine"},
                {"version", kFormatVersion},
                {"kiln_version", "0.1.0"},
                {"model", to_json(m.config)},
                {"build", {{"dtype", dtype_label(m.dtype)}, {"max_batch", m.max_batch}, {"max_seq_len", m.max_seq_len}}},
                {"source", m.source},
                {"generation_defaults", m.generation_defaults},
                {"weights", kWeights}};
    if (!m.tokenizer_dir.empty())
      for (const char* f : kTokenizerFiles)
        if (fs::exists(m.tokenizer_dir / f) && fs::absolute(m.tokenizer_dir) != fs::absolute(out))
          fs::copy_file(m.tokenizer_dir / f, tmp / f, fs::copy_options::overwrite_existing);
    std::ofstream mo(tmp / kManifest);
    mo << man.dump(2) << "\n";
    mo.close();
    if (!mo) throw Error(cat((tmp / kManifest).string(), ": write failed"));
    if (fs::exists(out)) {
      const fs::path old = parent / cat(".", out.filename().string(), ".old-", getpid());
      fs::rename(out, old);
      fs::rename(tmp, out);
      fs::remove_all(old);
    } else {
      fs::rename(tmp, out);
    }
  } catch (const fs::filesystem_error& e) {
    fs::remove_all(tmp);
    throw Error(cat(out.string(), ": cannot write engine: ", e.code().message()));
  } catch (...) {
    fs::remove_all(tmp);
    throw;
  }
}

Engine Engine::load(const fs::path& dir) {
  const fs::path mf = dir / kManifest;
  std::ifstream in(mf);
  if (!in) throw Error(cat(mf.string(), ": cannot open (not a kiln engine folder?)"));
  json man;
  try {
    man = json::parse(in);
  } catch (const json::exception& e) {
    throw Error(cat(mf.string(), ": invalid JSON: ", e.what()));
  }
  if (man.value("format", "") != "kiln-engine") throw Error(cat(mf.string(), ": not a kiln engine manifest"));
  if (man.value("version", 0) != kFormatVersion)
    throw Error(cat(mf.string(), ": engine format version ", man.value("version", 0),
                    " is not supported (this kiln reads version ", kFormatVersion, "); rebuild the engine"));
  auto impl = std::make_unique<Impl>();
  try {
    impl->config = model_config_from_json(man.at("model"));
    const json& b = man.at("build");
    impl->dtype = parse_float_dtype(b.at("dtype").get<std::string>(), mf.string());
    impl->max_batch = b.at("max_batch").get<int64_t>();
    impl->max_seq_len = b.at("max_seq_len").get<int64_t>();
    impl->source = man.at("source");
    impl->generation_defaults = man.value("generation_defaults", json::object());
  } catch (const json::exception& e) {
    throw Error(cat(mf.string(), ": malformed manifest: ", e.what()));
  }
  auto file = SafetensorsFile::open(dir / kWeights);
  std::vector<std::string> problems;
  for (const auto& spec : engine_layout(impl->config)) {
    if (!file->contains(spec.name)) {
      problems.push_back("missing " + spec.name);
      continue;
    }
    Tensor t = file->get(spec.name);
    const DType want = spec.matrix ? impl->dtype : DType::F32;
    if (t.shape != spec.shape || t.dtype != want) {
      problems.push_back(cat(spec.name, " is ", dtype_name(t.dtype), shape_str(t.shape), " (expected ",
                             dtype_name(want), shape_str(spec.shape), ")"));
      continue;
    }
    impl->weights.push_back({spec.name, t});
  }
  if (!problems.empty()) {
    std::string list;
    for (size_t i = 0; i < problems.size() && i < 8; ++i) list += (i ? "; " : "") + problems[i];
    throw Error(cat((dir / kWeights).string(), ": does not match its manifest: ", list));
  }
  impl->tokenizer_dir = dir;
  return Engine(std::move(impl));
}

ModelInfo Engine::info() const {
  const Impl& m = *impl_;
  ModelInfo i;
  i.architecture = m.config.architecture;
  i.dtype = dtype_label(m.dtype);
  for (const auto& [n, t] : m.weights) {
    i.num_params += t.numel();
    i.weight_bytes += int64_t(t.nbytes());
  }
  i.vocab_size = m.config.vocab_size;
  i.hidden_size = m.config.hidden_size;
  i.num_layers = m.config.num_layers;
  i.max_seq_len = m.max_seq_len;
  i.max_batch = m.max_batch;
  i.eos_token_ids = m.config.eos_token_ids;
  i.bos_token_id = m.config.bos_token_id;
  return i;
}

fs::path Engine::tokenizer_dir() const { return impl_->tokenizer_dir; }

void Engine::start(const RuntimeConfig& rc) {
  Impl& m = *impl_;
  if (m.decoder) return;
  if (rc.threads > 0) omp_set_num_threads(rc.threads);
  if (rc.device == "cuda" || (rc.device == "auto" && cuda_available())) {
    m.backend = make_cuda_backend(m.dtype);
    if (!m.backend) {
      if (rc.device == "cuda") throw Error("--device cuda: no usable CUDA GPU (or kiln was built without CUDA)");
      m.backend = make_cpu_backend();
    }
  } else if (rc.device == "cpu" || rc.device == "auto") {
    m.backend = make_cpu_backend();
  } else {
    throw Error(cat("unknown device '", rc.device, "' (expected auto, cpu or cuda)"));
  }
  m.dweights = std::make_unique<DeviceWeights>(*m.backend, m.weights);
  m.decoder = std::make_unique<Decoder>(*m.backend, m.config, *m.dweights);
}

std::string Engine::device_name() const {
  return impl_->backend ? impl_->backend->name() : "not started";
}

Session Engine::session(int64_t capacity) {
  start();
  Impl& m = *impl_;
  auto st = std::make_unique<Session::State>();
  st->engine = &m;
  const int64_t bs = 16, cap = capacity > 0 ? std::min(capacity, m.max_seq_len) : m.max_seq_len;
  st->cache = std::make_unique<KVCache>(*m.backend, m.config, (cap + bs - 1) / bs, bs);
  return Session(std::move(st));
}

Session::Session(std::unique_ptr<State> s) : s_(std::move(s)) {}
Session::Session(Session&&) noexcept = default;
Session::~Session() = default;
int64_t Session::length() const { return s_->seq.length; }

std::vector<float> Session::forward(std::span<const int32_t> tokens, bool all_logits) {
  Engine::Impl& m = *s_->engine;
  if (s_->seq.length + int64_t(tokens.size()) > m.max_seq_len)
    throw Error(cat("sequence of ", s_->seq.length + int64_t(tokens.size()),
                    " tokens exceeds the engine's max_seq_len of ", m.max_seq_len));
  return m.decoder->forward(tokens.data(), int64_t(tokens.size()), s_->seq, *s_->cache, all_logits);
}

std::vector<float> Engine::logits(std::span<const int32_t> prompt) {
  KILN_CHECK(!prompt.empty(), "the prompt is empty");
  KILN_CHECK(int64_t(prompt.size()) <= impl_->max_seq_len, "prompt has ", prompt.size(),
             " tokens but the engine allows at most ", impl_->max_seq_len, " (max_seq_len)");
  Session s = session(int64_t(prompt.size()));
  return s.forward(prompt, true);
}

std::vector<int32_t> Engine::generate(std::span<const int32_t> prompt, const SamplingParams& sp,
                                      const std::function<bool(int32_t)>& on_token) {
  Impl& m = *impl_;
  KILN_CHECK(!prompt.empty(), "the prompt is empty");
  KILN_CHECK(int64_t(prompt.size()) <= m.max_seq_len, "prompt has ", prompt.size(),
             " tokens but the engine allows at most ", m.max_seq_len, " (max_seq_len)");
  const json& g = m.generation_defaults;
  const bool do_sample = g.value("do_sample", false);
  float temperature = sp.temperature.value_or(do_sample ? g.value("temperature", 1.0f) : 0.0f);
  int top_k = sp.top_k.value_or(do_sample ? g.value("top_k", 50) : 0);
  float top_p = sp.top_p.value_or(do_sample ? g.value("top_p", 1.0f) : 1.0f);
  Sampler sampler(temperature, top_k, top_p, sp.seed);
  Session s = session(int64_t(prompt.size()) + std::max<int64_t>(sp.max_tokens, 0));
  std::vector<int32_t> out;
  std::vector<float> lg = s.forward(prompt, false);
  const int64_t V = m.config.vocab_size;
  const int64_t budget = std::min<int64_t>(sp.max_tokens, m.max_seq_len - int64_t(prompt.size()));
  for (int64_t i = 0; i < budget; ++i) {
    const int32_t t = sampler.sample(lg.data(), V);
    out.push_back(t);
    if (on_token && !on_token(t)) break;
    const auto& eos = m.config.eos_token_ids;
    if (!sp.ignore_eos && (std::find(eos.begin(), eos.end(), t) != eos.end() ||
                           std::find(sp.stop_token_ids.begin(), sp.stop_token_ids.end(), t) !=
                               sp.stop_token_ids.end()))
      break;
    if (i + 1 < budget) lg = s.forward(std::span<const int32_t>(&t, 1), false);
  }
  return out;
}

}  // namespace kiln
