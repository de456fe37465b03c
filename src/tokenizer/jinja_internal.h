// Internals of the Jinja interpreter (jinja.h), shared by the jinja_*.cpp files only.
//
// Layout: jinja_value.cpp holds the Python value model (str/repr/json/equality, UTF-8 string
// helpers); jinja_parse.cpp the lexer and parser; jinja_eval.cpp the tree-walking interpreter;
// jinja_filters.cpp the filters and tests; jinja_methods.cpp the str/list/dict methods and globals.
#pragma once

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "tokenizer/jinja.h"

namespace kiln::jinja {

// A failure while rendering. JinjaTemplate::render turns it into a kiln::Error with the line.
class TemplateError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
[[noreturn]] void fail(const std::string& msg);
// What the template's own raise_exception() throws.
class RaisedError : public TemplateError {
 public:
  using TemplateError::TemplateError;
};
// Fails with the reason an Undefined value carries ("'x' is undefined").
struct Value;
[[noreturn]] void fail_undefined(const Value& v);

// Budgets of the render running on this thread, for value helpers that have no Interp at hand
// (repr, json.dumps, equality, splitting). Values share sub-lists by pointer, so `[x, x]` doubled
// 40 times is a small value whose repr or comparison is astronomically large: these let the
// helpers stop as they grow instead of after. Outside a render they do nothing.
void budget_bytes(size_t bytes);  // fails if a string of `bytes` would exceed max_output_bytes
void budget_items(size_t n);      // fails if n more elements would exceed max_loop_iterations
void budget_tick(size_t n = 1);   // counts n units of work against max_loop_iterations

// Deepest list/dict nesting a value may have. Bounding it at construction keeps every recursive
// walk (repr, tojson, ==, destruction) far from the C++ stack limit; Python's own recursion
// limit stops json.dumps and repr around 1000 levels anyway.
constexpr int kMaxNesting = 256;

// ---------------------------------------------------------------------------------------------
// Values

enum class Type : uint8_t {
  kUndefined,
  kNone,
  kBool,
  kInt,
  kFloat,
  kString,
  kList,
  kDict,
  kObject
};

// Lists are immutable once built (ImmutableSandboxedEnvironment forbids list.append etc.), so
// they are shared by pointer. The kind only changes how repr() prints them.
enum class ListKind : uint8_t { kList, kTuple, kDictItems, kDictKeys, kDictValues };

struct ListData;
struct DictData;
struct Object;

struct Value {
  Type type = Type::kUndefined;
  int64_t i = 0;  // kBool (0 or 1) and kInt
  double f = 0;   // kFloat
  std::string s;  // kString; for kUndefined, the reason it is undefined (for error messages)
  std::shared_ptr<const ListData> list;
  std::shared_ptr<const DictData> dict;
  std::shared_ptr<Object> obj;

  static Value undefined(std::string why = {}) {
    Value v;
    v.s = std::move(why);
    return v;
  }
  static Value none() {
    Value v;
    v.type = Type::kNone;
    return v;
  }
  static Value boolean(bool b) {
    Value v;
    v.type = Type::kBool;
    v.i = b;
    return v;
  }
  static Value integer(int64_t n) {
    Value v;
    v.type = Type::kInt;
    v.i = n;
    return v;
  }
  static Value real(double d) {
    Value v;
    v.type = Type::kFloat;
    v.f = d;
    return v;
  }
  static Value str(std::string text) {
    Value v;
    v.type = Type::kString;
    v.s = std::move(text);
    return v;
  }
  static Value object(std::shared_ptr<Object> o) {
    Value v;
    v.type = Type::kObject;
    v.obj = std::move(o);
    return v;
  }

  bool is_undefined() const { return type == Type::kUndefined; }
  bool is_none() const { return type == Type::kNone; }
  bool is_string() const { return type == Type::kString; }
  bool is_int() const {
    return type == Type::kInt || type == Type::kBool;
  }  // Python int incl. bool
  bool is_number() const { return is_int() || type == Type::kFloat; }
  bool is_list() const { return type == Type::kList; }
  bool is_dict() const { return type == Type::kDict; }
  double as_double() const { return type == Type::kFloat ? f : static_cast<double>(i); }
};

struct ListData {
  std::vector<Value> items;
  ListKind kind = ListKind::kList;
  int depth = 1;
  // dict.items()/keys()/values() views iterate and have a length but cannot be indexed.
  bool is_view() const { return kind >= ListKind::kDictItems; }
};

// An insertion-ordered Python dict. Keys follow Python equality (1, 1.0 and True are one key).
struct DictData {
  std::vector<std::pair<Value, Value>> items;
  int depth = 1;

  const Value* find(const Value& key) const;
  const Value* find(std::string_view key) const;
  void set(Value key, Value value);

 private:
  // Built once a dict grows past a few entries so lookups in big JSON objects stay O(1).
  std::unordered_map<std::string, size_t> index_;
};

// Builders that compute and enforce the nesting depth.
Value make_list(std::vector<Value> items, ListKind kind = ListKind::kList);
Value make_dict(DictData dict);

class Interp;

struct CallArgs {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;
};

// Callables, namespaces and loop objects.
struct Object {
  virtual ~Object() = default;
  // Python-style type name used in messages ("Namespace", "function").
  virtual std::string type_name() const = 0;
  // `depth` is the repr nesting so far (a namespace may contain itself).
  virtual std::string repr(int depth) const = 0;
  virtual bool getattr(const std::string& name, Value* out) { return false; }
  virtual bool callable() const { return false; }
  virtual Value call(Interp& in, CallArgs& args);
  // Drops references to other values. Namespaces, loops and macro closures can form reference
  // cycles (a namespace holding itself, a frame holding a macro whose closure is that frame);
  // the interpreter releases every such object when a render ends so nothing leaks.
  virtual void release() {}
};

// A built-in function, global or bound method.
struct Function : Object {
  std::string name;
  std::function<Value(Interp&, CallArgs&)> fn;
  Function(std::string n, std::function<Value(Interp&, CallArgs&)> f)
      : name(std::move(n)), fn(std::move(f)) {}
  std::string type_name() const override { return "builtin_function_or_method"; }
  std::string repr(int) const override { return "<built-in function " + name + ">"; }
  bool callable() const override { return true; }
  Value call(Interp& in, CallArgs& args) override { return fn(in, args); }
};

// jinja2's namespace(): the one mutable object templates can create (`set ns.attr = ...`).
struct Namespace : Object {
  DictData attrs;
  std::string type_name() const override { return "Namespace"; }
  std::string repr(int depth) const override;
  bool getattr(const std::string& name, Value* out) override;
  void release() override { attrs = DictData(); }
};

// Conversions to and from JSON.
template <class Json>
Value from_json(const Json& j, int depth = 0);

struct JsonStyle {
  bool ensure_ascii = false;
  bool sort_keys = false;
  bool pretty = false;  // indent given (even 0 or ""): newlines between items
  std::string indent;   // per level
  std::string item_sep = ", ";
  std::string key_sep = ": ";
};
// Python json.dumps.
std::string dumps(const Value& v, const JsonStyle& style);

// Python semantics.
std::string to_str(const Value& v);  // str(); Undefined prints as ""
std::string repr(const Value& v, int depth = 0);
std::string float_repr(double d);
bool truthy(const Value& v);
bool equal(const Value& a, const Value& b);
bool less(const Value& a, const Value& b);  // `<`; fails on unorderable types like Python
std::string type_name(const Value& v);      // 'int', 'str', 'dict', 'NoneType' ...
// jinja2's object_type_repr: "'dict object'", "None".
std::string object_type_repr(const Value& v);
// Python len(); fails for types without a length.
size_t py_len(const Value& v);
// Python iter() materialized: str -> chars, dict -> keys, Undefined -> empty.
std::vector<Value> iterate(const Value& v);
void check_int_range(double d);
// A run of ASCII digits as a number, saturating at INT64_MAX (std::stoll would throw a
// std::out_of_range that is no template error).
int64_t parse_digits(std::string_view digits);

// UTF-8 helpers. Invalid bytes decode to U+DC80..U+DCFF and encode back unchanged
// (Python's surrogateescape), so no input is ever mangled.
std::u32string decode_utf8(std::string_view s);
std::string encode_utf8(std::u32string_view s);
void append_utf8(std::string& out, char32_t c);
bool is_ascii(std::string_view s);
size_t count_code_points(std::string_view s);
bool py_isspace(char32_t c);
char32_t to_lower(char32_t c);
char32_t to_upper(char32_t c);
char32_t to_title(char32_t c);
bool is_cased(char32_t c);
bool is_lower(char32_t c);
bool is_upper(char32_t c);
bool is_alpha(char32_t c);
bool is_digit(char32_t c);  // str.isdigit/isdecimal/isnumeric approximated by category N*
bool is_printable(char32_t c);

// Python str methods on UTF-8 strings.
std::string py_lower(std::string_view s);
std::string py_upper(std::string_view s);
std::string py_title(std::string_view s);       // str.title()
std::string py_capitalize(std::string_view s);  // str.capitalize()
std::string py_strip(std::string_view s, const Value& chars, bool left, bool right);
std::vector<std::string> py_split(std::string_view s, const Value& sep, int64_t maxsplit,
                                  bool from_right);
std::vector<std::string> py_splitlines(std::string_view s, bool keepends);
std::string py_replace(std::string_view s, std::string_view old, std::string_view repl,
                       int64_t count);
// Python `fmt % args` (printf-style formatting) for the common conversions.
std::string py_percent_format(std::string_view fmt, const Value& args);
// Python slicing semantics on a length; fills the selected indices.
std::vector<size_t> slice_indices(size_t len, const Value& start, const Value& stop,
                                  const Value& step);

// ---------------------------------------------------------------------------------------------
// Syntax tree

enum class ExprKind : uint8_t {
  kConst,
  kName,
  kList,
  kTuple,
  kDict,    // args = key0, value0, key1, value1, ...
  kAttr,    // args[0].name
  kItem,    // args[0][args[1]]
  kSlice,   // args[0][args[1]:args[2]:args[3]] (null = omitted)
  kCall,    // args[0](call)
  kFilter,  // args[0] | name(call); args[0] null in filter blocks
  kTest,    // args[0] is [not] name(call)
  kNot,
  kNeg,
  kPos,
  kBinary,  // name = + - * / // % **
  kConcat,  // args joined with ~
  kAnd,
  kOr,
  kCompare,  // args[0] ops[0] args[1] ops[1] args[2] ...
  kCond,     // args[1] if args[0] else args[2] (args[2] may be null)
};

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

struct CallExpr {
  std::vector<ExprPtr> pos;
  std::vector<std::pair<std::string, ExprPtr>> kw;
  ExprPtr star;      // *args
  ExprPtr starstar;  // **kwargs
};

struct Expr {
  ExprKind kind;
  int line;
  int height = 1;    // levels of this subtree; the parser bounds it (see Parser::seal)
  Value value;       // kConst
  std::string name;  // kName, kAttr, kFilter, kTest, kBinary
  std::vector<ExprPtr> args;
  std::vector<std::string> ops;  // kCompare: == != < <= > >= in notin
  CallExpr call;                 // kCall, kFilter, kTest
  bool negated = false;          // kTest
};

// Assignment target of for/set/with: a name, a tuple of names, or namespace.attr.
struct Target {
  std::vector<std::string> names;
  bool tuple = false;
  std::string attr;  // non-empty: assign names[0].attr (namespace)
};

enum class StmtKind : uint8_t {
  kOutput,       // text
  kPrint,        // expr
  kIf,           // branches, else_body
  kFor,          // target in expr [if cond]: body, else_body
  kSet,          // target = expr
  kSetBlock,     // target (| filters) = rendered body
  kMacro,        // name(params): body
  kCallBlock,    // expr (a call) with caller(params): body
  kFilterBlock,  // filters applied to rendered body
  kWith,         // assigns: body
  kBreak,
  kContinue,
  kScope,  // body rendered in its own scope (the `generation` tag)
};

struct Stmt;
using StmtPtr = std::unique_ptr<Stmt>;
using Body = std::vector<StmtPtr>;

struct Param {
  std::string name;
  ExprPtr default_value;  // may be null
};

struct Stmt {
  StmtKind kind;
  int line;
  std::string text;
  ExprPtr expr;
  ExprPtr cond;
  std::vector<std::pair<ExprPtr, Body>> branches;
  Body body;
  Body else_body;
  Target target;
  std::vector<ExprPtr> filters;
  std::string name;
  std::vector<Param> params;
  bool uses_varargs = false;  // macro body mentions `varargs` / `kwargs` / `caller`
  bool uses_kwargs = false;
  bool uses_caller = false;
  std::vector<std::pair<Target, ExprPtr>> assigns;
};

struct Program {
  Body body;
  JinjaOptions opts;
};

// Parses `source` (newlines already normalized to \n) into a program; throws kiln::Error.
void parse(std::string_view source, Program& program);

// ---------------------------------------------------------------------------------------------
// Interpreter

struct Frame {
  std::unordered_map<std::string, Value> vars;
  std::shared_ptr<Frame> parent;
};
using FramePtr = std::shared_ptr<Frame>;

class Interp {
 public:
  Interp(const Program& program, DictData context);
  ~Interp();
  Interp(const Interp&) = delete;
  Interp& operator=(const Interp&) = delete;
  std::string run();
  int line() const { return line_; }
  const JinjaOptions& opts() const { return program_.opts; }

  // Registers an object that may take part in a reference cycle (see Object::release).
  void track(const std::shared_ptr<Object>& obj) { tracked_.push_back(obj); }
  // Counts work against max_loop_iterations.
  void tick(size_t n = 1);
  // Fails if n more units of work would exceed max_loop_iterations, without counting them.
  void check_work(size_t n) const;
  // Counts one statement or expression against max_steps, and stops before the C++ stack runs
  // out: the interpreter recurses on nested statements, expressions and macro calls, and their
  // product (100 macro levels each evaluating a 200-link chain) needs far more stack than any
  // one of those limits suggests.
  void step() {
    if (++steps_ > opts().max_steps) step_limit();
    if (reinterpret_cast<uintptr_t>(__builtin_frame_address(0)) < stack_floor_) stack_limit();
  }
  // Fails if a string of `bytes` bytes would exceed the output cap.
  void check_size(size_t bytes) const;

  Value getattr(const Value& obj, const std::string& name);
  Value getitem(const Value& obj, const Value& key);
  Value call(const Value& callee, CallArgs& args);
  Value call_macro(const Stmt& def, const FramePtr& closure, CallArgs& args, const Value& caller);
  Value apply_filter(const std::string& name, const Value& v, CallArgs& args);
  bool apply_test(const std::string& name, const Value& v, CallArgs& args);

 private:
  enum class Flow { kNormal, kBreak, kContinue };
  Flow exec(const Body& body, const FramePtr& frame, std::string& out);
  Flow exec_for(const Stmt& s, const FramePtr& frame, std::string& out);
  Value eval(const Expr& e, const FramePtr& frame);
  void eval_call_args(const CallExpr& c, const FramePtr& frame, CallArgs& out);
  Value lookup(const std::string& name, const FramePtr& frame);
  void assign(const Target& t, const Value& v, const FramePtr& frame);
  Value apply_filters(const std::vector<ExprPtr>& filters, Value v, const FramePtr& frame);
  std::string render_body(const Body& body, const FramePtr& frame);
  void emit(std::string& out, std::string_view text) const;

  const Program& program_;
  FramePtr root_;
  int line_ = 0;
  int depth_ = 0;
  size_t work_ = 0;
  size_t steps_ = 0;
  uintptr_t stack_floor_ = 0;  // lowest stack address a template frame may use (0: unknown)
  [[noreturn]] void step_limit() const;
  [[noreturn]] void stack_limit() const;
  std::vector<std::weak_ptr<Object>> tracked_;
};

// Builtins: filters and tests in jinja_filters.cpp, methods and globals in jinja_methods.cpp.
bool has_filter(const std::string& name);
bool has_test(const std::string& name);
Value run_filter(Interp& in, const std::string& name, const Value& v, CallArgs& args);
bool run_test(Interp& in, const std::string& name, const Value& v, CallArgs& args);
// str/list/dict methods as bound functions; false if `name` is not a method of the value's type.
bool get_method(const Value& self, const std::string& name, Value* out);
// Globals available to every template unless the context shadows them.
bool get_global(const std::string& name, Value* out);

// Helpers shared by the builtin files.
// Arguments bound to parameter names, Python style.
struct Bound {
  std::vector<Value> v;
  std::vector<bool> given;
  const Value& operator[](size_t i) const { return v[i]; }
  bool has(size_t i) const { return given[i]; }
};
// Binds positional and keyword arguments to `names`; the first `required` must be given.
Bound bind(const char* fn, const CallArgs& a, std::initializer_list<const char*> names,
           size_t required = 0);
int64_t int_arg(const Value& v, const char* what);
const std::string& str_arg(const Value& v, const char* what);
// jinja2's soft_str: str() that leaves strings alone.
std::string soft_str(const Value& v);
// iterate(), counted against the loop limit.
std::vector<Value> seq(Interp& in, const Value& v);
// Python str.center.
std::string center(const std::string& s, int64_t width, char32_t fill = ' ');

}  // namespace kiln::jinja
