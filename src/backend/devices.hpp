// The backends this build can make: the CPU always, CUDA when the build has it. Callers outside
// src/backend choose a device through these and ask the result what it supports; none of them
// names a backend class or includes a CUDA header.
#pragma once
#include <memory>

#include "backend/backend.hpp"

namespace moelab {

// master: f32 or f64; threads 0: all hardware threads.
std::unique_ptr<Backend> make_cpu_backend(DType master = DType::f32, int threads = 0);

#ifdef MOELAB_HAVE_CUDA  // defined for whatever links the CUDA backend
// A CUDA device can be opened (driver present, at least one GPU).
bool cuda_device_available();
// Opens GPU `device_index`; throws naming the cause when there is none.
std::unique_ptr<Backend> make_cuda_backend(int device_index = 0);
#endif

}  // namespace moelab
