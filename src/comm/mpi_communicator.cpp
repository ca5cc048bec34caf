// The CPU ranks' communicator on MPI (communicator.hpp), and make_communicator. Host tensors of
// f32, f64 or i32; MPI's reductions are deterministic for a fixed world size and placement.
#include <cstring>
#include <mutex>

#include "comm/communicator.hpp"
#include "core/error.hpp"

#ifdef MOELAB_HAVE_MPI
#include <mpi.h>
#endif

namespace moelab {

#ifdef MOELAB_HAVE_MPI
namespace {

void mpi_check(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  throw Error(std::string("mpi ") + what + ": " + std::string(msg, size_t(len)));
}

MPI_Datatype mpi_type(const Tensor& t, const char* op) {
  if (t.device != Device::cpu) throw Error(std::string("mpi ") + op + ": " + t.describe() + " is not a host tensor");
  switch (t.dtype) {
    case DType::f32: return MPI_FLOAT;
    case DType::f64: return MPI_DOUBLE;
    case DType::i32: return MPI_INT;
    default: throw Error(std::string("mpi ") + op + ": " + t.describe() + " has no MPI type (f32, f64 or i32)");
  }
}

// MPI is initialized once per process and finalized at exit.
struct MpiRuntime {
  MpiRuntime() {
    int done = 0;
    MPI_Initialized(&done);
    if (!done) {
      int provided = 0;
      mpi_check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided), "init");
    }
  }
  ~MpiRuntime() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();
  }
};

class Mpi final : public Communicator {
 public:
  Mpi() {
    static MpiRuntime runtime;
    mpi_check(MPI_Comm_rank(MPI_COMM_WORLD, &rank_), "rank");
    mpi_check(MPI_Comm_size(MPI_COMM_WORLD, &world_), "size");
  }
  int rank() const override { return rank_; }
  int world() const override { return world_; }
  std::string name() const override { return "mpi (" + std::to_string(world_) + " ranks)"; }
  void all_reduce_sum(Tensor& t) override {
    mpi_check(MPI_Allreduce(MPI_IN_PLACE, t.data, int(t.numel()), mpi_type(t, "all_reduce_sum"), MPI_SUM, MPI_COMM_WORLD),
              "all_reduce_sum");
  }
  void reduce_scatter_sum(const Tensor& in, Tensor& out) override {
    chunks(in, out, "reduce_scatter_sum");
    mpi_check(MPI_Reduce_scatter_block(in.data, out.data, int(out.numel()), mpi_type(out, "reduce_scatter_sum"), MPI_SUM,
                                       MPI_COMM_WORLD),
              "reduce_scatter_sum");
  }
  void all_gather(const Tensor& in, Tensor& out) override {
    chunks(out, in, "all_gather");
    const MPI_Datatype t = mpi_type(in, "all_gather");
    mpi_check(MPI_Allgather(in.data, int(in.numel()), t, out.data, int(in.numel()), t, MPI_COMM_WORLD), "all_gather");
  }
  void all_to_all(const Tensor& in, Tensor& out) override {
    if (in.dtype != out.dtype || in.numel() != out.numel() || in.numel() % world_ != 0)
      throw Error("mpi all_to_all: " + in.describe() + " and " + out.describe() + " must be " + std::to_string(world_) +
                  " equal chunks each");
    const MPI_Datatype t = mpi_type(in, "all_to_all");
    const int n = int(in.numel() / world_);
    mpi_check(MPI_Alltoall(in.data, n, t, out.data, n, t, MPI_COMM_WORLD), "all_to_all");
  }
  void all_to_all_v(const Tensor& in, const std::vector<int64_t>& send, Tensor& out,
                    const std::vector<int64_t>& recv) override {
    if (int(send.size()) != world_ || int(recv.size()) != world_ || in.dtype != out.dtype)
      throw Error("mpi all_to_all_v: one send and one receive count per rank (" + std::to_string(world_) + ")");
    const size_t n = static_cast<size_t>(world_);
    std::vector<int> sc(n), sd(n), rc(n), rd(n);
    int64_t so = 0, ro = 0;
    for (int r = 0; r < world_; ++r) {
      sc[size_t(r)] = int(send[size_t(r)]), sd[size_t(r)] = int(so), so += send[size_t(r)];
      rc[size_t(r)] = int(recv[size_t(r)]), rd[size_t(r)] = int(ro), ro += recv[size_t(r)];
    }
    if (so > in.numel() || ro > out.numel())
      throw Error("mpi all_to_all_v: " + std::to_string(so) + " elements to send from " + in.describe() + ", " +
                  std::to_string(ro) + " to receive into " + out.describe());
    const MPI_Datatype t = mpi_type(in, "all_to_all_v");
    mpi_check(MPI_Alltoallv(in.data, sc.data(), sd.data(), t, out.data, rc.data(), rd.data(), t, MPI_COMM_WORLD),
              "all_to_all_v");
  }
  void broadcast(Tensor& t, int root) override {
    if (root < 0 || root >= world_) throw Error("mpi broadcast: root " + std::to_string(root) + " of " + std::to_string(world_) + " ranks");
    mpi_check(MPI_Bcast(t.data, int(t.numel()), mpi_type(t, "broadcast"), root, MPI_COMM_WORLD), "broadcast");
  }
  void barrier() override { mpi_check(MPI_Barrier(MPI_COMM_WORLD), "barrier"); }

 private:
  void chunks(const Tensor& whole, const Tensor& chunk, const char* op) const {
    if (whole.dtype != chunk.dtype || whole.numel() != chunk.numel() * world_)
      throw Error(std::string("mpi ") + op + ": " + whole.describe() + " must be " + std::to_string(world_) + " chunks of " +
                  chunk.describe());
  }
  int rank_ = 0, world_ = 1;
};

}  // namespace
#endif

bool built_with_mpi() {
#ifdef MOELAB_HAVE_MPI
  return true;
#else
  return false;
#endif
}

std::unique_ptr<Communicator> make_communicator(const LaunchEnv& env) {
  if (env.world == 1) return single_process_communicator();
  if (env.launcher != "mpirun")
    throw Error("a job of " + std::to_string(env.world) + " ranks started by " + env.launcher +
                " has no CPU communicator (CPU ranks run on MPI: start them with mpirun)");
#ifdef MOELAB_HAVE_MPI
  auto comm = std::make_unique<Mpi>();
  if (comm->rank() != env.rank || comm->world() != env.world)
    throw Error("mpi: this process is rank " + std::to_string(comm->rank()) + " of " + std::to_string(comm->world()) +
                " but the launcher said " + std::to_string(env.rank) + " of " + std::to_string(env.world));
  return comm;
#else
  throw Error("moelab was built without MPI, so it cannot join a job of " + std::to_string(env.world) +
              " ranks; install libopenmpi-dev (scripts/install-deps.sh does) and build again");
#endif
}

}  // namespace moelab
