// Decoders (token strings -> text) and post-processors (special tokens around the ids).
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/tokenizer_impl.h"

namespace kiln::tok {

using json = nlohmann::json;

namespace {

// Maps each token's chars back to bytes when they all belong to GPT-2's byte alphabet (others
// are kept as UTF-8), then decodes the lot lossily into a single token.
class ByteLevelDec : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::string bytes;
    for (const std::string& t : tokens) {
      size_t mark = bytes.size();
      bool ok = true;
      for (size_t i = 0; i < t.size();) {
        int b = char_to_byte(next_cp(t, i));
        if (b < 0) {
          ok = false;
          break;
        }
        bytes.push_back(static_cast<char>(b));
      }
      if (!ok) {
        bytes.resize(mark);
        bytes += t;
      }
    }
    tokens.assign(1, from_utf8_lossy(bytes));
  }
};

class MetaspaceDec : public Decoder {
 public:
  MetaspaceDec(uint32_t replacement, bool strip_first) : strip_first_(strip_first) {
    append_utf8(repl_, replacement);
  }
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (size_t i = 0; i < tokens.size(); ++i) {
      std::string& t = tokens[i];
      if (t.find(repl_) == std::string::npos) continue;
      std::string out;
      for (size_t p = 0; p < t.size();) {
        if (t.compare(p, repl_.size(), repl_) == 0) {
          // HF drops every replacement char of the first token, not just a leading one.
          if (!(i == 0 && strip_first_)) out += ' ';
          p += repl_.size();
        } else {
          out += t[p++];
        }
      }
      t.swap(out);
    }
  }

 private:
  std::string repl_;
  bool strip_first_;
};

class ByteFallbackDec : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::vector<std::string> out;
    out.reserve(tokens.size());
    std::string pending;
    auto flush = [&] {
      if (pending.empty()) return;
      if (find_invalid_utf8(pending) == std::string::npos) {
        out.push_back(pending);
      } else {
        for (size_t k = 0; k < pending.size(); ++k) out.emplace_back("\xEF\xBF\xBD");
      }
      pending.clear();
    };
    for (std::string& t : tokens) {
      int byte = parse_byte(t);
      if (byte >= 0) {
        pending.push_back(static_cast<char>(byte));
      } else {
        flush();
        out.push_back(std::move(t));
      }
    }
    flush();
    tokens.swap(out);
  }

 private:
  static int hex(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  }
  static int parse_byte(const std::string& t) {
    if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>') return -1;
    int h = hex(t[3]), l = hex(t[4]);
    if (h < 0 || l < 0) return -1;
    return h * 16 + l;
  }
};

class FuseDec : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::string all;
    for (auto& t : tokens) all += t;
    tokens.assign(1, std::move(all));
  }
};

class StripDec : public Decoder {
 public:
  StripDec(uint32_t content, size_t start, size_t stop)
      : content_(content), start_(start), stop_(stop) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (std::string& t : tokens) {
      std::vector<std::pair<size_t, uint32_t>> chars;  // (byte offset, cp)
      for (size_t i = 0; i < t.size();) {
        size_t b = i;
        chars.emplace_back(b, next_cp(t, i));
      }
      size_t start_cut = 0;
      for (size_t i = 0; i < std::min(start_, chars.size()); ++i) {
        if (chars[i].second != content_) break;
        start_cut = i + 1;
      }
      size_t stop_cut = chars.size();
      for (size_t i = 0; i < stop_ && i < chars.size(); ++i) {
        size_t idx = chars.size() - i - 1;
        if (chars[idx].second != content_) break;
        stop_cut = idx;
      }
      if (stop_cut < start_cut) stop_cut = start_cut;
      size_t b = start_cut < chars.size() ? chars[start_cut].first : t.size();
      size_t e = stop_cut < chars.size() ? chars[stop_cut].first : t.size();
      t = t.substr(b, e - b);
    }
  }

 private:
  uint32_t content_;
  size_t start_, stop_;
};

class ReplaceDec : public Decoder {
 public:
  ReplaceDec(Pattern p, std::string content)
      : pattern_(std::move(p)), content_(std::move(content)) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::vector<std::tuple<uint32_t, uint32_t, bool>> m;
    for (std::string& t : tokens) {
      if (!pattern_.regex && (pattern_.literal.empty() || t.find(pattern_.literal) == t.npos))
        continue;
      pattern_.find_matches(t, m);
      std::string out;
      for (auto& [b, e, is] : m) {
        if (is)
          out += content_;
        else
          out.append(t, b, e - b);
      }
      t.swap(out);
    }
  }

 private:
  Pattern pattern_;
  std::string content_;
};

// BPEDecoder: the end-of-word suffix becomes a space (nothing on the last token).
class BpeDec : public Decoder {
 public:
  explicit BpeDec(std::string suffix) : suffix_(std::move(suffix)) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    if (suffix_.empty()) return;
    for (size_t i = 0; i < tokens.size(); ++i) {
      std::string& t = tokens[i];
      std::string out;
      const char* rep = i + 1 == tokens.size() ? "" : " ";
      size_t p = 0, q;
      while ((q = t.find(suffix_, p)) != std::string::npos) {
        out.append(t, p, q - p);
        out += rep;
        p = q + suffix_.size();
      }
      out.append(t, p);
      t.swap(out);
    }
  }

 private:
  std::string suffix_;
};

class DecSequence : public Decoder {
 public:
  explicit DecSequence(std::vector<std::unique_ptr<Decoder>> v) : v_(std::move(v)) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (auto& d : v_) d->decode_chain(tokens);
  }

 private:
  std::vector<std::unique_ptr<Decoder>> v_;
};

uint32_t one_char(const std::string& s, const std::string& where, const char* field) {
  size_t i = 0;
  KILN_CHECK(!s.empty(), where, ": ", field, " must be one character");
  uint32_t cp = next_cp(s, i);
  KILN_CHECK(i == s.size(), where, ": ", field, " must be one character, got \"", s, "\"");
  return cp;
}

// ---- Post-processors ---------------------------------------------------------------------------

class Template : public PostProcessor {
 public:
  Template(std::vector<int32_t> before, std::vector<int32_t> after)
      : before_(std::move(before)), after_(std::move(after)) {}
  void process(std::vector<int32_t>& ids) const override {
    ids.insert(ids.begin(), before_.begin(), before_.end());
    ids.insert(ids.end(), after_.begin(), after_.end());
  }
  void added_ids(std::vector<int32_t>& out) const override {
    out.insert(out.end(), before_.begin(), before_.end());
    out.insert(out.end(), after_.begin(), after_.end());
  }

 private:
  std::vector<int32_t> before_, after_;
};

class NoOp : public PostProcessor {
 public:
  void process(std::vector<int32_t>&) const override {}
};

class PostSequence : public PostProcessor {
 public:
  explicit PostSequence(std::vector<std::unique_ptr<PostProcessor>> v) : v_(std::move(v)) {}
  void process(std::vector<int32_t>& ids) const override {
    for (auto& p : v_) p->process(ids);
  }
  void added_ids(std::vector<int32_t>& out) const override {
    for (auto& p : v_) p->added_ids(out);
  }

 private:
  std::vector<std::unique_ptr<PostProcessor>> v_;
};

int32_t token_pair_id(const json& j, const std::string& where, const char* field) {
  KILN_CHECK(j.is_array() && j.size() == 2, where, ": post_processor.", field,
             " must be [token, id]");
  return file_token_id(j[1], cat(where, ": post_processor.", field, " id"));
}

}  // namespace

std::unique_ptr<Decoder> make_decoder(const json& j, const std::string& where,
                                      const std::string& path) {
  if (j.is_null()) return nullptr;
  std::string t = type_of(j, where, "decoder");
  const JsonObj o{j, cat(where, ": ", path)};
  if (t == "ByteLevel") return std::make_unique<ByteLevelDec>();
  if (t == "Metaspace") {
    std::string repl = o.str("replacement", "\u2581");
    bool strip = o.boolean("add_prefix_space", true);
    if (o.find("prepend_scheme")) {
      std::string s = o.str("prepend_scheme");
      KILN_CHECK(s == "always" || s == "first" || s == "never", where,
                 ": unknown Metaspace prepend_scheme \"", s, "\"");
      strip = s != "never";
    }
    return std::make_unique<MetaspaceDec>(one_char(repl, where, "Metaspace replacement"), strip);
  }
  if (t == "ByteFallback") return std::make_unique<ByteFallbackDec>();
  if (t == "Fuse") return std::make_unique<FuseDec>();
  if (t == "Strip")
    return std::make_unique<StripDec>(one_char(o.str("content"), where, "content"),
                                      o.count("start", 0), o.count("stop", 0));
  if (t == "Replace")
    return std::make_unique<ReplaceDec>(make_pattern(o.at("pattern"), where, o.field("pattern")),
                                        o.str("content"));
  if (t == "BPEDecoder") return std::make_unique<BpeDec>(o.str("suffix", "</w>"));
  if (t == "Sequence") {
    std::vector<std::unique_ptr<Decoder>> v;
    const json& list = json_array(o.at("decoders"), o.field("decoders"));
    for (size_t i = 0; i < list.size(); ++i)
      if (auto p = make_decoder(list[i], where, cat(path, ".decoders[", i, "]")))
        v.push_back(std::move(p));
    return std::make_unique<DecSequence>(std::move(v));
  }
  throw Error(cat(where, ": unsupported decoder type \"", t, "\""));
}

std::unique_ptr<Decoder> make_spm_decoder(bool strip_leading_space) {
  std::vector<std::unique_ptr<Decoder>> v;
  Pattern p;
  p.literal = "\u2581";
  v.push_back(std::make_unique<ReplaceDec>(std::move(p), " "));
  v.push_back(std::make_unique<ByteFallbackDec>());
  v.push_back(std::make_unique<FuseDec>());
  if (strip_leading_space) v.push_back(std::make_unique<StripDec>(' ', 1, 0));
  return std::make_unique<DecSequence>(std::move(v));
}

std::unique_ptr<PostProcessor> make_template(std::vector<int32_t> before,
                                             std::vector<int32_t> after) {
  return std::make_unique<Template>(std::move(before), std::move(after));
}

std::unique_ptr<PostProcessor> make_post_processor(const json& j, const std::string& where,
                                                   const std::string& path) {
  if (j.is_null()) return nullptr;
  std::string t = type_of(j, where, "post_processor");
  const JsonObj o{j, cat(where, ": ", path)};
  if (t == "ByteLevel") return std::make_unique<NoOp>();  // only adjusts offsets
  if (t == "TemplateProcessing") {
    const json& single = json_array(o.at("single"), o.field("single"));
    static const json kNone = json::object();
    const json& specials = o.find("special_tokens") ? *o.find("special_tokens") : kNone;
    KILN_CHECK(specials.is_object(), o.field("special_tokens"), " must be an object");
    std::vector<int32_t> before, after;
    bool seen_a = false;
    for (size_t i = 0; i < single.size(); ++i) {
      const JsonObj piece{single[i], o.field(cat("single[", i, "]"))};
      if (piece.find("Sequence")) {
        KILN_CHECK(!seen_a, where, ": post_processor.single has two sequences");
        seen_a = true;
        continue;
      }
      KILN_CHECK(piece.find("SpecialToken"), where,
                 ": post_processor.single entries must be Sequence or SpecialToken");
      std::string name = JsonObj{piece.at("SpecialToken"), piece.field("SpecialToken")}.str("id");
      KILN_CHECK(specials.contains(name), where, ": post_processor special token \"", name,
                 "\" is not in special_tokens");
      const JsonObj special{specials[name], o.field(cat("special_tokens[\"", name, "\"]"))};
      for (const json& id : json_array(special.at("ids"), special.field("ids")))
        (seen_a ? after : before)
            .push_back(
                file_token_id(id, cat(where, ": post_processor special token \"", name, "\" id")));
    }
    KILN_CHECK(seen_a, where, ": post_processor.single has no $A sequence");
    return std::make_unique<Template>(std::move(before), std::move(after));
  }
  if (t == "RobertaProcessing" || t == "BertProcessing") {
    return std::make_unique<Template>(
        std::vector<int32_t>{token_pair_id(o.at("cls"), where, "cls")},
        std::vector<int32_t>{token_pair_id(o.at("sep"), where, "sep")});
  }
  if (t == "Sequence") {
    std::vector<std::unique_ptr<PostProcessor>> v;
    const json& list = json_array(o.at("processors"), o.field("processors"));
    for (size_t i = 0; i < list.size(); ++i)
      if (auto q = make_post_processor(list[i], where, cat(path, ".processors[", i, "]")))
        v.push_back(std::move(q));
    return std::make_unique<PostSequence>(std::move(v));
  }
  throw Error(cat(where, ": unsupported post_processor type \"", t, "\""));
}

}  // namespace kiln::tok
