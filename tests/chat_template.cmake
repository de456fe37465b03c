# Differential test of kiln's chat-template renderer against jinja2 configured like transformers
# (tests/chat_template_diff.py drives the ChatTemplateDiff.RenderCases case of kiln_tests). It runs
# with the project's test virtualenv (.venv from tests/requirements.txt), looked up when the test
# runs; like TokenizerDiff it fails with instructions when the venv is missing.
add_test(NAME ChatTemplateDiff
  COMMAND sh -c "if [ -x \"$0\" ]; then exec \"$0\" \"$1\" --kiln-tests \"$2\"; else echo \"ChatTemplateDiff: $0 not found; create it with: python3 -m venv .venv && .venv/bin/pip install -r tests/requirements.txt\" >&2; exit 1; fi"
          "${PROJECT_SOURCE_DIR}/.venv/bin/python" "${CMAKE_CURRENT_SOURCE_DIR}/chat_template_diff.py"
          "$<TARGET_FILE:kiln_tests>")
set_tests_properties(ChatTemplateDiff PROPERTIES TIMEOUT 300)
