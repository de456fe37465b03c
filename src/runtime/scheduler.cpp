// The continuous-batching scheduler (include/kiln/serving.h): one engine thread, a waiting queue
// and a running list, one mixed-batch forward per step.
//
// A step (vLLM v1's policy, token-budget first):
//   1. running sequences that decode (one token each), then running sequences still in prefill,
//      each takes min(its remaining tokens, the budget left); a sequence that cannot get the KV
//      blocks it needs preempts the newest running sequence (its blocks are released and it is
//      recomputed later: preemption by recompute), itself if it is the newest;
//   2. if nothing was preempted, waiting sequences in arrival order while the budget, the
//      sequence limit and free blocks allow; a new sequence first takes the longest cached prefix
//      of its tokens (prefix caching), always leaving at least one token to compute;
//   3. one forward over the batch (decodes first, then prefill chunks); rows that finish a
//      sequence's tokens are sampled, rows of prompt_logprobs requests are scored;
//   4. sampled tokens are appended and checked against the stop rules; events go out; finished
//      sequences release their blocks (full blocks stay cached for later prefixes).
// Sampling reads only (seed, number of tokens generated so far) and the logits, so a sequence
// picks the same tokens whatever else shares its batch, and after a preemption.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include "core/error.h"
#include "kiln/serving.h"
#include "runtime/block_manager.h"
#include "runtime/engine_impl.h"
#include "tokenizer/tokenizer.h"

namespace kiln {

namespace {

using Clock = std::chrono::steady_clock;

struct Req;

// One completion: a sequence in the KV cache.
struct Seq {
  Req* req = nullptr;
  int index = 0;
  std::vector<int32_t> tokens;  // prompt + generated
  int64_t prompt_len = 0;
  int64_t computed = 0;  // tokens whose K/V are in the cache
  std::vector<int32_t> blocks;
  BlockManager::Chain chain;
  bool running = false;
  bool score_prompt = false;  // prompt_logprobs rows wanted (index 0 only)
  bool counted = false;       // prompt counted in the stats
  SampleParams sp;
  RowPenalty pen;
  bool penalized = false;
  std::unordered_map<int32_t, int32_t> counts;  // generated tokens
  std::unordered_set<int32_t> prompt_ids;       // for the repetition penalty
  std::optional<StreamDecoder> dec;
  std::string text;  // decoded output so far (cut at a stop string)
  size_t sent = 0;   // bytes of text already emitted
  bool started = false;
  FinishReason finish = FinishReason::None;
  std::string stop_reason;
  int64_t cached = 0;
  int64_t generated() const { return int64_t(tokens.size()) - prompt_len; }
};

struct Req {
  uint64_t id = 0;
  GenerationParams p;
  Scheduler::Callback cb;
  int64_t max_tokens = 0;
  std::vector<std::unique_ptr<Seq>> seqs;
  int live = 0;
  std::vector<std::optional<TokenLogprob>> prompt_lps;
  bool prompt_lps_sent = false;
};

struct Incoming {
  std::unique_ptr<Req> req;
  std::vector<int32_t> prompt;
};

}  // namespace

struct Scheduler::Impl {
  Engine& engine;
  Engine::Impl& m;
  ServeConfig cfg;
  std::optional<Tokenizer> tok;
  std::unique_ptr<BlockManager> bm;
  std::vector<int32_t> eos;

  // Shared with submit() / cancel() / stats().
  mutable std::mutex mu;
  std::condition_variable cv, idle_cv;
  std::deque<Incoming> inbox;
  std::vector<uint64_t> cancels;
  bool stopping = false, draining = false;
  uint64_t next_id = 1;
  int64_t queued = 0;  // inbox + waiting sequences' requests, for max_queue
  std::mt19937_64 seeder{std::random_device{}()};
  SchedulerStats st;

  // Engine thread only.
  std::unordered_map<uint64_t, std::unique_ptr<Req>> reqs;
  std::deque<Seq*> waiting;
  std::vector<Seq*> running;
  std::vector<uint64_t> done;  // requests whose every sequence finished: freed by reap()
  std::thread thread;
  // Step scratch.
  float* d_lp_rows = nullptr;  // gathered logits of scored rows
  size_t d_lp_bytes = 0;
  int32_t* d_rows = nullptr;
  size_t d_rows_bytes = 0;

  Impl(Engine& e, const ServeConfig& c) : engine(e), m(*e.impl_), cfg(c) {}

  void loop();
  void step();
  StepInfo step_info;  // what the current step ran (for cfg.on_step)
  void admit(Incoming in);
  void finish(Seq* s, FinishReason r, const std::string& reason, const std::string& error = "");
  void preempt(Seq* s);
  void emit(Seq* s, std::vector<int32_t> ids, std::vector<TokenLogprob> lps,
            const std::string& error = "");
  void abort_all(const std::string& error);
  void reap();
  void publish_stats();
  void* grow(void*& p, size_t& have, size_t want) {
    if (have < want) {
      if (p) m.backend->release(p);
      p = nullptr;
      have = 0;
      p = m.backend->alloc(want);
      have = want;
    }
    return p;
  }
};

Scheduler::Scheduler(Engine& engine, const ServeConfig& cfg) : impl_(new Impl(engine, cfg)) {
  Impl& s = *impl_;
  KILN_CHECK(cfg.max_queue >= 1, "--max-queue must be >= 1 (got ", cfg.max_queue, ")");
  engine.start(cfg.engine_runtime());
  // An engine started earlier keeps its step limits (its buffers and graphs are sized for
  // them); a scheduler may only ask for less.
  s.cfg.max_num_seqs =
      cfg.max_num_seqs ? std::min(cfg.max_num_seqs, s.m.max_num_seqs) : s.m.max_num_seqs;
  s.cfg.max_num_tokens =
      cfg.max_num_tokens ? std::min(cfg.max_num_tokens, s.m.max_num_tokens) : s.m.max_num_tokens;
  s.cfg.max_num_tokens = std::max(s.cfg.max_num_tokens, s.cfg.max_num_seqs);
  if (!engine.tokenizer_dir().empty() &&
      (std::filesystem::exists(engine.tokenizer_dir() / "tokenizer.json") ||
       std::filesystem::exists(engine.tokenizer_dir() / "tokenizer.model")))
    s.tok = Tokenizer::from_dir(engine.tokenizer_dir());
  s.eos.assign(s.m.config.eos_token_ids.begin(), s.m.config.eos_token_ids.end());
  if (s.tok && s.tok->eos_token_id() &&
      std::find(s.eos.begin(), s.eos.end(), *s.tok->eos_token_id()) == s.eos.end())
    s.eos.push_back(*s.tok->eos_token_id());
  s.bm = std::make_unique<BlockManager>(*s.m.cache, cfg.prefix_cache);
  const int64_t bs = s.bm->block_size();
  KILN_CHECK(s.bm->total() >= (s.m.max_seq_len + bs - 1) / bs,
             "the KV cache is in use (by sessions or another scheduler of this engine): ",
             s.bm->total(), " free blocks, less than one sequence of max_seq_len");
  s.publish_stats();
  s.thread = std::thread([&s] { s.loop(); });
}

Scheduler::~Scheduler() {
  {
    std::lock_guard<std::mutex> l(impl_->mu);
    impl_->stopping = true;
  }
  impl_->cv.notify_all();
  if (impl_->thread.joinable()) impl_->thread.join();
  if (impl_->d_lp_rows) impl_->m.backend->release(impl_->d_lp_rows);
  if (impl_->d_rows) impl_->m.backend->release(impl_->d_rows);
  impl_->bm.reset();
}

const ServeConfig& Scheduler::config() const {
  return impl_->cfg;
}
int64_t Scheduler::max_seq_len() const {
  return impl_->m.max_seq_len;
}
Engine& Scheduler::engine() {
  return impl_->engine;
}

SchedulerStats Scheduler::stats() const {
  std::lock_guard<std::mutex> l(impl_->mu);
  return impl_->st;
}

uint64_t Scheduler::submit(std::vector<int32_t> prompt, const GenerationParams& params,
                           Callback cb) {
  Impl& s = *impl_;
  const int64_t V = s.m.config.vocab_size, L = int64_t(prompt.size());
  params.validate(V);
  KILN_CHECK(L > 0, "the prompt is empty");
  for (int32_t t : prompt)
    KILN_CHECK(t >= 0 && t < V, "prompt token id ", t, " is outside the vocabulary [0, ", V, ")");
  const int64_t msl = s.m.max_seq_len;
  KILN_CHECK(L <= msl, "the prompt has ", L, " tokens but the engine allows at most ", msl,
             " (max_seq_len)");
  const int64_t max_tokens = params.max_tokens.value_or(msl - L);
  KILN_CHECK(L + max_tokens <= msl, "the prompt (", L, " tokens) plus max_tokens (", max_tokens,
             ") exceeds the engine's max_seq_len of ", msl);
  KILN_CHECK(params.max_tokens || max_tokens > 0, "the prompt (", L,
             " tokens) leaves no room to generate within the engine's max_seq_len of ", msl);
  KILN_CHECK(s.tok || params.stop.empty(), "stop strings need the model's tokenizer");
  auto r = std::make_unique<Req>();
  r->p = params;
  r->cb = std::move(cb);
  r->max_tokens = max_tokens;
  std::lock_guard<std::mutex> l(s.mu);
  if (s.stopping || s.draining) throw Error("the server is shutting down");
  if (s.queued >= s.cfg.max_queue)
    throw QueueFull(cat("the request queue is full (", s.cfg.max_queue, " waiting; --max-queue)"));
  r->id = s.next_id++;
  if (!params.seed) r->p.seed = s.seeder();
  const uint64_t id = r->id;
  s.inbox.push_back({std::move(r), std::move(prompt)});
  ++s.queued;
  s.cv.notify_all();
  return id;
}

void Scheduler::cancel(uint64_t id) {
  {
    std::lock_guard<std::mutex> l(impl_->mu);
    impl_->cancels.push_back(id);
  }
  impl_->cv.notify_all();
}

void Scheduler::drain() {
  Impl& s = *impl_;
  std::unique_lock<std::mutex> l(s.mu);
  s.draining = true;
  s.idle_cv.wait(
      l, [&] { return s.stopping || (s.st.running == 0 && s.st.waiting == 0 && s.inbox.empty()); });
}

void Scheduler::Impl::publish_stats() {
  std::lock_guard<std::mutex> l(mu);
  st.running = int64_t(running.size());
  st.waiting = int64_t(waiting.size());
  st.kv_blocks_total = bm->total();
  st.kv_blocks_used = bm->used();
  // What is waiting in the inbox is not yet a sequence; queued counts requests.
}

void Scheduler::Impl::admit(Incoming in) {
  Req* r = in.req.get();
  const GenerationParams& p = r->p;
  SamplingParams asked;
  asked.temperature = p.temperature, asked.top_k = p.top_k, asked.top_p = p.top_p;
  const SampleParams base = m.sampling(asked);
  // generation_config.json's repetition_penalty applies unless the request sets one (as vLLM).
  const nlohmann::json& gd = m.generation_defaults;
  const float rep = p.repetition_penalty.value_or(gd.contains("repetition_penalty") &&
                                                          gd["repetition_penalty"].is_number()
                                                      ? gd["repetition_penalty"].get<float>()
                                                      : 1.0f);
  for (int i = 0; i < p.n; ++i) {
    auto q = std::make_unique<Seq>();
    q->req = r;
    q->index = i;
    q->tokens = in.prompt;
    q->prompt_len = int64_t(in.prompt.size());
    q->sp = base;
    if (p.top_k && *p.top_k < 0) q->sp.top_k = 0;
    if (p.min_p) q->sp.min_p = *p.min_p;
    q->sp.seed = *p.seed + uint64_t(i);  // each completion its own stream
    q->pen = {p.presence_penalty, p.frequency_penalty, rep};
    q->penalized = p.presence_penalty != 0 || p.frequency_penalty != 0 || rep != 1 ||
                   !p.logit_bias.empty() || p.min_tokens > 0;
    if (rep != 1) q->prompt_ids.insert(in.prompt.begin(), in.prompt.end());
    q->score_prompt = i == 0 && p.prompt_logprobs.has_value();
    if (p.detokenize && tok) q->dec.emplace(*tok, p.skip_special_tokens);
    waiting.push_back(q.get());
    r->seqs.push_back(std::move(q));
  }
  r->live = p.n;
  if (p.prompt_logprobs) r->prompt_lps.assign(in.prompt.size(), std::nullopt);
  reqs[r->id] = std::move(in.req);
}

void Scheduler::Impl::emit(Seq* s, std::vector<int32_t> ids, std::vector<TokenLogprob> lps,
                           const std::string& error) {
  Req* r = s->req;
  RequestOutput o;
  o.request_id = r->id;
  o.index = s->index;
  o.token_ids = std::move(ids);
  o.logprobs = std::move(lps);
  o.finish = s->finish;
  o.stop_reason = s->stop_reason;
  o.prompt_tokens = s->prompt_len;
  o.cached_tokens = s->cached;
  o.completion_tokens = s->generated();
  o.first = !s->started;
  o.error = error;
  s->started = true;
  // Text: all of it once finished; else what cannot turn out to be the start of a stop string
  // (the last longest-stop - 1 bytes wait), cut at a UTF-8 character boundary.
  size_t end = s->text.size();
  if (s->finish == FinishReason::None && !r->p.stop.empty()) {
    size_t hold = 0;
    for (const auto& x : r->p.stop) hold = std::max(hold, x.size() - 1);
    end = end > s->sent + hold ? end - hold : s->sent;
    while (end > s->sent && (uint8_t(s->text[end]) & 0xC0) == 0x80) --end;
  }
  if (end > s->sent) o.text = s->text.substr(s->sent, end - s->sent);
  s->sent = std::max(s->sent, end);
  if (s->score_prompt && !r->prompt_lps_sent) {
    o.prompt_logprobs = std::move(r->prompt_lps);
    r->prompt_lps_sent = true;
    // Scored and handed out (prompt_lps is empty now): a recompute after preemption must not
    // score the prompt again, which would write prompt_lps[pos + 1] of the empty vector.
    s->score_prompt = false;
  }
  if (r->cb) {
    try {
      r->cb(o);
    } catch (...) {
      // A failing consumer must not take the engine thread down.
    }
  }
}

void Scheduler::Impl::finish(Seq* s, FinishReason reason, const std::string& why,
                             const std::string& error) {
  if (s->finish != FinishReason::None) return;
  s->finish = reason;
  s->stop_reason = why;
  if (s->dec && reason != FinishReason::Stop) {
    s->text += s->dec->flush();
  }
  bm->release(s->blocks);
  s->computed = 0;
  if (s->running) {
    running.erase(std::find(running.begin(), running.end(), s));
    s->running = false;
  } else {
    auto it = std::find(waiting.begin(), waiting.end(), s);
    if (it != waiting.end()) waiting.erase(it);
  }
  Req* r = s->req;
  emit(s, {}, {}, error);
  if (--r->live == 0) done.push_back(r->id);
}

void Scheduler::Impl::reap() {
  std::lock_guard<std::mutex> l(mu);
  for (uint64_t id : done) {
    reqs.erase(id);  // frees the request and its sequences
    ++st.requests_finished;
  }
  done.clear();
}

void Scheduler::Impl::preempt(Seq* s) {
  bm->release(s->blocks);
  s->computed = 0;
  s->chain = {};
  s->running = false;
  running.erase(std::find(running.begin(), running.end(), s));
  waiting.push_front(s);
  std::lock_guard<std::mutex> l(mu);
  ++st.preemptions;
}

void Scheduler::Impl::abort_all(const std::string& error) {
  std::vector<Seq*> all(running.begin(), running.end());
  all.insert(all.end(), waiting.begin(), waiting.end());
  for (Seq* s : all) finish(s, FinishReason::Abort, "", error);
}

void Scheduler::Impl::loop() {
  while (true) {
    std::deque<Incoming> in;
    std::vector<uint64_t> cx;
    {
      std::unique_lock<std::mutex> l(mu);
      cv.wait(l, [&] {
        return stopping || !inbox.empty() || !cancels.empty() || !running.empty() ||
               !waiting.empty();
      });
      if (stopping) break;
      in.swap(inbox);
      cx.swap(cancels);
    }
    for (auto& i : in) admit(std::move(i));
    for (uint64_t id : cx) {
      auto it = reqs.find(id);
      if (it == reqs.end()) continue;
      std::vector<Seq*> live;
      for (auto& q : it->second->seqs)
        if (q->finish == FinishReason::None) live.push_back(q.get());
      for (Seq* q : live) finish(q, FinishReason::Abort, "");
    }
    if (!running.empty() || !waiting.empty()) {
      try {
        const auto t0 = std::chrono::steady_clock::now();
        step_info = {};
        step();
        if (cfg.on_step && step_info.decodes + step_info.prefill_seqs > 0) {
          step_info.seconds =
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
          cfg.on_step(step_info);
        }
      } catch (const std::exception& e) {
        // A failed step (a device error): its sequences cannot go on.
        abort_all(e.what());
      }
    }
    reap();
    {
      std::lock_guard<std::mutex> l(mu);
      queued = int64_t(inbox.size());
      for (const auto& [id, r] : reqs) {
        bool w = true;
        for (const auto& q : r->seqs) w = w && !q->running && q->finish == FinishReason::None;
        queued += w;
      }
    }
    publish_stats();
    idle_cv.notify_all();
  }
  abort_all("the server is shutting down");
  reap();
  publish_stats();
  idle_cv.notify_all();
}

void Scheduler::Impl::step() {
  const int64_t bs = bm->block_size();
  int64_t budget = cfg.max_num_tokens, logit_budget = m.max_logit_rows;
  struct Plan {
    Seq* s;
    int64_t n;
    bool valid;
  };
  std::vector<Plan> plan;
  std::unordered_map<Seq*, size_t> planned;
  bool preempted = false;
  // Rows of logits a chunk of n tokens of s needs: all of them while scoring the prompt, else
  // one if the chunk completes the sequence's tokens.
  auto logit_rows = [](const Seq* s, int64_t n) -> int64_t {
    if (s->score_prompt && s->computed < s->prompt_len) return n;
    return s->computed + n == int64_t(s->tokens.size()) ? 1 : 0;
  };
  auto chunk = [&](Seq* s) -> int64_t {
    int64_t n = std::min<int64_t>(int64_t(s->tokens.size()) - s->computed, budget);
    if (n <= 0) return 0;
    if (s->score_prompt && s->computed < s->prompt_len) n = std::min(n, logit_budget);
    if (n > 0 && logit_rows(s, n) > logit_budget) n = 0;
    return n;
  };
  auto schedule_running = [&](Seq* s) {
    const int64_t n = chunk(s);
    if (n <= 0) return;
    const int64_t need = (s->computed + n + bs - 1) / bs - int64_t(s->blocks.size());
    while (!bm->allocate(need, s->blocks)) {
      // Preempt the newest running sequence (recomputed later), possibly s itself.
      Seq* victim = running.back();
      auto pit = planned.find(victim);
      if (pit != planned.end()) {
        Plan& pv = plan[pit->second];
        pv.valid = false;
        budget += pv.n;
        logit_budget += logit_rows(victim, pv.n);
        planned.erase(pit);
      }
      preempt(victim);
      preempted = true;
      if (victim == s) return;
    }
    planned[s] = plan.size();
    plan.push_back({s, n, true});
    budget -= n;
    logit_budget -= logit_rows(s, n);
  };
  // Decodes first (latency), then running prefills; each pass over a snapshot, since
  // preemption edits the running list.
  for (int pass = 0; pass < 2; ++pass) {
    const std::vector<Seq*> snap = running;
    for (Seq* s : snap) {
      if (!s->running) continue;  // preempted meanwhile
      const bool decode = int64_t(s->tokens.size()) - s->computed == 1;
      if (decode == (pass == 0)) schedule_running(s);
    }
  }
  // New and preempted sequences, in order, while nothing had to be preempted.
  while (!preempted && !waiting.empty() && budget > 0 &&
         int64_t(running.size()) < cfg.max_num_seqs) {
    Seq* s = waiting.front();
    if (s->blocks.empty() && s->computed == 0) {
      // The last token is always computed (its logits pick the next one); prompt scoring needs
      // every row, so it takes no cached prefix.
      const int64_t max_hit = s->score_prompt ? 0 : int64_t(s->tokens.size()) - 1;
      s->computed = bm->match(s->tokens, max_hit, s->blocks, s->chain);
      if (!s->counted) {
        s->cached = s->computed;
        std::lock_guard<std::mutex> l(mu);
        st.prefix_queries += bm->caching() ? s->prompt_len : 0;
        st.prefix_hits += s->computed;
        st.prompt_tokens += s->prompt_len;
        s->counted = true;
      }
    }
    const int64_t n = chunk(s);
    const int64_t need = (s->computed + n + bs - 1) / bs - int64_t(s->blocks.size());
    if (n <= 0 || !bm->allocate(need, s->blocks)) {
      // Not now: give the cached prefix back (it stays cached) and wait.
      bm->release(s->blocks);
      s->computed = 0;
      s->chain = {};
      break;
    }
    waiting.pop_front();
    s->running = true;
    running.push_back(s);
    planned[s] = plan.size();
    plan.push_back({s, n, true});
    budget -= n;
    logit_budget -= logit_rows(s, n);
  }
  std::vector<Plan> live;
  for (const Plan& p : plan)
    if (p.valid) live.push_back(p);
  if (live.empty()) return;
  // Decodes (one token) first, as Batch wants.
  std::stable_partition(live.begin(), live.end(), [](const Plan& p) { return p.n == 1; });
  for (const Plan& p : live) {
    const bool decode = p.n == 1 && p.s->computed + 1 == int64_t(p.s->tokens.size()) &&
                        p.s->computed >= p.s->prompt_len;
    (decode ? step_info.decodes : step_info.prefill_seqs) += 1;
    if (!decode) step_info.prefill_tokens += p.n;
  }

  // The batch, and what each logits row is for.
  struct Row {
    Seq* s;
    int64_t pos;  // position of the row's token
    bool sample;  // picks the sequence's next token
  };
  Batch b;
  std::vector<Row> rows;
  for (const Plan& p : live) {
    Seq* s = p.s;
    const int64_t first = b.num_tokens();
    const bool completes = s->computed + p.n == int64_t(s->tokens.size());
    const bool score = s->score_prompt && s->computed < s->prompt_len;
    b.tokens.insert(b.tokens.end(), s->tokens.begin() + s->computed,
                    s->tokens.begin() + s->computed + p.n);
    b.seqs.push_back({s->computed, p.n, s->blocks});
    for (int64_t i = 0; i < p.n; ++i) {
      const bool last = i + 1 == p.n;
      if (score || (last && completes)) {
        b.logit_rows.push_back(int32_t(first + i));
        rows.push_back({s, s->computed + i, last && completes});
      }
    }
  }
  const float* d_logits = m.decoder->forward(b);
  for (const Plan& p : live) {
    p.s->computed += p.n;
    bm->register_full(p.s->tokens, p.s->computed, p.s->blocks, p.s->chain);
  }
  const int64_t R = int64_t(rows.size()), V = m.config.vocab_size;
  {
    std::lock_guard<std::mutex> l(mu);
    ++st.steps;
  }
  if (R == 0) return;
  auto* logits = const_cast<float*>(d_logits);

  // Rows scored for logprobs: copied before penalties touch them (logprobs are the model's).
  std::vector<int32_t> lp_rows;
  int64_t k = 0;
  for (int64_t r = 0; r < R; ++r) {
    const Row& w = rows[size_t(r)];
    const GenerationParams& p = w.s->req->p;
    const bool prompt_row = w.s->score_prompt && w.pos + 1 < w.s->prompt_len;
    if (prompt_row || (w.sample && p.logprobs)) {
      lp_rows.push_back(int32_t(r));
      k = std::max<int64_t>(k, prompt_row ? *p.prompt_logprobs : *p.logprobs);
    }
  }
  if (!lp_rows.empty()) {
    auto* dr = static_cast<int32_t*>(
        grow(reinterpret_cast<void*&>(d_rows), d_rows_bytes, lp_rows.size() * 4));
    m.backend->to_device(dr, lp_rows.data(), lp_rows.size() * 4);
    auto* dst = static_cast<float*>(
        grow(reinterpret_cast<void*&>(d_lp_rows), d_lp_bytes, lp_rows.size() * size_t(V) * 4));
    m.backend->embed(Tensor::view(DType::F32, {R, V}, nullptr, logits), dr, int64_t(lp_rows.size()),
                     1.0f, dst);
  }

  // Penalties, logit_bias and min_tokens bans of the sampled rows.
  std::vector<RowPenalty> pen(static_cast<size_t>(R));
  std::vector<LogitEdit> edits;
  for (int64_t r = 0; r < R; ++r) {
    const Row& w = rows[size_t(r)];
    Seq* s = w.s;
    if (!w.sample || !s->penalized) continue;
    pen[size_t(r)] = s->pen;
    std::map<int32_t, LogitEdit> e;
    auto at = [&](int32_t id) -> LogitEdit& {
      LogitEdit& x = e[id];
      x.row = int32_t(r), x.id = id;
      return x;
    };
    for (const auto& [id, bias] : s->req->p.logit_bias) at(id).bias += bias;
    if (s->generated() < s->req->p.min_tokens) {
      if (!s->req->p.ignore_eos)
        for (int32_t id : eos)
          if (id < V) at(id).bias = -INFINITY;  // an eos past the vocabulary never comes up
      for (int32_t id : s->req->p.stop_token_ids) at(id).bias = -INFINITY;
    }
    if (s->pen.frequency != 0 || s->pen.presence != 0 || s->pen.repetition != 1)
      for (const auto& [id, c] : s->counts) {
        at(id).count = c;
        at(id).seen = 1;
      }
    if (s->pen.repetition != 1)
      for (int32_t id : s->prompt_ids) at(id).seen = 1;
    for (auto& [id, x] : e) edits.push_back(x);
  }
  if (!edits.empty())
    m.backend->edit_logits(logits, R, V, pen.data(), edits.data(), int64_t(edits.size()));

  std::vector<SampleParams> sp(static_cast<size_t>(R));
  for (int64_t r = 0; r < R; ++r) {
    const Row& w = rows[size_t(r)];
    if (!w.sample) continue;  // a scored prompt row: picked greedily and ignored
    sp[size_t(r)] = w.s->sp;
    sp[size_t(r)].step = uint64_t(w.s->generated());
  }
  std::vector<int32_t> ids(static_cast<size_t>(R));
  m.backend->sample(logits, R, V, sp.data(), ids.data());
  // A row of NaN / +inf logits: the model's output is broken; its sequence ends with an error
  // rather than a token picked from garbage (and before its logprobs, which would be NaN).
  for (int64_t r = 0; r < R; ++r) {
    const Row& w = rows[size_t(r)];
    if (ids[size_t(r)] != kNonFiniteLogits) continue;
    ids[size_t(r)] = 0;  // a valid id for the log-probability pass below; never emitted
    finish(w.s, FinishReason::Abort, "",
           cat("the model produced non-finite logits (NaN or inf) at position ", w.pos,
               "; its weights or config are broken"));
  }

  // Log-probabilities of the scored rows: the next prompt token, or the token just picked.
  const int64_t P = int64_t(lp_rows.size());
  std::vector<float> lp(static_cast<size_t>(P));
  std::vector<int32_t> top_ids(size_t(P * k));
  std::vector<float> top_lp(size_t(P * k));
  if (P) {
    std::vector<int32_t> want(static_cast<size_t>(P));
    for (int64_t j = 0; j < P; ++j) {
      const Row& w = rows[size_t(lp_rows[size_t(j)])];
      const bool prompt_row = w.s->score_prompt && w.pos + 1 < w.s->prompt_len;
      want[size_t(j)] =
          prompt_row ? w.s->tokens[size_t(w.pos + 1)] : ids[size_t(lp_rows[size_t(j)])];
    }
    m.backend->logprobs(d_lp_rows, P, V, want.data(), k, lp.data(), top_ids.data(), top_lp.data());
  }
  std::unordered_map<int64_t, int64_t> lp_of;  // row -> index into lp
  for (int64_t j = 0; j < P; ++j) lp_of[lp_rows[size_t(j)]] = j;
  auto token_lp = [&](int64_t r, int32_t id, int64_t kk) {
    const int64_t j = lp_of.at(r);
    TokenLogprob t;
    t.id = id;
    t.logprob = lp[size_t(j)];
    for (int64_t i = 0; i < kk; ++i)
      t.top.push_back({top_ids[size_t(j * k + i)], top_lp[size_t(j * k + i)]});
    return t;
  };

  // Outputs.
  int64_t generated = 0;
  for (int64_t r = 0; r < R; ++r) {
    const Row& w = rows[size_t(r)];
    Seq* s = w.s;
    Req* q = s->req;
    const GenerationParams& p = q->p;
    if (s->score_prompt && w.pos + 1 < s->prompt_len)
      q->prompt_lps[size_t(w.pos + 1)] =
          token_lp(r, s->tokens[size_t(w.pos + 1)], *p.prompt_logprobs);
    if (!w.sample || s->finish != FinishReason::None) continue;
    if (q->max_tokens == 0) {  // scoring only: the prompt is done
      finish(s, FinishReason::Length, "");
      continue;
    }
    const int32_t t = ids[size_t(r)];
    s->tokens.push_back(t);
    ++generated;
    if (s->penalized) ++s->counts[t];
    std::vector<TokenLogprob> lps;
    if (p.logprobs) lps.push_back(token_lp(r, t, *p.logprobs));
    const size_t before = s->text.size();
    if (s->dec) s->text += s->dec->push(t);
    const int64_t g = s->generated();
    FinishReason fr = FinishReason::None;
    std::string why;
    if (g >= p.min_tokens) {
      if (!p.ignore_eos && std::find(eos.begin(), eos.end(), t) != eos.end()) {
        fr = FinishReason::Stop;
      } else if (std::find(p.stop_token_ids.begin(), p.stop_token_ids.end(), t) !=
                 p.stop_token_ids.end()) {
        fr = FinishReason::Stop;
        why = std::to_string(t);
      } else if (!p.stop.empty()) {
        // A stop string may straddle tokens: search from where it could start.
        size_t longest = 0;
        for (const auto& x : p.stop) longest = std::max(longest, x.size());
        const size_t from = before >= longest ? before - longest + 1 : 0;
        size_t best = std::string::npos;
        for (const auto& x : p.stop) {
          const size_t at = s->text.find(x, from);
          if (at != std::string::npos && at < best) best = at, why = x;
        }
        if (best != std::string::npos) {
          fr = FinishReason::Stop;
          s->text.resize(best + (p.include_stop_str_in_output ? why.size() : 0));
        }
      }
    }
    if (fr == FinishReason::None &&
        (g >= q->max_tokens || int64_t(s->tokens.size()) >= m.max_seq_len))
      fr = FinishReason::Length;
    if (fr != FinishReason::None) {
      // The last token's event carries the finish reason.
      s->finish = FinishReason::None;
      if (s->dec && fr != FinishReason::Stop) s->text += s->dec->flush();
      s->finish = fr;
      s->stop_reason = why;
      Seq* self = s;
      // finish() without a second event: release and book-keep, then one event.
      bm->register_full(self->tokens, self->computed, self->blocks, self->chain);
      bm->release(self->blocks);
      running.erase(std::find(running.begin(), running.end(), self));
      self->running = false;
      emit(self, {t}, std::move(lps));
      if (--q->live == 0) done.push_back(q->id);
      continue;
    }
    emit(s, {t}, std::move(lps));
  }
  std::lock_guard<std::mutex> l(mu);
  st.generation_tokens += generated;
}

}  // namespace kiln
