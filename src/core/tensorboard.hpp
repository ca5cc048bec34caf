// TensorBoard event files: scalars as TFRecords of Event protobufs, written by the trainer
// (train.tensorboard = true: RUN_DIR/events.out.tfevents.<seconds>.<host>.<pid>.moelab, so
// `tensorboard --logdir runs/` shows every run) and by `moelab report --tensorboard` for runs
// that were not logged so. It lives in core because both the trainer and the lab write them. The few protobuf fields this needs (Event: wall_time, step,
// file_version, summary; Summary.Value: tag, simple_value) are encoded here by hand rather than
// through libprotobuf: it is a fixed handful of varint / fixed-width / length-delimited fields,
// and the build and the binary keep no protobuf dependency (nor generated code) for it.
#pragma once
#include <cstdint>
#include <cstdio>
#include <string>

#include <nlohmann/json.hpp>

namespace moelab {

// CRC-32C (Castagnoli), and TFRecord's masked form of it: rotate right 15, add 0xa282ead8.
uint32_t crc32c(const void* data, size_t bytes);
uint32_t masked_crc32c(const void* data, size_t bytes);

class TensorBoardLog {
 public:
  // Creates a new event file in run_dir (a resumed run adds one) and writes its file_version record.
  explicit TensorBoardLog(const std::string& run_dir);
  // Creates or truncates the event file at exactly this path (whose name must contain
  // "tfevents" for TensorBoard to read it), so a rewrite replaces the earlier file.
  struct ExactPath {
    std::string path;
  };
  explicit TensorBoardLog(const ExactPath& file);
  ~TensorBoardLog();
  TensorBoardLog(const TensorBoardLog&) = delete;
  TensorBoardLog& operator=(const TensorBoardLog&) = delete;

  // One scalar at a step (wall time now), flushed.
  void scalar(const std::string& tag, int64_t step, double value);
  // The scalars of a metrics.jsonl record: a step's train/loss (the smoothed loss), train/raw_loss,
  // train/lr_multiplier, train/tok_per_sec, train/mfu (when known), train/drop_rate,
  // train/balance_loss; a validation's val/loss and val/bpb. Other events write nothing.
  void append(const nlohmann::json& record);
  const std::string& path() const { return path_; }

 private:
  void open(const char* mode);  // opens path_ and writes the file_version record
  void write_record(const std::string& event_bytes);
  std::string path_;
  std::FILE* f_ = nullptr;
};

}  // namespace moelab
