// Tensor view arithmetic (no allocation happens here; backends own memory).
#include "core/tensor.hpp"

#include <sstream>

namespace moelab {

std::string shape_str(const Shape& s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

Tensor Tensor::view(Shape new_shape) const {
  Tensor t = *this;
  t.shape = std::move(new_shape);
  MOELAB_CHECK(t.numel() == numel(), "view " + shape_str(t.shape) + " of " + shape_str(shape));
  return t;
}

Tensor Tensor::rows_slice(int64_t begin, int64_t end) const {
  MOELAB_CHECK(0 <= begin && begin <= end && end <= rows(), "rows_slice out of range");
  Tensor t = *this;
  t.data = static_cast<char*>(data) + size_t(begin * cols()) * dtype_size(dtype);
  t.shape = shape.size() <= 1 ? Shape{end - begin} : Shape{end - begin, cols()};
  return t;
}

Tensor Tensor::prefix(const Shape& new_shape) const {
  Tensor t = *this;
  t.shape = new_shape;
  MOELAB_CHECK(t.numel() <= numel(), "prefix " + shape_str(new_shape) + " exceeds " + describe());
  return t;
}

Tensor Tensor::index(int64_t i) const {
  MOELAB_CHECK(!shape.empty() && 0 <= i && i < shape[0], "index out of range");
  Tensor t = *this;
  t.shape = Shape(shape.begin() + 1, shape.end());
  t.data = static_cast<char*>(data) + size_t(i) * t.bytes();
  return t;
}

std::string Tensor::describe() const {
  return std::string(dtype_name(dtype)) + shape_str(shape) + (device == Device::cuda ? "@cuda" : "@cpu");
}

}  // namespace moelab
