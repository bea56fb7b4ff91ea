// int8 weights times bfloat16 rows, for an int8 model's projections and the int8 output head of
// int8 and int4 models: torch's _weight_int8pack_mm read smollm2's 28 MB int8 head at ~25 GB/s
// at one row, and sums each output across its lanes. Here the weights are laid out once in
// blocks of 64 output channels, two input features after two (int8_weight_blocks), so each
// 128-byte line holds two inputs of the block's 64 channels. A line becomes four vectors of
// bfloat16 weights (an int8 value is exact in bfloat16), and AVX512-BF16's dot product
// (vdpbf16ps) multiplies two inputs of 16 channels by the row's two bfloat16 inputs and adds them
// in float32, 32 products an instruction; each output's float32 sum, times its channel's scale,
// is rounded to bfloat16. Up to 4 rows share each converted line; a call of more rows converts
// each block once into a buffer that all its rows read (then the dot products bound it, as in
// int4_rows.cpp). A row's result is the same whatever rows share the call. Built with
// decode_attention.cpp by engine/kernels.py; the operators are
// torch.ops.llamawrapper.int8_weight_blocks and torch.ops.llamawrapper.int8_rows_mm.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <vector>

#include "kernels.h"
#include "row_tasks.h"

namespace {

using llamawrapper_rows::kBlockN;
constexpr int64_t kLine = 2 * kBlockN;  // weights of a line: a block's two inputs
constexpr int64_t kPrefetch = 32;     // how far ahead a block's lines are prefetched (128 bytes each)
constexpr int64_t kBufferRows = 4;    // a task of more rows converts its block once, into a buffer

// [N, K] -> [N / 64, K / 2, 64, 2] (int8 or bfloat16, named ``kind`` in errors): for block b and
// input pair p, channel j's weights at inputs 2p and 2p + 1
torch::Tensor pair_blocks(const torch::Tensor& weight, at::ScalarType dtype, const char* name, const char* kind) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == dtype, name, ": weight must be [N, K] ", kind);
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(N % kBlockN == 0, name, ": out_features ", N, " is not a multiple of ", kBlockN);
  TORCH_CHECK(K % 2 == 0, name, ": in_features ", K, " is odd");
  return weight.view({N / kBlockN, kBlockN, K / 2, 2}).transpose(1, 2).contiguous();
}

torch::Tensor int8_weight_blocks(torch::Tensor weight) { return pair_blocks(weight, at::kChar, "int8_weight_blocks", "int8"); }
torch::Tensor bf16_weight_blocks(torch::Tensor weight) {
  return pair_blocks(weight, at::kBFloat16, "bf16_weight_blocks", "bfloat16");
}

#if defined(CPU_CAPABILITY_AVX512)
#pragma GCC push_options
#pragma GCC target("avx512bf16")

// a line (two inputs of 64 channels, int8) as four vectors of bfloat16 weights, channels 0-15,
// 16-31, 32-47, 48-63, each pair of lanes the two inputs
inline void convert_line(const int8_t* line, __m512bh w[4]) {
  for (int c = 0; c < 4; ++c) {
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(line + 32 * c))));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(line + 32 * c + 16))));
    w[c] = _mm512_cvtne2ps_pbh(hi, lo);  // exact: |w| <= 128
  }
}

// the weights' kinds: a line's bytes and its four vectors of bfloat16 weights
struct Int8Lines {
  using T = int8_t;
  static constexpr bool kVectors = false;  // converted: a call of many rows converts each block once
  static constexpr int64_t kBytes = 2 * kBlockN;
  static inline void vectors(const int8_t* line, __m512bh w[4]) { convert_line(line, w); }
};
struct Bf16Lines {
  using T = at::BFloat16;
  static constexpr bool kVectors = true;  // already the vectors: a call of many rows reads them where they are
  static constexpr int64_t kBytes = 4 * kBlockN;
  static inline void vectors(const at::BFloat16* line, __m512bh w[4]) {
    for (int c = 0; c < 4; ++c) w[c] = (__m512bh)_mm512_loadu_si512(line + 32 * c);
  }
};

// R rows of x (bfloat16, row stride K) times one block -> o[r][0..64) (row stride N), each
// channel's sum times its scale (none: bfloat16 weights); the block's lines from wb, or,
// kBuffered, its vectors (Lines::vectors', line after line)
template <int R, bool kBuffered, typename Lines>
inline void block_rows(const at::BFloat16* x, const void* wb, int64_t K, const float* scale, at::BFloat16* o, int64_t N,
                       const llamawrapper_rows::NextBlock& next) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  const int32_t* xp[R];
  for (int r = 0; r < R; ++r) xp[r] = reinterpret_cast<const int32_t*>(x + r * K);
  for (int64_t p = 0; p < K / 2; ++p) {
    next.step(p);
    __m512bh w[4];
    if constexpr (kBuffered) {
      const __m512bh* v = static_cast<const __m512bh*>(wb) + 4 * p;
      for (int c = 0; c < 4; ++c) w[c] = v[c];
    } else {
      const auto* line = static_cast<const typename Lines::T*>(wb) + p * kLine;
      const char* ahead = reinterpret_cast<const char*>(line) + kPrefetch * Lines::kBytes;
      for (int64_t b = 0; b < Lines::kBytes; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
      Lines::vectors(line, w);
    }
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(xp[r][p]);  // inputs 2p and 2p + 1
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], w[c], xv);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; c += 2) {
      const __m512 a = scale ? _mm512_mul_ps(acc[r][c], _mm512_loadu_ps(scale + 16 * c)) : acc[r][c];
      const __m512 b = scale ? _mm512_mul_ps(acc[r][c + 1], _mm512_loadu_ps(scale + 16 * (c + 1))) : acc[r][c + 1];
      _mm512_storeu_si512(reinterpret_cast<__m512i*>(o + r * N + 16 * c), at::vec::cvtfp32_bf16(a, b));
    }
}

// block b for rows [m0, m1); buffer: K / 2 * 4 vectors, for int8 tasks of more than kBufferRows rows
template <typename Lines>
__attribute__((noinline)) void block_range(const at::BFloat16* X, const typename Lines::T* W, const float* S, int64_t K,
                                           int64_t N, at::BFloat16* O, int64_t b, int64_t m0, int64_t m1, __m512bh* buffer) {
  const typename Lines::T* wb = W + b * (K / 2) * kLine;
  const float* scale = S ? S + b * kBlockN : nullptr;
  at::BFloat16* o = O + b * kBlockN;
  const auto rows = [&](auto buffered, const void* from) {
    llamawrapper_rows::in_fours(m0, m1, [&](auto r, int64_t m) {
      const llamawrapper_rows::NextBlock next(wb, (K / 2) * kLine * sizeof(typename Lines::T), b, N / kBlockN, m0, m1, m, K / 2);
      block_rows<decltype(r)::value, decltype(buffered)::value, Lines>(X + m * K, from, K, scale, o + m * N, N, next);
    });
  };
  if (m1 - m0 <= kBufferRows) {
    rows(std::false_type{}, wb);
  } else if constexpr (Lines::kVectors) {
    rows(std::true_type{}, wb);
  } else {
    for (int64_t p = 0; p < K / 2; ++p) Lines::vectors(wb + p * kLine, buffer + 4 * p);
    rows(std::true_type{}, buffer);
  }
}
#pragma GCC pop_options
#endif

// x [..., K] bfloat16 times blocks [N / 64, K / 2, 64, 2] (of Lines::T), each channel's sum times
// S[n] (S null: none) -> [..., N] bfloat16
template <typename Lines>
torch::Tensor rows_mm(const char* name, const torch::Tensor& x, const torch::Tensor& blocks, const float* S) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kBFloat16, name, ": x must be [..., K] bfloat16");
  const auto xc = llamawrapper_rows::as_rows(x);
  const int64_t M = xc.size(0), K = xc.size(1), N = blocks.size(0) * kBlockN;
  TORCH_CHECK(blocks.size(1) * 2 == K, name, ": x has ", K, " features, the weights ", blocks.size(1) * 2);
#if defined(CPU_CAPABILITY_AVX512)
  TORCH_CHECK(__builtin_cpu_supports("avx512bf16"), name, ": this CPU has no AVX512-BF16");
  auto out = torch::empty({M, N}, x.options());
  const at::BFloat16* X = xc.data_ptr<at::BFloat16>();
  const auto* W = static_cast<const typename Lines::T*>(blocks.data_ptr());
  at::BFloat16* O = out.data_ptr<at::BFloat16>();
  llamawrapper_rows::for_block_tasks(M, N / kBlockN, [&](int64_t b, int64_t m0, int64_t m1) {
    thread_local std::vector<__m512bh> buffer;  // (kept: a call would otherwise map and fault in 196 KB)
    if (!Lines::kVectors && m1 - m0 > kBufferRows && buffer.size() < static_cast<size_t>(K / 2 * 4)) buffer.resize(K / 2 * 4);
    block_range<Lines>(X, W, S, K, N, O, b, m0, m1, buffer.data());
  });
  return out.view(llamawrapper_rows::rows_shape(x, N));
#else
  TORCH_CHECK(false, name, ": built without AVX-512");
#endif
}

}  // namespace

namespace llamawrapper {

// x [..., K] bfloat16, blocks [N / 64, K / 2, 64, 2] int8 (int8_weight_blocks), scales [N] (float32
// is used as it is; another dtype is widened per call) -> [..., N] bfloat16
torch::Tensor int8_rows_mm(torch::Tensor x, torch::Tensor blocks, torch::Tensor scales) {
  TORCH_CHECK(blocks.dim() == 4 && blocks.scalar_type() == at::kChar && blocks.size(2) == kBlockN && blocks.size(3) == 2 &&
                  blocks.is_contiguous(),
              "int8_rows_mm: blocks must be int8_weight_blocks' [N / 64, K / 2, 64, 2] int8");
  const int64_t N = blocks.size(0) * kBlockN;
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == N, "int8_rows_mm: scales must be [", N, "]");
  const auto sf = scales.to(at::kFloat).contiguous();
#if defined(CPU_CAPABILITY_AVX512)
  return rows_mm<Int8Lines>("int8_rows_mm", x, blocks, sf.data_ptr<float>());
#else
  TORCH_CHECK(false, "int8_rows_mm: built without AVX-512");
#endif
}

// x [..., K] bfloat16, blocks [N / 64, K / 2, 64, 2] bfloat16 (bf16_weight_blocks) -> [..., N] bfloat16
torch::Tensor bf16_rows_mm(torch::Tensor x, torch::Tensor blocks) {
  TORCH_CHECK(blocks.dim() == 4 && blocks.scalar_type() == at::kBFloat16 && blocks.size(2) == kBlockN &&
                  blocks.size(3) == 2 && blocks.is_contiguous(),
              "bf16_rows_mm: blocks must be bf16_weight_blocks' [N / 64, K / 2, 64, 2] bfloat16");
#if defined(CPU_CAPABILITY_AVX512)
  return rows_mm<Bf16Lines>("bf16_rows_mm", x, blocks, nullptr);
#else
  TORCH_CHECK(false, "bf16_rows_mm: built without AVX-512");
#endif
}

}  // namespace llamawrapper

TORCH_LIBRARY_FRAGMENT(llamawrapper, m) {
  m.def("int8_weight_blocks(Tensor weight) -> Tensor");
  m.def("int8_rows_mm(Tensor x, Tensor blocks, Tensor scales) -> Tensor");
  m.def("bf16_weight_blocks(Tensor weight) -> Tensor");
  m.def("bf16_rows_mm(Tensor x, Tensor blocks) -> Tensor");
}
TORCH_LIBRARY_IMPL(llamawrapper, CPU, m) {
  m.impl("int8_weight_blocks", &int8_weight_blocks);
  m.impl("int8_rows_mm", &llamawrapper::int8_rows_mm);
  m.impl("bf16_weight_blocks", &bf16_weight_blocks);
  m.impl("bf16_rows_mm", &llamawrapper::bf16_rows_mm);
}
