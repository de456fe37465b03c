// Exercises a loaded tokenizer (shared by fuzz_tokenizer_json.cpp and fuzz_tokenizer_spm.cpp).
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "core/error.h"
#include "fuzz_util.h"
#include "tokenizer/tokenizer.h"

namespace kiln::fuzz {

inline bool valid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    const size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    for (size_t k = 1; k < n; ++k)
      if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
    i += n;
  }
  return true;
}

// Encodes `text` (with and without special tokens), decodes the ids back (also streamed), and
// decodes arbitrary ids made from the text's bytes. Only kiln::Error from encode (invalid UTF-8)
// is expected. `check_utf8`: decoded text must be valid UTF-8.
inline void exercise_tokenizer(const kiln::Tokenizer& tk, std::string_view text,
                               bool check_utf8 = true) {
  const size_t vocab = tk.vocab_size();
  for (bool special : {false, true}) {
    std::vector<int32_t> ids;
    try {
      ids = tk.encode(text, special);
    } catch (const kiln::Error&) {
      continue;  // invalid UTF-8 text
    }
    // Every id encode() gives is below vocab_size() (fuzz/regressions/tokenizer_json/
    // bpe_sparse_ids_vocab_size.json: a BPE vocab with gaps once made it the entry count).
    for (int32_t id : ids) KILN_FUZZ_ASSERT(id >= 0 && size_t(id) < vocab);
    for (bool skip : {false, true}) {
      const std::string back = tk.decode(ids, skip);
      if (check_utf8) KILN_FUZZ_ASSERT(valid_utf8(back));
      kiln::StreamDecoder sd(tk, skip);
      std::string streamed;
      for (int32_t id : ids) streamed += sd.push(id);
      streamed += sd.flush();
    }
    for (int32_t id : ids) {
      const std::string t = tk.id_to_token(id);
      (void)tk.token_to_id(t);
      (void)tk.is_special(id);
    }
  }
  // Arbitrary ids (negative, past the vocabulary, 32-bit extremes) from the text's bytes.
  std::vector<int32_t> raw(text.size() / 4);
  if (!raw.empty()) std::memcpy(raw.data(), text.data(), raw.size() * 4);
  for (int32_t& id : raw)
    if (id > 0 && size_t(id) >= vocab && (id & 1)) id = int32_t(size_t(id) % (vocab + 4));
  for (bool skip : {false, true}) {
    (void)tk.decode(raw, skip);
    kiln::StreamDecoder sd(tk, skip);
    for (int32_t id : raw) (void)sd.push(id);
    (void)sd.flush();
  }
  for (int32_t id : raw) (void)tk.id_to_token(id);
  (void)tk.token_to_id(text);
  (void)tk.bos_token(), (void)tk.eos_token(), (void)tk.bos_token_id(), (void)tk.eos_token_id();
}

}  // namespace kiln::fuzz
