// A Hugging Face model folder opened for building: config resolved through the architecture
// table, weights mapped to canonical names and validated all at once.
#pragma once

#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>

#include "arch/registry.h"
#include "core/quant.h"
#include "core/tensor.h"
#include "graph/layout.h"
#include "io/safetensors.h"

namespace kiln {

struct Checkpoint {
  std::filesystem::path dir;
  const ArchSpec* spec = nullptr;
  // An architecture not in kiln's tables that a known family explains (open_checkpoint): which
  // family it was built as and why; empty otherwise.
  std::string inferred;
  ModelConfig config;
  nlohmann::json generation_defaults = nlohmann::json::object();
  std::string config_dtype;  // "torch_dtype"/"dtype" of config.json, if any
  uint64_t config_hash = 0;
  std::optional<WeightSet> weights;  // absent for dummy-weight builds
  // A checkpoint quantized as published (config.json quantization_config): the scheme its
  // linear weights are stored in (AWQ GEMM packing: int4-wo) and its group size; None for float
  // checkpoints.
  WeightQuant quant = WeightQuant::None;
  int64_t quant_group = 0;
  // int4 packing: AWQ (qweight [in, out / 8], values in the order 0 2 4 6 1 3 5 7) or GPTQ
  // (qweight [in / 8, out], values in order; its v1 format stores each zero point minus 1).
  bool gptq = false;
  int gptq_zero_offset = 0;
  // Act-order int4 (GPTQ desc_act, compressed-tensors actorder "group"): input c of a module is in
  // group g_idx[c] (.g_idx / .weight_g_idx I32 [in]), each group holding exactly quant_group
  // inputs. kiln stores the columns sorted by group with the order as "<weight>.perm"; modules
  // fused into one engine weight (q/k/v, gate/up) must share their g_idx, as they share their
  // input (and GPTQ's Hessian).
  bool act_order = false;
  // compressed-tensors integer weights (int4-wo in groups, or int8-wo per channel, symmetric):
  // "pack-quantized" (<module>.weight_packed I32 [out, in * bits / 32], values in order along the
  // inputs, each stored plus 2^(bits - 1); .weight_scale [out, in / group] or [out, 1];
  // .weight_shape; int4 asymmetric: .weight_zero_point I32 [out / 8, in / group] packed the same
  // way along the outputs) or "int-quantized" (.weight I8 [out, in], .weight_scale [out, 1]).
  // Empty for other checkpoints.
  std::string ct_format;
  bool ct_symmetric = true;
  // Block-wise FP8 (quant_method fp8 with weight_block_size [rows, cols], as DeepSeek-V3 and
  // Qwen3-FP8 publish): E4M3 .weight with .weight_scale_inv [ceil(out / rows), ceil(in / cols)].
  // kiln's kernels take one scale per row, so these weights are dequantized exactly (code *
  // scale in FP32) into the engine dtype, or into F32 for --quant to requantize; quant stays
  // None. {0, 0}: not block-wise.
  int64_t fp8_block[2] = {0, 0};
};

// Reads config.json (+ generation_config.json) from `dir`; `with_weights` also opens the
// safetensors. Throws kiln::Error naming the file and field.
Checkpoint open_checkpoint(const std::filesystem::path& dir, bool with_weights = true);
// The weightless checkpoint a parsed config.json describes; `where` names it in errors.
// `spec`: build as this family whatever architectures[0] says (nullptr: look it up);
// `used_keys`: see resolve_config.
Checkpoint checkpoint_from_config(const nlohmann::json& config, const std::string& where,
                                  const ArchSpec* spec = nullptr,
                                  std::set<std::string>* used_keys = nullptr);
// A weightless checkpoint from a config.json file (for dummy-weight builds).
Checkpoint open_config(const std::filesystem::path& config_json);

// One engine tensor to produce: its name, dtype and shape, and how to make its bytes a range of
// rows at a time, so that a build can stream a tensor of any size through a bounded buffer.
struct PlannedTensor {
  std::string name;
  DType dtype = DType::F32;
  Shape shape;
  // Writes rows [row0, row0 + n) of the tensor (viewed as [rows(), row elements]) into dst.
  std::function<void(int64_t row0, int64_t n, void* dst)> fill;
  // The finished tensor when it already exists as is (a mmapped view of the checkpoint, a held
  // tensor): in-memory builds take it rather than a copy. May be empty.
  std::function<Tensor()> view;
  // Lets go of source pages once the tensor is written (may be empty).
  std::function<void()> release;

  int64_t rows() const { return shape.empty() ? 1 : shape[0]; }
  size_t nbytes() const { return size_t(kiln::numel(shape)) * dtype_size(dtype); }
  size_t row_bytes() const { return rows() ? nbytes() / size_t(rows()) : 0; }
};
using WeightPlan = std::vector<PlannedTensor>;

// Maps the checkpoint's tensors onto engine_layout(config): renames, transposes, fuses QKV and
// gate/up, converts matrices to `dtype` and vectors to F32. Every missing, unexpected or
// mis-shaped weight is reported in one kiln::Error, before any tensor is converted. Under a
// quantization scheme q, the plan is that of engine_layout(config, q): the weights q rewrites
// are quantized from the source values as they stream, each followed by its scales. A
// quantized checkpoint (ck.quant) gives the plan of engine_layout(config, ck.quant,
// ck.quant_group), its codes, scales and zeros repacked as they stream (q must be None or
// ck.quant: kiln does not requantize).
// `awq_scales`: input scales of an int4 build (build/awq.h), applied and folded before quantizing.
WeightPlan plan_weights(const Checkpoint& ck, DType dtype, const QuantScheme& q = {},
                        const std::map<std::string, std::vector<float>>* awq_scales = nullptr);

// Seeded random weights in engine layout (matrices ~ U with std 0.02, norm weights ~ 1 + U/10);
// any row range can be made on its own and gives the same bytes.
WeightPlan plan_dummy_weights(const ModelConfig& c, DType dtype, uint64_t seed,
                              const QuantScheme& q = {});

// Tensors already in memory, as a plan (for writing them); a quantized tensor's scales follow it
// as "<name>.scale".
WeightPlan plan_held(const std::vector<std::pair<std::string, Tensor>>& tensors);

// Every planned tensor in memory (those with a view without a copy).
std::vector<std::pair<std::string, Tensor>> materialize(const WeightPlan& plan);

}  // namespace kiln
