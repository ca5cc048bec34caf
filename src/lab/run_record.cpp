// Names of run states, as the report and status.json spell them.
#include "lab/run_record.hpp"

namespace moelab::lab {

const char* state_name(RunState s) {
  switch (s) {
    case RunState::queued: return "queued";
    case RunState::running: return "running";
    case RunState::completed: return "completed";
    case RunState::failed: return "failed";
    case RunState::unknown: break;
  }
  return "unknown";
}

}  // namespace moelab::lab
