// float32 weights times float32 rows, for a float32 model's projections: oneDNN's packed matmul
// (what they ran through before) read smollm2's float32 weights at ~20 GB/s at one row; here each
// block of 64 output channels is read input after input (one 256-byte line of 64 weights each),
// prefetched ahead (the next block fetched into L2 while this one is reused: row_tasks.h), and
// multiplied by up to 4 rows with float32 FMAs, 16 accumulators: 1.4-1.7x oneDNN at one row,
// 1.1-1.3x at 4, 1.3-1.45x at 16, about the same from 64 rows on (bound by the FMAs there). Each
// output is its row's inputs times the weights summed input after input, so a row's result is the
// same whatever rows share the call. Built with decode_attention.cpp by engine/kernels.py; the
// operators are torch.ops.llamawrapper.f32_weight_blocks and torch.ops.llamawrapper.f32_rows_mm.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include "kernels.h"
#include "row_tasks.h"

namespace {

using llamawrapper_rows::kBlockN;
constexpr int64_t kPrefetch = 8;  // lines (of 256 bytes) ahead

// weight [N, K] float32 -> [N / 64, K, 64]: block b's line k holds input k of channels 64b..64b+63
torch::Tensor f32_weight_blocks(torch::Tensor weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat, "f32_weight_blocks: weight must be [N, K] float32");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(N % kBlockN == 0, "f32_weight_blocks: out_features ", N, " is not a multiple of ", kBlockN);
  return weight.view({N / kBlockN, kBlockN, K}).transpose(1, 2).contiguous();
}

#if defined(CPU_CAPABILITY_AVX512)
// R rows of x (row stride K) times one block's lines wb -> o[r][0..64) (row stride N)
template <int R>
inline void block_rows(const float* x, const float* wb, int64_t K, float* o, int64_t N, const llamawrapper_rows::NextBlock& next) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* line = wb + k * kBlockN;
    for (int c = 0; c < 4; ++c) _mm_prefetch(reinterpret_cast<const char*>(line + kPrefetch * kBlockN + 16 * c), _MM_HINT_T0);
    next.step(k);
    __m512 w[4];
    for (int c = 0; c < 4; ++c) w[c] = _mm512_loadu_ps(line + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * K + k]);
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(w[c], xv, acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(o + r * N + 16 * c, acc[r][c]);
}
#endif

}  // namespace

namespace llamawrapper {

// x [..., K] float32, blocks [N / 64, K, 64] float32 (f32_weight_blocks) -> [..., N] float32
torch::Tensor f32_rows_mm(torch::Tensor x, torch::Tensor blocks) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat, "f32_rows_mm: x must be [..., K] float32");
  TORCH_CHECK(blocks.dim() == 3 && blocks.scalar_type() == at::kFloat && blocks.size(2) == kBlockN && blocks.is_contiguous(),
              "f32_rows_mm: blocks must be f32_weight_blocks' [N / 64, K, 64] float32");
  const auto xc = llamawrapper_rows::as_rows(x);
  const int64_t M = xc.size(0), K = xc.size(1), N = blocks.size(0) * kBlockN;
  TORCH_CHECK(blocks.size(1) == K, "f32_rows_mm: x has ", K, " features, the weights ", blocks.size(1));
#if defined(CPU_CAPABILITY_AVX512)
  auto out = torch::empty({M, N}, x.options());
  const float* X = xc.data_ptr<float>();
  const float* W = blocks.data_ptr<float>();
  float* O = out.data_ptr<float>();
  llamawrapper_rows::for_block_tasks(M, N / kBlockN, [&](int64_t b, int64_t m0, int64_t m1) {
    const float* wb = W + b * K * kBlockN;
    llamawrapper_rows::in_fours(m0, m1, [&](auto rows, int64_t m) {
      const llamawrapper_rows::NextBlock next(wb, K * kBlockN * 4, b, N / kBlockN, m0, m1, m, K);
      block_rows<decltype(rows)::value>(X + m * K, wb, K, O + m * N + b * kBlockN, N, next);
    });
  });
  return out.view(llamawrapper_rows::rows_shape(x, N));
#else
  TORCH_CHECK(false, "f32_rows_mm: built without AVX-512");
#endif
}

}  // namespace llamawrapper

TORCH_LIBRARY_FRAGMENT(llamawrapper, m) {
  m.def("f32_weight_blocks(Tensor weight) -> Tensor");
  m.def("f32_rows_mm(Tensor x, Tensor blocks) -> Tensor");
}
TORCH_LIBRARY_IMPL(llamawrapper, CPU, m) {
  m.impl("f32_weight_blocks", &f32_weight_blocks);
  m.impl("f32_rows_mm", &llamawrapper::f32_rows_mm);
}
