#include "runtime/parallel.h"

#include <omp.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>

#include "core/error.h"

namespace kiln {

struct ThreadRanks::Rank {
  Shard shard;
  ModelConfig config;  // rank_config: its heads and intermediate sizes
  std::unique_ptr<Backend> be;
  std::vector<std::pair<std::string, Tensor>> host;
  std::unique_ptr<DeviceWeights> w;
  std::unique_ptr<KVCache> cache;
  std::unique_ptr<Comm> tp, pp;
  std::unique_ptr<Decoder> dec;
};

// One thread per rank, started once. run() hands every thread the same job and returns when all
// have finished it; a job must not throw (on_all catches for it).
class ThreadRanks::Threads {
 public:
  Threads(int n, int omp_threads) {
    for (int i = 0; i < n; ++i)
      threads_.emplace_back([this, i, omp_threads] {
        // The ranks share the cores: each its part (more threads than cores spin and wait on
        // each other between collectives).
        omp_set_num_threads(omp_threads);
        uint64_t seen = 0;
        for (;;) {
          const std::function<void(int)>* job = nullptr;
          {
            std::unique_lock lk(mu_);
            wake_.wait(lk, [&] { return stop_ || gen_ != seen; });
            if (stop_) return;
            seen = gen_;
            job = job_;
          }
          (*job)(i);
          std::lock_guard lk(mu_);
          if (--pending_ == 0) done_.notify_one();
        }
      });
  }
  ~Threads() {
    {
      std::lock_guard lk(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }
  void run(const std::function<void(int)>& job) {
    std::unique_lock lk(mu_);
    job_ = &job;
    pending_ = int(threads_.size());
    ++gen_;
    wake_.notify_all();
    done_.wait(lk, [&] { return pending_ == 0; });
  }

 private:
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* job_ = nullptr;
  uint64_t gen_ = 0;
  int pending_ = 0;
  bool stop_ = false;
};

ThreadRanks::ThreadRanks(const ModelConfig& c, const WeightsOf& weights_of, int tp, int pp,
                         int64_t num_blocks, int64_t block_size, bool kv_fp8, int64_t max_seq_len)
    : config_(c), world_(std::make_unique<ThreadWorld>(tp * pp)) {
  threads_per_rank_ = std::max(1, omp_get_max_threads() / (tp * pp));
  check_shardable(c, tp, pp);
  for (int r = 0; r < tp * pp; ++r) {
    auto k = std::make_unique<Rank>();
    k->shard = Shard::of(r, tp, pp);
    k->config = rank_config(c, k->shard);
    k->be = make_cpu_backend();
    k->host = weights_of(k->shard);
    std::vector<const Tensor*> h;
    for (const auto& [n, t] : k->host) h.push_back(&t);
    k->w = std::make_unique<DeviceWeights>(k->host, k->be->upload_all(h));
    k->cache = std::make_unique<KVCache>(*k->be, k->config, num_blocks, block_size, kv_fp8,
                                         stage_layers(c, k->shard));
    std::vector<int> stage, line;
    for (int t = 0; t < tp; ++t) stage.push_back(k->shard.pp_rank * tp + t);
    for (int p = 0; p < pp; ++p) line.push_back(p * tp + k->shard.tp_rank);
    k->tp = world_->group(stage, r);
    k->pp = world_->group(line, r);
    k->dec = std::make_unique<Decoder>(*k->be, k->config, *k->w, *k->cache, max_seq_len,
                                       Parallel{k->shard, k->tp.get(), k->pp.get()});
    ranks_.push_back(std::move(k));
  }
  threads_ = std::make_unique<Threads>(tp * pp, threads_per_rank_);
}

ThreadRanks::~ThreadRanks() {
  threads_.reset();
  // Decoders and caches before their backends.
  for (auto& r : ranks_) {
    r->dec.reset();
    r->cache.reset();
    r->w.reset();
  }
}

KVCache& ThreadRanks::cache() {
  return *ranks_[0]->cache;
}

int64_t ThreadRanks::weight_bytes() const {
  int64_t b = 0;
  for (const auto& r : ranks_)
    for (const auto& [n, t] : r->host) b += int64_t(t.weight_bytes());
  return b;
}

void ThreadRanks::on_all(const std::function<void(Rank&)>& f) {
  std::mutex m;
  std::string first;
  threads_->run([&](int i) {
    try {
      f(*ranks_[size_t(i)]);
    } catch (const std::exception& e) {
      world_->abort(i, e.what());  // the others stop waiting for this rank
      std::lock_guard lk(m);
      if (first.empty()) first = e.what();
    }
  });
  if (!first.empty()) throw Error(first);
}

const float* ThreadRanks::forward(const Batch& b, bool tokens_on_device) {
  Batch own;
  const Batch* in = &b;
  if (tokens_on_device) {  // the sampled ids are in token_buffer(), host memory
    own = b;
    own.tokens.assign(tokens_.begin(), tokens_.begin() + int64_t(b.seqs.size()));
    in = &own;
  }
  const int pp = ranks_.back()->shard.pp;
  const std::vector<Batch> mbs = split_batch(*in, pp);
  const int64_t V = config_.vocab_size;
  logits_.resize(in->logit_rows.size() * size_t(V));
  on_all([&](Rank& r) {
    size_t row = 0;
    for (const Batch& mb : mbs) {
      const float* lg = r.dec->forward(mb);
      const size_t R = mb.logit_rows.size();
      if (r.shard.last_stage() && r.shard.tp_rank == 0 && R)
        std::memcpy(logits_.data() + row * size_t(V), lg, R * size_t(V) * 4);
      row += R;
    }
  });
  return logits_.data();
}

void ThreadRanks::prepare(int64_t max_tokens, int64_t max_seqs, int64_t max_logit_rows) {
  tokens_.assign(size_t(max_seqs), 0);
  on_all([&](Rank& r) { r.dec->prepare(max_tokens, max_seqs, max_logit_rows); });
}

std::vector<Batch> split_batch(const Batch& b, int64_t parts) {
  const int64_t S = int64_t(b.seqs.size());
  parts = std::max<int64_t>(1, std::min(parts, S));
  std::vector<Batch> out(static_cast<size_t>(parts));
  int64_t row = 0;
  size_t lr = 0;
  for (int64_t p = 0, s = 0; p < parts; ++p) {
    Batch& o = out[size_t(p)];
    const int64_t end = S * (p + 1) / parts, first = row;
    for (; s < end; ++s) {
      const BatchSeq& q = b.seqs[size_t(s)];
      o.seqs.push_back(q);
      o.tokens.insert(o.tokens.end(), b.tokens.begin() + row, b.tokens.begin() + row + q.n);
      row += q.n;
    }
    for (; lr < b.logit_rows.size() && b.logit_rows[lr] < row; ++lr)
      o.logit_rows.push_back(int32_t(b.logit_rows[lr] - first));
  }
  return out;
}

}  // namespace kiln
