# libFuzzer targets of the lab's readers, for a clang build with -DMOELAB_FUZZ=ON. Included from
# the top-level CMakeLists.txt. Every library is instrumented (-fsanitize=fuzzer-no-link) so the
# fuzzer sees coverage inside the readers, not just in the entry point.
#   CC=clang CXX=clang++ cmake -S . -B build-fuzz -DMOELAB_FUZZ=ON -DMOELAB_CUDA=OFF -DMOELAB_TESTS=OFF
#   cmake --build build-fuzz --target fuzz_metrics_reader fuzz_nanochat_log
#   build-fuzz/fuzz_nanochat_log -max_total_time=120 tests/lab/fuzz/corpus/nanochat
file(GLOB moelab_fuzz_srcs CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/tests/lab/fuzz/fuzz_*.cpp)
foreach(src ${moelab_fuzz_srcs})
  get_filename_component(n ${src} NAME_WE)
  add_executable(${n} ${src})
  target_include_directories(${n} PRIVATE ${CMAKE_SOURCE_DIR}/tests)
  target_link_libraries(${n} PRIVATE moelab_lab)
  target_link_options(${n} PRIVATE -fsanitize=fuzzer,address,undefined)
endforeach()
