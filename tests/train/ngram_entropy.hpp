// The measured n-gram entropy of a byte text, the yardstick for "the model learned": a model
// whose attention is broken can at best predict the next byte from the current one (the bigram
// entropy), and one that learns only byte frequencies stops at the unigram entropy. A training
// test bounds its loss against these numbers of its own data, not against its first loss.
#pragma once
#include <cmath>
#include <fstream>
#include <iterator>
#include <map>
#include <string>

namespace moelab::test {

// H(X_t | X_{t-n+1} .. X_{t-1}) in nats over every position of `text` with n-1 bytes before it:
// the cross-entropy of the best n-gram model fit to the text itself (so a lower bound for any
// model of that order, on that text).
inline double ngram_entropy(const std::string& text, int n) {
  std::map<std::string, std::map<unsigned char, double>> counts;
  double total = 0;
  for (size_t i = size_t(n - 1); i < text.size(); ++i) {
    counts[text.substr(i - size_t(n - 1), size_t(n - 1))][static_cast<unsigned char>(text[i])] += 1;
    total += 1;
  }
  double h = 0;
  for (const auto& [context, next] : counts) {
    double c = 0;
    for (const auto& kv : next) c += kv.second;
    for (const auto& kv : next) h -= kv.second * std::log(kv.second / c);
  }
  return total > 0 ? h / total : 0.0;
}

inline std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

}  // namespace moelab::test
