// A GGUF file (llama.cpp's format) opened as a checkpoint. Its metadata becomes the config.json a
// Hugging Face folder of the same model would hold, its tensors are presented under Hugging Face
// names with llama.cpp's conversions undone, and its tokenizer is written out as Hugging Face
// files (tokenizer/gguf_tokenizer.h). From there the build is the same as a folder's.
//
// llama.cpp's conventions (convert_hf_to_gguf.py), undone here:
//   - dimensions are stored innermost first (ne[0]): a weight [out, in] has ne = {in, out};
//   - llama-type models (general.architecture "llama") store the Q and K rows of each head in
//     interleaved rotary order: HF row (h, i, j) (half i of head h, pair j) is GGUF row (h, j, i);
//   - Gemma norms are stored as 1 + w (HF keeps w and adds 1 as it runs);
//   - values the file does not store are llama.cpp's own constants (Gemma 3's sliding-window
//     layer period 6 and local rope base 10000; Gemma 2/3's attention scale 1/sqrt(head_dim),
//     or 1/sqrt(hidden / heads) for the 27B models, which llama.cpp recognises by layer count).
// Tensors kiln has no kernel for in their GGUF type are dequantized exactly as ggml does
// (io/gguf.h) and converted to the engine dtype; GgufSummary says which.
#pragma once

#include <filesystem>
#include <memory>
#include <string>

#include "build/checkpoint.h"

namespace kiln {

struct GgufSummary {
  std::string architecture;  // general.architecture
  std::string types;         // e.g. "Q4_1 x210, Q8_0 x1 dequantized; F32 x61 as stored"
};

// Opens `file` as a checkpoint; its tokenizer files are written into `tokenizer_dir` (which must
// exist). Throws kiln::Error naming the file and the key or tensor for an architecture kiln does
// not map, a missing or unexpected tensor (all listed at once), or bad metadata.
Checkpoint open_gguf_checkpoint(const std::filesystem::path& file,
                                const std::filesystem::path& tokenizer_dir,
                                GgufSummary* summary = nullptr);

}  // namespace kiln
