// Generation from a trained run (`moelab sample`): the run's model rebuilt from its folder
// (config.toml and model.safetensors or a checkpoint), the prompt encoded with the run's
// tokenizer, then autoregressive decoding through GptMoE::forward_decode and its KV cache, one
// token at a time, each handed to the caller as it comes.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "config/config.hpp"

namespace moelab {

struct SampleOptions {
  std::string run_dir;
  std::string device;               // "cpu" | "cuda" | "auto"; "": the run's own device key
  int64_t checkpoint = -1;          // a step of checkpoints/; -1: model.safetensors, else the newest checkpoint
  std::string prompt;               // text, encoded with the run's tokenizer (after <|bos|> for BPE runs)
  std::vector<int32_t> prompt_ids;  // ids as they are (no tokenizer, no <|bos|>); used when not empty
  int64_t max_tokens = 64;
  double temperature = 0.8;  // 0: greedy (argmax, ties to the lower id)
  int64_t top_k = 0;         // sample among the k most likely tokens; 0: all
  uint64_t seed = 42;
};

struct SampleInfo {
  std::string weights;  // the file the weights came from
  std::string device;   // the backend's name
  int64_t prompt_tokens = 0;
  std::string stop;  // why generation ended: "max tokens", "<|bos|>" (a new document), "model.max_seq"
  int64_t generated_tokens = 0;
  double prompt_seconds = 0;  // the prompt's forward, to its logits on the host
  int64_t decode_steps = 0;   // one-token forwards after the prompt's (the last token needs none)
  double decode_seconds = 0;  // their time, each to its logits on the host
};

// The run's config as decoding runs it: one row, every token to its top-k experts (capacity is a
// rule over a training batch), one rank, FP8 runs in the backend's own precision (the weights are
// the same), on `device` when not empty. Throws when run_dir holds no config.toml.
Config decoding_config(const std::string& run_dir, const std::string& device = "");
// The weights sample_run loads: checkpoint STEP when >= 0, else model.safetensors, else the newest
// checkpoint.
std::string sample_weights_path(const std::string& run_dir, int64_t checkpoint = -1);

// Calls on_token(id, bytes of its text) for each generated token as soon as it is chosen. With a
// text prompt, generation stops at <|bos|> (the start of a new document); with prompt_ids it
// runs max_tokens. Both stop at model.max_seq positions. Throws moelab::Error with the fix.
SampleInfo sample_run(const SampleOptions& options, const std::function<void(int32_t, const std::string&)>& on_token);

}  // namespace moelab
