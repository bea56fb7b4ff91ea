// int8 weights times bfloat16 rows, for an int8 model's projections and the int8 output head of
// int8 and int4 models: torch's _weight_int8pack_mm read smollm2's 28 MB int8 head at ~25 GB/s
// at one row, and sums each output across its lanes. Here the weights
// are laid out once in blocks of 64 output channels, k after k, so each k's 64 weights are one
// load, widened to float32 and multiplied by the row's x[k] broadcast: no lane sums, each weight
// read once for every 4 rows. Each output is one float32 sum over k in order (fused multiply-adds),
// times its channel's scale, rounded to bfloat16: the same whatever rows share the call.
// Built with decode_attention.cpp by engine/kernels.py; the operators are
// torch.ops.llamawrapper.int8_weight_blocks and torch.ops.llamawrapper.int8_rows_mm.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t kBlockN = 64;  // output channels of a block
constexpr int64_t kPrefetchK = 64;  // how far ahead a block's weights are prefetched, in k (lines)

// [N, K] int8 -> [N / 64, K, 64] int8: for each block and each k, its 64 channels' weights
torch::Tensor int8_weight_blocks(torch::Tensor weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar, "int8_weight_blocks: weight must be [N, K] int8");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(N % kBlockN == 0, "int8_weight_blocks: out_features ", N, " is not a multiple of ", kBlockN);
  return weight.view({N / kBlockN, kBlockN, K}).transpose(1, 2).contiguous();
}

#if defined(CPU_CAPABILITY_AVX512)
// R rows of x (float32, row stride K) times one block of weights -> o[r][0..64) (row stride N)
template <int R>
inline void block_rows(const float* x, const int8_t* wb, int64_t K, const float* scale, at::BFloat16* o, int64_t N) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    // the line 64 k ahead (4 KB): with the hardware's prefetcher alone a one-row call read its
    // weights from memory at ~28 GB/s (smollm2's cold head in 1.0 ms; 0.59-0.76 ms with this)
    _mm_prefetch(reinterpret_cast<const char*>(wb + (k + kPrefetchK) * kBlockN), _MM_HINT_T0);
    __m512 w[4];
    for (int c = 0; c < 4; ++c)
      w[c] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + k * kBlockN + 16 * c))));
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * K + k]);
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(xv, w[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; c += 2) {
      const __m512 a = _mm512_mul_ps(acc[r][c], _mm512_loadu_ps(scale + 16 * c));
      const __m512 b = _mm512_mul_ps(acc[r][c + 1], _mm512_loadu_ps(scale + 16 * (c + 1)));
      _mm512_storeu_si512(reinterpret_cast<__m512i*>(o + r * N + 16 * c), at::vec::cvtfp32_bf16(a, b));
    }
}
#else
template <int R>
inline void block_rows(const float* x, const int8_t* wb, int64_t K, const float* scale, at::BFloat16* o, int64_t N) {
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < kBlockN; ++j) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc = std::fma(x[r * K + k], static_cast<float>(wb[k * kBlockN + j]), acc);
      o[r * N + j] = static_cast<at::BFloat16>(acc * scale[j]);
    }
}
#endif

// x [M, K] bfloat16, blocks [N / 64, K, 64] int8 (int8_weight_blocks), scales [N] (float32 is
// used as it is; another dtype is widened per call) -> [M, N] bfloat16
torch::Tensor int8_rows_mm(torch::Tensor x, torch::Tensor blocks, torch::Tensor scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int8_rows_mm: x must be [M, K] bfloat16");
  TORCH_CHECK(blocks.dim() == 3 && blocks.scalar_type() == at::kChar && blocks.size(2) == kBlockN && blocks.is_contiguous(),
              "int8_rows_mm: blocks must be int8_weight_blocks' [N / 64, K, 64] int8");
  const int64_t M = x.size(0), K = x.size(1), N = blocks.size(0) * kBlockN;
  TORCH_CHECK(blocks.size(1) == K, "int8_rows_mm: x has ", K, " features, the weights ", blocks.size(1));
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == N, "int8_rows_mm: scales must be [", N, "]");
  const auto xf = x.to(at::kFloat).contiguous();
  const auto sf = scales.to(at::kFloat).contiguous();
  auto out = torch::empty({M, N}, x.options());
  const float* X = xf.data_ptr<float>();
  const int8_t* W = blocks.data_ptr<int8_t>();
  const float* S = sf.data_ptr<float>();
  at::BFloat16* O = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, N / kBlockN, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int8_t* wb = W + b * K * kBlockN;
      const int64_t n = b * kBlockN;
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) block_rows<4>(X + m * K, wb, K, S + n, O + m * N + n, N);
      switch (M - m) {
        case 3: block_rows<3>(X + m * K, wb, K, S + n, O + m * N + n, N); break;
        case 2: block_rows<2>(X + m * K, wb, K, S + n, O + m * N + n, N); break;
        case 1: block_rows<1>(X + m * K, wb, K, S + n, O + m * N + n, N); break;
        default: break;
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llamawrapper, m) {
  m.def("int8_weight_blocks(Tensor weight) -> Tensor");
  m.def("int8_rows_mm(Tensor x, Tensor blocks, Tensor scales) -> Tensor");
}
TORCH_LIBRARY_IMPL(llamawrapper, CPU, m) {
  m.impl("int8_weight_blocks", &int8_weight_blocks);
  m.impl("int8_rows_mm", &int8_rows_mm);
}
