// A layer's small steps, each one call instead of torch's several: the residual add with the RMS
// norm after it. Float32 or bfloat16 activations; each row computed alone (its result does not
// depend on the others of the call), vectorised, in a fixed order.
// Built with decode_attention.cpp by engine/kernels.py, which binds them.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace {

using Vec = at::vec::Vectorized<float>;

// n values of type A as float32 (exact) / float32 rounded to A as torch rounds it (to nearest even)
template <typename A>
inline void to_float(const A* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<A, float>) std::copy(src, src + n, dst);
  else at::vec::convert(src, dst, n);
}
template <typename A>
inline void from_float(const float* src, A* dst, int64_t n) {
  if constexpr (std::is_same_v<A, float>) std::copy(src, src + n, dst);
  else at::vec::convert(src, dst, n);
}

// Each row of h (+ delta, rounded to the activations' dtype as torch's add rounds it) and its
// RMS norm: x = weight * round(h * rsqrt(mean(h^2) + eps)), as transformers' Llama RMSNorm computes
// it (in float32, the normalised row rounded to the activations' dtype before the weight).
template <typename A, typename Wt>
void add_norm_rows(A* h, const A* delta, const Wt* w, A* x, int64_t R, int64_t D, float eps) {
  constexpr int64_t W = Vec::size();
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> f(D), g(D), wf(D);
    to_float(w, wf.data(), D);
    for (int64_t r = begin; r < end; ++r) {
      A* hr = h + r * D;
      to_float(hr, f.data(), D);
      if (delta) {  // h + delta, rounded to A, written back
        to_float(delta + r * D, g.data(), D);
        at::vec::map2([](Vec a, Vec b) { return a + b; }, f.data(), f.data(), g.data(), D);
        from_float(f.data(), hr, D);
        to_float(hr, f.data(), D);
      }
      Vec acc(0.f);  // the sum of squares, lane by lane, then the lanes in one fixed order
      for (int64_t d = 0; d < D; d += W) {
        const Vec v = Vec::loadu(f.data() + d, std::min(W, D - d));  // (a short tail reads zeros)
        acc = acc + v * v;
      }
      const float ss = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
      A* xr = x + r * D;
      at::vec::map([inv](Vec a) { return a * Vec(inv); }, g.data(), f.data(), D);
      from_float(g.data(), xr, D);  // the normalised row in A, then times the weight, rounded to A
      to_float(xr, g.data(), D);
      at::vec::map2([](Vec a, Vec b) { return a * b; }, g.data(), wf.data(), g.data(), D);
      from_float(g.data(), xr, D);
    }
  });
}

}  // namespace

namespace llamawrapper {

// h [.., D] (updated in place with delta, if given), weight [D] -> the normalised rows [.., D]
torch::Tensor add_rms_norm(torch::Tensor h, std::optional<torch::Tensor> delta, torch::Tensor weight, double eps) {
  TORCH_CHECK(h.is_contiguous() && (h.scalar_type() == at::kFloat || h.scalar_type() == at::kBFloat16),
              "add_rms_norm: h must be contiguous float32 or bfloat16");
  const int64_t D = h.size(-1), R = h.numel() / D;
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == D && weight.is_contiguous() &&
                  (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16),
              "add_rms_norm: weight must be [D] float32 or bfloat16");
  if (delta.has_value())
    TORCH_CHECK(delta->sizes() == h.sizes() && delta->scalar_type() == h.scalar_type() && delta->is_contiguous(),
                "add_rms_norm: delta must be h's shape and dtype, contiguous");
  auto x = torch::empty_like(h);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, h.scalar_type(), "add_rms_norm", [&] {
    using A = scalar_t;
    const A* dp = delta.has_value() ? delta->data_ptr<A>() : nullptr;
    if (weight.scalar_type() == at::kFloat)
      add_norm_rows<A, float>(h.data_ptr<A>(), dp, weight.data_ptr<float>(), x.data_ptr<A>(), R, D, static_cast<float>(eps));
    else
      add_norm_rows<A, at::BFloat16>(h.data_ptr<A>(), dp, weight.data_ptr<at::BFloat16>(), x.data_ptr<A>(), R, D,
                                     static_cast<float>(eps));
  });
  return x;
}

}  // namespace llamawrapper
