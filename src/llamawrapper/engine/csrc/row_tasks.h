// What the project's matmul kernels (int4_rows.cpp, int8_weights.cpp) share: output channels in
// blocks of 64, a call's rows split into tasks of 64 (so a prefill chunk keeps every thread busy)
// and taken 4 at a time. Each row's result is the same in whichever task and group it falls.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace llamawrapper_rows {

// x [..., K] as rows [M, K], contiguous (a view of x when it is): the kernels take a decode step's
// [B, 1, K] as it comes, its reshaping here rather than in a Python call each
inline torch::Tensor as_rows(const torch::Tensor& x) { return x.reshape({-1, x.size(-1)}).contiguous(); }

// the shape of the result for x [..., K]: [..., N]
inline std::vector<int64_t> rows_shape(const torch::Tensor& x, int64_t N) {
  auto shape = x.sizes().vec();
  shape.back() = N;
  return shape;
}

constexpr int64_t kBlockN = 64;       // output channels of a block
constexpr int64_t kRowsPerTask = 64;  // rows of a task

// f(b, m0, m1) for each of nb blocks and each task of rows [m0, m1) of M, on torch's threads
template <typename F>
inline void for_block_tasks(int64_t M, int64_t nb, const F& f) {
  const int64_t chunks = (M + kRowsPerTask - 1) / kRowsPerTask;
  at::parallel_for(0, nb * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t m0 = (t / nb) * kRowsPerTask;
      f(t % nb, m0, std::min(M, m0 + kRowsPerTask));
    }
  });
}

// g(std::integral_constant<int, R>, m) for rows [m0, m1): R = 4 while 4 are left, then 3, 2 or 1
template <typename G>
inline void in_fours(int64_t m0, int64_t m1, const G& g) {
  int64_t m = m0;
  for (; m + 4 <= m1; m += 4) g(std::integral_constant<int, 4>{}, m);
  switch (m1 - m) {
    case 3: g(std::integral_constant<int, 3>{}, m); break;
    case 2: g(std::integral_constant<int, 2>{}, m); break;
    case 1: g(std::integral_constant<int, 1>{}, m); break;
    default: break;
  }
}

}  // namespace llamawrapper_rows
