// Text validation shared by `tokenizer train`, `data prepare` and the raw-bytes loader.
#include "data/text_input.hpp"

#include <fstream>
#include <iterator>
#include <system_error>
#include <filesystem>

#include "core/error.hpp"

namespace moelab {

std::string read_input_file(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec))
    throw Error(path + ": file not found; check the path (it is read relative to the current folder)");
  if (std::filesystem::is_directory(path, ec))
    throw Error(path + ": is a folder, not a file; name the text files inside it");
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(path + ": cannot be opened for reading; check its permissions");
  std::string data(std::istreambuf_iterator<char>(f), {});
  if (f.bad()) throw Error(path + ": read error");
  if (data.empty()) throw Error(path + ": file is empty; give a file with text in it");
  return data;
}

int utf8_sequence_length(std::string_view s, size_t i) {
  auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  auto cont = [&](size_t k) { return k < s.size() && (b(k) & 0xC0) == 0x80; };
  unsigned c = b(i);
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) return cont(i + 1) ? 2 : 0;
  if (c >= 0xE0 && c <= 0xEF) {
    if (!cont(i + 1) || !cont(i + 2)) return 0;
    unsigned c1 = b(i + 1);
    if (c == 0xE0 && c1 < 0xA0) return 0;   // overlong
    if (c == 0xED && c1 >= 0xA0) return 0;  // surrogate
    return 3;
  }
  if (c >= 0xF0 && c <= 0xF4) {
    if (!cont(i + 1) || !cont(i + 2) || !cont(i + 3)) return 0;
    unsigned c1 = b(i + 1);
    if (c == 0xF0 && c1 < 0x90) return 0;
    if (c == 0xF4 && c1 >= 0x90) return 0;
    return 4;
  }
  return 0;
}

void check_is_text(std::string_view data, const std::string& origin) {
  size_t bad = 0, first_bad = std::string_view::npos;
  for (size_t i = 0; i < data.size();) {
    if (data[i] == '\0')
      throw Error(origin + ": byte offset " + std::to_string(i) +
                  " is a NUL byte: this looks like a binary file, not text; give UTF-8 text (or JSONL with a \"text\" field)");
    int n = utf8_sequence_length(data, i);
    if (n == 0) {
      if (first_bad == std::string_view::npos) first_bad = i;
      ++bad;
      n = 1;
    }
    i += size_t(n);
  }
  if (bad * 100 > data.size())
    throw Error(origin + ": " + std::to_string(bad) + " of " + std::to_string(data.size()) +
                " bytes are not valid UTF-8 (first at byte offset " + std::to_string(first_bad) +
                "): this looks like binary data or a legacy encoding; convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)");
}

}  // namespace moelab
