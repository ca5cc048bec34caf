// A progress bar on stderr for long data commands. On a terminal it redraws one line; when
// stderr is a file or pipe it prints a line per quarter, so logs stay short.
#pragma once
#include <chrono>
#include <cstdint>
#include <string>

namespace moelab {

class ProgressBar {
 public:
  // `unit` names what is counted ("MB", "merges"); `scale` divides the counts for display.
  ProgressBar(std::string label, double total, std::string unit, double scale = 1.0);
  void update(double done);
  void finish();
  // Finishes at `done` when the work ended short of the planned total (a tokenizer that ran out
  // of pairs to merge): the last line shows what was done, and the rate over it.
  void finish(double done);

 private:
  void draw(double done, bool final);
  std::string label_, unit_;
  double total_, scale_;
  bool tty_;
  int last_quarter_ = -1;
  std::chrono::steady_clock::time_point start_, last_draw_;
  bool finished_ = false;
};

}  // namespace moelab
