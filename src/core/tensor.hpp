// Tensor: a typed, shaped, contiguous row-major view of memory on one device. Storage is shared
// (a view keeps its allocation alive), so slicing and reshaping are free. Backends allocate;
// the model and optimizers only pass tensors to backend ops.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "core/dtype.hpp"
#include "core/error.hpp"

namespace moelab {

enum class Device : uint8_t { cpu, cuda };

using Shape = std::vector<int64_t>;

std::string shape_str(const Shape& s);

struct Tensor {
  std::shared_ptr<void> storage;  // owner of the allocation (null for borrowed memory)
  void* data = nullptr;
  DType dtype = DType::f32;
  Device device = Device::cpu;
  Shape shape;

  bool defined() const { return data != nullptr || numel() == 0; }
  int ndim() const { return int(shape.size()); }
  int64_t numel() const {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
  size_t bytes() const { return size_t(numel()) * dtype_size(dtype); }
  // Size of dimension i; negative i counts from the end.
  int64_t dim(int i) const { return shape.at(size_t(i < 0 ? int(shape.size()) + i : i)); }
  // The tensor as a matrix: all leading dimensions flattened into rows.
  int64_t cols() const { return shape.empty() ? 1 : shape.back(); }
  int64_t rows() const { return cols() == 0 ? 0 : numel() / cols(); }

  template <class T>
  T* as() const { return static_cast<T*>(data); }

  // Same memory, another shape with the same element count.
  Tensor view(Shape new_shape) const;
  // Rows [begin, end) of the matrix view (leading dims flattened), keeping trailing dims.
  Tensor rows_slice(int64_t begin, int64_t end) const;
  // The first numel(shape) elements, reshaped: a view into a larger scratch buffer.
  Tensor prefix(const Shape& shape) const;
  // Element i of the first dimension (e.g. one expert's matrix of a [E, N, K] tensor).
  Tensor index(int64_t i) const;
  std::string describe() const;
};

// A one-dimensional host tensor over a vector the caller owns and keeps alive (values handed to
// a collective, a test's buffers): f32, f64 or i32 elements.
template <class T>
inline Tensor borrow_host(std::vector<T>& v) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, int32_t>,
                "borrow_host takes float, double or int32_t vectors");
  Tensor t;
  t.data = v.data();
  t.dtype = std::is_same_v<T, float> ? DType::f32 : std::is_same_v<T, double> ? DType::f64 : DType::i32;
  t.shape = {int64_t(v.size())};
  return t;
}

}  // namespace moelab
