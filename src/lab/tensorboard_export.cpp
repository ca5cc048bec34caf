// The lab's runs as TensorBoard event files (see tensorboard_export.hpp).
#include "lab/tensorboard_export.hpp"

#include <algorithm>
#include <cstdio>
#include <system_error>
#include <utility>

#include "core/error.hpp"
#include "core/tensorboard.hpp"

namespace moelab::lab {
namespace fs = std::filesystem;

fs::path tensorboard_file(const fs::path& dir, const RunRecord& run) {
  // A run name may carry a folder prefix when several experiments are compared; keep one level.
  std::string name = run.name.empty() ? "run" : run.name;
  for (char& c : name)
    if (c == '/' || c == '\\') c = '_';
  return dir / name / "events.out.tfevents.0.report.moelab";
}

std::string layer_tag(const char* stat, size_t layer) {
  char buf[80];
  std::snprintf(buf, sizeof buf, "routing/%s/layer_%02zu", stat, layer);
  return buf;
}

std::vector<fs::path> write_tensorboard(const Experiment& ex, const fs::path& dir) {
  if (is_run_folder(dir))
    throw Error("--tensorboard " + dir.string() + " is a run folder, which the report does not write into; give another folder");
  std::vector<fs::path> written;
  for (const RunRecord& run : ex.runs) {
    const fs::path file = tensorboard_file(dir, run);
    std::error_code ec;
    fs::create_directories(file.parent_path(), ec);
    if (ec) throw Error("--tensorboard: cannot create " + file.parent_path().string() + ": " + ec.message());
    TensorBoardLog log(TensorBoardLog::ExactPath{file.string()});
    auto put = [&](const char* tag, int64_t step, double v) {
      if (known(v)) log.scalar(tag, step, v);
    };
    for (const StepRow& s : run.steps) {
      put("train/loss", s.step, s.loss);
      put("train/balance_loss", s.step, s.bal);
      put("train/tok_per_sec", s.step, s.tok_sec);
      put("train/mfu", s.step, s.mfu);
      put("train/drop_rate", s.step, s.drop_rate);
      put("train/dt_ms", s.step, s.dt_ms);
      // Routing: the worst layer's MaxVio, the mean entropy over layers, the widest bias range,
      // and each MoE layer on its own (routing/<stat>/layer_NN) to find the layer that lags.
      double worst_vio = kUnknown, widest_bias = kUnknown, entropy_sum = 0;
      int entropy_n = 0;
      for (double v : s.max_vio)
        if (known(v)) worst_vio = known(worst_vio) ? std::max(worst_vio, v) : v;
      for (double v : s.bias_range)
        if (known(v)) widest_bias = known(widest_bias) ? std::max(widest_bias, v) : v;
      for (double v : s.router_entropy)
        if (known(v)) {
          entropy_sum += v;
          ++entropy_n;
        }
      put("train/max_vio", s.step, worst_vio);
      put("train/router_entropy", s.step, entropy_n ? entropy_sum / entropy_n : kUnknown);
      put("train/z_loss", s.step, s.z_loss);
      put("train/bias_range", s.step, widest_bias);
      for (auto [stat, list] : {std::pair{"max_vio", &s.max_vio}, std::pair{"router_entropy", &s.router_entropy},
                                std::pair{"bias_range", &s.bias_range}})
        for (size_t l = 0; l < list->size(); ++l) put(layer_tag(stat, l).c_str(), s.step, (*list)[l]);
    }
    for (const ValRow& v : run.vals) {
      if (v.step < 0) continue;  // TensorBoard needs a step to place it
      put("val/loss", v.step, v.loss);
      put("val/bpb", v.step, v.bpb);
    }
    written.push_back(file);
  }
  return written;
}

}  // namespace moelab::lab
