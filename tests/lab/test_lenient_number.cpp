// Log number parsing: separators, units, junk.
#include <gtest/gtest.h>

#include "lab/lenient_number.hpp"

using moelab::lab::parse_lenient_number;

TEST(LenientNumber, ReadsLogFormats) {
  EXPECT_DOUBLE_EQ(*parse_lenient_number("982,070"), 982070.0);
  EXPECT_DOUBLE_EQ(*parse_lenient_number(" 537.80ms", {"ms"}), 537.8);
  EXPECT_DOUBLE_EQ(*parse_lenient_number("1.59m", {"m"}), 1.59);
  EXPECT_DOUBLE_EQ(*parse_lenient_number("23231.91MiB", {"MiB"}), 23231.91);
  EXPECT_DOUBLE_EQ(*parse_lenient_number("-1e-3"), -1e-3);
  EXPECT_DOUBLE_EQ(*parse_lenient_number("+4"), 4.0);
  EXPECT_DOUBLE_EQ(*parse_lenient_number("1,000,000.5"), 1000000.5);
}

TEST(LenientNumber, RejectsJunk) {
  for (const char* bad : {"", "nan", "inf", "-inf", "1.2.3x", "12ms", ",5", "5,", "1e999", "--1", "0x10", "4.67 6", "4,5", "1,0000"})
    EXPECT_FALSE(parse_lenient_number(bad).has_value()) << bad;
}
