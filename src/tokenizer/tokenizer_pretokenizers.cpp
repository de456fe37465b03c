// Pre-tokenizers of tokenizer.json (split from tokenizer_text.cpp: normalizers, UTF-8 and regex
// helpers stay there).
#include <utf8proc.h>

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/tokenizer_impl.h"

namespace kiln::tok {

using json = nlohmann::json;

// ---- Pre-tokenizers ----------------------------------------------------------------------------

namespace {

SplitBehavior parse_behavior(const json& j, const std::string& where, const std::string& name) {
  std::string b = json_string(j, name);
  if (b == "Removed") return SplitBehavior::Removed;
  if (b == "Isolated") return SplitBehavior::Isolated;
  if (b == "MergedWithPrevious") return SplitBehavior::MergedWithPrevious;
  if (b == "MergedWithNext") return SplitBehavior::MergedWithNext;
  if (b == "Contiguous") return SplitBehavior::Contiguous;
  throw Error(cat(where, ": unknown split behavior \"", b, "\""));
}

// Matches of a per-char predicate: every matching char is its own match, as HF's
// `impl Pattern for F: Fn(char) -> bool`.
template <typename F>
void char_matches(std::string_view s, F&& f,
                  std::vector<std::tuple<uint32_t, uint32_t, bool>>& out) {
  out.clear();
  auto n = static_cast<uint32_t>(s.size());
  if (n == 0) {
    out.emplace_back(0, 0, false);
    return;
  }
  uint32_t prev = 0;
  for (size_t i = 0; i < s.size();) {
    size_t b = i;
    uint32_t cp = next_cp(s, i);
    if (f(cp)) {
      if (prev != b) out.emplace_back(prev, static_cast<uint32_t>(b), false);
      out.emplace_back(static_cast<uint32_t>(b), static_cast<uint32_t>(i), true);
      prev = static_cast<uint32_t>(i);
    }
  }
  if (prev != n) out.emplace_back(prev, n, false);
}

std::string_view text_of(const Work& w, const Piece& p) {
  return std::string_view(w.buf).substr(p.off, p.len);
}

class SplitPre : public PreTokenizer {
 public:
  SplitPre(Pattern p, SplitBehavior b, bool invert)
      : pattern_(std::move(p)), behavior_(b), invert_(invert) {}
  void run(Work& w) const override {
    w.b.clear();
    for (const Piece& p : w.a) {
      pattern_.find_matches(text_of(w, p), w.matches);
      if (invert_)
        for (auto& m : w.matches) std::get<2>(m) = !std::get<2>(m);
      split_piece(p, w.matches, behavior_, w.b);
    }
    w.a.swap(w.b);
  }

 private:
  Pattern pattern_;
  SplitBehavior behavior_;
  bool invert_;
};

template <typename F>
class CharSplitPre : public PreTokenizer {
 public:
  CharSplitPre(F f, SplitBehavior b) : f_(std::move(f)), behavior_(b) {}
  void run(Work& w) const override {
    w.b.clear();
    for (const Piece& p : w.a) {
      char_matches(text_of(w, p), f_, w.matches);
      split_piece(p, w.matches, behavior_, w.b);
    }
    w.a.swap(w.b);
  }

 private:
  F f_;
  SplitBehavior behavior_;
};

template <typename F>
std::unique_ptr<PreTokenizer> char_split(F f, SplitBehavior b) {
  return std::make_unique<CharSplitPre<F>>(std::move(f), b);
}

// Whitespace: keeps runs of word chars and runs of other non-space chars (HF's \w+|[^\w\s]+).
class WhitespacePre : public PreTokenizer {
 public:
  void run(Work& w) const override {
    w.b.clear();
    for (const Piece& p : w.a) {
      std::string_view s = text_of(w, p);
      int cur = 0;  // 0 none, 1 word, 2 other
      size_t start = 0;
      for (size_t i = 0; i < s.size();) {
        size_t b = i;
        uint32_t cp = next_cp(s, i);
        int k = is_whitespace(cp) ? 0 : is_word_char(cp) ? 1 : 2;
        if (k != cur) {
          if (cur)
            w.b.push_back(
                Piece{p.off + uint32_t(start), uint32_t(b - start), p.orig0 && start == 0});
          cur = k;
          start = b;
        }
      }
      if (cur)
        w.b.push_back(
            Piece{p.off + uint32_t(start), uint32_t(s.size() - start), p.orig0 && start == 0});
    }
    w.a.swap(w.b);
  }
};

const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

class ByteLevelPre : public PreTokenizer {
 public:
  ByteLevelPre(bool add_prefix_space, bool use_regex, const std::string& where)
      : add_prefix_space_(add_prefix_space) {
    if (use_regex) regex_.regex = std::make_unique<Regex>(kGpt2Pattern, where);
  }
  void set_raw() { map_bytes_ = false; }
  void run(Work& w) const override {
    if (add_prefix_space_) {
      for (Piece& p : w.a) {
        if (p.len > 0 && w.buf[p.off] == ' ') continue;
        auto off = static_cast<uint32_t>(w.buf.size());
        w.buf += ' ';
        w.buf.append(w.buf, p.off, p.len);
        p = Piece{off, p.len + 1, p.orig0};
      }
    }
    if (regex_.regex) {
      w.b.clear();
      for (const Piece& p : w.a) {
        regex_.find_matches(text_of(w, p), w.matches);
        split_piece(p, w.matches, SplitBehavior::Isolated, w.b);
      }
      w.a.swap(w.b);
    }
    if (map_bytes_) {
      const auto& table = bytes_to_chars();
      for (Piece& p : w.a) {
        auto off = static_cast<uint32_t>(w.buf.size());
        for (uint32_t i = 0; i < p.len; ++i)
          append_utf8(w.buf, table[static_cast<unsigned char>(w.buf[p.off + i])]);
        p = Piece{off, static_cast<uint32_t>(w.buf.size()) - off, p.orig0};
      }
    }
  }

 private:
  bool add_prefix_space_;
  bool map_bytes_ = true;
  Pattern regex_;
};

enum class PrependScheme { Always, First, Never };

class MetaspacePre : public PreTokenizer {
 public:
  MetaspacePre(uint32_t replacement, PrependScheme scheme, bool split)
      : scheme_(scheme), split_(split), repl_cp_(replacement) {
    append_utf8(repl_, replacement);
  }
  void run(Work& w) const override {
    w.b.clear();
    for (const Piece& p : w.a) {
      std::string_view s = text_of(w, p);
      std::string& t = w.tmp;
      t.clear();
      for (char c : s) {
        if (c == ' ')
          t += repl_;
        else
          t += c;
      }
      bool starts = t.compare(0, repl_.size(), repl_) == 0;
      if (!starts &&
          (scheme_ == PrependScheme::Always || (scheme_ == PrependScheme::First && p.orig0)))
        t.insert(0, repl_);
      Piece np{static_cast<uint32_t>(w.buf.size()), static_cast<uint32_t>(t.size()), p.orig0};
      w.buf += t;
      if (split_) {
        char_matches(
            text_of(w, np), [this](uint32_t cp) { return cp == repl_cp_; }, w.matches);
        split_piece(np, w.matches, SplitBehavior::MergedWithNext, w.b);
      } else if (np.len) {
        w.b.push_back(np);
      }
    }
    w.a.swap(w.b);
  }

 private:
  PrependScheme scheme_;
  bool split_;
  uint32_t repl_cp_;
  std::string repl_;
};

// Digits: isolates each digit, or groups runs of digits.
class DigitsPre : public PreTokenizer {
 public:
  explicit DigitsPre(bool individual) : individual_(individual) {}
  void run(Work& w) const override {
    w.b.clear();
    for (const Piece& p : w.a) {
      char_matches(text_of(w, p), is_numeric, w.matches);
      split_piece(p, w.matches, individual_ ? SplitBehavior::Isolated : SplitBehavior::Contiguous,
                  w.b);
    }
    w.a.swap(w.b);
  }

 private:
  bool individual_;
};

class PreSequence : public PreTokenizer {
 public:
  explicit PreSequence(std::vector<std::unique_ptr<PreTokenizer>> v) : v_(std::move(v)) {}
  void run(Work& w) const override {
    for (auto& p : v_) p->run(w);
  }
  PreTokenizer* last() const { return v_.empty() ? nullptr : v_.back().get(); }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> v_;
};

uint32_t single_char(const std::string& s, const std::string& where, const char* field) {
  size_t i = 0;
  KILN_CHECK(!s.empty(), where, ": ", field, " must be one character");
  uint32_t cp = next_cp(s, i);
  KILN_CHECK(i == s.size(), where, ": ", field, " must be one character, got \"", s, "\"");
  return cp;
}

}  // namespace

std::unique_ptr<PreTokenizer> make_pre_tokenizer(const json& j, const std::string& where,
                                                 const std::string& path) {
  if (j.is_null()) return nullptr;
  std::string t = type_of(j, where, "pre_tokenizer");
  const JsonObj o{j, cat(where, ": ", path)};
  if (t == "Split") {
    return std::make_unique<SplitPre>(make_pattern(o.at("pattern"), where, o.field("pattern")),
                                      parse_behavior(o.at("behavior"), where, o.field("behavior")),
                                      o.boolean("invert", false));
  }
  if (t == "ByteLevel")
    return std::make_unique<ByteLevelPre>(o.boolean("add_prefix_space", true),
                                          o.boolean("use_regex", true), where);
  if (t == "Metaspace") {
    std::string repl = o.str("replacement", "\u2581");
    PrependScheme scheme =
        o.boolean("add_prefix_space", true) ? PrependScheme::Always : PrependScheme::Never;
    if (o.find("prepend_scheme")) {
      std::string s = o.str("prepend_scheme");
      if (s == "always")
        scheme = PrependScheme::Always;
      else if (s == "first")
        scheme = PrependScheme::First;
      else if (s == "never")
        scheme = PrependScheme::Never;
      else
        throw Error(cat(where, ": unknown Metaspace prepend_scheme \"", s, "\""));
    }
    return std::make_unique<MetaspacePre>(single_char(repl, where, "Metaspace replacement"), scheme,
                                          o.boolean("split", true));
  }
  if (t == "Whitespace") return std::make_unique<WhitespacePre>();
  if (t == "WhitespaceSplit") return char_split(is_whitespace, SplitBehavior::Removed);
  if (t == "Punctuation") {
    SplitBehavior b = o.find("behavior")
                          ? parse_behavior(o.at("behavior"), where, o.field("behavior"))
                          : SplitBehavior::Isolated;
    return char_split(is_punctuation, b);
  }
  if (t == "CharDelimiterSplit") {
    uint32_t d = single_char(o.str("delimiter"), where, "delimiter");
    return char_split([d](uint32_t cp) { return cp == d; }, SplitBehavior::Removed);
  }
  if (t == "Digits") return std::make_unique<DigitsPre>(o.boolean("individual_digits", false));
  if (t == "BertPreTokenizer") {
    std::vector<std::unique_ptr<PreTokenizer>> v;
    v.push_back(char_split(is_whitespace, SplitBehavior::Removed));
    v.push_back(char_split(is_punctuation, SplitBehavior::Isolated));
    return std::make_unique<PreSequence>(std::move(v));
  }
  if (t == "Sequence") {
    std::vector<std::unique_ptr<PreTokenizer>> v;
    const json& list = json_array(o.at("pretokenizers"), o.field("pretokenizers"));
    for (size_t i = 0; i < list.size(); ++i)
      if (auto q = make_pre_tokenizer(list[i], where, cat(path, ".pretokenizers[", i, "]")))
        v.push_back(std::move(q));
    return std::make_unique<PreSequence>(std::move(v));
  }
  throw Error(cat(where, ": unsupported pre_tokenizer type \"", t, "\""));
}

bool ends_with_byte_level(const json& j) {
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string()) return false;
  const std::string& t = j["type"].get_ref<const std::string&>();
  if (t == "ByteLevel") return true;
  if (t == "Sequence" && j.contains("pretokenizers") && j["pretokenizers"].is_array() &&
      !j["pretokenizers"].empty())
    return ends_with_byte_level(j["pretokenizers"].back());
  return false;
}

void set_raw_byte_level(PreTokenizer& p) {
  if (auto* b = dynamic_cast<ByteLevelPre*>(&p)) {
    b->set_raw();
  } else if (auto* s = dynamic_cast<PreSequence*>(&p)) {
    if (s->last()) set_raw_byte_level(*s->last());
  }
}

}  // namespace kiln::tok
