// The small steps of a decode step's layer, each one call instead of torch's several: the
// residual add with the RMS norm after it, and the MLP's SiLU(gate) * up. Float32 or bfloat16
// activations; each row computed alone (its result does not depend on the others of the call).
// Built with decode_attention.cpp by engine/attention_kernel.py, which binds them.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <tuple>

namespace {

using Vec = at::vec::Vectorized<float>;

// Each row of h (+ delta, rounded to the activations' dtype as torch's add rounds it) and its
// RMS norm: x = weight * round(h * rsqrt(mean(h^2) + eps)), as transformers' Llama RMSNorm computes
// it (in float32, the normalised row rounded to the activations' dtype before the weight).
template <typename A, typename Wt>
void add_norm_rows(A* h, const A* delta, const Wt* w, A* x, int64_t R, int64_t D, float eps) {
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> f(D);
    for (int64_t r = begin; r < end; ++r) {
      A* hr = h + r * D;
      const A* dr = delta ? delta + r * D : nullptr;
      float ss = 0.f;
      for (int64_t d = 0; d < D; ++d) {
        if (dr) hr[d] = static_cast<A>(static_cast<float>(hr[d]) + static_cast<float>(dr[d]));
        f[d] = static_cast<float>(hr[d]);
        ss += f[d] * f[d];
      }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
      A* xr = x + r * D;
      for (int64_t d = 0; d < D; ++d)
        xr[d] = static_cast<A>(static_cast<float>(w[d]) * static_cast<float>(static_cast<A>(f[d] * inv)));
    }
  });
}

}  // namespace

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
