# `kiln bench offline` / `kiln bench serve` on the demo model (tests/bench_serving_test.py): exact
# counts and self-consistent vLLM-style metrics in their JSON, the serve case against a `kiln
# serve` the script starts on a free loopback port. Standard library only: runs with python3.
find_package(Python3 REQUIRED COMPONENTS Interpreter)
add_test(NAME BenchServing
  COMMAND "${Python3_EXECUTABLE}" "${CMAKE_CURRENT_SOURCE_DIR}/bench_serving_test.py"
          --kiln "$<TARGET_FILE:kiln>" --model "${PROJECT_SOURCE_DIR}/models/demo" -v)
set_tests_properties(BenchServing PROPERTIES TIMEOUT 600)
