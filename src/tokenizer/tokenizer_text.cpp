// Unicode helpers, the Oniguruma-compatible PCRE2 wrapper and normalizers (pre-tokenizers:
// tokenizer_pretokenizers.cpp).
#include <utf8proc.h>

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/tokenizer_impl.h"

namespace kiln::tok {

using json = nlohmann::json;

// ---- UTF-8 -------------------------------------------------------------------------------------

uint32_t next_cp(std::string_view s, size_t& i) {
  auto c = static_cast<unsigned char>(s[i]);
  if (c < 0x80) {
    ++i;
    return c;
  }
  size_t n = utf8_len(c);
  uint32_t cp = c & (n == 2 ? 0x1F : n == 3 ? 0x0F : 0x07);
  for (size_t k = 1; k < n && i + k < s.size(); ++k) cp = (cp << 6) | (s[i + k] & 0x3F);
  i += n;
  return cp;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

namespace {

// Length of the valid UTF-8 sequence at s[i], or -(length of the maximal invalid subpart), the
// unit Rust's from_utf8_lossy replaces by one U+FFFD.
int utf8_step(std::string_view s, size_t i) {
  auto b = [&](size_t k) { return static_cast<unsigned char>(s[i + k]); };
  unsigned char c = b(0);
  if (c < 0x80) return 1;
  size_t avail = s.size() - i;
  auto cont = [&](size_t k, unsigned char lo, unsigned char hi) {
    return k < avail && b(k) >= lo && b(k) <= hi;
  };
  if (c >= 0xC2 && c <= 0xDF) return cont(1, 0x80, 0xBF) ? 2 : -1;
  if (c >= 0xE0 && c <= 0xEF) {
    unsigned char lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
    if (!cont(1, lo, hi)) return -1;
    return cont(2, 0x80, 0xBF) ? 3 : -2;
  }
  if (c >= 0xF0 && c <= 0xF4) {
    unsigned char lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
    if (!cont(1, lo, hi)) return -1;
    if (!cont(2, 0x80, 0xBF)) return -2;
    return cont(3, 0x80, 0xBF) ? 4 : -3;
  }
  return -1;
}

}  // namespace

size_t find_invalid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    // Skip ASCII eight bytes at a time.
    while (i + 8 <= s.size()) {
      uint64_t w;
      std::memcpy(&w, s.data() + i, 8);
      if (w & 0x8080808080808080ULL) break;
      i += 8;
    }
    if (i >= s.size()) break;
    if (static_cast<unsigned char>(s[i]) < 0x80) {
      ++i;
      continue;
    }
    int n = utf8_step(s, i);
    if (n < 0) return i;
    i += n;
  }
  return std::string_view::npos;
}

std::string from_utf8_lossy(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    int n = utf8_step(s, i);
    if (n > 0) {
      out.append(s.data() + i, n);
      i += n;
    } else {
      out.append("\xEF\xBF\xBD");
      i += -n;
    }
  }
  return out;
}

bool is_whitespace(uint32_t cp) {
  if (cp < 0x80) return cp == ' ' || (cp >= 0x09 && cp <= 0x0D);
  switch (cp) {
    case 0x85:
    case 0xA0:
    case 0x1680:
    case 0x2028:
    case 0x2029:
    case 0x202F:
    case 0x205F:
    case 0x3000:
      return true;
    default:
      return cp >= 0x2000 && cp <= 0x200A;
  }
}

bool is_word_char(uint32_t cp) {
  if (cp < 0x80)
    return (cp >= '0' && cp <= '9') || (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z') ||
           cp == '_';
  int c = utf8proc_category(static_cast<utf8proc_int32_t>(cp));
  if (c >= UTF8PROC_CATEGORY_LU && c <= UTF8PROC_CATEGORY_ND) return true;  // L*, M*, Nd
  if (c == UTF8PROC_CATEGORY_NL || c == UTF8PROC_CATEGORY_PC) return true;
  if (cp == 0x200C || cp == 0x200D) return true;  // Join_Control
  // Symbols that are Other_Alphabetic (circled / squared Latin letters).
  return (cp >= 0x24B6 && cp <= 0x24E9) || (cp >= 0x1F130 && cp <= 0x1F149) ||
         (cp >= 0x1F150 && cp <= 0x1F169) || (cp >= 0x1F170 && cp <= 0x1F189);
}

bool is_punctuation(uint32_t cp) {
  if (cp < 0x80)
    return (cp >= 33 && cp <= 47) || (cp >= 58 && cp <= 64) || (cp >= 91 && cp <= 96) ||
           (cp >= 123 && cp <= 126);
  int c = utf8proc_category(static_cast<utf8proc_int32_t>(cp));
  return c >= UTF8PROC_CATEGORY_PC && c <= UTF8PROC_CATEGORY_PO;
}

bool is_numeric(uint32_t cp) {
  if (cp < 0x80) return cp >= '0' && cp <= '9';
  int c = utf8proc_category(static_cast<utf8proc_int32_t>(cp));
  return c >= UTF8PROC_CATEGORY_ND && c <= UTF8PROC_CATEGORY_NO;
}

namespace {

struct ByteTables {
  std::array<uint32_t, 256> to_char{};
  std::array<int16_t, 324> to_byte{};  // chars used are all < 324
  ByteTables() {
    to_byte.fill(-1);
    uint32_t n = 0;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
      to_char[b] = printable ? b : 256 + n++;
      to_byte[to_char[b]] = static_cast<int16_t>(b);
    }
  }
};
const ByteTables& byte_tables() {
  static const ByteTables t;
  return t;
}

}  // namespace

const std::array<uint32_t, 256>& bytes_to_chars() {
  return byte_tables().to_char;
}
int char_to_byte(uint32_t cp) {
  return cp < 324 ? byte_tables().to_byte[cp] : -1;
}

// ---- Regex -------------------------------------------------------------------------------------

namespace {

// Oniguruma's \s: the White_Space property (PCRE2's \s adds U+180E and misses U+0085).
const char* kOnigSpace =
    "\\t\\n\\x{0B}\\f\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}"
    "\\x{202F}\\x{205F}\\x{3000}";
// Oniguruma's \w: letters, marks, numbers, connector punctuation, circled letters.
const char* kOnigWord = "\\p{L}\\p{M}\\p{N}\\p{Pc}\\x{24B6}-\\x{24E9}";

// Rewrites the few Oniguruma escapes whose meaning differs from PCRE2 with UCP.
std::string onig_to_pcre2(const std::string& p) {
  std::string out;
  int depth = 0;  // character class nesting
  for (size_t i = 0; i < p.size(); ++i) {
    char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      char e = p[i + 1];
      ++i;
      bool in = depth > 0;
      switch (e) {
        case 's':
          out += in ? kOnigSpace : cat("[", kOnigSpace, "]");
          break;
        case 'S':
          out += in ? "\\S" : cat("[^", kOnigSpace, "]");
          break;
        case 'w':
          out += in ? kOnigWord : cat("[", kOnigWord, "]");
          break;
        case 'W':
          out += in ? "\\W" : cat("[^", kOnigWord, "]");
          break;
        case 'h':
          out += in ? "0-9a-fA-F" : "[0-9a-fA-F]";
          break;
        case 'H':
          out += in ? "\\H" : "[^0-9a-fA-F]";
          break;
        default:
          out += '\\';
          out += e;
      }
      continue;
    }
    if (c == '[') {
      ++depth;
      out += c;
      // A ']' right after '[' or '[^' is a literal member.
      if (i + 1 < p.size() && p[i + 1] == '^') out += p[++i];
      if (i + 1 < p.size() && p[i + 1] == ']') out += p[++i];
      continue;
    }
    if (c == ']' && depth > 0) --depth;
    out += c;
  }
  return out;
}

struct MatchState {
  pcre2_match_data* md = nullptr;
  pcre2_match_context* mc = nullptr;
  pcre2_jit_stack* js = nullptr;
  MatchState() {
    md = pcre2_match_data_create(1, nullptr);
    mc = pcre2_match_context_create(nullptr);
    js = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr);
    pcre2_jit_stack_assign(mc, nullptr, js);
  }
  ~MatchState() {
    pcre2_match_data_free(md);
    pcre2_match_context_free(mc);
    pcre2_jit_stack_free(js);
  }
};

MatchState& match_state() {
  thread_local MatchState st;
  return st;
}

}  // namespace

Regex::Regex(const std::string& pattern, const std::string& where) {
  std::string p = onig_to_pcre2(pattern);
  int err = 0;
  PCRE2_SIZE off = 0;
  code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(p.data()), p.size(),
                        PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE | PCRE2_NEVER_BACKSLASH_C, &err,
                        &off, nullptr);
  if (!code_) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof msg);
    throw Error(cat(where, ": cannot compile regex '", pattern,
                    "': ", reinterpret_cast<const char*>(msg), " at offset ", off));
  }
  // Falls back to the interpreter if JIT is unavailable.
  jit_ = pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE) == 0;
}

Regex::~Regex() {
  pcre2_code_free(code_);
}

void Regex::find_all(std::string_view s, std::vector<std::pair<uint32_t, uint32_t>>& out) const {
  MatchState& st = match_state();
  PCRE2_SIZE* ov = pcre2_get_ovector_pointer(st.md);
  size_t last_end = 0;
  size_t last_match_end = SIZE_MAX;
  auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
  while (last_end <= s.size()) {
    int rc =
        jit_ ? pcre2_jit_match(code_, subject, s.size(), last_end, 0, st.md, st.mc)
             : pcre2_match(code_, subject, s.size(), last_end, PCRE2_NO_UTF_CHECK, st.md, st.mc);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(rc, msg, sizeof msg);
      throw Error(cat("tokenizer regex match failed: ", reinterpret_cast<const char*>(msg)));
    }
    size_t b = ov[0], e = ov[1];
    if (b == e && e == last_match_end) {
      last_end += last_end < s.size() ? utf8_len(static_cast<unsigned char>(s[last_end])) : 1;
      continue;
    }
    last_end = e;
    last_match_end = e;
    out.emplace_back(static_cast<uint32_t>(b), static_cast<uint32_t>(e));
  }
}

void Pattern::find_matches(std::string_view s,
                           std::vector<std::tuple<uint32_t, uint32_t, bool>>& out) const {
  out.clear();
  auto n = static_cast<uint32_t>(s.size());
  if (s.empty() || (!regex && literal.empty())) {
    out.emplace_back(0, n, false);
    return;
  }
  uint32_t prev = 0;
  auto add = [&](uint32_t b, uint32_t e) {
    if (prev != b) out.emplace_back(prev, b, false);
    out.emplace_back(b, e, true);
    prev = e;
  };
  if (regex) {
    thread_local std::vector<std::pair<uint32_t, uint32_t>> spans;
    spans.clear();
    regex->find_all(s, spans);
    for (auto [b, e] : spans) add(b, e);
  } else {
    size_t pos = 0;
    while ((pos = s.find(literal, pos)) != std::string_view::npos) {
      add(static_cast<uint32_t>(pos), static_cast<uint32_t>(pos + literal.size()));
      pos += literal.size();
    }
  }
  if (prev != n) out.emplace_back(prev, n, false);
}

void split_piece(const Piece& p, const std::vector<std::tuple<uint32_t, uint32_t, bool>>& m,
                 SplitBehavior behavior, std::vector<Piece>& out) {
  auto emit = [&](uint32_t b, uint32_t e) {
    if (e > b) out.push_back(Piece{p.off + b, e - b, p.orig0 && b == 0});
  };
  switch (behavior) {
    case SplitBehavior::Isolated:
      for (auto& [b, e, is] : m) emit(b, e);
      break;
    case SplitBehavior::Removed:
      for (auto& [b, e, is] : m)
        if (!is) emit(b, e);
      break;
    case SplitBehavior::Contiguous:
    case SplitBehavior::MergedWithPrevious: {
      // Fold the matches into (start, end) spans first, then emit the non-empty ones.
      thread_local std::vector<std::pair<uint32_t, uint32_t>> acc;
      acc.clear();
      bool prev_match = false;
      for (auto& [b, e, is] : m) {
        bool merge = behavior == SplitBehavior::Contiguous ? is == prev_match : is && !prev_match;
        if (merge && !acc.empty())
          acc.back().second = e;
        else
          acc.emplace_back(b, e);
        prev_match = is;
      }
      for (auto [b, e] : acc) emit(b, e);
      break;
    }
    case SplitBehavior::MergedWithNext: {
      thread_local std::vector<std::pair<uint32_t, uint32_t>> acc;
      acc.clear();
      bool prev_match = false;
      for (auto it = m.rbegin(); it != m.rend(); ++it) {
        auto& [b, e, is] = *it;
        if (is && !prev_match && !acc.empty())
          acc.back().first = b;
        else
          acc.emplace_back(b, e);
        prev_match = is;
      }
      for (auto it = acc.rbegin(); it != acc.rend(); ++it) emit(it->first, it->second);
      break;
    }
  }
}

// ---- Normalizers -------------------------------------------------------------------------------

namespace {

bool all_ascii(std::string_view s) {
  for (char c : s)
    if (static_cast<unsigned char>(c) >= 0x80) return false;
  return true;
}

class UnicodeNorm : public Normalizer {
 public:
  explicit UnicodeNorm(int options) : options_(options) {}
  void normalize(std::string& s) const override {
    if (s.empty() || all_ascii(s)) return;  // ASCII is invariant under NFC/NFD/NFKC/NFKD
    utf8proc_uint8_t* dst = nullptr;
    utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()),
                                      static_cast<utf8proc_ssize_t>(s.size()), &dst,
                                      static_cast<utf8proc_option_t>(options_));
    if (n < 0) throw Error(cat("tokenizer: Unicode normalization failed: ", utf8proc_errmsg(n)));
    s.assign(reinterpret_cast<char*>(dst), static_cast<size_t>(n));
    std::free(dst);
  }

 private:
  int options_;
};

class Lowercase : public Normalizer {
 public:
  void normalize(std::string& s) const override {
    if (all_ascii(s)) {
      for (char& c : s)
        if (c >= 'A' && c <= 'Z') c = static_cast<char>(c + 32);
      return;
    }
    std::string out;
    out.reserve(s.size());
    for (size_t i = 0; i < s.size();) {
      uint32_t cp = next_cp(s, i);
      if (cp == 0x130) {  // the one unconditional multi-char lowercase mapping
        out += "i\xCC\x87";
        continue;
      }
      append_utf8(out, static_cast<uint32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(cp))));
    }
    s.swap(out);
  }
};

class Strip : public Normalizer {
 public:
  Strip(bool left, bool right) : left_(left), right_(right) {}
  void normalize(std::string& s) const override {
    size_t b = 0, e = s.size();
    if (left_) {
      while (b < e) {
        size_t j = b;
        if (!is_whitespace(next_cp(s, j))) break;
        b = j;
      }
    }
    if (right_) {
      while (e > b) {
        size_t j = e - 1;
        while (j > b && (static_cast<unsigned char>(s[j]) & 0xC0) == 0x80) --j;
        size_t k = j;
        if (!is_whitespace(next_cp(s, k))) break;
        e = j;
      }
    }
    s = s.substr(b, e - b);
  }

 private:
  bool left_, right_;
};

class StripAccents : public Normalizer {
 public:
  void normalize(std::string& s) const override {
    if (all_ascii(s)) return;
    std::string out;
    for (size_t i = 0; i < s.size();) {
      size_t b = i;
      uint32_t cp = next_cp(s, i);
      int c = utf8proc_category(static_cast<utf8proc_int32_t>(cp));
      if (c >= UTF8PROC_CATEGORY_MN && c <= UTF8PROC_CATEGORY_ME) continue;
      out.append(s, b, i - b);
    }
    s.swap(out);
  }
};

class Replace : public Normalizer {
 public:
  Replace(Pattern p, std::string content) : pattern_(std::move(p)), content_(std::move(content)) {}
  void normalize(std::string& s) const override {
    if (!pattern_.regex && (pattern_.literal.empty() || s.find(pattern_.literal) == s.npos)) return;
    std::vector<std::tuple<uint32_t, uint32_t, bool>> m;
    pattern_.find_matches(s, m);
    std::string out;
    out.reserve(s.size());
    for (auto& [b, e, is] : m) {
      if (is)
        out += content_;
      else
        out.append(s, b, e - b);
    }
    s.swap(out);
  }

 private:
  Pattern pattern_;
  std::string content_;
};

class Prepend : public Normalizer {
 public:
  Prepend(std::string p, bool append) : text_(std::move(p)), append_(append) {}
  void normalize(std::string& s) const override {
    if (s.empty()) return;
    if (append_)
      s += text_;
    else
      s.insert(0, text_);
  }

 private:
  std::string text_;
  bool append_;
};

class ByteLevelNorm : public Normalizer {
 public:
  void normalize(std::string& s) const override {
    std::string out;
    out.reserve(s.size() * 2);
    for (unsigned char c : s) append_utf8(out, bytes_to_chars()[c]);
    s.swap(out);
  }
};

bool is_chinese_char(uint32_t c) {
  return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) ||
         (c >= 0x20000 && c <= 0x2A6DF) || (c >= 0x2A700 && c <= 0x2B73F) ||
         (c >= 0x2B740 && c <= 0x2B81F) || (c >= 0x2B920 && c <= 0x2CEAF) ||
         (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x2F800 && c <= 0x2FA1F);
}

class BertNorm : public Normalizer {
 public:
  BertNorm(bool clean, bool chinese, bool strip, bool lower)
      : clean_(clean), chinese_(chinese), strip_(strip), lower_(lower) {}
  void normalize(std::string& s) const override {
    std::string out;
    if (clean_) {
      for (size_t i = 0; i < s.size();) {
        size_t b = i;
        uint32_t cp = next_cp(s, i);
        if (cp == 0 || cp == 0xFFFD) continue;
        bool ws = cp == '\t' || cp == '\n' || cp == '\r' || is_whitespace(cp);
        if (ws) {
          out += ' ';
          continue;
        }
        int c = utf8proc_category(static_cast<utf8proc_int32_t>(cp));
        if (c == UTF8PROC_CATEGORY_CN || c >= UTF8PROC_CATEGORY_CC) continue;  // C*
        out.append(s, b, i - b);
      }
      s.swap(out);
      out.clear();
    }
    if (chinese_) {
      for (size_t i = 0; i < s.size();) {
        size_t b = i;
        uint32_t cp = next_cp(s, i);
        if (is_chinese_char(cp)) {
          out += ' ';
          out.append(s, b, i - b);
          out += ' ';
        } else {
          out.append(s, b, i - b);
        }
      }
      s.swap(out);
      out.clear();
    }
    if (strip_) {
      UnicodeNorm(UTF8PROC_STABLE | UTF8PROC_DECOMPOSE).normalize(s);
      for (size_t i = 0; i < s.size();) {
        size_t b = i;
        uint32_t cp = next_cp(s, i);
        if (utf8proc_category(static_cast<utf8proc_int32_t>(cp)) == UTF8PROC_CATEGORY_MN) continue;
        out.append(s, b, i - b);
      }
      s.swap(out);
    }
    if (lower_) Lowercase().normalize(s);
  }

 private:
  bool clean_, chinese_, strip_, lower_;
};

class NormSequence : public Normalizer {
 public:
  explicit NormSequence(std::vector<std::unique_ptr<Normalizer>> v) : v_(std::move(v)) {}
  void normalize(std::string& s) const override {
    for (auto& n : v_) n->normalize(s);
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> v_;
};

}  // namespace

std::string type_of(const json& j, const std::string& where, const char* what) {
  KILN_CHECK(j.is_object() && j.contains("type") && j["type"].is_string(), where, ": ", what,
             " without a \"type\"");
  return j["type"].get<std::string>();
}

Pattern make_pattern(const json& j, const std::string& where, const std::string& name) {
  Pattern p;
  KILN_CHECK(j.is_object(), name, " must be {\"String\": ...} or {\"Regex\": ...}");
  if (j.contains("String")) {
    p.literal = json_string(j["String"], name + ".String");
  } else if (j.contains("Regex")) {
    p.regex = std::make_unique<Regex>(json_string(j["Regex"], name + ".Regex"), where);
  } else {
    throw Error(cat(name, " must be {\"String\": ...} or {\"Regex\": ...}"));
  }
  return p;
}

std::unique_ptr<Normalizer> make_normalizer(const json& j, const std::string& where,
                                            const std::string& path) {
  if (j.is_null()) return nullptr;
  std::string t = type_of(j, where, "normalizer");
  const JsonObj o{j, cat(where, ": ", path)};
  if (t == "NFC") return std::make_unique<UnicodeNorm>(UTF8PROC_STABLE | UTF8PROC_COMPOSE);
  if (t == "NFD") return std::make_unique<UnicodeNorm>(UTF8PROC_STABLE | UTF8PROC_DECOMPOSE);
  if (t == "NFKC")
    return std::make_unique<UnicodeNorm>(UTF8PROC_STABLE | UTF8PROC_COMPOSE | UTF8PROC_COMPAT);
  if (t == "NFKD")
    return std::make_unique<UnicodeNorm>(UTF8PROC_STABLE | UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT);
  if (t == "Lowercase") return std::make_unique<Lowercase>();
  if (t == "Strip")
    return std::make_unique<Strip>(o.boolean("strip_left", true), o.boolean("strip_right", true));
  if (t == "StripAccents") return std::make_unique<StripAccents>();
  if (t == "Replace")
    return std::make_unique<Replace>(make_pattern(o.at("pattern"), where, o.field("pattern")),
                                     o.str("content"));
  if (t == "Prepend") return std::make_unique<Prepend>(o.str("prepend"), false);
  if (t == "Append") return std::make_unique<Prepend>(o.str("append"), true);
  if (t == "ByteLevel") return std::make_unique<ByteLevelNorm>();
  if (t == "BertNormalizer") {
    bool lower = o.boolean("lowercase", true);
    return std::make_unique<BertNorm>(o.boolean("clean_text", true),
                                      o.boolean("handle_chinese_chars", true),
                                      o.boolean("strip_accents", lower), lower);
  }
  if (t == "Sequence") {
    std::vector<std::unique_ptr<Normalizer>> v;
    const json& list = json_array(o.at("normalizers"), o.field("normalizers"));
    for (size_t i = 0; i < list.size(); ++i)
      if (auto p = make_normalizer(list[i], where, cat(path, ".normalizers[", i, "]")))
        v.push_back(std::move(p));
    return std::make_unique<NormSequence>(std::move(v));
  }
  throw Error(cat(where, ": unsupported normalizer type \"", t, "\""));
}

std::unique_ptr<Normalizer> make_prepend_replace(bool prepend, bool escape_spaces,
                                                 bool remove_extra_spaces) {
  // SentencePiece's own normalizer for the identity rule set.
  class Spm : public Normalizer {
   public:
    Spm(bool p, bool e, bool r) : prepend_(p), escape_(e), extra_(r) {}
    void normalize(std::string& s) const override {
      if (extra_) {
        std::string out;
        bool prev_space = true;
        for (char c : s) {
          if (c == ' ') {
            if (!prev_space) out += ' ';
            prev_space = true;
          } else {
            out += c;
            prev_space = false;
          }
        }
        while (!out.empty() && out.back() == ' ') out.pop_back();
        s.swap(out);
      }
      if (s.empty()) return;
      if (prepend_) s.insert(0, " ");
      if (escape_) {
        std::string out;
        out.reserve(s.size() + 16);
        for (char c : s) {
          if (c == ' ')
            out += "\xE2\x96\x81";
          else
            out += c;
        }
        s.swap(out);
      }
    }

   private:
    bool prepend_, escape_, extra_;
  };
  return std::make_unique<Spm>(prepend, escape_spaces, remove_extra_spaces);
}

}  // namespace kiln::tok
