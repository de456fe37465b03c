// kiln eval's library side: perplexity with llama-perplexity's convention and lm-eval-style
// multiple-choice scoring, each checked against the same quantities computed here from the
// engine's plain all-position logits.
#include <cmath>
#include <random>

#include "kiln/eval.h"
#include "test_util.h"

namespace kiln::test {
namespace {

// log softmax(row)[tok] in double.
double log_prob(const float* row, int64_t V, int32_t tok) {
  double mx = row[0], sum = 0;
  for (int64_t i = 1; i < V; ++i) mx = std::max<double>(mx, row[i]);
  for (int64_t i = 0; i < V; ++i) sum += std::exp(double(row[i]) - mx);
  return double(row[tok]) - mx - std::log(sum);
}

Engine llama_f32() {
  BuildConfig bc;
  bc.dtype = "f32";
  Engine e = Engine::build(hf("llama"), bc);
  e.start({.device = "cpu"});
  return e;
}

TEST(EvalPerplexity, ChunksScoreTheSecondHalfAfterBos) {
  Engine e = llama_f32();
  const int64_t V = e.info().vocab_size, ctx = 16;
  std::mt19937 rng(7);
  std::vector<int32_t> tokens(3 * ctx + 5);  // 3 whole chunks and a tail that is not scored
  for (auto& t : tokens) t = int32_t(rng() % uint32_t(V));
  const int32_t bos = 1;
  // By hand: each chunk with its first token replaced by BOS, one forward, positions
  // [ctx / 2, ctx - 1) scoring the token after them.
  double nll = 0, nll2 = 0;
  int64_t count = 0;
  for (int64_t c = 0; c < 3; ++c) {
    std::vector<int32_t> chunk(tokens.begin() + c * ctx, tokens.begin() + (c + 1) * ctx);
    chunk[0] = bos;
    const std::vector<float> lg = e.logits(chunk);
    for (int64_t p = ctx / 2; p < ctx - 1; ++p) {
      const double v = -log_prob(lg.data() + p * V, V, chunk[size_t(p + 1)]);
      nll += v, nll2 += v * v, ++count;
    }
  }
  const double mean = nll / double(count), want = std::exp(mean);
  const double want_err =
      std::sqrt((nll2 / double(count) - mean * mean) / double(count - 1)) * want;
  for (int64_t batch : {16, 5, 1}) {  // how a chunk is fed must not change the result
    PerplexityOptions opt;
    opt.ctx = ctx, opt.batch = batch, opt.bos = bos;
    const PerplexityResult r = perplexity(e, tokens, opt);
    EXPECT_EQ(r.chunks, 3);
    EXPECT_EQ(r.scored, 3 * (ctx - 1 - ctx / 2));
    EXPECT_NEAR(r.ppl, want, 1e-6 * want) << "batch " << batch;
    EXPECT_NEAR(r.ppl_stderr, want_err, 1e-5 * want_err) << "batch " << batch;
    ASSERT_EQ(r.running.size(), 3u);
    EXPECT_DOUBLE_EQ(r.running.back(), r.ppl);
  }
  PerplexityOptions two;
  two.ctx = ctx, two.chunks = 2;
  EXPECT_EQ(perplexity(e, tokens, two).chunks, 2);

  // Refusals, by name.
  PerplexityOptions opt;
  opt.ctx = ctx;
  std::string err = error_of(
      [&] { perplexity(e, std::span<const int32_t>(tokens.data(), size_t(2 * ctx - 1)), opt); });
  EXPECT_NE(err.find("needs at least 32"), std::string::npos) << err;
  opt.ctx = e.info().max_seq_len + 1;
  err = error_of([&] { perplexity(e, tokens, opt); });
  EXPECT_NE(err.find("longer than the engine's max_seq_len"), std::string::npos) << err;
}

TEST(EvalTask, ReadsDocsAndNamesBadLines) {
  TempDir tmp;
  write_text(tmp / "ok.jsonl",
             "{\"context\": \"a b\", \"choices\": [\" c\", \" d\"], \"gold\": 1}\n\n"
             "{\"context\": \"\", \"choices\": [\"x\", \"y\", \"z\"], \"gold\": 0}\n");
  const auto docs = read_choice_docs((tmp / "ok.jsonl").string());
  ASSERT_EQ(docs.size(), 2u);
  EXPECT_EQ(docs[0].choices[1], " d");
  EXPECT_EQ(docs[0].gold, 1);
  EXPECT_EQ(docs[1].choices.size(), 3u);
  for (const auto& [line, what] : std::vector<std::pair<std::string, std::string>>{
           {"{\"context\": 1, \"choices\": [\"a\", \"b\"], \"gold\": 0}", "\"context\" must be"},
           {"{\"context\": \"\", \"choices\": [\"a\"], \"gold\": 0}", "at least 2 strings"},
           {"{\"context\": \"\", \"choices\": [\"a\", \"b\"], \"gold\": 2}", "\"gold\" must be"},
           {"{\"context\": \"\", \"choices\": [\"a\", \"\"], \"gold\": 0}", "non-empty strings"},
           {"{\"context\": \"\"", "bad.jsonl:2"}}) {
    write_text(tmp / "bad.jsonl",
               "{\"context\": \"a\", \"choices\": [\"b\", \"c\"], \"gold\": 0}\n" + line + "\n");
    const std::string err = error_of([&] { read_choice_docs((tmp / "bad.jsonl").string()); });
    EXPECT_NE(err.find(what), std::string::npos) << line << ": " << err;
    EXPECT_NE(err.find("bad.jsonl:2"), std::string::npos) << err;
  }
  write_text(tmp / "empty.jsonl", "\n");
  EXPECT_NE(
      error_of([&] { read_choice_docs((tmp / "empty.jsonl").string()); }).find("no documents"),
      std::string::npos);
}

TEST(EvalTask, ScoresEachChoiceAfterItsContext) {
  Engine e = llama_f32();
  const int64_t V = e.info().vocab_size;
  // A byte-per-token encoder (ids are byte values): the context's tokens are a prefix of the
  // whole's, so each choice's log-likelihood can be checked by hand.
  const auto encode = [](const std::string& s) {
    std::vector<int32_t> ids;
    for (unsigned char c : s) ids.push_back(int32_t(c));
    return ids;
  };
  const int32_t bos = 1;
  std::vector<ChoiceDoc> docs = {
      {"The cat ", {"sat", "ran far", "is"}, 0}, {"x", {"yz", "zz"}, 1}, {"", {"ab", "b"}, 0}};
  int64_t acc = 0, acc_norm = 0;
  std::vector<std::vector<double>> want;
  for (const ChoiceDoc& d : docs) {
    want.emplace_back();
    double best = -1e300, best_norm = -1e300;
    int64_t pick = -1, pick_norm = -1;
    for (size_t k = 0; k < d.choices.size(); ++k) {
      // lm-eval: the context's trailing space moves onto the continuation.
      std::string ctx = d.context, cont = d.choices[k];
      while (!ctx.empty() && ctx.back() == ' ') cont.insert(cont.begin(), ' '), ctx.pop_back();
      std::vector<int32_t> seq = {bos};
      for (int32_t t : encode(ctx)) seq.push_back(t);
      const size_t start = seq.size();
      for (int32_t t : encode(cont)) seq.push_back(t);
      const std::vector<float> lg = e.logits(seq);
      double ll = 0;
      for (size_t p = start; p < seq.size(); ++p)
        ll += log_prob(lg.data() + (p - 1) * V, V, seq[p]);
      want.back().push_back(ll);
      const double norm = ll / double(d.choices[k].size());
      if (ll > best) best = ll, pick = int64_t(k);
      if (norm > best_norm) best_norm = norm, pick_norm = int64_t(k);
    }
    acc += pick == d.gold, acc_norm += pick_norm == d.gold;
  }
  const TaskResult r = evaluate_choices(e, docs, encode, bos, 2);
  EXPECT_EQ(r.docs, 3);
  ASSERT_EQ(r.loglikelihoods.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i)
    for (size_t k = 0; k < want[i].size(); ++k)
      EXPECT_NEAR(r.loglikelihoods[i][k], want[i][k], 1e-9 * std::fabs(want[i][k]))
          << "doc " << i << " choice " << k;
  EXPECT_DOUBLE_EQ(r.acc, double(acc) / 3);
  EXPECT_DOUBLE_EQ(r.acc_norm, double(acc_norm) / 3);
  std::printf("[eval task] acc %.3f acc_norm %.3f (by hand %lld, %lld of 3)\n", r.acc, r.acc_norm,
              (long long)acc, (long long)acc_norm);
}

}  // namespace
}  // namespace kiln::test
