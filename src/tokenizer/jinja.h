// A sandboxed interpreter for the subset of Jinja2 that Hugging Face chat templates use.
//
// The goal is byte-exact agreement with transformers' apply_chat_template, which renders with
// jinja2's ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True) plus the
// loopcontrols extension, a `generation` block tag, a json.dumps-based `tojson` filter and the
// globals `raise_exception` and `strftime_now`. Values therefore follow Python semantics: Python
// truthiness, str()/repr() rendering (True, None, ['a', 1]), floor division, code-point string
// indexing, insertion-ordered dicts, and jinja2's default Undefined. docs/chat_templates.md lists
// what is supported.
//
// Sandbox: templates cannot reach files or the environment (include/import/extends are rejected at
// parse time), and output size, loop iterations, steps, recursion depth, expression and value
// nesting are bounded.
// Every failure is a kiln::Error whose one-line message names the template line.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace kiln {

struct JinjaOptions {
  // jinja2's Environment options; the defaults are transformers' chat-template settings.
  bool trim_blocks = true;
  bool lstrip_blocks = true;
  bool keep_trailing_newline = false;

  // Sandbox limits. The output cap also bounds every intermediate string and block capture, so a
  // template cannot build a huge value it never prints. 16 MiB is far beyond any real prompt.
  size_t max_output_bytes = size_t{16} << 20;
  // Total for-loop iterations and macro calls plus elements visited by sequence filters (sort,
  // map, join ...).
  size_t max_loop_iterations = size_t{1} << 20;
  // Statements executed plus expressions evaluated. The loop budget counts an iteration once
  // however large its body is; this bounds the render's time whatever the template's shape
  // (about a second at the default, where real chat templates take thousands of steps).
  size_t max_steps = size_t{1} << 25;
  // Nested macro/caller invocations. Each level costs about 3.5 KiB of C++ stack (optimized
  // build); the default fits in a 512 KiB thread stack. Whatever the limits, a render stops with
  // an error before its thread's stack runs out (deep macros combined with deep expressions can
  // need more).
  int max_recursion_depth = 100;

  // Seconds since the Unix epoch that strftime_now() formats (local time zone); negative means the
  // current time, as transformers does. Fixing it makes date-stamped templates reproducible.
  int64_t now = -1;
};

namespace jinja {
struct Program;
}

// A parsed template. Parsing happens once in the constructor (syntax errors throw kiln::Error with
// the line number); render() is const and safe to call from several threads at once.
class JinjaTemplate {
 public:
  explicit JinjaTemplate(std::string_view source, JinjaOptions opts = {});

  // `context` must be a JSON object; its members become template variables. Use the ordered_json
  // overload when key order matters (it does for `tojson` of tool schemas, as Python dicts keep
  // insertion order while nlohmann::json sorts keys).
  std::string render(const nlohmann::json& context) const;
  std::string render(const nlohmann::ordered_json& context) const;

 private:
  std::shared_ptr<const jinja::Program> program_;
};

}  // namespace kiln
