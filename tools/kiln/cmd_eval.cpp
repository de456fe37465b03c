// `kiln eval`: perplexity of a text (llama-perplexity's convention) and multiple-choice tasks in
// lm-evaluation-harness's shape, on any model kiln opens.
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>

#include "commands.h"
#include "core/error.h"
#include "kiln/eval.h"
#include "tokenizer/tokenizer.h"

namespace kiln::cli {

namespace {

struct EvalArgs {
  ModelArgs m;
  std::string perplexity, task;
  PerplexityOptions ppl;
  bool quiet = false;
};

// The id the tokenizer puts first when it adds special tokens, if it is its BOS.
int32_t added_bos(const Tokenizer& tk) {
  const auto bos = tk.bos_token_id();
  if (!bos) return -1;
  const std::vector<int32_t> with = tk.encode("a", true);
  return !with.empty() && with[0] == *bos ? *bos : -1;
}

void run_eval(EvalArgs& a) {
  KILN_CHECK(a.perplexity.empty() != a.task.empty(),
             "eval needs exactly one of --perplexity FILE or --task FILE.jsonl");
  Engine e = Engine::open(a.m.model, a.m.bc);
  start_engine(e, a.m.rc);
  KILN_CHECK(!e.tokenizer_dir().empty(), a.m.model, ": has no tokenizer; eval reads text");
  const Tokenizer tk = Tokenizer::from_dir(e.tokenizer_dir());
  const int32_t bos = added_bos(tk);
  if (!a.perplexity.empty()) {
    std::ifstream in(a.perplexity, std::ios::binary);
    KILN_CHECK(in, a.perplexity, ": cannot open");
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const std::vector<int32_t> ids = tk.encode(text, true);
    a.ppl.bos = bos;
    const PerplexityResult r = perplexity(e, ids, a.ppl, [&](int64_t i, int64_t n) {
      if (!a.quiet) std::fprintf(stderr, "\rchunk %lld/%lld", (long long)i, (long long)n);
    });
    if (!a.quiet) std::fprintf(stderr, "\n");
    if (!a.quiet) {
      for (size_t i = 0; i < r.running.size(); ++i)
        std::fprintf(stderr, "[%zu]%.4f,", i + 1, r.running[i]);
      std::fprintf(stderr, "\n");
    }
    std::printf("PPL = %.4f +/- %.5f\n", r.ppl, r.ppl_stderr);
    std::printf("(%s: %zu tokens; %lld chunks of %lld, %lld tokens scored; BOS %s)\n",
                a.perplexity.c_str(), ids.size(), (long long)r.chunks, (long long)a.ppl.ctx,
                (long long)r.scored, bos >= 0 ? "at each chunk's start" : "none");
    return;
  }
  const std::vector<ChoiceDoc> docs = read_choice_docs(a.task);
  const auto eos = tk.eos_token_id();
  const TaskResult r = evaluate_choices(
      e, docs, [&](const std::string& s) { return tk.encode(s, false); }, bos,
      eos ? *eos : (bos >= 0 ? bos : 0),
      [&](int64_t i, int64_t n) {
        if (!a.quiet && (i % 50 == 0 || i == n))
          std::fprintf(stderr, "\r%lld/%lld docs", (long long)i, (long long)n);
      });
  if (!a.quiet) std::fprintf(stderr, "\n");
  std::printf("acc = %.4f +/- %.4f | acc_norm = %.4f +/- %.4f (%lld docs, %s)\n", r.acc,
              r.acc_stderr, r.acc_norm, r.acc_norm_stderr, (long long)r.docs, a.task.c_str());
}

}  // namespace

void register_eval(CLI::App& app) {
  auto* c = app.add_subcommand(
      "eval", "Perplexity of a text (llama-perplexity's convention) or a multiple-choice task");
  static EvalArgs a;
  add_model_args(c, a.m);
  c->add_option("--perplexity", a.perplexity,
                "UTF-8 text file: PPL over chunks of --ctx tokens, each starting with BOS when "
                "the vocab adds one, the second half of each scored");
  c->add_option("--task", a.task,
                "JSONL of {\"context\", \"choices\", \"gold\"}: acc and acc_norm from each "
                "choice's log-likelihood (lm-eval's multiple_choice)");
  c->add_option("--ctx", a.ppl.ctx, "tokens per perplexity chunk");
  c->add_option("--batch", a.ppl.batch, "tokens per forward call within a chunk");
  c->add_option("--chunks", a.ppl.chunks, "at most this many chunks (0: all)")->check(at_least(0));
  c->add_flag("-q,--quiet", a.quiet, "no progress on stderr");
  c->callback([] { run_eval(a); });
}

}  // namespace kiln::cli
