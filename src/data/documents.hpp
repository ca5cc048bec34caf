// The documents of an input file, for `tokenizer train` and `data prepare`. Two formats:
// JSONL (name ending .jsonl or .ndjson): one JSON object per line, its "text" string is a
// document; plain text (anything else): documents are separated by blank lines. Errors name the
// file and the line (JSONL) or byte offset (text).
#pragma once
#include <functional>
#include <string>
#include <string_view>

namespace moelab {

bool is_jsonl_path(const std::string& path);

// Reads `path` and calls emit(document) for each non-empty document in order. Throws on a
// missing or empty file, binary data, a bad JSON line or a line without a "text" string, and
// on a file that yields no document at all.
void for_each_document(const std::string& path, const std::function<void(std::string_view)>& emit);

// The same for text already in memory (`origin` names it in errors).
void for_each_document_in(std::string_view data, bool jsonl, const std::string& origin,
                          const std::function<void(std::string_view)>& emit);

}  // namespace moelab
