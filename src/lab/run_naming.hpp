// How the sweep names run folders, and how the report finds a run's lineage from a name alone
// (for logs that carry no sweep.json). The scheme keeps the seed's report's names:
//   NAME             the first attempt of a planned run
//   NAME_repeat, NAME_repeat2, ...      further repeats of the same config (repeat = N)
//   NAME.failK       a failed attempt moved aside so the same config can run again as NAME
//   NAME_retryK      attempt K+1 with a fallback's changed config (the failed NAME stays)
#pragma once
#include <string>

namespace moelab::lab {

std::string repeat_name(const std::string& base, int index);  // index 0 -> base
std::string fail_name(const std::string& base, int k);         // k >= 1
std::string retry_name(const std::string& base, int k);        // k >= 1
// The planned run an attempt belongs to: strips trailing ".failK" and "_retryK" (not repeats,
// which are runs in their own right).
std::string origin_of(const std::string& name);

}  // namespace moelab::lab
