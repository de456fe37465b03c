// libFuzzer target: a .safetensors file (8-byte header length, JSON header, data area) through
// SafetensorsFile::open and get() of every tensor. kiln::Error is the expected rejection.
#include <cstdint>
#include <string_view>

#include "core/error.h"
#include "fuzz_util.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto path = kiln::fuzz::write_file(
      "model.safetensors", std::string_view(reinterpret_cast<const char*>(data), size));
  try {
    auto f = kiln::SafetensorsFile::open(path);
    uint64_t total = 0;
    for (const auto& [name, ti] : f->tensors()) {
      // The header's byte range must be exactly dtype size x elements, computed without wrapping.
      unsigned __int128 bytes = kiln::dtype_size(ti.dtype);
      for (int64_t d : ti.shape) {
        KILN_FUZZ_ASSERT(d >= 0);
        bytes *= uint64_t(d);
        if (bytes > (unsigned __int128)size) break;  // cannot match any range of this file
      }
      KILN_FUZZ_ASSERT(ti.begin <= ti.end && ti.end <= size);
      KILN_FUZZ_ASSERT(bytes == ti.end - ti.begin);
      total += ti.end - ti.begin;
      kiln::Tensor t = f->get(name);
      KILN_FUZZ_ASSERT(t.nbytes() == ti.end - ti.begin);
      // Touch every byte (ASan sees reads past a copied tensor).
      const auto* p = static_cast<const uint8_t*>(t.data);
      uint8_t acc = 0;
      for (size_t i = 0; i < t.nbytes(); ++i) acc ^= p[i];
      (void)*const_cast<volatile uint8_t*>(&acc);
    }
    KILN_FUZZ_ASSERT(total <= size);
    for (const auto& [k, v] : f->metadata()) (void)k, (void)v;
    (void)f->header_hash();
  } catch (const kiln::Error&) {
  }
  return 0;
}
