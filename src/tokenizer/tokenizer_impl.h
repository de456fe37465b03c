// Internal pieces of the tokenizer (not part of kiln's public API): the component interfaces that
// mirror Hugging Face tokenizers' pipeline (normalizer -> pre-tokenizer -> model ->
// post-processor, and decoder), Unicode helpers, and the PCRE2 wrapper.
#pragma once

#ifndef PCRE2_CODE_UNIT_WIDTH
#define PCRE2_CODE_UNIT_WIDTH 8
#endif
#include <pcre2.h>

#include <array>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace kiln::tok {

// ---- Unicode / UTF-8 ------------------------------------------------------------------------

inline size_t utf8_len(unsigned char c) {
  return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
}
// Length of the char at s[i] where s may not be valid UTF-8 (text cut by a malformed piece): the
// lead byte's length when its continuation bytes are there, else 1. Never steps past the end.
inline size_t utf8_char_len(std::string_view s, size_t i) {
  auto c = static_cast<unsigned char>(s[i]);
  if (c < 0xC0) return 1;  // ASCII, or a stray continuation byte
  size_t n = utf8_len(c);
  if (n > s.size() - i) return 1;
  for (size_t k = 1; k < n; ++k)
    if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return 1;
  return n;
}
// Decodes the char at s[i] (s must be valid UTF-8) and advances i.
uint32_t next_cp(std::string_view s, size_t& i);
void append_utf8(std::string& out, uint32_t cp);
// Offset of the first invalid byte, or npos.
size_t find_invalid_utf8(std::string_view s);

// SentencePiece's piece types (sentencepiece_model.proto), the same numbers GGUF uses for
// tokenizer.ggml.token_type.
enum SpmPieceType {
  kSpmNormal = 1,
  kSpmUnknown = 2,
  kSpmControl = 3,
  kSpmUserDefined = 4,
  kSpmUnused = 5,
  kSpmByte = 6
};
// Rust's String::from_utf8_lossy: each maximal invalid subpart becomes one U+FFFD.
std::string from_utf8_lossy(std::string_view bytes);
// Rust char::is_whitespace (the Unicode White_Space property).
bool is_whitespace(uint32_t cp);
// Rust regex's \w (Alphabetic, marks, decimal numbers, connector punctuation, Join_Control), used
// by HF's Whitespace pre-tokenizer and the single_word check of added tokens.
bool is_word_char(uint32_t cp);
bool is_punctuation(uint32_t cp);  // Unicode P* or ASCII punctuation
bool is_numeric(uint32_t cp);      // Unicode N*
// GPT-2's byte -> printable char table and its inverse (-1 for chars that are not in it).
const std::array<uint32_t, 256>& bytes_to_chars();
int char_to_byte(uint32_t cp);

// ---- Regex ------------------------------------------------------------------------------------

// A PCRE2 (UTF + UCP, JIT) regex compiled once, that reads Oniguruma syntax the way HF's
// tokenizers does (\s also matches U+0085, \w also matches marks, ^/$ are line anchors) and
// iterates matches like the onig crate's find_iter (an empty match right after the previous
// match is skipped).
class Regex {
 public:
  Regex(const std::string& pattern, const std::string& where);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  // Appends (start, end) byte offsets of every match in s.
  void find_all(std::string_view s, std::vector<std::pair<uint32_t, uint32_t>>& out) const;

 private:
  pcre2_code* code_ = nullptr;
  bool jit_ = false;
};

// A split pattern: a literal string or a regex, as in HF's Pattern.
struct Pattern {
  std::string literal;
  std::unique_ptr<Regex> regex;
  // Appends (start, end, is_match) covering all of s, as HF's Pattern::find_matches.
  void find_matches(std::string_view s,
                    std::vector<std::tuple<uint32_t, uint32_t, bool>>& out) const;
};

enum class SplitBehavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

// ---- Pipeline data ----------------------------------------------------------------------------

// A pre-tokenized piece: bytes [off, off+len) of Work::buf. orig0 marks the piece that starts at
// offset 0 of the original input (Metaspace's prepend_scheme "first" needs it).
struct Piece {
  uint32_t off, len;
  bool orig0;
};

struct Work {
  std::string buf;
  std::vector<Piece> a, b;
  std::vector<std::tuple<uint32_t, uint32_t, bool>> matches;
  std::vector<std::pair<uint32_t, uint32_t>> spans;
  std::string tmp;
};

// Splits piece p per the (start, end, is_match) list as HF's NormalizedString::split does,
// appending sub-pieces to out.
void split_piece(const Piece& p, const std::vector<std::tuple<uint32_t, uint32_t, bool>>& m,
                 SplitBehavior behavior, std::vector<Piece>& out);

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual void normalize(std::string& s) const = 0;
};

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  // Consumes w.a, leaving the result in w.a (w.b is scratch). New text is appended to w.buf.
  virtual void run(Work& w) const = 0;
};

class Model {
 public:
  virtual ~Model() = default;
  virtual void encode(std::string_view piece, std::vector<int32_t>& out) const = 0;
  virtual std::optional<int32_t> token_to_id(std::string_view token) const = 0;
  virtual const std::string* id_to_token(int32_t id) const = 0;
  virtual size_t vocab_size() const = 0;
  // 1 + the largest id (larger than vocab_size() when a vocab's ids have gaps).
  virtual size_t id_limit() const { return vocab_size(); }
};

class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual void decode_chain(std::vector<std::string>& tokens) const = 0;
};

class PostProcessor {
 public:
  virtual ~PostProcessor() = default;
  // Adds the special tokens around `ids` (only called with add_special_tokens).
  virtual void process(std::vector<int32_t>& ids) const = 0;
  // Appends every id process() can add (checked against the vocabulary at load).
  virtual void added_ids(std::vector<int32_t>& out) const { (void)out; }
};

struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool single_word = false, lstrip = false, rstrip = false, normalized = false, special = false;
  // What decode() feeds the decoder: HF uses the normalized form of normalized tokens.
  std::string decode_text;
};

// Leftmost-longest matcher over added-token strings (HF uses Aho-Corasick LeftmostLongest).
class TokenMatcher {
 public:
  void build(const std::vector<std::pair<std::string, int>>& patterns);
  bool empty() const { return nodes_.size() <= 1; }
  // Next match starting at or after `from`: returns false when none. Sets start/end/value.
  bool next(std::string_view s, size_t from, size_t& start, size_t& end, int& value) const;

 private:
  struct Node {
    std::vector<std::pair<uint8_t, int>> next;  // sorted by byte
    int value = -1;
  };
  std::vector<Node> nodes_;
  std::array<bool, 256> first_{};
};

// ---- Reading tokenizer files ------------------------------------------------------------------

// An object of a tokenizer file and its name for errors: the file, then its path in the document
// ("tokenizer.json: normalizer.normalizers[1]"). The getters fail in one line naming the field
// ("... normalizers[1].content must be a string, not number"), never with nlohmann's
// "[json.exception.type_error.302] ..." text. Absent and null optional fields take the default.
struct JsonObj {
  const nlohmann::json& j;
  std::string name;

  std::string field(const std::string& key) const { return name + "." + key; }
  const nlohmann::json& at(const char* key) const;    // required
  const nlohmann::json* find(const char* key) const;  // nullptr when absent or null
  std::string str(const char* key) const;             // required string
  std::string str(const char* key, const std::string& dflt) const;
  bool boolean(const char* key, bool dflt) const;
  size_t count(const char* key, size_t dflt) const;  // a non-negative integer
};
// Typed reads of one value; `name` is what an error calls it.
std::string json_string(const nlohmann::json& v, const std::string& name);
double json_number(const nlohmann::json& v, const std::string& name);
const nlohmann::json& json_array(const nlohmann::json& v, const std::string& name);

// ---- Factories (JSON -> components); `where` names the file for errors ----------------------

// Token ids a tokenizer file may use: they index tables, so they must be dense enough (the
// largest real vocabularies have ~262k entries; 4M leaves room and bounds the tables).
constexpr int64_t kMaxTokenizerId = int64_t(1) << 22;
// A token id from a tokenizer file: an integer in [0, kMaxTokenizerId), else an error naming
// `what` (never a value wrapped to 32 bits).
int32_t file_token_id(const nlohmann::json& v, const std::string& what);

// `path` is where the component sits in the document (a Sequence's members are
// "normalizer.normalizers[2]" ...), for naming its fields in errors.
std::unique_ptr<Normalizer> make_normalizer(const nlohmann::json& j, const std::string& where,
                                            const std::string& path = "normalizer");
std::unique_ptr<PreTokenizer> make_pre_tokenizer(const nlohmann::json& j, const std::string& where,
                                                 const std::string& path = "pre_tokenizer");
std::unique_ptr<Decoder> make_decoder(const nlohmann::json& j, const std::string& where,
                                      const std::string& path = "decoder");
std::unique_ptr<PostProcessor> make_post_processor(const nlohmann::json& j,
                                                   const std::string& where,
                                                   const std::string& path = "post_processor");
// A {"String": ...} or {"Regex": ...} split pattern; `name` is what errors call it.
Pattern make_pattern(const nlohmann::json& j, const std::string& where, const std::string& name);
// j["type"] of a normalizer / pre-tokenizer / decoder / post-processor object; `what` names it in
// the error when missing.
std::string type_of(const nlohmann::json& j, const std::string& where, const char* what);
// byte_level_input: the pre-tokenizer ends in ByteLevel, so pieces arrive as raw bytes that the
// model maps through GPT-2's byte table itself (saves building the mapped strings).
std::unique_ptr<Model> make_model(const nlohmann::json& j, const std::string& where,
                                  bool byte_level_input);
// True when the pre-tokenizer JSON ends with a ByteLevel step (the raw-byte fast path applies).
bool ends_with_byte_level(const nlohmann::json& pre_tokenizer);
// Turns off the byte mapping of a trailing ByteLevel step (the model does it).
void set_raw_byte_level(PreTokenizer& p);

// SentencePiece-style BPE (merge the adjacent pair whose concatenation has the best score).
std::unique_ptr<Model> make_spm_bpe(const std::vector<std::string>& pieces,
                                    const std::vector<float>& scores,
                                    const std::vector<bool>& mergeable, int unk_id,
                                    bool byte_fallback);
std::unique_ptr<Model> make_unigram(std::vector<std::string> pieces, std::vector<double> scores,
                                    std::optional<int> unk_id, bool byte_fallback);
std::unique_ptr<Normalizer> make_prepend_replace(bool prepend, bool escape_spaces,
                                                 bool remove_extra_spaces);
std::unique_ptr<Decoder> make_spm_decoder(bool strip_leading_space);
std::unique_ptr<PostProcessor> make_template(std::vector<int32_t> before,
                                             std::vector<int32_t> after);

// ---- The tokenizer ---------------------------------------------------------------------------

struct TokenizerImpl {
  std::string source;  // file name for messages
  std::unique_ptr<Normalizer> normalizer;
  std::unique_ptr<PreTokenizer> pre_tokenizer;
  std::unique_ptr<Model> model;
  std::unique_ptr<PostProcessor> post_processor;
  std::unique_ptr<Decoder> decoder;

  std::vector<AddedToken> added;  // index = position in tokenizer.json
  std::unordered_map<std::string, int32_t> added_by_content;
  std::unordered_map<int32_t, int32_t> added_by_id;  // id -> index into added
  std::unordered_map<std::string, bool> special_contents;
  TokenMatcher raw_matcher, norm_matcher;  // values index into added

  std::optional<std::string> bos, eos;
  size_t n_ids = 0;

  // Adds (or updates) an added token the way HF does, assigning its id. Call
  // finish_added_tokens() afterwards.
  void add_token(AddedToken t);
  void finish_added_tokens();
  void encode(std::string_view text, bool add_special, std::vector<int32_t>& out) const;
  void encode_segment(std::string_view seg, bool orig0, Work& w, std::vector<int32_t>& out) const;
  std::string decode(std::span<const int32_t> ids, bool skip_special) const;
  std::optional<int32_t> token_to_id(std::string_view t) const;
  const std::string* id_to_token(int32_t id) const;
  const std::string* decode_token(int32_t id) const;
};

std::shared_ptr<TokenizerImpl> load_tokenizer_json(const std::filesystem::path& path);
std::shared_ptr<TokenizerImpl> load_sentencepiece(const std::filesystem::path& path,
                                                  const nlohmann::json* config);

}  // namespace kiln::tok
