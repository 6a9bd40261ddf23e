# Turns a text file into a C++ source defining `std::string_view NAME()`, so data the binary
# needs (the tokenizer corpus, the ERNIE chat template) travels inside it.
# Usage: cmake -DINPUT=... -DOUTPUT=... -DNAME=... -P embed.cmake
file(READ "${INPUT}" content HEX)
string(LENGTH "${content}" n)
set(bytes "")
if(n GREATER 0)
  string(REGEX REPLACE "([0-9a-f][0-9a-f])" "'\\\\x\\1'," bytes "${content}")
endif()
file(WRITE "${OUTPUT}" "// Generated from ${INPUT} by cmake/embed.cmake. Do not edit.\n#include <string_view>\nnamespace ernie::embedded {\nstatic const char k_${NAME}[] = {${bytes} 0};\nstd::string_view ${NAME}() { return {k_${NAME}, sizeof(k_${NAME}) - 1}; }\n}  // namespace ernie::embedded\n")
