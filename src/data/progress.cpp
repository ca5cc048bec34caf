// Progress bar drawing, rate-limited to ten redraws a second.
#include "data/progress.hpp"

#include <unistd.h>

#include <algorithm>
#include <cstdio>

namespace moelab {

ProgressBar::ProgressBar(std::string label, double total, std::string unit, double scale)
    : label_(std::move(label)), unit_(std::move(unit)), total_(std::max(total, 1e-9)), scale_(scale),
      tty_(::isatty(STDERR_FILENO) == 1), start_(std::chrono::steady_clock::now()), last_draw_(start_) {}

void ProgressBar::update(double done) {
  auto now = std::chrono::steady_clock::now();
  if (tty_) {
    if (now - last_draw_ < std::chrono::milliseconds(100)) return;
    last_draw_ = now;
    draw(done, false);
  } else {
    int quarter = int(4 * std::min(done / total_, 1.0));
    if (quarter > last_quarter_ && quarter < 4) {
      last_quarter_ = quarter;
      draw(done, false);
    }
  }
}

void ProgressBar::draw(double done, bool final) {
  double frac = std::clamp(done / total_, 0.0, 1.0);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  constexpr int width = 30;
  int filled = int(frac * width);
  std::string bar(size_t(filled), '#');
  bar.append(size_t(width - filled), '.');
  double rate = secs > 0 ? done / scale_ / secs : 0;
  int digits = scale_ == 1.0 ? 0 : 1;  // whole counts print as integers
  std::fprintf(stderr, "%s%s [%s] %3.0f%% %.*f/%.*f %s  %.*f %s/s  %.1fs%s", tty_ ? "\r" : "", label_.c_str(), bar.c_str(),
               100 * frac, digits, done / scale_, digits, total_ / scale_, unit_.c_str(), digits, rate, unit_.c_str(), secs,
               tty_ && !final ? "" : "\n");
  std::fflush(stderr);
}

void ProgressBar::finish(double done) {
  total_ = done;
  finish();
}

void ProgressBar::finish() {
  if (finished_) return;
  finished_ = true;
  draw(total_, true);
}

}  // namespace moelab
