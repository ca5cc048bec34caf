#include "ops/op_harness.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include "core/dtype.hpp"
#include "core/error.hpp"

namespace moelab::ops {

double nerr(const std::vector<double>& out, const std::vector<double>& ref) {
  if (out.size() != ref.size()) return INFINITY;
  double num = 0, den = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    if (!std::isfinite(out[i]) || std::isnan(ref[i])) return INFINITY;
    const double d = out[i] - ref[i];
    num += d * d;
    den += ref[i] * ref[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

double worst_row_nerr(const std::vector<double>& out, const std::vector<double>& ref, size_t row_len) {
  if (out.size() != ref.size() || row_len == 0) return INFINITY;
  const size_t rows = ref.size() / row_len;
  if (rows == 0) return nerr(out, ref);
  double total = 0;
  for (size_t i = 0; i < rows * row_len; ++i) total += ref[i] * ref[i];
  const double floor = std::sqrt(total / double(rows));
  double worst = 0;
  for (size_t r = 0; r < rows; ++r) {
    double num = 0, den = 0;
    for (size_t j = r * row_len; j < (r + 1) * row_len; ++j) {
      if (!std::isfinite(out[j])) return INFINITY;
      num += (out[j] - ref[j]) * (out[j] - ref[j]);
      den += ref[j] * ref[j];
    }
    const double scale = std::max(std::sqrt(den), floor);
    worst = std::max(worst, scale == 0 ? std::sqrt(num) : std::sqrt(num) / scale);
  }
  return worst;
}

OpCtx::OpCtx(Backend& test, Backend& ref, uint64_t seed, std::string row, Tol tol)
    : be_{&test, &ref}, seed_(seed), rng_(seed), row_(std::move(row)), tol_(tol) {}

bool OpCtx::oracle() const { return be_[1]->master_dtype() == DType::f64; }

double OpCtx::tol_of(const Tol& t) const { return be_[0]->act_dtype() == DType::bf16 ? t.bf16 : t.f32; }

DType OpCtx::dtype(Role r, int side) const {
  if (r == Role::i32) return DType::i32;
  if (r == Role::table) return DType::f32;
  if (side == 1) return be_[1]->master_dtype();
  switch (r) {
    case Role::act: return be_[0]->act_dtype();
    case Role::bf16: return DType::bf16;
    default: return be_[0]->master_dtype() == DType::f64 ? DType::f64 : DType::f32;
  }
}

std::vector<double> OpCtx::randn(int64_t n, double scale) {
  std::vector<double> v(size_t(std::max<int64_t>(n, 0)));
  for (auto& x : v) x = rng_.normal() * scale;
  return v;
}

Two OpCtx::from(const Shape& s, std::vector<double> v, Role r) {
  Two x;
  x.role = r;
  const DType dt = dtype(r, 0);
  std::vector<float> f(v.size());
  for (size_t i = 0; i < v.size(); ++i) f[i] = dt == DType::bf16 ? round_to_bf16(float(v[i])) : float(v[i]);
  for (int s2 = 0; s2 < 2; ++s2) {
    x[s2] = be_[s2]->alloc(s, dtype(r, s2));
    be_[s2]->write(x[s2], f);
  }
  return x;
}

Two OpCtx::in(const Shape& s, Role r, double scale) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return from(s, randn(n, scale), r);
}

Two OpCtx::i32(const Shape& s, const std::vector<int32_t>& v) {
  Two x;
  x.role = Role::i32;
  for (int s2 = 0; s2 < 2; ++s2) {
    x[s2] = be_[s2]->alloc(s, DType::i32);
    be_[s2]->write_i32(x[s2], v);
  }
  return x;
}

Two OpCtx::out(const Shape& s, Role r) {
  Two x;
  x.role = r;
  for (int s2 = 0; s2 < 2; ++s2) {
    x[s2] = be_[s2]->alloc(s, dtype(r, s2));
    be_[s2]->fill(x[s2], r == Role::i32 ? -7777.0f : s2 == 0 ? NAN : 0.0f);
  }
  return x;
}

Two OpCtx::again(const Two& x, Role r) { return from(x.shape(), values(x, 1), r); }

void OpCtx::run(const SideFn& f) {
  for (int s = 0; s < 2; ++s) f(*be_[s], s);
}

std::vector<double> OpCtx::values(const Two& x, int side) {
  const Tensor& t = x[side];
  if (t.dtype == DType::f64 && t.device == Device::cpu) return std::vector<double>(t.as<double>(), t.as<double>() + t.numel());
  const std::vector<float> f = be_[side]->read(t);
  return std::vector<double>(f.begin(), f.end());
}

std::vector<int32_t> OpCtx::ints(const Two& x, int side) { return be_[side]->read_i32(x[side]); }

std::function<std::vector<uint8_t>(const Tensor&)>& device_bytes() {
  static std::function<std::vector<uint8_t>(const Tensor&)> f;
  return f;
}

std::vector<uint8_t> OpCtx::bytes(const Two& x, int side) {
  const Tensor& t = x[side];
  if (t.device == Device::cpu) {
    const auto* p = static_cast<const uint8_t*>(t.data);
    return std::vector<uint8_t>(p, p + t.bytes());
  }
  if (!device_bytes()) throw Error("op table: no way to read the bytes of " + t.describe());
  return device_bytes()(t);
}

std::string OpCtx::where(const Two& x) const {
  std::ostringstream o;
  o << "row " << row_ << ", seed " << seed_ << ", " << shape_str(x.shape()) << " " << dtype_name(x[0].dtype) << " on "
    << be_[0]->name() << " against " << dtype_name(x[1].dtype) << " on " << be_[1]->name();
  return o.str();
}

void OpCtx::fail(const std::string& msg) { ADD_FAILURE() << msg; }

namespace {
std::vector<double> first(std::vector<double> v, size_t n) {
  if (n < v.size()) v.resize(n);
  return v;
}
}  // namespace

void OpCtx::expect(const Two& x, const std::string& what, double tol, int64_t rows) {
  const int64_t row_len = x.shape().empty() ? 1 : x.shape().back();
  const size_t n = rows < 0 ? size_t(x[1].numel()) : size_t(rows * row_len);
  const std::vector<double> got = first(values(x, 0), n), want = first(values(x, 1), n);
  const double e = nerr(got, want);
  if (!(e <= tol)) {
    std::ostringstream o;
    o << what << ": normalized error " << e << " > tolerance " << tol << " (" << where(x) << ")";
    fail(o.str());
    return;
  }
  const double w = worst_row_nerr(got, want, x.shape().size() >= 2 ? size_t(row_len) : 1);
  if (!(w <= kRowTolFactor * tol)) {
    std::ostringstream o;
    o << what << ": worst row's normalized error " << w << " > " << kRowTolFactor << " x tolerance " << tol << " ("
      << where(x) << ")";
    fail(o.str());
  }
}

void OpCtx::expect_i32(const Two& x, const std::string& what, int64_t count) {
  std::vector<int32_t> got = ints(x, 0), want = ints(x, 1);
  if (count >= 0) {
    got.resize(size_t(std::min<int64_t>(count, int64_t(got.size()))));
    want.resize(got.size());
  }
  if (got == want) return;
  size_t i = 0;
  while (i < got.size() && got[i] == want[i]) ++i;
  std::ostringstream o;
  o << what << ": indices differ, first at " << i << " (test " << (i < got.size() ? got[i] : 0) << ", reference "
    << (i < want.size() ? want[i] : 0) << ") (" << where(x) << ")";
  fail(o.str());
}

void OpCtx::expect_host(const Two& x, const std::vector<double>& want, const std::string& what, double tol) {
  if (!oracle()) return;
  std::vector<double> got = values(x, 1);
  if (want.size() < got.size()) got.resize(want.size());  // a prefix: the rows an op writes
  const double e = nerr(got, want);
  if (!(e <= tol)) {
    std::ostringstream o;
    o << what << ": the f64 reference is " << e << " from the naive computation, tolerance " << tol << " (" << where(x)
      << ")";
    fail(o.str());
  }
}

void OpCtx::gradcheck(const SideFn& fwd, const std::vector<Out>& outs, const std::vector<In>& ins, double tol,
                      int samples) {
  if (!oracle()) return;
  Backend& be = *be_[1];
  std::vector<std::vector<double>> w;
  for (const Out& o : outs) w.push_back(values(*o.w, 1));
  // The outputs at one point; L's change is summed from the outputs' differences, element by
  // element, so outputs a perturbation leaves alone add no rounding noise.
  auto outputs = [&] {
    fwd(be, 1);
    std::vector<std::vector<double>> y;
    for (const Out& o : outs) y.push_back(values(*o.y, 1));
    return y;
  };
  auto change = [&](const std::vector<std::vector<double>>& yp, const std::vector<std::vector<double>>& ym) {
    double l = 0;
    for (size_t i = 0; i < outs.size(); ++i)
      for (size_t j = 0; j < yp[i].size() && j < w[i].size(); ++j) l += (yp[i][j] - ym[i][j]) * w[i][j];
    return l;
  };
  for (const In& in : ins) {
    Tensor& x = (*in.x)[1];
    if (x.dtype != DType::f64) {
      fail("gradcheck needs f64 inputs (" + where(*in.x) + ")");
      continue;
    }
    std::vector<double> analytic = values(*in.dx, 1);
    for (size_t i = 0; i < in.base.size() && i < analytic.size(); ++i) analytic[i] -= in.base[i];
    std::vector<double> num, ana;
    double* p = x.as<double>();
    const int64_t n = x.numel();
    for (int k = 0; k < std::min<int64_t>(samples, n); ++k) {
      const int64_t i = samples >= n ? k : int64_t(rng_.below(uint64_t(n)));
      const double keep = p[i], h = 1e-5 * std::max(1.0, std::fabs(keep));
      p[i] = keep + h;
      const auto yp = outputs();
      p[i] = keep - h;
      const auto ym = outputs();
      p[i] = keep;
      num.push_back(change(yp, ym) / (2 * h));
      ana.push_back(analytic[size_t(i)]);
    }
    outputs();  // back to the unperturbed inputs' outputs
    const double e = nerr(ana, num);
    if (!(e <= tol)) {
      std::ostringstream o;
      o << "gradient against finite differences: normalized error " << e << " > " << tol << " over " << num.size()
        << " elements (" << where(*in.x) << ")";
      fail(o.str());
    }
  }
}

void OpCtx::expect_amax(const AmaxFn& op, const Two& out, const std::string& what, const Two* offsets) {
  for (int s = 0; s < 2; ++s) {
    Backend& be = *be_[s];
    op(be, s, nullptr, nullptr);
    const std::vector<double> plain = values(out, s);
    std::vector<int64_t> bounds = {0, out[s].numel() == 0 ? 0 : int64_t(plain.size())};
    if (offsets) {
      const int64_t cols = out[s].shape.back();
      bounds.clear();
      for (int32_t o : ints(*offsets, s)) bounds.push_back(int64_t(o) * cols);
    }
    const int64_t parts = int64_t(bounds.size()) - 1;
    for (const double start : {0.0, 1e9}) {  // raised from zero, and never lowered
      Two a;
      a[s] = be.alloc({parts}, DType::f32);  // f32 on every backend
      a[1 - s] = a[s];
      be.fill(a[s], float(start));
      op(be, s, &a[s], offsets ? &(*offsets)[s] : nullptr);
      const std::vector<double> v = values(out, s), got = values(a, s);
      const size_t written = size_t(bounds.back());
      if (v.size() != plain.size() || std::memcmp(v.data(), plain.data(), written * sizeof(double)) != 0)
        fail(what + ": the output with an amax differs from the one without (" + where(out) + ")");
      double nonzero = 0;
      for (int64_t e = 0; e < parts; ++e) {
        double m = 0;
        for (int64_t i = bounds[size_t(e)]; i < bounds[size_t(e) + 1]; ++i) m = std::max(m, std::fabs(v[size_t(i)]));
        nonzero = std::max(nonzero, m);
        if (got[size_t(e)] != double(float(std::max(start, m)))) {  // as the f32 sink holds it
          std::ostringstream o;
          o << what << ": amax of part " << e << " is " << got[size_t(e)] << ", the largest |value| written "
            << m << ", started at " << start << ", side " << (s ? "reference" : "test") << " (" << where(out) << ")";
          fail(o.str());
        }
      }
      if (nonzero == 0) fail(what + ": every value is zero, the amax check means nothing (" + where(out) + ")");
    }
  }
}

std::string OpCase::name() const {
  std::string n = op + "_" + shape;
  for (char& c : n)
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  return n;
}

void run_case(const OpCase& c, Backend& test, Backend& ref) {
  // MOELAB_OP_SEED repeats a failing run's inputs.
  static uint64_t counter = 0;
  const char* fixed = std::getenv("MOELAB_OP_SEED");
  const uint64_t seed =
      fixed ? std::strtoull(fixed, nullptr, 10)
            : splitmix64(uint64_t(std::chrono::high_resolution_clock::now().time_since_epoch().count()) + counter++);
  SCOPED_TRACE("row " + c.op + " [" + c.shape + "] seed " + std::to_string(seed));
  OpCtx ctx(test, ref, seed, c.op + " [" + c.shape + "]", c.tol);
  try {
    c.body(ctx);
  } catch (const std::exception& e) {
    ADD_FAILURE() << "row " << c.op << " [" << c.shape << "] seed " << seed << " threw: " << e.what();
  }
}

}  // namespace moelab::ops
