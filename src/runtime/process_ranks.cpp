#include "runtime/process_ranks.h"

#include <omp.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "core/error.h"
#include "runtime/parallel.h"

extern char** environ;

namespace kiln {

namespace {

using json = nlohmann::json;

enum Op : int64_t { kForward = 1, kPrepare = 2, kStop = 3 };

// Binary messages: little-endian words and byte strings.
struct Writer {
  std::string s;
  void i64(int64_t v) { s.append(reinterpret_cast<const char*>(&v), 8); }
  void bytes(const void* p, size_t n) {
    i64(int64_t(n));
    s.append(static_cast<const char*>(p), n);
  }
  void str(const std::string& x) { bytes(x.data(), x.size()); }
  void tensor(const Tensor& t) {
    i64(int64_t(t.dtype));
    i64(int64_t(t.quant));
    i64(int64_t(t.shape.size()));
    for (int64_t d : t.shape) i64(d);
    bytes(t.data, t.nbytes());
    for (const auto* part : {&t.scales, &t.zero_points, &t.input_perm}) {
      i64(*part ? 1 : 0);
      if (*part) tensor(**part);
    }
  }
};

struct Reader {
  const std::string& s;
  size_t pos = 0;
  int64_t i64() {
    KILN_CHECK(pos + 8 <= s.size(), "a rank message ends early");
    int64_t v;
    std::memcpy(&v, s.data() + pos, 8);
    pos += 8;
    return v;
  }
  std::string str() {
    const int64_t n = i64();
    KILN_CHECK(n >= 0 && pos + size_t(n) <= s.size(), "a rank message ends early");
    std::string r = s.substr(pos, size_t(n));
    pos += size_t(n);
    return r;
  }
  Tensor tensor() {
    const auto dt = DType(i64());
    const auto q = WeightQuant(i64());
    Shape shape(static_cast<size_t>(i64()));
    for (int64_t& d : shape) d = i64();
    Tensor t = Tensor::uninitialized(dt, shape);
    const std::string b = str();
    KILN_CHECK(b.size() == t.nbytes(), "a rank message holds a tensor of the wrong size");
    std::memcpy(t.data, b.data(), b.size());
    t.quant = q;
    for (auto* part : {&t.scales, &t.zero_points, &t.input_perm})
      if (i64()) *part = std::make_shared<Tensor>(tensor());
    return t;
  }
};

std::string hex(const std::vector<char>& v) {
  static const char* d = "0123456789abcdef";
  std::string s;
  for (char c : v) s += d[(uint8_t(c) >> 4) & 15], s += d[uint8_t(c) & 15];
  return s;
}

std::vector<char> unhex(const std::string& s) {
  std::vector<char> v(s.size() / 2);
  auto nib = [](char c) { return c <= '9' ? c - '0' : c - 'a' + 10; };
  for (size_t i = 0; i < v.size(); ++i) v[i] = char(nib(s[2 * i]) << 4 | nib(s[2 * i + 1]));
  return v;
}

json setup_json(const RankSetup& s) {
  return {{"model", to_json(s.config)},
          {"dtype", std::string(dtype_name(s.dtype))},
          {"quant", std::string(weight_quant_name(s.quant))},
          {"quant_group", s.quant_group},
          {"act_order", s.act_order},
          {"kv_fp8", s.kv_fp8},
          {"tp", s.tp},
          {"pp", s.pp},
          {"device", s.device},
          {"threads", s.threads},
          {"num_blocks", s.num_blocks},
          {"block_size", s.block_size},
          {"max_seq_len", s.max_seq_len}};
}

RankSetup setup_from(const json& j) {
  RankSetup s;
  s.config = model_config_from_json(j.at("model"));
  s.dtype = parse_float_dtype(j.at("dtype").get<std::string>(), "rank dtype");
  s.quant = parse_weight_quant(j.at("quant").get<std::string>());
  s.quant_group = j.at("quant_group");
  s.act_order = j.at("act_order");
  s.kv_fp8 = j.at("kv_fp8");
  s.tp = j.at("tp");
  s.pp = j.at("pp");
  s.device = j.at("device");
  s.threads = j.at("threads");
  s.num_blocks = j.at("num_blocks");
  s.block_size = j.at("block_size");
  s.max_seq_len = j.at("max_seq_len");
  return s;
}

std::string encode(Op op, const Batch* b = nullptr, const std::vector<int64_t>& args = {}) {
  Writer w;
  w.i64(op);
  w.i64(int64_t(args.size()));
  for (int64_t a : args) w.i64(a);
  if (b) {
    w.bytes(b->tokens.data(), b->tokens.size() * 4);
    w.i64(int64_t(b->seqs.size()));
    for (const BatchSeq& q : b->seqs) {
      w.i64(q.start);
      w.i64(q.n);
      w.bytes(q.blocks.data(), q.blocks.size() * 4);
    }
    w.bytes(b->logit_rows.data(), b->logit_rows.size() * 4);
  }
  return w.s;
}

template <typename T>
std::vector<T> vec_of(const std::string& b) {
  std::vector<T> v(b.size() / sizeof(T));
  std::memcpy(v.data(), b.data(), v.size() * sizeof(T));
  return v;
}

// The batch of a kForward message; `blocks` keeps the block tables the batch's spans view.
Batch decode_batch(Reader& r, std::vector<std::vector<int32_t>>& blocks) {
  Batch b;
  b.tokens = vec_of<int32_t>(r.str());
  const int64_t S = r.i64();
  blocks.assign(static_cast<size_t>(S), {});
  for (int64_t s = 0; s < S; ++s) {
    BatchSeq q;
    q.start = r.i64();
    q.n = r.i64();
    blocks[size_t(s)] = vec_of<int32_t>(r.str());
    q.blocks = blocks[size_t(s)];
    b.seqs.push_back(q);
  }
  b.logit_rows = vec_of<int32_t>(r.str());
  return b;
}

std::vector<int> stage_ranks(const Shard& s) {
  std::vector<int> r;
  for (int t = 0; t < s.tp; ++t) r.push_back(s.pp_rank * s.tp + t);
  return r;
}
std::vector<int> line_ranks(const Shard& s) {
  std::vector<int> r;
  for (int p = 0; p < s.pp; ++p) r.push_back(p * s.tp + s.tp_rank);
  return r;
}
std::vector<int> all_ranks(int n) {
  std::vector<int> r;
  for (int i = 0; i < n; ++i) r.push_back(i);
  return r;
}

// NCCL ids: one per stage (its tp group), one per tp rank (its pipeline line), one world.
struct NcclIds {
  std::vector<std::vector<char>> stage, line;
  std::vector<char> world;
};

NcclIds make_nccl_ids(int tp, int pp) {
  NcclIds ids;
  for (int p = 0; p < pp; ++p) ids.stage.push_back(nccl_unique_id());
  for (int t = 0; t < tp; ++t) ids.line.push_back(nccl_unique_id());
  ids.world = nccl_unique_id();
  return ids;
}

json ids_json(const NcclIds& ids) {
  json j = {{"stage", json::array()}, {"line", json::array()}, {"world", hex(ids.world)}};
  for (const auto& i : ids.stage) j["stage"].push_back(hex(i));
  for (const auto& i : ids.line) j["line"].push_back(hex(i));
  return j;
}

NcclIds ids_from(const json& j) {
  NcclIds ids;
  for (const auto& i : j.at("stage")) ids.stage.push_back(unhex(i.get<std::string>()));
  for (const auto& i : j.at("line")) ids.line.push_back(unhex(i.get<std::string>()));
  ids.world = unhex(j.at("world").get<std::string>());
  return ids;
}

}  // namespace

struct RankState {
  Shard shard;
  ModelConfig config;
  std::unique_ptr<Backend> own_be;  // ranks > 0 (rank 0 runs on the engine's backend)
  Backend* be = nullptr;
  std::vector<std::pair<std::string, Tensor>> host;
  std::unique_ptr<DeviceWeights> w;
  std::unique_ptr<KVCache> cache;
  std::unique_ptr<Comm> tp, pp, world;
  std::unique_ptr<Decoder> dec;
  // Set while the rank works on rank 0's command: only then does a peer's end abort it (a rank
  // 0 that closes after saying stop is not a failure).
  std::atomic<bool> busy{false};
  float* out = nullptr;  // the last stage's tp rank 0: the step's logits [rows, vocab]
  size_t out_bytes = 0;
  bool own_out = false;

  ~RankState() {
    dec.reset();
    cache.reset();
    w.reset();
    if (own_out && out) be->release(out);
    world.reset(), pp.reset(), tp.reset();
  }
  // The ranks' collectives, NCCL on GPUs, the mesh on CPUs; all ranks build them in one order.
  void connect(Mesh& mesh, const RankSetup& s, const NcclIds* ids) {
    const auto stage = stage_ranks(shard), line = line_ranks(shard);
    auto make = [&](const std::vector<int>& ranks, const std::vector<char>* id) {
      if (!ids) return make_mesh_comm(mesh, ranks);
      int me = 0;
      while (ranks[size_t(me)] != mesh.rank()) ++me;
      return make_nccl_comm(*be, *id, me, int(ranks.size()));
    };
    tp = make(stage, ids ? &ids->stage[size_t(shard.pp_rank)] : nullptr);
    if (s.pp > 1) {
      pp = make(line, ids ? &ids->line[size_t(shard.tp_rank)] : nullptr);
      world = make(all_ranks(s.tp * s.pp), ids ? &ids->world : nullptr);
    }
  }
  void upload() {
    std::vector<const Tensor*> h;
    for (const auto& [n, t] : host) h.push_back(&t);
    w = std::make_unique<DeviceWeights>(host, be->upload_all(h));
  }
  void build(const RankSetup& s) {
    config = rank_config(s.config, shard);
    if (!w) upload();
    cache = std::make_unique<KVCache>(*be, config, s.num_blocks, s.block_size, s.kv_fp8,
                                      stage_layers(s.config, shard));
    dec = std::make_unique<Decoder>(*be, config, *w, *cache, s.max_seq_len,
                                    Parallel{shard, tp.get(), pp.get()});
  }
  // One step: the micro-batches in order; the last stage's tp rank 0 gathers the logits.
  void step(const Batch& b, int64_t V) {
    const std::vector<Batch> mbs = split_batch(b, shard.pp);
    const bool keep = shard.last_stage() && shard.tp_rank == 0;
    const size_t need = b.logit_rows.size() * size_t(V) * 4;
    if (keep && own_out && need > out_bytes) {
      if (out) be->release(out);
      out = static_cast<float*>(be->alloc(need));
      out_bytes = need;
    }
    size_t row = 0;
    for (const Batch& mb : mbs) {
      const float* lg = dec->forward(mb);
      const size_t R = mb.logit_rows.size();
      if (keep && R)
        be->copy_2d(out + row * size_t(V), size_t(V) * 4, lg, size_t(V) * 4, size_t(V) * 4, R);
      row += R;
    }
    if (keep && shard.pp > 1 && row) world->send(out, row * size_t(V) * 4, 0);
  }
  void abort() {
    for (Comm* c : {tp.get(), pp.get(), world.get()})
      if (c) c->abort();
  }
};

// Marks a rank busy for a scope.
struct Busy {
  explicit Busy(RankState& r) : r_(r) { r_.busy = true; }
  ~Busy() { r_.busy = false; }
  RankState& r_;
};

// While the rank is busy, checks every 100 ms whether a peer's process ended; then aborts the
// collectives (a GPU rank waiting in NCCL for a dead peer would wait forever) and, on a rank > 0,
// ends this process: the job is lost either way. Lives as long as the rank.
class Watchdog {
 public:
  Watchdog(Mesh& m, RankState& r, std::vector<int> peers) : m_(m), r_(r), peers_(std::move(peers)) {
    t_ = std::thread([this] {
      std::unique_lock lk(mu_);
      while (!cv_.wait_for(lk, std::chrono::milliseconds(100), [this] { return done_; })) {
        if (!r_.busy.load()) continue;
        for (int p : peers_)
          if (m_.closed(p)) {
            r_.abort();
            if (m_.rank() != 0) {
              std::fprintf(stderr, "kiln: error: rank %d: rank %d ended; stopping\n", m_.rank(), p);
              std::_Exit(1);
            }
            return;
          }
      }
    });
  }
  ~Watchdog() {
    {
      std::lock_guard lk(mu_);
      done_ = true;
    }
    cv_.notify_all();
    t_.join();
  }

 private:
  Mesh& m_;
  RankState& r_;
  std::vector<int> peers_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread t_;
};

namespace {

std::vector<int> launch_local(const std::string& exe, const DistEnv& e, int port) {
  const std::string path = exe.empty() ? "/proc/self/exe" : exe;
  std::vector<int> pids;
  for (int r = 1; r < e.world; ++r) {
    std::vector<std::string> env;
    for (char** p = environ; *p; ++p)
      if (std::strncmp(*p, "KILN_RANK=", 10) && std::strncmp(*p, "KILN_WORLD_SIZE=", 16) &&
          std::strncmp(*p, "KILN_LOCAL_RANK=", 16) && std::strncmp(*p, "KILN_DIST_INIT=", 15))
        env.emplace_back(*p);
    env.push_back(cat("KILN_RANK=", r));
    env.push_back(cat("KILN_WORLD_SIZE=", e.world));
    env.push_back(cat("KILN_LOCAL_RANK=", r));
    env.push_back(cat("KILN_DIST_INIT=", e.host, ":", port));
    std::vector<char*> envp, argv = {const_cast<char*>(path.c_str()), nullptr};
    for (auto& s : env) envp.push_back(s.data());
    envp.push_back(nullptr);
    pid_t pid = 0;
    const int rc = posix_spawn(&pid, path.c_str(), nullptr, nullptr, argv.data(), envp.data());
    if (rc != 0) {
      for (int q : pids) kill(q, SIGTERM);
      throw Error(cat("cannot start rank ", r, " (", path, "): ", std::strerror(rc)));
    }
    pids.push_back(pid);
  }
  return pids;
}

void reap(const std::vector<int>& pids) {
  // The ranks stop on kStop or when rank 0's connections close; give them a moment, then end
  // them.
  for (int pid : pids) {
    for (int i = 0; i < 100; ++i) {
      if (waitpid(pid, nullptr, WNOHANG) != 0) goto next;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
  next:;
  }
}

}  // namespace

ProcessRanks::ProcessRanks(Backend& be, const RankSetup& setup, const WeightsOf& weights_of,
                           const DistEnv& env, bool launched, const std::string& rank_exe,
                           const std::function<int64_t(size_t, size_t)>& kv_blocks)
    : setup_(setup), be_(be) {
  RankSetup& s = setup_;
  check_shardable(s.config, s.tp, s.pp);
  KILN_CHECK(env.world == s.tp * s.pp, "the world has ", env.world, " ranks but --tp ", s.tp,
             " x --pp ", s.pp, " = ", s.tp * s.pp, " are needed");
  try {
    mesh_ = Mesh::accept_after(env, [&](int port) {
      if (!launched) children_ = launch_local(rank_exe, env, port);
    });
    // Rank 0's weights first: the KV cache gets what they leave free.
    me_ = std::make_unique<RankState>();
    me_->shard = Shard::of(0, s.tp, s.pp);
    me_->be = &be_;
    me_->host = weights_of(me_->shard);
    me_->upload();
    const auto [free, total] = be_.memory();
    s.num_blocks = kv_blocks(free, total);
    const bool gpu = s.device == "cuda";
    std::unique_ptr<NcclIds> ids;
    if (gpu) ids = std::make_unique<NcclIds>(make_nccl_ids(s.tp, s.pp));
    json hello = setup_json(s);
    if (ids) hello["nccl"] = ids_json(*ids);
    for (int r = 1; r < env.world; ++r) {
      mesh_->send_msg(r, hello.dump());
      // Its shard, a tensor a message (the shard is never copied whole).
      const auto mine = weights_of(Shard::of(r, s.tp, s.pp));
      mesh_->send_msg(r, std::to_string(mine.size()));
      for (const auto& [n, t] : mine) {
        Writer w;
        w.str(n);
        w.tensor(t);
        mesh_->send_msg(r, w.s);
      }
    }
    me_->connect(*mesh_, s, ids.get());
    me_->build(s);
    std::vector<int> peers = all_ranks(env.world);
    peers.erase(peers.begin());
    dog_ = std::make_unique<Watchdog>(*mesh_, *me_, peers);
  } catch (...) {
    me_.reset();
    mesh_.reset();
    reap(children_);
    throw;
  }
}

ProcessRanks::~ProcessRanks() {
  if (mesh_ && !stopped_) {
    try {
      command(encode(kStop));
    } catch (const Error&) {
    }
  }
  dog_.reset();
  me_.reset();
  if (logits_) be_.release(logits_);
  mesh_.reset();
  reap(children_);
}

KVCache& ProcessRanks::cache() {
  return *me_->cache;
}

void ProcessRanks::command(const std::string& m) {
  for (int r = 1; r < mesh_->size(); ++r) mesh_->send_msg(r, m);
}

const float* ProcessRanks::forward(const Batch& b, bool tokens_on_device) {
  Batch own;
  const Batch* in = &b;
  if (tokens_on_device) {  // the ids rank 0 sampled, for every rank's embedding
    own = b;
    own.tokens.resize(b.seqs.size());
    be_.to_host(own.tokens.data(), me_->dec->token_buffer(), own.tokens.size() * 4);
    in = &own;
  }
  const int64_t V = setup_.config.vocab_size;
  const size_t need = in->logit_rows.size() * size_t(V) * 4;
  if (need > logits_bytes_) {
    if (logits_) be_.release(logits_);
    logits_ = static_cast<float*>(be_.alloc(need));
    logits_bytes_ = need;
  }
  command(encode(kForward, in));
  me_->out = logits_;
  Busy busy(*me_);
  me_->step(*in, V);
  if (setup_.pp > 1 && !in->logit_rows.empty())
    me_->world->recv(logits_, need, (setup_.pp - 1) * setup_.tp);
  return logits_;
}

void ProcessRanks::prepare(int64_t max_tokens, int64_t max_seqs, int64_t max_logit_rows) {
  command(encode(kPrepare, nullptr, {max_tokens, max_seqs, max_logit_rows, graphs() ? 1 : 0}));
  Busy busy(*me_);
  me_->dec->prepare(max_tokens, max_seqs, max_logit_rows);
}

int32_t* ProcessRanks::token_buffer() {
  return me_->dec->token_buffer();
}
void ProcessRanks::set_graphs(bool on) {
  me_->dec->set_graphs(on);
}
bool ProcessRanks::graphs() const {
  return me_->dec->graphs();
}
int64_t ProcessRanks::graphs_captured() const {
  return me_->dec->graphs_captured();
}

void serve_rank(const DistEnv& env) {
  Mesh mesh(env);
  const json hello = json::parse(mesh.recv_msg(0));
  const RankSetup s = setup_from(hello);
  if (s.threads > 0) omp_set_num_threads(s.threads);
  RankState r;
  r.shard = Shard::of(env.rank, s.tp, s.pp);
  if (s.device == "cuda") {
    cuda_use_device(env.local_rank);
    r.own_be = make_cuda_backend(s.dtype);
    KILN_CHECK(r.own_be != nullptr, "rank ", env.rank, ": no usable CUDA GPU");
  } else {
    r.own_be = make_cpu_backend();
  }
  r.be = r.own_be.get();
  const int64_t n = std::stoll(mesh.recv_msg(0));
  for (int64_t i = 0; i < n; ++i) {
    const std::string blob = mesh.recv_msg(0);
    Reader rd{blob};
    std::string name = rd.str();
    r.host.emplace_back(std::move(name), rd.tensor());
  }
  std::unique_ptr<NcclIds> ids;
  if (hello.contains("nccl")) ids = std::make_unique<NcclIds>(ids_from(hello["nccl"]));
  r.connect(mesh, s, ids.get());
  r.build(s);
  r.own_out = true;
  const int64_t V = s.config.vocab_size;
  Watchdog dog(mesh, r, {0});
  for (;;) {
    const std::string m = mesh.recv_msg(0, true);
    Reader rd{m};
    const int64_t op = rd.i64();
    std::vector<int64_t> args(static_cast<size_t>(rd.i64()));
    for (int64_t& a : args) a = rd.i64();
    if (op == kStop) return;
    Busy busy(r);
    if (op == kPrepare) {
      KILN_CHECK(args.size() == 4, "a bad prepare message");
      r.dec->set_graphs(args[3] != 0);
      r.dec->prepare(args[0], args[1], args[2]);
    } else if (op == kForward) {
      std::vector<std::vector<int32_t>> blocks;
      const Batch b = decode_batch(rd, blocks);
      r.step(b, V);
    } else {
      throw Error(cat("rank ", env.rank, ": unknown command ", op, " from rank 0"));
    }
  }
}

}  // namespace kiln
