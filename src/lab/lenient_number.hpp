// Parsing numbers as logs print them: "982,070", "537.80ms", "1.59m", "23231.91MiB", " 4.67 ".
// Logs are written by other programs (and may be cut mid-line), so a malformed number is not an
// error here: the caller gets nullopt and marks the value unknown.
#pragma once
#include <optional>
#include <string_view>

namespace moelab::lab {

// A finite number, with thousands separators removed and any of the given unit suffixes
// (tried in order, e.g. {"ms"}) stripped. nullopt for anything else, including nan and inf.
std::optional<double> parse_lenient_number(std::string_view text, std::initializer_list<std::string_view> units = {});

// Strip ASCII spaces, tabs, CR and LF at both ends.
std::string_view trim(std::string_view s);

}  // namespace moelab::lab
