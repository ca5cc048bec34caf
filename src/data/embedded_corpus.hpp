// The default corpus: the Brown Corpus as running English text (data/brown.txt.gz, derived by
// data/derive_brown.py; source and license in data/README.md), compiled into the binary so
// `moelab train` has real text to learn from in any folder with no download.
#pragma once
#include <string>
#include <string_view>

namespace moelab {

// How the corpus is named in messages and in a shard folder's list of sources.
inline constexpr const char* kDefaultCorpusName = "(embedded default corpus: Brown)";

// The gzip bytes as compiled in. When the build did not embed them (no MOELAB_CORPUS_GZ
// definition), they are read once from data/brown.txt.gz of the source tree this was built from.
std::string_view embedded_corpus_compressed();

// The decompressed text (about 6 MB of ASCII, 500 documents separated by blank lines),
// decompressed once and kept for the life of the process.
const std::string& default_corpus_text();

}  // namespace moelab
