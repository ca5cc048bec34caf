// libFuzzer target: the nanochat stdout log reader (see fuzz_entry.hpp).
#include "lab/fuzz/fuzz_entry.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return moelab::lab::fuzz::nanochat_input(data, size);
}
