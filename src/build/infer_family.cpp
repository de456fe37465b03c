#include "build/infer_family.h"

#include <algorithm>
#include <optional>
#include <set>

#include "arch/registry.h"
#include "core/error.h"

namespace kiln {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// Config keys that do not change what a decoder computes (training settings, token ids, labels,
// generation defaults of old configs): an unregistered architecture may carry them.
const std::set<std::string> kInertKeys = {"architectures",
                                          "model_type",
                                          "transformers_version",
                                          "torch_dtype",
                                          "dtype",
                                          "use_cache",
                                          "initializer_range",
                                          "initializer_factor",
                                          "attention_dropout",
                                          "hidden_dropout",
                                          "dropout",
                                          "embd_pdrop",
                                          "resid_pdrop",
                                          "attn_pdrop",
                                          "embedding_dropout",
                                          "residual_dropout",
                                          "classifier_dropout",
                                          "attention_probs_dropout_prob",
                                          "hidden_dropout_prob",
                                          "pad_token_id",
                                          "bos_token_id",
                                          "eos_token_id",
                                          "sep_token_id",
                                          "decoder_start_token_id",
                                          "output_attentions",
                                          "output_hidden_states",
                                          "return_dict",
                                          "use_return_dict",
                                          "is_encoder_decoder",
                                          "is_decoder",
                                          "add_cross_attention",
                                          "_name_or_path",
                                          "id2label",
                                          "label2id",
                                          "problem_type",
                                          "tokenizer_class",
                                          "prefix",
                                          "task_specific_params",
                                          "finetuning_task",
                                          "pretraining_tp",
                                          "router_aux_loss_coef",
                                          "output_router_logits",
                                          "router_jitter_noise",
                                          "chunk_size_feed_forward",
                                          "torchscript",
                                          "pruned_heads",
                                          "tf_legacy_loss",
                                          "use_bfloat16",
                                          "tie_encoder_decoder",
                                          "cross_attention_hidden_size",
                                          "max_length",
                                          "min_length",
                                          "do_sample",
                                          "early_stopping",
                                          "num_beams",
                                          "num_beam_groups",
                                          "temperature",
                                          "top_k",
                                          "top_p",
                                          "typical_p",
                                          "repetition_penalty",
                                          "length_penalty",
                                          "no_repeat_ngram_size",
                                          "encoder_no_repeat_ngram_size",
                                          "bad_words_ids",
                                          "num_return_sequences",
                                          "diversity_penalty",
                                          "forced_bos_token_id",
                                          "forced_eos_token_id",
                                          "remove_invalid_values",
                                          "exponential_decay_length_penalty",
                                          "suppress_tokens",
                                          "begin_suppress_tokens",
                                          "return_dict_in_generate",
                                          "output_scores"};
}  // namespace

Checkpoint infer_family(const json& c, const fs::path& dir, const std::string& f) {
  const std::string arch = c["architectures"][0].get<std::string>();
  WeightSet ws = WeightSet::open_dir(dir);
  std::vector<std::string> matched;
  std::optional<Checkpoint> first;
  std::string closest;
  size_t closest_score = SIZE_MAX;
  for (const ArchSpec* spec : all_arch_specs()) {
    std::set<std::string> used;
    std::vector<std::string> keys;
    std::string why;
    size_t score = 0;
    Checkpoint ck;
    try {
      ck = checkpoint_from_config(c, f, spec, &used);
    } catch (const Error& e) {
      why = e.what();
      score = 1000;
    }
    if (score == 0) {
      for (const auto& [k, v] : c.items())
        if (!used.count(k) && !kInertKeys.count(k)) keys.push_back(k);
      ck.dir = dir;
      ck.weights = ws;
      try {
        (void)plan_weights(ck, DType::F32, WeightQuant::None);
      } catch (const Error& e) {
        why = e.what();
        const std::string prefix = cat(dir.string(), ": ");
        if (why.rfind(prefix, 0) == 0) why = why.substr(prefix.size());
        score = 1 + size_t(std::count(why.begin(), why.end(), ','));
      }
      if (!keys.empty()) {
        why =
            cat("config keys it does not read: ", join_limited(keys), why.empty() ? "" : "; ", why);
        score += keys.size();
      }
    }
    if (score == 0) {
      matched.push_back(spec->name);
      if (!first) first = std::move(ck);
    } else if (score < closest_score) {
      closest_score = score;
      closest = cat(spec->name, " (", why, ")");
    }
  }
  if (!first)
    throw Error(cat(f, ": architecture '", arch,
                    "' is not in kiln's tables and no known family explains this checkpoint; "
                    "closest: ",
                    closest,
                    ". An architecture spec adds it: --arch-spec FILE (docs/architectures.md)"));
  first->inferred = cat(
      arch, " is not in kiln's tables: built as ", matched[0], ", whose tensor names map all ",
      ws.names().size(), " tensors with the shapes it needs and which reads every config key but ",
      "inert ones (dropouts, token ids, labels)",
      matched.size() > 1 ? cat("; also consistent: ", join_limited(std::vector<std::string>(
                                                          matched.begin() + 1, matched.end())))
                         : "");
  return std::move(*first);
}

}  // namespace kiln
