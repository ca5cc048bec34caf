// Readers of a run folder's metrics.jsonl and status.json (docs/RUN_FOLDER.md). They take the
// text, not the path, so the same code serves the live report, the tests and the fuzzers. They
// never throw: a malformed line or field is skipped and noted in RunRecord::problems.
#pragma once
#include <string_view>

#include "lab/run_record.hpp"

namespace moelab::lab {

// Append the step events of metrics.jsonl to rec.steps and take the end event's totals.
// A last line without its newline may still be being written: it is used if it parses and
// otherwise ignored without complaint.
void parse_metrics_jsonl(std::string_view text, RunRecord& rec);

// Take state, error, planned steps, peak memory and total time from status.json.
// Returns false (and notes a problem) when the text is not a status object.
bool parse_status_json(std::string_view text, RunRecord& rec);

// Record a problem, keeping the list short enough for a report.
void note_problem(RunRecord& rec, std::string text);

}  // namespace moelab::lab
