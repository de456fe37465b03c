# End-to-end lm-evaluation-harness run against `kiln serve` (tests/lm_eval_e2e.py): the real
# `lm_eval --model local-completions` CLI on a tiny local multiple-choice task
# (tests/lm_eval/), demo model on the CPU. Runs with the project's test virtualenv (.venv from
# tests/requirements.txt, which pins lm-eval), looked up when the test runs; like TokenizerDiff it
# fails with instructions when the venv is missing.
add_test(NAME LmEvalE2E
  COMMAND sh -c "if [ -x \"$0\" ]; then exec \"$0\" \"$1\" --kiln \"$2\" --model \"$3\"; else echo \"LmEvalE2E: $0 not found; create it with: python3 -m venv .venv && .venv/bin/pip install -r tests/requirements.txt\" >&2; exit 1; fi"
          "${PROJECT_SOURCE_DIR}/.venv/bin/python" "${CMAKE_CURRENT_SOURCE_DIR}/lm_eval_e2e.py"
          "$<TARGET_FILE:kiln>" "${PROJECT_SOURCE_DIR}/models/demo")
set_tests_properties(LmEvalE2E PROPERTIES TIMEOUT 600)
