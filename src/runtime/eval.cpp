#include "kiln/eval.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/json.h"

namespace kiln {

namespace {

// -log softmax(logits)[tok], in double (llama-perplexity sums in double too, over float
// exponentials).
double nll_of(const float* logits, int64_t vocab, int32_t tok) {
  double mx = logits[0];
  for (int64_t i = 1; i < vocab; ++i) mx = std::max<double>(mx, logits[i]);
  double sum = 0;
  for (int64_t i = 0; i < vocab; ++i) sum += std::exp(double(logits[i]) - mx);
  const double v = -(double(logits[tok]) - mx - std::log(sum));
  KILN_CHECK(std::isfinite(v), "eval: non-finite log-likelihood (the logits hold NaN or inf)");
  return v;
}

// Mean of 0/1 outcomes and the standard error of that mean (sample deviation / sqrt(n)), as
// lm-eval reports acc_stderr.
std::pair<double, double> mean_stderr(const std::vector<double>& x) {
  const double n = double(x.size());
  double m = 0;
  for (double v : x) m += v;
  m /= n;
  if (x.size() < 2) return {m, 0.0};
  double ss = 0;
  for (double v : x) ss += (v - m) * (v - m);
  return {m, std::sqrt(ss / (n - 1)) / std::sqrt(n)};
}

}  // namespace

PerplexityResult perplexity(Engine& e, std::span<const int32_t> tokens,
                            const PerplexityOptions& opt,
                            const std::function<void(int64_t, int64_t)>& on_chunk) {
  const int64_t ctx = opt.ctx, n = int64_t(tokens.size());
  KILN_CHECK(ctx >= 4, "perplexity: --ctx must be at least 4 (got ", ctx, ")");
  KILN_CHECK(opt.batch >= 1, "perplexity: --batch must be at least 1 (got ", opt.batch, ")");
  KILN_CHECK(ctx <= e.info().max_seq_len, "perplexity: --ctx ", ctx,
             " is longer than the engine's max_seq_len (", e.info().max_seq_len, ")");
  KILN_CHECK(n >= 2 * ctx, "perplexity: the text has ", n, " tokens; a context of ", ctx,
             " needs at least ", 2 * ctx, " (llama-perplexity's rule)");
  int64_t chunks = n / ctx;
  if (opt.chunks > 0) chunks = std::min(chunks, opt.chunks);
  const int64_t V = e.info().vocab_size, first = ctx / 2;
  PerplexityResult r;
  double nll = 0, nll2 = 0;
  std::vector<int32_t> chunk(static_cast<size_t>(ctx));
  for (int64_t c = 0; c < chunks; ++c) {
    std::copy_n(tokens.begin() + c * ctx, ctx, chunk.begin());
    if (opt.bos >= 0) chunk[0] = opt.bos;
    Session s = e.session(ctx);
    for (int64_t b = 0; b < ctx; b += opt.batch) {
      const int64_t m = std::min(opt.batch, ctx - b);
      const std::vector<float> lg =
          s.forward(std::span<const int32_t>(chunk.data() + b, size_t(m)), true);
      // Position p's logits score token p + 1, for p in [first, ctx - 1).
      for (int64_t p = std::max(b, first); p < std::min(b + m, ctx - 1); ++p) {
        const double v = nll_of(lg.data() + (p - b) * V, V, chunk[size_t(p + 1)]);
        nll += v;
        nll2 += v * v;
        ++r.scored;
      }
    }
    ++r.chunks;
    r.running.push_back(std::exp(nll / double(r.scored)));
    if (on_chunk) on_chunk(c + 1, chunks);
  }
  const double cnt = double(r.scored), mean = nll / cnt, var = nll2 / cnt - mean * mean;
  r.ppl = std::exp(mean);
  r.ppl_stderr = var > 0 && cnt > 1 ? std::sqrt(var / (cnt - 1)) * r.ppl : 0.0;
  return r;
}

std::vector<ChoiceDoc> read_choice_docs(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  KILN_CHECK(in, path, ": cannot open");
  std::vector<ChoiceDoc> docs;
  std::string line;
  for (int64_t ln = 1; std::getline(in, line); ++ln) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = cat(path, ":", ln);
    const nlohmann::json j = parse_json(line, where);
    KILN_CHECK(j.is_object(), where, ": not a JSON object");
    KILN_CHECK(j.contains("context") && j["context"].is_string(), where,
               ": \"context\" must be a string");
    KILN_CHECK(j.contains("choices") && j["choices"].is_array() && j["choices"].size() >= 2, where,
               ": \"choices\" must be an array of at least 2 strings");
    ChoiceDoc d;
    d.context = j["context"].get<std::string>();
    for (const auto& c : j["choices"]) {
      KILN_CHECK(c.is_string() && !c.get_ref<const std::string&>().empty(), where,
                 ": \"choices\" must hold non-empty strings");
      d.choices.push_back(c.get<std::string>());
    }
    KILN_CHECK(j.contains("gold") && j["gold"].is_number_integer() &&
                   j["gold"].get<int64_t>() >= 0 &&
                   j["gold"].get<int64_t>() < int64_t(d.choices.size()),
               where, ": \"gold\" must be the index of one of the ", d.choices.size(), " choices");
    d.gold = j["gold"].get<int64_t>();
    docs.push_back(std::move(d));
  }
  KILN_CHECK(!docs.empty(), path, ": no documents");
  return docs;
}

TaskResult evaluate_choices(Engine& e, std::span<const ChoiceDoc> docs,
                            const std::function<std::vector<int32_t>(const std::string&)>& encode,
                            int32_t bos, int32_t empty_prefix,
                            const std::function<void(int64_t, int64_t)>& on_doc) {
  const int64_t V = e.info().vocab_size, max_len = e.info().max_seq_len;
  TaskResult r;
  std::vector<double> acc, acc_norm;
  for (size_t i = 0; i < docs.size(); ++i) {
    const ChoiceDoc& d = docs[i];
    double best = -INFINITY, best_norm = -INFINITY;
    int64_t pick = -1, pick_norm = -1;
    std::vector<double>& lls = r.loglikelihoods.emplace_back();
    for (size_t k = 0; k < d.choices.size(); ++k) {
      // lm-eval's _encode_pair: the context's trailing whitespace belongs to the continuation.
      std::string context = d.context, cont = d.choices[k];
      const size_t keep = context.find_last_not_of(" \t\n\r\f\v");
      const size_t cut = keep == std::string::npos ? 0 : keep + 1;
      cont = context.substr(cut) + cont;
      context.resize(cut);
      std::vector<int32_t> ctx_ids = encode(context), whole = encode(context + cont);
      KILN_CHECK(whole.size() > ctx_ids.size(), "task doc ", i, " choice ", k,
                 ": the choice adds no tokens to the context");
      // As lm-eval: the context's own tokens, then the whole's tokens beyond their count.
      std::vector<int32_t> seq;
      if (bos >= 0) seq.push_back(bos);
      if (seq.empty() && ctx_ids.empty()) seq.push_back(empty_prefix);
      seq.insert(seq.end(), ctx_ids.begin(), ctx_ids.end());
      const int64_t cont_start = int64_t(seq.size());
      seq.insert(seq.end(), whole.begin() + int64_t(ctx_ids.size()), whole.end());
      KILN_CHECK(int64_t(seq.size()) <= max_len, "task doc ", i, " choice ", k, ": ", seq.size(),
                 " tokens is longer than the engine's max_seq_len (", max_len, ")");
      Session s = e.session(int64_t(seq.size()));
      const std::vector<float> lg = s.forward(seq, true);
      double ll = 0;
      for (int64_t p = cont_start; p < int64_t(seq.size()); ++p)
        ll -= nll_of(lg.data() + (p - 1) * V, V, seq[size_t(p)]);
      // acc_norm divides by the choice's length in characters (code points, as Python's len).
      int64_t chars = 0;
      for (unsigned char ch : d.choices[k]) chars += (ch & 0xC0) != 0x80;
      const double norm = ll / double(std::max<int64_t>(chars, 1));
      lls.push_back(ll);
      if (ll > best) best = ll, pick = int64_t(k);
      if (norm > best_norm) best_norm = norm, pick_norm = int64_t(k);
    }
    acc.push_back(pick == d.gold ? 1.0 : 0.0);
    acc_norm.push_back(pick_norm == d.gold ? 1.0 : 0.0);
    if (on_doc) on_doc(int64_t(i) + 1, int64_t(docs.size()));
  }
  r.docs = int64_t(docs.size());
  std::tie(r.acc, r.acc_stderr) = mean_stderr(acc);
  std::tie(r.acc_norm, r.acc_norm_stderr) = mean_stderr(acc_norm);
  return r;
}

}  // namespace kiln
