// Hugging Face tokenizer.json (and SentencePiece tokenizer.model) tokenizer, byte-exact with the
// Rust `tokenizers` library for the components it supports (see docs/tokenizer.md).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace kiln {

namespace tok {
struct TokenizerImpl;
}  // namespace tok

// An immutable tokenizer. Copies share the loaded vocabulary; every method is const and safe to
// call from several threads at once.
class Tokenizer {
 public:
  // Loads dir/tokenizer.json, plus dir/tokenizer_config.json when present (bos/eos strings, extra
  // added tokens, add_bos_token/add_eos_token for Llama/Gemma tokenizer classes). Without a
  // tokenizer.json, loads a SentencePiece dir/tokenizer.model. A kiln engine folder works too: the
  // files may also sit in dir/tokenizer/. Throws kiln::Error naming the file on any problem.
  static Tokenizer from_dir(const std::filesystem::path& dir);
  // Loads one tokenizer.json alone (no tokenizer_config.json).
  static Tokenizer from_json_file(const std::filesystem::path& tokenizer_json);
  // Loads a SentencePiece model protobuf (tokenizer.model) alone.
  static Tokenizer from_sentencepiece_file(const std::filesystem::path& tokenizer_model);

  // Token ids of `text` (which must be valid UTF-8, else kiln::Error). Added/special tokens
  // written in the text are always recognised; add_special_tokens applies the post-processor
  // template (e.g. a leading <bos>).
  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens) const;
  // Text of `ids`; unknown ids are dropped, like Hugging Face does. skip_special_tokens drops
  // tokens marked special.
  std::string decode(std::span<const int32_t> ids, bool skip_special_tokens) const;

  std::optional<int32_t> token_to_id(std::string_view token) const;
  // The vocabulary string of `id` (added tokens included); empty when the id is unknown.
  std::string id_to_token(int32_t id) const;
  // Number of ids, added tokens included: 1 + the largest id.
  size_t vocab_size() const;
  bool is_special(int32_t id) const;

  // From tokenizer_config.json (string or {"content": ...} form), when present.
  std::optional<std::string> bos_token() const;
  std::optional<std::string> eos_token() const;
  std::optional<int32_t> bos_token_id() const;
  std::optional<int32_t> eos_token_id() const;

  const tok::TokenizerImpl& impl() const { return *impl_; }

 private:
  explicit Tokenizer(std::shared_ptr<const tok::TokenizerImpl> impl) : impl_(std::move(impl)) {}
  static Tokenizer load_dir(const std::filesystem::path& dir);
  std::shared_ptr<const tok::TokenizerImpl> impl_;
};

// Incremental detokenizer for streaming. push() returns only text that is complete, valid UTF-8:
// like HF's DecodeStream it decodes a window (a few previous ids + the new ones) and emits the
// part past the previous window's text once it does not end in U+FFFD. Concatenating every push()
// and the final flush() gives decode(all ids) for decoders that work token by token (byte-level,
// byte-fallback, Metaspace). At most kMaxHeld ids are held back: past that (a run of skipped
// special tokens, or bytes that never form a character) the text is emitted as it stands, so a
// push costs a bounded decode.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer, bool skip_special_tokens = true);
  std::string push(int32_t id);
  // Emits whatever is still held back (possibly ending in U+FFFD) and resets the stream.
  std::string flush();

  static constexpr size_t kMaxHeld = 64;

 private:
  Tokenizer tokenizer_;
  bool skip_special_;
  std::vector<int32_t> ids_;  // the window: ids_[0, prefix_) were already emitted
  size_t prefix_ = 0;
  std::string prefix_text_;  // decode of ids_[0, prefix_)
};

}  // namespace kiln
