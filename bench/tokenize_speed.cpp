// Single-thread encode throughput of kiln's tokenizer on ~1 MB of mixed English, code and Unicode
// text built deterministically (optionally seeded with the fixture cases' texts).
//
// usage: bench_tokenize_speed TOKENIZER_DIR [CASES_JSON] [--dump FILE] [--runs N]
// Prints two lines: "kiln whole: <MB/s> MB/s ..." (the text as one encode call) and
// "kiln paragraphs: <MB/s> MB/s ..." (one call per paragraph, split after each blank line, as a
// server sees many short prompts). --dump writes the text so another tokenizer can be timed on
// exactly the same input (bench/tokenizer_speed.sh).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "core/error.h"
#include "tokenizer/tokenizer.h"

namespace {

// Deterministic text: English-like prose, code and several scripts, ~1 MB.
std::string build_text(const std::vector<std::string>& seed_texts) {
  static const char* kWords[] = {
      "the",       "of",        "and",    "to",         "in",      "is",        "that",
      "for",       "it",        "as",     "was",        "with",    "be",        "by",
      "on",        "not",       "he",     "I",          "this",    "are",       "or",
      "his",       "from",      "at",     "which",      "but",     "have",      "an",
      "they",      "you",       "were",   "their",      "one",     "all",       "we",
      "can",       "her",       "has",    "there",      "been",    "if",        "more",
      "when",      "will",      "would",  "who",        "so",      "no",        "model",
      "tokenizer", "inference", "engine", "throughput", "latency", "benchmark", "Transformer",
      "attention", "don't",     "it's",   "we'll",      "they've", "I'm",       "New",
      "York",      "October",   "2024",   "3.14159",    "naïve",   "café",      "résumé",
      "Zürich",    "São",       "Paulo"};
  static const char* kCode[] = {
      "def forward(self, x):\n    h = self.norm(x)\n    return x + self.mlp(h)\n",
      "for (size_t i = 0; i < n; ++i) {\n  out[i] = a[i] * b[i] + c;\n}\n",
      "#include <vector>\n#include <string>\n\nint main(int argc, char** argv) {\n  return 0;\n}\n",
      "SELECT id, name FROM users WHERE created_at > '2024-01-01' ORDER BY id;\n",
      "const result = await fetch(`/api/v1/items?id=${id}`).then(r => r.json());\n",
      "    if err != nil {\n        return nil, fmt.Errorf(\"open %s: %w\", path, err)\n    }\n",
      "{\"name\": \"kiln\", \"version\": \"0.1.0\", \"tags\": [\"llm\", \"inference\"]}\n"};
  static const char* kUnicode[] = {"Le modèle de langage génère du texte à partir d'une invite. ",
                                   "Языковая модель генерирует текст по подсказке. ",
                                   "言語モデルはプロンプトからテキストを生成します。",
                                   "语言模型根据提示生成文本。",
                                   "언어 모델은 프롬프트에서 텍스트를 생성합니다. ",
                                   "Το γλωσσικό μοντέλο παράγει κείμενο. ",
                                   "نموذج اللغة يولد النص من الموجه. ",
                                   "भाषा मॉडल संकेत से पाठ उत्पन्न करता है। ",
                                   "Emoji: 😀🎉👍🏽🚀 ✅ ",
                                   "∑ x² ≤ ∞ → λ "};
  uint64_t state = 0x2545F4914F6CDD1DULL;
  auto next = [&state](uint64_t n) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state % n;
  };
  std::string text;
  for (const std::string& s : seed_texts) text += s + "\n";
  while (text.size() < 1000000) {
    uint64_t k = next(100);
    if (k < 70) {
      // A paragraph of prose.
      size_t words = 20 + next(80);
      for (size_t i = 0; i < words; ++i) {
        text += kWords[next(std::size(kWords))];
        text += i + 1 == words ? ".\n\n" : next(12) == 0 ? ", " : " ";
      }
    } else if (k < 85) {
      text += kCode[next(std::size(kCode))];
    } else {
      for (int i = 0; i < 3; ++i) text += kUnicode[next(std::size(kUnicode))];
      text += "\n";
    }
  }
  return text;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    std::string dir, cases, dump;
    int runs = 5;
    for (int i = 1; i < argc; ++i) {
      std::string a = argv[i];
      if (a == "--dump" && i + 1 < argc)
        dump = argv[++i];
      else if (a == "--runs" && i + 1 < argc)
        runs = std::max(1, std::atoi(argv[++i]));
      else if (dir.empty())
        dir = a;
      else
        cases = a;
    }
    if (dir.empty()) {
      std::fprintf(stderr, "usage: %s TOKENIZER_DIR [CASES_JSON] [--dump FILE] [--runs N]\n",
                   argv[0]);
      return 2;
    }
    std::vector<std::string> seed_texts;
    if (!cases.empty()) {
      std::ifstream f(cases);
      KILN_CHECK(f, cases, ": cannot open");
      auto j = nlohmann::json::parse(f);
      for (const auto& c : j.at("cases")) seed_texts.push_back(c.at("text").get<std::string>());
    }
    std::string text = build_text(seed_texts);
    if (!dump.empty()) {
      std::ofstream(dump, std::ios::binary) << text;
    }
    kiln::Tokenizer tk = kiln::Tokenizer::from_dir(dir);
    std::vector<std::string_view> paragraphs;
    for (size_t b = 0; b < text.size();) {
      size_t e = text.find("\n\n", b);
      e = e == std::string::npos ? text.size() : e + 2;
      paragraphs.push_back(std::string_view(text).substr(b, e - b));
      b = e;
    }
    auto timed = [&](auto&& body) {
      double best = 1e30;
      size_t tokens = 0;
      for (int r = 0; r < runs; ++r) {
        auto t0 = std::chrono::steady_clock::now();
        tokens = body();
        double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        best = std::min(best, dt);
      }
      return std::make_pair(best, tokens);
    };
    auto [whole, n_whole] = timed([&] { return tk.encode(text, false).size(); });
    auto [paras, n_paras] = timed([&] {
      size_t n = 0;
      for (std::string_view p : paragraphs) n += tk.encode(p, false).size();
      return n;
    });
    std::printf("kiln whole: %.2f MB/s (%zu tokens, %zu bytes, best of %d)\n",
                text.size() / whole / 1e6, n_whole, text.size(), runs);
    std::printf("kiln paragraphs: %.2f MB/s (%zu tokens, %zu paragraphs, best of %d)\n",
                text.size() / paras / 1e6, n_paras, paragraphs.size(), runs);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_tokenize_speed: error: %s\n", e.what());
    return 1;
  }
}
