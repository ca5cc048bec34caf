// Launch environment and the single-process communicator (communicator.hpp).
#include "comm/communicator.hpp"

#include <cstdlib>
#include <cstring>
#include <optional>

#include "core/error.hpp"

namespace moelab {

namespace {

std::optional<int> int_var(const std::function<const char*(const char*)>& getenv, const char* name) {
  const char* v = getenv(name);
  if (!v || !*v) return std::nullopt;
  char* end = nullptr;
  const long n = std::strtol(v, &end, 10);
  if (*end != '\0' || n < 0 || n > 1 << 24)
    throw Error(std::string("launch environment: ") + name + "=\"" + v + "\" is not a rank count or index");
  return int(n);
}

void check_chunks(const Tensor& whole, const Tensor& chunk, int world, const char* op) {
  if (whole.dtype != chunk.dtype || whole.numel() != chunk.numel() * world)
    throw Error(std::string("communicator ") + op + ": " + whole.describe() + " must be " + std::to_string(world) +
                " chunks of " + chunk.describe());
}

class SingleProcess final : public Communicator {
 public:
  int rank() const override { return 0; }
  int world() const override { return 1; }
  std::string name() const override { return "single process"; }
  void all_reduce_sum(Tensor&) override {}
  void reduce_scatter_sum(const Tensor& in, Tensor& out) override { copy_chunk(in, out, "reduce_scatter_sum"); }
  void all_gather(const Tensor& in, Tensor& out) override { copy_chunk(out, in, "all_gather", true); }
  void all_to_all(const Tensor& in, Tensor& out) override { copy_chunk(in, out, "all_to_all"); }
  void all_to_all_v(const Tensor& in, const std::vector<int64_t>& send, Tensor& out,
                    const std::vector<int64_t>& recv) override {
    if (send.size() != 1 || recv.size() != 1 || send[0] != recv[0] || send[0] > in.numel() || recv[0] > out.numel() ||
        in.dtype != out.dtype)
      throw Error("communicator all_to_all_v: one rank sends itself its one chunk (counts " + std::to_string(send.size()) +
                  ", " + std::to_string(recv.size()) + ")");
    if (in.device != Device::cpu || out.device != Device::cpu)
      throw Error("communicator all_to_all_v: the single-process communicator takes host tensors");
    std::memmove(out.data, in.data, size_t(send[0]) * dtype_size(in.dtype));
  }
  void broadcast(Tensor&, int root) override {
    if (root != 0) throw Error("communicator broadcast: root " + std::to_string(root) + " of a one-rank job");
  }
  void barrier() override {}

 private:
  // One rank: the whole is its only chunk, so each of these collectives is a copy.
  static void copy_chunk(const Tensor& a, const Tensor& b, const char* op, bool into_a = false) {
    check_chunks(a, b, 1, op);
    if (a.device != Device::cpu || b.device != Device::cpu)
      throw Error(std::string("communicator ") + op + ": the single-process communicator takes host tensors");
    if (into_a) std::memcpy(a.data, b.data, b.bytes());
    else std::memcpy(b.data, a.data, a.bytes());
  }
};

}  // namespace

LaunchEnv launch_env(const std::function<const char*(const char*)>& getenv) {
  struct Source {
    const char *launcher, *rank, *world, *local;
  };
  const Source sources[] = {{"torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"},
                            {"mpirun", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"},
                            {"slurm", "PMI_RANK", "PMI_SIZE", "SLURM_LOCALID"}};
  for (const Source& s : sources) {
    const std::optional<int> rank = int_var(getenv, s.rank), world = int_var(getenv, s.world);
    if (!rank && !world) continue;
    if (!rank || !world)
      throw Error(std::string("launch environment: ") + (rank ? s.rank : s.world) + " is set but " +
                  (rank ? s.world : s.rank) + " is not; " + s.launcher + " sets both");
    if (*world < 1 || *rank >= *world)
      throw Error(std::string("launch environment: ") + s.rank + "=" + std::to_string(*rank) + " is not a rank of " +
                  s.world + "=" + std::to_string(*world));
    LaunchEnv env;
    env.launcher = s.launcher;
    env.rank = *rank;
    env.world = *world;
    env.local_rank = int_var(getenv, s.local).value_or(0);
    return env;
  }
  return {};
}

LaunchEnv launch_env() {
  return launch_env([](const char* name) { return std::getenv(name); });
}

std::unique_ptr<Communicator> single_process_communicator() { return std::make_unique<SingleProcess>(); }

}  // namespace moelab
