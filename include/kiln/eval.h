// Quality evaluation on an engine: perplexity with llama.cpp's llama-perplexity convention, and
// multiple-choice log-likelihood tasks in lm-evaluation-harness's shape.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "kiln/kiln.h"

namespace kiln {

struct PerplexityOptions {
  int64_t ctx = 512;    // tokens per chunk (llama-perplexity -c)
  int64_t batch = 512;  // tokens per forward call within a chunk (llama-perplexity -b)
  int64_t chunks = 0;   // at most this many chunks (0: all)
  // The token each chunk starts with instead of its own (llama-perplexity puts BOS there when
  // the vocab adds one); -1: none.
  int32_t bos = -1;
};

struct PerplexityResult {
  double ppl = 0, ppl_stderr = 0;  // exp(mean NLL) and its standard error, as llama-perplexity
  int64_t chunks = 0, scored = 0;  // tokens scored: (ctx - 1 - ctx / 2) per chunk
  std::vector<double> running;     // PPL after each chunk (llama-perplexity's [1]x,[2]y,...)
};

// Perplexity of `tokens` (the whole text, tokenized with the vocab's BOS when it adds one):
// split into chunks of opt.ctx tokens, the first of each replaced by opt.bos, and the second
// half of each chunk scored (each token's NLL under the logits of the position before it).
// Throws kiln::Error when the text has fewer than 2 * ctx tokens (as llama-perplexity) or when
// ctx exceeds the engine's max_seq_len. on_chunk(i, n) reports progress.
PerplexityResult perplexity(Engine& e, std::span<const int32_t> tokens,
                            const PerplexityOptions& opt,
                            const std::function<void(int64_t, int64_t)>& on_chunk = {});

// One multiple-choice question: the log-likelihood of each choice after the context decides.
struct ChoiceDoc {
  std::string context;
  std::vector<std::string> choices;
  int64_t gold = 0;
};

struct TaskResult {
  int64_t docs = 0;
  double acc = 0, acc_stderr = 0;            // argmax of the summed log-likelihood
  double acc_norm = 0, acc_norm_stderr = 0;  // argmax of it divided by the choice's length in
                                             // characters (lm-eval's acc_norm)
  std::vector<std::vector<double>> loglikelihoods;  // per doc, per choice
};

// Reads a JSONL file of {"context": str, "choices": [str, ...], "gold": int} lines (blank lines
// skipped). Throws kiln::Error naming the file, line and field for anything else.
std::vector<ChoiceDoc> read_choice_docs(const std::string& path);

// Scores every doc as lm-eval's HF backend does: context and continuation are encoded together
// and apart by `encode` (text -> ids, no special tokens; trailing spaces of the context move
// onto the continuation), the continuation's tokens are those of the whole beyond the context's,
// and each is scored under the logits of the position before it. `bos` (>= 0: the tokenizer adds
// one) starts every sequence; without it an empty context is replaced by `empty_prefix` (lm-eval
// uses the EOS token). on_doc(i, n) reports progress.
TaskResult evaluate_choices(Engine& e, std::span<const ChoiceDoc> docs,
                            const std::function<std::vector<int32_t>(const std::string&)>& encode,
                            int32_t bos, int32_t empty_prefix,
                            const std::function<void(int64_t, int64_t)>& on_doc = {});

}  // namespace kiln
