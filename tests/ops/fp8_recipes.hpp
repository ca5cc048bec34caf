// The FP8 scaling combinations the tests sweep: every operand pair matmul_fp8 supports (at most
// one operand e5m2, always A), and the expert GEMMs' recipes (token-side, weight granularity).
#pragma once
#include "backend/backend.hpp"

namespace moelab::ops {

struct Fp8GemmPair {
  Fp8Granularity ga, gb;
  DType fa;  // A's format; B is e4m3
};
inline const Fp8GemmPair kFp8GemmPairs[] = {
    {Fp8Granularity::tensor, Fp8Granularity::tensor, DType::e4m3},
    {Fp8Granularity::tensor, Fp8Granularity::tensor, DType::e5m2},
    {Fp8Granularity::row, Fp8Granularity::row, DType::e4m3},
    {Fp8Granularity::row, Fp8Granularity::row, DType::e5m2},
    {Fp8Granularity::block_1x128, Fp8Granularity::block_128x128, DType::e4m3},
    {Fp8Granularity::block_1x128, Fp8Granularity::block_128x128, DType::e5m2},
    {Fp8Granularity::block_128x128, Fp8Granularity::block_1x128, DType::e4m3},
    {Fp8Granularity::block_1x128, Fp8Granularity::block_1x128, DType::e5m2},
};

struct Fp8GroupedRecipe {
  Fp8Granularity act, weight;
};
inline const Fp8GroupedRecipe kFp8GroupedRecipes[] = {{Fp8Granularity::tensor, Fp8Granularity::tensor},
                                                      {Fp8Granularity::row, Fp8Granularity::row},
                                                      {Fp8Granularity::block_1x128, Fp8Granularity::block_128x128}};

}  // namespace moelab::ops
