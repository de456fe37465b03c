// libFuzzer target: a SentencePiece tokenizer.model (protobuf) through
// Tokenizer::from_sentencepiece_file, then encode / decode / streaming decode of fixed texts and of
// the model's own pieces. kiln::Error is the expected rejection.
#include <cstdint>
#include <string>
#include <string_view>

#include "core/error.h"
#include "fuzz_util.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer_exercise.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto path = kiln::fuzz::write_file(
      "tokenizer.model", std::string_view(reinterpret_cast<const char*>(data), size));
  try {
    const kiln::Tokenizer tk = kiln::Tokenizer::from_sentencepiece_file(path);
    // Known (fuzz/regressions/tokenizer_spm/normal_piece_invalid_utf8_decodes_raw.model): the
    // loader accepts normal pieces that are not valid UTF-8 and decode() returns their bytes as
    // they are. Until that is settled, decoded text is only required to be valid UTF-8 when every
    // piece is.
    bool pieces_utf8 = true;
    for (size_t i = 0; i < tk.vocab_size() && pieces_utf8; ++i)
      pieces_utf8 = kiln::fuzz::valid_utf8(tk.id_to_token(int32_t(i)));
    static const char* const kTexts[] = {
        "Hello world",
        "  leading  spaces\tand\ttabs\n\nnew lines  ",
        "h\xC3\xA9"
        "llo w\xC3\xB6"
        "rld \xE2\x9C\x93 \xE6\x97\xA5\xE6\x9C\xAC \xF0\x9F\x8E\x89",
        "<s>a</s><unk><pad> <0x41>",
        "\xE2\x96\x81"
        "already"
        "\xE2\x96\x81"
        "escaped",
        "",
        " ",
        "x",
    };
    for (const char* t : kTexts) kiln::fuzz::exercise_tokenizer(tk, t, pieces_utf8);
    // The model's pieces, concatenated (ids past 64 add little but time).
    std::string pieces;
    const size_t n = tk.vocab_size() < 64 ? tk.vocab_size() : 64;
    for (size_t i = 0; i < n; ++i) pieces += tk.id_to_token(int32_t(i)) + (i % 3 ? "" : " ");
    kiln::fuzz::exercise_tokenizer(tk, pieces, pieces_utf8);
  } catch (const kiln::Error&) {
  }
  return 0;
}
