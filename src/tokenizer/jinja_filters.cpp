// Filters and tests, following jinja2 3.1's filters.py/tests.py (with transformers'
// json.dumps-based tojson) and CPython's semantics; the comments note where the reference behaviour
// is surprising. jinja_methods.cpp holds the str/list/dict methods and the globals.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <numeric>

#include "tokenizer/jinja_internal.h"

namespace kiln::jinja {

Bound bind(const char* fn, const CallArgs& a, std::initializer_list<const char*> names,
           size_t required) {
  std::vector<const char*> nm(names);
  Bound b;
  b.v.resize(nm.size(), Value::none());
  b.given.assign(nm.size(), false);
  if (a.pos.size() > nm.size()) {
    fail(std::string(fn) + "() takes at most " + std::to_string(nm.size()) + " argument(s) (" +
         std::to_string(a.pos.size()) + " given)");
  }
  for (size_t n = 0; n < a.pos.size(); ++n) {
    b.v[n] = a.pos[n];
    b.given[n] = true;
  }
  for (const auto& [k, v] : a.kw) {
    size_t idx = nm.size();
    for (size_t n = 0; n < nm.size(); ++n) {
      if (k == nm[n]) idx = n;
    }
    if (idx == nm.size())
      fail(std::string(fn) + "() got an unexpected keyword argument '" + k + "'");
    if (b.given[idx]) fail(std::string(fn) + "() got multiple values for argument '" + k + "'");
    b.v[idx] = v;
    b.given[idx] = true;
  }
  for (size_t n = 0; n < required; ++n) {
    if (!b.given[n]) fail(std::string(fn) + "() missing required argument '" + nm[n] + "'");
  }
  return b;
}

int64_t int_arg(const Value& v, const char* what) {
  if (v.is_undefined()) fail_undefined(v);
  if (!v.is_int()) fail(std::string(what) + " must be an integer, not " + type_name(v));
  return v.i;
}

const std::string& str_arg(const Value& v, const char* what) {
  if (v.is_undefined()) fail_undefined(v);
  if (!v.is_string()) fail(std::string(what) + " must be str, not " + type_name(v));
  return v.s;
}

// jinja2's soft_str: str() that leaves strings alone.
std::string soft_str(const Value& v) {
  return v.is_string() ? v.s : to_str(v);
}

std::vector<Value> seq(Interp& in, const Value& v) {
  std::vector<Value> items = iterate(v);
  in.tick(items.size());
  return items;
}

std::string center(const std::string& s, int64_t width, char32_t fill) {
  auto len = static_cast<int64_t>(count_code_points(s));
  if (width <= len) return s;
  int64_t marg = width - len;
  int64_t left = marg / 2 + (marg & width & 1);
  std::string pad_l, pad_r;
  for (int64_t n = 0; n < left; ++n) append_utf8(pad_l, fill);
  for (int64_t n = 0; n < marg - left; ++n) append_utf8(pad_r, fill);
  return pad_l + s + pad_r;
}

namespace {

using FilterFn = Value (*)(Interp&, const Value&, CallArgs&);
using TestFn = bool (*)(Interp&, const Value&, CallArgs&);

Value ignore_case(const Value& v) {
  return v.is_string() ? Value::str(py_lower(v.s)) : v;
}

// jinja2's make_attrgetter: "a.b.0" walks getitem (which falls back to attributes).
std::vector<Value> attr_parts(const Value& attribute) {
  std::vector<Value> parts;
  if (attribute.is_none() || attribute.is_undefined()) return parts;
  if (attribute.is_int()) {
    parts.push_back(attribute);
    return parts;
  }
  if (!attribute.is_string()) fail("attribute must be a string or an integer");
  for (const auto& p : py_split(attribute.s, Value::str("."), -1, false)) {
    bool digits =
        !p.empty() && std::all_of(p.begin(), p.end(), [](char c) { return c >= '0' && c <= '9'; });
    parts.push_back(digits ? Value::integer(parse_digits(p)) : Value::str(p));
  }
  return parts;
}

Value get_path(Interp& in, Value item, const std::vector<Value>& parts, const Value& dflt) {
  for (const auto& p : parts) {
    item = in.getitem(item, p);
    if (!dflt.is_none() && item.is_undefined()) item = dflt;
  }
  return item;
}

// make_multi_attrgetter: comma-separated attribute paths, compared as a list.
std::vector<std::vector<Value>> multi_parts(const Value& attribute) {
  std::vector<std::vector<Value>> out;
  if (attribute.is_string()) {
    for (const auto& a : py_split(attribute.s, Value::str(","), -1, false))
      out.push_back(attr_parts(Value::str(a)));
  } else {
    out.push_back(attr_parts(attribute));
  }
  return out;
}

Value multi_key(Interp& in, const Value& item, const std::vector<std::vector<Value>>& parts,
                bool case_sensitive) {
  std::vector<Value> keys;
  for (const auto& p : parts) {
    Value k = get_path(in, item, p, Value::none());
    keys.push_back(case_sensitive ? k : ignore_case(k));
  }
  return make_list(std::move(keys));
}

// Stable sort on precomputed keys; `reverse` keeps equal elements in order, like Python.
std::vector<Value> sort_by_keys(std::vector<Value> items, const std::vector<Value>& keys,
                                bool reverse) {
  std::vector<size_t> order(items.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return reverse ? less(keys[b], keys[a]) : less(keys[a], keys[b]);
  });
  std::vector<Value> out;
  out.reserve(items.size());
  for (size_t i : order) out.push_back(std::move(items[i]));
  return out;
}

// CPython's int(str, base): surrounding whitespace, sign, '_' between digits.
bool parse_int(const std::string& text, int base, int64_t* out) {
  std::u32string u = decode_utf8(text);
  size_t b = 0, e = u.size();
  while (b < e && py_isspace(u[b])) ++b;
  while (e > b && py_isspace(u[e - 1])) --e;
  bool neg = false;
  if (b < e && (u[b] == '+' || u[b] == '-')) neg = u[b++] == '-';
  if (b + 1 < e && u[b] == '0') {
    char32_t p = u[b + 1] | 0x20;
    if ((p == 'x' && base == 16) || (p == 'o' && base == 8) || (p == 'b' && base == 2)) b += 2;
  }
  if (b >= e) return false;
  unsigned __int128 acc = 0;
  bool prev_digit = false;
  for (size_t i = b; i < e; ++i) {
    char32_t c = u[i];
    if (c == '_') {
      if (!prev_digit || i + 1 >= e) return false;
      prev_digit = false;
      continue;
    }
    int d = c >= '0' && c <= '9'                     ? c - '0'
            : (c | 0x20) >= 'a' && (c | 0x20) <= 'z' ? (c | 0x20) - 'a' + 10
                                                     : 99;
    if (d >= base) return false;
    acc = acc * base + d;
    if (acc > static_cast<unsigned __int128>(INT64_MAX) + 1)
      fail("integer out of range (kiln's template integers are 64-bit)");
    prev_digit = true;
  }
  if (!neg && acc > static_cast<unsigned __int128>(INT64_MAX))
    fail("integer out of range (kiln's template integers are 64-bit)");
  *out = neg ? static_cast<int64_t>(-static_cast<__int128>(acc)) : static_cast<int64_t>(acc);
  return true;
}

// CPython's float(str).
bool parse_float(const std::string& text, double* out) {
  std::u32string u = decode_utf8(text);
  size_t b = 0, e = u.size();
  while (b < e && py_isspace(u[b])) ++b;
  while (e > b && py_isspace(u[e - 1])) --e;
  std::string s;
  for (size_t i = b; i < e; ++i) {
    if (u[i] >= 0x80) return false;
    s += static_cast<char>(u[i]);
  }
  std::string body = s;
  std::string sign;
  if (!body.empty() && (body[0] == '+' || body[0] == '-')) {
    sign = body.substr(0, 1);
    body = body.substr(1);
  }
  std::string lower = py_lower(body);
  if (lower == "inf" || lower == "infinity" || lower == "nan") {
    double v = lower == "nan" ? NAN : INFINITY;
    *out = sign == "-" ? -v : v;
    return true;
  }
  // digits ['.' digits] [e [sign] digits], '_' only between digits.
  std::string clean;
  size_t i = 0;
  auto digits = [&]() {
    size_t start = i;
    while (i < body.size()) {
      if (body[i] >= '0' && body[i] <= '9') {
        clean += body[i++];
      } else if (body[i] == '_' && i > start && i + 1 < body.size() && body[i + 1] >= '0' &&
                 body[i + 1] <= '9' && body[i - 1] >= '0' && body[i - 1] <= '9') {
        ++i;
      } else {
        break;
      }
    }
    return i > start;
  };
  bool int_part = digits();
  bool frac_part = false;
  if (i < body.size() && body[i] == '.') {
    clean += body[i++];
    frac_part = digits();
  }
  if (!int_part && !frac_part) return false;
  if (i < body.size() && (body[i] == 'e' || body[i] == 'E')) {
    clean += body[i++];
    if (i < body.size() && (body[i] == '+' || body[i] == '-')) clean += body[i++];
    if (!digits()) return false;
  }
  if (i != body.size()) return false;
  *out = std::strtod((sign + clean).c_str(), nullptr);
  return true;
}

std::string html_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&#34;";
        break;
      case '\'':
        out += "&#39;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

// ---- filters ----------------------------------------------------------------------------------

Value f_abs(Interp&, const Value& v, CallArgs& a) {
  bind("abs", a, {});
  if (v.is_undefined()) fail_undefined(v);
  if (v.is_int()) {
    if (v.i == INT64_MIN) fail("integer overflow (kiln's template integers are 64-bit)");
    return Value::integer(v.i < 0 ? -v.i : v.i);
  }
  if (v.type == Type::kFloat) return Value::real(std::fabs(v.f));
  fail("bad operand type for abs(): '" + type_name(v) + "'");
}

Value f_attr(Interp& in, const Value& v, CallArgs& a) {
  Bound b = bind("attr", a, {"name"}, 1);
  const std::string& name = str_arg(b[0], "attribute name");
  Value out;
  if (v.type == Type::kObject) {
    if (v.obj->getattr(name, &out)) return out;
  } else if (!v.is_undefined() && get_method(v, name, &out)) {
    return out;
  }
  if (v.is_undefined()) fail_undefined(v);
  return Value::undefined(object_type_repr(v) + " has no attribute '" + name + "'");
}

Value f_batch(Interp& in, const Value& v, CallArgs& a) {
  Bound b = bind("batch", a, {"linecount", "fill_with"}, 1);
  int64_t count = int_arg(b[0], "linecount");
  if (count <= 0) fail("batch linecount must be positive");
  std::vector<Value> out, tmp;
  for (auto& item : seq(in, v)) {
    if (static_cast<int64_t>(tmp.size()) == count) {
      out.push_back(make_list(std::move(tmp)));
      tmp.clear();
    }
    tmp.push_back(std::move(item));
  }
  if (!tmp.empty()) {
    if (!b[1].is_none()) {
      // The padding is made here, not taken from the input: `[1]|batch(10**12, 0)` would
      // otherwise build a trillion-element row.
      in.tick(static_cast<size_t>(count) - tmp.size());
      while (static_cast<int64_t>(tmp.size()) < count) tmp.push_back(b[1]);
    }
    out.push_back(make_list(std::move(tmp)));
  }
  return make_list(std::move(out));
}

Value f_capitalize(Interp&, const Value& v, CallArgs& a) {
  bind("capitalize", a, {});
  return Value::str(py_capitalize(soft_str(v)));
}

Value f_center(Interp& in, const Value& v, CallArgs& a) {
  Bound b = bind("center", a, {"width"});
  int64_t width = b.has(0) ? int_arg(b[0], "width") : 80;
  in.check_size(static_cast<size_t>(std::max<int64_t>(width, 0)));
  return Value::str(center(soft_str(v), width));
}

Value f_default(Interp&, const Value& v, CallArgs& a) {
  Bound b = bind("default", a, {"default_value", "boolean"});
  Value dflt = b.has(0) ? b[0] : Value::str("");
  if (v.is_undefined() || (truthy(b[1]) && !truthy(v))) return dflt;
  return v;
}

Value f_dictsort(Interp& in, const Value& v, CallArgs& a) {
  Bound b = bind("dictsort", a, {"case_sensitive", "by", "reverse"});
  if (v.is_undefined()) fail_undefined(v);
  if (!v.is_dict()) fail("'" + type_name(v) + "' object has no attribute 'items'");
  std::string by = b.has(1) ? str_arg(b[1], "by") : "key";
  if (by != "key" && by != "value") fail("You can only sort by either \"key\" or \"value\"");
  size_t pos = by == "key" ? 0 : 1;
  in.tick(v.dict->items.size());
  std::vector<Value> items, keys;
  for (const auto& [k, val] : v.dict->items) {
    items.push_back(make_list({k, val}, ListKind::kTuple));
    const Value& key = pos == 0 ? k : val;
    keys.push_back(truthy(b[0]) ? key : ignore_case(key));
  }
  return make_list(sort_by_keys(std::move(items), keys, truthy(b[2])));
}

Value f_escape(Interp&, const Value& v, CallArgs& a) {
  bind("escape", a, {});
  return Value::str(html_escape(soft_str(v)));
}

// The first or last character of a string, without a Value per character (see iterate()).
Value end_char(const std::string& s, bool last) {
  // A character is at most 4 bytes, so a 4-byte window decodes it whole.
  std::u32string u =
      decode_utf8(last ? std::string_view(s).substr(s.size() - std::min<size_t>(s.size(), 4))
                       : std::string_view(s).substr(0, 4));
  std::string ch;
  append_utf8(ch, last ? u.back() : u.front());
  return Value::str(std::move(ch));
}

Value f_first(Interp&, const Value& v, CallArgs& a) {
  bind("first", a, {});
  if (v.is_string() && !v.s.empty()) return end_char(v.s, false);
  if (v.is_list()) {
    if (!v.list->items.empty()) return v.list->items.front();
  } else {
    std::vector<Value> items = iterate(v);
    if (!items.empty()) return items.front();
  }
  return Value::undefined("No first item, sequence was empty.");
}

Value f_last(Interp&, const Value& v, CallArgs& a) {
  bind("last", a, {});
  if (v.is_string() && !v.s.empty()) return end_char(v.s, true);
  if (v.is_list()) {
    if (!v.list->items.empty()) return v.list->items.back();
  } else {
    std::vector<Value> items = iterate(v);
    if (!items.empty()) return items.back();
  }
  return Value::undefined("No last item, sequence was empty.");
}

Value f_float(Interp&, const Value& v, CallArgs& a) {
  Bound b = bind("float", a, {"default"});
  Value dflt = b.has(0) ? b[0] : Value::real(0.0);
  if (v.is_undefined()) fail_undefined(v);
  if (v.is_number()) return Value::real(v.as_double());
  double d;
  if (v.is_string() && parse_float(v.s, &d)) return Value::real(d);
  return dflt;
}

Value f_int(Interp&, const Value& v, CallArgs& a) {
  Bound b = bind("int", a, {"default", "base"});
  Value dflt = b.has(0) ? b[0] : Value::integer(0);
  int64_t base = b.has(1) ? int_arg(b[1], "base") : 10;
  if (v.is_undefined()) fail_undefined(v);
  if (v.is_int()) return Value::integer(v.i);
  if (v.type == Type::kFloat) {
    check_int_range(v.f);
    return Value::integer(static_cast<int64_t>(v.f));
  }
  if (v.is_string()) {
    int64_t n;
    if (base >= 2 && base <= 36 && parse_int(v.s, static_cast<int>(base), &n))
      return Value::integer(n);
    // jinja2's quirk: "42.23"|int is 42.
    double d;
    if (parse_float(v.s, &d) && !std::isnan(d)) {
      check_int_range(d);
      return Value::integer(static_cast<int64_t>(d));
    }
  }
  return dflt;
}

Value f_format(Interp& in, const Value& v, CallArgs& a) {
  if (!a.pos.empty() && !a.kw.empty())
    fail("can't handle positional and keyword arguments at the same time");
  Value args;
  if (!a.kw.empty()) {
    DictData d;
    for (const auto& [k, val] : a.kw) d.set(Value::str(k), val);
    args = make_dict(std::move(d));
  } else {
    args = make_list(a.pos, ListKind::kTuple);
  }
  std::string s = py_percent_format(soft_str(v), args);
  in.check_size(s.size());
  return Value::str(std::move(s));
}

Value f_indent(Interp& in, const Value& v, CallArgs& a) {
  Bound b = bind("indent", a, {"width", "first", "blank"});
  std::string ind = "    ";
  if (b.has(0)) {
    if (b[0].is_string()) {
      ind = b[0].s;
    } else {
      const int64_t width = std::max<int64_t>(0, int_arg(b[0], "width"));
      in.check_size(static_cast<size_t>(width));  // before allocating it
      ind = std::string(static_cast<size_t>(width), ' ');
    }
  }
  if (v.is_undefined()) fail_undefined(v);
  if (!v.is_string()) fail("unsupported operand type(s) for +=: '" + type_name(v) + "' and 'str'");
  std::vector<std::string> lines = py_splitlines(v.s + "\n", false);
  in.tick(lines.size());
  std::string rv;
  if (truthy(b[2])) {
    for (size_t n = 0; n < lines.size(); ++n) {
      if (n) rv += "\n" + ind;
      rv += lines[n];
      in.check_size(rv.size());
    }
  } else {
    rv = lines[0];
    for (size_t n = 1; n < lines.size(); ++n) {
      rv += "\n";
      if (!lines[n].empty()) rv += ind;
      rv += lines[n];
      in.check_size(rv.size());
    }
  }
  if (truthy(b[1])) {
    in.check_size(ind.size() + rv.size());
    rv = ind + rv;
  }
  return Value::str(std::move(rv));
}

Value f_items(Interp& in, const Value& v, CallArgs& a) {
  bind("items", a, {});
  if (v.is_undefined()) return make_list({});
  if (!v.is_dict()) fail("Can only get item pairs from a mapping.");
  in.tick(v.dict->items.size());
  std::vector<Value> out;
  for (const auto& [k, val] : v.dict->items) out.push_back(make_list({k, val}, ListKind::kTuple));
  return make_list(std::move(out));
}

Value f_join(Interp& in, const Value& v, CallArgs& a) {
  Bound b = bind("join", a, {"d", "attribute"});
  std::string sep = b.has(0) ? soft_str(b[0]) : "";
  std::vector<Value> parts_attr = attr_parts(b[1]);
  std::string out;
  bool first = true;
  for (const auto& item : seq(in, v)) {
    if (!first) out += sep;
    first = false;
    if (b[1].is_none()) {
      out += soft_str(item);
    } else {
      out += soft_str(get_path(in, item, parts_attr, Value::none()));
    }
    in.check_size(out.size());
  }
  return Value::str(std::move(out));
}

Value f_length(Interp&, const Value& v, CallArgs& a) {
  bind("length", a, {});
  return Value::integer(static_cast<int64_t>(py_len(v)));
}

Value f_list(Interp& in, const Value& v, CallArgs& a) {
  bind("list", a, {});
  return make_list(seq(in, v));
}

Value f_lower(Interp&, const Value& v, CallArgs& a) {
  bind("lower", a, {});
  return Value::str(py_lower(soft_str(v)));
}

Value f_upper(Interp&, const Value& v, CallArgs& a) {
  bind("upper", a, {});
  return Value::str(py_upper(soft_str(v)));
}

Value f_map(Interp& in, const Value& v, CallArgs& a) {
  // jinja2's map/select/reject start with `if value:`, so falsy non-iterables yield nothing.
  std::vector<Value> items = truthy(v) ? seq(in, v) : std::vector<Value>();
  std::vector<Value> out;
  out.reserve(items.size());
  if (a.pos.empty()) {
    const Value* attribute = nullptr;
    Value dflt = Value::none();
    for (const auto& [k, val] : a.kw) {
      if (k == "attribute") {
        attribute = &val;
      } else if (k == "default") {
        dflt = val;
      } else {
        fail("Unexpected keyword argument '" + k + "'");
      }
    }
    if (!attribute) fail("map requires a filter argument");
    std::vector<Value> parts = attr_parts(*attribute);
    for (const auto& item : items) out.push_back(get_path(in, item, parts, dflt));
    return make_list(std::move(out));
  }
  std::string name = str_arg(a.pos[0], "filter name");
  CallArgs rest;
  rest.pos.assign(a.pos.begin() + 1, a.pos.end());
  rest.kw = a.kw;
  for (const auto& item : items) {
    CallArgs call = rest;
    out.push_back(in.apply_filter(name, item, call));
  }
  return make_list(std::move(out));
}

Value min_max(Interp& in, const Value& v, CallArgs& a, bool want_max) {
  Bound b = bind(want_max ? "max" : "min", a, {"case_sensitive", "attribute"});
  std::vector<Value> items = seq(in, v);
  if (items.empty()) return Value::undefined("No aggregated item, sequence was empty.");
  std::vector<Value> parts = attr_parts(b[1]);
  auto key = [&](const Value& item) {
    Value k = get_path(in, item, parts, Value::none());
    return truthy(b[0]) ? k : ignore_case(k);
  };
  size_t best = 0;
  Value best_key = key(items[0]);
  for (size_t n = 1; n < items.size(); ++n) {
    Value k = key(items[n]);
    if (want_max ? less(best_key, k) : less(k, best_key)) {
      best = n;
      best_key = std::move(k);
    }
  }
  return items[best];
}

Value f_max(Interp& in, const Value& v, CallArgs& a) {
  return min_max(in, v, a, true);
}
Value f_min(Interp& in, const Value& v, CallArgs& a) {
  return min_max(in, v, a, false);
}

Value f_replace(Interp& in, const Value& v, CallArgs& a) {
  Bound b = bind("replace", a, {"old", "new", "count"}, 2);
  int64_t count = b[2].is_none() ? -1 : int_arg(b[2], "count");
  std::string s = py_replace(soft_str(v), soft_str(b[0]), soft_str(b[1]), count);
  in.check_size(s.size());
  return Value::str(std::move(s));
}

Value select_impl(Interp& in, const Value& v, CallArgs& a, bool lookup_attr, bool want) {
  std::vector<Value> items = truthy(v) ? seq(in, v) : std::vector<Value>();
  size_t off = 0;
  std::vector<Value> parts;
  if (lookup_attr) {
    if (a.pos.empty()) fail("Missing parameter for attribute name");
    parts = attr_parts(a.pos[0]);
    off = 1;
  }
  bool has_test = a.pos.size() > off;
  std::string test = has_test ? str_arg(a.pos[off], "test name") : "";
  CallArgs rest;
  if (has_test) rest.pos.assign(a.pos.begin() + off + 1, a.pos.end());
  rest.kw = a.kw;
  std::vector<Value> out;
  for (auto& item : items) {
    Value x = lookup_attr ? get_path(in, item, parts, Value::none()) : item;
    bool ok;
    if (has_test) {
      CallArgs call = rest;
      ok = in.apply_test(test, x, call);
    } else {
      ok = truthy(x);
    }
    if (ok == want) out.push_back(std::move(item));
  }
  return make_list(std::move(out));
}

Value f_select(Interp& in, const Value& v, CallArgs& a) {
  return select_impl(in, v, a, false, true);
}
Value f_reject(Interp& in, const Value& v, CallArgs& a) {
  return select_impl(in, v, a, false, false);
}
Value f_selectattr(Interp& in, const Value& v, CallArgs& a) {
  return select_impl(in, v, a, true, true);
}
Value f_rejectattr(Interp& in, const Value& v, CallArgs& a) {
  return select_impl(in, v, a, true, false);
}

Value f_reverse(Interp& in, const Value& v, CallArgs& a) {
  bind("reverse", a, {});
  if (v.is_string()) {
    std::u32string u = decode_utf8(v.s);
    std::reverse(u.begin(), u.end());
    return Value::str(encode_utf8(u));
  }
  // jinja2 returns a reverse iterator here; a list iterates and prints more usefully.
  std::vector<Value> items = seq(in, v);
  std::reverse(items.begin(), items.end());
  return make_list(std::move(items));
}

Value f_round(Interp&, const Value& v, CallArgs& a) {
  Bound b = bind("round", a, {"precision", "method"});
  int64_t precision = b.has(0) ? int_arg(b[0], "precision") : 0;
  std::string method = b.has(1) ? str_arg(b[1], "method") : "common";
  if (method != "common" && method != "ceil" && method != "floor") {
    fail("method must be common, ceil or floor");
  }
  if (v.is_undefined()) fail_undefined(v);
  if (!v.is_number()) fail("type " + type_name(v) + " doesn't define __round__ method");
  if (precision < -400 || precision > 400) fail("round precision out of range");
  double scale = std::pow(10.0, static_cast<double>(precision));
  if (method != "common") {
    double x = v.as_double() * scale;
    return Value::real((method == "ceil" ? std::ceil(x) : std::floor(x)) / scale);
  }
  if (v.is_int()) {
    // round(int, n) stays an int; negative n rounds half to even at 10**-n.
    if (precision >= 0) return Value::integer(v.i);
    if (precision < -18) return Value::integer(0);
    int64_t p = 1;
    for (int64_t k = 0; k < -precision; ++k) p *= 10;
    int64_t q = v.i / p, r = v.i % p;
    if (r < 0) {
      r += p;
      --q;
    }
    if (2 * r > p || (2 * r == p && (q & 1))) ++q;
    return Value::integer(q * p);
  }
  double x = v.f;
  if (!std::isfinite(x)) return Value::real(x);
  if (precision >= 0) {
    // CPython rounds the exact binary value half-to-even via a correctly rounded decimal
    // conversion; glibc's printf does the same.
    char buf[512];
    std::snprintf(buf, sizeof(buf), "%.*f", static_cast<int>(std::min<int64_t>(precision, 300)), x);
    return Value::real(std::strtod(buf, nullptr));
  }
  double y = std::nearbyint(x / std::pow(10.0, static_cast<double>(-precision)));
  return Value::real(y * std::pow(10.0, static_cast<double>(-precision)));
}

Value f_safe(Interp&, const Value& v, CallArgs& a) {
  bind("safe", a, {});
  return Value::str(soft_str(v));
}

Value f_slice(Interp& in, const Value& v, CallArgs& a) {
  Bound b = bind("slice", a, {"slices", "fill_with"}, 1);
  int64_t slices = int_arg(b[0], "slices");
  if (slices <= 0) fail("slice count must be positive");
  std::vector<Value> items = seq(in, v);
  in.tick(static_cast<size_t>(slices));
  auto length = static_cast<int64_t>(items.size());
  int64_t per = length / slices, extra = length % slices, offset = 0;
  std::vector<Value> out;
  for (int64_t n = 0; n < slices; ++n) {
    int64_t start = offset + n * per;
    if (n < extra) ++offset;
    int64_t end = offset + (n + 1) * per;
    std::vector<Value> tmp(items.begin() + start, items.begin() + end);
    if (!b[1].is_none() && n >= extra) tmp.push_back(b[1]);
    out.push_back(make_list(std::move(tmp)));
  }
  return make_list(std::move(out));
}

Value f_sort(Interp& in, const Value& v, CallArgs& a) {
  Bound b = bind("sort", a, {"reverse", "case_sensitive", "attribute"});
  std::vector<Value> items = seq(in, v);
  auto parts = multi_parts(b[2]);
  std::vector<Value> keys;
  keys.reserve(items.size());
  for (const auto& item : items) {
    if (b[2].is_none()) {
      keys.push_back(make_list({truthy(b[1]) ? item : ignore_case(item)}));
    } else {
      keys.push_back(multi_key(in, item, parts, truthy(b[1])));
    }
  }
  return make_list(sort_by_keys(std::move(items), keys, truthy(b[0])));
}

Value f_string(Interp&, const Value& v, CallArgs& a) {
  bind("string", a, {});
  return Value::str(soft_str(v));
}

Value f_sum(Interp& in, const Value& v, CallArgs& a);

Value f_title(Interp&, const Value& v, CallArgs& a) {
  bind("title", a, {});
  // jinja2 splits on runs of [-\s({\[<] and upper-cases the first character of every piece.
  std::u32string u = decode_utf8(soft_str(v));
  auto is_sep = [](char32_t c) {
    return py_isspace(c) || c == '-' || c == '(' || c == '{' || c == '[' || c == '<';
  };
  std::string out;
  size_t i = 0;
  while (i < u.size()) {
    size_t j = i;
    bool sep = is_sep(u[i]);
    while (j < u.size() && is_sep(u[j]) == sep) ++j;
    for (size_t k = i; k < j; ++k) append_utf8(out, k == i ? to_upper(u[k]) : to_lower(u[k]));
    i = j;
  }
  return Value::str(std::move(out));
}

Value f_tojson(Interp& in, const Value& v, CallArgs& a) {
  Bound b = bind("tojson", a, {"ensure_ascii", "indent", "separators", "sort_keys"});
  JsonStyle st;
  st.ensure_ascii = truthy(b[0]);
  st.sort_keys = truthy(b[3]);
  const Value& indent = b[1];
  if (!indent.is_none()) {
    st.pretty = true;
    st.item_sep = ",";
    if (indent.is_string()) {
      st.indent = indent.s;
    } else {
      st.indent = std::string(std::clamp<int64_t>(int_arg(indent, "indent"), 0, 64), ' ');
    }
  }
  if (!b[2].is_none()) {
    std::vector<Value> seps = iterate(b[2]);
    if (seps.size() != 2 || !seps[0].is_string() || !seps[1].is_string()) {
      fail("separators must be a pair of strings");
    }
    st.item_sep = seps[0].s;
    st.key_sep = seps[1].s;
  }
  std::string s = dumps(v, st);
  in.check_size(s.size());
  return Value::str(std::move(s));
}

Value f_trim(Interp&, const Value& v, CallArgs& a) {
  Bound b = bind("trim", a, {"chars"});
  return Value::str(py_strip(soft_str(v), b[0], true, true));
}

Value f_truncate(Interp&, const Value& v, CallArgs& a) {
  Bound b = bind("truncate", a, {"length", "killwords", "end", "leeway"});
  int64_t length = b.has(0) ? int_arg(b[0], "length") : 255;
  std::string end = b.has(2) ? str_arg(b[2], "end") : "...";
  int64_t leeway = b.has(3) && !b[3].is_none() ? int_arg(b[3], "leeway") : 5;
  auto end_len = static_cast<int64_t>(count_code_points(end));
  // length + leeway in 128 bits: both come from the template and may be near INT64_MAX.
  const __int128 limit = static_cast<__int128>(length) + leeway;
  if (!v.is_string()) {
    // jinja2 measures the value itself: short lists pass through, numbers have no len().
    if (static_cast<__int128>(py_len(v)) <= limit) return v;
    fail("'" + type_name(v) + "' object has no attribute 'rsplit'");
  }
  std::u32string s = decode_utf8(v.s);
  if (length < end_len)
    fail("expected length >= " + std::to_string(end_len) + ", got " + std::to_string(length));
  if (leeway < 0) fail("expected leeway >= 0, got " + std::to_string(leeway));
  if (static_cast<__int128>(s.size()) <= limit) return Value::str(encode_utf8(s));
  std::string head = encode_utf8(std::u32string_view(s).substr(0, length - end_len));
  if (truthy(b[1])) return Value::str(head + end);
  std::vector<std::string> parts = py_split(head, Value::str(" "), 1, true);
  return Value::str(parts[0] + end);
}

Value f_unique(Interp& in, const Value& v, CallArgs& a) {
  Bound b = bind("unique", a, {"case_sensitive", "attribute"});
  std::vector<Value> parts = attr_parts(b[1]);
  std::vector<Value> out, seen;
  for (auto& item : seq(in, v)) {
    Value key = get_path(in, item, parts, Value::none());
    if (!truthy(b[0])) key = ignore_case(key);
    if (key.is_list() && key.list->kind != ListKind::kTuple) fail("unhashable type: 'list'");
    if (key.is_dict()) fail("unhashable type: 'dict'");
    bool dup = false;
    for (const auto& s : seen) {
      if (equal(s, key)) {
        dup = true;
        break;
      }
    }
    in.tick(seen.size() / 64 + 1);
    if (dup) continue;
    seen.push_back(std::move(key));
    out.push_back(std::move(item));
  }
  return make_list(std::move(out));
}

Value f_wordcount(Interp&, const Value& v, CallArgs& a) {
  bind("wordcount", a, {});
  int64_t n = 0;
  bool in_word = false;
  for (char32_t c : decode_utf8(soft_str(v))) {
    bool w = c == '_' || is_alpha(c) || is_digit(c);
    if (w && !in_word) ++n;
    in_word = w;
  }
  return Value::integer(n);
}

// ---- tests ------------------------------------------------------------------------------------

const Value& one_arg(const char* name, const CallArgs& a) {
  if (a.pos.size() != 1 || !a.kw.empty())
    fail(std::string("test '") + name + "' takes one argument");
  return a.pos[0];
}

void no_args(const char* name, const CallArgs& a) {
  if (!a.pos.empty() || !a.kw.empty()) fail(std::string("test '") + name + "' takes no arguments");
}

// `value % d == want` as jinja2's even/odd/divisibleby compute it.
bool py_mod_equals(const Value& v, const Value& d, int64_t want) {
  if (v.is_undefined()) fail_undefined(v);
  if (d.is_undefined()) fail_undefined(d);
  if (v.is_string()) {
    py_percent_format(v.s, d);  // str % x formats (and may fail); a str never equals an int
    return false;
  }
  if (v.is_int() && d.is_int()) {
    if (d.i == 0) fail("integer division or modulo by zero");
    int64_t r = d.i == -1 ? 0 : v.i % d.i;
    if (r != 0 && ((r < 0) != (d.i < 0))) r += d.i;
    return r == want;
  }
  if (v.is_number() && d.is_number()) {
    if (d.as_double() == 0) fail("float modulo");
    double r = std::fmod(v.as_double(), d.as_double());
    if (r != 0 && ((r < 0) != (d.as_double() < 0))) r += d.as_double();
    return r == static_cast<double>(want);
  }
  fail("unsupported operand type(s) for %: '" + type_name(v) + "' and '" + type_name(d) + "'");
}

bool t_defined(Interp&, const Value& v, CallArgs& a) {
  no_args("defined", a);
  return !v.is_undefined();
}
bool t_undefined(Interp&, const Value& v, CallArgs& a) {
  no_args("undefined", a);
  return v.is_undefined();
}
bool t_none(Interp&, const Value& v, CallArgs& a) {
  no_args("none", a);
  return v.is_none();
}
bool t_boolean(Interp&, const Value& v, CallArgs& a) {
  no_args("boolean", a);
  return v.type == Type::kBool;
}
bool t_false(Interp&, const Value& v, CallArgs& a) {
  no_args("false", a);
  return v.type == Type::kBool && !v.i;
}
bool t_true(Interp&, const Value& v, CallArgs& a) {
  no_args("true", a);
  return v.type == Type::kBool && v.i;
}
bool t_integer(Interp&, const Value& v, CallArgs& a) {
  no_args("integer", a);
  return v.type == Type::kInt;
}
bool t_float(Interp&, const Value& v, CallArgs& a) {
  no_args("float", a);
  return v.type == Type::kFloat;
}
bool t_number(Interp&, const Value& v, CallArgs& a) {
  no_args("number", a);
  return v.is_number();
}
bool t_string(Interp&, const Value& v, CallArgs& a) {
  no_args("string", a);
  return v.is_string();
}
bool t_mapping(Interp&, const Value& v, CallArgs& a) {
  no_args("mapping", a);
  return v.is_dict();
}
// jinja2's default Undefined is iterable and has __len__/__getitem__, so it passes these two.
bool t_iterable(Interp&, const Value& v, CallArgs& a) {
  no_args("iterable", a);
  return v.is_undefined() || v.is_string() || v.is_list() || v.is_dict();
}
bool t_sequence(Interp&, const Value& v, CallArgs& a) {
  no_args("sequence", a);
  return v.is_undefined() || v.is_string() || (v.is_list() && !v.list->is_view()) || v.is_dict();
}
bool t_callable(Interp&, const Value& v, CallArgs& a) {
  no_args("callable", a);
  return v.is_undefined() || (v.type == Type::kObject && v.obj->callable());
}
bool t_escaped(Interp&, const Value&, CallArgs& a) {
  no_args("escaped", a);
  return false;
}
bool t_sameas(Interp&, const Value& v, CallArgs& a) {
  const Value& o = one_arg("sameas", a);
  if (v.type != o.type) return false;
  switch (v.type) {
    case Type::kList:
      return v.list == o.list;
    case Type::kDict:
      return v.dict == o.dict;
    case Type::kObject:
      return v.obj == o.obj;
    default:
      return equal(v, o);
  }
}
bool t_in(Interp& in, const Value& v, CallArgs& a) {
  const Value& seq_v = one_arg("in", a);
  if (seq_v.is_string()) {
    if (!v.is_string()) fail("'in <string>' requires string as left operand, not " + type_name(v));
    return seq_v.s.find(v.s) != std::string::npos;
  }
  if (seq_v.is_dict()) return seq_v.dict->find(v) != nullptr;
  for (const auto& x : iterate(seq_v)) {
    if (equal(x, v)) return true;
  }
  return false;
}
bool t_eq(Interp&, const Value& v, CallArgs& a) {
  return equal(v, one_arg("eq", a));
}
bool t_ne(Interp&, const Value& v, CallArgs& a) {
  return !equal(v, one_arg("ne", a));
}
bool t_lt(Interp&, const Value& v, CallArgs& a) {
  return less(v, one_arg("lt", a));
}
bool t_gt(Interp&, const Value& v, CallArgs& a) {
  return less(one_arg("gt", a), v);
}
bool t_le(Interp&, const Value& v, CallArgs& a) {
  const Value& o = one_arg("le", a);
  return less(v, o) || equal(v, o);
}
bool t_ge(Interp&, const Value& v, CallArgs& a) {
  const Value& o = one_arg("ge", a);
  return less(o, v) || equal(v, o);
}
bool t_even(Interp&, const Value& v, CallArgs& a) {
  no_args("even", a);
  return py_mod_equals(v, Value::integer(2), 0);
}
bool t_odd(Interp&, const Value& v, CallArgs& a) {
  no_args("odd", a);
  return py_mod_equals(v, Value::integer(2), 1);
}
bool t_divisibleby(Interp&, const Value& v, CallArgs& a) {
  return py_mod_equals(v, one_arg("divisibleby", a), 0);
}
bool t_lower(Interp&, const Value& v, CallArgs& a) {
  no_args("lower", a);
  bool cased = false;
  for (char32_t c : decode_utf8(soft_str(v))) {
    if (is_upper(c) || (is_cased(c) && !is_lower(c))) return false;
    if (is_lower(c)) cased = true;
  }
  return cased;
}
bool t_upper(Interp&, const Value& v, CallArgs& a) {
  no_args("upper", a);
  bool cased = false;
  for (char32_t c : decode_utf8(soft_str(v))) {
    if (is_lower(c) || (is_cased(c) && !is_upper(c))) return false;
    if (is_upper(c)) cased = true;
  }
  return cased;
}
bool t_filter(Interp&, const Value& v, CallArgs& a) {
  no_args("filter", a);
  return v.is_string() && has_filter(v.s);
}
bool t_test(Interp&, const Value& v, CallArgs& a) {
  no_args("test", a);
  return v.is_string() && has_test(v.s);
}

const std::unordered_map<std::string, FilterFn>& filters() {
  static const std::unordered_map<std::string, FilterFn> table = {
      {"abs", f_abs},
      {"attr", f_attr},
      {"batch", f_batch},
      {"capitalize", f_capitalize},
      {"center", f_center},
      {"count", f_length},
      {"d", f_default},
      {"default", f_default},
      {"dictsort", f_dictsort},
      {"e", f_escape},
      {"escape", f_escape},
      {"forceescape", f_escape},
      {"first", f_first},
      {"float", f_float},
      {"format", f_format},
      {"indent", f_indent},
      {"int", f_int},
      {"items", f_items},
      {"join", f_join},
      {"last", f_last},
      {"length", f_length},
      {"list", f_list},
      {"lower", f_lower},
      {"map", f_map},
      {"max", f_max},
      {"min", f_min},
      {"reject", f_reject},
      {"rejectattr", f_rejectattr},
      {"replace", f_replace},
      {"reverse", f_reverse},
      {"round", f_round},
      {"safe", f_safe},
      {"select", f_select},
      {"selectattr", f_selectattr},
      {"slice", f_slice},
      {"sort", f_sort},
      {"string", f_string},
      {"sum", f_sum},
      {"title", f_title},
      {"tojson", f_tojson},
      {"trim", f_trim},
      {"truncate", f_truncate},
      {"unique", f_unique},
      {"upper", f_upper},
      {"wordcount", f_wordcount},
  };
  return table;
}

const std::unordered_map<std::string, TestFn>& tests() {
  static const std::unordered_map<std::string, TestFn> table = {
      {"boolean", t_boolean},
      {"callable", t_callable},
      {"defined", t_defined},
      {"divisibleby", t_divisibleby},
      {"eq", t_eq},
      {"equalto", t_eq},
      {"==", t_eq},
      {"escaped", t_escaped},
      {"even", t_even},
      {"false", t_false},
      {"filter", t_filter},
      {"float", t_float},
      {"ge", t_ge},
      {">=", t_ge},
      {"gt", t_gt},
      {"greaterthan", t_gt},
      {">", t_gt},
      {"in", t_in},
      {"integer", t_integer},
      {"iterable", t_iterable},
      {"le", t_le},
      {"<=", t_le},
      {"lower", t_lower},
      {"lt", t_lt},
      {"lessthan", t_lt},
      {"<", t_lt},
      {"mapping", t_mapping},
      {"ne", t_ne},
      {"!=", t_ne},
      {"none", t_none},
      {"number", t_number},
      {"odd", t_odd},
      {"sameas", t_sameas},
      {"sequence", t_sequence},
      {"string", t_string},
      {"test", t_test},
      {"true", t_true},
      {"undefined", t_undefined},
      {"upper", t_upper},
  };
  return table;
}

}  // namespace

// Python's sum(): start + item + item ..., through the template's own `+`.
namespace {
Value f_sum(Interp& in, const Value& v, CallArgs& a) {
  Bound b = bind("sum", a, {"attribute", "start"});
  std::vector<Value> parts = attr_parts(b[0]);
  Value acc = b.has(1) ? b[1] : Value::integer(0);
  for (const auto& item : seq(in, v)) {
    Value x = get_path(in, item, parts, Value::none());
    if (x.is_undefined()) fail_undefined(x);
    if (acc.is_int() && x.is_int()) {
      int64_t r;
      if (__builtin_add_overflow(acc.i, x.i, &r))
        fail("integer overflow (kiln's template integers are 64-bit)");
      acc = Value::integer(r);
    } else if (acc.is_number() && x.is_number()) {
      acc = Value::real(acc.as_double() + x.as_double());
    } else if (acc.is_list() && x.is_list()) {
      // Each step copies the whole accumulator, so summing n lists is O(n^2) copies: count them.
      in.tick(acc.list->items.size() + x.list->items.size());
      std::vector<Value> items = acc.list->items;
      items.insert(items.end(), x.list->items.begin(), x.list->items.end());
      acc = make_list(std::move(items), acc.list->kind);
    } else if (acc.is_string()) {
      fail("sum() can't sum strings [use ''.join(seq) instead]");
    } else {
      fail("unsupported operand type(s) for +: '" + type_name(acc) + "' and '" + type_name(x) +
           "'");
    }
  }
  return acc;
}
}  // namespace

bool has_filter(const std::string& name) {
  return filters().count(name) > 0;
}
bool has_test(const std::string& name) {
  return tests().count(name) > 0;
}

Value run_filter(Interp& in, const std::string& name, const Value& v, CallArgs& args) {
  auto it = filters().find(name);
  if (it == filters().end())
    fail("No filter named '" + name + "' (unknown, or not supported by kiln).");
  return it->second(in, v, args);
}

bool run_test(Interp& in, const std::string& name, const Value& v, CallArgs& args) {
  auto it = tests().find(name);
  if (it == tests().end())
    fail("No test named '" + name + "' (unknown, or not supported by kiln).");
  return it->second(in, v, args);
}

}  // namespace kiln::jinja
