// The engine's collectives, one seam for every transport: the ranks of one job each hold their own
// buffer, and a collective combines them. The CPU implementation runs on MPI (Open MPI from
// Debian); a GPU one belongs beside it (NCCL), so the trainer's data- and expert-parallel code is
// the same for both and CI tests it on CPU ranks.
//
// Who the ranks are comes from the launcher's environment, as the launchers of the field set it:
// torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), mpirun (OMPI_COMM_WORLD_*)
// or Slurm's PMI (PMI_RANK, PMI_SIZE). Without any of them the job is one rank.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.hpp"

namespace moelab {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int world() const = 0;
  virtual std::string name() const = 0;  // e.g. "single process" or "mpi (2 ranks)"

  // Every rank's t becomes the elementwise sum of all ranks' t (same shape and dtype everywhere).
  virtual void all_reduce_sum(Tensor& t) = 0;
  // in is world equal chunks; rank r's out (one chunk) becomes the sum over ranks of chunk r.
  virtual void reduce_scatter_sum(const Tensor& in, Tensor& out) = 0;
  // out is world chunks, chunk r being rank r's in.
  virtual void all_gather(const Tensor& in, Tensor& out) = 0;
  // in and out are world equal chunks: chunk s of rank r's out is chunk r of rank s's in.
  virtual void all_to_all(const Tensor& in, Tensor& out) = 0;
  // The same with chunks of their own sizes (in elements, one per rank, chunks back to back from
  // the start): rank r's send[s] elements for rank s land as chunk r of rank s's out, whose
  // recv[r] must match. Expert parallelism moves each expert's rows this way.
  virtual void all_to_all_v(const Tensor& in, const std::vector<int64_t>& send, Tensor& out,
                            const std::vector<int64_t>& recv) = 0;
  // Every rank's t becomes root's t.
  virtual void broadcast(Tensor& t, int root) = 0;
  virtual void barrier() = 0;
};

// This process's place in the job, read from the launcher's environment.
struct LaunchEnv {
  int rank = 0, world = 1, local_rank = 0;
  std::string launcher = "none";  // torchrun | mpirun | slurm | none
};
// `getenv` is injectable for tests. A launcher's variables that contradict each other (a rank
// outside the world, a world below 1, a number that does not parse) are an error naming them.
LaunchEnv launch_env(const std::function<const char*(const char*)>& getenv);
LaunchEnv launch_env();

// One rank: every collective is the identity (what a one-rank MPI job would compute).
std::unique_ptr<Communicator> single_process_communicator();
// The communicator for this process: single-process for a world of 1; MPI for a larger one when
// moelab was built with MPI (an error saying how to get it otherwise).
std::unique_ptr<Communicator> make_communicator(const LaunchEnv& env);
bool built_with_mpi();

}  // namespace moelab
