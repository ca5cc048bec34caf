// CPU training throughput: tokens/s of full optimizer steps (forward, backward, Muon + AdamW) of
// a tiny MoE GPT on the CPU backend, on random tokens. Run: build/bench_train_cpu
// (--benchmark_min_time=10 for steadier numbers). Results go to bench/RESULTS.md.
#include <benchmark/benchmark.h>

#include <thread>

#include "backend/cpu/cpu_backend.hpp"
#include "core/rng.hpp"
#include "model/gpt.hpp"
#include "optim/optimizer.hpp"

namespace moelab {
namespace {

Config bench_config(const std::string& dispatch) {
  Config c;
  c.model.d_model = 128;
  c.model.layers = 4;
  c.model.head_dim = 32;
  c.model.vocab = 4096;
  c.model.max_seq = 256;
  c.moe.experts = 4;
  c.moe.top_k = 2;
  c.moe.expert_hidden = 256;
  c.moe.dispatch = dispatch;
  c.train.batch_size = 8;
  c.train.seq_len = 256;
  return c;
}

void train_step_tokens_per_second(benchmark::State& state, const std::string& dispatch) {
  Config c = bench_config(dispatch);
  CpuBackend be(DType::f32, int(state.range(0)));
  GptMoE model(be, c, c.train.batch_size, c.train.seq_len);
  model.init_weights(1);
  Optimizer opt(be, model.params(), c.optim, c.model);
  const int64_t n = model.tokens_per_micro_batch();
  Rng rng(2);
  std::vector<int32_t> tok(static_cast<size_t>(n)), tgt(static_cast<size_t>(n));
  for (auto& t : tok) t = int32_t(rng.below(4096));
  for (auto& t : tgt) t = int32_t(rng.below(4096));
  Tensor tokens = be.alloc({n}, DType::i32), targets = be.alloc({n}, DType::i32);
  be.write_i32(tokens, tok);
  be.write_i32(targets, tgt);
  int64_t step = 0;
  for (auto _ : state) {
    model.begin_step();
    model.forward_backward(tokens, targets, 1.0f / float(n), 1.0f);
    opt.step(step++, 1.0);
    model.refresh_compute_weights();
    benchmark::DoNotOptimize(model.read_stats(1).loss_sum);
  }
  state.counters["tok/s"] = benchmark::Counter(double(n) * double(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["GFLOP/s"] = benchmark::Counter(model.flops_per_token() * double(n) * double(state.iterations()) / 1e9,
                                                 benchmark::Counter::kIsRate);
}

void BM_TrainStepDropless(benchmark::State& s) { train_step_tokens_per_second(s, "dropless"); }
void BM_TrainStepCapacity(benchmark::State& s) { train_step_tokens_per_second(s, "capacity"); }

const int kThreads = int(std::max(1u, std::thread::hardware_concurrency()));
BENCHMARK(BM_TrainStepDropless)->Arg(1)->Arg(kThreads)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_TrainStepCapacity)->Arg(kThreads)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
}  // namespace moelab

BENCHMARK_MAIN();
