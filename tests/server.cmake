# End-to-end test of `kiln serve` (tests/server_test.py): the official `openai` client and raw
# HTTP against servers started on free loopback ports with the demo model on the CPU. Runs with
# the project's test virtualenv (.venv from tests/requirements.txt), looked up when the test
# runs; like TokenizerDiff it fails with instructions when the venv is missing.
add_test(NAME ServerE2E
  COMMAND sh -c "if [ -x \"$0\" ]; then exec \"$0\" \"$1\" --kiln \"$2\" --model \"$3\" -v; else echo \"ServerE2E: $0 not found; create it with: python3 -m venv .venv && .venv/bin/pip install -r tests/requirements.txt\" >&2; exit 1; fi"
          "${PROJECT_SOURCE_DIR}/.venv/bin/python" "${CMAKE_CURRENT_SOURCE_DIR}/server_test.py"
          "$<TARGET_FILE:kiln>" "${PROJECT_SOURCE_DIR}/models/demo")
set_tests_properties(ServerE2E PROPERTIES TIMEOUT 400)
