// Lexer and parser for the Jinja subset. Both mirror jinja2 3.1's lexer.py and parser.py closely,
// because chat templates depend on the exact whitespace rules (trim_blocks, lstrip_blocks, '-'
// and '+' markers) and operator precedence of the reference implementation.
#include <algorithm>
#include <cstring>

#include "core/error.h"
#include "tokenizer/jinja_internal.h"

namespace kiln::jinja {
namespace {

// Deepest nesting of blocks and expressions the parser accepts; deeper input would otherwise
// recurse until the C++ stack overflows.
constexpr int kMaxParseDepth = 200;

enum class Tok : uint8_t {
  kData,
  kVarBegin,
  kVarEnd,
  kBlockBegin,
  kBlockEnd,
  kName,
  kString,
  kInt,
  kFloat,
  kOp,
  kEof
};

struct Token {
  Tok type;
  std::string value;  // data, name, decoded string, operator
  int line;
  int64_t ival = 0;
  double fval = 0;
};

[[noreturn]] void syntax_error(int line, const std::string& msg) {
  throw Error(cat("jinja template syntax error at line ", line, ": ", msg));
}

bool ascii_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

// Python's str.rstrip() / re `\s`: Unicode whitespace.
std::string_view rstrip_ws(std::string_view s) {
  std::u32string u = decode_utf8(s);
  size_t e = u.size();
  while (e > 0 && py_isspace(u[e - 1])) --e;
  if (e == u.size()) return s;
  return s.substr(0, encode_utf8(std::u32string_view(u).substr(0, e)).size());
}

size_t skip_ws(std::string_view s, size_t pos) {
  std::u32string rest;
  while (pos < s.size()) {
    auto c = static_cast<unsigned char>(s[pos]);
    if (c < 0x80) {
      if (!py_isspace(c)) break;
      ++pos;
      continue;
    }
    // Multi-byte: decode one code point.
    std::u32string one = decode_utf8(s.substr(pos, std::min<size_t>(4, s.size() - pos)));
    if (one.empty() || !py_isspace(one[0])) break;
    std::string enc;
    append_utf8(enc, one[0]);
    pos += enc.size();
  }
  return pos;
}

bool all_ws(std::string_view s) {
  if (s.empty()) return false;  // re.fullmatch(r"\s+", "") fails
  for (char32_t c : decode_utf8(s)) {
    if (!py_isspace(c)) return false;
  }
  return true;
}

class Lexer {
 public:
  Lexer(std::string_view src, const JinjaOptions& opts) : src_(src), opts_(opts) {}

  std::vector<Token> run() {
    while (pos_ < src_.size()) {
      size_t k = find_tag(pos_);
      if (k == std::string_view::npos) {
        push(Tok::kData, std::string(src_.substr(pos_)), line_);
        advance(src_.size());
        break;
      }
      char kind = src_[k + 1];
      char sign =
          k + 2 < src_.size() && (src_[k + 2] == '-' || src_[k + 2] == '+') ? src_[k + 2] : 0;
      size_t raw_end = kind == '%' ? match_raw_begin(k) : 0;
      std::string_view text = src_.substr(pos_, k - pos_);
      if (sign == '-') {
        text = rstrip_ws(text);
      } else if (sign != '+' && opts_.lstrip_blocks && kind != '{') {
        size_t l_pos = text.rfind('\n');
        l_pos = l_pos == std::string_view::npos ? 0 : l_pos + 1;
        bool line_starting = pos_ == 0 || src_[pos_ - 1] == '\n';
        if ((l_pos > 0 || line_starting) && all_ws(text.substr(l_pos)))
          text = text.substr(0, l_pos);
      }
      if (!text.empty()) push(Tok::kData, std::string(text), line_);
      if (raw_end) {
        advance(raw_end);
        lex_raw();
        continue;
      }
      int tag_line = line_at(k);
      advance(k + 2 + (sign ? 1 : 0));
      if (kind == '#') {
        lex_comment(tag_line);
      } else {
        lex_tag(kind == '{', tag_line);
      }
    }
    push(Tok::kEof, "", line_);
    return std::move(out_);
  }

 private:
  size_t find_tag(size_t from) const {
    while (true) {
      size_t k = src_.find('{', from);
      if (k == std::string_view::npos || k + 1 >= src_.size()) return std::string_view::npos;
      char n = src_[k + 1];
      if (n == '{' || n == '%' || n == '#') return k;
      from = k + 1;
    }
  }

  // `{%[-+]?\s*raw\s*(-%}\s*|%})` at k: returns the end offset, or 0.
  size_t match_raw_begin(size_t k) const {
    size_t p = k + 2;
    if (p < src_.size() && (src_[p] == '-' || src_[p] == '+')) ++p;
    p = skip_ws(src_, p);
    if (src_.compare(p, 3, "raw") != 0) return 0;
    p = skip_ws(src_, p + 3);
    if (src_.compare(p, 3, "-%}") == 0) return skip_ws(src_, p + 3);
    if (src_.compare(p, 2, "%}") == 0) return p + 2;
    return 0;
  }

  void lex_raw() {
    int start_line = line_;
    size_t from = pos_;
    while (true) {
      size_t k = src_.find("{%", from);
      if (k == std::string_view::npos) syntax_error(start_line, "Missing end of raw directive");
      size_t p = k + 2;
      char sign = 0;
      if (p < src_.size() && (src_[p] == '-' || src_[p] == '+')) sign = src_[p++];
      p = skip_ws(src_, p);
      if (src_.compare(p, 6, "endraw") != 0) {
        from = k + 1;
        continue;
      }
      p = skip_ws(src_, p + 6);
      size_t end;
      if (src_.compare(p, 3, "+%}") == 0) {
        end = p + 3;
      } else if (src_.compare(p, 3, "-%}") == 0) {
        end = skip_ws(src_, p + 3);
      } else if (src_.compare(p, 2, "%}") == 0) {
        end = p + 2;
        if (opts_.trim_blocks && end < src_.size() && src_[end] == '\n') ++end;
      } else {
        from = k + 1;
        continue;
      }
      std::string_view text = src_.substr(pos_, k - pos_);
      if (sign == '-') {
        text = rstrip_ws(text);
      } else if (sign != '+' && opts_.lstrip_blocks) {
        size_t l_pos = text.rfind('\n');
        l_pos = l_pos == std::string_view::npos ? 0 : l_pos + 1;
        bool line_starting = pos_ == 0 || src_[pos_ - 1] == '\n';
        if ((l_pos > 0 || line_starting) && all_ws(text.substr(l_pos)))
          text = text.substr(0, l_pos);
      }
      if (!text.empty()) push(Tok::kData, std::string(text), line_);
      advance(end);
      return;
    }
  }

  void lex_comment(int tag_line) {
    size_t j = src_.find("#}", pos_);
    if (j == std::string_view::npos) syntax_error(tag_line, "Missing end of comment tag");
    size_t end = j + 2;
    if (j > pos_ && src_[j - 1] == '-') {
      end = skip_ws(src_, end);
    } else if (j > pos_ && src_[j - 1] == '+') {
      // keep the newline
    } else if (opts_.trim_blocks && end < src_.size() && src_[end] == '\n') {
      ++end;
    }
    advance(end);
  }

  void lex_tag(bool variable, int tag_line) {
    push(variable ? Tok::kVarBegin : Tok::kBlockBegin, "", tag_line);
    std::vector<char> balance;
    while (true) {
      if (pos_ >= src_.size()) {
        syntax_error(line_, variable ? "unexpected end of template, expected '}}'"
                                     : "unexpected end of template, expected '%}'");
      }
      if (balance.empty()) {
        if (variable) {
          if (src_.compare(pos_, 3, "-}}") == 0) {
            push(Tok::kVarEnd, "", line_);
            advance(skip_ws(src_, pos_ + 3));
            return;
          }
          if (src_.compare(pos_, 2, "}}") == 0) {
            push(Tok::kVarEnd, "", line_);
            advance(pos_ + 2);
            return;
          }
        } else {
          if (src_.compare(pos_, 3, "+%}") == 0) {
            push(Tok::kBlockEnd, "", line_);
            advance(pos_ + 3);
            return;
          }
          if (src_.compare(pos_, 3, "-%}") == 0) {
            push(Tok::kBlockEnd, "", line_);
            advance(skip_ws(src_, pos_ + 3));
            return;
          }
          if (src_.compare(pos_, 2, "%}") == 0) {
            push(Tok::kBlockEnd, "", line_);
            size_t end = pos_ + 2;
            if (opts_.trim_blocks && end < src_.size() && src_[end] == '\n') ++end;
            advance(end);
            return;
          }
        }
      }
      char c = src_[pos_];
      if (ascii_space(c)) {
        advance(pos_ + 1);
        continue;
      }
      if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_') {
        size_t e = pos_ + 1;
        while (e < src_.size() &&
               (std::isalnum(static_cast<unsigned char>(src_[e])) || src_[e] == '_'))
          ++e;
        push(Tok::kName, std::string(src_.substr(pos_, e - pos_)), line_);
        advance(e);
        continue;
      }
      if (c == '\'' || c == '"') {
        lex_string(c);
        continue;
      }
      if (c >= '0' && c <= '9') {
        lex_number();
        continue;
      }
      static const char* two[] = {"//", "**", "==", "!=", ">=", "<="};
      std::string op;
      for (const char* t : two) {
        if (src_.compare(pos_, 2, t) == 0) op = t;
      }
      if (op.empty()) {
        if (!std::strchr("+-/*%~[](){}<>=.:|,;", c)) {
          syntax_error(line_, std::string("unexpected char '") + c + "'");
        }
        op = std::string(1, c);
      }
      if (op == "(" || op == "[" || op == "{") {
        balance.push_back(op == "(" ? ')' : op == "[" ? ']' : '}');
      } else if (op == ")" || op == "]" || op == "}") {
        if (balance.empty()) syntax_error(line_, "unexpected '" + op + "'");
        if (balance.back() != op[0]) {
          syntax_error(
              line_, "unexpected '" + op + "', expected '" + std::string(1, balance.back()) + "'");
        }
        balance.pop_back();
      }
      push(Tok::kOp, op, line_);
      advance(pos_ + op.size());
    }
  }

  void lex_string(char quote) {
    int start_line = line_;
    size_t p = pos_ + 1;
    std::string out;
    while (true) {
      if (p >= src_.size()) syntax_error(start_line, "unexpected end of string");
      char c = src_[p];
      if (c == quote) break;
      if (c != '\\') {
        out += c;
        ++p;
        continue;
      }
      if (p + 1 >= src_.size()) syntax_error(start_line, "unexpected end of string");
      char e = src_[p + 1];
      p += 2;
      // Python's unicode-escape codec, which jinja2 applies to string literals.
      switch (e) {
        case '\n':
          break;
        case '\\':
          out += '\\';
          break;
        case '\'':
          out += '\'';
          break;
        case '"':
          out += '"';
          break;
        case 'a':
          out += '\a';
          break;
        case 'b':
          out += '\b';
          break;
        case 'f':
          out += '\f';
          break;
        case 'n':
          out += '\n';
          break;
        case 'r':
          out += '\r';
          break;
        case 't':
          out += '\t';
          break;
        case 'v':
          out += '\v';
          break;
        case 'x':
        case 'u':
        case 'U': {
          int digits = e == 'x' ? 2 : e == 'u' ? 4 : 8;
          char32_t v = 0;
          for (int n = 0; n < digits; ++n) {
            char h = p < src_.size() ? src_[p] : 0;
            int d = h >= '0' && h <= '9'   ? h - '0'
                    : h >= 'a' && h <= 'f' ? h - 'a' + 10
                    : h >= 'A' && h <= 'F' ? h - 'A' + 10
                                           : -1;
            if (d < 0)
              syntax_error(start_line, std::string("truncated \\") + e + " escape in string");
            v = v * 16 + d;
            ++p;
          }
          if (v > 0x10FFFF) syntax_error(start_line, "illegal Unicode character in string");
          append_utf8(out, v);
          break;
        }
        case 'N':
          // Named escapes need the Unicode name table, which kiln does not carry.
          syntax_error(start_line, "\\N{...} escapes are not supported in string literals");
        default:
          if (e >= '0' && e <= '7') {
            char32_t v = e - '0';
            for (int n = 0; n < 2 && p < src_.size() && src_[p] >= '0' && src_[p] <= '7'; ++n) {
              v = v * 8 + (src_[p++] - '0');
            }
            append_utf8(out, v);
          } else {
            out += '\\';  // unknown escapes stay verbatim
            out += e;
          }
      }
    }
    push(Tok::kString, std::move(out), start_line);
    advance(p + 1);
  }

  void lex_number() {
    size_t p = pos_;
    auto digits = [&](size_t q) {  // (\d+_)*\d+
      size_t s = q;
      while (q < src_.size() && std::isdigit(static_cast<unsigned char>(src_[q]))) {
        ++q;
        if (q + 1 < src_.size() && src_[q] == '_' &&
            std::isdigit(static_cast<unsigned char>(src_[q + 1])))
          ++q;
      }
      return q == s ? std::string_view::npos : q;
    };
    auto clean = [](std::string_view s) {
      std::string r;
      for (char c : s) {
        if (c != '_') r += c;
      }
      return r;
    };
    // Hex/octal/binary integers.
    if (src_[p] == '0' && p + 1 < src_.size() && std::strchr("xXoObB", src_[p + 1])) {
      int base = std::strchr("xX", src_[p + 1]) ? 16 : std::strchr("oO", src_[p + 1]) ? 8 : 2;
      size_t q = p + 2;
      std::string ds;
      while (q < src_.size()) {
        char c = src_[q];
        if (c == '_') {
          ++q;
          continue;
        }
        int d = std::isdigit(static_cast<unsigned char>(c)) ? c - '0'
                : (c >= 'a' && c <= 'f')                    ? c - 'a' + 10
                : (c >= 'A' && c <= 'F')                    ? c - 'A' + 10
                                                            : 99;
        if (d >= base) break;
        ds += c;
        ++q;
      }
      if (!ds.empty()) {
        Token t{Tok::kInt, std::string(src_.substr(p, q - p)), line_};
        errno = 0;
        t.ival = static_cast<int64_t>(std::strtoull(ds.c_str(), nullptr, base));
        if (errno ||
            std::strtoull(ds.c_str(), nullptr, base) > static_cast<unsigned long long>(INT64_MAX)) {
          syntax_error(line_, "integer literal too large");
        }
        out_.push_back(std::move(t));
        advance(q);
        return;
      }
    }
    size_t int_end = digits(p);
    size_t e = int_end;
    bool is_float = false;
    // jinja2's float_re has a (?<!\.) lookbehind: `x.1.2` is x[1][2], never x[1.2].
    bool after_dot = p > 0 && src_[p - 1] == '.';
    if (!after_dot) {
      if (e < src_.size() && src_[e] == '.' && e + 1 < src_.size() &&
          std::isdigit(static_cast<unsigned char>(src_[e + 1]))) {
        e = digits(e + 1);
        is_float = true;
      }
      if (e < src_.size() && (src_[e] == 'e' || src_[e] == 'E')) {
        size_t q = e + 1;
        if (q < src_.size() && (src_[q] == '+' || src_[q] == '-')) ++q;
        size_t x = q < src_.size() ? digits(q) : std::string_view::npos;
        if (x != std::string_view::npos) {
          e = x;
          is_float = true;
        }
      }
    }
    std::string text = clean(src_.substr(p, e - p));
    Token t{is_float ? Tok::kFloat : Tok::kInt, text, line_};
    if (is_float) {
      t.fval = std::strtod(text.c_str(), nullptr);
    } else {
      errno = 0;
      unsigned long long v = std::strtoull(text.c_str(), nullptr, 10);
      if (errno || v > static_cast<unsigned long long>(INT64_MAX)) {
        syntax_error(line_, "integer literal too large");
      }
      t.ival = static_cast<int64_t>(v);
    }
    out_.push_back(std::move(t));
    advance(e);
  }

  void push(Tok type, std::string value, int line) {
    out_.push_back(Token{type, std::move(value), line});
  }

  void advance(size_t to) {
    for (size_t i = pos_; i < to; ++i) {
      if (src_[i] == '\n') ++line_;
    }
    pos_ = to;
  }

  int line_at(size_t k) const {
    int l = line_;
    for (size_t i = pos_; i < k; ++i) {
      if (src_[i] == '\n') ++l;
    }
    return l;
  }

  std::string_view src_;
  const JinjaOptions& opts_;
  size_t pos_ = 0;
  int line_ = 1;
  std::vector<Token> out_;
};

// ---------------------------------------------------------------------------------------------

std::string describe(const Token& t) {
  switch (t.type) {
    case Tok::kData:
      return "template data";
    case Tok::kVarBegin:
      return "begin of print statement";
    case Tok::kVarEnd:
      return "end of print statement";
    case Tok::kBlockBegin:
      return "begin of statement block";
    case Tok::kBlockEnd:
      return "end of statement block";
    case Tok::kEof:
      return "end of template";
    case Tok::kString:
      return "string";
    case Tok::kInt:
      return "integer";
    case Tok::kFloat:
      return "float";
    default:
      return "'" + t.value + "'";
  }
}

class Parser {
 public:
  explicit Parser(std::vector<Token> toks) : t_(std::move(toks)) {}

  Body parse_template() {
    Body body = subparse({});
    if (cur().type != Tok::kEof) {
      // subparse only stops early at an end tag that nothing opened.
      syntax_error(cur().line, "Encountered unknown tag '" + cur().value + "'.");
    }
    return body;
  }

 private:
  struct Guard {
    explicit Guard(Parser* p) : p(p) {
      if (++p->depth_ > kMaxParseDepth) {
        syntax_error(p->cur().line,
                     "template nests deeper than " + std::to_string(kMaxParseDepth) + " levels");
      }
    }
    ~Guard() { --p->depth_; }
    Parser* p;
  };

  const Token& cur() const { return t_[p_]; }
  const Token& peek(size_t n = 1) const { return t_[std::min(p_ + n, t_.size() - 1)]; }
  Token next() {
    Token t = t_[p_];
    if (p_ + 1 < t_.size()) ++p_;
    return t;
  }
  bool is_op(const char* op) const { return cur().type == Tok::kOp && cur().value == op; }
  bool is_name(const char* name) const { return cur().type == Tok::kName && cur().value == name; }
  bool skip_op(const char* op) {
    if (!is_op(op)) return false;
    next();
    return true;
  }
  bool skip_name(const char* name) {
    if (!is_name(name)) return false;
    next();
    return true;
  }
  void expect_op(const char* op) {
    if (!skip_op(op)) {
      syntax_error(cur().line, std::string("expected token '") + op + "', got " + describe(cur()));
    }
  }
  std::string expect_name() {
    if (cur().type != Tok::kName) syntax_error(cur().line, "expected name, got " + describe(cur()));
    return next().value;
  }
  void expect(Tok type, const char* what) {
    if (cur().type != type) {
      syntax_error(cur().line,
                   std::string("expected token '") + what + "', got " + describe(cur()));
    }
    next();
  }
  void expect_block_end() { expect(Tok::kBlockEnd, "end of statement block"); }

  static ExprPtr node(ExprKind kind, int line) {
    auto e = std::make_unique<Expr>();
    e->kind = kind;
    e->line = line;
    return e;
  }

  // Records the height of a finished node and refuses trees taller than kMaxParseDepth. Guard
  // only sees recursion, but chains (a.b.c..., f()()..., x|f|f..., a + b + c ...) are built by
  // loops, and the interpreter evaluates and frees the tree recursively: 100k links would
  // overflow the stack there. Every node that has children goes through here.
  static ExprPtr seal(ExprPtr e) {
    int h = 0;
    auto see = [&h](const ExprPtr& c) {
      if (c) h = std::max(h, c->height);
    };
    for (const auto& a : e->args) see(a);
    for (const auto& a : e->call.pos) see(a);
    for (const auto& kv : e->call.kw) see(kv.second);
    see(e->call.star);
    see(e->call.starstar);
    e->height = h + 1;
    if (e->height > kMaxParseDepth) {
      syntax_error(e->line,
                   "expression nests deeper than " + std::to_string(kMaxParseDepth) + " levels");
    }
    return e;
  }

  // ---- statements --------------------------------------------------------------------------

  // Parses until a block tag whose name is in `ends`; leaves the parser on that name.
  Body subparse(const std::vector<std::string>& ends) {
    Guard g(this);
    Body body;
    while (cur().type != Tok::kEof) {
      const Token& t = cur();
      if (t.type == Tok::kData) {
        auto s = std::make_unique<Stmt>();
        s->kind = StmtKind::kOutput;
        s->line = t.line;
        s->text = t.value;
        body.push_back(std::move(s));
        next();
      } else if (t.type == Tok::kVarBegin) {
        next();
        auto s = std::make_unique<Stmt>();
        s->kind = StmtKind::kPrint;
        s->line = cur().line;
        s->expr = parse_tuple(false, true, {}, false);
        expect(Tok::kVarEnd, "end of print statement");
        body.push_back(std::move(s));
      } else if (t.type == Tok::kBlockBegin) {
        next();
        if (cur().type == Tok::kName) {
          for (const auto& e : ends) {
            if (cur().value == e) return body;
          }
        }
        body.push_back(parse_statement(ends));
        expect_block_end();
      } else {
        syntax_error(t.line, "unexpected " + describe(t));
      }
    }
    return body;
  }

  // Parses statements up to one of `ends` (a block_end first). With `drop`, the end name is
  // consumed; otherwise it is left for the caller.
  Body parse_statements(const std::vector<std::string>& ends, const char* block, int line,
                        bool drop) {
    expect_block_end();
    Body body = subparse(ends);
    if (cur().type == Tok::kEof) {
      std::string names;
      for (size_t n = 0; n < ends.size(); ++n) names += (n ? " or '" : "'") + ends[n] + "'";
      syntax_error(cur().line, std::string("unexpected end of template: missing ") + names +
                                   " to close the '" + block + "' block from line " +
                                   std::to_string(line));
    }
    if (drop) next();
    return body;
  }

  StmtPtr parse_statement(const std::vector<std::string>& open_ends) {
    const Token tok = cur();
    if (tok.type != Tok::kName) syntax_error(tok.line, "tag name expected");
    const std::string& n = tok.value;
    auto s = std::make_unique<Stmt>();
    s->line = tok.line;
    if (n == "for") return parse_for();
    if (n == "if") return parse_if();
    if (n == "set") return parse_set();
    if (n == "macro") return parse_macro();
    if (n == "call") return parse_call_block();
    if (n == "filter") {
      next();
      s->kind = StmtKind::kFilterBlock;
      parse_filters(nullptr, true, &s->filters);
      s->body = parse_statements({"endfilter"}, "filter", s->line, true);
      return s;
    }
    if (n == "with") {
      next();
      s->kind = StmtKind::kWith;
      while (cur().type != Tok::kBlockEnd) {
        if (!s->assigns.empty()) expect_op(",");
        Target t = parse_target(false);
        expect_op("=");
        s->assigns.emplace_back(std::move(t), parse_expression(true));
      }
      s->body = parse_statements({"endwith"}, "with", s->line, true);
      return s;
    }
    if (n == "generation" || n == "autoescape") {
      // `generation` is transformers' AssistantTracker tag: a call block that renders its body.
      next();
      if (n == "autoescape") parse_expression(true);  // autoescaping is off in transformers
      s->kind = StmtKind::kScope;
      s->body = parse_statements({"end" + n}, n.c_str(), s->line, true);
      return s;
    }
    if (n == "break" || n == "continue") {
      if (loop_depth_ == 0) syntax_error(tok.line, "'" + n + "' outside of a loop");
      next();
      s->kind = n == "break" ? StmtKind::kBreak : StmtKind::kContinue;
      return s;
    }
    if (n == "include" || n == "import" || n == "from" || n == "extends" || n == "block") {
      syntax_error(
          tok.line,
          "'" + n + "' is not supported: templates are sandboxed and cannot load other templates");
    }
    std::string msg = "Encountered unknown tag '" + n + "'.";
    if (!open_ends.empty()) {
      msg += " Jinja was looking for the following tags: ";
      for (size_t k = 0; k < open_ends.size(); ++k) msg += (k ? " or '" : "'") + open_ends[k] + "'";
      msg += ".";
    }
    syntax_error(tok.line, msg);
  }

  StmtPtr parse_for() {
    auto s = std::make_unique<Stmt>();
    s->kind = StmtKind::kFor;
    s->line = next().line;
    s->target = parse_target(false, "in");
    if (!skip_name("in")) syntax_error(cur().line, "expected 'in', got " + describe(cur()));
    s->expr = parse_tuple(false, false, {"recursive"}, false);
    if (skip_name("if")) s->cond = parse_expression(true);
    if (is_name("recursive")) syntax_error(cur().line, "recursive for loops are not supported");
    ++loop_depth_;
    s->body = parse_statements({"endfor", "else"}, "for", s->line, false);
    --loop_depth_;
    if (next().value == "else") {
      s->else_body = parse_statements({"endfor"}, "for", s->line, true);
    }
    return s;
  }

  StmtPtr parse_if() {
    auto s = std::make_unique<Stmt>();
    s->kind = StmtKind::kIf;
    s->line = next().line;
    while (true) {
      ExprPtr cond = parse_tuple(false, false, {}, false);
      Body body = parse_statements({"elif", "else", "endif"}, "if", s->line, false);
      s->branches.emplace_back(std::move(cond), std::move(body));
      std::string t = next().value;
      if (t == "elif") continue;
      if (t == "else") s->else_body = parse_statements({"endif"}, "if", s->line, true);
      break;
    }
    return s;
  }

  StmtPtr parse_set() {
    auto s = std::make_unique<Stmt>();
    s->line = next().line;
    s->target = parse_target(true);
    if (skip_op("=")) {
      s->kind = StmtKind::kSet;
      s->expr = parse_tuple(false, true, {}, false);
      return s;
    }
    s->kind = StmtKind::kSetBlock;
    parse_filters(nullptr, false, &s->filters);
    s->body = parse_statements({"endset"}, "set", s->line, true);
    return s;
  }

  void parse_signature(Stmt* s) {
    expect_op("(");
    while (!is_op(")")) {
      if (!s->params.empty()) expect_op(",");
      Param p;
      p.name = expect_name();
      if (skip_op("=")) {
        p.default_value = parse_expression(true);
      } else if (!s->params.empty() && s->params.back().default_value) {
        syntax_error(cur().line, "non-default argument follows default argument");
      }
      s->params.push_back(std::move(p));
    }
    expect_op(")");
  }

  StmtPtr parse_macro() {
    auto s = std::make_unique<Stmt>();
    s->kind = StmtKind::kMacro;
    s->line = next().line;
    s->name = expect_name();
    parse_signature(s.get());
    macros_.push_back(s.get());
    int saved_loops = loop_depth_;
    loop_depth_ = 0;
    s->body = parse_statements({"endmacro"}, "macro", s->line, true);
    loop_depth_ = saved_loops;
    macros_.pop_back();
    return s;
  }

  StmtPtr parse_call_block() {
    auto s = std::make_unique<Stmt>();
    s->kind = StmtKind::kCallBlock;
    s->line = next().line;
    if (is_op("(")) parse_signature(s.get());
    s->expr = parse_expression(true);
    if (s->expr->kind != ExprKind::kCall) syntax_error(s->line, "expected call");
    macros_.push_back(s.get());
    s->body = parse_statements({"endcall"}, "call", s->line, true);
    macros_.pop_back();
    return s;
  }

  // A for/set/with target: name, names separated by commas (optionally parenthesized), or,
  // with `allow_ns`, name.attr.
  Target parse_target(bool allow_ns, const char* end_name = nullptr) {
    Target t;
    if (allow_ns && cur().type == Tok::kName && peek().type == Tok::kOp && peek().value == ".") {
      t.names.push_back(next().value);
      next();
      t.attr = expect_name();
      return t;
    }
    bool paren = skip_op("(");
    while (true) {
      if (cur().type != Tok::kName) {
        syntax_error(cur().line, "can't assign to " + describe(cur()));
      }
      std::string name = next().value;
      if (name == "true" || name == "false" || name == "none" || name == "True" ||
          name == "False" || name == "None") {
        syntax_error(cur().line, "can't assign to constant '" + name + "'");
      }
      t.names.push_back(name);
      if (!skip_op(",")) break;
      t.tuple = true;
      if (paren && is_op(")")) break;
      if (end_name && is_name(end_name)) break;
      if (cur().type != Tok::kName) break;
    }
    if (paren) expect_op(")");
    return t;
  }

  // ---- expressions -------------------------------------------------------------------------

  bool is_tuple_end(const std::vector<std::string>& extra) const {
    if (cur().type == Tok::kVarEnd || cur().type == Tok::kBlockEnd || cur().type == Tok::kEof)
      return true;
    if (is_op(")")) return true;
    for (const auto& e : extra) {
      if (cur().type == Tok::kName && cur().value == e) return true;
    }
    return false;
  }

  ExprPtr parse_tuple(bool simplified, bool with_condexpr, const std::vector<std::string>& extra,
                      bool explicit_parens) {
    int line = cur().line;
    std::vector<ExprPtr> args;
    bool is_tuple = false;
    while (true) {
      if (!args.empty()) expect_op(",");
      if (is_tuple_end(extra)) break;
      if (simplified) {
        args.push_back(parse_primary());
      } else {
        args.push_back(parse_expression(with_condexpr));
      }
      if (is_op(",")) {
        is_tuple = true;
      } else {
        break;
      }
    }
    if (!is_tuple) {
      if (!args.empty()) return std::move(args[0]);
      if (!explicit_parens)
        syntax_error(cur().line, "Expected an expression, got " + describe(cur()));
    }
    auto e = node(ExprKind::kTuple, line);
    e->args = std::move(args);
    return seal(std::move(e));
  }

  ExprPtr parse_expression(bool with_condexpr) {
    return with_condexpr ? parse_condexpr() : parse_or();
  }

  ExprPtr parse_condexpr() {
    Guard g(this);
    int line = cur().line;
    ExprPtr expr1 = parse_or();
    while (skip_name("if")) {
      ExprPtr expr2 = parse_or();
      ExprPtr expr3;
      if (skip_name("else")) expr3 = parse_condexpr();
      auto e = node(ExprKind::kCond, line);
      e->args.push_back(std::move(expr2));
      e->args.push_back(std::move(expr1));
      e->args.push_back(std::move(expr3));
      expr1 = seal(std::move(e));
      line = cur().line;
    }
    return expr1;
  }

  ExprPtr parse_or() {
    int line = cur().line;
    ExprPtr left = parse_and();
    while (skip_name("or")) {
      auto e = node(ExprKind::kOr, line);
      e->args.push_back(std::move(left));
      e->args.push_back(parse_and());
      left = seal(std::move(e));
      line = cur().line;
    }
    return left;
  }

  ExprPtr parse_and() {
    int line = cur().line;
    ExprPtr left = parse_not();
    while (skip_name("and")) {
      auto e = node(ExprKind::kAnd, line);
      e->args.push_back(std::move(left));
      e->args.push_back(parse_not());
      left = seal(std::move(e));
      line = cur().line;
    }
    return left;
  }

  ExprPtr parse_not() {
    Guard g(this);
    if (is_name("not")) {
      auto e = node(ExprKind::kNot, next().line);
      e->args.push_back(parse_not());
      return seal(std::move(e));
    }
    return parse_compare();
  }

  ExprPtr parse_compare() {
    int line = cur().line;
    ExprPtr first = parse_math1();
    std::vector<ExprPtr> operands;
    std::vector<std::string> ops;
    while (true) {
      if (cur().type == Tok::kOp &&
          (cur().value == "==" || cur().value == "!=" || cur().value == "<" ||
           cur().value == "<=" || cur().value == ">" || cur().value == ">=")) {
        ops.push_back(next().value);
      } else if (skip_name("in")) {
        ops.push_back("in");
      } else if (is_name("not") && peek().type == Tok::kName && peek().value == "in") {
        next();
        next();
        ops.push_back("notin");
      } else {
        break;
      }
      operands.push_back(parse_math1());
    }
    if (ops.empty()) return first;
    auto e = node(ExprKind::kCompare, line);
    e->args.push_back(std::move(first));
    for (auto& o : operands) e->args.push_back(std::move(o));
    e->ops = std::move(ops);
    return seal(std::move(e));
  }

  ExprPtr binary(const std::string& op, ExprPtr l, ExprPtr r, int line) {
    auto e = node(ExprKind::kBinary, line);
    e->name = op;
    e->args.push_back(std::move(l));
    e->args.push_back(std::move(r));
    return seal(std::move(e));
  }

  ExprPtr parse_math1() {
    int line = cur().line;
    ExprPtr left = parse_concat();
    while (is_op("+") || is_op("-")) {
      std::string op = next().value;
      left = binary(op, std::move(left), parse_concat(), line);
      line = cur().line;
    }
    return left;
  }

  ExprPtr parse_concat() {
    int line = cur().line;
    ExprPtr first = parse_math2();
    if (!is_op("~")) return first;
    auto e = node(ExprKind::kConcat, line);
    e->args.push_back(std::move(first));
    while (skip_op("~")) e->args.push_back(parse_math2());
    return seal(std::move(e));
  }

  ExprPtr parse_math2() {
    int line = cur().line;
    ExprPtr left = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      std::string op = next().value;
      left = binary(op, std::move(left), parse_pow(), line);
      line = cur().line;
    }
    return left;
  }

  ExprPtr parse_pow() {
    int line = cur().line;
    ExprPtr left = parse_unary(true);
    while (skip_op("**")) {
      left = binary("**", std::move(left), parse_unary(true), line);
      line = cur().line;
    }
    return left;
  }

  ExprPtr parse_unary(bool with_filter) {
    Guard g(this);
    int line = cur().line;
    ExprPtr n;
    if (is_op("-") || is_op("+")) {
      bool neg = next().value == "-";
      n = node(neg ? ExprKind::kNeg : ExprKind::kPos, line);
      n->args.push_back(parse_unary(false));
      n = seal(std::move(n));
    } else {
      n = parse_primary();
    }
    n = parse_postfix(std::move(n));
    if (with_filter) n = parse_filter_expr(std::move(n));
    return n;
  }

  ExprPtr parse_primary() {
    Guard g(this);
    const Token& t = cur();
    int line = t.line;
    if (t.type == Tok::kName) {
      std::string v = next().value;
      auto e = node(ExprKind::kConst, line);
      if (v == "true" || v == "True") {
        e->value = Value::boolean(true);
      } else if (v == "false" || v == "False") {
        e->value = Value::boolean(false);
      } else if (v == "none" || v == "None") {
        e->value = Value::none();
      } else {
        e->kind = ExprKind::kName;
        e->name = v;
        if (v == "varargs" || v == "kwargs" || v == "caller") {
          for (Stmt* m : macros_) {
            if (v == "varargs") m->uses_varargs = true;
            if (v == "kwargs") m->uses_kwargs = true;
            if (v == "caller") m->uses_caller = true;
          }
        }
      }
      return e;
    }
    if (t.type == Tok::kString) {
      std::string s;
      while (cur().type == Tok::kString) s += next().value;
      auto e = node(ExprKind::kConst, line);
      e->value = Value::str(std::move(s));
      return e;
    }
    if (t.type == Tok::kInt || t.type == Tok::kFloat) {
      Token n = next();
      auto e = node(ExprKind::kConst, line);
      e->value = n.type == Tok::kInt ? Value::integer(n.ival) : Value::real(n.fval);
      return e;
    }
    if (is_op("(")) {
      next();
      ExprPtr e = parse_tuple(false, true, {}, true);
      expect_op(")");
      return e;
    }
    if (is_op("[")) {
      next();
      auto e = node(ExprKind::kList, line);
      while (!is_op("]")) {
        if (!e->args.empty()) expect_op(",");
        if (is_op("]")) break;
        e->args.push_back(parse_expression(true));
      }
      expect_op("]");
      return seal(std::move(e));
    }
    if (is_op("{")) {
      next();
      auto e = node(ExprKind::kDict, line);
      while (!is_op("}")) {
        if (!e->args.empty()) expect_op(",");
        if (is_op("}")) break;
        e->args.push_back(parse_expression(true));
        expect_op(":");
        e->args.push_back(parse_expression(true));
      }
      expect_op("}");
      return seal(std::move(e));
    }
    syntax_error(line, "unexpected " + describe(t));
  }

  ExprPtr parse_postfix(ExprPtr n) {
    while (true) {
      if (is_op(".")) {
        int line = next().line;
        if (cur().type == Tok::kName) {
          auto e = node(ExprKind::kAttr, line);
          e->name = next().value;
          e->args.push_back(std::move(n));
          n = seal(std::move(e));
        } else if (cur().type == Tok::kInt) {
          auto e = node(ExprKind::kItem, line);
          auto k = node(ExprKind::kConst, line);
          k->value = Value::integer(next().ival);
          e->args.push_back(std::move(n));
          e->args.push_back(std::move(k));
          n = seal(std::move(e));
        } else {
          syntax_error(cur().line, "expected name or number");
        }
      } else if (is_op("[")) {
        n = parse_subscript(std::move(n));
      } else if (is_op("(")) {
        n = parse_call(std::move(n));
      } else {
        break;
      }
    }
    return n;
  }

  ExprPtr parse_subscript(ExprPtr obj) {
    int line = next().line;      // '['
    std::vector<ExprPtr> parts;  // each an expression or a kSlice with args[0] unset
    while (!is_op("]")) {
      if (!parts.empty()) expect_op(",");
      parts.push_back(parse_subscribed());
    }
    expect_op("]");
    if (parts.empty()) syntax_error(line, "expected subscript expression");
    if (parts.size() == 1 && parts[0]->kind == ExprKind::kSlice) {
      parts[0]->args[0] = std::move(obj);
      return seal(std::move(parts[0]));
    }
    auto e = node(ExprKind::kItem, line);
    e->args.push_back(std::move(obj));
    if (parts.size() == 1) {
      e->args.push_back(std::move(parts[0]));
    } else {
      auto t = node(ExprKind::kTuple, line);
      for (auto& p : parts) {
        if (p->kind == ExprKind::kSlice)
          syntax_error(line, "multi-dimensional slices are not supported");
        t->args.push_back(std::move(p));
      }
      e->args.push_back(seal(std::move(t)));
    }
    return seal(std::move(e));
  }

  ExprPtr parse_subscribed() {
    int line = cur().line;
    std::vector<ExprPtr> args;
    if (skip_op(":")) {
      args.push_back(nullptr);
    } else {
      ExprPtr n = parse_expression(true);
      if (!is_op(":")) return n;
      next();
      args.push_back(std::move(n));
    }
    if (is_op(":") || is_op("]") || is_op(",")) {
      args.push_back(nullptr);
    } else {
      args.push_back(parse_expression(true));
    }
    if (skip_op(":")) {
      if (is_op("]") || is_op(",")) {
        args.push_back(nullptr);
      } else {
        args.push_back(parse_expression(true));
      }
    } else {
      args.push_back(nullptr);
    }
    auto e = node(ExprKind::kSlice, line);
    e->args.push_back(nullptr);  // the sliced object, filled by parse_subscript
    for (auto& a : args) e->args.push_back(std::move(a));
    return e;
  }

  void parse_call_args(CallExpr* c) {
    int line = cur().line;
    expect_op("(");
    bool require_comma = false;
    auto ensure = [&](bool ok) {
      if (!ok) syntax_error(line, "invalid syntax for function call expression");
    };
    while (!is_op(")")) {
      if (require_comma) {
        expect_op(",");
        if (is_op(")")) break;
      }
      if (is_op("*")) {
        ensure(!c->star && !c->starstar);
        next();
        c->star = parse_expression(true);
      } else if (is_op("**")) {
        ensure(!c->starstar);
        next();
        c->starstar = parse_expression(true);
      } else if (cur().type == Tok::kName && peek().type == Tok::kOp && peek().value == "=") {
        ensure(!c->starstar);
        std::string key = next().value;
        next();
        c->kw.emplace_back(key, parse_expression(true));
      } else {
        ensure(!c->star && !c->starstar && c->kw.empty());
        c->pos.push_back(parse_expression(true));
      }
      require_comma = true;
    }
    expect_op(")");
  }

  ExprPtr parse_call(ExprPtr callee) {
    auto e = node(ExprKind::kCall, cur().line);
    parse_call_args(&e->call);
    e->args.push_back(std::move(callee));
    return seal(std::move(e));
  }

  // Filters after `|` (or, with start_inline, a first filter without one). With a null operand
  // the chain is stored in `chain` for filter blocks / block sets; otherwise it returns the node.
  ExprPtr parse_filters(ExprPtr operand, bool start_inline, std::vector<ExprPtr>* chain) {
    while (is_op("|") || start_inline) {
      if (!start_inline) next();
      start_inline = false;
      int line = cur().line;
      std::string name = expect_name();
      while (is_op(".")) {
        next();
        name += '.';
        name += expect_name();
      }
      auto e = node(ExprKind::kFilter, line);
      e->name = name;
      if (is_op("(")) parse_call_args(&e->call);
      if (chain) {
        e->args.push_back(nullptr);
        chain->push_back(seal(std::move(e)));
      } else {
        e->args.push_back(std::move(operand));
        operand = seal(std::move(e));
      }
    }
    return operand;
  }

  ExprPtr parse_filter_expr(ExprPtr n) {
    while (true) {
      if (is_op("|")) {
        n = parse_filters(std::move(n), false, nullptr);
      } else if (is_name("is")) {
        n = parse_test(std::move(n));
      } else if (is_op("(")) {
        n = parse_call(std::move(n));
      } else {
        break;
      }
    }
    return n;
  }

  ExprPtr parse_test(ExprPtr operand) {
    int line = next().line;  // 'is'
    bool negated = skip_name("not");
    std::string name = expect_name();
    while (is_op(".")) {
      next();
      name += '.';
      name += expect_name();
    }
    auto e = node(ExprKind::kTest, line);
    e->name = name;
    e->negated = negated;
    const Token& t = cur();
    if (is_op("(")) {
      parse_call_args(&e->call);
    } else if ((t.type == Tok::kName || t.type == Tok::kString || t.type == Tok::kInt ||
                t.type == Tok::kFloat || is_op("[") || is_op("{")) &&
               !is_name("else") && !is_name("or") && !is_name("and")) {
      if (is_name("is")) syntax_error(t.line, "You cannot chain multiple tests with is");
      e->call.pos.push_back(parse_postfix(parse_primary()));
    }
    e->args.push_back(std::move(operand));
    return seal(std::move(e));
  }

  std::vector<Token> t_;
  size_t p_ = 0;
  int depth_ = 0;
  int loop_depth_ = 0;
  std::vector<Stmt*> macros_;
};

}  // namespace

void parse(std::string_view source, Program& program) {
  Lexer lexer(source, program.opts);
  Parser parser(lexer.run());
  program.body = parser.parse_template();
}

}  // namespace kiln::jinja
