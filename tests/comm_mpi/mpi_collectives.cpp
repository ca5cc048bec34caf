// Run under mpiexec (ctest: MpiCollectives.TwoRanks): every collective of the MPI communicator on
// rank-dependent values, each rank checking what it received; exits non-zero naming the first
// collective that gave a wrong value.
#include <cstdio>
#include <string>
#include <vector>

#include "comm/communicator.hpp"
#include "core/error.hpp"

using namespace moelab;

int main() {
  try {
    auto comm = make_communicator(launch_env());
    const int r = comm->rank(), w = comm->world();
    if (w < 2) {
      std::fprintf(stderr, "mpi_collectives: run me under mpiexec with 2 or more ranks (got %d)\n", w);
      return 2;
    }
    int failures = 0;
    auto expect = [&](bool ok, const std::string& what) {
      if (!ok) {
        std::fprintf(stderr, "rank %d: %s gave a wrong value\n", r, what.c_str());
        ++failures;
      }
    };
    const size_t n = 5;  // values per chunk
    // all_reduce_sum: element i of rank q holds q * 10 + i.
    std::vector<float> a(n);
    for (size_t i = 0; i < n; ++i) a[i] = float(r * 10) + float(i);
    Tensor ta = borrow_host(a);
    comm->all_reduce_sum(ta);
    for (size_t i = 0; i < n; ++i) expect(a[i] == float(10 * w * (w - 1) / 2) + float(w) * float(i), "all_reduce_sum");
    // reduce_scatter_sum: chunk c of rank q holds q + 100 c; rank r keeps the sum of chunk r.
    std::vector<float> whole(n * size_t(w)), mine(n);
    for (int c = 0; c < w; ++c)
      for (size_t i = 0; i < n; ++i) whole[size_t(c) * n + i] = float(r + 100 * c);
    Tensor tw = borrow_host(whole), tm = borrow_host(mine);
    comm->reduce_scatter_sum(tw, tm);
    for (size_t i = 0; i < n; ++i) expect(mine[i] == float(w * (w - 1) / 2 + 100 * r * w), "reduce_scatter_sum");
    // all_gather: rank q sends q + 0.5; chunk q of the result holds it.
    std::vector<float> part(n, float(r) + 0.5f), all(n * size_t(w), -1.0f);
    Tensor tp = borrow_host(part), tall = borrow_host(all);
    comm->all_gather(tp, tall);
    for (int q = 0; q < w; ++q)
      for (size_t i = 0; i < n; ++i) expect(all[size_t(q) * n + i] == float(q) + 0.5f, "all_gather");
    // all_to_all: chunk c of rank q holds q * 1000 + c; chunk s of rank r's out is chunk r of rank s.
    std::vector<float> send(n * size_t(w)), recv(n * size_t(w), -1.0f);
    for (int c = 0; c < w; ++c)
      for (size_t i = 0; i < n; ++i) send[size_t(c) * n + i] = float(r * 1000 + c);
    Tensor ts = borrow_host(send), tr = borrow_host(recv);
    comm->all_to_all(ts, tr);
    for (int s = 0; s < w; ++s)
      for (size_t i = 0; i < n; ++i) expect(recv[size_t(s) * n + i] == float(s * 1000 + r), "all_to_all");
    // all_to_all_v: rank q sends rank c (c + 1) * (q + 1) values q * 1000 + c, so every pair's
    // count differs; chunk s of rank r's out holds rank s's values for r.
    const size_t ranks = static_cast<size_t>(w);
    std::vector<int64_t> vs(ranks), vr(ranks);
    std::vector<float> vsend, vrecv;
    for (int c = 0; c < w; ++c) {
      vs[size_t(c)] = int64_t(c + 1) * (r + 1);
      vsend.insert(vsend.end(), size_t(vs[size_t(c)]), float(r * 1000 + c));
    }
    for (int q = 0; q < w; ++q) vr[size_t(q)] = int64_t(r + 1) * (q + 1);
    int64_t vtotal = 0;
    for (int64_t x : vr) vtotal += x;
    vrecv.assign(size_t(vtotal), -1.0f);
    Tensor tvs = borrow_host(vsend), tvr = borrow_host(vrecv);
    comm->all_to_all_v(tvs, vs, tvr, vr);
    size_t at = 0;
    for (int q = 0; q < w; ++q)
      for (int64_t i = 0; i < vr[size_t(q)]; ++i) expect(vrecv[at++] == float(q * 1000 + r), "all_to_all_v");
    // broadcast from the last rank.
    std::vector<float> b(n, float(r));
    Tensor tb = borrow_host(b);
    comm->broadcast(tb, w - 1);
    for (size_t i = 0; i < n; ++i) expect(b[i] == float(w - 1), "broadcast");
    comm->barrier();
    if (r == 0) std::printf("mpi_collectives: %s, %s\n", comm->name().c_str(), failures ? "FAILED" : "all collectives right");
    return failures ? 1 : 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "mpi_collectives: %s\n", e.what());
    return 1;
  }
}
