// libFuzzer target: metrics.jsonl and status.json readers (see fuzz_entry.hpp).
#include "lab/fuzz/fuzz_entry.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return moelab::lab::fuzz::metrics_input(data, size);
}
