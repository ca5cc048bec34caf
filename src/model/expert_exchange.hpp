// Expert parallelism's token exchange for one MoE layer (parallel.expert = P over the job's P
// ranks): rank q holds experts [q E/P, (q + 1) E/P). Each rank routes its own tokens over all E
// experts, so its permuted rows are grouped by global expert, which makes them grouped by
// destination rank too; dispatch sends each rank the rows of its experts (all-to-all with each
// pair's counts, exchanged first by plan) and regroups what arrives by local expert, so the
// grouped GEMMs run over this rank's experts as over a whole layer's; gather sends results back
// into the senders' row order. Host tensors (CPU ranks), f32 or f64 rows.
#pragma once
#include <cstdint>
#include <vector>

#include "comm/communicator.hpp"
#include "core/tensor.hpp"

namespace moelab {

class ExpertExchange {
 public:
  ExpertExchange(Communicator& group, int experts);

  int local_experts() const { return local_; }
  int first_expert() const { return group_.rank() * local_; }
  // From this rank's expert offsets (E + 1 entries, rows grouped by global expert): how many
  // rows go to each rank and arrive from each, expert by expert (one all-to-all of counts).
  void plan(const std::vector<int32_t>& offsets);
  // Offsets of the rows this rank's experts receive, grouped by local expert (local_experts() + 1).
  const std::vector<int32_t>& local_offsets() const { return local_offsets_; }
  int64_t received_rows() const { return local_offsets_.back(); }

  // rows: this rank's rows [.., width] by global expert -> local: the rows of this rank's experts,
  // by local expert (each expert's rows in sender order). stage: flat scratch of at least
  // received_rows() rows of that width.
  void dispatch(const Tensor& rows, Tensor& local, Tensor& stage);
  // The reverse: local results back into rows, in the order dispatch took them from.
  void gather(const Tensor& local, Tensor& rows, Tensor& stage);

 private:
  // Copies each (sender, local expert) block between the sender-major stage and the
  // expert-major local layout.
  void regroup(const Tensor& from, Tensor& to, bool to_local) const;

  Communicator& group_;
  int experts_ = 0, local_ = 0;
  std::vector<int64_t> send_rows_, recv_rows_;  // per rank
  std::vector<int32_t> recv_counts_;            // [sender][local expert]
  std::vector<int32_t> local_offsets_;
};

}  // namespace moelab
