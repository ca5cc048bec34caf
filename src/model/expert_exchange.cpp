// ExpertExchange: expert parallelism's all-to-all of token rows (see expert_exchange.hpp).
#include "model/expert_exchange.hpp"

#include <cstring>

#include "core/error.hpp"

namespace moelab {

ExpertExchange::ExpertExchange(Communicator& group, int experts) : group_(group), experts_(experts) {
  const int P = group.world();
  if (experts % P != 0)
    throw Error("expert parallel: " + std::to_string(experts) + " experts do not split over " + std::to_string(P) +
                " ranks (parallel.expert must divide moe.experts)");
  local_ = experts / P;
}

void ExpertExchange::plan(const std::vector<int32_t>& offsets) {
  const int P = group_.world();
  if (int(offsets.size()) != experts_ + 1) throw Error("expert parallel: plan needs E + 1 offsets");
  const size_t E = static_cast<size_t>(experts_);
  std::vector<int32_t> send_counts(E), recv(E);
  for (int e = 0; e < experts_; ++e) send_counts[size_t(e)] = offsets[size_t(e) + 1] - offsets[size_t(e)];
  // Chunk q of send_counts is rank q's experts: their counts from this rank.
  Tensor s = borrow_host(send_counts), r = borrow_host(recv);
  group_.all_to_all(s, r);
  recv_counts_ = recv;  // [sender][local expert]
  send_rows_.assign(size_t(P), 0);
  recv_rows_.assign(size_t(P), 0);
  for (int q = 0; q < P; ++q)
    for (int e = 0; e < local_; ++e) {
      send_rows_[size_t(q)] += send_counts[size_t(q * local_ + e)];
      recv_rows_[size_t(q)] += recv_counts_[size_t(q * local_ + e)];
    }
  local_offsets_.assign(size_t(local_) + 1, 0);
  for (int e = 0; e < local_; ++e) {
    int32_t n = 0;
    for (int q = 0; q < P; ++q) n += recv_counts_[size_t(q * local_ + e)];
    local_offsets_[size_t(e) + 1] = local_offsets_[size_t(e)] + n;
  }
}

void ExpertExchange::regroup(const Tensor& from, Tensor& to, bool to_local) const {
  const int P = group_.world();
  const int64_t w = from.cols();
  const size_t row_bytes = size_t(w) * dtype_size(from.dtype);
  if (to.cols() != w || to.dtype != from.dtype || from.device != Device::cpu || to.device != Device::cpu)
    throw Error("expert parallel: regroup needs host tensors of one width and dtype, got " + from.describe() + " and " +
                to.describe());
  std::vector<int64_t> within(size_t(local_), 0);  // rows of each local expert placed so far
  int64_t staged = 0;                               // the sender-major position
  for (int q = 0; q < P; ++q)
    for (int e = 0; e < local_; ++e) {
      const int64_t n = recv_counts_[size_t(q * local_ + e)];
      const int64_t local_row = local_offsets_[size_t(e)] + within[size_t(e)];
      const char* src = static_cast<const char*>(from.data) + size_t(to_local ? staged : local_row) * row_bytes;
      char* dst = static_cast<char*>(to.data) + size_t(to_local ? local_row : staged) * row_bytes;
      std::memcpy(dst, src, size_t(n) * row_bytes);
      within[size_t(e)] += n;
      staged += n;
    }
}

void ExpertExchange::dispatch(const Tensor& rows, Tensor& local, Tensor& stage) {
  const int64_t w = rows.cols();
  std::vector<int64_t> send(send_rows_), recv(recv_rows_);
  for (auto& v : send) v *= w;
  for (auto& v : recv) v *= w;
  Tensor st = stage.prefix({received_rows(), w});
  group_.all_to_all_v(rows, send, st, recv);
  regroup(st, local, true);
}

void ExpertExchange::gather(const Tensor& local, Tensor& rows, Tensor& stage) {
  const int64_t w = local.cols();
  Tensor st = stage.prefix({received_rows(), w});
  regroup(local, st, false);
  std::vector<int64_t> send(recv_rows_), recv(send_rows_);
  for (auto& v : send) v *= w;
  for (auto& v : recv) v *= w;
  group_.all_to_all_v(st, send, rows, recv);
}

}  // namespace moelab
