// fp8 emulation in copy: every e4m3/e5m2 code decodes and re-encodes to itself, known values and
// round-to-nearest-even ties land where the formats say, and out-of-range values saturate.
#include <cmath>

#include "gradcheck.hpp"

namespace moelab::test {
namespace {

// Decodes all 256 codes of an fp8 dtype to f64 via copy.
std::vector<double> decode_all(CpuBackend& be, DType dt) {
  Tensor codes = be.alloc({256}, dt), out = be.alloc({256}, DType::f64);
  for (int i = 0; i < 256; ++i) codes.as<uint8_t>()[i] = uint8_t(i);
  be.copy(codes, out);
  return values(out);
}

std::vector<uint8_t> encode(CpuBackend& be, DType dt, const std::vector<double>& v) {
  Tensor in = be.alloc({int64_t(v.size())}, DType::f64), codes = be.alloc({int64_t(v.size())}, dt);
  set_values(in, v);
  be.copy(in, codes);
  return std::vector<uint8_t>(codes.as<uint8_t>(), codes.as<uint8_t>() + v.size());
}

TEST(Fp8, EveryCodeRoundTrips) {
  CpuBackend be(DType::f32, 2);
  for (DType dt : {DType::e4m3, DType::e5m2}) {
    const auto dec = decode_all(be, dt);
    const auto enc = encode(be, dt, dec);
    int finite = 0;
    for (int i = 0; i < 256; ++i) {
      if (std::isnan(dec[size_t(i)])) continue;
      if (std::isinf(dec[size_t(i)])) continue;  // e5m2 infinities saturate instead
      ++finite;
      if (i == 0x80) {
        EXPECT_EQ(enc[size_t(i)], 0x80);  // -0 keeps its sign
        continue;
      }
      EXPECT_EQ(enc[size_t(i)], uint8_t(i)) << dtype_name(dt) << " code " << i;
    }
    EXPECT_EQ(finite, dt == DType::e4m3 ? 254 : 248);
  }
}

TEST(Fp8, KnownValuesTiesAndSaturation) {
  CpuBackend be(DType::f32, 1);
  const auto e4 = decode_all(be, DType::e4m3);
  EXPECT_EQ(e4[0x7e], 448.0);                 // largest finite
  EXPECT_EQ(e4[0x01], std::ldexp(1.0, -9));   // smallest subnormal
  EXPECT_EQ(e4[0x08], std::ldexp(1.0, -6));   // smallest normal
  EXPECT_EQ(e4[0x38], 1.0);
  EXPECT_TRUE(std::isnan(e4[0x7f]));
  const auto e5 = decode_all(be, DType::e5m2);
  EXPECT_EQ(e5[0x7b], 57344.0);
  EXPECT_EQ(e5[0x3c], 1.0);
  EXPECT_TRUE(std::isinf(e5[0x7c]));
  // e4m3 near 1 has spacing 1/8: 1 + 1/16 ties to 1 (even), 1 + 3/16 ties to 1.25 (even).
  EXPECT_EQ(encode(be, DType::e4m3, {1.0 + 1.0 / 16, 1.0 + 3.0 / 16, 1.0 + 1.0 / 16 + 1e-9}),
            (std::vector<uint8_t>{0x38, 0x3a, 0x39}));
  // Saturation: past the top, infinities included, clamp to +-max.
  EXPECT_EQ(encode(be, DType::e4m3, {500.0, -1e9, INFINITY}), (std::vector<uint8_t>{0x7e, 0xfe, 0x7e}));
  EXPECT_EQ(encode(be, DType::e5m2, {6e4, -INFINITY}), (std::vector<uint8_t>{0x7b, 0xfb}));
  // Subnormal rounding: half the smallest e4m3 subnormal ties to 0, 0.75 of it rounds up.
  EXPECT_EQ(encode(be, DType::e4m3, {std::ldexp(1.0, -10), 0.75 * std::ldexp(1.0, -9)}),
            (std::vector<uint8_t>{0x00, 0x01}));
}

TEST(Fp8, RandomValuesRoundToNearestCode) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Rng rng(seed);
  CpuBackend be(DType::f32, 2);
  for (DType dt : {DType::e4m3, DType::e5m2}) {
    const auto dec = decode_all(be, dt);
    std::vector<double> v;
    for (int i = 0; i < 2000; ++i) v.push_back(rng.normal() * std::ldexp(1.0, int(rng.below(20)) - 10));
    const auto enc = encode(be, dt, v);
    const double top = dt == DType::e4m3 ? 448.0 : 57344.0;
    for (size_t i = 0; i < v.size(); ++i) {
      const double got = dec[enc[i]];
      const double want = std::max(-top, std::min(top, v[i]));
      // No finite code is closer to the (clamped) value than the one chosen.
      for (int c = 0; c < 256; ++c) {
        if (!std::isfinite(dec[size_t(c)])) continue;
        ASSERT_LE(std::abs(got - want), std::abs(dec[size_t(c)] - want)) << v[i] << " code " << c;
      }
    }
  }
}

}  // namespace
}  // namespace moelab::test
