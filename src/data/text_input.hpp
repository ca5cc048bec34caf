// Reading the text a tokenizer or a loader is given, with the checks that keep garbage out:
// a missing or empty file, or one that is binary rather than text, is an error naming the file
// and the byte offset at fault, never something trained on in silence.
#pragma once
#include <string>
#include <string_view>

namespace moelab {

// Whole file as bytes; throws naming `path` if it cannot be opened or is empty.
std::string read_input_file(const std::string& path);

// Throws naming `origin` and the offset when `data` looks binary: a NUL byte, or more than 1% of
// its bytes not valid UTF-8 (checked over the whole data, reporting the first bad offset).
void check_is_text(std::string_view data, const std::string& origin);

// Byte length of the longest valid UTF-8 sequence starting at data[i] (0 if data[i] starts none).
int utf8_sequence_length(std::string_view data, size_t i);

}  // namespace moelab
