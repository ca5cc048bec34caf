// cuDNN fused attention (see cudnn_attention.hpp), written against the backend API directly.
//
// The fused flash-attention engine is not one operation here: it is chosen by cuDNN's heuristics
// when an operation graph matches its pattern, so forward and backward are spelled out as the
// graphs of matmuls, pointwise ops and reductions the engine recognizes (supported since cuDNN
// 8.9, so any 9.x runtime takes them):
//
//   forward:  S = Q K^T * scale; mask; M = rowmax S; E = exp(S - M); Z = rowsum E;
//             lse = M + log Z; O = (E / Z) V
//   backward: Dsum = rowsum(dO * O); P = exp(mask(Q K^T * scale - lse)); dV = P^T dO;
//             dS = P * (dO V^T - Dsum) * scale; dK = dS^T Q; dQ = dS K
//
// The mask keeps (row >= col) [causal] and, with a window, (col + window > row), and puts -inf
// elsewhere through GEN_INDEX / CMP / BINARY_SELECT. For grouped-query attention dK and dV come
// out per query head and are summed over each group by a reduction. The backward graph also
// names two f32 scratch tensors (Dsum and the dQ accumulator) that live in our workspace.
#include "backend/cuda/cudnn_attention.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "backend/cuda/cuda_check.hpp"
#include "core/error.hpp"

#if MOELAB_HAVE_CUDNN
#include <cudnn.h>

namespace moelab::cudnn_attention {
namespace {

std::string last_error_text() {
  char msg[2048] = {0};
  cudnnGetLastErrorString(msg, sizeof msg);
  return msg;
}

void check(cudnnStatus_t st, const char* what) {
  if (st == CUDNN_STATUS_SUCCESS) return;
  std::string detail = last_error_text();
  throw Error(std::string("cuDNN: ") + what + " failed: " + cudnnGetErrorString(st) +
              (detail.empty() ? "" : " (" + detail + ")"));
}

// Owner of one backend descriptor.
class Desc {
 public:
  explicit Desc(cudnnBackendDescriptorType_t type) { check(cudnnBackendCreateDescriptor(type, &d_), "create"); }
  ~Desc() {
    if (d_) cudnnBackendDestroyDescriptor(d_);
  }
  Desc(Desc&& o) noexcept : d_(std::exchange(o.d_, nullptr)) {}
  Desc(const Desc&) = delete;
  Desc& operator=(const Desc&) = delete;
  Desc& operator=(Desc&&) = delete;

  cudnnBackendDescriptor_t get() const { return d_; }
  Desc& set(cudnnBackendAttributeName_t a, cudnnBackendAttributeType_t t, int64_t n, const void* v) {
    check(cudnnBackendSetAttribute(d_, a, t, n, v), ("set attribute " + std::to_string(int(a))).c_str());
    return *this;
  }
  Desc& set_desc(cudnnBackendAttributeName_t a, cudnnBackendDescriptor_t d) {
    return set(a, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &d);
  }
  Desc& set_dtype(cudnnBackendAttributeName_t a, cudnnDataType_t t) { return set(a, CUDNN_TYPE_DATA_TYPE, 1, &t); }
  Desc& set_i64(cudnnBackendAttributeName_t a, int64_t v) { return set(a, CUDNN_TYPE_INT64, 1, &v); }
  Desc& finalize(const char* what = "finalize") {
    check(cudnnBackendFinalize(d_), what);
    return *this;
  }

 private:
  cudnnBackendDescriptor_t d_ = nullptr;
};

using Dims = std::vector<int64_t>;

Dims contiguous(const Dims& dims) {
  Dims s(dims.size(), 1);
  for (int i = int(dims.size()) - 2; i >= 0; --i) s[i] = s[i + 1] * dims[i + 1];
  return s;
}

// Unique ids of the tensors the caller's pointers (or our scalars and scratch) are bound to.
enum Uid : int64_t {
  kQ = 1, kK, kV, kO, kLse, kDO, kDQ, kDK, kDV,
  kScale, kNegInf, kWindow, kOne,
  kDsum, kDqAccum,
  kFirstVirtual = 100,
};

// One operation graph under construction: owns every descriptor it made, since the finalized
// operations refer to their tensors.
class GraphBuilder {
 public:
  struct T {
    cudnnBackendDescriptor_t d;
    Dims dims;
  };

  T tensor(int64_t uid, const Dims& dims, const Dims& strides, cudnnDataType_t dt, bool is_virtual = false,
           bool by_value = false) {
    Desc& t = keep(CUDNN_BACKEND_TENSOR_DESCRIPTOR);
    t.set_dtype(CUDNN_ATTR_TENSOR_DATA_TYPE, dt)
        .set(CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, int64_t(dims.size()), dims.data())
        .set(CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, int64_t(strides.size()), strides.data())
        .set_i64(CUDNN_ATTR_TENSOR_UNIQUE_ID, uid)
        .set_i64(CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, 16)
        .set(CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &is_virtual);
    if (by_value) t.set(CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1, &by_value);
    t.finalize("tensor");
    return {t.get(), dims};
  }
  T virt(const Dims& dims, cudnnDataType_t dt = CUDNN_DATA_FLOAT) {
    return tensor(next_uid_++, dims, contiguous(dims), dt, true);
  }
  T virt(const Dims& dims, const Dims& strides, cudnnDataType_t dt) {
    return tensor(next_uid_++, dims, strides, dt, true);
  }
  // A float scalar passed by value (its host address goes in the variant pack).
  T scalar(int64_t uid) { return tensor(uid, {1, 1, 1, 1}, {1, 1, 1, 1}, CUDNN_DATA_FLOAT, false, true); }

  void matmul(const T& a, const T& b, const T& c) {
    Desc& mm = keep(CUDNN_BACKEND_MATMUL_DESCRIPTOR);
    mm.set_dtype(CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_DATA_FLOAT).finalize("matmul");
    Desc& op = keep(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR);
    op.set_desc(CUDNN_ATTR_OPERATION_MATMUL_ADESC, a.d)
        .set_desc(CUDNN_ATTR_OPERATION_MATMUL_BDESC, b.d)
        .set_desc(CUDNN_ATTR_OPERATION_MATMUL_CDESC, c.d)
        .set_desc(CUDNN_ATTR_OPERATION_MATMUL_DESC, mm.get())
        .finalize("matmul op");
    ops_.push_back(op.get());
  }

  // y = mode(x [, b [, t]]); `axis` only for GEN_INDEX.
  void pointwise(cudnnPointwiseMode_t mode, const T& x, const T* b, const T* t, const T& y,
                 cudnnDataType_t prec = CUDNN_DATA_FLOAT, int64_t axis = -1) {
    Desc& pw = keep(CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
    pw.set(CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode)
        .set_dtype(CUDNN_ATTR_POINTWISE_MATH_PREC, prec);
    if (axis >= 0) pw.set_i64(CUDNN_ATTR_POINTWISE_AXIS, axis);
    pw.finalize("pointwise");
    Desc& op = keep(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR);
    op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw.get())
        .set_desc(CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x.d)
        .set_desc(CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y.d);
    if (b) op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_BDESC, b->d);
    if (t) op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_TDESC, t->d);
    op.finalize("pointwise op");
    ops_.push_back(op.get());
  }
  T unary(cudnnPointwiseMode_t mode, const T& x, cudnnDataType_t out = CUDNN_DATA_FLOAT) {
    T y = virt(x.dims, out);
    pointwise(mode, x, nullptr, nullptr, y);
    return y;
  }
  T binary(cudnnPointwiseMode_t mode, const T& x, const T& b, cudnnDataType_t out = CUDNN_DATA_FLOAT,
           cudnnDataType_t prec = CUDNN_DATA_FLOAT) {
    T y = virt(broadcast(x.dims, b.dims), out);
    pointwise(mode, x, &b, nullptr, y, prec);
    return y;
  }

  void reduction(cudnnReduceTensorOp_t mode, const T& x, const T& y) {
    Desc& red = keep(CUDNN_BACKEND_REDUCTION_DESCRIPTOR);
    red.set(CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &mode)
        .set_dtype(CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_DATA_FLOAT)
        .finalize("reduction");
    Desc& op = keep(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR);
    op.set_desc(CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x.d)
        .set_desc(CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y.d)
        .set_desc(CUDNN_ATTR_OPERATION_REDUCTION_DESC, red.get())
        .finalize("reduction op");
    ops_.push_back(op.get());
  }

  // A view of x with other dims/strides (here: transposes of the last two axes).
  T reshape(const T& x, const Dims& dims, const Dims& strides, cudnnDataType_t dt) {
    T y = virt(dims, strides, dt);
    Desc& op = keep(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR);
    op.set_desc(CUDNN_ATTR_OPERATION_RESHAPE_XDESC, x.d).set_desc(CUDNN_ATTR_OPERATION_RESHAPE_YDESC, y.d).finalize(
        "reshape op");
    ops_.push_back(op.get());
    return y;
  }

  // scores masked to -inf outside (row >= col) and, with a window, (col + window > row).
  T mask(const T& s, const T& neg_inf, const T* window) {
    T row = virt(s.dims, CUDNN_DATA_INT32), col = virt(s.dims, CUDNN_DATA_INT32);
    pointwise(CUDNN_POINTWISE_GEN_INDEX, s, nullptr, nullptr, row, CUDNN_DATA_FLOAT, 2);
    pointwise(CUDNN_POINTWISE_GEN_INDEX, s, nullptr, nullptr, col, CUDNN_DATA_FLOAT, 3);
    T causal = virt(s.dims, CUDNN_DATA_BOOLEAN);
    pointwise(CUDNN_POINTWISE_CMP_GE, row, &col, nullptr, causal, CUDNN_DATA_BOOLEAN);
    T out = virt(s.dims);
    pointwise(CUDNN_POINTWISE_BINARY_SELECT, s, &neg_inf, &causal, out);
    if (!window) return out;
    T row2 = virt(s.dims, CUDNN_DATA_INT32), col2 = virt(s.dims, CUDNN_DATA_INT32);
    pointwise(CUDNN_POINTWISE_GEN_INDEX, out, nullptr, nullptr, row2, CUDNN_DATA_FLOAT, 2);
    pointwise(CUDNN_POINTWISE_GEN_INDEX, out, nullptr, nullptr, col2, CUDNN_DATA_FLOAT, 3);
    T shifted = virt(s.dims);
    pointwise(CUDNN_POINTWISE_ADD, col2, window, nullptr, shifted);
    T inside = virt(s.dims, CUDNN_DATA_BOOLEAN);
    pointwise(CUDNN_POINTWISE_CMP_GT, shifted, &row2, nullptr, inside, CUDNN_DATA_BOOLEAN);
    T out2 = virt(s.dims);
    pointwise(CUDNN_POINTWISE_BINARY_SELECT, out, &neg_inf, &inside, out2);
    return out2;
  }

  const std::vector<cudnnBackendDescriptor_t>& ops() const { return ops_; }

 private:
  static Dims broadcast(const Dims& a, const Dims& b) {  // both 4-d; size-1 axes broadcast
    Dims d(a);
    for (size_t i = 0; i < d.size(); ++i) d[i] = std::max(a[i], b[i]);
    return d;
  }
  Desc& keep(cudnnBackendDescriptorType_t type) {
    descs_.push_back(std::make_unique<Desc>(type));
    return *descs_.back();
  }

  std::vector<std::unique_ptr<Desc>> descs_;
  std::vector<cudnnBackendDescriptor_t> ops_;
  int64_t next_uid_ = kFirstVirtual;
};

// A finalized execution plan with the graph it came from.
struct Plan {
  std::unique_ptr<GraphBuilder> graph;
  std::unique_ptr<Desc> op_graph, plan;
  int64_t workspace = 0;
  int64_t engine = -1;
};

// Asks the heuristics for engine configs of `g` and keeps the first that finalizes into a plan.
Plan build_plan(cudnnHandle_t handle, std::unique_ptr<GraphBuilder> g, const char* what) {
  Plan p;
  p.op_graph = std::make_unique<Desc>(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
  p.op_graph->set(CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, int64_t(g->ops().size()),
                  g->ops().data());
  p.op_graph->set(CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle);
  p.op_graph->finalize((std::string(what) + " operation graph").c_str());
  p.graph = std::move(g);

  std::string failures;
  for (cudnnBackendHeurMode_t mode : {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_FALLBACK}) {
    Desc heur(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
    heur.set_desc(CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, p.op_graph->get())
        .set(CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode);
    if (cudnnBackendFinalize(heur.get()) != CUDNN_STATUS_SUCCESS) {
      failures += " heuristics mode " + std::to_string(int(mode)) + ": " + last_error_text() + ";";
      continue;
    }
    int64_t count = 0;
    check(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, 0,
                                   &count, nullptr),
          "heuristics result count");
    std::vector<Desc> cfgs;
    std::vector<cudnnBackendDescriptor_t> raw;
    for (int64_t i = 0; i < count; ++i) {
      cfgs.emplace_back(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR);
      raw.push_back(cfgs.back().get());
    }
    int64_t got = 0;
    if (count > 0)
      check(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR,
                                     count, &got, raw.data()),
            "heuristics results");
    for (int64_t i = 0; i < got; ++i) {
      auto plan = std::make_unique<Desc>(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
      plan->set(CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle)
          .set_desc(CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, raw[i]);
      if (cudnnBackendFinalize(plan->get()) != CUDNN_STATUS_SUCCESS) {
        failures += " config " + std::to_string(i) + ": " + last_error_text() + ";";
        continue;
      }
      int64_t n = 0;
      check(cudnnBackendGetAttribute(plan->get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1, &n,
                                     &p.workspace),
            "plan workspace size");
      Desc engine(CUDNN_BACKEND_ENGINE_DESCRIPTOR);
      cudnnBackendDescriptor_t e = engine.get();
      if (cudnnBackendGetAttribute(raw[i], CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &n, &e) ==
          CUDNN_STATUS_SUCCESS)
        cudnnBackendGetAttribute(e, CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1, &n, &p.engine);
      p.plan = std::move(plan);
      return p;
    }
    if (got == 0) failures += " heuristics mode " + std::to_string(int(mode)) + ": no engine configs;";
  }
  throw Error(std::string("cuDNN: no engine finalizes the ") + what + " attention graph:" + failures);
}

struct Geometry {
  Dims q, q_str, kv, kv_str, kt, kt_str, s, stats, stats_str;
};

Geometry geometry(const Shape& sh) {
  const int64_t B = sh.B, T = sh.T, Hq = sh.Hq, Hkv = sh.Hkv, D = sh.D;
  Geometry g;
  // [b, h, s, d] views of [B, T, H, D] memory.
  g.q = {B, Hq, T, D};
  g.q_str = {T * Hq * D, D, Hq * D, 1};
  g.kv = {B, Hkv, T, D};
  g.kv_str = {T * Hkv * D, D, Hkv * D, 1};
  g.kt = {B, Hkv, D, T};  // K^T (and V^T): the same memory with the last two axes swapped
  g.kt_str = {T * Hkv * D, D, 1, Hkv * D};
  g.s = {B, Hq, T, T};
  g.stats = {B, Hq, T, 1};
  g.stats_str = {Hq * T, T, 1, 1};
  return g;
}

std::unique_ptr<GraphBuilder> forward_graph(const Shape& sh) {
  const Geometry g = geometry(sh);
  auto b = std::make_unique<GraphBuilder>();
  auto q = b->tensor(kQ, g.q, g.q_str, CUDNN_DATA_BFLOAT16);
  auto kt = b->tensor(kK, g.kt, g.kt_str, CUDNN_DATA_BFLOAT16);
  auto v = b->tensor(kV, g.kv, g.kv_str, CUDNN_DATA_BFLOAT16);
  auto o = b->tensor(kO, g.q, g.q_str, CUDNN_DATA_BFLOAT16);
  auto lse = b->tensor(kLse, g.stats, g.stats_str, CUDNN_DATA_FLOAT);
  auto scale = b->scalar(kScale), neg_inf = b->scalar(kNegInf);
  std::optional<GraphBuilder::T> window;
  if (sh.window > 0) window = b->scalar(kWindow);

  auto s = b->virt(g.s);
  b->matmul(q, kt, s);
  auto scaled = b->binary(CUDNN_POINTWISE_MUL, s, scale);
  auto masked = b->mask(scaled, neg_inf, window ? &*window : nullptr);
  auto m = b->virt(g.stats);
  b->reduction(CUDNN_REDUCE_TENSOR_MAX, masked, m);
  auto e = b->unary(CUDNN_POINTWISE_EXP, b->binary(CUDNN_POINTWISE_SUB, masked, m));
  auto z = b->virt(g.stats);
  b->reduction(CUDNN_REDUCE_TENSOR_ADD, e, z);
  auto log_z = b->unary(CUDNN_POINTWISE_LOG, z);
  b->pointwise(CUDNN_POINTWISE_ADD, m, &log_z, nullptr, lse);
  auto p = b->binary(CUDNN_POINTWISE_DIV, e, z, CUDNN_DATA_BFLOAT16);  // the engine wants P in the io type
  b->matmul(p, v, o);
  return b;
}

std::unique_ptr<GraphBuilder> backward_graph(const Shape& sh) {
  const Geometry g = geometry(sh);
  const int64_t B = sh.B, T = sh.T, Hq = sh.Hq, D = sh.D;
  auto b = std::make_unique<GraphBuilder>();
  auto q = b->tensor(kQ, g.q, g.q_str, CUDNN_DATA_BFLOAT16);
  auto kt = b->tensor(kK, g.kt, g.kt_str, CUDNN_DATA_BFLOAT16);
  auto vt = b->tensor(kV, g.kt, g.kt_str, CUDNN_DATA_BFLOAT16);
  auto o = b->tensor(kO, g.q, g.q_str, CUDNN_DATA_BFLOAT16);
  auto d_o = b->tensor(kDO, g.q, g.q_str, CUDNN_DATA_BFLOAT16);
  auto lse = b->tensor(kLse, g.stats, g.stats_str, CUDNN_DATA_FLOAT);
  auto dq = b->tensor(kDQ, g.q, g.q_str, CUDNN_DATA_BFLOAT16);
  auto dk = b->tensor(kDK, g.kv, g.kv_str, CUDNN_DATA_BFLOAT16);
  auto dv = b->tensor(kDV, g.kv, g.kv_str, CUDNN_DATA_BFLOAT16);
  auto dsum = b->tensor(kDsum, g.stats, g.stats_str, CUDNN_DATA_FLOAT);
  auto dq_accum = b->tensor(kDqAccum, g.q, contiguous(g.q), CUDNN_DATA_FLOAT);
  auto scale = b->scalar(kScale), neg_inf = b->scalar(kNegInf), one = b->scalar(kOne);
  std::optional<GraphBuilder::T> window;
  if (sh.window > 0) window = b->scalar(kWindow);
  const bool grouped = sh.Hq != sh.Hkv;
  const Dims transposed_str = {Hq * T * T, T * T, 1, T};  // [b, h, kv, q] view of a [b, h, q, kv] tile

  // Dsum = rowsum(dO * O), written to scratch because the engine reads it per tile.
  auto d_o_o = b->virt(g.q, g.q_str, CUDNN_DATA_FLOAT);
  b->pointwise(CUDNN_POINTWISE_MUL, d_o, &o, nullptr, d_o_o);
  auto rowsum = b->virt(g.stats, g.stats_str, CUDNN_DATA_FLOAT);
  b->reduction(CUDNN_REDUCE_TENSOR_ADD, d_o_o, rowsum);
  b->pointwise(CUDNN_POINTWISE_MUL, rowsum, &one, nullptr, dsum);

  // P recomputed from lse.
  auto s = b->virt(g.s);
  b->matmul(q, kt, s);
  auto scaled = b->binary(CUDNN_POINTWISE_MUL, s, scale);
  auto shifted = b->binary(CUDNN_POINTWISE_SUB, scaled, lse);
  auto p = b->unary(CUDNN_POINTWISE_EXP, b->mask(shifted, neg_inf, window ? &*window : nullptr));

  // dV = P^T dO (per query head, then summed over each group).
  auto pt = b->reshape(p, g.s, transposed_str, CUDNN_DATA_BFLOAT16);
  const Dims full_head = {B, Hq, T, D};
  if (!grouped) {
    b->matmul(pt, d_o, dv);
  } else {
    auto dv_full = b->virt(full_head, contiguous(full_head), CUDNN_DATA_BFLOAT16);
    b->matmul(pt, d_o, dv_full);
    b->reduction(CUDNN_REDUCE_TENSOR_ADD, dv_full, dv);
  }

  // dS = P * (dO V^T - Dsum) * scale.
  auto dp = b->virt(g.s);
  b->matmul(d_o, vt, dp);
  auto ds = b->binary(CUDNN_POINTWISE_MUL,
                      b->binary(CUDNN_POINTWISE_MUL, b->binary(CUDNN_POINTWISE_SUB, dp, dsum), p), scale);

  // dK = dS^T Q.
  auto dst = b->reshape(ds, g.s, transposed_str, CUDNN_DATA_BFLOAT16);
  if (!grouped) {
    b->matmul(dst, q, dk);
  } else {
    auto dk_full = b->virt(full_head, contiguous(full_head), CUDNN_DATA_BFLOAT16);
    b->matmul(dst, q, dk_full);
    b->reduction(CUDNN_REDUCE_TENSOR_ADD, dk_full, dk);
  }

  // dQ = dS K, accumulated in f32 scratch, then converted.
  auto k = b->reshape(kt, g.kv, g.kv_str, CUDNN_DATA_BFLOAT16);
  b->matmul(ds, k, dq_accum);
  b->pointwise(CUDNN_POINTWISE_IDENTITY, dq_accum, nullptr, nullptr, dq);
  return b;
}

constexpr size_t kAlign = 256;
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

struct Entry {
  std::string error;  // non-empty: unsupported, and why
  Plan fwd, bwd;
  cudnnHandle_t handle = nullptr;
  // By-value scalars: the variant pack holds their host addresses, read when a call is enqueued.
  float scale = 0, neg_inf = 0, window = 0, one = 1;
  size_t dsum_offset = 0, dq_accum_offset = 0, dq_accum_bytes = 0, workspace = 0;
  std::shared_ptr<void> cached_workspace;
};

using Key = std::tuple<int, int, int, int, int, int, int>;  // device, B, T, Hq, Hkv, D, window

// Process-lifetime caches, never destroyed: tearing down cuDNN handles and device memory from static
// destructors would race the CUDA runtime's own shutdown.
std::mutex& g_mutex = *new std::mutex;
std::map<int, cudnnHandle_t>& g_handles = *new std::map<int, cudnnHandle_t>;
std::map<Key, std::unique_ptr<Entry>>& g_entries = *new std::map<Key, std::unique_ptr<Entry>>;

std::string validate(const Shape& s) {
  if (s.B <= 0 || s.T <= 0 || s.Hq <= 0 || s.Hkv <= 0 || s.D <= 0) return "non-positive dimension";
  if (s.Hq % s.Hkv != 0) return "Hq is not a multiple of Hkv";
  if (s.D % 8 != 0 || s.D > 256) return "head_dim must be a multiple of 8, at most 256";
  if (s.window < 0) return "negative window";
  return "";
}

Entry& entry(const Shape& s) {
  int dev = 0;
  MOELAB_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard lock(g_mutex);
  auto& slot = g_entries[Key{dev, s.B, s.T, s.Hq, s.Hkv, s.D, s.window}];
  if (slot) return *slot;
  slot = std::make_unique<Entry>();
  Entry& e = *slot;
  e.error = validate(s);
  if (!e.error.empty()) return e;
  try {
    auto& h = g_handles[dev];
    if (!h) check(cudnnCreate(&h), "cudnnCreate");
    e.handle = h;
    e.scale = 1.0f / std::sqrt(float(s.D));
    // cuDNN before 9.1 wants the most negative float rather than -inf as the masked score.
    e.neg_inf = cudnnGetVersion() >= 90100 ? -std::numeric_limits<float>::infinity()
                                           : std::numeric_limits<float>::lowest();
    e.window = float(s.window);
    e.fwd = build_plan(h, forward_graph(s), "forward");
    e.bwd = build_plan(h, backward_graph(s), "backward");
    const size_t stats_bytes = size_t(s.B) * s.Hq * s.T * sizeof(float);
    e.dq_accum_bytes = size_t(s.B) * s.Hq * s.T * s.D * sizeof(float);
    e.dsum_offset = align_up(size_t(e.bwd.workspace));
    e.dq_accum_offset = e.dsum_offset + align_up(stats_bytes);
    e.workspace = std::max(align_up(size_t(e.fwd.workspace)), e.dq_accum_offset + align_up(e.dq_accum_bytes));
  } catch (const Error& ex) {
    e.error = ex.what();
  }
  return e;
}

Entry& ready(const Shape& s) {
  Entry& e = entry(s);
  if (!e.error.empty()) throw Error("cuDNN attention unsupported for this shape: " + e.error);
  return e;
}

void* workspace_for(Entry& e, void* given) {
  if (given) return given;
  std::lock_guard lock(g_mutex);
  if (!e.cached_workspace) {
    void* p = nullptr;
    MOELAB_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(e.workspace, kAlign)));
    e.cached_workspace = std::shared_ptr<void>(p, [](void* q) { cudaFree(q); });
  }
  return e.cached_workspace.get();
}

void execute(Entry& e, const Plan& p, const std::vector<std::pair<int64_t, const void*>>& bindings, void* ws,
             cudaStream_t stream) {
  std::vector<int64_t> uids;
  std::vector<void*> ptrs;
  for (auto& [uid, ptr] : bindings) {
    uids.push_back(uid);
    ptrs.push_back(const_cast<void*>(ptr));
  }
  Desc pack(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR);
  pack.set(CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, int64_t(uids.size()), uids.data())
      .set(CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, int64_t(ptrs.size()), ptrs.data())
      .set(CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &ws)
      .finalize("variant pack");
  // The handle is shared by all shapes of a device: bind the stream and enqueue under the lock, so
  // calls from two threads on two streams cannot swap streams between the two steps.
  std::lock_guard lock(g_mutex);
  check(cudnnSetStream(e.handle, stream), "cudnnSetStream");
  check(cudnnBackendExecute(e.handle, p.plan->get(), pack.get()), "execute");
}

}  // namespace

int version() { return int(cudnnGetVersion()); }
int compiled_version() { return CUDNN_VERSION; }

bool supported(const Shape& s, std::string* reason) {
  if (std::string bad = validate(s); !bad.empty()) {
    if (reason) *reason = bad;
    return false;
  }
  try {
    Entry& e = entry(s);
    if (reason) *reason = e.error;
    return e.error.empty();
  } catch (const Error& ex) {  // e.g. no CUDA device
    if (reason) *reason = ex.what();
    return false;
  }
}

size_t workspace_bytes(const Shape& s) { return ready(s).workspace; }

void prepare(const Shape& s) { workspace_for(ready(s), nullptr); }

std::string describe(const Shape& s) {
  Entry& e = entry(s);
  if (!e.error.empty()) return "unsupported: " + e.error;
  return "fwd engine " + std::to_string(e.fwd.engine) + " (workspace " + std::to_string(e.fwd.workspace) +
         " B), bwd engine " + std::to_string(e.bwd.engine) + " (workspace " + std::to_string(e.bwd.workspace) +
         " B)";
}

void forward(const Shape& s, const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
             __nv_bfloat16* out, float* lse, void* workspace, cudaStream_t stream) {
  Entry& e = ready(s);
  void* ws = workspace_for(e, workspace);
  std::vector<std::pair<int64_t, const void*>> b = {
      {kQ, q}, {kK, k}, {kV, v}, {kO, out}, {kLse, lse}, {kScale, &e.scale}, {kNegInf, &e.neg_inf}};
  if (s.window > 0) b.push_back({kWindow, &e.window});
  execute(e, e.fwd, b, ws, stream);
}

void backward(const Shape& s, const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,
              const __nv_bfloat16* out, const __nv_bfloat16* dout, const float* lse, __nv_bfloat16* dq,
              __nv_bfloat16* dk, __nv_bfloat16* dv, void* workspace, cudaStream_t stream) {
  Entry& e = ready(s);
  char* ws = static_cast<char*>(workspace_for(e, workspace));
  // Before 9.6 the engine expects its dQ accumulator zeroed by the caller; later ones clear it.
  if (cudnnGetVersion() < 90600)
    MOELAB_CUDA_CHECK(cudaMemsetAsync(ws + e.dq_accum_offset, 0, e.dq_accum_bytes, stream));
  std::vector<std::pair<int64_t, const void*>> b = {
      {kQ, q},   {kK, k},   {kV, v},   {kO, out},         {kDO, dout},
      {kLse, lse}, {kDQ, dq}, {kDK, dk}, {kDV, dv},       {kScale, &e.scale},
      {kNegInf, &e.neg_inf}, {kOne, &e.one}, {kDsum, ws + e.dsum_offset}, {kDqAccum, ws + e.dq_accum_offset}};
  if (s.window > 0) b.push_back({kWindow, &e.window});
  execute(e, e.bwd, b, ws, stream);
}

}  // namespace moelab::cudnn_attention

#else  // !MOELAB_HAVE_CUDNN

namespace moelab::cudnn_attention {

namespace {
[[noreturn]] void unavailable() { throw Error("cuDNN attention: moelab was built without cuDNN"); }
}  // namespace

int version() { return 0; }
int compiled_version() { return 0; }
bool supported(const Shape&, std::string* reason) {
  if (reason) *reason = "built without cuDNN";
  return false;
}
size_t workspace_bytes(const Shape&) { unavailable(); }
void prepare(const Shape&) { unavailable(); }
std::string describe(const Shape&) { return "unsupported: built without cuDNN"; }
void forward(const Shape&, const __nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*, __nv_bfloat16*,
             float*, void*, cudaStream_t) {
  unavailable();
}
void backward(const Shape&, const __nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*,
              const __nv_bfloat16*, const float*, __nv_bfloat16*, __nv_bfloat16*, __nv_bfloat16*, void*,
              cudaStream_t) {
  unavailable();
}

}  // namespace moelab::cudnn_attention

#endif
