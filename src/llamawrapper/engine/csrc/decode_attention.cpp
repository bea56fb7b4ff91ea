// Decode attention over a slot cache: one query position per row, grouped-query heads, keys and
// values read in place (float32 or bfloat16, widened to float32 in registers), float32 math.
// Each (row, kv head) is one task over that row's own keys only, in a fixed order: a row's
// result does not depend on the other rows of the call nor on how far the batch's view reaches.
// Built by engine/attention_kernel.py with torch's cpp_extension (see there).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <utility>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

// 2 * Vec::size() consecutive elements, widened to float32
template <typename T>
inline std::pair<Vec, Vec> load2(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return {Vec::loadu(p), Vec::loadu(p + Vec::size())};
  } else {
    auto [a, b] = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
    return {a, b};
  }
}

// Vec::size() consecutive elements, widened to float32 (a head_dim with an odd number of vectors)
template <typename T>
inline Vec load1(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p, Vec::size())));
  }
}

// One (row, KV head) task: the g query heads at ``qp`` (float32, g x D) over the first n keys and
// values at ``kp``/``vp`` (rows ``kstride``/``vstride`` apart) -> g x D float32 at ``op``.
// ``s`` and ``acc`` are the calling thread's scratch.
template <typename T>
void attend_task(const float* qp, const T* kp, const T* vp, int64_t n, int64_t kstride, int64_t vstride, int64_t g,
                 int64_t D, float scale, std::vector<float>& s, std::vector<Vec>& acc, float* op) {
  const int64_t W = Vec::size(), C = D / W;
  s.resize(g * n);
  acc.resize(g * C);
  for (int64_t l = 0; l < n; ++l) {  // scores: each query head of the group against key l
    const T* kr = kp + l * kstride;
    for (int64_t i = 0; i < g; ++i) {
      Vec a(0.f);
      int64_t c = 0;
      for (; c + 1 < C; c += 2) {
        auto [x0, x1] = load2(kr + c * W);
        a = at::vec::fmadd(Vec::loadu(qp + i * D + c * W), x0, a);
        a = at::vec::fmadd(Vec::loadu(qp + i * D + (c + 1) * W), x1, a);
      }
      if (c < C) a = at::vec::fmadd(Vec::loadu(qp + i * D + c * W), load1(kr + c * W), a);
      s[i * n + l] = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, a) * scale;
    }
  }
  for (int64_t i = 0; i < g; ++i) {  // softmax of each head's scores
    float* si = s.data() + i * n;
    const float m = at::vec::reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, si, n);
    at::vec::map([m](Vec x) { return (x - Vec(m)).exp(); }, si, si, n);
    const float r = 1.f / at::vec::reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, si, n);
    at::vec::map([r](Vec x) { return x * Vec(r); }, si, si, n);
  }
  for (auto& a : acc) a = Vec(0.f);
  for (int64_t l = 0; l < n; ++l) {  // the weighted sum of the values
    const T* vr = vp + l * vstride;
    int64_t c = 0;
    for (; c + 1 < C; c += 2) {
      auto [x0, x1] = load2(vr + c * W);
      for (int64_t i = 0; i < g; ++i) {
        const Vec p(s[i * n + l]);
        acc[i * C + c] = at::vec::fmadd(p, x0, acc[i * C + c]);
        acc[i * C + c + 1] = at::vec::fmadd(p, x1, acc[i * C + c + 1]);
      }
    }
    if (c < C) {
      const Vec x = load1(vr + c * W);
      for (int64_t i = 0; i < g; ++i) acc[i * C + c] = at::vec::fmadd(Vec(s[i * n + l]), x, acc[i * C + c]);
    }
  }
  for (int64_t i = 0; i < g; ++i)
    for (int64_t c = 0; c < C; ++c) acc[i * C + c].store(op + i * D + c * W);
}

template <typename T>
void attend(const float* q, const T* k, const T* v, const int64_t* lengths, float* out, int64_t B, int64_t H,
            int64_t KVH, int64_t D, const int64_t* ks, const int64_t* vs, float scale) {
  const int64_t g = H / KVH;
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s;
    std::vector<Vec> acc;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / KVH, h = t % KVH, off = (b * H + h * g) * D;
      attend_task(q + off, k + b * ks[0] + h * ks[1], v + b * vs[0] + h * vs[1], lengths[b], ks[2], vs[2], g, D, scale,
                  s, acc, out + off);
    }
  });
}

// RoPE as transformers computes it in the activations' dtype A: x * cos + rotate_half(x) * sin,
// each product and the sum rounded to A as torch's separate ops round them -> float32 at dst
template <typename A>
inline void rotate(const A* x, const A* cos, const A* sin, int64_t D, float* dst) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < D; ++d) {
    const float r = d < half ? -static_cast<float>(x[d + half]) : static_cast<float>(x[d - half]);
    const A t1 = static_cast<A>(static_cast<float>(x[d]) * static_cast<float>(cos[d]));
    const A t2 = static_cast<A>(r * static_cast<float>(sin[d]));
    dst[d] = static_cast<float>(static_cast<A>(static_cast<float>(t1) + static_cast<float>(t2)));
  }
}

// One decode step's attention block after the fused q/k/v projection: rotate q and k, write k and
// v at each row's position of the layer's slot cache, attend over the row's keys so far.
template <typename A, typename C>
void rope_write_attend(const A* y, const A* cos, const A* sin, C* k, C* v, const int64_t* pos, A* out, int64_t B,
                       int64_t H, int64_t KVH, int64_t D, const int64_t* ks, const int64_t* vs, float scale) {
  const int64_t g = H / KVH, R = H + 2 * KVH;
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s, q(g * D), kf(D), o(g * D);
    std::vector<Vec> acc;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / KVH, h = t % KVH;
      const A* yb = y + b * R * D;
      for (int64_t i = 0; i < g; ++i) rotate(yb + (h * g + i) * D, cos + b * D, sin + b * D, D, q.data() + i * D);
      rotate(yb + (H + h) * D, cos + b * D, sin + b * D, D, kf.data());
      C* kp = k + b * ks[0] + h * ks[1];
      C* vp = v + b * vs[0] + h * vs[1];
      const A* vy = yb + (H + KVH + h) * D;
      for (int64_t d = 0; d < D; ++d) {
        kp[pos[b] * ks[2] + d] = static_cast<C>(kf[d]);
        vp[pos[b] * vs[2] + d] = static_cast<C>(static_cast<float>(vy[d]));
      }
      attend_task(q.data(), static_cast<const C*>(kp), static_cast<const C*>(vp), pos[b] + 1, ks[2], vs[2], g, D, scale,
                  s, acc, o.data());
      A* ob = out + (b * H + h * g) * D;
      for (int64_t j = 0; j < g * D; ++j) ob[j] = static_cast<A>(o[j]);
    }
  });
}

// q [B, H, D] float32 contiguous; k, v [B, KVH, >= max(lengths), D] (any strides but the last, 1),
// float32 or bfloat16; lengths [B] int64: row b attends its first lengths[b] keys. -> [B, H, D] float32
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor lengths) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.dim() == 4 && lengths.dim() == 1, "decode_attention: bad ranks");
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous(), "decode_attention: q must be contiguous float32");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16),
              "decode_attention: keys and values must both be float32 or bfloat16");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.is_contiguous(), "decode_attention: lengths must be int64");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k.size(1);
  TORCH_CHECK(k.size(0) >= B && v.size(0) >= B && v.size(1) == KVH && k.size(3) == D && v.size(3) == D && H % KVH == 0 &&
                  lengths.size(0) == B, "decode_attention: shapes do not match");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: head_dim must be contiguous");
  TORCH_CHECK(D % Vec::size() == 0, "decode_attention: head_dim must be a multiple of ", Vec::size());
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(len[b] >= 1 && len[b] <= k.size(2) && len[b] <= v.size(2), "decode_attention: a length is out of range");
  auto out = torch::empty({B, H, D}, q.options());
  const int64_t ks[3] = {k.stride(0), k.stride(1), k.stride(2)}, vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  if (k.scalar_type() == at::kBFloat16)
    attend<at::BFloat16>(q.data_ptr<float>(), k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>(), len,
                         out.data_ptr<float>(), B, H, KVH, D, ks, vs, scale);
  else
    attend<float>(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), len, out.data_ptr<float>(), B, H,
                  KVH, D, ks, vs, scale);
  return out;
}

// rope_write_attend for activations A, over a float32 or bfloat16 cache
template <typename A>
void rope_write_attend_cache(torch::Tensor& y, torch::Tensor& cos, torch::Tensor& sin, torch::Tensor& k, torch::Tensor& v,
                             const int64_t* pos, torch::Tensor& out, int64_t B, int64_t H, int64_t KVH, int64_t D,
                             const int64_t* ks, const int64_t* vs, float scale) {
  if (k.scalar_type() == at::kBFloat16)
    rope_write_attend<A, at::BFloat16>(y.data_ptr<A>(), cos.data_ptr<A>(), sin.data_ptr<A>(), k.data_ptr<at::BFloat16>(),
                                       v.data_ptr<at::BFloat16>(), pos, out.data_ptr<A>(), B, H, KVH, D, ks, vs, scale);
  else
    rope_write_attend<A, float>(y.data_ptr<A>(), cos.data_ptr<A>(), sin.data_ptr<A>(), k.data_ptr<float>(),
                                v.data_ptr<float>(), pos, out.data_ptr<A>(), B, H, KVH, D, ks, vs, scale);
}

// y [B, H + 2 KVH, D] (the fused q/k/v projection of one decode step), cos/sin [B, D], in the
// activations' dtype (float32 or bfloat16); k, v one layer's slot cache [slots, KVH, capacity, D]
// (float32 or bfloat16, head_dim contiguous), written at [b, :, positions[b]]; -> [B, H, D] in y's dtype
torch::Tensor rope_write_attention(torch::Tensor y, torch::Tensor cos, torch::Tensor sin, torch::Tensor k, torch::Tensor v,
                                   torch::Tensor positions, int64_t H) {
  TORCH_CHECK(y.dim() == 3 && cos.dim() == 2 && sin.dim() == 2 && k.dim() == 4 && v.dim() == 4 && positions.dim() == 1,
              "rope_write_attention: bad ranks");
  TORCH_CHECK(y.is_contiguous() && cos.is_contiguous() && sin.is_contiguous(), "rope_write_attention: y, cos, sin must be contiguous");
  TORCH_CHECK(cos.scalar_type() == y.scalar_type() && sin.scalar_type() == y.scalar_type() &&
                  (y.scalar_type() == at::kFloat || y.scalar_type() == at::kBFloat16),
              "rope_write_attention: y, cos and sin must be float32 or bfloat16 alike");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16),
              "rope_write_attention: keys and values must both be float32 or bfloat16");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous(), "rope_write_attention: positions must be int64");
  const int64_t B = y.size(0), D = y.size(2), KVH = k.size(1);
  TORCH_CHECK(H > 0 && H % KVH == 0 && y.size(1) == H + 2 * KVH && cos.size(0) == B && cos.size(1) == D &&
                  sin.size(0) == B && sin.size(1) == D && k.size(0) >= B && v.size(0) >= B && v.size(1) == KVH &&
                  k.size(3) == D && v.size(3) == D && positions.size(0) == B && D % 2 == 0,
              "rope_write_attention: shapes do not match");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "rope_write_attention: head_dim must be contiguous");
  TORCH_CHECK(D % Vec::size() == 0, "rope_write_attention: head_dim must be a multiple of ", Vec::size());
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(pos[b] >= 0 && pos[b] < k.size(2) && pos[b] < v.size(2), "rope_write_attention: a position is out of range");
  auto out = torch::empty({B, H, D}, y.options());
  const int64_t ks[3] = {k.stride(0), k.stride(1), k.stride(2)}, vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  if (y.scalar_type() == at::kBFloat16)
    rope_write_attend_cache<at::BFloat16>(y, cos, sin, k, v, pos, out, B, H, KVH, D, ks, vs, scale);
  else
    rope_write_attend_cache<float>(y, cos, sin, k, v, pos, out, B, H, KVH, D, ks, vs, scale);
  return out;
}

}  // namespace

// an operator too (torch.ops.llamawrapper.decode_attention), so that the compiled decode step
// (compile_decode) calls it from its graph
TORCH_LIBRARY(llamawrapper, m) { m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor lengths) -> Tensor"); }
TORCH_LIBRARY_IMPL(llamawrapper, CPU, m) { m.impl("decode_attention", &decode_attention); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", [](torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor lengths) {
    pybind11::gil_scoped_release free_gil;  // the server's event loop runs while a step attends
    return decode_attention(q, k, v, lengths);
  });
  m.def("rope_write_attention", [](torch::Tensor y, torch::Tensor cos, torch::Tensor sin, torch::Tensor k, torch::Tensor v,
                                   torch::Tensor positions, int64_t H) {
    pybind11::gil_scoped_release free_gil;
    return rope_write_attention(y, cos, sin, k, v, positions, H);
  });
  m.def("width", [] { return static_cast<int64_t>(Vec::size()); });  // head_dim must be a multiple of it
}
