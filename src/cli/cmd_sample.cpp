// `moelab sample --run DIR [--device D] [--checkpoint STEP] --prompt TEXT [--max-tokens N] [--temperature T]
// [--top-k K] [--seed S]`: generate from a trained run, streaming tokens as they come.
#include <climits>
#include <cstdio>
#include <memory>
#include <sstream>

#include "cli/commands.hpp"
#include "core/error.hpp"
#include "train/sample.hpp"

namespace moelab::cli {

namespace {

std::vector<int32_t> parse_ids(const std::string& list) {
  std::vector<int32_t> ids;
  std::stringstream in(list);
  std::string item;
  while (std::getline(in, item, ',')) {
    try {
      size_t used = 0;
      const long v = std::stol(item, &used);
      if (used != item.size() || v < 0 || v > INT32_MAX) throw std::invalid_argument(item);
      ids.push_back(int32_t(v));
    } catch (const std::exception&) {
      throw Error("--prompt-ids: '" + item + "' is not a token id; give comma-separated ids, e.g. 1,2,3");
    }
  }
  if (ids.empty()) throw Error("--prompt-ids: give at least one token id, e.g. 1,2,3");
  return ids;
}

}  // namespace

void add_sample_command(CLI::App& app) {
  struct Args {
    SampleOptions o;
    std::string prompt_ids;
    bool print_ids = false, quiet = false;
  };
  auto args = std::make_shared<Args>();
  auto* cmd = app.add_subcommand(
      "sample", "Generate text from a trained run (KV-cache decoding on the run's device; tokens are printed as they come)");
  cmd->add_option("--run", args->o.run_dir, "run folder of a `moelab train` run (config.toml + weights)")->required();
  cmd->add_option("--device", args->o.device, "cpu | cuda | auto: decode there (default: the run's device key)")
      ->check(CLI::IsMember({"cpu", "cuda", "auto"}));
  cmd->add_option("--checkpoint", args->o.checkpoint,
                  "step of checkpoints/step_NNNNNN.safetensors to load; default: model.safetensors, else the newest checkpoint");
  cmd->add_option("--prompt", args->o.prompt, "text to continue (a BPE run's prompt starts with <|bos|>, as its documents do)");
  cmd->add_option("--prompt-ids", args->prompt_ids,
                  "the prompt as comma-separated token ids, taken as they are (no tokenizer, no <|bos|>); "
                  "generation then runs --max-tokens without stopping at <|bos|>");
  cmd->add_option("--max-tokens", args->o.max_tokens, "tokens to generate (default 64; generation also stops at model.max_seq)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--temperature", args->o.temperature, "softmax temperature; 0 is greedy (default 0.8)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--top-k", args->o.top_k, "sample among the K most likely tokens; 0: all (default 0)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--seed", args->o.seed, "random seed of the sampling (default 42)");
  cmd->add_flag("--print-ids", args->print_ids, "print the generated token ids (space-separated) instead of their text");
  cmd->add_flag("--quiet", args->quiet, "no summary line on stderr");
  cmd->footer(
      "The model runs as trained except that every token goes to its top-k experts (no capacity drops: "
      "capacity is a rule over a training batch) and FP8 runs decode in the backend's own precision.\n"
      "Examples:\n"
      "  moelab sample --run runs/tiny --prompt \"The jury said\" --max-tokens 40\n"
      "  moelab sample --run runs/tiny --prompt \"The jury said\" --temperature 0   (greedy)\n"
      "  moelab sample --run runs/tiny --checkpoint 40 --prompt \"It was\" --top-k 20 --seed 7");
  cmd->callback([args] {
    if (!args->prompt_ids.empty()) {
      if (!args->o.prompt.empty()) throw Error("give --prompt or --prompt-ids, not both");
      args->o.prompt_ids = parse_ids(args->prompt_ids);
    }
    bool first = true;
    const SampleInfo info = sample_run(args->o, [&](int32_t id, const std::string& text) {
      if (args->print_ids) {
        std::printf(first ? "%d" : " %d", id);
      } else {
        std::fwrite(text.data(), 1, text.size(), stdout);
      }
      first = false;
      std::fflush(stdout);
    });
    std::printf("\n");
    if (!args->quiet) {
      std::fprintf(stderr, "[%lld prompt tokens | weights %s | %s | stopped: %s]\n", (long long)info.prompt_tokens,
                   info.weights.c_str(), info.device.c_str(), info.stop.c_str());
      // Decode speed at batch 1: one-token forwards (each to its logits on the host) per second;
      // the prompt's forward is timed apart.
      std::fprintf(stderr, "[%lld tokens | %lld decode steps in %.3f s: %.1f tokens/s | prompt %lld tokens in %.3f s]\n",
                   (long long)info.generated_tokens, (long long)info.decode_steps, info.decode_seconds,
                   info.decode_seconds > 0 ? double(info.decode_steps) / info.decode_seconds : 0.0,
                   (long long)info.prompt_tokens, info.prompt_seconds);
    }
  });
}

}  // namespace moelab::cli
