// SentencePiece tokenizer.model loader: a hand-written reader for the few protobuf fields needed
// (pieces, scores, types, model type, byte fallback, special ids, normalizer flags). The result
// behaves like transformers' conversion of the model (control pieces are special tokens matched
// in text, the normalizer prepends/escapes spaces, byte-fallback decoding).
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "tokenizer/tokenizer_impl.h"

namespace kiln::tok {

namespace {

// Minimal protobuf wire-format reader.
class Proto {
 public:
  Proto(std::string_view data, const std::string& where) : d_(data), where_(where) {}
  bool done() const { return p_ >= d_.size(); }
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      KILN_CHECK(p_ < d_.size(), where_, ": truncated protobuf (varint)");
      auto b = static_cast<unsigned char>(d_[p_++]);
      v |= static_cast<uint64_t>(b & 0x7F) << shift;
      if (!(b & 0x80)) return v;
    }
    throw Error(cat(where_, ": bad protobuf varint"));
  }
  // Reads a field key; returns false at the end.
  bool key(uint32_t& field, uint32_t& wire) {
    if (done()) return false;
    uint64_t k = varint();
    field = static_cast<uint32_t>(k >> 3);
    wire = static_cast<uint32_t>(k & 7);
    return true;
  }
  std::string_view bytes() {
    uint64_t n = varint();
    KILN_CHECK(n <= d_.size() - p_, where_, ": truncated protobuf (length-delimited field)");
    std::string_view v = d_.substr(p_, n);
    p_ += n;
    return v;
  }
  float fixed32f() {
    KILN_CHECK(p_ + 4 <= d_.size(), where_, ": truncated protobuf (fixed32)");
    float f;
    std::memcpy(&f, d_.data() + p_, 4);
    p_ += 4;
    return f;
  }
  void skip(uint32_t wire) {
    switch (wire) {
      case 0:
        varint();
        break;
      case 1:
        KILN_CHECK(p_ + 8 <= d_.size(), where_, ": truncated protobuf");
        p_ += 8;
        break;
      case 2:
        bytes();
        break;
      case 5:
        KILN_CHECK(p_ + 4 <= d_.size(), where_, ": truncated protobuf");
        p_ += 4;
        break;
      default:
        throw Error(cat(where_, ": unsupported protobuf wire type ", wire));
    }
  }

 private:
  std::string_view d_;
  size_t p_ = 0;
  const std::string& where_;
};

}  // namespace

std::shared_ptr<TokenizerImpl> load_sentencepiece(const std::filesystem::path& path,
                                                  const nlohmann::json* config) {
  std::string where = path.string();
  std::ifstream f(path, std::ios::binary);
  KILN_CHECK(f, where, ": cannot open");
  std::stringstream ss;
  ss << f.rdbuf();
  std::string data = ss.str();

  std::vector<std::string> pieces;
  std::vector<float> scores;
  std::vector<int> types;
  int model_type = 1;  // UNIGRAM
  bool byte_fallback = false;
  int unk_id = 0, bos_id = 1, eos_id = 2;
  std::string norm_name;
  bool has_charsmap = false;
  bool add_dummy_prefix = true, remove_extra_ws = true, escape_ws = true, ws_suffix = false;

  Proto top(data, where);
  uint32_t field, wire;
  while (top.key(field, wire)) {
    if (field == 1 && wire == 2) {
      Proto sp(top.bytes(), where);
      std::string piece;
      float score = 0;
      int type = kSpmNormal;
      uint32_t f2, w2;
      while (sp.key(f2, w2)) {
        if (f2 == 1 && w2 == 2)
          piece = std::string(sp.bytes());
        else if (f2 == 2 && w2 == 5)
          score = sp.fixed32f();
        else if (f2 == 3 && w2 == 0)
          type = static_cast<int>(sp.varint());
        else
          sp.skip(w2);
      }
      pieces.push_back(std::move(piece));
      scores.push_back(score);
      types.push_back(type);
    } else if (field == 2 && wire == 2) {
      Proto ts(top.bytes(), where);
      uint32_t f2, w2;
      while (ts.key(f2, w2)) {
        if (w2 != 0) {
          ts.skip(w2);
          continue;
        }
        auto v = static_cast<int64_t>(ts.varint());
        switch (f2) {
          case 3:
            model_type = static_cast<int>(v);
            break;
          case 24:
            ws_suffix = v != 0;
            break;
          case 35:
            byte_fallback = v != 0;
            break;
          case 40:
          case 41:
          case 42:
            // int32 fields (-1: none); a value beyond 32 bits must not wrap onto another id.
            KILN_CHECK(v >= -1 && v < (int64_t(1) << 31), where, ": trainer_spec.",
                       f2 == 40   ? "unk_id"
                       : f2 == 41 ? "bos_id"
                                  : "eos_id",
                       " = ", v, " is not a token id");
            (f2 == 40 ? unk_id : f2 == 41 ? bos_id : eos_id) = static_cast<int32_t>(v);
            break;
          default:
            break;
        }
      }
    } else if (field == 3 && wire == 2) {
      Proto ns(top.bytes(), where);
      uint32_t f2, w2;
      while (ns.key(f2, w2)) {
        if (f2 == 1 && w2 == 2)
          norm_name = std::string(ns.bytes());
        else if (f2 == 2 && w2 == 2)
          has_charsmap = !ns.bytes().empty();
        else if (f2 == 3 && w2 == 0)
          add_dummy_prefix = ns.varint() != 0;
        else if (f2 == 4 && w2 == 0)
          remove_extra_ws = ns.varint() != 0;
        else if (f2 == 5 && w2 == 0)
          escape_ws = ns.varint() != 0;
        else
          ns.skip(w2);
      }
    } else {
      top.skip(wire);
    }
  }
  KILN_CHECK(!pieces.empty(), where, ": not a SentencePiece model (no pieces)");
  KILN_CHECK(!has_charsmap && (norm_name.empty() || norm_name == "identity"), where,
             ": SentencePiece normalizer \"", norm_name,
             "\" (precompiled charsmap) is not supported; use a tokenizer.json");
  KILN_CHECK(!ws_suffix, where, ": treat_whitespace_as_suffix is not supported");
  KILN_CHECK(unk_id >= 0 && static_cast<size_t>(unk_id) < pieces.size(), where,
             ": unk_id out of range");
  for (const auto& [id, name] : {std::pair{bos_id, "bos_id"}, std::pair{eos_id, "eos_id"}})
    KILN_CHECK(id < 0 || static_cast<size_t>(id) < pieces.size(), where, ": ", name, " ", id,
               " is beyond the ", pieces.size(), " pieces");

  auto tk = std::make_shared<TokenizerImpl>();
  tk->source = where;
  // Control/unknown pieces are special tokens; user-defined pieces are matched verbatim.
  std::vector<AddedToken> added;
  for (size_t i = 0; i < pieces.size(); ++i) {
    if (types[i] != kSpmControl && types[i] != kSpmUnknown && types[i] != kSpmUserDefined) continue;
    // These are matched in the raw text: a partial UTF-8 sequence would cut characters in two
    // and hand the model and pre-tokenizers invalid text. sentencepiece's own trainer and
    // transformers' conversion only ever produce valid strings.
    KILN_CHECK(find_invalid_utf8(pieces[i]) == std::string::npos, where, ": piece ", i,
               types[i] == kSpmUserDefined ? " (user-defined)"
               : types[i] == kSpmUnknown   ? " (unknown)"
                                           : " (control)",
               " is not valid UTF-8");
    AddedToken t;
    t.content = pieces[i];
    t.id = static_cast<int32_t>(i);
    t.special = types[i] != kSpmUserDefined;
    added.push_back(std::move(t));
  }
  if (model_type == 2) {
    std::vector<bool> mergeable(pieces.size());
    for (size_t i = 0; i < pieces.size(); ++i) mergeable[i] = types[i] == kSpmNormal;
    tk->model = make_spm_bpe(pieces, scores, mergeable, unk_id, byte_fallback);
  } else if (model_type == 1) {
    std::vector<double> sc(scores.begin(), scores.end());
    tk->model = make_unigram(pieces, std::move(sc), unk_id, byte_fallback);
  } else {
    throw Error(cat(where, ": SentencePiece model_type ", model_type,
                    " is not supported (only UNIGRAM and BPE)"));
  }
  for (AddedToken& t : added) tk->add_token(std::move(t));
  tk->normalizer = make_prepend_replace(add_dummy_prefix, escape_ws, remove_extra_ws);
  tk->decoder = make_spm_decoder(add_dummy_prefix);

  auto cfg_bool = [&](const char* k, bool def) {
    if (config && config->contains(k) && (*config)[k].is_boolean()) return (*config)[k].get<bool>();
    return def;
  };
  std::vector<int32_t> before, after;
  if (cfg_bool("add_bos_token", true) && bos_id >= 0) before.push_back(bos_id);
  if (cfg_bool("add_eos_token", false) && eos_id >= 0) after.push_back(eos_id);
  tk->post_processor = make_template(std::move(before), std::move(after));
  if (bos_id >= 0 && static_cast<size_t>(bos_id) < pieces.size()) tk->bos = pieces[bos_id];
  if (eos_id >= 0 && static_cast<size_t>(eos_id) < pieces.size()) tk->eos = pieces[eos_id];
  tk->n_ids = tk->model->vocab_size();
  tk->finish_added_tokens();
  return tk;
}

}  // namespace kiln::tok
