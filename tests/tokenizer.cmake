# Differential test of kiln's tokenizer against Hugging Face `tokenizers` (tests/tokenizer_diff.py),
# run with the project's test virtualenv (.venv, created from tests/requirements.txt). The venv is
# looked up when the test runs, so creating it after configuring works; without it the test fails
# with a message saying how to create it (it never skips).
set(KILN_TEST_PYTHON "${PROJECT_SOURCE_DIR}/.venv/bin/python")
add_test(NAME TokenizerDiff
  COMMAND sh -c "if [ -x \"$0\" ]; then exec \"$0\" \"$1\" --kiln \"$2\"; else echo \"TokenizerDiff: $0 not found; create it with: python3 -m venv .venv && .venv/bin/pip install -r tests/requirements.txt\" >&2; exit 1; fi"
          "${KILN_TEST_PYTHON}" "${CMAKE_CURRENT_SOURCE_DIR}/tokenizer_diff.py" "$<TARGET_FILE:kiln>")
set_tests_properties(TokenizerDiff PROPERTIES TIMEOUT 300 ENVIRONMENT "TOKENIZERS_PARALLELISM=true")
