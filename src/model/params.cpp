// Parameter table lookups.
#include "model/params.hpp"

#include "core/error.hpp"

namespace moelab {

Param& ParamTable::get(const std::string& name) {
  for (auto& p : params)
    if (p.name == name) return p;
  throw Error("no parameter named '" + name + "'");
}

const Param* ParamTable::find(const std::string& name) const {
  for (auto& p : params)
    if (p.name == name) return &p;
  return nullptr;
}

int64_t ParamTable::numel() const {
  int64_t n = 0;
  for (auto& p : params) n += p.value.numel();
  return n;
}

}  // namespace moelab
