// The Python value model behind the Jinja interpreter: str()/repr(), json.dumps, equality and
// ordering, and the code-point aware string helpers that Python's str methods need.
#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>

#include <utf8proc.h>

#include "tokenizer/jinja_internal.h"

namespace kiln::jinja {

void fail(const std::string& msg) {
  throw TemplateError(msg);
}

void fail_undefined(const Value& v) {
  fail(v.s.empty() ? std::string("value is undefined") : v.s);
}

Value Object::call(Interp&, CallArgs&) {
  std::string msg = "'";
  msg += type_name();
  fail(msg + "' object is not callable");
}

// ---------------------------------------------------------------------------------------------
// Containers

namespace {

constexpr size_t kIndexThreshold = 16;

bool key_equal(const Value& a, const Value& b) {
  return equal(a, b);
}

int child_depth(const Value& v) {
  if (v.type == Type::kList) return v.list->depth;
  if (v.type == Type::kDict) return v.dict->depth;
  return 0;
}

}  // namespace

const Value* DictData::find(std::string_view key) const {
  if (!index_.empty()) {
    auto it = index_.find(std::string(key));
    return it == index_.end() ? nullptr : &items[it->second].second;
  }
  for (const auto& [k, v] : items) {
    if (k.type == Type::kString && k.s == key) return &v;
  }
  return nullptr;
}

const Value* DictData::find(const Value& key) const {
  if (key.type == Type::kString) return find(std::string_view(key.s));
  for (const auto& [k, v] : items) {
    if (key_equal(k, key)) return &v;
  }
  return nullptr;
}

void DictData::set(Value key, Value value) {
  if (key.type == Type::kString && !index_.empty()) {
    auto it = index_.find(key.s);
    if (it != index_.end()) {
      items[it->second].second = std::move(value);
      return;
    }
  } else {
    for (auto& kv : items) {
      if (key_equal(kv.first, key)) {
        kv.second = std::move(value);
        return;
      }
    }
  }
  depth = std::max(depth, child_depth(value) + 1);
  if (depth > kMaxNesting)
    fail("value nests deeper than " + std::to_string(kMaxNesting) + " levels");
  items.emplace_back(std::move(key), std::move(value));
  if (!index_.empty()) {
    if (items.back().first.type == Type::kString)
      index_.emplace(items.back().first.s, items.size() - 1);
  } else if (items.size() >= kIndexThreshold) {
    for (size_t n = 0; n < items.size(); ++n) {
      if (items[n].first.type == Type::kString) index_.emplace(items[n].first.s, n);
    }
  }
}

Value make_list(std::vector<Value> items, ListKind kind) {
  auto data = std::make_shared<ListData>();
  int depth = 0;
  for (const auto& v : items) depth = std::max(depth, child_depth(v));
  if (depth + 1 > kMaxNesting) {
    fail("value nests deeper than " + std::to_string(kMaxNesting) + " levels");
  }
  data->items = std::move(items);
  data->kind = kind;
  data->depth = depth + 1;
  Value v;
  v.type = Type::kList;
  v.list = std::move(data);
  return v;
}

Value make_dict(DictData dict) {
  int depth = 0;
  for (const auto& [k, v] : dict.items) depth = std::max(depth, child_depth(v));
  if (depth + 1 > kMaxNesting) {
    fail("value nests deeper than " + std::to_string(kMaxNesting) + " levels");
  }
  dict.depth = depth + 1;
  Value v;
  v.type = Type::kDict;
  v.dict = std::make_shared<const DictData>(std::move(dict));
  return v;
}

std::string Namespace::repr(int depth) const {
  Value tmp;
  tmp.type = Type::kDict;
  tmp.dict = std::make_shared<const DictData>(attrs);
  return "<Namespace " + jinja::repr(tmp, depth) + ">";
}

bool Namespace::getattr(const std::string& name, Value* out) {
  const Value* v = attrs.find(std::string_view(name));
  if (!v) return false;
  *out = *v;
  return true;
}

// ---------------------------------------------------------------------------------------------
// JSON

template <class Json>
Value from_json(const Json& j, int depth) {
  if (depth > kMaxNesting) {
    fail("context nests deeper than " + std::to_string(kMaxNesting) + " levels");
  }
  switch (j.type()) {
    case nlohmann::json::value_t::null:
    case nlohmann::json::value_t::discarded:
      return Value::none();
    case nlohmann::json::value_t::boolean:
      return Value::boolean(j.template get<bool>());
    case nlohmann::json::value_t::number_integer:
      return Value::integer(j.template get<int64_t>());
    case nlohmann::json::value_t::number_unsigned: {
      uint64_t u = j.template get<uint64_t>();
      if (u > static_cast<uint64_t>(INT64_MAX)) return Value::real(static_cast<double>(u));
      return Value::integer(static_cast<int64_t>(u));
    }
    case nlohmann::json::value_t::number_float:
      return Value::real(j.template get<double>());
    case nlohmann::json::value_t::string:
      return Value::str(j.template get<std::string>());
    case nlohmann::json::value_t::array: {
      std::vector<Value> items;
      items.reserve(j.size());
      for (const auto& e : j) items.push_back(from_json(e, depth + 1));
      return make_list(std::move(items));
    }
    case nlohmann::json::value_t::object: {
      DictData d;
      d.items.reserve(j.size());
      for (auto it = j.begin(); it != j.end(); ++it) {
        d.set(Value::str(it.key()), from_json(it.value(), depth + 1));
      }
      return make_dict(std::move(d));
    }
    case nlohmann::json::value_t::binary:
      break;
  }
  fail("binary JSON values cannot be template variables");
}

template Value from_json<nlohmann::json>(const nlohmann::json&, int);
template Value from_json<nlohmann::ordered_json>(const nlohmann::ordered_json&, int);

namespace {

void hex4(std::string& out, unsigned v) {
  static const char* digits = "0123456789abcdef";
  out += "\\u";
  for (int shift = 12; shift >= 0; shift -= 4) out += digits[(v >> shift) & 0xF];
}

void json_string(std::string& out, std::string_view s, bool ensure_ascii) {
  out += '"';
  if (!ensure_ascii) {
    for (unsigned char c : s) {
      switch (c) {
        case '"':
          out += "\\\"";
          break;
        case '\\':
          out += "\\\\";
          break;
        case '\n':
          out += "\\n";
          break;
        case '\r':
          out += "\\r";
          break;
        case '\t':
          out += "\\t";
          break;
        case '\b':
          out += "\\b";
          break;
        case '\f':
          out += "\\f";
          break;
        default:
          if (c < 0x20) {
            hex4(out, c);
          } else {
            out += static_cast<char>(c);
          }
      }
    }
  } else {
    for (char32_t c : decode_utf8(s)) {
      switch (c) {
        case '"':
          out += "\\\"";
          break;
        case '\\':
          out += "\\\\";
          break;
        case '\n':
          out += "\\n";
          break;
        case '\r':
          out += "\\r";
          break;
        case '\t':
          out += "\\t";
          break;
        case '\b':
          out += "\\b";
          break;
        case '\f':
          out += "\\f";
          break;
        default:
          if (c >= 0x20 && c < 0x7F) {
            out += static_cast<char>(c);
          } else if (c < 0x10000) {
            hex4(out, c);
          } else {
            char32_t v = c - 0x10000;
            hex4(out, 0xD800 + (v >> 10));
            hex4(out, 0xDC00 + (v & 0x3FF));
          }
      }
    }
  }
  out += '"';
}

std::string json_key(const Value& k) {
  switch (k.type) {
    case Type::kString:
      return k.s;
    case Type::kInt:
      return std::to_string(k.i);
    case Type::kBool:
      return k.i ? "true" : "false";
    case Type::kNone:
      return "null";
    case Type::kFloat:
      if (std::isnan(k.f)) return "NaN";
      if (std::isinf(k.f)) return k.f > 0 ? "Infinity" : "-Infinity";
      return float_repr(k.f);
    default:
      fail("keys must be str, int, float, bool or None, not " + type_name(k));
  }
}

void dump(const Value& v, const JsonStyle& st, int level, std::string& out) {
  auto newline = [&](int lvl) {
    budget_bytes(out.size() + 1 + lvl * st.indent.size());  // the indent may be a long string
    out += '\n';
    for (int n = 0; n < lvl; ++n) out += st.indent;
  };
  switch (v.type) {
    case Type::kNone:
      out += "null";
      return;
    case Type::kBool:
      out += v.i ? "true" : "false";
      return;
    case Type::kInt:
      out += std::to_string(v.i);
      return;
    case Type::kFloat:
      if (std::isnan(v.f)) {
        out += "NaN";
      } else if (std::isinf(v.f)) {
        out += v.f > 0 ? "Infinity" : "-Infinity";
      } else {
        out += float_repr(v.f);
      }
      return;
    case Type::kString:
      json_string(out, v.s, st.ensure_ascii);
      return;
    case Type::kList: {
      const auto& items = v.list->items;
      if (items.empty()) {
        out += "[]";
        return;
      }
      out += '[';
      for (size_t n = 0; n < items.size(); ++n) {
        if (n) out += st.item_sep;
        if (st.pretty) newline(level + 1);
        dump(items[n], st, level + 1, out);
        budget_bytes(out.size());  // shared sub-lists and long indents multiply the text
      }
      if (st.pretty) newline(level);
      out += ']';
      return;
    }
    case Type::kDict: {
      std::vector<const std::pair<Value, Value>*> items;
      for (const auto& kv : v.dict->items) items.push_back(&kv);
      if (items.empty()) {
        out += "{}";
        return;
      }
      if (st.sort_keys) {
        std::stable_sort(items.begin(), items.end(),
                         [](auto* a, auto* b) { return less(a->first, b->first); });
      }
      out += '{';
      for (size_t n = 0; n < items.size(); ++n) {
        if (n) out += st.item_sep;
        if (st.pretty) newline(level + 1);
        json_string(out, json_key(items[n]->first), st.ensure_ascii);
        out += st.key_sep;
        dump(items[n]->second, st, level + 1, out);
        budget_bytes(out.size());
      }
      if (st.pretty) newline(level);
      out += '}';
      return;
    }
    case Type::kUndefined:
      fail("Object of type Undefined is not JSON serializable");
    case Type::kObject:
      fail("Object of type " + v.obj->type_name() + " is not JSON serializable");
  }
}

}  // namespace

std::string dumps(const Value& v, const JsonStyle& style) {
  std::string out;
  dump(v, style, 0, out);
  return out;
}

// ---------------------------------------------------------------------------------------------
// str() and repr()

std::string float_repr(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  // Shortest round-trip digits, then Python's layout rule: positional notation for decimal
  // exponents in [-4, 16), scientific otherwise, always with a '.0' or an exponent.
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), d, std::chars_format::scientific);
  std::string_view sci(buf, res.ptr - buf);
  std::string out;
  if (sci.front() == '-') {
    out += '-';
    sci.remove_prefix(1);
  }
  size_t epos = sci.find('e');
  std::string digits;
  for (char c : sci.substr(0, epos)) {
    if (c != '.') digits += c;
  }
  int exp = std::stoi(std::string(sci.substr(epos + 1)));
  int decpt = exp + 1;
  int n = static_cast<int>(digits.size());
  if (decpt > -4 && decpt <= 16) {
    if (decpt <= 0) {
      out += "0." + std::string(-decpt, '0') + digits;
    } else if (decpt >= n) {
      out += digits + std::string(decpt - n, '0') + ".0";
    } else {
      out += digits.substr(0, decpt) + "." + digits.substr(decpt);
    }
  } else {
    out += digits[0];
    if (n > 1) out += "." + digits.substr(1);
    out += exp < 0 ? "e-" : "e+";
    int a = std::abs(exp);
    if (a < 10) out += '0';
    out += std::to_string(a);
  }
  return out;
}

namespace {

void repr_string(std::string& out, std::string_view s) {
  bool has_single = s.find('\'') != std::string_view::npos;
  bool has_double = s.find('"') != std::string_view::npos;
  char quote = has_single && !has_double ? '"' : '\'';
  out += quote;
  static const char* hex = "0123456789abcdef";
  for (char32_t c : decode_utf8(s)) {
    if (c == static_cast<char32_t>(quote) || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\t') {
      out += "\\t";
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c < 0x20 || c == 0x7F) {
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 0xF];
    } else if (c < 0x7F || is_printable(c)) {
      append_utf8(out, c);
    } else if (c <= 0xFF) {
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 0xF];
    } else {
      int width = c <= 0xFFFF ? 4 : 8;
      out += width == 4 ? "\\u" : "\\U";
      for (int shift = (width - 1) * 4; shift >= 0; shift -= 4) out += hex[(c >> shift) & 0xF];
    }
  }
  out += quote;
}

void repr_into(std::string& out, const Value& v, int depth) {
  // Lists and dicts are depth-bounded, but a namespace can contain itself.
  if (depth > 2 * kMaxNesting)
    fail("maximum recursion depth exceeded while getting the repr of an object");
  switch (v.type) {
    case Type::kUndefined:
      out += "Undefined";
      return;
    case Type::kNone:
      out += "None";
      return;
    case Type::kBool:
      out += v.i ? "True" : "False";
      return;
    case Type::kInt:
      out += std::to_string(v.i);
      return;
    case Type::kFloat:
      out += float_repr(v.f);
      return;
    case Type::kString:
      repr_string(out, v.s);
      return;
    case Type::kList: {
      const auto& items = v.list->items;
      const char* open = "[";
      const char* close = "]";
      switch (v.list->kind) {
        case ListKind::kList:
          break;
        case ListKind::kTuple:
          open = "(";
          close = items.size() == 1 ? ",)" : ")";
          break;
        case ListKind::kDictItems:
          open = "dict_items([";
          close = "])";
          break;
        case ListKind::kDictKeys:
          open = "dict_keys([";
          close = "])";
          break;
        case ListKind::kDictValues:
          open = "dict_values([";
          close = "])";
          break;
      }
      out += open;
      for (size_t n = 0; n < items.size(); ++n) {
        if (n) out += ", ";
        repr_into(out, items[n], depth + 1);
        budget_bytes(out.size());  // shared sub-lists can make the text exponentially long
      }
      out += close;
      return;
    }
    case Type::kDict: {
      out += '{';
      bool first = true;
      for (const auto& [k, val] : v.dict->items) {
        if (!first) out += ", ";
        first = false;
        repr_into(out, k, depth + 1);
        out += ": ";
        repr_into(out, val, depth + 1);
        budget_bytes(out.size());
      }
      out += '}';
      return;
    }
    case Type::kObject:
      out += v.obj->repr(depth + 1);
      return;
  }
}

}  // namespace

std::string repr(const Value& v, int depth) {
  std::string out;
  repr_into(out, v, depth);
  return out;
}

std::string to_str(const Value& v) {
  switch (v.type) {
    case Type::kUndefined:
      return "";
    case Type::kString:
      return v.s;
    default:
      return repr(v);
  }
}

// ---------------------------------------------------------------------------------------------
// Python semantics

bool truthy(const Value& v) {
  switch (v.type) {
    case Type::kUndefined:
    case Type::kNone:
      return false;
    case Type::kBool:
    case Type::kInt:
      return v.i != 0;
    case Type::kFloat:
      return v.f != 0;
    case Type::kString:
      return !v.s.empty();
    case Type::kList:
      return !v.list->items.empty();
    case Type::kDict:
      return !v.dict->items.empty();
    case Type::kObject:
      return true;
  }
  return false;
}

namespace {

// Exact comparison of an int with a double, as Python does (no rounding of the int).
int compare_int_double(int64_t i, double d) {
  if (std::isnan(d)) return 2;  // unordered
  if (d >= 9223372036854775808.0) return -1;
  if (d < -9223372036854775808.0) return 1;
  double t = std::trunc(d);
  auto ti = static_cast<int64_t>(t);
  if (i != ti) return i < ti ? -1 : 1;
  if (d == t) return 0;
  return d > t ? -1 : 1;
}

// -1/0/1, or 2 when unordered (NaN).
int compare_numbers(const Value& a, const Value& b) {
  if (a.is_int() && b.is_int()) return a.i < b.i ? -1 : (a.i > b.i ? 1 : 0);
  if (a.is_int()) return compare_int_double(a.i, b.f);
  if (b.is_int()) {
    int r = compare_int_double(b.i, a.f);
    return r == 2 ? 2 : -r;
  }
  if (a.f < b.f) return -1;
  if (a.f > b.f) return 1;
  if (a.f == b.f) return 0;
  return 2;
}

bool same_sequence_kind(const Value& a, const Value& b) {
  bool ta = a.list->kind == ListKind::kTuple;
  bool tb = b.list->kind == ListKind::kTuple;
  return ta == tb;
}

}  // namespace

bool equal(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) return compare_numbers(a, b) == 0;
  if (a.type != b.type) return false;
  switch (a.type) {
    case Type::kUndefined:
    case Type::kNone:
      return true;
    case Type::kString:
      return a.s == b.s;
    case Type::kList: {
      if (a.list == b.list) return true;
      if (!same_sequence_kind(a, b) || a.list->items.size() != b.list->items.size()) return false;
      // Two lists built alike from shared sub-lists can hold 2^40 nodes: count the walk.
      budget_tick();
      for (size_t n = 0; n < a.list->items.size(); ++n) {
        if (!equal(a.list->items[n], b.list->items[n])) return false;
      }
      return true;
    }
    case Type::kDict: {
      if (a.dict == b.dict) return true;
      if (a.dict->items.size() != b.dict->items.size()) return false;
      budget_tick();
      for (const auto& [k, v] : a.dict->items) {
        const Value* other = b.dict->find(k);
        if (!other || !equal(v, *other)) return false;
      }
      return true;
    }
    case Type::kObject:
      return a.obj == b.obj;
    default:
      return false;
  }
}

bool less(const Value& a, const Value& b) {
  if (a.is_undefined()) fail_undefined(a);
  if (b.is_undefined()) fail_undefined(b);
  if (a.is_number() && b.is_number()) return compare_numbers(a, b) == -1;
  if (a.type == Type::kString && b.type == Type::kString) return a.s < b.s;
  if (a.type == Type::kList && b.type == Type::kList && same_sequence_kind(a, b)) {
    const auto& x = a.list->items;
    const auto& y = b.list->items;
    for (size_t n = 0; n < x.size() && n < y.size(); ++n) {
      if (!equal(x[n], y[n])) return less(x[n], y[n]);
    }
    return x.size() < y.size();
  }
  fail("'<' not supported between instances of '" + type_name(a) + "' and '" + type_name(b) + "'");
}

std::string type_name(const Value& v) {
  switch (v.type) {
    case Type::kUndefined:
      return "Undefined";
    case Type::kNone:
      return "NoneType";
    case Type::kBool:
      return "bool";
    case Type::kInt:
      return "int";
    case Type::kFloat:
      return "float";
    case Type::kString:
      return "str";
    case Type::kList:
      switch (v.list->kind) {
        case ListKind::kTuple:
          return "tuple";
        case ListKind::kDictItems:
          return "dict_items";
        case ListKind::kDictKeys:
          return "dict_keys";
        case ListKind::kDictValues:
          return "dict_values";
        default:
          return "list";
      }
    case Type::kDict:
      return "dict";
    case Type::kObject:
      return v.obj->type_name();
  }
  return "object";
}

std::string object_type_repr(const Value& v) {
  if (v.is_none()) return "None";
  std::string out = "'";
  out += type_name(v);
  return out + " object'";
}

size_t py_len(const Value& v) {
  switch (v.type) {
    case Type::kUndefined:
      return 0;
    case Type::kString:
      return count_code_points(v.s);
    case Type::kList:
      return v.list->items.size();
    case Type::kDict:
      return v.dict->items.size();
    default:
      fail("object of type '" + type_name(v) + "' has no len()");
  }
}

std::vector<Value> iterate(const Value& v) {
  std::vector<Value> out;
  switch (v.type) {
    case Type::kUndefined:
      return out;
    case Type::kList:
      return v.list->items;
    case Type::kDict:
      out.reserve(v.dict->items.size());
      for (const auto& kv : v.dict->items) out.push_back(kv.first);
      return out;
    case Type::kString: {
      // A one-character Value per code point is ~100 bytes: a 16 MiB string would become
      // gigabytes before the loop that walks it could count its iterations.
      budget_items(count_code_points(v.s));
      for (char32_t c : decode_utf8(v.s)) {
        std::string ch;
        append_utf8(ch, c);
        out.push_back(Value::str(std::move(ch)));
      }
      return out;
    }
    default:
      fail("'" + type_name(v) + "' object is not iterable");
  }
}

int64_t parse_digits(std::string_view digits) {
  int64_t v = 0;
  for (char c : digits) {
    if (v > (INT64_MAX - (c - '0')) / 10) return INT64_MAX;
    v = v * 10 + (c - '0');
  }
  return v;
}

void check_int_range(double d) {
  if (!(d >= -9223372036854775808.0 && d < 9223372036854775808.0)) {
    fail(std::isnan(d) ? "cannot convert float NaN to integer"
                       : "integer out of range (kiln's template integers are 64-bit)");
  }
}

// ---------------------------------------------------------------------------------------------
// UTF-8 and character classes

std::u32string decode_utf8(std::string_view s) {
  std::u32string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      out += c;
      ++i;
      continue;
    }
    int len = c >= 0xF0 && c <= 0xF4 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 && c < 0xE0 ? 2 : 0;
    if (c >= 0xF5) len = 0;
    char32_t cp = len == 2 ? c & 0x1F : len == 3 ? c & 0x0F : c & 0x07;
    bool ok = len > 0 && i + len <= s.size();
    for (int k = 1; ok && k < len; ++k) {
      auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) ok = false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    if (ok) {
      // Reject overlong forms, surrogates and values past U+10FFFF.
      if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
          (cp >= 0xD800 && cp <= 0xDFFF)) {
        ok = false;
      }
    }
    if (!ok) {
      out += static_cast<char32_t>(0xDC00 + c);
      ++i;
      continue;
    }
    out += cp;
    i += len;
  }
  return out;
}

void append_utf8(std::string& out, char32_t c) {
  if (c >= 0xDC80 && c <= 0xDCFF) {
    out += static_cast<char>(c - 0xDC00);  // surrogateescape: the original invalid byte
  } else if (c < 0x80) {
    out += static_cast<char>(c);
  } else if (c < 0x800) {
    out += static_cast<char>(0xC0 | (c >> 6));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += static_cast<char>(0xE0 | (c >> 12));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (c >> 18));
    out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  }
}

std::string encode_utf8(std::u32string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t c : s) append_utf8(out, c);
  return out;
}

bool is_ascii(std::string_view s) {
  for (char c : s) {
    if (static_cast<unsigned char>(c) >= 0x80) return false;
  }
  return true;
}

size_t count_code_points(std::string_view s) {
  if (is_ascii(s)) return s.size();
  return decode_utf8(s).size();
}

namespace {

utf8proc_category_t category(char32_t c) {
  if (c > 0x10FFFF) return UTF8PROC_CATEGORY_CN;
  return utf8proc_category(static_cast<utf8proc_int32_t>(c));
}

}  // namespace

bool py_isspace(char32_t c) {
  if (c < 0x80) return c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F);
  return c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 ||
         c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

char32_t to_lower(char32_t c) {
  if (c < 0x80) return c >= 'A' && c <= 'Z' ? c + 32 : c;
  if (c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) return c;
  return static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(c)));
}

char32_t to_upper(char32_t c) {
  if (c < 0x80) return c >= 'a' && c <= 'z' ? c - 32 : c;
  if (c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) return c;
  return static_cast<char32_t>(utf8proc_toupper(static_cast<utf8proc_int32_t>(c)));
}

char32_t to_title(char32_t c) {
  if (c < 0x80) return to_upper(c);
  if (c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) return c;
  return static_cast<char32_t>(utf8proc_totitle(static_cast<utf8proc_int32_t>(c)));
}

bool is_lower(char32_t c) {
  return c < 0x80 ? (c >= 'a' && c <= 'z') : category(c) == UTF8PROC_CATEGORY_LL;
}
bool is_upper(char32_t c) {
  return c < 0x80 ? (c >= 'A' && c <= 'Z') : category(c) == UTF8PROC_CATEGORY_LU;
}

bool is_cased(char32_t c) {
  if (c < 0x80) return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
  auto cat = category(c);
  return cat == UTF8PROC_CATEGORY_LU || cat == UTF8PROC_CATEGORY_LL || cat == UTF8PROC_CATEGORY_LT;
}

bool is_alpha(char32_t c) {
  if (c < 0x80) return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
  auto cat = category(c);
  return cat >= UTF8PROC_CATEGORY_LU && cat <= UTF8PROC_CATEGORY_LO;
}

bool is_digit(char32_t c) {
  if (c < 0x80) return c >= '0' && c <= '9';
  auto cat = category(c);
  return cat == UTF8PROC_CATEGORY_ND || cat == UTF8PROC_CATEGORY_NL || cat == UTF8PROC_CATEGORY_NO;
}

bool is_printable(char32_t c) {
  if (c == ' ') return true;
  switch (category(c)) {
    case UTF8PROC_CATEGORY_CN:
    case UTF8PROC_CATEGORY_CC:
    case UTF8PROC_CATEGORY_CF:
    case UTF8PROC_CATEGORY_CS:
    case UTF8PROC_CATEGORY_CO:
    case UTF8PROC_CATEGORY_ZS:
    case UTF8PROC_CATEGORY_ZL:
    case UTF8PROC_CATEGORY_ZP:
      return false;
    default:
      return true;
  }
}

// ---------------------------------------------------------------------------------------------
// str methods

std::string py_lower(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  if (is_ascii(s)) {
    for (char c : s) out += static_cast<char>(to_lower(static_cast<unsigned char>(c)));
    return out;
  }
  for (char32_t c : decode_utf8(s)) append_utf8(out, to_lower(c));
  return out;
}

std::string py_upper(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  if (is_ascii(s)) {
    for (char c : s) out += static_cast<char>(to_upper(static_cast<unsigned char>(c)));
    return out;
  }
  for (char32_t c : decode_utf8(s)) append_utf8(out, to_upper(c));
  return out;
}

std::string py_title(std::string_view s) {
  std::string out;
  bool prev_cased = false;
  for (char32_t c : decode_utf8(s)) {
    append_utf8(out, prev_cased ? to_lower(c) : to_title(c));
    prev_cased = is_cased(c);
  }
  return out;
}

std::string py_capitalize(std::string_view s) {
  std::string out;
  bool first = true;
  for (char32_t c : decode_utf8(s)) {
    append_utf8(out, first ? to_title(c) : to_lower(c));
    first = false;
  }
  return out;
}

std::string py_strip(std::string_view s, const Value& chars, bool left, bool right) {
  bool whitespace = chars.is_none() || chars.is_undefined();
  if (!whitespace && !chars.is_string()) fail("strip arg must be None or str");
  if (is_ascii(s) && (whitespace || is_ascii(chars.s))) {
    // Byte-wise fast path: message contents are stripped on every render.
    auto strip_me = [&](char c) {
      return whitespace ? py_isspace(static_cast<unsigned char>(c))
                        : chars.s.find(c) != std::string::npos;
    };
    size_t b = 0, e = s.size();
    if (left) {
      while (b < e && strip_me(s[b])) ++b;
    }
    if (right) {
      while (e > b && strip_me(s[e - 1])) --e;
    }
    return std::string(s.substr(b, e - b));
  }
  std::u32string u = decode_utf8(s);
  std::u32string set;
  if (!whitespace) set = decode_utf8(chars.s);
  auto strip_me = [&](char32_t c) {
    return whitespace ? py_isspace(c) : set.find(c) != std::u32string::npos;
  };
  size_t b = 0, e = u.size();
  if (left) {
    while (b < e && strip_me(u[b])) ++b;
  }
  if (right) {
    while (e > b && strip_me(u[e - 1])) --e;
  }
  return encode_utf8(std::u32string_view(u).substr(b, e - b));
}

std::vector<std::string> py_split(std::string_view s, const Value& sep, int64_t maxsplit,
                                  bool from_right) {
  std::vector<std::string> out;
  if (sep.is_none() || sep.is_undefined()) {
    std::u32string u = decode_utf8(s);
    std::vector<std::u32string> parts;
    if (!from_right) {
      size_t i = 0;
      while (true) {
        while (i < u.size() && py_isspace(u[i])) ++i;
        if (i >= u.size()) break;
        if (maxsplit >= 0 && static_cast<int64_t>(parts.size()) == maxsplit) {
          size_t e = u.size();
          while (e > i && py_isspace(u[e - 1])) --e;
          parts.push_back(u.substr(i, e - i));
          break;
        }
        size_t j = i;
        while (j < u.size() && !py_isspace(u[j])) ++j;
        budget_items(parts.size() + 1);  // the parts become list elements
        parts.push_back(u.substr(i, j - i));
        i = j;
      }
    } else {
      size_t e = u.size();
      while (true) {
        while (e > 0 && py_isspace(u[e - 1])) --e;
        if (e == 0) break;
        if (maxsplit >= 0 && static_cast<int64_t>(parts.size()) == maxsplit) {
          size_t b = 0;
          while (b < e && py_isspace(u[b])) ++b;
          parts.push_back(u.substr(b, e - b));
          break;
        }
        size_t j = e;
        while (j > 0 && !py_isspace(u[j - 1])) --j;
        budget_items(parts.size() + 1);
        parts.push_back(u.substr(j, e - j));
        e = j;
      }
      std::reverse(parts.begin(), parts.end());
    }
    for (auto& p : parts) out.push_back(encode_utf8(p));
    return out;
  }
  if (!sep.is_string()) fail("must be str or None, not " + type_name(sep));
  const std::string& d = sep.s;
  if (d.empty()) fail("empty separator");
  if (!from_right) {
    size_t start = 0;
    while (maxsplit < 0 || static_cast<int64_t>(out.size()) < maxsplit) {
      size_t pos = s.find(d, start);
      if (pos == std::string_view::npos) break;
      budget_items(out.size() + 1);
      out.emplace_back(s.substr(start, pos - start));
      start = pos + d.size();
    }
    out.emplace_back(s.substr(start));
  } else {
    size_t end = s.size();
    while (maxsplit < 0 || static_cast<int64_t>(out.size()) < maxsplit) {
      if (end < d.size()) break;
      size_t pos = s.rfind(d, end - d.size());
      if (pos == std::string_view::npos) break;
      budget_items(out.size() + 1);
      out.emplace_back(s.substr(pos + d.size(), end - pos - d.size()));
      end = pos;
    }
    out.emplace_back(s.substr(0, end));
    std::reverse(out.begin(), out.end());
  }
  return out;
}

std::vector<std::string> py_splitlines(std::string_view s, bool keepends) {
  std::u32string u = decode_utf8(s);
  std::vector<std::string> out;
  size_t i = 0, start = 0;
  while (i < u.size()) {
    char32_t c = u[i];
    bool brk = c == '\n' || c == '\r' || c == 0x0B || c == 0x0C || c == 0x1C || c == 0x1D ||
               c == 0x1E || c == 0x85 || c == 0x2028 || c == 0x2029;
    if (!brk) {
      ++i;
      continue;
    }
    size_t eol = i;
    ++i;
    if (c == '\r' && i < u.size() && u[i] == '\n') ++i;
    budget_items(out.size() + 1);
    out.push_back(encode_utf8(std::u32string_view(u).substr(start, (keepends ? i : eol) - start)));
    start = i;
  }
  if (start < u.size()) out.push_back(encode_utf8(std::u32string_view(u).substr(start)));
  return out;
}

std::string py_replace(std::string_view s, std::string_view old, std::string_view repl,
                       int64_t count) {
  // Size the result before building it: replacing "" or one char by a long string multiplies the
  // input (16 MiB * 16 MiB), far past the output cap that a check afterwards would apply.
  size_t n = 0;
  if (old.empty()) {
    n = count_code_points(s) + 1;
  } else {
    for (size_t p = s.find(old); p != std::string_view::npos; p = s.find(old, p + old.size())) ++n;
  }
  if (count >= 0) n = std::min(n, static_cast<size_t>(count));
  if (repl.size() > old.size()) {
    const size_t grow = repl.size() - old.size();
    budget_bytes(n > (SIZE_MAX - s.size()) / grow ? SIZE_MAX : s.size() + n * grow);
  }
  std::string out;
  if (old.empty()) {
    // Python inserts the replacement before every code point and at the end.
    std::u32string u = decode_utf8(s);
    int64_t done = 0;
    for (char32_t c : u) {
      if (count < 0 || done < count) {
        out += repl;
        ++done;
      }
      append_utf8(out, c);
    }
    if (count < 0 || done < count) out += repl;
    return out;
  }
  size_t start = 0;
  int64_t done = 0;
  while (count < 0 || done < count) {
    size_t pos = s.find(old, start);
    if (pos == std::string_view::npos) break;
    out += s.substr(start, pos - start);
    out += repl;
    start = pos + old.size();
    ++done;
  }
  out += s.substr(start);
  return out;
}

std::vector<size_t> slice_indices(size_t len, const Value& start_v, const Value& stop_v,
                                  const Value& step_v) {
  auto get = [](const Value& v, bool* omitted) -> int64_t {
    *omitted = v.is_none();
    if (*omitted) return 0;
    if (!v.is_int()) {
      if (v.is_undefined()) fail_undefined(v);
      fail("slice indices must be integers or None or have an __index__ method");
    }
    return v.i;
  };
  bool no_start, no_stop, no_step;
  int64_t step = get(step_v, &no_step);
  if (no_step) step = 1;
  if (step == 0) fail("slice step cannot be zero");
  auto n = static_cast<int64_t>(len);
  int64_t lower = step < 0 ? -1 : 0;
  int64_t upper = step < 0 ? n - 1 : n;
  auto clamp = [&](int64_t v) {
    if (v < 0) {
      v += n;
      if (v < lower) v = lower;
    } else if (v > upper) {
      v = upper;
    }
    return v;
  };
  int64_t start = get(start_v, &no_start);
  start = no_start ? (step < 0 ? upper : lower) : clamp(start);
  int64_t stop = get(stop_v, &no_stop);
  stop = no_stop ? (step < 0 ? lower : upper) : clamp(stop);
  std::vector<size_t> out;
  if (step > 0) {
    for (int64_t k = start; k < stop; k += step) out.push_back(static_cast<size_t>(k));
  } else {
    for (int64_t k = start; k > stop; k += step) out.push_back(static_cast<size_t>(k));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// printf-style formatting (`"%s" % x`)

std::string py_percent_format(std::string_view fmt, const Value& args) {
  std::vector<Value> positional;
  const DictData* mapping = nullptr;
  // CPython treats any subscriptable non-tuple argument (dict, list, jinja2's Undefined) as a
  // mapping, which also switches off the "not all arguments converted" check.
  bool mapping_like = false;
  if (args.is_list() && args.list->kind == ListKind::kTuple) {
    positional = args.list->items;
  } else {
    if (args.is_dict()) mapping = args.dict.get();
    mapping_like = args.is_dict() || args.is_list() || args.is_undefined();
    positional.push_back(args);
  }
  size_t next = 0;
  bool used_mapping = false;
  std::string out;
  size_t i = 0;
  while (i < fmt.size()) {
    char c = fmt[i];
    if (c != '%') {
      out += c;
      ++i;
      continue;
    }
    ++i;
    if (i >= fmt.size()) fail("incomplete format");
    const Value* arg = nullptr;
    if (fmt[i] == '(') {
      size_t close = fmt.find(')', i);
      if (close == std::string_view::npos) fail("incomplete format key");
      if (!mapping) fail("format requires a mapping");
      const Value* v = mapping->find(fmt.substr(i + 1, close - i - 1));
      if (!v) fail("KeyError: " + std::string(fmt.substr(i + 1, close - i - 1)));
      arg = v;
      used_mapping = true;
      i = close + 1;
    }
    std::string flags;
    while (i < fmt.size() && std::strchr("-+ #0", fmt[i])) flags += fmt[i++];
    std::string width, precision;
    while (i < fmt.size() && fmt[i] >= '0' && fmt[i] <= '9') width += fmt[i++];
    bool has_precision = false;
    if (i < fmt.size() && fmt[i] == '.') {
      has_precision = true;
      ++i;
      while (i < fmt.size() && fmt[i] >= '0' && fmt[i] <= '9') precision += fmt[i++];
    }
    if (i >= fmt.size()) fail("incomplete format");
    char conv = fmt[i++];
    if (conv == '%') {
      out += '%';
      continue;
    }
    if (!arg) {
      if (next >= positional.size()) fail("not enough arguments for format string");
      arg = &positional[next++];
    }
    std::string spec = "%" + flags + width + (has_precision ? "." + precision : "");
    // Width and precision become allocations (padding, or glibc's digit buffer for %.Nf), so
    // they are held to the output cap before anything is formatted.
    const auto w = static_cast<size_t>(parse_digits(width));
    const auto p = static_cast<size_t>(parse_digits(precision));
    budget_bytes(out.size() + w);
    // printf into a string of the right size (a fixed buffer would cut long output short).
    auto print = [](const std::string& f, auto x) {
      int len = std::snprintf(nullptr, 0, f.c_str(), x);
      if (len < 0) fail("format width or precision is too large");
      std::string r(static_cast<size_t>(len) + 1, '\0');
      std::snprintf(r.data(), r.size(), f.c_str(), x);
      r.resize(static_cast<size_t>(len));
      return r;
    };
    switch (conv) {
      case 's':
      case 'r':
      case 'a': {
        std::string text = conv == 's' ? to_str(*arg) : repr(*arg);
        if (has_precision) {
          std::u32string u = decode_utf8(text);
          if (u.size() > p) text = encode_utf8(std::u32string_view(u).substr(0, p));
        }
        size_t len = count_code_points(text);
        if (len < w) {
          if (flags.find('-') != std::string::npos) {
            text += std::string(w - len, ' ');
          } else {
            text = std::string(w - len, ' ') + text;
          }
        }
        out += text;
        break;
      }
      case 'd':
      case 'i':
      case 'u':
      case 'x':
      case 'X':
      case 'o':
      case 'c': {
        if (!arg->is_number()) {
          fail(std::string("%") + conv + " format: a real number is required, not " +
               type_name(*arg));
        }
        int64_t n = arg->i;
        if (arg->type == Type::kFloat) {
          check_int_range(arg->f);
          n = static_cast<int64_t>(arg->f);
        }
        if (conv == 'c') {
          if (n < 0 || n > 0x10FFFF) fail("%c arg not in range(0x110000)");
          append_utf8(out, static_cast<char32_t>(n));
          break;
        }
        budget_bytes(out.size() + p);  // zero padding
        char t = conv == 'i' || conv == 'u' ? 'd' : conv;
        out += print(spec + "ll" + t, static_cast<long long>(n));
        break;
      }
      case 'f':
      case 'F':
      case 'e':
      case 'E':
      case 'g':
      case 'G': {
        if (!arg->is_number()) {
          fail(std::string("must be real number, not ") + type_name(*arg));
        }
        budget_bytes(out.size() + p);  // digits
        out += print(spec + conv, arg->as_double());
        break;
      }
      default:
        fail(std::string("unsupported format character '") + conv + "'");
    }
  }
  if (!used_mapping && !mapping_like && next < positional.size()) {
    fail("not all arguments converted during string formatting");
  }
  return out;
}

}  // namespace kiln::jinja
