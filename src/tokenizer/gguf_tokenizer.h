// The tokenizer a GGUF file describes in its metadata (tokenizer.ggml.*), written out as the
// Hugging Face files kiln's tokenizer reads, so that an engine built from a GGUF holds ordinary
// tokenizer files:
//   "llama" (llama.cpp's SentencePiece-style vocab: pieces, scores, types, byte fallback): a
//     SentencePiece tokenizer.model of model type BPE, which merges by score as llama.cpp does;
//   "gpt2" (byte-level BPE with merges): a tokenizer.json whose pre-tokenizer is the regex list
//     llama.cpp uses for the file's tokenizer.ggml.pre name (llama-vocab.cpp keeps that table);
// plus tokenizer_config.json (bos/eos/unk strings, add_bos_token/add_eos_token as the file or
// llama.cpp's default for the vocab type says, and tokenizer.chat_template).
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace kiln {

struct GgufTokenizer {
  std::string model;  // "llama" or "gpt2"
  std::string pre;    // tokenizer.ggml.pre ("" for llama)
  int64_t vocab_size = 0;
  int32_t bos_id = -1;
  bool add_bos = false;
  // End-of-generation ids as llama.cpp collects them: eos, eot and eom ids, and every token
  // whose text is one of its end-of-turn markers (<|im_end|>, <end_of_turn>, <|eot_id|>, ...).
  std::vector<int32_t> eog_ids;
};

// Writes the tokenizer files for GGUF metadata `meta` into `dir` (which must exist). `where`
// names the file in errors. Throws kiln::Error for a vocab type or pre-tokenizer kiln does not
// know (naming it and the supported ones) and for malformed arrays.
GgufTokenizer write_gguf_tokenizer(const nlohmann::json& meta, const std::filesystem::path& dir,
                                   const std::string& where);

}  // namespace kiln
