#include "tokenizer/gguf_tokenizer.h"

#include <cstring>
#include <fstream>
#include <set>

#include "core/error.h"
#include "tokenizer/tokenizer_impl.h"

namespace kiln {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// llama.cpp's pre-tokenizers for byte-level BPE vocabularies (llama-vocab.cpp,
// llm_tokenizer_bpe): the regexes it splits with, in order, each split keeping matches and the
// text between them. Where llama.cpp adapted a Hugging Face regex for its own engine, the
// original is used (kiln's PCRE2 runs it; they split alike).
struct PreTokenizer {
  std::vector<const char*> names;
  std::vector<const char*> regexes;
  bool add_bos = false;  // llama.cpp's default when the file has no add_bos_token
  bool ignore_merges = false;
};
const std::vector<PreTokenizer>& pre_tokenizers() {
  static const std::vector<PreTokenizer> t = {
      {{"llama3", "llama-v3", "llama-bpe", "falcon3"},
       {"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
        "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
       true,
       true},
      {{"gpt-2", "phi-2", "mpt", "olmo"},
       {"'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"}},
      {{"smollm", "starcoder", "refact", "command-r", "codeshell"},
       {"\\p{N}", "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"}},
      {{"qwen2", "deepseek-r1-qwen", "stablelm2"},
       {"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
        "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}},
      {{"gpt-4o", "llama4"},
       {"[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+("
        "?i:'"
        "s|'t|'re|'ve|'m|'ll|'d)?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{"
        "Ll}"
        "\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\\p{N}{1,3}| "
        "?[^\\s\\p{L}\\p{N}]+[\\r\\n/"
        "]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}},
  };
  return t;
}

// Token texts llama.cpp treats as end of generation whatever their type (llama-vocab.cpp).
constexpr const char* kEogTexts[] = {"<|eot_id|>",
                                     "<|im_end|>",
                                     "<|end|>",
                                     "<|return|>",
                                     "<|call|>",
                                     "<|flush|>",
                                     "<|calls|>",
                                     "<end_of_turn>",
                                     "<|endoftext|>",
                                     "</s>",
                                     "<|eom_id|>",
                                     "<EOT>",
                                     "_<EOT>",
                                     "[EOT]",
                                     "[EOS]",
                                     "<|end_of_text|>",
                                     "<end_of_utterance>",
                                     "<eos>",
                                     "<turn|>",
                                     "<|tool_response>",
                                     "<\uff5cend\u2581of\u2581sentence\uff5c>"};

// Protobuf encoding, for tokenizer.model.
void varint(std::string& o, uint64_t v) {
  while (v >= 0x80) {
    o.push_back(char(uint8_t(v) | 0x80));
    v >>= 7;
  }
  o.push_back(char(v));
}
void tag(std::string& o, uint32_t field, uint32_t wire) {
  varint(o, (uint64_t(field) << 3) | wire);
}
void bytes_field(std::string& o, uint32_t field, std::string_view b) {
  tag(o, field, 2);
  varint(o, b.size());
  o.append(b);
}
void int_field(std::string& o, uint32_t field, int64_t v) {  // int32 fields: -1 as 10 bytes
  tag(o, field, 0);
  varint(o, uint64_t(v));
}

void write_file(const fs::path& p, const std::string& data) {
  std::ofstream out(p, std::ios::binary);
  out.write(data.data(), std::streamsize(data.size()));
  KILN_CHECK(out.good(), p.string(), ": cannot write");
}

}  // namespace

GgufTokenizer write_gguf_tokenizer(const json& meta, const fs::path& dir,
                                   const std::string& where) {
  const auto get = [&](const char* k) -> const json* {
    auto it = meta.find(k);
    return it == meta.end() ? nullptr : &*it;
  };
  const auto str = [&](const char* k) {
    const json* v = get(k);
    return v && v->is_string() ? v->get<std::string>() : std::string();
  };
  GgufTokenizer r;
  r.model = str("tokenizer.ggml.model");
  KILN_CHECK(!r.model.empty(), where, ": no tokenizer (metadata tokenizer.ggml.model is missing)");
  KILN_CHECK(r.model == "llama" || r.model == "gpt2", where, ": tokenizer.ggml.model '",
             r.model.substr(0, 32),
             "' is not supported yet (kiln reads llama (SentencePiece) and gpt2 (byte-level BPE) "
             "vocabularies)");
  const json* tokens = get("tokenizer.ggml.tokens");
  KILN_CHECK(tokens && tokens->is_array() && !tokens->empty(), where,
             ": tokenizer.ggml.tokens must be a non-empty array of strings");
  const size_t n = tokens->size();
  r.vocab_size = int64_t(n);
  std::vector<std::string> text(n);
  for (size_t i = 0; i < n; ++i) {
    KILN_CHECK((*tokens)[i].is_string(), where, ": tokenizer.ggml.tokens[", i, "] is not a string");
    text[i] = (*tokens)[i].get<std::string>();
  }
  std::vector<int> type(n, tok::kSpmNormal);
  if (const json* t = get("tokenizer.ggml.token_type")) {
    KILN_CHECK(t->is_array() && t->size() == n, where,
               ": tokenizer.ggml.token_type must be an array of ", n, " integers");
    for (size_t i = 0; i < n; ++i) {
      KILN_CHECK((*t)[i].is_number_integer() && (*t)[i].get<int64_t>() >= 0 &&
                     (*t)[i].get<int64_t>() <= tok::kSpmByte,
                 where, ": tokenizer.ggml.token_type[", i, "] is not a token type (0..6)");
      type[i] = (*t)[i].get<int>();
    }
  }
  const auto id_of = [&](const char* k, int64_t def) -> int32_t {
    const json* v = get(k);
    if (!v) return int32_t(def);
    KILN_CHECK(v->is_number_integer(), where, ": ", k, " is not an integer");
    const int64_t id = v->get<int64_t>();
    // llama.cpp writes -1 (as uint32 0xffffffff) for "none".
    if (id < 0 || id == 0xffffffffLL) return -1;
    KILN_CHECK(id < int64_t(n), where, ": ", k, " = ", id, " is beyond the ", n, " tokens");
    return int32_t(id);
  };
  const auto flag = [&](const char* k, bool def) {
    const json* v = get(k);
    if (!v) return def;
    KILN_CHECK(v->is_boolean(), where, ": ", k, " is not a boolean");
    return v->get<bool>();
  };
  const bool spm = r.model == "llama";
  r.bos_id = id_of("tokenizer.ggml.bos_token_id", spm ? 1 : -1);
  const int32_t eos = id_of("tokenizer.ggml.eos_token_id", spm ? 2 : -1),
                unk = id_of("tokenizer.ggml.unknown_token_id", spm ? 0 : -1),
                pad = id_of("tokenizer.ggml.padding_token_id", -1);
  const PreTokenizer* pre = nullptr;
  if (!spm) {
    r.pre = str("tokenizer.ggml.pre");
    std::string known;
    for (const auto& p : pre_tokenizers())
      for (const char* name : p.names) {
        if (r.pre == name) pre = &p;
        known += cat(known.empty() ? "" : ", ", name);
      }
    KILN_CHECK(pre, where, ": tokenizer.ggml.pre '", r.pre.substr(0, 32),
               "' is a pre-tokenizer kiln does not know (known: ", known, ")");
  }
  r.add_bos = flag("tokenizer.ggml.add_bos_token", spm || pre->add_bos) && r.bos_id >= 0;
  const bool add_eos = flag("tokenizer.ggml.add_eos_token", false) && eos >= 0;

  // End of generation, as llama.cpp collects it.
  std::set<int32_t> eog;
  for (int32_t id :
       {eos, id_of("tokenizer.ggml.eot_token_id", -1), id_of("tokenizer.ggml.eom_token_id", -1)})
    if (id >= 0) eog.insert(id);
  for (size_t i = 0; i < n; ++i)
    for (const char* t : kEogTexts)
      if (text[i] == t) eog.insert(int32_t(i));
  r.eog_ids.assign(eog.begin(), eog.end());

  // Texts that become added tokens and special-token strings are matched in (or written as)
  // text: they must be valid UTF-8, as in any tokenizer.json.
  const auto check_utf8 = [&](size_t i, const char* what) {
    KILN_CHECK(tok::find_invalid_utf8(text[i]) == std::string::npos, where,
               ": tokenizer.ggml.tokens[", i, "] (", what, ") is not valid UTF-8");
  };
  json config = {{"add_bos_token", r.add_bos}, {"add_eos_token", add_eos}};
  for (const auto& [key, id] : {std::pair{"bos_token", r.bos_id}, std::pair{"eos_token", eos},
                                std::pair{"unk_token", unk}, std::pair{"pad_token", pad}})
    if (id >= 0) {
      check_utf8(size_t(id), key);
      config[key] = text[size_t(id)];
    }
  if (const json* t = get("tokenizer.chat_template")) {
    KILN_CHECK(t->is_string(), where, ": tokenizer.chat_template is not a string");
    KILN_CHECK(tok::find_invalid_utf8(t->get_ref<const std::string&>()) == std::string::npos, where,
               ": tokenizer.chat_template is not valid UTF-8");
    config["chat_template"] = *t;
  }

  if (spm) {
    // A SentencePiece BPE model: llama.cpp's SPM tokenizer merges the adjacent pair whose joint
    // piece scores highest, which is SentencePiece's BPE; pieces the vocab lacks fall back to
    // <0xXX> byte pieces when there are any.
    std::vector<float> score(n, 0.0f);
    if (const json* s = get("tokenizer.ggml.scores")) {
      KILN_CHECK(s->is_array() && s->size() == n, where,
                 ": tokenizer.ggml.scores must be an array of ", n, " numbers");
      for (size_t i = 0; i < n; ++i) {
        KILN_CHECK((*s)[i].is_number(), where, ": tokenizer.ggml.scores[", i, "] is not a number");
        score[i] = (*s)[i].get<float>();
      }
    }
    KILN_CHECK(unk >= 0, where, ": a SentencePiece vocab needs tokenizer.ggml.unknown_token_id");
    bool byte_fallback = false;
    std::string model;
    for (size_t i = 0; i < n; ++i) {
      if (type[i] == tok::kSpmControl || type[i] == tok::kSpmUnknown ||
          type[i] == tok::kSpmUserDefined)
        check_utf8(i, "a special piece");
      byte_fallback = byte_fallback || type[i] == tok::kSpmByte;
      std::string piece;
      bytes_field(piece, 1, text[i]);
      tag(piece, 2, 5);
      uint32_t bits;
      std::memcpy(&bits, &score[i], 4);
      for (int b = 0; b < 4; ++b) piece.push_back(char(uint8_t(bits >> (8 * b))));
      // Type 0 (undefined in llama.cpp's older files) is a normal piece.
      int_field(piece, 3, type[i] == 0 ? tok::kSpmNormal : type[i]);
      bytes_field(model, 1, piece);
    }
    std::string trainer;
    int_field(trainer, 3, 2);  // model_type BPE
    int_field(trainer, 35, byte_fallback);
    int_field(trainer, 40, unk);
    int_field(trainer, 41, r.bos_id);
    int_field(trainer, 42, eos);
    int_field(trainer, 43, pad);
    bytes_field(model, 2, trainer);
    std::string norm;
    bytes_field(norm, 1, "identity");
    int_field(norm, 3, flag("tokenizer.ggml.add_space_prefix", true));
    int_field(norm, 4, flag("tokenizer.ggml.remove_extra_whitespaces", false));
    int_field(norm, 5, 1);  // spaces become U+2581
    bytes_field(model, 3, norm);
    write_file(dir / "tokenizer.model", model);
  } else {
    const json* merges = get("tokenizer.ggml.merges");
    KILN_CHECK(merges && merges->is_array(), where,
               ": a gpt2 vocab needs tokenizer.ggml.merges (an array of strings)");
    json vocab = json::object(), added = json::array();
    for (size_t i = 0; i < n; ++i) {
      check_utf8(i, "a byte-level token");
      vocab[text[i]] = int64_t(i);
      if (type[i] == tok::kSpmControl || type[i] == tok::kSpmUserDefined ||
          type[i] == tok::kSpmUnknown)
        added.push_back({{"id", int64_t(i)},
                         {"content", text[i]},
                         {"single_word", false},
                         {"lstrip", false},
                         {"rstrip", false},
                         {"normalized", false},
                         {"special", type[i] != tok::kSpmUserDefined}});
    }
    json ms = json::array();
    for (size_t i = 0; i < merges->size(); ++i) {
      const json& m = (*merges)[i];
      KILN_CHECK(m.is_string() && m.get_ref<const std::string&>().find(' ') != std::string::npos,
                 where, ": tokenizer.ggml.merges[", i, "] is not a string \"left right\"");
      KILN_CHECK(tok::find_invalid_utf8(m.get_ref<const std::string&>()) == std::string::npos,
                 where, ": tokenizer.ggml.merges[", i, "] is not valid UTF-8");
      ms.push_back(m);
    }
    const json byte_level = {{"type", "ByteLevel"},
                             {"add_prefix_space", false},
                             {"trim_offsets", true},
                             {"use_regex", false}};
    json splits = json::array();
    for (const char* re : pre->regexes)
      splits.push_back({{"type", "Split"},
                        {"pattern", {{"Regex", re}}},
                        {"behavior", "Isolated"},
                        {"invert", false}});
    splits.push_back(byte_level);
    json post = byte_level;
    if (r.add_bos || add_eos) {
      const auto special_token = [&](int32_t id) {
        return json{{"SpecialToken", {{"id", text[size_t(id)]}, {"type_id", 0}}}};
      };
      json single = json::array(), special = json::object();
      if (r.add_bos) single.push_back(special_token(r.bos_id));
      single.push_back({{"Sequence", {{"id", "A"}, {"type_id", 0}}}});
      if (add_eos) single.push_back(special_token(eos));
      for (const auto& [on, id] : {std::pair{r.add_bos, r.bos_id}, std::pair{add_eos, eos}})
        if (on)
          special[text[size_t(id)]] = {
              {"id", text[size_t(id)]}, {"ids", {id}}, {"tokens", {text[size_t(id)]}}};
      json pair = single;
      pair.push_back({{"Sequence", {{"id", "B"}, {"type_id", 1}}}});
      post = {{"type", "TemplateProcessing"},
              {"single", single},
              {"pair", pair},
              {"special_tokens", special}};
    }
    const json tj = {{"version", "1.0"},
                     {"truncation", nullptr},
                     {"padding", nullptr},
                     {"added_tokens", added},
                     {"normalizer", nullptr},
                     {"pre_tokenizer", {{"type", "Sequence"}, {"pretokenizers", splits}}},
                     {"post_processor", post},
                     {"decoder", byte_level},
                     {"model",
                      {{"type", "BPE"},
                       {"dropout", nullptr},
                       {"unk_token", nullptr},
                       {"continuing_subword_prefix", nullptr},
                       {"end_of_word_suffix", nullptr},
                       {"fuse_unk", false},
                       {"byte_fallback", false},
                       {"ignore_merges", pre->ignore_merges},
                       {"vocab", vocab},
                       {"merges", ms}}}};
    write_file(dir / "tokenizer.json", tj.dump());
  }
  write_file(dir / "tokenizer_config.json", config.dump(2));
  return r;
}

}  // namespace kiln
