// What the project's matmul kernels (f32_rows.cpp, int4_rows.cpp, int8_weights.cpp) share:
// output channels in blocks of 64, a call's rows split into tasks of equal size, at most 64 (so a
// prefill chunk keeps every thread busy) and taken 4 at a time, the next block fetched while a
// block's later groups run from L2. Each row's result is the same in whichever task and group it falls.
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

// f(b, m0, m1) for each of nb blocks and each task of rows [m0, m1) of M, on torch's threads.
// A call of up to 64 rows (a decode step) is shared out in groups of 4 rows of a block, so the
// threads' shares are even where the blocks do not divide among them (9 blocks on 2 threads kept
// one thread idle a fifth of the time at 16 rows): a block may be split between two threads.
// A call of more rows is cut into tasks of equal size (a multiple of 4, at most 64): with tasks of
// 64 and a remainder, the threads' shares were whole tasks of unequal rows (65 to 127 rows on 2
// threads: one thread ran 64 rows of every block while the other ran the rest, and a call took as
// long as one of 128 rows).
template <typename F>
inline void for_block_tasks(int64_t M, int64_t nb, const F& f) {
  int64_t chunks = (M + kRowsPerTask - 1) / kRowsPerTask;
  if (chunks == 1) {
    const int64_t groups = (M + 3) / 4;
    at::parallel_for(0, nb * groups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end;) {
        const int64_t b = u / groups, g0 = u % groups, g1 = std::min(groups, g0 + (end - u));
        f(b, g0 * 4, std::min(M, g1 * 4));
        u += g1 - g0;
      }
    });
    return;
  }
  const int64_t rows = ((M + chunks - 1) / chunks + 3) / 4 * 4;  // a task's rows
  chunks = (M + rows - 1) / rows;
  at::parallel_for(0, nb * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t m0 = (t / nb) * rows;
      f(t % nb, m0, std::min(M, m0 + rows));
    }
  });
}

// The next block's lines fetched into L2 while a task's later groups of rows (the second 4 on)
// read this block from L2 with the memory idle: without it a block came from memory for its first
// group alone, and the FMAs waited (f32 at 16 rows: the memory's time and the FMAs' added up).
// Each later group takes its share of the next block's 64-byte lines, spread over its steps.
struct NextBlock {
  const char* lines = nullptr;  // this group's share of the next block
  int64_t count = 0, per_step = 0;

  // for the group of rows starting at m of a task [m0, m1) of block b of nb, each block `bytes`
  // long after `block`, over `steps` steps of the block's loop
  NextBlock(const void* block, int64_t bytes, int64_t b, int64_t nb, int64_t m0, int64_t m1, int64_t m, int64_t steps) {
    const int64_t later = (m1 - m0 + 3) / 4 - 1, group = (m - m0) / 4, all = bytes / 64;
    if (later <= 0 || group == 0 || b + 1 >= nb) return;
    const int64_t share = (all + later - 1) / later, from = (group - 1) * share;
    lines = static_cast<const char*>(block) + bytes + from * 64;
    count = std::max<int64_t>(0, std::min(share, all - from));
    per_step = (count + steps - 1) / steps;
  }
  // fetch this step's lines
  inline void step(int64_t s) const {
    for (int64_t j = s * per_step, end = std::min(count, j + per_step); j < end; ++j) __builtin_prefetch(lines + j * 64, 0, 2);
  }
};

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
