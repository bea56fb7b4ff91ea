// A decode step's decoder layers in one call: the runner's eager layer loop (runner.py, ``forward``)
// without Python between its kernel calls. Per layer, in the loop's order and on the same operands:
// the residual add and RMS norm, the fused q/k/v projection, RoPE + cache write + attention, the
// output projection, add and norm, the fused gate/up projection, SiLU(gate) * up (torch's ops, as
// the loop calls them) and the down projection; so the result is the loop's, bit for bit. On a
// one-row int4 step of smollm2, ~1.7 ms of ~6 ms went to Python and torch's dispatch between these
// calls. Built with decode_attention.cpp by engine/kernels.py; bound (bind_decode_layers) as the class
// ``DecodeLayers``, which runner._layer_loop makes once per runner.
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels.h"

namespace {

// One projection through the project's kernel of its kind, on weights laid out for it (packed.py)
struct Projection {
  enum Kind : int64_t { kF32 = 0, kBf16 = 1, kInt8 = 2, kInt4 = 3 };
  int64_t kind;
  torch::Tensor packed;
  std::optional<torch::Tensor> extra;  // int8: the float32 scales; int4: the bfloat16 scales and zeros
  int64_t group_size;                  // int4's
  std::optional<torch::Tensor> bias;

  torch::Tensor operator()(const torch::Tensor& x) const {
    torch::Tensor y;
    switch (kind) {
      case kF32: y = llamawrapper::f32_rows_mm(x, packed); break;
      case kBf16: y = llamawrapper::bf16_rows_mm(x, packed); break;
      case kInt8: y = llamawrapper::int8_rows_mm(x, packed, *extra); break;
      default: y = llamawrapper::int4_rows_mm(x, packed, *extra, group_size); break;
    }
    return bias.has_value() ? y + *bias : y;
  }
};

// (kind, packed, extra, group_size, bias), as Python gives it
using ProjectionSpec = std::tuple<int64_t, torch::Tensor, std::optional<torch::Tensor>, int64_t, std::optional<torch::Tensor>>;
// (input norm weight, its eps, post-attention norm weight, its eps, q/k/v, o, gate/up, down)
using LayerSpec = std::tuple<torch::Tensor, double, torch::Tensor, double, ProjectionSpec, ProjectionSpec, ProjectionSpec,
                             ProjectionSpec>;

Projection projection(const ProjectionSpec& s) {
  const auto& [kind, packed, extra, group_size, bias] = s;
  TORCH_CHECK(kind >= Projection::kF32 && kind <= Projection::kInt4, "DecodeLayers: unknown projection kind ", kind);
  TORCH_CHECK(extra.has_value() == (kind == Projection::kInt8 || kind == Projection::kInt4),
              "DecodeLayers: int8 and int4 projections take their scales, the others none");
  return {kind, packed, extra, group_size, bias};
}

struct Layer {
  torch::Tensor norm_in, norm_post;
  double eps_in, eps_post;
  Projection qkv, o, gate_up, down;
};

class DecodeLayers {
 public:
  DecodeLayers(const std::vector<LayerSpec>& layers, int64_t heads) : heads_(heads) {
    TORCH_CHECK(!layers.empty() && heads > 0, "DecodeLayers: no layers or heads");
    for (const auto& s : layers)
      layers_.push_back({std::get<0>(s), std::get<2>(s), std::get<1>(s), std::get<3>(s), projection(std::get<4>(s)),
                         projection(std::get<5>(s)), projection(std::get<6>(s)), projection(std::get<7>(s))});
  }

  // h [B, 1, hidden] (the embedded tokens, updated in place), cos/sin [B, D], layer i's slot cache
  // k[i], v[i], each row's position and prompt sharing as rope_write_attention takes them -> the
  // last layer's output added to h, [B, 1, hidden]
  torch::Tensor operator()(torch::Tensor h, const torch::Tensor& cos, const torch::Tensor& sin,
                           const std::vector<torch::Tensor>& k, const std::vector<torch::Tensor>& v,
                           const torch::Tensor& positions, const std::optional<torch::Tensor>& src,
                           const std::optional<torch::Tensor>& shared) const {
    TORCH_CHECK(k.size() == layers_.size() && v.size() == layers_.size(), "DecodeLayers: ", layers_.size(),
                " layers, caches for ", k.size(), " and ", v.size());
    TORCH_CHECK(h.dim() == 3 && h.size(1) == 1, "DecodeLayers: h must be [B, 1, hidden]");
    const int64_t B = h.size(0);
    std::optional<torch::Tensor> pending;  // the last MLP's output, added to h with the next norm
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& L = layers_[i];
      const int64_t D = k[i].size(-1);
      torch::Tensor x = llamawrapper::add_rms_norm(h, pending, L.norm_in, L.eps_in);
      const torch::Tensor y = L.qkv(x);
      const torch::Tensor a =
          llamawrapper::rope_write_attention(y.view({B, -1, D}), cos, sin, k[i], v[i], positions, heads_, src, shared);
      x = llamawrapper::add_rms_norm(h, L.o(a.view({B, 1, heads_ * D})), L.norm_post, L.eps_post);
      const auto gate_up = L.gate_up(x).chunk(2, -1);
      pending = L.down(at::silu(gate_up[0]) * gate_up[1]);
    }
    return h + *pending;
  }

 private:
  std::vector<Layer> layers_;
  int64_t heads_;
};

}  // namespace

void bind_decode_layers(pybind11::module& m) {
  pybind11::class_<DecodeLayers>(m, "DecodeLayers")
      .def(pybind11::init<const std::vector<LayerSpec>&, int64_t>(), pybind11::arg("layers"), pybind11::arg("heads"))
      .def("__call__", &DecodeLayers::operator(), pybind11::arg("h"), pybind11::arg("cos"), pybind11::arg("sin"),
           pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("positions"), pybind11::arg("src") = pybind11::none(),
           pybind11::arg("shared") = pybind11::none(),
           pybind11::call_guard<pybind11::gil_scoped_release>());  // the server's event loop runs meanwhile
}
