// Request-level pieces of kiln/serving.h that need no engine: finish reason names and the
// validation of GenerationParams (shared by the scheduler, the server and the CLI).
#include <cmath>

#include "core/error.h"
#include "kiln/serving.h"

namespace kiln {

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::Stop:
      return "stop";
    case FinishReason::Length:
      return "length";
    case FinishReason::Abort:
      return "abort";
    case FinishReason::None:
      break;
  }
  return "";
}

void GenerationParams::validate(int64_t V) const {
  auto finite = [](float x) { return std::isfinite(x); };
  if (temperature)
    KILN_CHECK(finite(*temperature) && *temperature >= 0, "temperature must be >= 0 (got ",
               *temperature, ")");
  if (top_p)
    KILN_CHECK(finite(*top_p) && *top_p > 0 && *top_p <= 1, "top_p must be in (0, 1] (got ", *top_p,
               ")");
  if (top_k)
    KILN_CHECK(*top_k >= -1, "top_k must be -1 (off), 0 (off) or positive (got ", *top_k, ")");
  if (min_p)
    KILN_CHECK(finite(*min_p) && *min_p >= 0 && *min_p <= 1, "min_p must be in [0, 1] (got ",
               *min_p, ")");
  KILN_CHECK(finite(presence_penalty) && presence_penalty >= -2 && presence_penalty <= 2,
             "presence_penalty must be in [-2, 2] (got ", presence_penalty, ")");
  KILN_CHECK(finite(frequency_penalty) && frequency_penalty >= -2 && frequency_penalty <= 2,
             "frequency_penalty must be in [-2, 2] (got ", frequency_penalty, ")");
  if (repetition_penalty)
    KILN_CHECK(finite(*repetition_penalty) && *repetition_penalty > 0 && *repetition_penalty <= 100,
               "repetition_penalty must be in (0, 100] (got ", *repetition_penalty, ")");
  KILN_CHECK(logit_bias.size() <= 1024, "logit_bias has ", logit_bias.size(),
             " entries (at most 1024)");
  for (const auto& [id, b] : logit_bias) {
    KILN_CHECK(id >= 0 && id < V, "logit_bias: token id ", id, " is outside the vocabulary [0, ", V,
               ")");
    KILN_CHECK(finite(b) && b >= -100 && b <= 100, "logit_bias: bias ", b, " of token ", id,
               " must be in [-100, 100]");
  }
  KILN_CHECK(stop.size() <= 16, "stop: at most 16 stop strings (got ", stop.size(), ")");
  for (const auto& s : stop)
    KILN_CHECK(!s.empty() && s.size() <= 256, "stop: stop strings must be 1 to 256 bytes long");
  KILN_CHECK(stop_token_ids.size() <= 256, "stop_token_ids: at most 256 ids");
  for (int32_t id : stop_token_ids)
    KILN_CHECK(id >= 0 && id < V, "stop_token_ids: token id ", id,
               " is outside the vocabulary [0, ", V, ")");
  KILN_CHECK(min_tokens >= 0, "min_tokens must be >= 0 (got ", min_tokens, ")");
  if (max_tokens) {
    KILN_CHECK(*max_tokens >= 0, "max_tokens must be >= 0 (got ", *max_tokens, ")");
    KILN_CHECK(min_tokens <= *max_tokens, "min_tokens (", min_tokens,
               ") must not exceed max_tokens (", *max_tokens, ")");
  }
  KILN_CHECK(n >= 1 && n <= 128, "n must be between 1 and 128 (got ", n, ")");
  if (logprobs)
    KILN_CHECK(*logprobs >= 0 && *logprobs <= 20, "logprobs must be between 0 and 20 (got ",
               *logprobs, ")");
  if (prompt_logprobs)
    KILN_CHECK(*prompt_logprobs >= 0 && *prompt_logprobs <= 20,
               "prompt_logprobs must be between 0 and 20 (got ", *prompt_logprobs, ")");
}

}  // namespace kiln
