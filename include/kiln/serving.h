// kiln serving runtime: continuous batching over one Engine.
//
//   kiln::Engine engine = kiln::Engine::open("model.engine");
//   kiln::ServeConfig sc;                        // token budget, sequences per step, prefix cache
//   kiln::Scheduler sched(engine, sc);           // starts the engine thread
//   kiln::GenerationParams gp;  gp.max_tokens = 64;
//   uint64_t id = sched.submit(prompt_ids, gp, [](const kiln::RequestOutput& o) { ... });
//   sched.cancel(id);                            // any thread; frees its KV blocks at once
//
// One engine thread drives the steps: each step is one forward over a mixed batch (prefill
// chunks and one-token decodes of many requests), sized by a per-step token budget. Requests join
// and leave at every step; admission is by free KV blocks; when blocks run out the newest running
// sequence is preempted and later recomputed (never an out-of-memory error); full blocks of
// prompts are hashed and shared between requests (prefix caching, LRU eviction). submit() and
// cancel() are thread-safe; callbacks run on the engine thread and must return quickly.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "kiln/error.h"
#include "kiln/kiln.h"

namespace kiln {

// How a sequence ended. None: still running.
enum class FinishReason { None, Stop, Length, Abort };
const char* finish_reason_name(FinishReason r);  // "stop", "length", "abort" ("" for None)

// Per-request generation settings (OpenAI / vLLM names). Unset optionals take
// generation_config.json's defaults (greedy when it has none).
struct GenerationParams {
  std::optional<float> temperature;         // >= 0; 0: greedy
  std::optional<int> top_k;                 // 0 or -1: off
  std::optional<float> top_p;               // (0, 1]
  std::optional<float> min_p;               // [0, 1]; 0: off
  std::optional<uint64_t> seed;             // unset: a random seed per request
  float presence_penalty = 0.0f;            // [-2, 2]
  float frequency_penalty = 0.0f;           // [-2, 2]
  std::optional<float> repetition_penalty;  // > 0; 1: off; unset: generation_config.json's
  std::vector<std::pair<int32_t, float>> logit_bias;  // token id -> bias in [-100, 100]
  std::vector<std::string> stop;        // stop strings, matched across token boundaries
  std::vector<int32_t> stop_token_ids;  // besides the model's eos ids (unless ignore_eos)
  bool ignore_eos = false;
  bool include_stop_str_in_output = false;
  int64_t min_tokens = 0;              // eos and stop ids are masked until this many
  std::optional<int64_t> max_tokens;   // unset: up to the engine's max_seq_len
  int n = 1;                           // completions of the prompt; i samples with seed + i
  std::optional<int> logprobs;         // per generated token: its logprob and this many top
  std::optional<int> prompt_logprobs;  // per prompt token (from the 2nd): same
  bool skip_special_tokens = true;     // in the detokenized text
  bool detokenize = true;              // produce text (needs the engine's tokenizer)

  // Throws kiln::Error with a message naming the field when a value is out of range.
  void validate(int64_t vocab_size) const;
};

// One token's log-probability, with the most likely alternatives at that position.
struct TokenLogprob {
  int32_t id = 0;
  float logprob = 0.0f;
  std::vector<std::pair<int32_t, float>> top;  // (id, logprob), most likely first
};

// What one engine step produced for one completion of a request. Deltas: concatenating every
// event's token_ids / text gives the whole completion.
struct RequestOutput {
  uint64_t request_id = 0;
  int index = 0;                       // which of the request's n completions
  std::vector<int32_t> token_ids;      // new tokens
  std::string text;                    // new text (complete UTF-8; stop strings cut)
  std::vector<TokenLogprob> logprobs;  // for token_ids, when asked
  // First event of index 0 only, when prompt_logprobs was asked: one entry per prompt token,
  // the first without a value (has_value false).
  std::vector<std::optional<TokenLogprob>> prompt_logprobs;
  FinishReason finish = FinishReason::None;
  std::string stop_reason;  // the stop string or token that ended it, if any
  int64_t prompt_tokens = 0;
  int64_t cached_tokens = 0;      // prompt tokens served from the prefix cache
  int64_t completion_tokens = 0;  // generated so far by this completion
  bool first = false;             // the first event of this completion (TTFT)
  std::string error;              // why an aborted completion failed ("" when cancelled)
};

// What one engine step ran (ServeConfig::on_step): tracing and benchmarks.
struct StepInfo {
  int64_t decodes = 0;         // one-token decode rows
  int64_t prefill_seqs = 0;    // prompt chunks (or recomputation after preemption)
  int64_t prefill_tokens = 0;  // rows of those chunks
  double seconds = 0;          // wall time of the step: plan, forward, sampling, outputs
};

struct ServeConfig {
  RuntimeConfig runtime;
  int64_t max_num_seqs = 0;    // sequences per step; 0: 256 on a GPU, 16 on the CPU
  int64_t max_num_tokens = 0;  // tokens per step (the chunked-prefill budget); 0: 8192 / 2048
  bool prefix_cache = true;
  int64_t max_queue = 4096;  // waiting requests before submit() refuses (QueueFull)
  // Called on the engine thread after every step that ran a forward; keep it short.
  std::function<void(const StepInfo&)> on_step;

  // `runtime` with this config's step limits: what to start the engine with, since a Scheduler
  // may narrow the limits of an engine started earlier but never widen them.
  RuntimeConfig engine_runtime() const {
    RuntimeConfig rc = runtime;
    if (max_num_seqs) rc.max_num_seqs = max_num_seqs;
    if (max_num_tokens) rc.max_num_tokens = max_num_tokens;
    return rc;
  }
};

// Counters and gauges for /metrics.
struct SchedulerStats {
  int64_t running = 0, waiting = 0;
  int64_t kv_blocks_total = 0, kv_blocks_used = 0;
  int64_t prefix_queries = 0, prefix_hits = 0;  // prompt tokens looked up / found cached
  int64_t prompt_tokens = 0, generation_tokens = 0;
  int64_t preemptions = 0, steps = 0;
  int64_t requests_finished = 0;
};

// submit() when the waiting queue is at max_queue.
class QueueFull : public Error {
 public:
  using Error::Error;
};

class Scheduler {
 public:
  using Callback = std::function<void(const RequestOutput&)>;
  // Starts `engine` (if not started) with cfg.runtime and the engine thread. The engine must
  // outlive the scheduler and must not be used by others meanwhile.
  Scheduler(Engine& engine, const ServeConfig& cfg = {});
  ~Scheduler();  // aborts what is left and joins the engine thread
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Queues a request; returns its id. Throws kiln::Error at once for invalid params, an empty
  // prompt, a token id outside the vocabulary or prompt + max_tokens beyond max_seq_len, and
  // QueueFull when max_queue requests wait. `cb` gets every event, the last with a finish reason.
  uint64_t submit(std::vector<int32_t> prompt, const GenerationParams& params, Callback cb);
  // Ends the request (finish reason abort) and frees its blocks; unknown or finished ids are
  // ignored. Thread-safe; returns at once.
  void cancel(uint64_t request_id);
  // Stops taking requests (submit throws) and waits until every queued and running one is done.
  void drain();

  SchedulerStats stats() const;
  const ServeConfig& config() const;
  int64_t max_seq_len() const;
  Engine& engine();

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace kiln
