// Picks the backend for a config: `device` (auto | cpu | cuda) and `precision`. A request the
// build or the machine cannot serve is an error that says so, never a silent fallback.
#pragma once
#include <memory>
#include <optional>
#include <string>

#include "backend/backend.hpp"
#include "config/config.hpp"

namespace moelab {

std::unique_ptr<Backend> make_backend(const Config& cfg);
// Peak FLOP/s per device for MFU: train.peak_flops if set, else by card name; none for a CPU.
std::optional<double> peak_flops(const Config& cfg, const Backend& backend);

}  // namespace moelab
