// int4 weights as bfloat16, for the prefill of an int4 model: torch's packed int4 kernel
// (_weight_int4pack_mm_for_cpu) is made for a few rows; a prefill chunk of hundreds of rows is
// faster as one bfloat16 GEMM over the weights unpacked here, once per forward.
// Built with decode_attention.cpp by engine/kernels.py; the operator is
// torch.ops.llamawrapper.int4_weight_bf16.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace {

using Vec = at::vec::Vectorized<float>;

// the packed layout (_convert_weight_to_int4pack_for_cpu, as torch 2.13 lays it out on x86):
// output channels in blocks of 64; for each input k, 32 bytes, byte j holding channel j of the
// block in its low nibble and channel 32 + j in its high one
constexpr int64_t kBlockN = 64;

// 64 nibbles of one (k, block) as float32 values 0..15, in channel order
inline void nibbles(const uint8_t* p, float* out) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_and_si256(b, mask), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
  _mm512_storeu_ps(out, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(lo))));
  _mm512_storeu_ps(out + 16, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(lo, 1))));
  _mm512_storeu_ps(out + 32, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(hi))));
  _mm512_storeu_ps(out + 48, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(hi, 1))));
#else
  for (int64_t j = 0; j < kBlockN / 2; ++j) {
    out[j] = static_cast<float>(p[j] & 0x0F);
    out[j + kBlockN / 2] = static_cast<float>(p[j] >> 4);
  }
#endif
}

// 2 * Vec::size() float32 values rounded to bfloat16 (to nearest, ties to even) at ``out``
inline void store_bf16(const Vec& a, const Vec& b, at::BFloat16* out) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_storeu_si512(reinterpret_cast<__m512i*>(out), at::vec::cvtfp32_bf16(__m512(a), __m512(b)));
#else
  float f[2 * Vec::size()];
  a.store(f);
  b.store(f + Vec::size());
  for (int64_t i = 0; i < 2 * Vec::size(); ++i) out[i] = static_cast<at::BFloat16>(f[i]);
#endif
}

// packed [N, K/2] uint8, scales_and_zeros [K/G, N, 2] bfloat16 (w = (q - 8) * scale + zero)
// -> [K, N] bfloat16, the transposed weight (y = x @ out)
torch::Tensor int4_weight_bf16(torch::Tensor packed, torch::Tensor scales_and_zeros, int64_t group_size) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "int4_weight_bf16: packed must be [N, K/2] uint8, contiguous");
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(N % kBlockN == 0, "int4_weight_bf16: out_features ", N, " is not a multiple of ", kBlockN);
  TORCH_CHECK(group_size > 0 && K % group_size == 0, "int4_weight_bf16: bad group size");
  TORCH_CHECK(scales_and_zeros.dim() == 3 && scales_and_zeros.size(0) == K / group_size && scales_and_zeros.size(1) == N &&
                  scales_and_zeros.size(2) == 2 && scales_and_zeros.scalar_type() == at::kBFloat16 &&
                  scales_and_zeros.is_contiguous(),
              "int4_weight_bf16: scales_and_zeros must be [K/group, N, 2] bfloat16, contiguous");
  auto out = torch::empty({K, N}, packed.options().dtype(at::kBFloat16));
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const at::BFloat16* sz = scales_and_zeros.data_ptr<at::BFloat16>();
  at::BFloat16* o = out.data_ptr<at::BFloat16>();
  const int64_t blocks = N / kBlockN, W = Vec::size();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float q[kBlockN], scale[kBlockN], shift[kBlockN];
    for (int64_t nb = begin; nb < end; ++nb) {
      const uint8_t* pb = p + nb * K * (kBlockN / 2);  // the block's bytes, k after k
      for (int64_t g = 0; g < K / group_size; ++g) {
        for (int64_t j = 0; j < kBlockN; ++j) {  // this group's scale and (zero - 8 * scale) per channel
          const at::BFloat16* e = sz + (g * N + nb * kBlockN + j) * 2;
          scale[j] = static_cast<float>(e[0]);
          shift[j] = static_cast<float>(e[1]) - 8.f * scale[j];
        }
        for (int64_t k = g * group_size; k < (g + 1) * group_size; ++k) {
          nibbles(pb + k * (kBlockN / 2), q);
          at::BFloat16* ok = o + k * N + nb * kBlockN;
          for (int64_t j = 0; j < kBlockN; j += 2 * W) {
            const Vec a = at::vec::fmadd(Vec::loadu(q + j), Vec::loadu(scale + j), Vec::loadu(shift + j));
            const Vec b = at::vec::fmadd(Vec::loadu(q + j + W), Vec::loadu(scale + j + W), Vec::loadu(shift + j + W));
            store_bf16(a, b, ok + j);
          }
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llamawrapper, m) {
  m.def("int4_weight_bf16(Tensor packed, Tensor scales_and_zeros, int group_size) -> Tensor");
}
TORCH_LIBRARY_IMPL(llamawrapper, CPU, m) { m.impl("int4_weight_bf16", &int4_weight_bf16); }
