// Python str/list/dict methods and the template globals (range, dict, namespace, joiner, cycler,
// raise_exception, strftime_now), following CPython and jinja2 3.1.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <numeric>

#include "tokenizer/jinja_internal.h"

namespace kiln::jinja {

// ---- methods ----------------------------------------------------------------------------------

namespace {

using MethodFn = Value (*)(Interp&, const Value&, CallArgs&);

// Code-point view of a str method's [start:end] window.
struct Window {
  std::u32string text;
  size_t offset = 0;  // code points before the window
};

Window window(const std::string& s, const Value& start, const Value& end) {
  Window w;
  w.text = decode_utf8(s);
  if (start.is_none() && end.is_none()) return w;
  auto n = static_cast<int64_t>(w.text.size());
  auto norm = [n](const Value& v, int64_t dflt) {
    if (v.is_none()) return dflt;
    int64_t x = int_arg(v, "slice index");
    if (x < 0) x = std::max<int64_t>(0, x + n);
    return std::min(x, n);
  };
  int64_t b = norm(start, 0), e = norm(end, n);
  if (e < b) e = b;
  w.offset = static_cast<size_t>(b);
  w.text = w.text.substr(b, e - b);
  return w;
}

Value m_affix(const Value& self, CallArgs& a, bool prefix) {
  Bound b = bind(prefix ? "startswith" : "endswith", a, {"prefix", "start", "end"}, 1);
  Window w = window(self.s, b[1], b[2]);
  std::vector<Value> options;
  if (b[0].is_list() && b[0].list->kind == ListKind::kTuple) {
    options = b[0].list->items;
  } else {
    options.push_back(b[0]);
  }
  for (const auto& o : options) {
    std::u32string needle = decode_utf8(str_arg(o, prefix ? "startswith arg" : "endswith arg"));
    if (needle.size() > w.text.size()) continue;
    if (prefix ? w.text.compare(0, needle.size(), needle) == 0
               : w.text.compare(w.text.size() - needle.size(), needle.size(), needle) == 0) {
      return Value::boolean(true);
    }
  }
  return Value::boolean(false);
}

Value m_startswith(Interp&, const Value& self, CallArgs& a) {
  return m_affix(self, a, true);
}
Value m_endswith(Interp&, const Value& self, CallArgs& a) {
  return m_affix(self, a, false);
}

Value m_strip(Interp&, const Value& self, CallArgs& a) {
  return Value::str(py_strip(self.s, bind("strip", a, {"chars"})[0], true, true));
}
Value m_lstrip(Interp&, const Value& self, CallArgs& a) {
  return Value::str(py_strip(self.s, bind("lstrip", a, {"chars"})[0], true, false));
}
Value m_rstrip(Interp&, const Value& self, CallArgs& a) {
  return Value::str(py_strip(self.s, bind("rstrip", a, {"chars"})[0], false, true));
}

Value split_impl(Interp& in, const Value& self, CallArgs& a, bool right) {
  Bound b = bind(right ? "rsplit" : "split", a, {"sep", "maxsplit"});
  int64_t maxsplit = b.has(1) ? int_arg(b[1], "maxsplit") : -1;
  std::vector<Value> out;
  for (auto& p : py_split(self.s, b[0], maxsplit, right)) out.push_back(Value::str(std::move(p)));
  in.tick(out.size());
  return make_list(std::move(out));
}
Value m_split(Interp& in, const Value& self, CallArgs& a) {
  return split_impl(in, self, a, false);
}
Value m_rsplit(Interp& in, const Value& self, CallArgs& a) {
  return split_impl(in, self, a, true);
}

Value m_splitlines(Interp& in, const Value& self, CallArgs& a) {
  Bound b = bind("splitlines", a, {"keepends"});
  std::vector<Value> out;
  for (auto& p : py_splitlines(self.s, truthy(b[0]))) out.push_back(Value::str(std::move(p)));
  in.tick(out.size());
  return make_list(std::move(out));
}

Value m_replace(Interp& in, const Value& self, CallArgs& a) {
  Bound b = bind("replace", a, {"old", "new", "count"}, 2);
  int64_t count = b.has(2) ? int_arg(b[2], "count") : -1;
  std::string s =
      py_replace(self.s, str_arg(b[0], "replace arg"), str_arg(b[1], "replace arg"), count);
  in.check_size(s.size());
  return Value::str(std::move(s));
}

Value m_upper(Interp&, const Value& self, CallArgs& a) {
  bind("upper", a, {});
  return Value::str(py_upper(self.s));
}
Value m_lower(Interp&, const Value& self, CallArgs& a) {
  bind("lower", a, {});
  return Value::str(py_lower(self.s));
}
Value m_title(Interp&, const Value& self, CallArgs& a) {
  bind("title", a, {});
  return Value::str(py_title(self.s));
}
Value m_capitalize(Interp&, const Value& self, CallArgs& a) {
  bind("capitalize", a, {});
  return Value::str(py_capitalize(self.s));
}
Value m_swapcase(Interp&, const Value& self, CallArgs& a) {
  bind("swapcase", a, {});
  std::string out;
  for (char32_t c : decode_utf8(self.s))
    append_utf8(out, is_upper(c) ? to_lower(c) : is_lower(c) ? to_upper(c) : c);
  return Value::str(std::move(out));
}

int64_t find_impl(const Value& self, CallArgs& a, const char* name, bool right) {
  Bound b = bind(name, a, {"sub", "start", "end"}, 1);
  Window w = window(self.s, b[1], b[2]);
  std::u32string needle = decode_utf8(str_arg(b[0], "substring"));
  size_t pos = right ? w.text.rfind(needle) : w.text.find(needle);
  if (pos == std::u32string::npos) return -1;
  return static_cast<int64_t>(pos + w.offset);
}
Value m_find(Interp&, const Value& self, CallArgs& a) {
  return Value::integer(find_impl(self, a, "find", false));
}
Value m_rfind(Interp&, const Value& self, CallArgs& a) {
  return Value::integer(find_impl(self, a, "rfind", true));
}
Value m_index(Interp&, const Value& self, CallArgs& a) {
  int64_t r = find_impl(self, a, "index", false);
  if (r < 0) fail("substring not found");
  return Value::integer(r);
}
Value m_rindex(Interp&, const Value& self, CallArgs& a) {
  int64_t r = find_impl(self, a, "rindex", true);
  if (r < 0) fail("substring not found");
  return Value::integer(r);
}

Value m_count(Interp&, const Value& self, CallArgs& a) {
  Bound b = bind("count", a, {"sub", "start", "end"}, 1);
  Window w = window(self.s, b[1], b[2]);
  std::u32string needle = decode_utf8(str_arg(b[0], "substring"));
  if (needle.empty()) return Value::integer(static_cast<int64_t>(w.text.size() + 1));
  int64_t n = 0;
  for (size_t pos = w.text.find(needle); pos != std::u32string::npos;
       pos = w.text.find(needle, pos + needle.size()))
    ++n;
  return Value::integer(n);
}

Value m_join(Interp& in, const Value& self, CallArgs& a) {
  Bound b = bind("join", a, {"iterable"}, 1);
  std::string out;
  size_t n = 0;
  for (const auto& item : seq(in, b[0])) {
    if (!item.is_string()) {
      fail("sequence item " + std::to_string(n) + ": expected str instance, " + type_name(item) +
           " found");
    }
    if (n++) out += self.s;
    out += item.s;
    in.check_size(out.size());
  }
  return Value::str(std::move(out));
}

Value m_pad(Interp& in, const Value& self, CallArgs& a, char mode) {
  Bound b = bind(mode == 'c'   ? "center"
                 : mode == 'l' ? "ljust"
                               : "rjust",
                 a, {"width", "fillchar"}, 1);
  int64_t width = int_arg(b[0], "width");
  // Up to 4 bytes per fill char; checked in two steps so width * 4 cannot wrap around.
  in.check_size(static_cast<size_t>(std::max<int64_t>(width, 0)));
  in.check_size(static_cast<size_t>(std::max<int64_t>(width, 0)) * 4);
  char32_t fill = ' ';
  if (b.has(1)) {
    std::u32string f = decode_utf8(str_arg(b[1], "fillchar"));
    if (f.size() != 1) fail("The fill character must be exactly one character long");
    fill = f[0];
  }
  if (mode == 'c') return Value::str(center(self.s, width, fill));
  auto len = static_cast<int64_t>(count_code_points(self.s));
  std::string pad;
  for (int64_t n = len; n < width; ++n) append_utf8(pad, fill);
  return Value::str(mode == 'l' ? self.s + pad : pad + self.s);
}
Value m_center(Interp& in, const Value& self, CallArgs& a) {
  return m_pad(in, self, a, 'c');
}
Value m_ljust(Interp& in, const Value& self, CallArgs& a) {
  return m_pad(in, self, a, 'l');
}
Value m_rjust(Interp& in, const Value& self, CallArgs& a) {
  return m_pad(in, self, a, 'r');
}

Value m_zfill(Interp& in, const Value& self, CallArgs& a) {
  int64_t width = int_arg(bind("zfill", a, {"width"}, 1)[0], "width");
  in.check_size(static_cast<size_t>(std::max<int64_t>(width, 0)));
  auto len = static_cast<int64_t>(count_code_points(self.s));
  if (len >= width) return self;
  std::string s = self.s;
  std::string sign;
  if (!s.empty() && (s[0] == '+' || s[0] == '-')) {
    sign = s.substr(0, 1);
    s = s.substr(1);
  }
  return Value::str(sign + std::string(width - len, '0') + s);
}

Value m_removeprefix(Interp&, const Value& self, CallArgs& a) {
  const std::string p = str_arg(bind("removeprefix", a, {"prefix"}, 1)[0], "prefix");
  return Value::str(self.s.compare(0, p.size(), p) == 0 ? self.s.substr(p.size()) : self.s);
}
Value m_removesuffix(Interp&, const Value& self, CallArgs& a) {
  const std::string p = str_arg(bind("removesuffix", a, {"suffix"}, 1)[0], "suffix");
  bool ends = !p.empty() && self.s.size() >= p.size() &&
              self.s.compare(self.s.size() - p.size(), p.size(), p) == 0;
  return Value::str(ends ? self.s.substr(0, self.s.size() - p.size()) : self.s);
}

Value partition_impl(const Value& self, CallArgs& a, bool right) {
  const std::string sep =
      str_arg(bind(right ? "rpartition" : "partition", a, {"sep"}, 1)[0], "sep");
  if (sep.empty()) fail("empty separator");
  size_t pos = right ? self.s.rfind(sep) : self.s.find(sep);
  if (pos == std::string::npos) {
    return right ? make_list({Value::str(""), Value::str(""), self}, ListKind::kTuple)
                 : make_list({self, Value::str(""), Value::str("")}, ListKind::kTuple);
  }
  return make_list({Value::str(self.s.substr(0, pos)), Value::str(sep),
                    Value::str(self.s.substr(pos + sep.size()))},
                   ListKind::kTuple);
}
Value m_partition(Interp&, const Value& self, CallArgs& a) {
  return partition_impl(self, a, false);
}
Value m_rpartition(Interp&, const Value& self, CallArgs& a) {
  return partition_impl(self, a, true);
}

template <bool (*Pred)(char32_t)>
Value char_class(Interp&, const Value& self, CallArgs& a) {
  bind("is*", a, {});
  std::u32string u = decode_utf8(self.s);
  if (u.empty()) return Value::boolean(false);
  return Value::boolean(std::all_of(u.begin(), u.end(), Pred));
}
bool is_alnum(char32_t c) {
  return is_alpha(c) || is_digit(c);
}

Value m_isascii(Interp&, const Value& self, CallArgs& a) {
  bind("isascii", a, {});
  return Value::boolean(is_ascii(self.s));
}
Value m_islower(Interp& in, const Value& self, CallArgs& a) {
  return Value::boolean(run_test(in, "lower", self, a));
}
Value m_isupper(Interp& in, const Value& self, CallArgs& a) {
  return Value::boolean(run_test(in, "upper", self, a));
}

// str.format with positional/keyword fields, !r/!s conversions and simple format specs.
std::string format_spec(const Value& v, const std::string& spec) {
  if (spec.empty()) return to_str(v);
  size_t i = 0;
  char32_t fill = ' ';
  char align = 0;
  std::u32string u = decode_utf8(spec);
  if (u.size() >= 2 && (u[1] == '<' || u[1] == '>' || u[1] == '^')) {
    fill = u[0];
    align = static_cast<char>(u[1]);
    i = 2;
  } else if (!u.empty() && (u[0] == '<' || u[0] == '>' || u[0] == '^')) {
    align = static_cast<char>(u[0]);
    i = 1;
  }
  std::string rest = encode_utf8(std::u32string_view(u).substr(i));
  size_t p = 0;
  std::string sign;
  if (p < rest.size() && (rest[p] == '+' || rest[p] == '-' || rest[p] == ' ')) sign = rest[p++];
  if (p < rest.size() && rest[p] == '0' && !align) {
    fill = '0';
    align = '=';
    ++p;
  }
  int64_t width = 0;
  while (p < rest.size() && rest[p] >= '0' && rest[p] <= '9')
    width = std::min<int64_t>(width * 10 + (rest[p++] - '0'), 4096);
  int precision = -1;
  if (p < rest.size() && rest[p] == '.') {
    ++p;
    precision = 0;
    while (p < rest.size() && rest[p] >= '0' && rest[p] <= '9')
      precision = std::min(precision * 10 + (rest[p++] - '0'), 300);
  }
  char type = p < rest.size() ? rest[p++] : 0;
  if (p != rest.size()) fail("unsupported format spec '" + spec + "'");
  std::string body;
  char buf[512];
  if (type == 0 || type == 's') {
    if (type == 's' && !v.is_string())
      fail("Unknown format code 's' for object of type '" + type_name(v) + "'");
    if (v.is_number() && type == 0 && (precision >= 0 || !sign.empty())) {
      type = v.is_int() ? 'd' : 'g';
    } else {
      body = to_str(v);
      if (precision >= 0) {
        std::u32string b = decode_utf8(body);
        if (static_cast<int>(b.size()) > precision)
          body = encode_utf8(std::u32string_view(b).substr(0, precision));
      }
      if (!align) align = v.is_number() ? '>' : '<';
    }
  }
  if (body.empty() && type != 0 && type != 's') {
    if (!v.is_number())
      fail(std::string("Unknown format code '") + type + "' for object of type '" + type_name(v) +
           "'");
    std::string f = "%" + sign;
    if (type == 'd' || type == 'x' || type == 'X' || type == 'o' || type == 'b') {
      if (!v.is_int())
        fail(std::string("Unknown format code '") + type + "' for object of type 'float'");
      if (type == 'b') {
        uint64_t x = v.i < 0 ? static_cast<uint64_t>(-(v.i + 1)) + 1 : static_cast<uint64_t>(v.i);
        std::string bits;
        do {
          bits.insert(bits.begin(), static_cast<char>('0' + (x & 1)));
          x >>= 1;
        } while (x);
        body = (v.i < 0 ? "-" : sign == "+" ? "+" : sign == " " ? " " : "") + bits;
      } else {
        std::snprintf(buf, sizeof(buf), (f + "ll" + type).c_str(), static_cast<long long>(v.i));
        body = buf;
      }
    } else if (type == 'f' || type == 'F' || type == 'e' || type == 'E' || type == 'g' ||
               type == 'G' || type == '%') {
      double x = v.as_double() * (type == '%' ? 100 : 1);
      std::string p2 = precision >= 0 ? "." + std::to_string(precision)
                                      : (type == 'g' || type == 'G' ? "" : ".6");
      std::snprintf(buf, sizeof(buf), (f + p2 + (type == '%' ? 'f' : type)).c_str(), x);
      body = buf;
      if (type == '%') body += '%';
    } else {
      fail("unsupported format spec '" + spec + "'");
    }
    if (!align) align = '>';
  }
  auto len = static_cast<int64_t>(count_code_points(body));
  if (len >= width) return body;
  std::string pad;
  int64_t total = width - len;
  auto fill_n = [&](int64_t n) {
    std::string s;
    for (int64_t k = 0; k < n; ++k) append_utf8(s, fill);
    return s;
  };
  if (align == '<') return body + fill_n(total);
  if (align == '^') return fill_n(total / 2) + body + fill_n(total - total / 2);
  if (align == '=' && !body.empty() && (body[0] == '-' || body[0] == '+' || body[0] == ' ')) {
    return body.substr(0, 1) + fill_n(total) + body.substr(1);
  }
  return fill_n(total) + body;
}

Value m_format(Interp& in, const Value& self, CallArgs& a) {
  const std::string& fmt = self.s;
  std::string out;
  size_t auto_idx = 0;
  int numbering = 0;  // 1 automatic, 2 manual: Python refuses to mix them
  for (size_t i = 0; i < fmt.size();) {
    char c = fmt[i];
    if (c == '{' && i + 1 < fmt.size() && fmt[i + 1] == '{') {
      out += '{';
      i += 2;
      continue;
    }
    if (c == '}') {
      if (i + 1 < fmt.size() && fmt[i + 1] == '}') {
        out += '}';
        i += 2;
        continue;
      }
      fail("Single '}' encountered in format string");
    }
    if (c != '{') {
      out += c;
      ++i;
      continue;
    }
    size_t close = fmt.find('}', i);
    if (close == std::string::npos) fail("Single '{' encountered in format string");
    std::string field = fmt.substr(i + 1, close - i - 1);
    i = close + 1;
    std::string spec, conv;
    if (size_t colon = field.find(':'); colon != std::string::npos) {
      spec = field.substr(colon + 1);
      field = field.substr(0, colon);
    }
    if (size_t bang = field.find('!'); bang != std::string::npos) {
      conv = field.substr(bang + 1);
      field = field.substr(0, bang);
    }
    // field: [name|index] followed by .attr / [key] accessors.
    size_t end = field.find_first_of(".[");
    std::string head = field.substr(0, end);
    Value v;
    bool is_index =
        std::all_of(head.begin(), head.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
    if (head.empty() || is_index) {
      int mode = head.empty() ? 1 : 2;
      if (numbering && numbering != mode) {
        fail(mode == 1
                 ? "cannot switch from manual field specification to automatic field numbering"
                 : "cannot switch from automatic field numbering to manual field specification");
      }
      numbering = mode;
    }
    if (head.empty()) {
      if (auto_idx >= a.pos.size())
        fail("Replacement index " + std::to_string(auto_idx) +
             " out of range for positional args tuple");
      v = a.pos[auto_idx++];
    } else if (is_index) {
      auto idx = static_cast<size_t>(parse_digits(head));
      if (idx >= a.pos.size())
        fail("Replacement index " + head + " out of range for positional args tuple");
      v = a.pos[idx];
    } else {
      bool found = false;
      for (const auto& [k, val] : a.kw) {
        if (k == head) {
          v = val;
          found = true;
        }
      }
      if (!found) fail("KeyError: '" + head + "'");
    }
    while (end != std::string::npos && end < field.size()) {
      if (field[end] == '.') {
        size_t next = field.find_first_of(".[", end + 1);
        v = in.getattr(v, field.substr(end + 1, next == std::string::npos ? std::string::npos
                                                                          : next - end - 1));
        end = next;
      } else {
        size_t rb = field.find(']', end);
        if (rb == std::string::npos) fail("Missing ']' in format string");
        std::string key = field.substr(end + 1, rb - end - 1);
        bool digits = !key.empty() && std::all_of(key.begin(), key.end(),
                                                  [](char ch) { return ch >= '0' && ch <= '9'; });
        v = in.getitem(v, digits ? Value::integer(parse_digits(key)) : Value::str(key));
        end = rb + 1 < field.size() ? rb + 1 : std::string::npos;
      }
    }
    if (conv == "r" || conv == "a") {
      v = Value::str(repr(v));
    } else if (conv == "s") {
      v = Value::str(to_str(v));
    } else if (!conv.empty()) {
      fail("Unknown conversion specifier " + conv);
    }
    out += format_spec(v, spec);
    in.check_size(out.size());
  }
  return Value::str(std::move(out));
}

// dict methods
Value m_items(Interp& in, const Value& self, CallArgs& a) {
  bind("items", a, {});
  in.tick(self.dict->items.size());
  std::vector<Value> out;
  for (const auto& [k, v] : self.dict->items) out.push_back(make_list({k, v}, ListKind::kTuple));
  return make_list(std::move(out), ListKind::kDictItems);
}
Value m_keys(Interp& in, const Value& self, CallArgs& a) {
  bind("keys", a, {});
  in.tick(self.dict->items.size());
  std::vector<Value> out;
  for (const auto& kv : self.dict->items) out.push_back(kv.first);
  return make_list(std::move(out), ListKind::kDictKeys);
}
Value m_values(Interp& in, const Value& self, CallArgs& a) {
  bind("values", a, {});
  in.tick(self.dict->items.size());
  std::vector<Value> out;
  for (const auto& kv : self.dict->items) out.push_back(kv.second);
  return make_list(std::move(out), ListKind::kDictValues);
}
Value m_get(Interp&, const Value& self, CallArgs& a) {
  Bound b = bind("get", a, {"key", "default"}, 1);
  const Value* v = self.dict->find(b[0]);
  return v ? *v : b[1];
}
Value m_copy(Interp&, const Value& self, CallArgs& a) {
  bind("copy", a, {});
  return self;  // values are immutable, so sharing is a copy
}

// list methods
Value m_list_index(Interp&, const Value& self, CallArgs& a) {
  Bound b = bind("index", a, {"value"}, 1);
  const auto& items = self.list->items;
  for (size_t n = 0; n < items.size(); ++n) {
    if (equal(items[n], b[0])) return Value::integer(static_cast<int64_t>(n));
  }
  fail(repr(b[0]) + " is not in list");
}
Value m_list_count(Interp&, const Value& self, CallArgs& a) {
  Bound b = bind("count", a, {"value"}, 1);
  int64_t n = 0;
  for (const auto& v : self.list->items) n += equal(v, b[0]);
  return Value::integer(n);
}

const std::unordered_map<std::string, MethodFn>& str_methods() {
  static const std::unordered_map<std::string, MethodFn> table = {
      {"startswith", m_startswith},
      {"endswith", m_endswith},
      {"strip", m_strip},
      {"lstrip", m_lstrip},
      {"rstrip", m_rstrip},
      {"split", m_split},
      {"rsplit", m_rsplit},
      {"splitlines", m_splitlines},
      {"replace", m_replace},
      {"upper", m_upper},
      {"lower", m_lower},
      {"casefold", m_lower},
      {"title", m_title},
      {"capitalize", m_capitalize},
      {"swapcase", m_swapcase},
      {"find", m_find},
      {"rfind", m_rfind},
      {"index", m_index},
      {"rindex", m_rindex},
      {"count", m_count},
      {"join", m_join},
      {"center", m_center},
      {"ljust", m_ljust},
      {"rjust", m_rjust},
      {"zfill", m_zfill},
      {"removeprefix", m_removeprefix},
      {"removesuffix", m_removesuffix},
      {"partition", m_partition},
      {"rpartition", m_rpartition},
      {"format", m_format},
      {"isalpha", char_class<is_alpha>},
      {"isdigit", char_class<is_digit>},
      {"isdecimal", char_class<is_digit>},
      {"isnumeric", char_class<is_digit>},
      {"isalnum", char_class<is_alnum>},
      {"isspace", char_class<py_isspace>},
      {"isascii", m_isascii},
      {"islower", m_islower},
      {"isupper", m_isupper},
  };
  return table;
}

const std::unordered_map<std::string, MethodFn>& dict_methods() {
  static const std::unordered_map<std::string, MethodFn> table = {
      {"items", m_items}, {"keys", m_keys}, {"values", m_values}, {"get", m_get}, {"copy", m_copy},
  };
  return table;
}

const std::unordered_map<std::string, MethodFn>& list_methods() {
  static const std::unordered_map<std::string, MethodFn> table = {
      {"index", m_list_index},
      {"count", m_list_count},
      {"copy", m_copy},
  };
  return table;
}

}  // namespace

bool get_method(const Value& self, const std::string& name, Value* out) {
  const std::unordered_map<std::string, MethodFn>* table = nullptr;
  if (self.is_string()) table = &str_methods();
  if (self.is_dict()) table = &dict_methods();
  if (self.is_list() && !self.list->is_view()) table = &list_methods();
  if (!table) return false;
  auto it = table->find(name);
  if (it == table->end()) return false;
  MethodFn fn = it->second;
  *out = Value::object(std::make_shared<Function>(
      name, [self, fn](Interp& in, CallArgs& a) { return fn(in, self, a); }));
  return true;
}

// ---- globals ----------------------------------------------------------------------------------

namespace {

// jinja2.sandbox.MAX_RANGE
constexpr int64_t kMaxRange = 100000;

Value g_range(Interp& in, CallArgs& a) {
  if (!a.kw.empty()) fail("range() takes no keyword arguments");
  if (a.pos.empty() || a.pos.size() > 3)
    fail("range expected at most 3 arguments, got " + std::to_string(a.pos.size()));
  int64_t start = 0, stop, step = 1;
  if (a.pos.size() == 1) {
    stop = int_arg(a.pos[0], "range() argument");
  } else {
    start = int_arg(a.pos[0], "range() argument");
    stop = int_arg(a.pos[1], "range() argument");
    if (a.pos.size() == 3) step = int_arg(a.pos[2], "range() argument");
  }
  if (step == 0) fail("range() arg 3 must not be zero");
  __int128 count = 0;
  if (step > 0 && stop > start) count = ((__int128)stop - start + step - 1) / step;
  if (step < 0 && stop < start) count = ((__int128)start - stop - step - 1) / -step;
  if (count > kMaxRange) {
    fail("Range too big. The sandbox blocks ranges larger than MAX_RANGE (" +
         std::to_string(kMaxRange) + ").");
  }
  in.tick(static_cast<size_t>(count));
  std::vector<Value> out;
  out.reserve(static_cast<size_t>(count));
  for (__int128 n = 0; n < count; ++n)
    out.push_back(Value::integer(static_cast<int64_t>(start + n * step)));
  return make_list(std::move(out));
}

// dict(mapping or pairs, **kwargs); namespace() takes the same arguments.
DictData dict_from_args(const CallArgs& a, const char* fn) {
  DictData d;
  if (a.pos.size() > 1)
    fail(std::string(fn) + " expected at most 1 argument, got " + std::to_string(a.pos.size()));
  if (!a.pos.empty()) {
    const Value& src = a.pos[0];
    if (src.is_dict()) {
      for (const auto& [k, v] : src.dict->items) d.set(k, v);
    } else {
      for (const auto& pair : iterate(src)) {
        std::vector<Value> kv = iterate(pair);
        if (kv.size() != 2)
          fail("dictionary update sequence element has length " + std::to_string(kv.size()) +
               "; 2 is required");
        d.set(kv[0], kv[1]);
      }
    }
  }
  for (const auto& [k, v] : a.kw) d.set(Value::str(k), v);
  return d;
}

Value g_dict(Interp&, CallArgs& a) {
  return make_dict(dict_from_args(a, "dict"));
}

Value g_namespace(Interp& in, CallArgs& a) {
  auto ns = std::make_shared<Namespace>();
  in.track(ns);
  ns->attrs = dict_from_args(a, "namespace");
  return Value::object(ns);
}

Value g_joiner(Interp&, CallArgs& a) {
  Bound b = bind("joiner", a, {"sep"});
  std::string sep = b.has(0) ? soft_str(b[0]) : ", ";
  auto used = std::make_shared<bool>(false);
  return Value::object(std::make_shared<Function>("joiner", [sep, used](Interp&, CallArgs& c) {
    bind("joiner", c, {});
    if (!*used) {
      *used = true;
      return Value::str("");
    }
    return Value::str(sep);
  }));
}

struct Cycler : Object, std::enable_shared_from_this<Cycler> {
  std::vector<Value> items;
  size_t pos = 0;
  std::string type_name() const override { return "Cycler"; }
  std::string repr(int) const override { return "<Cycler>"; }
  void release() override {
    items = {Value()};
    pos = 0;
  }
  bool getattr(const std::string& name, Value* out) override;
};

bool Cycler::getattr(const std::string& name, Value* out) {
  auto self = shared_from_this();
  if (name == "current") {
    *out = items[pos];
  } else if (name == "next") {
    *out = Value::object(std::make_shared<Function>("next", [self](Interp&, CallArgs&) {
      Value v = self->items[self->pos];
      self->pos = (self->pos + 1) % self->items.size();
      return v;
    }));
  } else if (name == "reset") {
    *out = Value::object(std::make_shared<Function>("reset", [self](Interp&, CallArgs&) {
      self->pos = 0;
      return Value::none();
    }));
  } else {
    return false;
  }
  return true;
}

Value g_cycler(Interp& in, CallArgs& a) {
  if (a.pos.empty()) fail("at least one item has to be provided");
  auto c = std::make_shared<Cycler>();
  in.track(c);
  c->items = a.pos;
  return Value::object(c);
}

Value g_raise_exception(Interp&, CallArgs& a) {
  Bound b = bind("raise_exception", a, {"message"}, 1);
  throw RaisedError(soft_str(b[0]));
}

Value g_strftime_now(Interp& in, CallArgs& a) {
  Bound b = bind("strftime_now", a, {"format"}, 1);
  std::string fmt = str_arg(b[0], "format");
  if (fmt.size() > 1024) fail("strftime format too long");
  std::time_t t = in.opts().now >= 0 ? static_cast<std::time_t>(in.opts().now) : std::time(nullptr);
  std::tm tm{};
  localtime_r(&t, &tm);
  // Python's datetime.strftime handles %f itself (microseconds; whole seconds here).
  std::string f2 = py_replace(fmt, "%f", "000000", -1);
  std::string buf(f2.size() * 16 + 256, '\0');
  size_t n = std::strftime(buf.data(), buf.size(), f2.c_str(), &tm);
  buf.resize(n);
  return Value::str(std::move(buf));
}

using GlobalFn = Value (*)(Interp&, CallArgs&);

const std::unordered_map<std::string, GlobalFn>& globals() {
  static const std::unordered_map<std::string, GlobalFn> table = {
      {"range", g_range},
      {"dict", g_dict},
      {"namespace", g_namespace},
      {"joiner", g_joiner},
      {"cycler", g_cycler},
      {"raise_exception", g_raise_exception},
      {"strftime_now", g_strftime_now},
  };
  return table;
}

}  // namespace

bool get_global(const std::string& name, Value* out) {
  auto it = globals().find(name);
  if (it == globals().end()) return false;
  *out = Value::object(std::make_shared<Function>(name, it->second));
  return true;
}

}  // namespace kiln::jinja
