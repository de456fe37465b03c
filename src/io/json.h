// JSON text from files and sockets, parsed with a nesting limit. nlohmann's parser is iterative,
// but what kiln builds from a document (tokenizer component Sequences, chat templates, error
// messages that print a value) recurses over it: a document nested a million levels deep would
// overflow the stack. serde_json, which Hugging Face's tokenizers use, stops at 128 levels too.
#pragma once

#include <cstddef>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "core/error.h"

namespace kiln {

constexpr int kMaxJsonDepth = 128;

// A SAX handler that accepts everything and stops at malformed text (the DOM parse that follows
// reports it with its position): derive and override what a pass looks at.
template <typename J>
struct SaxBase : nlohmann::json_sax<J> {
  using typename nlohmann::json_sax<J>::number_integer_t;
  using typename nlohmann::json_sax<J>::number_unsigned_t;
  using typename nlohmann::json_sax<J>::number_float_t;
  using typename nlohmann::json_sax<J>::string_t;
  using typename nlohmann::json_sax<J>::binary_t;
  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }
  bool start_object(std::size_t) override { return true; }
  bool end_object() override { return true; }
  bool start_array(std::size_t) override { return true; }
  bool end_array() override { return true; }
  bool key(string_t&) override { return true; }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) override {
    return false;
  }
};

namespace detail {

// SAX pass that stops at the first array or object nested deeper than `limit`.
template <typename J>
struct DepthLimit : SaxBase<J> {
  int limit, depth = 0;
  bool too_deep = false;
  explicit DepthLimit(int l) : limit(l) {}
  bool open() { return !(too_deep = ++depth > limit); }
  bool start_object(std::size_t) override { return open(); }
  bool end_object() override { return --depth, true; }
  bool start_array(std::size_t) override { return open(); }
  bool end_array() override { return --depth, true; }
};

}  // namespace detail

// Parses `text` (a file's contents, a request body) as J (nlohmann::json or ordered_json).
// Throws kiln::Error "<where>: invalid JSON: ..." or "<where>: JSON nested deeper than N levels".
template <typename J = nlohmann::json>
J parse_json(std::string_view text, const std::string& where, int max_depth = kMaxJsonDepth) {
  detail::DepthLimit<J> sax(max_depth);
  J::sax_parse(text, &sax);
  if (sax.too_deep) throw Error(cat(where, ": JSON nested deeper than ", max_depth, " levels"));
  try {
    return J::parse(text);
  } catch (const typename J::exception& e) {
    throw Error(cat(where, ": invalid JSON: ", e.what()));
  }
}

}  // namespace kiln
