// Tree-walking interpreter for the Jinja subset, plus JinjaTemplate's public entry points.
//
// Scoping follows jinja2: for-loop iterations, macros, call/filter/set blocks and `with` get a
// fresh child scope (so `set` inside them does not leak), `if` does not. Each loop iteration
// starts from a clean scope, which is why templates carry state across iterations in a
// namespace().
#include <pthread.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"
#include "tokenizer/jinja_internal.h"

namespace kiln::jinja {
namespace {

// A macro, or the implicit `caller` of a call block (def = the call block statement).
struct Macro : Object {
  const Stmt* def;
  FramePtr closure;
  std::string name;
  Macro(const Stmt* d, FramePtr c, std::string n)
      : def(d), closure(std::move(c)), name(std::move(n)) {}
  std::string type_name() const override { return "Macro"; }
  std::string repr(int) const override { return "<Macro '" + name + "'>"; }
  bool callable() const override { return true; }
  void release() override { closure.reset(); }
  Value call(Interp& in, CallArgs& args) override {
    if (!closure) fail("macro '" + name + "' was used after its template finished rendering");
    Value caller;
    for (auto it = args.kw.begin(); it != args.kw.end(); ++it) {
      if (it->first == "caller") {
        if (!def->uses_caller) fail("macro '" + name + "' takes no keyword argument 'caller'");
        caller = std::move(it->second);
        args.kw.erase(it);
        break;
      }
    }
    return in.call_macro(*def, closure, args, caller);
  }
};

// jinja2's LoopContext.
struct Loop : Object, std::enable_shared_from_this<Loop> {
  std::shared_ptr<const std::vector<Value>> items;
  size_t index0 = 0;
  bool has_changed_value = false;
  Value changed_value;

  std::string type_name() const override { return "LoopContext"; }
  void release() override {
    items = std::make_shared<const std::vector<Value>>();
    changed_value = Value();
  }
  std::string repr(int) const override {
    return "<LoopContext " + std::to_string(index0 + 1) + "/" + std::to_string(items->size()) + ">";
  }
  bool getattr(const std::string& name, Value* out) override {
    const size_t n = items->size();
    if (name == "index") {
      *out = Value::integer(static_cast<int64_t>(index0 + 1));
    } else if (name == "index0") {
      *out = Value::integer(static_cast<int64_t>(index0));
    } else if (name == "revindex") {
      *out = Value::integer(static_cast<int64_t>(n - index0));
    } else if (name == "revindex0") {
      *out = Value::integer(static_cast<int64_t>(n - index0 - 1));
    } else if (name == "first") {
      *out = Value::boolean(index0 == 0);
    } else if (name == "last") {
      *out = Value::boolean(index0 + 1 == n);
    } else if (name == "length") {
      *out = Value::integer(static_cast<int64_t>(n));
    } else if (name == "depth") {
      *out = Value::integer(1);
    } else if (name == "depth0") {
      *out = Value::integer(0);
    } else if (name == "previtem") {
      *out = index0 > 0 ? (*items)[index0 - 1] : Value::undefined("there is no previous item");
    } else if (name == "nextitem") {
      *out = index0 + 1 < n ? (*items)[index0 + 1] : Value::undefined("there is no next item");
    } else if (name == "cycle") {
      auto self = shared_from_this();
      *out = Value::object(std::make_shared<Function>("cycle", [self](Interp&, CallArgs& a) {
        if (a.pos.empty()) fail("no items for cycling given");
        return a.pos[self->index0 % a.pos.size()];
      }));
    } else if (name == "changed") {
      auto self = shared_from_this();
      *out = Value::object(std::make_shared<Function>("changed", [self](Interp&, CallArgs& a) {
        Value v = make_list(a.pos, ListKind::kTuple);
        if (self->has_changed_value && equal(self->changed_value, v)) return Value::boolean(false);
        self->has_changed_value = true;
        self->changed_value = std::move(v);
        return Value::boolean(true);
      }));
    } else {
      return false;
    }
    return true;
  }
};

// Python's `+ - * // % **` on 64-bit ints, failing where Python would grow a big int.
[[noreturn]] void overflow() {
  fail("integer overflow (kiln's template integers are 64-bit)");
}

int64_t floor_div(int64_t a, int64_t b) {
  if (b == 0) fail("integer division or modulo by zero");
  if (a == INT64_MIN && b == -1) overflow();
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}

int64_t floor_mod(int64_t a, int64_t b) {
  if (b == 0) fail("integer division or modulo by zero");
  if (b == -1) return 0;
  int64_t r = a % b;
  if (r != 0 && ((r < 0) != (b < 0))) r += b;
  return r;
}

double float_mod(double a, double b) {
  if (b == 0) fail("float modulo");
  double r = std::fmod(a, b);
  if (r != 0 && ((r < 0) != (b < 0))) r += b;
  if (r == 0) r = std::copysign(0.0, b);
  return r;
}

}  // namespace

namespace {

// Stack left free below the deepest template frame for the calls made from there (printf,
// sorting, repr and JSON walks up to kMaxNesting levels).
constexpr uintptr_t kStackMargin = uintptr_t{128} << 10;

// The lowest address this thread's template frames may use, 0 when unknown. Measured rather than
// guessed: the main thread has 8 MiB, others often 512 KiB, and sanitizers grow every frame.
uintptr_t stack_floor() {
#if defined(__linux__)  // pthread_getattr_np is a GNU extension (glibc, musl)
  thread_local const uintptr_t floor = [] {
    pthread_attr_t attr;
    void* addr = nullptr;
    size_t size = 0;
    if (pthread_getattr_np(pthread_self(), &attr) != 0) return uintptr_t{0};
    pthread_attr_getstack(&attr, &addr, &size);
    pthread_attr_destroy(&attr);
    return addr && size > kStackMargin ? reinterpret_cast<uintptr_t>(addr) + kStackMargin : 0;
  }();
  return floor;
#else
  return 0;
#endif
}

}  // namespace

Interp::Interp(const Program& program, DictData context)
    : program_(program), stack_floor_(stack_floor()) {
  root_ = std::make_shared<Frame>();
  for (auto& [k, v] : context.items) {
    if (k.is_string()) root_->vars[k.s] = std::move(v);
  }
}

Interp::~Interp() {
  for (const auto& w : tracked_) {
    if (auto obj = w.lock()) obj->release();
  }
}

namespace {
// The render running on this thread, for the budget_* helpers (see jinja_internal.h).
thread_local Interp* t_current = nullptr;
}  // namespace

void budget_bytes(size_t bytes) {
  if (t_current) t_current->check_size(bytes);
}
void budget_items(size_t n) {
  if (t_current) t_current->check_work(n);
}
void budget_tick(size_t n) {
  if (t_current) t_current->tick(n);
}

std::string Interp::run() {
  struct Current {
    explicit Current(Interp* in) : saved(t_current) { t_current = in; }
    ~Current() { t_current = saved; }
    Interp* saved;
  } current(this);
  std::string out;
  exec(program_.body, root_, out);
  return out;
}

void Interp::tick(size_t n) {
  check_work(n);
  work_ += n;
}

void Interp::step_limit() const {
  fail("step limit exceeded (max_steps = " + std::to_string(opts().max_steps) + ")");
}

void Interp::stack_limit() const {
  fail("statements, expressions and macro calls nest too deeply for this thread's stack");
}

void Interp::check_work(size_t n) const {
  if (n > opts().max_loop_iterations - std::min(work_, opts().max_loop_iterations)) {
    fail("loop iteration limit exceeded (max_loop_iterations = " +
         std::to_string(opts().max_loop_iterations) + ")");
  }
}

void Interp::check_size(size_t bytes) const {
  if (bytes > opts().max_output_bytes) {
    fail("string exceeds max_output_bytes (" + std::to_string(opts().max_output_bytes) + ")");
  }
}

void Interp::emit(std::string& out, std::string_view text) const {
  if (out.size() + text.size() > opts().max_output_bytes) {
    fail("output exceeds max_output_bytes (" + std::to_string(opts().max_output_bytes) + ")");
  }
  out += text;
}

std::string Interp::render_body(const Body& body, const FramePtr& frame) {
  std::string out;
  exec(body, frame, out);
  return out;
}

Value Interp::lookup(const std::string& name, const FramePtr& frame) {
  for (Frame* f = frame.get(); f; f = f->parent.get()) {
    auto it = f->vars.find(name);
    if (it != f->vars.end()) return it->second;
  }
  Value g;
  if (get_global(name, &g)) return g;
  return Value::undefined("'" + name + "' is undefined");
}

void Interp::assign(const Target& t, const Value& v, const FramePtr& frame) {
  if (!t.attr.empty()) {
    Value ns = lookup(t.names[0], frame);
    auto* space = ns.type == Type::kObject ? dynamic_cast<Namespace*>(ns.obj.get()) : nullptr;
    if (!space) fail("Cannot assign attribute on non-namespace object");
    space->attrs.set(Value::str(t.attr), v);
    return;
  }
  if (!t.tuple) {
    frame->vars[t.names[0]] = v;
    return;
  }
  std::vector<Value> parts = iterate(v);
  if (v.is_undefined()) fail_undefined(v);
  if (parts.size() < t.names.size()) {
    fail("not enough values to unpack (expected " + std::to_string(t.names.size()) + ", got " +
         std::to_string(parts.size()) + ")");
  }
  if (parts.size() > t.names.size()) {
    fail("too many values to unpack (expected " + std::to_string(t.names.size()) + ")");
  }
  for (size_t n = 0; n < parts.size(); ++n) frame->vars[t.names[n]] = std::move(parts[n]);
}

Value Interp::apply_filters(const std::vector<ExprPtr>& filters, Value v, const FramePtr& frame) {
  for (const auto& f : filters) {
    CallArgs args;
    eval_call_args(f->call, frame, args);
    line_ = f->line;
    v = apply_filter(f->name, v, args);
  }
  return v;
}

Interp::Flow Interp::exec(const Body& body, const FramePtr& frame, std::string& out) {
  for (const auto& sp : body) {
    const Stmt& s = *sp;
    line_ = s.line;
    step();
    switch (s.kind) {
      case StmtKind::kOutput:
        emit(out, s.text);
        break;
      case StmtKind::kPrint: {
        Value v = eval(*s.expr, frame);
        if (v.is_string()) {
          emit(out, v.s);
        } else {
          emit(out, to_str(v));
        }
        break;
      }
      case StmtKind::kIf: {
        const Body* chosen = &s.else_body;
        for (const auto& [cond, branch] : s.branches) {
          if (truthy(eval(*cond, frame))) {
            chosen = &branch;
            break;
          }
        }
        Flow f = exec(*chosen, frame, out);
        if (f != Flow::kNormal) return f;
        break;
      }
      case StmtKind::kFor: {
        Flow f = exec_for(s, frame, out);
        if (f != Flow::kNormal) return f;
        break;
      }
      case StmtKind::kSet:
        assign(s.target, eval(*s.expr, frame), frame);
        break;
      case StmtKind::kSetBlock: {
        auto child = std::make_shared<Frame>();
        child->parent = frame;
        Value v = Value::str(render_body(s.body, child));
        line_ = s.line;
        assign(s.target, apply_filters(s.filters, std::move(v), frame), frame);
        break;
      }
      case StmtKind::kMacro: {
        auto macro = std::make_shared<Macro>(&s, frame, s.name);
        track(macro);
        frame->vars[s.name] = Value::object(std::move(macro));
        break;
      }
      case StmtKind::kCallBlock: {
        const Expr& call = *s.expr;
        Value callee = eval(*call.args[0], frame);
        CallArgs args;
        eval_call_args(call.call, frame, args);
        auto caller = std::make_shared<Macro>(&s, frame, "caller");
        track(caller);
        args.kw.emplace_back("caller", Value::object(std::move(caller)));
        line_ = s.line;
        emit(out, to_str(this->call(callee, args)));
        break;
      }
      case StmtKind::kFilterBlock: {
        auto child = std::make_shared<Frame>();
        child->parent = frame;
        Value v = Value::str(render_body(s.body, child));
        line_ = s.line;
        emit(out, to_str(apply_filters(s.filters, std::move(v), frame)));
        break;
      }
      case StmtKind::kWith: {
        std::vector<Value> values;
        for (const auto& a : s.assigns) values.push_back(eval(*a.second, frame));
        auto child = std::make_shared<Frame>();
        child->parent = frame;
        for (size_t n = 0; n < values.size(); ++n) assign(s.assigns[n].first, values[n], child);
        Flow f = exec(s.body, child, out);
        if (f != Flow::kNormal) return f;
        break;
      }
      case StmtKind::kScope: {
        auto child = std::make_shared<Frame>();
        child->parent = frame;
        Flow f = exec(s.body, child, out);
        if (f != Flow::kNormal) return f;
        break;
      }
      case StmtKind::kBreak:
        return Flow::kBreak;
      case StmtKind::kContinue:
        return Flow::kContinue;
    }
  }
  return Flow::kNormal;
}

Interp::Flow Interp::exec_for(const Stmt& s, const FramePtr& frame, std::string& out) {
  Value seq = eval(*s.expr, frame);
  std::vector<Value> all = iterate(seq);
  if (s.cond) {
    std::vector<Value> kept;
    for (auto& item : all) {
      tick();
      auto child = std::make_shared<Frame>();
      child->parent = frame;
      assign(s.target, item, child);
      if (truthy(eval(*s.cond, child))) kept.push_back(std::move(item));
    }
    all = std::move(kept);
  }
  if (all.empty()) {
    auto child = std::make_shared<Frame>();
    child->parent = frame;
    return exec(s.else_body, child, out);
  }
  auto loop = std::make_shared<Loop>();
  track(loop);
  loop->items = std::make_shared<const std::vector<Value>>(std::move(all));
  Value loop_value = Value::object(loop);
  for (size_t n = 0; n < loop->items->size(); ++n) {
    tick();
    line_ = s.line;
    loop->index0 = n;
    auto child = std::make_shared<Frame>();
    child->parent = frame;
    assign(s.target, (*loop->items)[n], child);
    child->vars["loop"] = loop_value;
    if (exec(s.body, child, out) == Flow::kBreak) break;
  }
  return Flow::kNormal;
}

void Interp::eval_call_args(const CallExpr& c, const FramePtr& frame, CallArgs& out) {
  for (const auto& p : c.pos) out.pos.push_back(eval(*p, frame));
  if (c.star) {
    for (auto& v : iterate(eval(*c.star, frame))) out.pos.push_back(std::move(v));
  }
  for (const auto& [k, e] : c.kw) out.kw.emplace_back(k, eval(*e, frame));
  if (c.starstar) {
    Value d = eval(*c.starstar, frame);
    if (!d.is_dict()) fail("argument after ** must be a mapping, not " + type_name(d));
    for (const auto& [k, v] : d.dict->items) {
      if (!k.is_string()) fail("keywords must be strings");
      out.kw.emplace_back(k.s, v);
    }
  }
}

namespace {

bool contains(const Value& container, const Value& item) {
  switch (container.type) {
    case Type::kString:
      if (!item.is_string()) {
        if (item.is_undefined()) fail_undefined(item);
        fail("'in <string>' requires string as left operand, not " + type_name(item));
      }
      return container.s.find(item.s) != std::string::npos;
    case Type::kList:
      for (const auto& v : container.list->items) {
        if (equal(v, item)) return true;
      }
      return false;
    case Type::kDict:
      if ((item.is_list() && item.list->kind != ListKind::kTuple) || item.is_dict()) {
        fail("unhashable type: '" + type_name(item) + "'");
      }
      return container.dict->find(item) != nullptr;
    case Type::kUndefined:
      return false;
    default:
      fail("argument of type '" + type_name(container) + "' is not iterable");
  }
}

bool compare(const std::string& op, const Value& a, const Value& b) {
  if (op == "==") return equal(a, b);
  if (op == "!=") return !equal(a, b);
  if (op == "<") return less(a, b);
  if (op == ">") return less(b, a);
  if (op == "<=") return less(a, b) || equal(a, b);
  if (op == ">=") return less(b, a) || equal(a, b);
  if (op == "in") return contains(b, a);
  return !contains(b, a);  // notin
}

[[noreturn]] void bad_operands(const std::string& op, const Value& a, const Value& b) {
  fail("unsupported operand type(s) for " + op + ": '" + type_name(a) + "' and '" + type_name(b) +
       "'");
}

Value repeat(Interp& in, const Value& seq, int64_t times) {
  // An empty sequence costs nothing to repeat, but looping `times` (up to 2^63) times would hang.
  const bool empty = seq.is_string() ? seq.s.empty() : seq.list->items.empty();
  if (times <= 0 || empty) return seq.is_string() ? Value::str("") : make_list({}, seq.list->kind);
  if (seq.is_string()) {
    if (seq.s.size() * static_cast<unsigned __int128>(times) > in.opts().max_output_bytes) {
      in.check_size(SIZE_MAX);
    }
    std::string out;
    out.reserve(seq.s.size() * times);
    for (int64_t n = 0; n < times; ++n) out += seq.s;
    return Value::str(std::move(out));
  }
  auto total = seq.list->items.size() * static_cast<unsigned __int128>(times);
  in.tick(total > SIZE_MAX ? SIZE_MAX : static_cast<size_t>(total));
  std::vector<Value> out;
  for (int64_t n = 0; n < times; ++n) {
    out.insert(out.end(), seq.list->items.begin(), seq.list->items.end());
  }
  return make_list(std::move(out), seq.list->kind);
}

Value binop(Interp& in, const std::string& op, const Value& a, const Value& b) {
  if (op == "%" && a.is_string()) {
    std::string s = py_percent_format(a.s, b);
    in.check_size(s.size());
    return Value::str(std::move(s));
  }
  if (a.is_undefined()) fail_undefined(a);
  if (b.is_undefined()) fail_undefined(b);
  const bool ints = a.is_int() && b.is_int();
  const bool nums = a.is_number() && b.is_number();
  int64_t r = 0;
  if (op == "+") {
    if (ints) {
      if (__builtin_add_overflow(a.i, b.i, &r)) overflow();
      return Value::integer(r);
    }
    if (nums) return Value::real(a.as_double() + b.as_double());
    if (a.is_string() && b.is_string()) {
      in.check_size(a.s.size() + b.s.size());
      return Value::str(a.s + b.s);
    }
    if (a.is_list() && b.is_list() && !a.list->is_view() && !b.list->is_view() &&
        (a.list->kind == ListKind::kTuple) == (b.list->kind == ListKind::kTuple)) {
      in.tick(a.list->items.size() + b.list->items.size());
      std::vector<Value> items = a.list->items;
      items.insert(items.end(), b.list->items.begin(), b.list->items.end());
      return make_list(std::move(items),
                       a.list->kind == ListKind::kTuple ? ListKind::kTuple : ListKind::kList);
    }
    if (a.is_string()) fail("can only concatenate str (not \"" + type_name(b) + "\") to str");
    if (a.is_list()) {
      fail("can only concatenate " + type_name(a) + " (not \"" + type_name(b) + "\") to " +
           type_name(a));
    }
    bad_operands(op, a, b);
  }
  if (op == "-") {
    if (ints) {
      if (__builtin_sub_overflow(a.i, b.i, &r)) overflow();
      return Value::integer(r);
    }
    if (nums) return Value::real(a.as_double() - b.as_double());
    bad_operands(op, a, b);
  }
  if (op == "*") {
    if (ints) {
      if (__builtin_mul_overflow(a.i, b.i, &r)) overflow();
      return Value::integer(r);
    }
    if (nums) return Value::real(a.as_double() * b.as_double());
    auto seq = [](const Value& v) { return v.is_string() || (v.is_list() && !v.list->is_view()); };
    if (seq(a) && b.is_int()) return repeat(in, a, b.i);
    if (a.is_int() && seq(b)) return repeat(in, b, a.i);
    if (!a.is_string() && !b.is_string() && !a.is_list() && !b.is_list()) bad_operands(op, a, b);
    if ((a.is_list() && a.list->is_view()) || (b.is_list() && b.list->is_view()))
      bad_operands(op, a, b);
    fail("can't multiply sequence by non-int of type '" + type_name(a.is_number() ? a : b) + "'");
  }
  if (op == "/") {
    if (!nums) bad_operands(op, a, b);
    if (b.as_double() == 0) fail("division by zero");
    return Value::real(a.as_double() / b.as_double());
  }
  if (op == "//") {
    if (ints) return Value::integer(floor_div(a.i, b.i));
    if (!nums) bad_operands(op, a, b);
    if (b.as_double() == 0) fail("float floor division by zero");
    // CPython's float_floor_div.
    double x = a.as_double(), y = b.as_double();
    double mod = std::fmod(x, y);
    double div = (x - mod) / y;
    if (mod != 0 && ((y < 0) != (mod < 0))) div -= 1.0;
    if (div == 0) return Value::real(std::copysign(0.0, x / y));
    double fl = std::floor(div);
    if (div - fl > 0.5) fl += 1.0;
    return Value::real(fl);
  }
  if (op == "%") {
    if (ints) return Value::integer(floor_mod(a.i, b.i));
    if (nums) return Value::real(float_mod(a.as_double(), b.as_double()));
    bad_operands(op, a, b);
  }
  if (op == "**") {
    if (ints && b.i >= 0) {
      int64_t base = a.i, e = b.i, acc = 1;
      while (e > 0) {
        if (e & 1) {
          if (__builtin_mul_overflow(acc, base, &acc)) overflow();
        }
        e >>= 1;
        if (e > 0 && __builtin_mul_overflow(base, base, &base)) overflow();
      }
      return Value::integer(acc);
    }
    if (!nums) bad_operands("** or pow()", a, b);
    double x = a.as_double(), y = b.as_double();
    if (x == 0 && y < 0) fail("0.0 cannot be raised to a negative power");
    if (x < 0 && y != std::floor(y)) fail("complex numbers are not supported");
    double r = std::pow(x, y);
    if (std::isinf(r) && std::isfinite(x) && std::isfinite(y))
      fail("(34, 'Numerical result out of range')");
    return Value::real(r);
  }
  fail("unknown operator " + op);
}

}  // namespace

Value Interp::eval(const Expr& e, const FramePtr& frame) {
  line_ = e.line;
  step();
  switch (e.kind) {
    case ExprKind::kConst:
      return e.value;
    case ExprKind::kName:
      return lookup(e.name, frame);
    case ExprKind::kList:
    case ExprKind::kTuple: {
      std::vector<Value> items;
      items.reserve(e.args.size());
      for (const auto& a : e.args) items.push_back(eval(*a, frame));
      return make_list(std::move(items),
                       e.kind == ExprKind::kTuple ? ListKind::kTuple : ListKind::kList);
    }
    case ExprKind::kDict: {
      DictData d;
      for (size_t n = 0; n + 1 < e.args.size(); n += 2) {
        Value k = eval(*e.args[n], frame);
        if (k.is_list() && k.list->kind != ListKind::kTuple) fail("unhashable type: 'list'");
        if (k.is_dict()) fail("unhashable type: 'dict'");
        d.set(std::move(k), eval(*e.args[n + 1], frame));
      }
      return make_dict(std::move(d));
    }
    case ExprKind::kAttr: {
      Value obj = eval(*e.args[0], frame);
      line_ = e.line;
      return getattr(obj, e.name);
    }
    case ExprKind::kItem: {
      Value obj = eval(*e.args[0], frame);
      Value key = eval(*e.args[1], frame);
      line_ = e.line;
      return getitem(obj, key);
    }
    case ExprKind::kSlice: {
      Value obj = eval(*e.args[0], frame);
      Value parts[3];
      for (int n = 0; n < 3; ++n)
        parts[n] = e.args[n + 1] ? eval(*e.args[n + 1], frame) : Value::none();
      line_ = e.line;
      if (obj.is_undefined()) fail_undefined(obj);
      // jinja2 compiles slices to plain Python subscripts (no getitem fallback), so bad types
      // are errors here rather than Undefined.
      if (obj.is_dict()) fail("unhashable type: 'slice'");
      if (obj.is_string()) {
        if (is_ascii(obj.s)) {
          std::string out;
          for (size_t i : slice_indices(obj.s.size(), parts[0], parts[1], parts[2]))
            out += obj.s[i];
          return Value::str(std::move(out));
        }
        std::u32string u = decode_utf8(obj.s);
        std::u32string out;
        for (size_t i : slice_indices(u.size(), parts[0], parts[1], parts[2])) out += u[i];
        return Value::str(encode_utf8(out));
      }
      if (obj.is_list() && !obj.list->is_view()) {
        const auto& items = obj.list->items;
        std::vector<Value> out;
        for (size_t i : slice_indices(items.size(), parts[0], parts[1], parts[2]))
          out.push_back(items[i]);
        return make_list(std::move(out),
                         obj.list->kind == ListKind::kTuple ? ListKind::kTuple : ListKind::kList);
      }
      fail("'" + type_name(obj) + "' object is not subscriptable");
    }
    case ExprKind::kCall: {
      Value callee = eval(*e.args[0], frame);
      CallArgs args;
      eval_call_args(e.call, frame, args);
      line_ = e.line;
      return call(callee, args);
    }
    case ExprKind::kFilter: {
      Value v = eval(*e.args[0], frame);
      CallArgs args;
      eval_call_args(e.call, frame, args);
      line_ = e.line;
      return apply_filter(e.name, v, args);
    }
    case ExprKind::kTest: {
      Value v = eval(*e.args[0], frame);
      CallArgs args;
      eval_call_args(e.call, frame, args);
      line_ = e.line;
      return Value::boolean(apply_test(e.name, v, args) != e.negated);
    }
    case ExprKind::kNot:
      return Value::boolean(!truthy(eval(*e.args[0], frame)));
    case ExprKind::kNeg:
    case ExprKind::kPos: {
      Value v = eval(*e.args[0], frame);
      line_ = e.line;
      if (v.is_undefined()) fail_undefined(v);
      bool neg = e.kind == ExprKind::kNeg;
      if (v.is_int()) {
        if (neg && v.i == INT64_MIN) overflow();
        return Value::integer(neg ? -v.i : v.i);
      }
      if (v.type == Type::kFloat) return Value::real(neg ? -v.f : v.f);
      fail(std::string("bad operand type for unary ") + (neg ? "-" : "+") + ": '" + type_name(v) +
           "'");
    }
    case ExprKind::kBinary: {
      Value a = eval(*e.args[0], frame);
      Value b = eval(*e.args[1], frame);
      line_ = e.line;
      return binop(*this, e.name, a, b);
    }
    case ExprKind::kConcat: {
      std::string out;
      for (const auto& a : e.args) {
        Value v = eval(*a, frame);
        out += v.is_string() ? v.s : to_str(v);
        check_size(out.size());
      }
      return Value::str(std::move(out));
    }
    case ExprKind::kAnd: {
      Value a = eval(*e.args[0], frame);
      if (!truthy(a)) return a;
      return eval(*e.args[1], frame);
    }
    case ExprKind::kOr: {
      Value a = eval(*e.args[0], frame);
      if (truthy(a)) return a;
      return eval(*e.args[1], frame);
    }
    case ExprKind::kCompare: {
      Value left = eval(*e.args[0], frame);
      for (size_t n = 0; n < e.ops.size(); ++n) {
        Value right = eval(*e.args[n + 1], frame);
        line_ = e.line;
        if (!compare(e.ops[n], left, right)) return Value::boolean(false);
        left = std::move(right);
      }
      return Value::boolean(true);
    }
    case ExprKind::kCond: {
      if (truthy(eval(*e.args[0], frame))) return eval(*e.args[1], frame);
      if (e.args[2]) return eval(*e.args[2], frame);
      return Value::undefined("the inline if-expression on line " + std::to_string(e.line) +
                              " evaluated to false and no else section was defined.");
    }
  }
  fail("unknown expression");
}

namespace {

// The ImmutableSandboxedEnvironment refuses methods that mutate lists and dicts.
bool is_mutating_method(const Value& obj, const std::string& name) {
  static const char* list_methods[] = {"append", "extend",  "insert", "pop",
                                       "remove", "reverse", "sort",   "clear"};
  static const char* dict_methods[] = {"clear", "pop", "popitem", "setdefault", "update"};
  if (obj.is_list() && obj.list->kind == ListKind::kList) {
    for (const char* m : list_methods) {
      if (name == m) return true;
    }
  }
  if (obj.is_dict()) {
    for (const char* m : dict_methods) {
      if (name == m) return true;
    }
  }
  return false;
}

Value unsafe(const Value& obj, const std::string& name) {
  return Value::undefined("access to attribute '" + name + "' of '" + type_name(obj) +
                          "' object is unsafe.");
}

}  // namespace

Value Interp::getattr(const Value& obj, const std::string& name) {
  if (obj.is_undefined()) fail_undefined(obj);
  Value out;
  if (obj.type == Type::kObject) {
    if (obj.obj->getattr(name, &out)) return out;
  } else {
    if (is_mutating_method(obj, name)) return unsafe(obj, name);
    if (get_method(obj, name, &out)) return out;
    if (obj.is_dict()) {
      if (const Value* v = obj.dict->find(std::string_view(name))) return *v;
    }
  }
  return Value::undefined(object_type_repr(obj) + " has no attribute '" + name + "'");
}

Value Interp::getitem(const Value& obj, const Value& key) {
  if (obj.is_undefined()) fail_undefined(obj);
  if (obj.is_dict()) {
    if (const Value* v = obj.dict->find(key)) return *v;
  } else if (((obj.is_list() && !obj.list->is_view()) || obj.is_string()) && key.is_int()) {
    int64_t idx = key.i;
    if (obj.is_list()) {
      auto n = static_cast<int64_t>(obj.list->items.size());
      if (idx < 0) idx += n;
      if (idx >= 0 && idx < n) return obj.list->items[idx];
    } else if (is_ascii(obj.s)) {
      auto n = static_cast<int64_t>(obj.s.size());
      if (idx < 0) idx += n;
      if (idx >= 0 && idx < n) return Value::str(std::string(1, obj.s[idx]));
    } else {
      std::u32string u = decode_utf8(obj.s);
      auto n = static_cast<int64_t>(u.size());
      if (idx < 0) idx += n;
      if (idx >= 0 && idx < n) {
        std::string ch;
        append_utf8(ch, u[idx]);
        return Value::str(std::move(ch));
      }
    }
  }
  if (key.is_string()) {
    // jinja2 falls back to attribute lookup for string subscripts (d['items'] is the method).
    Value out;
    if (obj.type == Type::kObject) {
      if (obj.obj->getattr(key.s, &out)) return out;
    } else {
      if (is_mutating_method(obj, key.s)) return unsafe(obj, key.s);
      if (get_method(obj, key.s, &out)) return out;
    }
    return Value::undefined(object_type_repr(obj) + " has no attribute '" + key.s + "'");
  }
  return Value::undefined(object_type_repr(obj) + " has no element " + repr(key));
}

Value Interp::call(const Value& callee, CallArgs& args) {
  if (callee.is_undefined()) fail_undefined(callee);
  if (callee.type != Type::kObject || !callee.obj->callable()) {
    fail("'" + type_name(callee) + "' object is not callable");
  }
  Value r = callee.obj->call(*this, args);
  // Methods like str.upper grow a string by a bounded factor without checking; checking every
  // result keeps chains of them (s.upper().upper()...) under the cap.
  if (r.is_string()) check_size(r.s.size());
  return r;
}

Value Interp::call_macro(const Stmt& def, const FramePtr& closure, CallArgs& args,
                         const Value& caller) {
  struct DepthGuard {
    explicit DepthGuard(int* d) : d(d) { ++*d; }
    ~DepthGuard() { --*d; }
    int* d;
  } guard(&depth_);
  if (depth_ > opts().max_recursion_depth) {
    fail("maximum recursion depth exceeded (max_recursion_depth = " +
         std::to_string(opts().max_recursion_depth) + ")");
  }
  // Depth alone does not bound the work: a macro that calls itself twice per level makes 2^depth
  // calls. Every call counts like a loop iteration.
  tick();
  const std::string& name = def.kind == StmtKind::kMacro ? def.name : std::string("caller");
  auto frame = std::make_shared<Frame>();
  frame->parent = closure;
  const size_t np = def.params.size();
  std::vector<bool> set(np, false);
  std::vector<Value> extra;
  for (size_t n = 0; n < args.pos.size(); ++n) {
    if (n < np) {
      frame->vars[def.params[n].name] = args.pos[n];
      set[n] = true;
    } else {
      extra.push_back(args.pos[n]);
    }
  }
  if (!extra.empty() && !def.uses_varargs) {
    fail("macro '" + name + "' takes not more than " + std::to_string(np) + " argument(s)");
  }
  DictData kwargs;
  for (auto& [k, v] : args.kw) {
    size_t idx = np;
    for (size_t n = 0; n < np; ++n) {
      if (def.params[n].name == k) idx = n;
    }
    if (idx < np) {
      if (set[idx]) fail("macro '" + name + "' got multiple values for argument '" + k + "'");
      frame->vars[k] = v;
      set[idx] = true;
    } else if (def.uses_kwargs) {
      kwargs.set(Value::str(k), v);
    } else {
      fail("macro '" + name + "' takes no keyword argument '" + k + "'");
    }
  }
  for (size_t n = 0; n < np; ++n) {
    if (set[n]) continue;
    const Param& p = def.params[n];
    frame->vars[p.name] = p.default_value
                              ? eval(*p.default_value, frame)
                              : Value::undefined("parameter '" + p.name + "' was not provided");
  }
  frame->vars["varargs"] = make_list(std::move(extra), ListKind::kTuple);
  frame->vars["kwargs"] = make_dict(std::move(kwargs));
  if (!caller.is_undefined()) frame->vars["caller"] = caller;
  std::string out;
  exec(def.body, frame, out);
  return Value::str(std::move(out));
}

Value Interp::apply_filter(const std::string& name, const Value& v, CallArgs& args) {
  Value r = run_filter(*this, name, v, args);
  // As in call(): `escape` multiplies its input by up to 6, so s|e|e|e... must stop at the cap.
  if (r.is_string()) check_size(r.s.size());
  return r;
}

bool Interp::apply_test(const std::string& name, const Value& v, CallArgs& args) {
  return run_test(*this, name, v, args);
}

}  // namespace kiln::jinja

// ---------------------------------------------------------------------------------------------

namespace kiln {
namespace {

// kiln::Error messages are one line; template text and raise_exception() messages may not be.
std::string one_line(std::string s) {
  std::string out;
  for (char c : s) {
    if (c == '\n') {
      out += "\\n";
    } else if (c != '\r') {
      out += c;
    }
  }
  return out;
}

template <class Json>
std::string render_json(const jinja::Program& program, const Json& context) {
  if (!context.is_object() && !context.is_null()) {
    throw Error("jinja template context must be a JSON object");
  }
  jinja::DictData vars;
  try {
    if (context.is_object()) {
      for (auto it = context.begin(); it != context.end(); ++it) {
        vars.set(jinja::Value::str(it.key()), jinja::from_json(it.value(), 1));
      }
    }
  } catch (const jinja::TemplateError& e) {
    throw Error(one_line(cat("jinja template context: ", e.what())));
  }
  jinja::Interp interp(program, std::move(vars));
  try {
    return interp.run();
  } catch (const jinja::RaisedError& e) {
    throw Error(
        one_line(cat("jinja template raised an error at line ", interp.line(), ": ", e.what())));
  } catch (const jinja::TemplateError& e) {
    throw Error(one_line(cat("jinja template error at line ", interp.line(), ": ", e.what())));
  }
}

}  // namespace

JinjaTemplate::JinjaTemplate(std::string_view source, JinjaOptions opts) {
  auto program = std::make_shared<jinja::Program>();
  program->opts = opts;
  // jinja2 normalizes \r\n and \r to \n and drops one trailing newline before lexing.
  std::string src;
  src.reserve(source.size());
  for (size_t i = 0; i < source.size(); ++i) {
    if (source[i] == '\r') {
      src += '\n';
      if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
    } else {
      src += source[i];
    }
  }
  if (!opts.keep_trailing_newline && !src.empty() && src.back() == '\n') src.pop_back();
  try {
    jinja::parse(src, *program);
  } catch (const Error& e) {
    throw Error(one_line(e.what()));
  }
  program_ = std::move(program);
}

std::string JinjaTemplate::render(const nlohmann::json& context) const {
  return render_json(*program_, context);
}

std::string JinjaTemplate::render(const nlohmann::ordered_json& context) const {
  return render_json(*program_, context);
}

}  // namespace kiln
