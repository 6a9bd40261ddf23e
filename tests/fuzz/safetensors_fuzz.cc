// libFuzzer target: the safetensors header parser on arbitrary bytes. Any outcome other than a
// parse or an ernie::Error (a crash, a sanitizer report, a timeout) is a bug.
#include <cstddef>
#include <cstdint>
#include <span>

#include "common/check.h"
#include "model/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    auto bytes = std::as_bytes(std::span(data, size));
    auto h = ernie::model::parse_safetensors_header(bytes, size, "fuzz-input");
    for (const auto& t : h.tensors) {
      if (h.data_offset + t.end > size) __builtin_trap();  // the parser promised in-bounds
    }
  } catch (const ernie::Error&) {
  }
  return 0;
}
