// Document splitting and JSONL parsing, with line-numbered errors so a bad record in a large file
// can be found and fixed.
#include "data/documents.hpp"

#include <nlohmann/json.hpp>

#include "core/error.hpp"
#include "data/text_input.hpp"

namespace moelab {

bool is_jsonl_path(const std::string& path) {
  auto ends = [&](std::string_view suffix) {
    return path.size() >= suffix.size() && std::string_view(path).substr(path.size() - suffix.size()) == suffix;
  };
  return ends(".jsonl") || ends(".ndjson") || ends(".jsonl.txt");
}

namespace {

bool is_blank(std::string_view line) {
  for (char c : line)
    if (c != ' ' && c != '\t' && c != '\r') return false;
  return true;
}

size_t split_jsonl(std::string_view data, const std::string& origin, const std::function<void(std::string_view)>& emit) {
  size_t docs = 0, line_no = 0;
  for (size_t pos = 0; pos < data.size();) {
    size_t end = data.find('\n', pos);
    if (end == std::string_view::npos) end = data.size();
    std::string_view line = data.substr(pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (is_blank(line)) continue;
    nlohmann::json record;
    try {
      record = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      throw Error(origin + ": line " + std::to_string(line_no) + ": not valid JSON (" + e.what() +
                  "); each line must be one object such as {\"text\": \"...\"}");
    }
    if (!record.is_object() || !record.contains("text"))
      throw Error(origin + ": line " + std::to_string(line_no) +
                  ": no \"text\" field; each line must be an object with the document in \"text\"");
    if (!record["text"].is_string())
      throw Error(origin + ": line " + std::to_string(line_no) + ": \"text\" is a " + record["text"].type_name() +
                  ", not a string");
    const auto& text = record["text"].get_ref<const std::string&>();
    if (text.empty()) continue;
    emit(text);
    ++docs;
  }
  return docs;
}

size_t split_text(std::string_view data, const std::function<void(std::string_view)>& emit) {
  size_t docs = 0, doc_begin = std::string_view::npos, doc_end = 0;
  auto flush = [&] {
    if (doc_begin != std::string_view::npos) {
      emit(data.substr(doc_begin, doc_end - doc_begin));
      ++docs;
    }
    doc_begin = std::string_view::npos;
  };
  for (size_t pos = 0; pos < data.size();) {
    size_t end = data.find('\n', pos);
    size_t next = end == std::string_view::npos ? data.size() : end + 1;
    if (is_blank(data.substr(pos, (end == std::string_view::npos ? data.size() : end) - pos))) {
      flush();
    } else {
      if (doc_begin == std::string_view::npos) doc_begin = pos;
      doc_end = next;  // a document keeps the newline of its last line
    }
    pos = next;
  }
  flush();
  return docs;
}

}  // namespace

void for_each_document_in(std::string_view data, bool jsonl, const std::string& origin,
                          const std::function<void(std::string_view)>& emit) {
  size_t docs;
  if (jsonl) {
    docs = split_jsonl(data, origin, emit);
  } else {
    check_is_text(data, origin);
    docs = split_text(data, emit);
  }
  if (docs == 0)
    throw Error(origin + ": holds no document (" +
                (jsonl ? std::string("every line is blank or has an empty \"text\"") : std::string("only blank lines")) + ")");
}

void for_each_document(const std::string& path, const std::function<void(std::string_view)>& emit) {
  std::string data = read_input_file(path);
  for_each_document_in(data, is_jsonl_path(path), path, emit);
}

}  // namespace moelab
