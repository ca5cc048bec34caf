// Elementwise ops' exact properties and transfers: dtype conversions in copy (bf16
// round-to-nearest-even, i32), fill in every dtype, axpby across dtypes, read/write. ReLU², sum
// and axpby against references are rows of the op table (tests/ops).
#include <cmath>

#include "core/dtype.hpp"
#include "gradcheck.hpp"

namespace moelab::test {
namespace {

TEST(Copy, ConvertsBetweenDtypes) {
  CpuBackend be(DType::f32, 2);
  const float one = 1.0f, halfway_even = 1.0f + 0x1p-8f, halfway_odd = 1.0f + 3 * 0x1p-8f;
  Tensor f = be.alloc({4}, DType::f32);
  be.write(f, {one, halfway_even, halfway_odd, -2.5f});
  Tensor b = be.alloc({4}, DType::bf16), d = be.alloc({4}, DType::f64), i = be.alloc({4}, DType::i32);
  be.copy(f, b);
  // Ties round to the even mantissa: 1 + 2^-8 -> 1, 1 + 3 * 2^-8 -> 1 + 2^-6.
  EXPECT_EQ(be.read(b), (std::vector<float>{1.0f, 1.0f, 1.0f + 0x1p-6f, -2.5f}));
  EXPECT_EQ(b.as<uint16_t>()[3], f32_to_bf16_bits(-2.5f));
  be.copy(b, d);
  EXPECT_EQ(d.as<double>()[2], 1.0 + 0x1p-6);
  be.copy(f, i);  // nearest, ties to even
  EXPECT_EQ(be.read_i32(i), (std::vector<int32_t>{1, 1, 1, -2}));
  Tensor back = be.alloc({4}, DType::f32);
  be.copy(i, back);
  EXPECT_EQ(be.read(back), (std::vector<float>{1, 1, 1, -2}));
  Tensor wrong = be.alloc({3}, DType::f32);
  EXPECT_THROW(be.copy(f, wrong), Error);
}

TEST(Copy, F64ToBf16RoundsOnceNotTwice) {
  CpuBackend be(DType::f64, 1);
  // Just above the tie between 1 and 1 + 2^-7: f32 would round it onto the tie (then to even, 1),
  // but the nearest bf16 is 1 + 2^-7.
  Tensor d = be.alloc({2}, DType::f64), b = be.alloc({2}, DType::bf16);
  d.as<double>()[0] = 1.0 + 0x1p-8 + 0x1p-30;
  d.as<double>()[1] = -(1.0 + 0x1p-8 + 0x1p-30);
  be.copy(d, b);
  EXPECT_EQ(be.read(b), (std::vector<float>{1.0f + 0x1p-7f, -(1.0f + 0x1p-7f)}));
}

TEST(Copy, LargeConversionMatchesScalarRounding) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  CpuBackend be(DType::f32, 2);
  Tensor f = random_tensor(be, {100003}, rng, 100.0), b = be.alloc({100003}, DType::bf16);
  be.copy(f, b);
  for (int64_t n = 0; n < f.numel(); ++n)
    ASSERT_EQ(b.as<uint16_t>()[n], f32_to_bf16_bits(f.as<float>()[n])) << "element " << n;
}

TEST(Fill, SetsEveryElementInEachDtype) {
  CpuBackend be(DType::f32, 2);
  for (DType dt : {DType::f32, DType::f64, DType::bf16, DType::i32}) {
    Tensor t = be.alloc({3, 5}, dt);
    be.fill(t, 3.0f);
    for (float v : be.read(t)) EXPECT_EQ(v, 3.0f) << dtype_name(dt);
  }
}

// The formula, b = 0 over NaN and the rest: the op table's axpby rows. Here an f64 x into an f32 y.
TEST(Axpby, F64IntoF32) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  CpuBackend be(DType::f64, 2);
  Tensor x = random_tensor(be, {50000}, rng), yf = be.alloc({50000}, DType::f32);
  be.fill(yf, 1.0f);
  be.axpby(1.0f, x, 1.0f, yf);
  std::vector<double> ref;
  for (double v : values(x)) ref.push_back(double(float(v + 1.0)));
  EXPECT_LT(normalized_error(values(yf), ref), 1e-7);
}

TEST(Transfer, WriteReadRoundTripsAndChecksSize) {
  CpuBackend be(DType::f64, 1);
  Tensor t = be.alloc({2, 2}, DType::f64);
  be.write(t, {1.5f, -2.0f, 0.25f, 8.0f});
  EXPECT_EQ(be.read(t), (std::vector<float>{1.5f, -2.0f, 0.25f, 8.0f}));
  EXPECT_THROW(be.write(t, {1.0f}), Error);
  Tensor i = be.alloc({3}, DType::i32);
  be.write_i32(i, {4, -5, 6});
  EXPECT_EQ(be.read_i32(i), (std::vector<int32_t>{4, -5, 6}));
  EXPECT_THROW(be.read_i32(t), Error);
}

}  // namespace
}  // namespace moelab::test
