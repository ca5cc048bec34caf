// The op table's machinery: one row is one op on given shapes and options; run_case evaluates it
// on two backends, the one under test (side 0) and a reference (side 1), and compares every
// output by normalized error ||test - ref|| / ||ref|| (each row of an output also held to
// kRowTolFactor x the bound, so a few bad rows cannot hide in a large output; NaN never passes).
// The same rows and the same runner serve two runs:
//   CPU f32 against the CPU at f64 (test_ops): also checks each backward against central finite
//     differences of its forward at f64, and forwards against naive host references where a row
//     gives one (those oracle checks need the f64 side, so they run only there);
//   CUDA against the CPU at f32 (test_cuda): what the GPU computes against the reference.
// Inputs are fresh random values per run, rounded to the dtype the test side stores, and the
// same values go to both sides, so a difference measures only the op's own arithmetic.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "core/rng.hpp"

namespace moelab::ops {

// A row's own normalized error may reach this many times the global bound: rows are short, so
// their rounding error spreads wider than the whole output's.
constexpr double kRowTolFactor = 4;

// ||out - ref|| / ||ref|| (the absolute norm when ref is all zeros); infinite on a size mismatch
// or a non-finite value in out.
double nerr(const std::vector<double>& out, const std::vector<double>& ref);
// The largest per-row normalized error over rows of row_len, each row's norm floored at the
// mean row norm (rows near zero by chance must not fail on rounding alone).
double worst_row_nerr(const std::vector<double>& out, const std::vector<double>& ref, size_t row_len);

// Where a tensor's dtype comes from on the test side (the reference keeps every float tensor in
// its master dtype: f64, or f32 as CUDA's reference).
enum class Role {
  act,    // the test backend's activation dtype (bf16 on CUDA, f32 on the CPU)
  f32,    // f32 (gradients, statistics, optimizer state)
  bf16,   // bf16 on the test side whatever its act dtype (dtype conversions)
  table,  // f32 on both sides (RoPE tables, as the model passes them)
  i32,
};

// Normalized-error bound by the test backend's act dtype: f32 math, or bf16 storage.
struct Tol {
  double f32 = 1e-5, bf16 = 1e-2;
};

// One tensor on both sides.
struct Two {
  Tensor t[2];
  Role role = Role::act;
  Tensor& operator[](int s) { return t[s]; }
  const Tensor& operator[](int s) const { return t[s]; }
  const Shape& shape() const { return t[1].shape; }
};

using SideFn = std::function<void(Backend&, int side)>;

class OpCtx {
 public:
  OpCtx(Backend& test, Backend& ref, uint64_t seed, std::string row, Tol tol);
  Backend& be(int s) { return *be_[s]; }
  Rng& rng() { return rng_; }
  uint64_t seed() const { return seed_; }
  // The reference computes in f64: the oracle checks (finite differences, naive references) run.
  bool oracle() const;
  // The row's bound in this run (by the test side's act dtype), and another given one's.
  double tol() const { return tol_of(tol_); }
  double tol_of(const Tol& t) const;
  DType dtype(Role r, int side) const;

  // Inputs: N(0, scale^2), or given values; rounded to the test side's dtype.
  Two in(const Shape& s, Role r = Role::act, double scale = 1.0);
  Two from(const Shape& s, std::vector<double> v, Role r = Role::act);
  std::vector<double> randn(int64_t n, double scale = 1.0);
  Two i32(const Shape& s, const std::vector<int32_t>& v);
  // Outputs: the test side poisoned (NaN, or -7777 for i32) so an unwritten element fails.
  Two out(const Shape& s, Role r = Role::act);
  // A copy of x's reference values on both sides (rounded to r's dtype on the test side): chains
  // go on from the reference's output, so each op is judged alone.
  Two again(const Two& x, Role r);

  void run(const SideFn& f);
  // Values as double, straight from memory for f64 host tensors.
  std::vector<double> values(const Two& x, int side = 1);
  std::vector<int32_t> ints(const Two& x, int side = 1);
  // Raw bytes (FP8 codes), from the host or through device_bytes().
  std::vector<uint8_t> bytes(const Two& x, int side);

  // The test side against the reference; only the first `rows` rows (matrix view) when rows >= 0.
  void expect(const Two& x, const std::string& what, double tol, int64_t rows = -1);
  void expect(const Two& x, const std::string& what, int64_t rows = -1) { expect(x, what, tol(), rows); }
  void expect_i32(const Two& x, const std::string& what, int64_t count = -1);
  // Oracle: the reference side (its first want.size() elements) against a naive f64 computation
  // (f64 runs only).
  void expect_host(const Two& x, const std::vector<double>& want, const std::string& what, double tol = 1e-12);

  // Oracle: L = sum_i <outs[i].y, outs[i].w> with w the current values of the output gradient;
  // each input's gradient (minus `base` where the backward accumulated onto it) against central
  // differences of L through fwd, on up to `samples` random elements (f64 runs only).
  struct Out {
    const Two* y;
    const Two* w;
  };
  struct In {
    Two* x;
    const Two* dx;
    std::vector<double> base = {};
  };
  void gradcheck(const SideFn& fwd, const std::vector<Out>& outs, const std::vector<In>& ins, double tol = 1e-7,
                 int samples = 24);

  // Both sides: an op given an amax sink (zeroed, or above the values) raises it to the largest
  // |value| it wrote, exactly, and writes the same output as without one. `op(be, side, sink)`
  // with sink null is the plain op. offsets (i32 [E+1]) makes it per expert over rows.
  using AmaxFn = std::function<void(Backend&, int side, const Tensor* amax, const Tensor* offsets)>;
  void expect_amax(const AmaxFn& op, const Two& out, const std::string& what, const Two* offsets = nullptr);

  void fail(const std::string& msg);
  std::string where(const Two& x) const;

 private:
  Backend* be_[2];
  uint64_t seed_;
  Rng rng_;
  std::string row_;
  Tol tol_;
};

// How a runner whose backend keeps tensors off the host reads a tensor's raw bytes (the CUDA run
// sets it; FP8 codes have no float read on every backend).
std::function<std::vector<uint8_t>(const Tensor&)>& device_bytes();

// One row of the table.
struct OpCase {
  std::string op;      // the Backend op (or op family) the row checks
  std::string shape;   // its shapes and options, printed on failure
  Tol tol;             // normalized-error bound of its outputs
  bool fwd = true, bwd = false;  // which directions it checks
  std::function<void(OpCtx&)> body;
  std::string tags = {};  // e.g. "attention": the CUDA run repeats it for each kernel path
  std::string name() const;  // op_shape, as a test name
};

const std::vector<OpCase>& op_cases();

// Evaluates one row: fresh seed, body on both sides; failures name row, seed, shapes and bounds.
void run_case(const OpCase& c, Backend& test, Backend& ref);

}  // namespace moelab::ops
