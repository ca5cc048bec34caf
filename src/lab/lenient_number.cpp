// Lenient number parsing for log fields (see lenient_number.hpp).
#include "lab/lenient_number.hpp"

#include <charconv>
#include <cmath>
#include <string>

namespace moelab::lab {

std::string_view trim(std::string_view s) {
  auto is_space = [](char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; };
  while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
  return s;
}

std::optional<double> parse_lenient_number(std::string_view text, std::initializer_list<std::string_view> units) {
  text = trim(text);
  for (auto unit : units) {
    if (text.size() > unit.size() && text.substr(text.size() - unit.size()) == unit) {
      text.remove_suffix(unit.size());
      text = trim(text);
      break;
    }
  }
  if (text.empty() || text.size() > 64) return std::nullopt;
  std::string digits;
  digits.reserve(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    char c = text[i];
    // A comma is a thousands separator only after a digit and before a group of exactly three
    // ("982,070"); "4,5" is not a number.
    if (c == ',' && i > 0 && std::isdigit(static_cast<unsigned char>(text[i - 1]))) {
      size_t digits_after = 0;
      while (i + 1 + digits_after < text.size() && std::isdigit(static_cast<unsigned char>(text[i + 1 + digits_after])))
        ++digits_after;
      if (digits_after == 3) continue;
      return std::nullopt;
    }
    if (!(std::isdigit(static_cast<unsigned char>(c)) || c == '.' || c == '-' || c == '+' || c == 'e' || c == 'E'))
      return std::nullopt;
    digits.push_back(c);
  }
  const char* begin = digits.data();
  if (*begin == '+') ++begin;
  double value = 0;
  auto [end, ec] = std::from_chars(begin, digits.data() + digits.size(), value);
  if (ec != std::errc() || end != digits.data() + digits.size() || !std::isfinite(value)) return std::nullopt;
  return value;
}

}  // namespace moelab::lab
