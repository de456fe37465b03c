// Calibration for `--quant int4-awq`: runs text through the float model on the CPU, watching
// every linear's input (make_cpu_backend's observer), and picks each weight's AWQ input scale
// (build/awq.h). kiln calibrates itself: no other framework, and the same decoder that serves.
#pragma once

#include <filesystem>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "build/awq.h"
#include "build/checkpoint.h"
#include "graph/backend.h"

namespace kiln {

// The text calibrated on when no --calib file is given: a few thousand characters of prose,
// dialogue, code, numbers and lists (written for kiln; free of any licence).
extern const char* const kDefaultCalibText;

// Logits [tokens, vocab] of one sequence through the shared decoder on the CPU over host weights
// in engine layout (quantized weights carry their scales), calling `observe` at every linear.
std::vector<float> cpu_forward(const ModelConfig& c,
                               const std::vector<std::pair<std::string, Tensor>>& weights,
                               std::span<const int32_t> tokens, LinearObserver observe = {});

struct AwqCalibration {
  AwqScales scales;
  int64_t tokens = 0;           // calibration tokens run through the model
  double err = 0, err_rtn = 0;  // summed squared output errors of the sample, AWQ and plain int4
  int64_t scaled = 0;           // weights whose best alpha is not 0
};
// Tokenizes `text` with the model's tokenizer (the files in `tokenizer_dir`: the checkpoint's
// folder, or where a GGUF file's tokenizer was written; at most `max_tokens` tokens, in chunks
// the model's context allows), runs it through the checkpoint's weights in `dtype` and searches
// every awq_weights() scale. Throws kiln::Error naming what is missing (a tokenizer, enough text).
AwqCalibration calibrate_awq(const Checkpoint& ck, const std::filesystem::path& tokenizer_dir,
                             DType dtype, const std::string& text, const std::string& text_name,
                             int64_t max_tokens = 512);

}  // namespace kiln
