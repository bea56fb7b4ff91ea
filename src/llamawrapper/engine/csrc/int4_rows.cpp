// int4 weights times bfloat16 rows, for an int4 model's projections in decode and verify steps:
// torch's _weight_int4pack_mm_for_cpu widens each weight to float32, dequantizes it with a
// multiply-add and multiplies it by each row with another: ~3 ms of a ~6 ms one-row decode step
// of int4 smollm2, bound by those instructions, not by the 53 MB it reads. Here each weight
// becomes a bfloat16 value q - 8 (exact) by a table lookup, and AVX512-BF16's dot product
// (vdpbf16ps) multiplies two input features of 16 output channels by the row's bfloat16 inputs
// and adds them in float32, 32 products an instruction; each group of input features is summed
// on its own and then scaled: y = sum_g scale_g * sum_k (q - 8) x_k + zero_g * sum_k x_k.
// The weights are laid out once (int4_weight_pairs) in blocks of 64 output channels, two input
// features after two, one 64-byte line each; up to 4 rows share each unpacked line. A row's
// result is the same whatever rows share the call. Built with decode_attention.cpp by
// engine/kernels.py; the operators are torch.ops.llamawrapper.int4_weight_pairs and
// torch.ops.llamawrapper.int4_rows_mm.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include "kernels.h"
#include "row_tasks.h"

namespace {

using llamawrapper_rows::kBlockN;
constexpr int64_t kPrefetch = 48;   // how far ahead a block's lines are prefetched (64 bytes each)

// q [N, K] (values 0..15, any integer dtype) -> [N / 64, K / 2, 64] uint8: for block b and input
// pair p, byte 2i + t of the first 32 holds channel i (low nibble) and 16 + i (high) at input
// 2p + t, of the last 32 channels 32 + i and 48 + i
torch::Tensor int4_weight_pairs(torch::Tensor q) {
  TORCH_CHECK(q.dim() == 2, "int4_weight_pairs: q must be [N, K]");
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(N % kBlockN == 0, "int4_weight_pairs: out_features ", N, " is not a multiple of ", kBlockN);
  TORCH_CHECK(K % 2 == 0, "int4_weight_pairs: in_features ", K, " is odd");
  auto v = q.to(at::kByte).view({N / kBlockN, 2, 2, 16, K / 2, 2});  // [b, half h, nibble, i, p, t]
  auto bytes = v.select(2, 0).bitwise_or(v.select(2, 1).bitwise_left_shift(4));  // [b, h, i, p, t]
  return bytes.permute({0, 3, 1, 2, 4}).contiguous().view({N / kBlockN, K / 2, kBlockN});
}

#if defined(CPU_CAPABILITY_AVX512)
// 16 bfloat16 values as float32 (exact: the 16 bits shifted up)
inline __m512 widen16(const at::BFloat16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

#pragma GCC push_options
#pragma GCC target("avx512bf16")

// a 64-byte line of the layout (two inputs of the block's 64 channels) as four vectors of
// bfloat16 weights q - 8, channels 0-15, 16-31, 32-47, 48-63, each pair of lanes the two inputs
inline void unpack_line(const uint8_t* line, __m512bh w[4]) {
  // bfloat16 values of q - 8 for q = 0..15 (vpermw reads the low 5 bits of each index)
  alignas(64) static const uint16_t table[32] = {0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80,
                                                 0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0};
  const __m512i lut = _mm512_load_si512(table);
  const __m512i low = _mm512_set1_epi16(0x0F);
  const __m512i a = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(line)));
  const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(line + 32)));
  w[0] = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(a, low), lut);
  w[1] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(a, 4), lut);
  w[2] = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(b, low), lut);
  w[3] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), lut);
}

// R rows of x (bfloat16, row stride K), their group sums (float32, row stride K / G), times one
// block's lines wb -> o[r][0..64) (row stride N); sz: the block's [K / G, 2, 64] bfloat16 scales
// and zeros (the model's own values: float32 copies were half again the nibbles' bytes, read at
// every step). At hundreds of rows this is bound by the dot products (one a cycle): unpacking each
// line once for all rows instead of once for every 4 was no faster.
template <int R>
inline void block_rows(const at::BFloat16* x, const float* sums, const uint8_t* wb, const at::BFloat16* sz, int64_t K,
                       int64_t G, at::BFloat16* o, int64_t N, const llamawrapper_rows::NextBlock& next) {
  const int64_t groups = K / G;
  __m512 total[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) total[r][c] = _mm512_setzero_ps();
  const int32_t* xp[R];
  for (int r = 0; r < R; ++r) xp[r] = reinterpret_cast<const int32_t*>(x + r * K);
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int64_t p = g * G / 2; p < (g + 1) * G / 2; ++p) {
      const uint8_t* line = wb + p * kBlockN;
      _mm_prefetch(reinterpret_cast<const char*>(line + kPrefetch * kBlockN), _MM_HINT_T0);
      next.step(p);
      __m512bh w[4];
      unpack_line(line, w);
      for (int r = 0; r < R; ++r) {
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(xp[r][p]);  // inputs 2p and 2p + 1
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], w[c], xv);
      }
    }
    const at::BFloat16* s = sz + g * 2 * kBlockN;
    for (int c = 0; c < 4; ++c) {  // one vector of scales and one of zeros live at a time
      const __m512 scale = widen16(s + 16 * c), zero = widen16(s + kBlockN + 16 * c);
      for (int r = 0; r < R; ++r) {
        total[r][c] = _mm512_fmadd_ps(acc[r][c], scale, total[r][c]);
        total[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(sums[r * groups + g]), zero, total[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; c += 2)
      _mm512_storeu_si512(reinterpret_cast<__m512i*>(o + r * N + 16 * c), at::vec::cvtfp32_bf16(total[r][c], total[r][c + 1]));
}

// block b for rows [m0, m1)
__attribute__((noinline)) void block_range(const at::BFloat16* X, const float* sums, const uint8_t* W, const at::BFloat16* SZ,
                                           int64_t K, int64_t G, int64_t N, at::BFloat16* O, int64_t b, int64_t m0,
                                           int64_t m1) {
  const int64_t groups = K / G;
  const uint8_t* wb = W + b * (K / 2) * kBlockN;
  const at::BFloat16* sz = SZ + b * groups * 2 * kBlockN;
  at::BFloat16* o = O + b * kBlockN;
  llamawrapper_rows::in_fours(m0, m1, [&](auto rows, int64_t m) {
    const llamawrapper_rows::NextBlock next(wb, (K / 2) * kBlockN, b, N / kBlockN, m0, m1, m, K / 2);
    block_rows<decltype(rows)::value>(X + m * K, sums + m * groups, wb, sz, K, G, o + m * N, N, next);
  });
}
#pragma GCC pop_options

// the sum of each group of a row's inputs, in float32, in one fixed order (a row's own)
inline void group_sums(const at::BFloat16* x, int64_t K, int64_t G, float* out) {
  for (int64_t g = 0; g < K / G; ++g) {
    const at::BFloat16* xg = x + g * G;
    float s = 0.f;
    int64_t k = 0;
    if (G % 16 == 0) {
      __m512 acc = _mm512_setzero_ps();
      for (; k < G; k += 16) acc = _mm512_add_ps(acc, widen16(xg + k));
      s = _mm512_reduce_add_ps(acc);
    }
    for (; k < G; ++k) s += static_cast<float>(xg[k]);
    out[g] = s;
  }
}
#endif

}  // namespace

namespace llamawrapper {

// x [..., K] bfloat16, blocks [N / 64, K / 2, 64] uint8 (int4_weight_pairs), scales_and_zeros
// [N / 64, K / G, 2, 64] bfloat16 (w = (q - 8) * scale + zero) -> [..., N] bfloat16
torch::Tensor int4_rows_mm(torch::Tensor x, torch::Tensor blocks, torch::Tensor scales_and_zeros, int64_t group_size) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kBFloat16, "int4_rows_mm: x must be [..., K] bfloat16");
  TORCH_CHECK(blocks.dim() == 3 && blocks.scalar_type() == at::kByte && blocks.size(2) == kBlockN && blocks.is_contiguous(),
              "int4_rows_mm: blocks must be int4_weight_pairs' [N / 64, K / 2, 64] uint8");
  const auto xc = llamawrapper_rows::as_rows(x);
  const int64_t M = xc.size(0), K = xc.size(1), N = blocks.size(0) * kBlockN;
  TORCH_CHECK(blocks.size(1) * 2 == K, "int4_rows_mm: x has ", K, " features, the weights ", blocks.size(1) * 2);
  TORCH_CHECK(group_size > 0 && group_size % 2 == 0 && K % group_size == 0, "int4_rows_mm: bad group size ", group_size);
  const int64_t groups = K / group_size;
  TORCH_CHECK(scales_and_zeros.dim() == 4 && scales_and_zeros.scalar_type() == at::kBFloat16 && scales_and_zeros.is_contiguous() &&
                  scales_and_zeros.size(0) == N / kBlockN && scales_and_zeros.size(1) == groups &&
                  scales_and_zeros.size(2) == 2 && scales_and_zeros.size(3) == kBlockN,
              "int4_rows_mm: scales_and_zeros must be [N / 64, K / group, 2, 64] bfloat16, contiguous");
#if defined(CPU_CAPABILITY_AVX512)
  TORCH_CHECK(__builtin_cpu_supports("avx512bf16"), "int4_rows_mm: this CPU has no AVX512-BF16");
  auto out = torch::empty({M, N}, x.options());
  // each row's group sums (the zero points' share)
  auto sums = torch::empty({M, groups}, x.options().dtype(at::kFloat));
  const at::BFloat16* X = xc.data_ptr<at::BFloat16>();
  float* S = sums.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) group_sums(X + m * K, K, group_size, S + m * groups);
  });
  const uint8_t* W = blocks.data_ptr<uint8_t>();
  const at::BFloat16* SZ = scales_and_zeros.data_ptr<at::BFloat16>();
  at::BFloat16* O = out.data_ptr<at::BFloat16>();
  llamawrapper_rows::for_block_tasks(M, N / kBlockN, [&](int64_t b, int64_t m0, int64_t m1) {
    block_range(X, S, W, SZ, K, group_size, N, O, b, m0, m1);
  });
  return out.view(llamawrapper_rows::rows_shape(x, N));
#else
  TORCH_CHECK(false, "int4_rows_mm: built without AVX-512");
#endif
}

}  // namespace llamawrapper

TORCH_LIBRARY_FRAGMENT(llamawrapper, m) {
  m.def("int4_weight_pairs(Tensor q) -> Tensor");
  m.def("int4_rows_mm(Tensor x, Tensor blocks, Tensor scales_and_zeros, int group_size) -> Tensor");
}
TORCH_LIBRARY_IMPL(llamawrapper, CPU, m) {
  m.impl("int4_weight_pairs", &int4_weight_pairs);
  m.impl("int4_rows_mm", &llamawrapper::int4_rows_mm);
}
