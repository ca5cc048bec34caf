// TensorBoard event files (train.tensorboard = true): the run's scalars as TFRecords of Event
// protobufs in RUN_DIR/events.out.tfevents.<seconds>.<host>.moelab, so `tensorboard --logdir
// runs/` shows every run. The few protobuf fields this needs (Event: wall_time, step,
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
  // Creates the event file in run_dir and writes its file_version record.
  explicit TensorBoardLog(const std::string& run_dir);
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
  void write_record(const std::string& event_bytes);
  std::string path_;
  std::FILE* f_ = nullptr;
};

}  // namespace moelab
