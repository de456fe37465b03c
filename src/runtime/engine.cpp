// Engine, run side: start on a backend, sessions, decode steps, generation. (engine_build.cpp
// builds, saves and loads engines.)
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>

#include "build/checkpoint.h"
#include "build/engine_file.h"
#include "build/quantize.h"
#include "core/error.h"
#include "graph/decoder.h"
#include "graph/layout.h"
#include "io/json.h"
#include "kiln/kiln.h"
#include "runtime/engine_impl.h"
#include "runtime/parallel.h"
#include "runtime/process_ranks.h"
#include "tokenizer/tokenizer.h"

namespace kiln {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// A token picked from NaN / +inf logits is an error, never a silent token 0.
void check_finite_pick(int32_t id) {
  KILN_CHECK(id != kNonFiniteLogits,
             "the model produced non-finite logits (NaN or inf); its weights or config are broken");
}

}  // namespace

struct Session::State {
  Engine::Impl* engine;
  Sequence seq;
  SampleParams sampling;  // step counts this session's draws
  ~State() {
    if (engine->cache) engine->cache->give_back(seq.blocks);
  }
};

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Engine::Engine(Engine&&) noexcept = default;
Engine& Engine::operator=(Engine&&) noexcept = default;
Engine::~Engine() = default;

ModelInfo info_without_weights(const Engine::Impl& m) {
  ModelInfo i;
  i.architecture = m.config.architecture;
  i.dtype = dtype_label(m.dtype);
  i.quant = std::string(weight_quant_name(m.quant));
  i.quant_lm_head = m.quant_lm_head;
  i.kv_cache_dtype = m.kv_fp8 ? "fp8" : "auto";
  i.calibration = calibration_line(m.awq_info);
  i.conversion = m.conversion;
  i.vocab_size = m.config.vocab_size;
  i.hidden_size = m.config.hidden_size;
  i.num_layers = m.config.num_layers;
  i.max_seq_len = m.max_seq_len;
  i.max_batch = m.max_batch;
  i.eos_token_ids = m.config.eos_token_ids;
  i.bos_token_id = m.config.bos_token_id;
  return i;
}

ModelInfo Engine::info() const {
  const Impl& m = *impl_;
  ModelInfo i = info_without_weights(m);
  for (const auto& [n, t] : m.weights) {
    i.num_params += t.quant == WeightQuant::Int4 ? 2 * t.numel() : t.numel();  // 2 codes a byte
    i.weight_bytes += int64_t(t.weight_bytes());
  }
  if (!m.rank_weights.empty()) {  // a sharded engine: the model's parameters, the ranks' bytes
    for (const WeightSpec& s : engine_layout(m.config))
      if (s.role != WeightRole::Scale && s.role != WeightRole::Zero && s.role != WeightRole::Perm)
        i.num_params += numel(s.shape);
    for (const auto& r : m.rank_weights)
      for (const auto& [n, t] : r) i.weight_bytes += int64_t(t.weight_bytes());
  }
  return i;
}

fs::path Engine::tokenizer_dir() const {
  return impl_->tokenizer_dir;
}

void Engine::start(const RuntimeConfig& rc) {
  Impl& m = *impl_;
  if (m.decoder) return;
  KILN_CHECK(rc.threads >= 0, "--threads must be >= 0 (0: all cores; got ", rc.threads, ")");
  if (rc.threads > 0) omp_set_num_threads(rc.threads);
  KILN_CHECK(rc.kv_cache_fraction > 0 && rc.kv_cache_fraction <= 1,
             "--kv-cache-fraction must be in (0, 1] (got ", rc.kv_cache_fraction, ")");
  KILN_CHECK(rc.kv_cache_tokens >= 0, "--kv-cache-tokens must be >= 0");
  // Quantized weights with F32 activations are the CPU reference's mode (it dequantizes into
  // F32 anyway); the CUDA kernels take 16-bit activations, so auto picks the CPU for them.
  const bool cpu_only = m.quant != WeightQuant::None && m.dtype == DType::F32;
  KILN_CHECK(!cpu_only || rc.device != "cuda", "--device cuda: this engine holds ",
             weight_quant_name(m.quant),
             " weights with f32 activations, which only the CPU computes; build it with --dtype "
             "bf16 or f16 to run it on a GPU");
  // A sharded engine runs on the ranks it was built for.
  int tp = rc.tp, pp = rc.pp;
  if (!m.rank_weights.empty()) {
    KILN_CHECK((tp == 1 && pp == 1) || (tp == m.tp && pp == m.pp), "the engine was built for --tp ",
               m.tp, " --pp ", m.pp, " (one weight file per rank), not --tp ", tp, " --pp ", pp);
    tp = m.tp, pp = m.pp;
  }
  const bool sharded = tp * pp > 1;
  check_shardable(m.config, tp, pp);
  if (rc.device == "cuda" || (rc.device == "auto" && !cpu_only && cuda_available())) {
    m.backend = make_cuda_backend(m.dtype);
    if (!m.backend) {
      if (rc.device == "cuda")
        throw Error("--device cuda: no usable CUDA GPU (or kiln was built without CUDA)");
      m.backend = make_cpu_backend();
    }
  } else if (rc.device == "cpu" || rc.device == "auto") {
    m.backend = make_cpu_backend();
  } else {
    throw Error(cat("unknown device '", rc.device, "' (expected auto, cpu or cuda)"));
  }
  // Ranks as processes: always on GPUs (one each), on CPUs when asked (--dist-init); under
  // mpirun this process is rank 0 and the others come by themselves.
  const std::optional<DistEnv> launched = dist_from_env();
  const bool processes =
      sharded && (m.backend->device() == Device::CUDA || !rc.dist_init.empty() || launched);
  if (!sharded) {
    std::vector<const Tensor*> host;
    host.reserve(m.weights.size());
    for (const auto& [n, t] : m.weights) host.push_back(&t);
    m.dweights = std::make_unique<DeviceWeights>(m.weights, m.backend->upload_all(host));
  }

  // The KV cache: blocks of 16 tokens, block 0 reserved for padding rows; `block` bytes a
  // block on this device (rank 0's share of the layers and heads when sharded).
  constexpr int64_t bs = 16;
  const Shard me = Shard::of(0, tp, pp);
  const auto [first_layer, last_layer] = stage_layers(m.config, me);
  const size_t block = KVCache::block_bytes(rank_config(m.config, me), bs, m.backend->act_dtype(),
                                            m.kv_fp8, last_layer - first_layer);
  const int64_t seq_blocks = (m.max_seq_len + bs - 1) / bs;
  RuntimeInfo& ri = m.rinfo;
  ri = RuntimeInfo{};
  ri.device = m.backend->name();
  for (const auto& [n, t] : m.weights) ri.weight_bytes += int64_t(t.weight_bytes());
  // A setting that would change nothing is refused rather than ignored.
  const bool fraction_set = rc.kv_cache_fraction != RuntimeConfig{}.kv_cache_fraction;
  KILN_CHECK(!(fraction_set && rc.kv_cache_tokens > 0),
             "--kv-cache-fraction and --kv-cache-tokens both size the KV cache; give one");
  // Blocks for the memory free once the weights are resident (free, total: 0 on the CPU).
  const auto size_cache = [&](size_t free, size_t total) -> int64_t {
    ri.free_bytes_before_kv = int64_t(free);
    KILN_CHECK(!(fraction_set && total == 0), "--kv-cache-fraction sizes a GPU's KV cache; on ",
               ri.device, " give --kv-cache-tokens (default: max_batch sequences of max_seq_len)");
    int64_t blocks = 0;
    if (rc.kv_cache_tokens > 0) {
      blocks = (rc.kv_cache_tokens + bs - 1) / bs + 1;
      if (total > 0 && size_t(blocks) * block > free)
        throw Error(cat("--kv-cache-tokens ", rc.kv_cache_tokens, " needs ",
                        size_t(blocks) * block >> 20, " MiB of KV cache but only ", free >> 20,
                        " MiB of device memory are free"));
    } else if (total > 0) {
      ri.kv_cache_fraction = rc.kv_cache_fraction;
      blocks = std::min<int64_t>(int64_t(double(free) * rc.kv_cache_fraction / double(block)),
                                 256 * seq_blocks + 1);
    } else {
      blocks = std::max<int64_t>(m.max_batch, 1) * seq_blocks + 1;
    }
    if (blocks - 1 < seq_blocks) {
      const bool by_tokens = rc.kv_cache_tokens > 0;
      throw Error(cat(
          "the KV cache holds ", std::max<int64_t>(blocks - 1, 0) * bs, " tokens (",
          by_tokens ? cat(rc.kv_cache_tokens, " tokens asked for")
                    : cat(rc.kv_cache_fraction, " of ", free >> 20, " MiB free after the weights"),
          "), less than one sequence of max_seq_len ", m.max_seq_len, "; raise ",
          by_tokens ? "--kv-cache-tokens" : "--kv-cache-fraction",
          " or rebuild with a smaller --max-seq-len"));
    }
    return blocks;
  };
  std::unique_ptr<Executor> ranks;
  const WeightsOf weights_of = [&m](const Shard& sh) { return m.weights_of(sh); };
  int64_t blocks = 0;
  size_t total = 0;
  if (processes) {
    RankSetup s;
    s.config = m.config, s.dtype = m.dtype, s.quant = m.quant, s.quant_group = m.quant_group;
    s.act_order = m.act_order, s.kv_fp8 = m.kv_fp8, s.tp = tp, s.pp = pp;
    s.device = m.backend->device() == Device::CUDA ? "cuda" : "cpu";
    s.threads = rc.threads, s.block_size = bs, s.max_seq_len = m.max_seq_len;
    if (s.device == "cpu" && s.threads == 0) {
      // CPU ranks on one machine share its cores: each gets its part (more threads than cores
      // spin and wait on each other between collectives).
      s.threads = std::max(1, int(std::thread::hardware_concurrency()) / (tp * pp));
      omp_set_num_threads(s.threads);
    }
    DistEnv env;
    if (launched) {
      env = *launched;
    } else {
      parse_dist_init(rc.dist_init.empty() ? "127.0.0.1:0" : rc.dist_init, env);
      env.world = tp * pp;
    }
    auto pr = std::make_unique<ProcessRanks>(*m.backend, s, weights_of, env, launched.has_value(),
                                             rc.rank_exe, [&](size_t free, size_t tot) {
                                               total = tot;
                                               return blocks = size_cache(free, tot);
                                             });
    m.cache = &pr->cache();
    ranks = std::move(pr);
  } else if (sharded) {
    blocks = size_cache(0, 0);
    auto tr = std::make_unique<ThreadRanks>(m.config, weights_of, tp, pp, blocks, bs, m.kv_fp8,
                                            m.max_seq_len);
    m.cache = &tr->cache();
    ranks = std::move(tr);
  } else {
    const auto mem = m.backend->memory();
    total = mem.second;
    blocks = size_cache(mem.first, mem.second);
    m.own_cache = std::make_unique<KVCache>(*m.backend, m.config, blocks, bs, m.kv_fp8);
    m.cache = m.own_cache.get();
  }
  ri.kv_cache_tokens = m.cache->capacity_tokens();
  ri.kv_cache_bytes = int64_t(size_t(blocks) * block);
  const bool gpu = total > 0;
  m.max_num_seqs = rc.max_num_seqs ? rc.max_num_seqs
                   : gpu           ? 256
                                   : std::max<int64_t>(16, m.max_batch);
  m.max_num_tokens = rc.max_num_tokens ? rc.max_num_tokens : gpu ? 8192 : 2048;
  KILN_CHECK(m.max_num_seqs >= 1 && m.max_num_seqs <= 65536,
             "--max-num-seqs must be between 1 and 65536 (got ", m.max_num_seqs, ")");
  if (!rc.max_num_tokens) m.max_num_tokens = std::max(m.max_num_tokens, m.max_num_seqs);
  KILN_CHECK(m.max_num_tokens >= m.max_num_seqs && m.max_num_tokens <= (int64_t(1) << 20),
             "--max-num-tokens must be between --max-num-seqs (", m.max_num_seqs,
             ") and 1048576 (got ", m.max_num_tokens, ")");
  m.max_logit_rows = std::min(m.max_num_tokens, std::max<int64_t>(m.max_num_seqs, 512));
  if (sharded) {
    ri.device = cat(ri.device, ", ", tp * pp, processes ? " processes" : " threads", " (tp ", tp,
                    ", pp ", pp, ")");
    m.decoder = std::move(ranks);
  } else {
    Parallel par;
    if (rc.nccl) {
      KILN_CHECK(m.backend->device() == Device::CUDA,
                 "--nccl runs collectives on a GPU; the device is ", m.backend->name());
      m.tp_comm = make_nccl_comm(*m.backend, nccl_unique_id(), 0, 1);
      par.tp = m.tp_comm.get();
      ri.device = cat(ri.device, ", collectives through NCCL");
    }
    m.decoder =
        std::make_unique<Decoder>(*m.backend, m.config, *m.dweights, *m.cache, m.max_seq_len, par);
  }
  const char* g = std::getenv("KILN_CUDA_GRAPHS");
  m.decoder->set_graphs(rc.cuda_graphs && !(g && std::string(g) == "0"));
  m.decoder->prepare(m.max_num_tokens, m.max_num_seqs, m.max_logit_rows);
  ri.cuda_graphs = m.decoder->graphs();
  ri.max_num_seqs = m.max_num_seqs;
  ri.max_num_tokens = m.max_num_tokens;
  ri.max_logit_rows = m.max_logit_rows;
  ri.kv_block_size = bs;
  ri.graphs_captured = m.decoder->graphs_captured();
}

std::string Engine::device_name() const {
  return impl_->backend ? impl_->backend->name() : "not started";
}

RuntimeInfo Engine::runtime_info() const {
  return impl_->rinfo;
}

Session Engine::session(int64_t capacity) {
  start();
  Impl& m = *impl_;
  KILN_CHECK(capacity >= 0 && capacity <= m.max_seq_len, "a session of ", capacity,
             " tokens exceeds the engine's max_seq_len of ", m.max_seq_len);
  KILN_CHECK(capacity <= m.cache->capacity_tokens(), "a session of ", capacity,
             " tokens exceeds the KV cache (", m.cache->capacity_tokens(), " tokens)");
  auto st = std::make_unique<Session::State>();
  st->engine = &m;
  st->sampling = m.sampling({});
  return Session(std::move(st));
}

Session::Session(std::unique_ptr<State> s) : s_(std::move(s)) {}
Session::Session(Session&&) noexcept = default;
Session::~Session() = default;
int64_t Session::length() const {
  return s_->seq.length;
}

void Session::set_sampling(const SamplingParams& sp) {
  const uint64_t step = s_->sampling.step;
  s_->sampling = s_->engine->sampling(sp);
  s_->sampling.step = step;
}

namespace {

void check_fits(const Engine::Impl& m, int64_t length, int64_t n) {
  KILN_CHECK(n > 0, "no tokens to process");
  if (length + n > m.max_seq_len)
    throw Error(cat("sequence of ", length + n, " tokens exceeds the engine's max_seq_len of ",
                    m.max_seq_len));
}

}  // namespace

std::vector<float> Session::forward(std::span<const int32_t> tokens, bool all_logits) {
  Engine::Impl& m = *s_->engine;
  check_fits(m, s_->seq.length, int64_t(tokens.size()));
  const int64_t V = m.config.vocab_size;
  if (tokens.size() == 1) {
    Session* self = this;
    const float* d = m.decode_step(std::span<Session* const>(&self, 1), tokens);
    std::vector<float> out(static_cast<size_t>(V));
    m.backend->to_host(out.data(), d, size_t(V) * 4);
    return out;
  }
  return m.extend(s_->seq, tokens, all_logits);
}

int32_t Session::next(std::span<const int32_t> tokens) {
  Engine::Impl& m = *s_->engine;
  check_fits(m, s_->seq.length, int64_t(tokens.size()));
  if (tokens.size() == 1) {
    Session* self = this;
    int32_t id = 0;
    m.decode_loop(std::span<Session* const>(&self, 1), tokens, 1, [&](std::span<const int32_t> t) {
      id = t[0];
      return true;
    });
    return id;
  }
  const float* d = m.extend_last(s_->seq, tokens);
  int32_t id = 0;
  const SampleParams p = s_->sampling;
  ++s_->sampling.step;
  m.backend->sample(d, 1, m.config.vocab_size, &p, &id);
  check_finite_pick(id);
  return id;
}

void Engine::Impl::reserve(Sequence& seq, int64_t end) {
  KILN_CHECK(end <= max_seq_len, "sequence of ", end,
             " tokens exceeds the engine's max_seq_len of ", max_seq_len);
  const int64_t bs = cache->block_size();
  const int64_t need = (end + bs - 1) / bs - int64_t(seq.blocks.size());
  if (need > 0) {
    auto more = cache->take(need);
    seq.blocks.insert(seq.blocks.end(), more.begin(), more.end());
  }
}

std::vector<float> Engine::Impl::extend(Sequence& seq, std::span<const int32_t> tokens,
                                        bool all_logits) {
  const int64_t V = config.vocab_size, n = int64_t(tokens.size());
  KILN_CHECK(n > 0, "forward needs at least one token");
  reserve(seq, seq.length + n);
  const int64_t chunk = all_logits ? max_logit_rows : max_num_tokens;
  std::vector<float> out(size_t((all_logits ? n : 1) * V));
  for (int64_t i = 0; i < n; i += chunk) {
    const int64_t c = std::min(chunk, n - i);
    Batch b;
    b.add(tokens.subspan(size_t(i), size_t(c)), seq.length, seq.blocks, i + c == n || all_logits,
          all_logits);
    const float* d = decoder->forward(b);
    seq.length += c;
    if (all_logits)
      backend->to_host(out.data() + i * V, d, size_t(c * V) * 4);
    else if (i + c == n)
      backend->to_host(out.data(), d, size_t(V) * 4);
  }
  return out;
}

const float* Engine::Impl::extend_last(Sequence& seq, std::span<const int32_t> tokens) {
  const int64_t n = int64_t(tokens.size());
  KILN_CHECK(n > 0, "forward needs at least one token");
  reserve(seq, seq.length + n);
  const float* d = nullptr;
  for (int64_t i = 0; i < n; i += max_num_tokens) {
    const int64_t c = std::min(max_num_tokens, n - i);
    Batch b;
    b.add(tokens.subspan(size_t(i), size_t(c)), seq.length, seq.blocks, i + c == n);
    d = decoder->forward(b);
    seq.length += c;
  }
  return d;
}

const float* Engine::Impl::decode_batch(std::span<Sequence* const> seqs, const int32_t* tokens) {
  const int64_t B = int64_t(seqs.size());
  KILN_CHECK(B > 0, "decode needs at least one sequence");
  KILN_CHECK(B <= max_num_seqs, "a decode step of ", B, " sequences exceeds --max-num-seqs (",
             max_num_seqs, ")");
  for (int64_t i = 0; i < B; ++i)
    for (int64_t j = 0; j < i; ++j)
      KILN_CHECK(seqs[size_t(j)] != seqs[size_t(i)],
                 "decode: a sequence appears twice in one step");
  for (Sequence* q : seqs) reserve(*q, q->length + 1);
  Batch b;
  const int32_t none = 0;
  for (int64_t i = 0; i < B; ++i) {
    Sequence& q = *seqs[size_t(i)];
    b.add(std::span<const int32_t>(tokens ? tokens + i : &none, 1), q.length, q.blocks, true);
  }
  const float* d = decoder->forward(b, tokens == nullptr);
  for (Sequence* q : seqs) q->length += 1;
  return d;
}

const float* Engine::Impl::decode_step(std::span<Session* const> sessions,
                                       std::span<const int32_t> tokens) {
  KILN_CHECK(!sessions.empty() && sessions.size() == tokens.size(), "step: ", sessions.size(),
             " sessions but ", tokens.size(), " tokens");
  std::vector<Sequence*> seqs;
  for (Session* s : sessions) {
    KILN_CHECK(s && s->s_->engine == this, "step: a session of another engine");
    check_fits(*this, s->length(), 1);
    seqs.push_back(&s->s_->seq);
  }
  return decode_batch(seqs, tokens.data());
}

void Engine::Impl::decode_loop(std::span<Session* const> sessions, std::span<const int32_t> tokens,
                               int64_t steps,
                               const std::function<bool(std::span<const int32_t>)>& on_step) {
  const int64_t B = int64_t(sessions.size());
  KILN_CHECK(B > 0 && sessions.size() == tokens.size(), "decode: ", sessions.size(),
             " sessions but ", tokens.size(), " tokens");
  if (steps <= 0) return;
  std::vector<Sequence*> seqs;
  for (Session* s : sessions) {
    KILN_CHECK(s && s->s_->engine == this, "decode: a session of another engine");
    check_fits(*this, s->length(), steps);
    seqs.push_back(&s->s_->seq);
  }
  if (ids_rows < B) {
    if (ids_host) backend->host_free(ids_host);
    if (d_params) backend->release(d_params);
    ids_host = nullptr, d_params = nullptr, ids_rows = 0;
    ids_host = static_cast<int32_t*>(backend->host_alloc(size_t(2 * B) * 4));
    d_params = static_cast<SampleParams*>(backend->alloc(size_t(B) * sizeof(SampleParams)));
    ids_rows = B;
  }
  std::vector<SampleParams> params(static_cast<size_t>(B));
  uint64_t marks[2] = {0, 0};
  // Step k: the forward (its tokens from the host for k == 0, else the ones step k - 1 sampled
  // on the device), sampling into the next step's token buffer, its picks copied to the host.
  auto enqueue = [&](int64_t k) {
    const float* lg = decode_batch(seqs, k == 0 ? tokens.data() : nullptr);
    for (int64_t i = 0; i < B; ++i) {
      params[size_t(i)] = sessions[size_t(i)]->s_->sampling;
      params[size_t(i)].step += uint64_t(k);
    }
    backend->to_device(d_params, params.data(), params.size() * sizeof(SampleParams));
    backend->sample_async(lg, B, config.vocab_size, d_params, decoder->token_buffer());
    backend->to_host_async(ids_host + (k % 2) * B, decoder->token_buffer(), size_t(B) * 4);
    marks[k % 2] = backend->mark();
  };
  int64_t queued = 0;
  auto finish = [&](int64_t done) {
    // Steps queued past `done` are discarded once the device is through them.
    if (queued > done) {
      backend->wait(marks[(queued - 1) % 2]);
      for (Sequence* q : seqs) q->length -= queued - done;
    }
    for (Session* s : sessions) s->s_->sampling.step += uint64_t(done);
  };
  try {
    enqueue(0);
    queued = 1;
    for (int64_t k = 0; k < steps; ++k) {
      if (k + 1 < steps) {
        enqueue(k + 1);
        queued = k + 2;
      }
      backend->wait(marks[k % 2]);
      for (int64_t i = 0; i < B; ++i) check_finite_pick(ids_host[(k % 2) * B + i]);
      if (!on_step(std::span<const int32_t>(ids_host + (k % 2) * B, size_t(B))) || k + 1 == steps) {
        finish(k + 1);
        return;
      }
    }
  } catch (...) {
    backend->synchronize();
    throw;
  }
}

void Engine::decode(std::span<Session* const> sessions, std::span<const int32_t> tokens,
                    int64_t steps, const std::function<bool(std::span<const int32_t>)>& on_step) {
  start();
  impl_->decode_loop(sessions, tokens, steps, on_step);
}

std::vector<int32_t> Engine::step(std::span<Session* const> sessions,
                                  std::span<const int32_t> tokens) {
  start();
  std::vector<int32_t> ids;
  impl_->decode_loop(sessions, tokens, 1, [&](std::span<const int32_t> t) {
    ids.assign(t.begin(), t.end());
    return true;
  });
  return ids;
}

std::vector<float> Engine::step_logits(std::span<Session* const> sessions,
                                       std::span<const int32_t> tokens) {
  start();
  Impl& m = *impl_;
  const float* d = m.decode_step(sessions, tokens);
  std::vector<float> out(sessions.size() * size_t(m.config.vocab_size));
  m.backend->to_host(out.data(), d, out.size() * 4);
  return out;
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
  const int64_t budget = std::min<int64_t>(sp.max_tokens, m.max_seq_len - int64_t(prompt.size()));
  Session s = session(int64_t(prompt.size()) + std::max<int64_t>(budget, 0));
  s.set_sampling(sp);
  std::vector<int32_t> out;
  if (budget <= 0) return out;
  const auto& eos = m.config.eos_token_ids;
  // Whether to go on after token t.
  auto take = [&](int32_t t) {
    out.push_back(t);
    if (on_token && !on_token(t)) return false;
    return sp.ignore_eos || (std::find(eos.begin(), eos.end(), t) == eos.end() &&
                             std::find(sp.stop_token_ids.begin(), sp.stop_token_ids.end(), t) ==
                                 sp.stop_token_ids.end());
  };
  const int32_t first = s.next(prompt);
  if (!take(first) || budget == 1) return out;
  Session* self = &s;
  m.decode_loop(std::span<Session* const>(&self, 1), std::span<const int32_t>(&first, 1),
                budget - 1, [&](std::span<const int32_t> t) { return take(t[0]); });
  return out;
}

}  // namespace kiln

namespace kiln {

bool serve_as_rank() {
  const std::optional<DistEnv> e = dist_from_env();
  if (!e || e->rank == 0) return false;
  serve_rank(*e);
  return true;
}

}  // namespace kiln
