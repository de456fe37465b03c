// Tokenizer: loading tokenizer.json, added-token splitting, encode/decode, streaming decode.
#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "io/json.h"
#include "tokenizer/tokenizer_impl.h"

namespace kiln {
namespace tok {

using json = nlohmann::json;

// ---- Added-token matching ----------------------------------------------------------------------

void TokenMatcher::build(const std::vector<std::pair<std::string, int>>& patterns) {
  nodes_.assign(1, Node{});
  first_.fill(false);
  for (const auto& [text, value] : patterns) {
    if (text.empty()) continue;
    first_[static_cast<unsigned char>(text[0])] = true;
    int node = 0;
    for (unsigned char c : text) {
      auto& nx = nodes_[node].next;
      auto it = std::lower_bound(nx.begin(), nx.end(), std::make_pair(c, 0),
                                 [](const auto& a, const auto& b) { return a.first < b.first; });
      if (it != nx.end() && it->first == c) {
        node = it->second;
      } else {
        int nn = static_cast<int>(nodes_.size());
        nx.insert(it, {c, nn});
        nodes_.emplace_back();
        node = nn;
      }
    }
    if (nodes_[node].value < 0) nodes_[node].value = value;  // the first of duplicates wins
  }
}

bool TokenMatcher::next(std::string_view s, size_t from, size_t& start, size_t& end,
                        int& value) const {
  for (size_t i = from; i < s.size(); ++i) {
    if (!first_[static_cast<unsigned char>(s[i])]) continue;
    int node = 0, best = -1;
    size_t best_end = 0;
    for (size_t k = i; k < s.size(); ++k) {
      const auto& nx = nodes_[node].next;
      auto c = static_cast<unsigned char>(s[k]);
      auto it = std::lower_bound(nx.begin(), nx.end(), std::make_pair(c, 0),
                                 [](const auto& a, const auto& b) { return a.first < b.first; });
      if (it == nx.end() || it->first != c) break;
      node = it->second;
      if (nodes_[node].value >= 0) best = nodes_[node].value, best_end = k + 1;
    }
    if (best >= 0) {
      start = i;
      end = best_end;
      value = best;
      return true;
    }
  }
  return false;
}

namespace {

size_t last_cp_start(std::string_view s, size_t end) {
  size_t j = end - 1;
  while (j > 0 && (static_cast<unsigned char>(s[j]) & 0xC0) == 0x80) --j;
  return j;
}

// HF's AddedVocabulary::find_matches: splits s into added-token matches (with single_word,
// lstrip and rstrip applied) and the text between them.
template <typename OnToken, typename OnText>
void split_on_added(std::string_view s, const TokenMatcher& m, const std::vector<AddedToken>& added,
                    OnToken&& on_token, OnText&& on_text) {
  size_t start_offset = 0, pos = 0, ms, me;
  int idx;
  while (pos < s.size() && m.next(s, pos, ms, me, idx)) {
    pos = me;
    const AddedToken& t = added[idx];
    size_t start = ms, stop = me;
    if (t.single_word) {
      bool start_space = true, stop_space = true;
      if (start > 0) {
        size_t j = last_cp_start(s, start);
        start_space = !is_word_char(next_cp(s, j));
      }
      if (stop < s.size()) {
        size_t j = stop;
        stop_space = !is_word_char(next_cp(s, j));
      }
      if (!start_space || !stop_space) continue;
    }
    if (t.lstrip) {
      size_t ns = start;
      while (ns > 0) {
        size_t j = last_cp_start(s, ns), k = j;
        if (!is_whitespace(next_cp(s, k))) break;
        ns = j;
      }
      start = std::max(ns, start_offset);
    }
    if (t.rstrip) {
      while (stop < s.size()) {
        size_t k = stop;
        if (!is_whitespace(next_cp(s, k))) break;
        stop = k;
      }
    }
    if (start_offset < start) on_text(start_offset, start);
    on_token(t.id);
    start_offset = stop;
  }
  if (start_offset < s.size()) on_text(start_offset, s.size());
}

}  // namespace

// ---- Tokenizer core ----------------------------------------------------------------------------

void TokenizerImpl::finish_added_tokens() {
  added_by_content.clear();
  added_by_id.clear();
  special_contents.clear();
  // HF builds its matchers from special tokens first, then the others (first duplicate wins).
  std::vector<std::pair<std::string, int>> raw, norm;
  for (AddedToken& t : added) {
    t.decode_text = t.content;
    if (t.normalized && normalizer) normalizer->normalize(t.decode_text);
  }
  for (int pass = 0; pass < 2; ++pass) {
    for (size_t i = 0; i < added.size(); ++i) {
      const AddedToken& t = added[i];
      if (t.special != (pass == 0)) continue;
      if (t.normalized) {
        norm.emplace_back(t.decode_text, static_cast<int>(i));
      } else {
        raw.emplace_back(t.content, static_cast<int>(i));
      }
    }
  }
  for (size_t i = 0; i < added.size(); ++i) {
    const AddedToken& t = added[i];
    added_by_content.emplace(t.content, t.id);
    added_by_id[t.id] = static_cast<int32_t>(i);
    if (t.special) special_contents.emplace(t.content, true);
    n_ids = std::max(n_ids, static_cast<size_t>(t.id) + 1);
  }
  raw_matcher.build(raw);
  norm_matcher.build(norm);
}

void TokenizerImpl::add_token(AddedToken t) {
  if (t.content.empty()) return;
  auto found = added_by_content.find(t.content);
  if (found != added_by_content.end()) {
    // Same content: HF keeps the id and takes the new flags.
    for (AddedToken& old : added) {
      if (old.content == t.content) {
        t.id = old.id;
        old = std::move(t);
        return;
      }
    }
  }
  // HF's AddedVocabulary::add_tokens ignores the id written in the file: a token already in the
  // model vocab keeps that id, a new one gets the next id after the model and the added tokens.
  if (auto id = model->token_to_id(t.content)) {
    t.id = *id;
  } else {
    auto vocab = static_cast<int64_t>(model->vocab_size());
    int64_t next = vocab;
    int64_t max_id = -1;
    for (const auto& [content, id] : added_by_content) max_id = std::max<int64_t>(max_id, id);
    if (max_id >= 0 && (max_id >= vocab || vocab == 0)) next = max_id + 1;
    t.id = static_cast<int32_t>(next);
  }
  added_by_content.emplace(t.content, t.id);
  added.push_back(std::move(t));
}

namespace {

void pre_tokenize_and_model(const TokenizerImpl& tk, std::string_view text, bool orig0, Work& w,
                            std::vector<int32_t>& out) {
  if (text.empty()) return;
  if (!tk.pre_tokenizer) {
    tk.model->encode(text, out);
    return;
  }
  w.buf.assign(text);
  w.a.assign(1, Piece{0, static_cast<uint32_t>(text.size()), orig0});
  tk.pre_tokenizer->run(w);
  for (const Piece& p : w.a) tk.model->encode(std::string_view(w.buf).substr(p.off, p.len), out);
}

}  // namespace

void TokenizerImpl::encode_segment(std::string_view seg, bool orig0, Work& w,
                                   std::vector<int32_t>& out) const {
  std::string norm;
  std::string_view ns = seg;
  if (normalizer) {
    norm.assign(seg);
    normalizer->normalize(norm);
    ns = norm;
  }
  if (norm_matcher.empty()) {
    pre_tokenize_and_model(*this, ns, orig0, w, out);
    return;
  }
  split_on_added(
      ns, norm_matcher, added, [&](int32_t id) { out.push_back(id); },
      [&](size_t b, size_t e) {
        pre_tokenize_and_model(*this, ns.substr(b, e - b), orig0 && b == 0, w, out);
      });
}

void TokenizerImpl::encode(std::string_view text, bool add_special,
                           std::vector<int32_t>& out) const {
  size_t bad = find_invalid_utf8(text);
  KILN_CHECK(bad == std::string_view::npos, "tokenizer: input text is not valid UTF-8 (byte ", bad,
             ")");
  Work w;
  if (raw_matcher.empty()) {
    encode_segment(text, true, w, out);
  } else {
    split_on_added(
        text, raw_matcher, added, [&](int32_t id) { out.push_back(id); },
        [&](size_t b, size_t e) { encode_segment(text.substr(b, e - b), b == 0, w, out); });
  }
  if (add_special && post_processor) post_processor->process(out);
}

const std::string* TokenizerImpl::id_to_token(int32_t id) const {
  auto it = added_by_id.find(id);
  if (it != added_by_id.end()) return &added[it->second].content;
  return model->id_to_token(id);
}

const std::string* TokenizerImpl::decode_token(int32_t id) const {
  auto it = added_by_id.find(id);
  if (it != added_by_id.end()) return &added[it->second].decode_text;
  return model->id_to_token(id);
}

std::optional<int32_t> TokenizerImpl::token_to_id(std::string_view t) const {
  auto it = added_by_content.find(std::string(t));
  if (it != added_by_content.end()) return it->second;
  return model->token_to_id(t);
}

std::string TokenizerImpl::decode(std::span<const int32_t> ids, bool skip_special) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int32_t id : ids) {
    const std::string* t = decode_token(id);
    if (!t) continue;
    if (skip_special && (special_contents.count(*t) || special_contents.count(*id_to_token(id))))
      continue;
    tokens.push_back(*t);
  }
  if (decoder) decoder->decode_chain(tokens);
  std::string out;
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (!decoder && i > 0) out += ' ';
    out += tokens[i];
  }
  return out;
}

// ---- Loading -----------------------------------------------------------------------------------

namespace {

json read_json(const std::filesystem::path& path) {
  std::ifstream f(path, std::ios::binary);
  KILN_CHECK(f, path.string(), ": cannot open");
  std::stringstream ss;
  ss << f.rdbuf();
  return parse_json(ss.str(), path.string());
}

// `name` is the token's place in the file for errors ("tokenizer.json: added_tokens[3]").
AddedToken parse_added(const json& a, const std::string& where, const std::string& name) {
  AddedToken t;
  KILN_CHECK(a.is_object() && a.contains("content") && a["content"].is_string(), where,
             ": added token without a string \"content\"");
  const JsonObj o{a, name};
  t.content = a["content"].get<std::string>();
  t.special = o.boolean("special", false);
  t.single_word = o.boolean("single_word", false);
  t.lstrip = o.boolean("lstrip", false);
  t.rstrip = o.boolean("rstrip", false);
  t.normalized = o.boolean("normalized", !t.special);
  return t;
}

std::optional<std::string> config_token(const json& cfg, const char* key) {
  auto it = cfg.find(key);
  if (it == cfg.end() || it->is_null()) return std::nullopt;
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object() && it->contains("content") && (*it)["content"].is_string())
    return (*it)["content"].get<std::string>();
  return std::nullopt;
}

}  // namespace

std::shared_ptr<TokenizerImpl> load_tokenizer_json(const std::filesystem::path& path) {
  json j = read_json(path);
  auto tk = std::make_shared<TokenizerImpl>();
  std::string where = path.string();
  tk->source = where;
  KILN_CHECK(j.is_object() && j.contains("model"), where, ": not a tokenizer.json (no \"model\")");
  try {
    const json null;
    auto get = [&](const char* k) -> const json& { return j.contains(k) ? j[k] : null; };
    tk->normalizer = make_normalizer(get("normalizer"), where);
    tk->pre_tokenizer = make_pre_tokenizer(get("pre_tokenizer"), where);
    bool raw = tk->pre_tokenizer && ends_with_byte_level(get("pre_tokenizer"));
    tk->model = make_model(j["model"], where, raw);
    const JsonObj model{j["model"], cat(where, ": model")};  // an object: make_model checked
    if (raw && model.str("type", "BPE") == "BPE" &&
        model.str("continuing_subword_prefix", "").empty() &&
        model.str("end_of_word_suffix", "").empty())
      set_raw_byte_level(*tk->pre_tokenizer);
    tk->post_processor = make_post_processor(get("post_processor"), where);
    tk->decoder = make_decoder(get("decoder"), where);
    if (j.contains("added_tokens") && j["added_tokens"].is_array()) {
      const json& added = j["added_tokens"];
      for (size_t i = 0; i < added.size(); ++i)
        tk->add_token(parse_added(added[i], where, cat(where, ": added_tokens[", i, "]")));
    }
  } catch (const json::exception& e) {
    // Every field is read through JsonObj and friends, which name it; this is a safety net.
    throw Error(cat(where, ": bad tokenizer.json: ", e.what()));
  }
  // HF numbers new added tokens from the entry count (model->vocab_size()), but the ids in use
  // reach the largest one, which is what callers compare against the model's vocabulary.
  tk->n_ids = std::max(tk->model->vocab_size(), tk->model->id_limit());
  tk->finish_added_tokens();
  // HF takes a post-processor's ids on trust; an id that names no token would reach the model's
  // embedding as an out-of-range input (found by fuzz_tokenizer_json).
  if (tk->post_processor) {
    std::vector<int32_t> ids;
    tk->post_processor->added_ids(ids);
    for (int32_t id : ids)
      KILN_CHECK(tk->id_to_token(id) != nullptr, where, ": post_processor adds token id ", id,
                 ", which is neither in model.vocab nor in added_tokens");
  }
  return tk;
}

// Applies tokenizer_config.json: bos/eos strings, extra added tokens, and the add_bos_token /
// add_eos_token override that transformers' Llama and Gemma tokenizer classes perform.
void apply_config(TokenizerImpl& tk, const json& cfg, const std::string& where) {
  KILN_CHECK(cfg.is_object(), where, ": expected a JSON object");
  tk.bos = config_token(cfg, "bos_token");
  tk.eos = config_token(cfg, "eos_token");
  if (cfg.contains("added_tokens_decoder") && cfg["added_tokens_decoder"].is_object()) {
    bool changed = false;
    for (auto it = cfg["added_tokens_decoder"].begin(); it != cfg["added_tokens_decoder"].end();
         ++it) {
      int32_t id = 0;
      try {
        id = std::stoi(it.key());
      } catch (...) {
        throw Error(cat(where, ": added_tokens_decoder key \"", it.key(), "\" is not an id"));
      }
      if (tk.added_by_id.count(id)) continue;
      tk.add_token(
          parse_added(*it, where, cat(where, ": added_tokens_decoder[\"", it.key(), "\"]")));
      changed = true;
    }
    if (changed) tk.finish_added_tokens();
  }
  std::string cls;
  if (auto it = cfg.find("tokenizer_class"); it != cfg.end() && !it->is_null())
    cls = json_string(*it, cat(where, ": tokenizer_class"));
  bool llama_like =
      cls.rfind("Llama", 0) == 0 || cls.rfind("Gemma", 0) == 0 || cls.rfind("CodeLlama", 0) == 0;
  bool has_bos = cfg.contains("add_bos_token") && cfg["add_bos_token"].is_boolean();
  bool has_eos = cfg.contains("add_eos_token") && cfg["add_eos_token"].is_boolean();
  if (llama_like && (has_bos || has_eos)) {
    bool add_bos = has_bos ? cfg["add_bos_token"].get<bool>() : true;
    bool add_eos = has_eos ? cfg["add_eos_token"].get<bool>() : false;
    std::vector<int32_t> before, after;
    if (add_bos) {
      KILN_CHECK(tk.bos && tk.token_to_id(*tk.bos), where,
                 ": add_bos_token is true but bos_token is missing or not in the vocab");
      before.push_back(*tk.token_to_id(*tk.bos));
    }
    if (add_eos) {
      KILN_CHECK(tk.eos && tk.token_to_id(*tk.eos), where,
                 ": add_eos_token is true but eos_token is missing or not in the vocab");
      after.push_back(*tk.token_to_id(*tk.eos));
    }
    tk.post_processor = make_template(std::move(before), std::move(after));
  }
}

// ---- Reading tokenizer files -------------------------------------------------------------------

namespace {
[[noreturn]] void wrong_type(const json& v, const std::string& name, const char* want) {
  throw Error(cat(name, " must be ", want, ", not ", v.type_name()));
}
}  // namespace

std::string json_string(const json& v, const std::string& name) {
  if (!v.is_string()) wrong_type(v, name, "a string");
  return v.get<std::string>();
}

double json_number(const json& v, const std::string& name) {
  if (!v.is_number()) wrong_type(v, name, "a number");
  return v.get<double>();
}

const json& json_array(const json& v, const std::string& name) {
  if (!v.is_array()) wrong_type(v, name, "an array");
  return v;
}

const json& JsonObj::at(const char* key) const {
  if (!j.is_object()) wrong_type(j, name, "an object");
  auto it = j.find(key);
  if (it == j.end()) throw Error(cat(field(key), " is missing"));
  return *it;
}

const json* JsonObj::find(const char* key) const {
  if (!j.is_object()) return nullptr;
  auto it = j.find(key);
  return it == j.end() || it->is_null() ? nullptr : &*it;
}

std::string JsonObj::str(const char* key) const {
  return json_string(at(key), field(key));
}

std::string JsonObj::str(const char* key, const std::string& dflt) const {
  const json* v = find(key);
  return v ? json_string(*v, field(key)) : dflt;
}

bool JsonObj::boolean(const char* key, bool dflt) const {
  const json* v = find(key);
  if (!v) return dflt;
  if (!v->is_boolean()) wrong_type(*v, field(key), "true or false");
  return v->get<bool>();
}

size_t JsonObj::count(const char* key, size_t dflt) const {
  const json* v = find(key);
  if (!v) return dflt;
  if (!v->is_number_unsigned()) wrong_type(*v, field(key), "a non-negative integer");
  return v->get<size_t>();
}

int32_t file_token_id(const json& v, const std::string& what) {
  KILN_CHECK(v.is_number_integer(), what, " is not an integer token id");
  // Unsigned beyond int64 reads as negative here: refused too.
  const int64_t id =
      v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX) ? -1 : v.get<int64_t>();
  KILN_CHECK(id >= 0 && id < kMaxTokenizerId, what, " = ", v.dump(), " is outside [0, ",
             kMaxTokenizerId, ")");
  return int32_t(id);
}

}  // namespace tok

// ---- Public API --------------------------------------------------------------------------------

namespace {

std::optional<std::filesystem::path> find_file(const std::filesystem::path& dir, const char* name) {
  for (auto p : {dir / name, dir / "tokenizer" / name})
    if (std::filesystem::is_regular_file(p)) return p;
  return std::nullopt;
}

}  // namespace

Tokenizer Tokenizer::from_dir(const std::filesystem::path& dir) {
  KILN_CHECK(std::filesystem::is_directory(dir), dir.string(), ": not a directory");
  // A tokenizer still alive for the same files is shared rather than loaded again (a command
  // and the scheduler under it both open the engine's; a 262k-piece vocabulary takes ~0.15 s).
  // Tokenizers are immutable, so sharing is safe; the key holds each file's size and mtime.
  std::string key = std::filesystem::weakly_canonical(dir).string();
  for (const char* f : {"tokenizer_config.json", "tokenizer.json", "tokenizer.model"})
    if (auto p = find_file(dir, f)) {
      std::error_code ec;
      key += cat("|", p->string(), ":", std::filesystem::file_size(*p, ec), ":",
                 std::filesystem::last_write_time(*p, ec).time_since_epoch().count());
    }
  static std::mutex mu;
  static std::map<std::string, std::weak_ptr<const tok::TokenizerImpl>> loaded;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (auto it = loaded.find(key); it != loaded.end())
      if (auto live = it->second.lock()) return Tokenizer(std::move(live));
  }
  Tokenizer t = load_dir(dir);
  std::lock_guard<std::mutex> lock(mu);
  std::erase_if(loaded, [](const auto& e) { return e.second.expired(); });
  loaded[key] = t.impl_;
  return t;
}

Tokenizer Tokenizer::load_dir(const std::filesystem::path& dir) {
  auto cfg_path = find_file(dir, "tokenizer_config.json");
  nlohmann::json cfg;
  if (cfg_path) cfg = tok::read_json(*cfg_path);
  std::shared_ptr<tok::TokenizerImpl> impl;
  if (auto js = find_file(dir, "tokenizer.json")) {
    impl = tok::load_tokenizer_json(*js);
  } else if (auto sp = find_file(dir, "tokenizer.model")) {
    impl = tok::load_sentencepiece(*sp, cfg_path ? &cfg : nullptr);
  } else {
    throw Error(cat(dir.string(), ": no tokenizer.json or tokenizer.model"));
  }
  if (cfg_path) tok::apply_config(*impl, cfg, cfg_path->string());
  return Tokenizer(std::move(impl));
}

Tokenizer Tokenizer::from_json_file(const std::filesystem::path& tokenizer_json) {
  return Tokenizer(tok::load_tokenizer_json(tokenizer_json));
}

Tokenizer Tokenizer::from_sentencepiece_file(const std::filesystem::path& tokenizer_model) {
  return Tokenizer(tok::load_sentencepiece(tokenizer_model, nullptr));
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  impl_->encode(text, add_special_tokens, out);
  return out;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  return impl_->decode(ids, skip_special_tokens);
}

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  return impl_->token_to_id(token);
}

std::string Tokenizer::id_to_token(int32_t id) const {
  const std::string* t = impl_->id_to_token(id);
  return t ? *t : std::string();
}

size_t Tokenizer::vocab_size() const {
  return impl_->n_ids;
}

bool Tokenizer::is_special(int32_t id) const {
  auto it = impl_->added_by_id.find(id);
  return it != impl_->added_by_id.end() && impl_->added[it->second].special;
}

std::optional<std::string> Tokenizer::bos_token() const {
  return impl_->bos;
}
std::optional<std::string> Tokenizer::eos_token() const {
  return impl_->eos;
}
std::optional<int32_t> Tokenizer::bos_token_id() const {
  return impl_->bos ? impl_->token_to_id(*impl_->bos) : std::nullopt;
}
std::optional<int32_t> Tokenizer::eos_token_id() const {
  return impl_->eos ? impl_->token_to_id(*impl_->eos) : std::nullopt;
}

// ---- StreamDecoder -----------------------------------------------------------------------------

StreamDecoder::StreamDecoder(const Tokenizer& tokenizer, bool skip_special_tokens)
    : tokenizer_(tokenizer), skip_special_(skip_special_tokens) {}

namespace {
bool ends_with_replacement(const std::string& s) {
  return s.size() >= 3 && s.compare(s.size() - 3, 3, "\xEF\xBF\xBD") == 0;
}
}  // namespace

std::string StreamDecoder::push(int32_t id) {
  // HF's DecodeStream::step: decode the window; once it grows past the previous text without a
  // trailing U+FFFD, emit the difference and slide the window.
  ids_.push_back(id);
  std::string text = tokenizer_.decode(ids_, skip_special_);
  // Unlike HF, the window is bounded: tokens that decode to nothing (skipped special tokens) or
  // bytes that never complete a character would otherwise grow it forever, and every push
  // re-decodes it (quadratic; found by fuzz_tokenizer_json). A real character needs at most four
  // byte tokens, so past kMaxHeld held-back ids the text is emitted as it stands.
  const bool held = text.size() <= prefix_text_.size() || ends_with_replacement(text);
  if (held && ids_.size() - prefix_ < kMaxHeld) return {};
  std::string out;
  if (text.compare(0, prefix_text_.size(), prefix_text_) == 0) {
    out = text.substr(prefix_text_.size());
  } else {
    // The decoder rewrote earlier text (not expected for supported decoders): emit what differs
    // at a char boundary so the stream stays valid UTF-8.
    size_t k = 0;
    while (k < prefix_text_.size() && text[k] == prefix_text_[k]) ++k;
    while (k > 0 && (static_cast<unsigned char>(text[k]) & 0xC0) == 0x80) --k;
    out = text.substr(k);
  }
  size_t new_prefix = ids_.size() - prefix_;
  ids_.erase(ids_.begin(), ids_.begin() + static_cast<std::ptrdiff_t>(prefix_));
  prefix_text_ = tokenizer_.decode(ids_, skip_special_);
  prefix_ = new_prefix;
  return out;
}

std::string StreamDecoder::flush() {
  std::string text = tokenizer_.decode(ids_, skip_special_);
  std::string out;
  if (text.size() > prefix_text_.size() && text.compare(0, prefix_text_.size(), prefix_text_) == 0)
    out = text.substr(prefix_text_.size());
  ids_.clear();
  prefix_ = 0;
  prefix_text_.clear();
  return out;
}

}  // namespace kiln
