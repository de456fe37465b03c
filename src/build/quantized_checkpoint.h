// Checkpoints quantized as published (build/checkpoint.h reads them through these): the
// quantization_config (and ModelOpt's hf_quant_config.json) each scheme writes, and the plans
// that repack AWQ / GPTQ int4 modules and keep FP8 weights' codes for kiln's engine layout.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "build/checkpoint.h"

namespace kiln {

// Sets ck.quant (and quant_group, gptq, ct_format, fp8_block) from config.json's
// quantization_config: AWQ (GEMM packing), GPTQ (act-order too) and compressed-tensors W4A16 as
// int4-wo; compressed-tensors W8A16 as int8-wo; FP8 with per-tensor or per-channel weight scales
// (compressed-tensors float-quantized, ModelOpt, fbgemm_fp8, fp8 without blocks) as fp8;
// block-wise fp8 as float weights (dequantized as they load). Any other scheme or variant throws
// kiln::Error naming file and field. `file` names config.json.
void parse_quantization_config(const nlohmann::json& q, const std::string& file, Checkpoint& ck);
// The same for ModelOpt's hf_quant_config.json (FP8 only).
void parse_hf_quant_config(const std::filesystem::path& file, Checkpoint& ck);

// Word i of an I32 tensor (mapped data may be unaligned).
uint32_t read_u32(const Tensor& t, int64_t i);
// The scale tensor of an FP8 weight: "<module>.weight_scale".
std::string fp8_scale_name(const std::string& weight);

// An engine int4-wo weight (codes, scales, zeros) from AWQ, GPTQ or compressed-tensors
// pack-quantized modules (names without the ".qweight" / ".weight_packed" suffix) fused along the
// output rows, repacked as it streams.
WeightPlan plan_int4_packed(const std::shared_ptr<WeightSet>& wset, const std::string& name,
                            const std::vector<std::string>& modules, const Checkpoint& ck);
// An engine int8-wo weight (I8 codes, per-row scales) from compressed-tensors 8-bit modules
// (pack-quantized or int-quantized, per channel, symmetric) fused along the output rows.
WeightPlan plan_int8_ct(const std::shared_ptr<WeightSet>& wset, const std::string& name,
                        const std::vector<std::string>& modules, const Checkpoint& ck);
// An engine fp8 weight (E4M3 codes, per-row scales) from FP8 checkpoint weights fused along the
// output rows: the codes as published, each part's weight_scale repeated over its rows (per
// tensor) or taken row by row (per channel).
WeightPlan plan_fp8(const std::shared_ptr<WeightSet>& wset, const std::string& name,
                    const std::vector<std::string>& weights);

}  // namespace kiln
