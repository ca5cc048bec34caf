// Sharded optimizer state (optim.shard_state): over two ranks, every parameter has exactly one
// owner, the ranks' state names split the unsharded optimizer's between them with no overlap, each
// rank holds about half of the state bytes, and a rank's update of its own parameters equals the
// unsharded optimizer's (Muon and AdamW), while it leaves the others to their owner (here the
// collective is a stand-in that moves nothing, so they must stay as they were).
#include <gtest/gtest.h>

#include <cmath>
#include <set>

#include "backend/cpu/cpu_backend.hpp"
#include "optim/optim_reference.hpp"
#include "optim/optimizer.hpp"

namespace moelab {
namespace {

using namespace testref;

// One rank of a two-rank job whose broadcasts move nothing (the test reads each rank alone).
class StandInRank : public Communicator {
 public:
  explicit StandInRank(int rank) : rank_(rank) {}
  int rank() const override { return rank_; }
  int world() const override { return 2; }
  std::string name() const override { return "stand-in"; }
  void all_reduce_sum(Tensor&) override {}
  void reduce_scatter_sum(const Tensor&, Tensor&) override {}
  void all_gather(const Tensor&, Tensor&) override {}
  void all_to_all(const Tensor&, Tensor&) override {}
  void all_to_all_v(const Tensor&, const std::vector<int64_t>&, Tensor&, const std::vector<int64_t>&) override {}
  void broadcast(Tensor&, int) override { ++broadcasts; }
  void barrier() override {}
  int broadcasts = 0;

 private:
  int rank_;
};

struct Spec {
  std::string name;
  ParamGroup group;
  Shape shape;
};

const std::vector<Spec> kSpecs = {
    {"transformer.wte.weight", ParamGroup::embedding, {50, 32}},
    {"transformer.h.0.attn.c_q.weight", ParamGroup::matrix, {48, 48}},
    {"transformer.h.0.mlp.c_fc.weight", ParamGroup::matrix, {96, 32}},
    {"transformer.h.1.attn.c_q.weight", ParamGroup::matrix, {48, 48}},
    {"transformer.h.1.mlp.experts.w_fc", ParamGroup::matrix, {3, 40, 24}},
    {"transformer.h.2.mlp.experts.w_fc", ParamGroup::matrix, {3, 40, 24}},
    {"transformer.h.1.mlp.router.weight", ParamGroup::matrix, {8, 48}},
    {"x0_lambdas", ParamGroup::scalar, {4}},
    {"lm_head.weight", ParamGroup::unembedding, {50, 32}},
};

// The same random values and gradients for every table built from one seed. With `arena` (an
// undefined tensor to fill), the gradients lie back to back in one allocation, as the model's do.
int64_t elements(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

ParamTable make_table(Backend& b, uint64_t seed, Tensor* arena = nullptr) {
  Rng rng(seed);
  ParamTable t;
  int64_t total = 0, off = 0;
  for (const Spec& s : kSpecs) total += elements(s.shape);
  if (arena) *arena = b.alloc({total, 1}, b.master_dtype());
  for (const Spec& s : kSpecs) {
    Param p;
    p.name = s.name;
    p.group = s.group;
    p.value = b.alloc(s.shape, b.master_dtype());
    p.grad = arena ? arena->rows_slice(off, off + elements(s.shape)).view(s.shape) : b.alloc(s.shape, b.master_dtype());
    off += elements(s.shape);
    p.compute = p.value;
    std::vector<float> v(size_t(p.value.numel())), g(v.size());
    for (auto& x : v) x = float(0.05 * rng.normal());
    for (auto& x : g) x = float(rng.normal());
    b.write(p.value, v);
    b.write(p.grad, g);
    t.params.push_back(p);
  }
  return t;
}

void check_sharding(const std::string& matrix_optimizer, bool in_arena = false) {
  CpuBackend b(DType::f32, 1);
  const uint64_t seed = fresh_rng().next_u64();
  Config cfg;
  cfg.optim.matrix_optimizer = matrix_optimizer;
  cfg.optim.weight_decay = 0.01;
  Tensor a0, a1;
  ParamTable whole = make_table(b, seed), t0 = make_table(b, seed, in_arena ? &a0 : nullptr),
             t1 = make_table(b, seed, in_arena ? &a1 : nullptr);
  ParamTable before = make_table(b, seed);
  StandInRank r0(0), r1(1);
  Optimizer full(b, whole, cfg), o0(b, t0, cfg, &r0, in_arena ? std::vector<Tensor>{a0} : std::vector<Tensor>{}),
      o1(b, t1, cfg, &r1, in_arena ? std::vector<Tensor>{a1} : std::vector<Tensor>{});
  if (in_arena)  // one consecutive range of the arena per rank: rank 0's parameters first
    for (size_t i = 1; i < kSpecs.size(); ++i) EXPECT_LE(o0.owner(i - 1), o0.owner(i)) << kSpecs[i].name;

  // Each parameter has one owner, the same on both ranks, and both ranks own some.
  std::set<int> owners;
  for (size_t i = 0; i < kSpecs.size(); ++i) {
    ASSERT_EQ(o0.owner(i), o1.owner(i)) << kSpecs[i].name;
    ASSERT_TRUE(o0.owner(i) == 0 || o0.owner(i) == 1) << kSpecs[i].name;
    owners.insert(o0.owner(i));
  }
  EXPECT_EQ(owners.size(), 2u);

  // The state names split between the ranks, and each rank holds about half of the bytes.
  std::set<std::string> all, split;
  for (const auto& t : full.state()) all.insert(t.name);
  for (const auto* o : {&o0, &o1})
    for (const auto& t : o->state()) EXPECT_TRUE(split.insert(t.name).second) << t.name << " on both ranks";
  EXPECT_EQ(split, all);
  const double total = double(full.state_bytes());
  EXPECT_EQ(double(o0.state_bytes() + o1.state_bytes()), total);
  // Balanced by state size, or by the arena's elements (whole parameters: coarser).
  const double slack = in_arena ? 0.2 : 0.1;
  for (const auto* o : {&o0, &o1}) {
    EXPECT_GT(double(o->state_bytes()), (0.5 - slack) * total);
    EXPECT_LT(double(o->state_bytes()), (0.5 + slack) * total);
  }

  for (int64_t step = 0; step < 2; ++step) {
    full.step(step, 1.0);
    o0.step(step, 1.0);
    o1.step(step, 1.0);
  }
  EXPECT_EQ(r0.broadcasts, 2 * int(kSpecs.size()));
  for (size_t i = 0; i < kSpecs.size(); ++i) {
    const std::vector<float> want = b.read(whole.params[i].value), old = b.read(before.params[i].value);
    const std::vector<float> own = b.read((o0.owner(i) == 0 ? t0 : t1).params[i].value);
    const std::vector<float> other = b.read((o0.owner(i) == 0 ? t1 : t0).params[i].value);
    double err = 0, norm = 0, moved = 0;
    for (size_t k = 0; k < want.size(); ++k) {
      ASSERT_FALSE(std::isnan(own[k])) << kSpecs[i].name;
      err += (double(own[k]) - want[k]) * (double(own[k]) - want[k]);
      norm += double(want[k]) * want[k];
      moved += std::fabs(double(want[k]) - old[k]);
      ASSERT_EQ(other[k], old[k]) << kSpecs[i].name << ": updated by a rank that does not own it";
    }
    EXPECT_GT(moved, 0.0) << kSpecs[i].name << " was not updated";
    EXPECT_LT(std::sqrt(err / norm), 1e-6) << kSpecs[i].name;
  }
}

TEST(ShardedOptimizer, MuonAndAdamwStateSplitsAndOwnersUpdateAsUnsharded) { check_sharding("muon"); }
TEST(ShardedOptimizer, AdamwMatricesStateSplitsAndOwnersUpdateAsUnsharded) { check_sharding("adamw"); }
TEST(ShardedOptimizer, ArenaRangesSplitTheStateAndOwnersUpdateAsUnsharded) {
  check_sharding("muon", true);
  check_sharding("adamw", true);
}

}  // namespace
}  // namespace moelab
