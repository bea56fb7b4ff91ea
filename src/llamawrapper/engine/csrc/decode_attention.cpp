// Decode attention over a slot cache: one query position per row, grouped-query heads, keys and
// values read in place (float32 or bfloat16, widened to float32 in registers), float32 math; and
// the same attention for each token of a prefill chunk (``prefill_attention``).
// Each (row, kv head) is one task over that row's own keys only, in a fixed order: a row's
// result does not depend on the other rows of the call nor on how far the batch's view reaches.
// Built by engine/kernels.py with torch's cpp_extension (see there).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <utility>
#include <vector>

#include "kernels.h"

namespace {

using Vec = at::vec::Vectorized<float>;

// Vec::size() consecutive elements, widened to float32 (bfloat16 -> float32 is exact: the 16 bits
// moved up)
template <typename T>
inline Vec load1(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return Vec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16)));
#elif defined(CPU_CAPABILITY_AVX2)
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return Vec(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16)));
#else
    float f[Vec::size()];
    for (int64_t i = 0; i < Vec::size(); ++i) f[i] = static_cast<float>(p[i]);
    return Vec::loadu(f);
#endif
  }
}

// The sums of Vec::size() vectors' lanes as one vector: lane j holds the sum of v[j]'s lanes, added
// in a fixed order (a tree of lane shuffles on AVX-512 and AVX2; one reduction per vector elsewhere).
inline Vec lane_sums(const Vec* v) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 t[8], u[4], w[2];
  for (int i = 0; i < 8; ++i) {  // pairs of vectors: per 128-bit lane, [a0+a2, b0+b2, a1+a3, b1+b3]
    const __m512 a = v[2 * i], b = v[2 * i + 1];
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  }
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: the lane's sums of four vectors
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44), _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
  for (int i = 0; i < 2; ++i)  // 128-bit lanes added in pairs
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88), _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
  return Vec(_mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD)));
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 t[4], u[2];
  for (int i = 0; i < 4; ++i) {
    const __m256 a = v[2 * i], b = v[2 * i + 1];
    t[i] = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
  }
  for (int i = 0; i < 2; ++i)
    u[i] = _mm256_add_ps(_mm256_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44), _mm256_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
  return Vec(_mm256_add_ps(_mm256_permute2f128_ps(u[0], u[1], 0x20), _mm256_permute2f128_ps(u[0], u[1], 0x31)));
#else
  float s[Vec::size()];
  for (int64_t j = 0; j < Vec::size(); ++j)
    s[j] = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, v[j]);
  return Vec::loadu(s);
#endif
}

// The calling thread's scratch: scores, a block of keys or values widened to float32, each head's
// running weighted sum of the values.
struct Scratch {
  std::vector<float> s, rows;
  std::vector<Vec> acc;
};

// Rows l0 .. l0 + m of a head's keys or values (``stride`` apart) as float32: in place for a float32
// cache, else widened into ``buf`` (D floats a row). Sets ``ld`` to the rows' distance.
template <typename T, int C>
inline const float* rows_f32(const T* p, int64_t l0, int64_t m, int64_t stride, std::vector<float>& buf, int64_t& ld) {
  constexpr int64_t W = Vec::size(), D = C * W;
  if constexpr (std::is_same_v<T, float>) {
    ld = stride;
    return p + l0 * stride;
  } else {
    for (int64_t j = 0; j < m; ++j)
      for (int64_t c = 0; c < C; ++c) load1(p + (l0 + j) * stride + c * W).store(buf.data() + j * D + c * W);
    ld = D;
    return buf.data();
  }
}

// Where a task reads its keys and values: positions [0, n0) at ``k0``/``v0`` (another row that holds
// the same values, shared by the rows of a common prompt prefix), [n0, n) at ``k``/``v`` (the row's
// own); each pointer is its row's position 0 of one KV head, rows ``kstride``/``vstride`` apart.
template <typename T>
struct Rows {
  const T *k0, *v0, *k, *v;
  int64_t n0, n, kstride, vstride;
};

// ``fn(keys_or_values, l0, m)`` for each block of up to Vec::size() positions, in order; a block
// never spans the two sources (a score or a value's weight is the same in whichever block it falls)
template <typename T, int C, typename F>
inline void for_blocks(const Rows<T>& r, bool values, std::vector<float>& buf, F&& fn) {
  constexpr int64_t W = Vec::size();
  const T* base[2] = {values ? r.v0 : r.k0, values ? r.v : r.k};
  const int64_t stride = values ? r.vstride : r.kstride, ends[2] = {r.n0, r.n};
  int64_t l0 = 0;
  for (int part = 0; part < 2; ++part) {
    for (; l0 < ends[part]; l0 += W) {
      const int64_t m = std::min(W, ends[part] - l0);
      int64_t ld;
      const float* rows = rows_f32<T, C>(base[part], l0, m, stride, buf, ld);
      fn(rows, ld, l0, m);
    }
    l0 = ends[part];
  }
}

// The query heads a pass takes together, for a head of C vectors: their queries (scores) or their
// accumulators (weighted sums) stay in registers while each key or value is loaded once for all of
// them (taken one head at a time, every key and value was loaded once per head, and both passes ran
// at about half the FMAs' rate; together, 1.16-1.4x at float32, docs/BENCHMARKS.md section 24).
template <int C>
constexpr int kHeadsTogether = C <= 4 ? 4 : (C <= 8 ? 2 : 1);

// f(std::integral_constant<int, G>, i0) for the g heads in groups of up to kHeadsTogether<C>
template <int C, typename F>
inline void by_head_groups(int64_t g, const F& f) {
  constexpr int most = kHeadsTogether<C>;
  for (int64_t i0 = 0; i0 < g; i0 += most) {
    switch (std::min<int64_t>(most, g - i0)) {
      case 4: if constexpr (most >= 4) f(std::integral_constant<int, 4>{}, i0); break;
      case 3: if constexpr (most >= 3) f(std::integral_constant<int, 3>{}, i0); break;
      case 2: if constexpr (most >= 2) f(std::integral_constant<int, 2>{}, i0); break;
      default: f(std::integral_constant<int, 1>{}, i0); break;
    }
  }
}

// G heads' queries (``q``, G x D) against a block's m keys -> dots[i * W + j]: key j's products with
// head i summed over the head's vectors (lane by lane), zero past m
template <int C, int G>
inline void block_dots(const float* q, const float* keys, int64_t ld, int64_t m, Vec* dots) {
  constexpr int64_t W = Vec::size(), D = C * W;
  Vec qv[G][C];
  for (int i = 0; i < G; ++i)
    for (int c = 0; c < C; ++c) qv[i][c] = Vec::loadu(q + i * D + c * W);
  for (int64_t j = 0; j < m; ++j) {
    Vec kv[C];
    for (int c = 0; c < C; ++c) kv[c] = Vec::loadu(keys + j * ld + c * W);
    for (int i = 0; i < G; ++i) {
      Vec a = qv[i][0] * kv[0];
      for (int c = 1; c < C; ++c) a = at::vec::fmadd(qv[i][c], kv[c], a);
      dots[i * W + j] = a;
    }
  }
  for (int i = 0; i < G; ++i)
    for (int64_t j = m; j < W; ++j) dots[i * W + j] = Vec(0.f);
}

// G heads' accumulators (``acc``, G x C vectors) plus a block's m values weighted by each head's
// probabilities (head i's at p + i * stride), value after value
template <int C, int G>
inline void block_values(const float* p, int64_t stride, const float* vals, int64_t ld, int64_t m, Vec* acc) {
  constexpr int64_t W = Vec::size();
  Vec a[G][C];
  for (int i = 0; i < G; ++i)
    for (int c = 0; c < C; ++c) a[i][c] = acc[i * C + c];
  for (int64_t j = 0; j < m; ++j) {
    Vec v[C];
    for (int c = 0; c < C; ++c) v[c] = Vec::loadu(vals + j * ld + c * W);
    for (int i = 0; i < G; ++i) {
      const Vec pj(p[i * stride + j]);
      for (int c = 0; c < C; ++c) a[i][c] = at::vec::fmadd(pj, v[c], a[i][c]);
    }
  }
  for (int i = 0; i < G; ++i)
    for (int c = 0; c < C; ++c) acc[i * C + c] = a[i][c];
}

// One (row, KV head) task: the g query heads at ``qp`` (float32, g x D, D = C vectors) over the
// row's n keys and values (``r``) -> g x D float32 at ``op``. Both passes go Vec::size() positions
// at a time, each block read (and widened) once for all the group's heads and each key or value
// loaded once for up to kHeadsTogether heads: the scores as one dot-product vector per key whose
// lane sums come out together, the weighted sum of the values with the heads' accumulators in
// registers over the block. Every score and sum is computed in the same order whichever rows share
// the call, where the keys are read from or which heads go together.
template <typename T, int C>
void attend_task(const float* qp, const Rows<T>& r, int64_t g, float scale, Scratch& sc, float* op) {
  constexpr int64_t W = Vec::size(), D = C * W;
  const int64_t n = r.n, npad = (n + W - 1) / W * W;
  sc.s.resize(g * npad);
  sc.rows.resize(W * D);
  Vec dots[kHeadsTogether<C> * W];
  for_blocks<T, C>(r, false, sc.rows, [&](const float* keys, int64_t ld, int64_t l0, int64_t m) {  // scores
    by_head_groups<C>(g, [&](auto heads, int64_t i0) {
      constexpr int G = decltype(heads)::value;
      block_dots<C, G>(qp + i0 * D, keys, ld, m, dots);
      for (int i = 0; i < G; ++i) (lane_sums(dots + i * W) * Vec(scale)).store(sc.s.data() + (i0 + i) * npad + l0, m);
    });
  });
  for (int64_t i = 0; i < g; ++i) {  // each head's softmax, normalised
    float* si = sc.s.data() + i * npad;
    const float mx = at::vec::reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, si, n);
    at::vec::map([mx](Vec x) { return (x - Vec(mx)).exp(); }, si, si, n);
    const float rs = 1.f / at::vec::reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, si, n);
    at::vec::map([rs](Vec x) { return x * Vec(rs); }, si, si, n);
  }
  sc.acc.assign(g * C, Vec(0.f));
  for_blocks<T, C>(r, true, sc.rows, [&](const float* vals, int64_t ld, int64_t l0, int64_t m) {  // weighted sums
    by_head_groups<C>(g, [&](auto heads, int64_t i0) {
      block_values<C, decltype(heads)::value>(sc.s.data() + i0 * npad + l0, npad, vals, ld, m, sc.acc.data() + i0 * C);
    });
  });
  for (int64_t i = 0; i < g; ++i)
    for (int64_t c = 0; c < C; ++c) sc.acc[i * C + c].store(op + i * D + c * W);
}

// head_dim / Vec::size() values the kernel is built for
constexpr int64_t kVectorsPerHead[] = {1, 2, 3, 4, 5, 6, 7, 8, 16, 32};

inline bool supported(int64_t D) {
  if (D % Vec::size()) return false;
  for (int64_t c : kVectorsPerHead)
    if (c * Vec::size() == D) return true;
  return false;
}

template <typename T>
using TaskFn = void (*)(const float*, const Rows<T>&, int64_t, float, Scratch&, float*);

// Row b's source of its first shared[b] positions (another row of the same slot cache, src[b]), or
// itself (no ``shared``)
struct Sharing {
  const int64_t *src = nullptr, *shared = nullptr;
  int64_t row(int64_t b) const { return shared && shared[b] > 0 ? src[b] : b; }
  int64_t length(int64_t b) const { return shared ? shared[b] : 0; }
};

// tasks in KV-head-major order: the rows that share a prefix read it one after another, from cache

// attend_task for head_dim D (which ``supported`` accepts)
template <typename T>
TaskFn<T> task_for(int64_t D) {
  switch (D / Vec::size()) {
    case 1: return attend_task<T, 1>;
    case 2: return attend_task<T, 2>;
    case 3: return attend_task<T, 3>;
    case 4: return attend_task<T, 4>;
    case 5: return attend_task<T, 5>;
    case 6: return attend_task<T, 6>;
    case 7: return attend_task<T, 7>;
    case 8: return attend_task<T, 8>;
    case 16: return attend_task<T, 16>;
    default: return attend_task<T, 32>;
  }
}

template <typename T>
void attend(const float* q, const T* k, const T* v, const int64_t* lengths, Sharing sh, float* out, int64_t B, int64_t H,
            int64_t KVH, int64_t D, const int64_t* ks, const int64_t* vs, float scale) {
  const int64_t g = H / KVH;
  const TaskFn<T> task = task_for<T>(D);
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    Scratch sc;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t / B, b = t % B, off = (b * H + h * g) * D, s = sh.row(b);
      const Rows<T> r{k + s * ks[0] + h * ks[1], v + s * vs[0] + h * vs[1], k + b * ks[0] + h * ks[1],
                      v + b * vs[0] + h * vs[1], sh.length(b), lengths[b], ks[2], vs[2]};
      task(q + off, r, g, scale, sc, out + off);
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

// One token's part of the fused q/k/v output ``yt`` ([H + 2 KVH, D]) for KV head h: its k rotated
// and its v written at ``kp``/``vp`` (the cache's dtype C), using ``kf`` (D floats) as scratch
template <typename A, typename C>
inline void write_kv(const A* yt, const A* cos, const A* sin, int64_t H, int64_t KVH, int64_t h, int64_t D, C* kp, C* vp,
                     float* kf) {
  rotate(yt + (H + h) * D, cos, sin, D, kf);
  const A* vy = yt + (H + KVH + h) * D;
  for (int64_t d = 0; d < D; ++d) {
    kp[d] = static_cast<C>(kf[d]);
    vp[d] = static_cast<C>(static_cast<float>(vy[d]));
  }
}

// The token's g query heads of KV head h, rotated -> g x D floats at ``q``
template <typename A>
inline void rotate_queries(const A* yt, const A* cos, const A* sin, int64_t g, int64_t h, int64_t D, float* q) {
  for (int64_t i = 0; i < g; ++i) rotate(yt + (h * g + i) * D, cos, sin, D, q + i * D);
}

// One decode step's attention block after the fused q/k/v projection: rotate q and k, write k and
// v at each row's position of the layer's slot cache, attend over the row's keys so far.
template <typename A, typename C>
void rope_write_attend(const A* y, const A* cos, const A* sin, C* k, C* v, const int64_t* pos, Sharing sh, A* out,
                       int64_t B, int64_t H, int64_t KVH, int64_t D, const int64_t* ks, const int64_t* vs, float scale) {
  const int64_t g = H / KVH, R = H + 2 * KVH;
  const TaskFn<C> task = task_for<C>(D);
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    Scratch sc;
    std::vector<float> q(g * D), kf(D), o(g * D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t / B, b = t % B, s = sh.row(b);
      const A* yb = y + b * R * D;
      rotate_queries(yb, cos + b * D, sin + b * D, g, h, D, q.data());
      C* kp = k + b * ks[0] + h * ks[1];
      C* vp = v + b * vs[0] + h * vs[1];
      write_kv(yb, cos + b * D, sin + b * D, H, KVH, h, D, kp + pos[b] * ks[2], vp + pos[b] * vs[2], kf.data());
      const Rows<C> r{k + s * ks[0] + h * ks[1], v + s * vs[0] + h * vs[1], kp, vp, sh.length(b), pos[b] + 1, ks[2], vs[2]};
      task(q.data(), r, g, scale, sc, o.data());
      A* ob = out + (b * H + h * g) * D;
      for (int64_t j = 0; j < g * D; ++j) ob[j] = static_cast<A>(o[j]);
    }
  });
}

// ``src``/``shared`` ([B] int64, both or neither): row b reads its first shared[b] positions from row
// src[b] of the same cache, which must hold them: ``filled[r]`` positions of row r are written before
// the call (rows past ``filled``'s B, the cache's capacity).
Sharing sharing_of(const std::optional<torch::Tensor>& src, const std::optional<torch::Tensor>& shared, int64_t B,
                   int64_t slots, int64_t capacity, const int64_t* own, const int64_t* filled, const char* op) {
  TORCH_CHECK(src.has_value() == shared.has_value(), op, ": src and shared go together");
  if (!src.has_value()) return {};
  for (const auto* t : {&*src, &*shared})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B && t->scalar_type() == at::kLong && t->is_contiguous(), op,
                ": src and shared must be [B] int64");
  Sharing sh{src->data_ptr<int64_t>(), shared->data_ptr<int64_t>()};
  for (int64_t b = 0; b < B; ++b) {
    const int64_t r = sh.src[b], n = sh.shared[b];
    TORCH_CHECK(n >= 0 && n <= own[b], op, ": row ", b, " shares more positions than it reads");
    TORCH_CHECK(n == 0 || (r >= 0 && r < slots && n <= (r < B ? filled[r] : capacity)), op, ": row ", b,
                "'s source row does not hold its shared positions");
  }
  return sh;
}

// q [B, H, D] float32 contiguous; k, v [B, KVH, >= max(lengths), D] (any strides but the last, 1),
// float32 or bfloat16; lengths [B] int64: row b attends its first lengths[b] keys (its first shared[b]
// read from row src[b], see sharing_of). -> [B, H, D] float32
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor lengths,
                               std::optional<torch::Tensor> src, std::optional<torch::Tensor> shared) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.dim() == 4 && lengths.dim() == 1, "decode_attention: bad ranks");
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous(), "decode_attention: q must be contiguous float32");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16),
              "decode_attention: keys and values must both be float32 or bfloat16");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.is_contiguous(), "decode_attention: lengths must be int64");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k.size(1);
  TORCH_CHECK(k.size(0) >= B && v.size(0) >= B && v.size(1) == KVH && k.size(3) == D && v.size(3) == D && H % KVH == 0 &&
                  lengths.size(0) == B, "decode_attention: shapes do not match");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: head_dim must be contiguous");
  TORCH_CHECK(supported(D), "decode_attention: head_dim ", D, " is not one this kernel is built for");
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(len[b] >= 1 && len[b] <= k.size(2) && len[b] <= v.size(2), "decode_attention: a length is out of range");
  const Sharing sh = sharing_of(src, shared, B, std::min(k.size(0), v.size(0)), std::min(k.size(2), v.size(2)), len, len,
                                 "decode_attention");
  auto out = torch::empty({B, H, D}, q.options());
  const int64_t ks[3] = {k.stride(0), k.stride(1), k.stride(2)}, vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  if (k.scalar_type() == at::kBFloat16)
    attend<at::BFloat16>(q.data_ptr<float>(), k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>(), len, sh,
                         out.data_ptr<float>(), B, H, KVH, D, ks, vs, scale);
  else
    attend<float>(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), len, sh, out.data_ptr<float>(), B, H,
                  KVH, D, ks, vs, scale);
  return out;
}

// rope_write_attend for activations A, over a float32 or bfloat16 cache
template <typename A>
void rope_write_attend_cache(torch::Tensor& y, torch::Tensor& cos, torch::Tensor& sin, torch::Tensor& k, torch::Tensor& v,
                             const int64_t* pos, Sharing sh, torch::Tensor& out, int64_t B, int64_t H, int64_t KVH,
                             int64_t D, const int64_t* ks, const int64_t* vs, float scale) {
  if (k.scalar_type() == at::kBFloat16)
    rope_write_attend<A, at::BFloat16>(y.data_ptr<A>(), cos.data_ptr<A>(), sin.data_ptr<A>(), k.data_ptr<at::BFloat16>(),
                                       v.data_ptr<at::BFloat16>(), pos, sh, out.data_ptr<A>(), B, H, KVH, D, ks, vs, scale);
  else
    rope_write_attend<A, float>(y.data_ptr<A>(), cos.data_ptr<A>(), sin.data_ptr<A>(), k.data_ptr<float>(),
                                v.data_ptr<float>(), pos, sh, out.data_ptr<A>(), B, H, KVH, D, ks, vs, scale);
}

}  // namespace

namespace llamawrapper {

// y [B, H + 2 KVH, D] (the fused q/k/v projection of one decode step), cos/sin [B, D], in the
// activations' dtype (float32 or bfloat16); k, v one layer's slot cache [slots, KVH, capacity, D]
// (float32 or bfloat16, head_dim contiguous), written at [b, :, positions[b]] (a row's first shared[b]
// positions read from row src[b], see sharing_of); -> [B, H, D] in y's dtype
torch::Tensor rope_write_attention(torch::Tensor y, torch::Tensor cos, torch::Tensor sin, torch::Tensor k, torch::Tensor v,
                                   torch::Tensor positions, int64_t H, std::optional<torch::Tensor> src,
                                   std::optional<torch::Tensor> shared) {
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
  TORCH_CHECK(supported(D), "rope_write_attention: head_dim ", D, " is not one this kernel is built for");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(pos[b] >= 0 && pos[b] < k.size(2) && pos[b] < v.size(2), "rope_write_attention: a position is out of range");
  std::vector<int64_t> own(pos, pos + B);  // a row reads up to its own new position, written by this call
  for (auto& n : own) n += 1;
  // a source row's positions before its own new one are written already (and not by this call)
  const Sharing sh = sharing_of(src, shared, B, std::min(k.size(0), v.size(0)), std::min(k.size(2), v.size(2)), own.data(),
                                pos, "rope_write_attention");
  auto out = torch::empty({B, H, D}, y.options());
  const int64_t ks[3] = {k.stride(0), k.stride(1), k.stride(2)}, vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  if (y.scalar_type() == at::kBFloat16)
    rope_write_attend_cache<at::BFloat16>(y, cos, sin, k, v, pos, sh, out, B, H, KVH, D, ks, vs, scale);
  else
    rope_write_attend_cache<float>(y, cos, sin, k, v, pos, sh, out, B, H, KVH, D, ks, vs, scale);
  return out;
}

}  // namespace llamawrapper

namespace {

// A prefill forward's attention block after the fused q/k/v projection, over the chunks of one or
// more sequences packed together (N tokens, ``y`` [N, H + 2 KVH, D]): token n is at position
// pos[n] of sequence seq[n], whose layer buffers are kb/vb[seq[n]] ([KVH, capacity, D], head and
// position strides ks/vs). Its k (rotated) and v are written there first, for every token; then
// its q heads (rotated) attend over positions [0, pos[n]] of its sequence, one task per token and KV
// head, as rope_write_attend computes a decode row: a token's result is the same in whichever chunk
// or batch it is prefilled, and what a decode step at that position would give. A bfloat16 buffer
// is widened to float32 once per call (the same values the decode tasks widen in registers).
template <typename A, typename C>
void prefill_attend(const A* y, const A* cos, const A* sin, const std::vector<C*>& kb, const std::vector<C*>& vb,
                    const std::vector<std::pair<int64_t, int64_t>>& ks, const std::vector<std::pair<int64_t, int64_t>>& vs,
                    const int64_t* seq, const int64_t* pos, A* out, int64_t N, int64_t H, int64_t KVH, int64_t D, float scale) {
  const int64_t g = H / KVH, R = H + 2 * KVH, S = static_cast<int64_t>(kb.size());
  at::parallel_for(0, N * KVH, 16, [&](int64_t begin, int64_t end) {  // every token's k and v written
    std::vector<float> kf(D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t / N, n = t % N, s = seq[n];
      write_kv(y + n * R * D, cos + n * D, sin + n * D, H, KVH, h, D, kb[s] + h * ks[s].first + pos[n] * ks[s].second,
               vb[s] + h * vs[s].first + pos[n] * vs[s].second, kf.data());
    }
  });
  // each sequence's keys and values up to its last token here, as float32 (in place for float32)
  std::vector<int64_t> len(S, 0);
  for (int64_t n = 0; n < N; ++n) len[seq[n]] = std::max(len[seq[n]], pos[n] + 1);
  std::vector<const float*> kf(S), vf(S);
  std::vector<std::pair<int64_t, int64_t>> kfs(S), vfs(S);  // (head, position) strides of kf/vf
  std::vector<std::vector<float>> wide(2 * S);
  for (int64_t s = 0; s < S; ++s) {
    if constexpr (std::is_same_v<C, float>) {
      kf[s] = kb[s], vf[s] = vb[s], kfs[s] = ks[s], vfs[s] = vs[s];
    } else {
      wide[2 * s].resize(KVH * len[s] * D), wide[2 * s + 1].resize(KVH * len[s] * D);
      kf[s] = wide[2 * s].data(), vf[s] = wide[2 * s + 1].data();
      kfs[s] = vfs[s] = {len[s] * D, D};
    }
  }
  if constexpr (!std::is_same_v<C, float>) {
    at::parallel_for(0, 2 * S * KVH, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t s = t / (2 * KVH), h = t % KVH, which = (t / KVH) % 2;
        const C* src = (which ? vb[s] : kb[s]) + h * (which ? vs[s] : ks[s]).first;
        const int64_t step = (which ? vs[s] : ks[s]).second;
        float* dst = wide[2 * s + which].data() + h * len[s] * D;
        for (int64_t l = 0; l < len[s]; ++l)
          for (int64_t d = 0; d < D; d += Vec::size()) load1(src + l * step + d).store(dst + l * D + d);
      }
    });
  }
  const TaskFn<float> task = task_for<float>(D);
  at::parallel_for(0, N * KVH, 1, [&](int64_t begin, int64_t end) {
    Scratch sc;
    std::vector<float> q(g * D), o(g * D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t / N, n = t % N, s = seq[n];
      rotate_queries(y + n * R * D, cos + n * D, sin + n * D, g, h, D, q.data());
      const float* kp = kf[s] + h * kfs[s].first;
      const float* vp = vf[s] + h * vfs[s].first;
      const Rows<float> r{kp, vp, kp, vp, 0, pos[n] + 1, kfs[s].second, vfs[s].second};
      task(q.data(), r, g, scale, sc, o.data());
      A* on = out + (n * H + h * g) * D;
      for (int64_t j = 0; j < g * D; ++j) on[j] = static_cast<A>(o[j]);
    }
  });
}

template <typename A>
void prefill_attend_cache(torch::Tensor& y, torch::Tensor& cos, torch::Tensor& sin, std::vector<torch::Tensor>& k,
                          std::vector<torch::Tensor>& v, const int64_t* seq, const int64_t* pos, torch::Tensor& out, int64_t N,
                          int64_t H, int64_t KVH, int64_t D, float scale) {
  std::vector<std::pair<int64_t, int64_t>> ks, vs;
  for (size_t s = 0; s < k.size(); ++s) ks.emplace_back(k[s].stride(0), k[s].stride(1)), vs.emplace_back(v[s].stride(0), v[s].stride(1));
  if (k[0].scalar_type() == at::kBFloat16) {
    std::vector<at::BFloat16*> kb, vb;
    for (size_t s = 0; s < k.size(); ++s) kb.push_back(k[s].data_ptr<at::BFloat16>()), vb.push_back(v[s].data_ptr<at::BFloat16>());
    prefill_attend<A, at::BFloat16>(y.data_ptr<A>(), cos.data_ptr<A>(), sin.data_ptr<A>(), kb, vb, ks, vs, seq, pos,
                                    out.data_ptr<A>(), N, H, KVH, D, scale);
  } else {
    std::vector<float*> kb, vb;
    for (size_t s = 0; s < k.size(); ++s) kb.push_back(k[s].data_ptr<float>()), vb.push_back(v[s].data_ptr<float>());
    prefill_attend<A, float>(y.data_ptr<A>(), cos.data_ptr<A>(), sin.data_ptr<A>(), kb, vb, ks, vs, seq, pos,
                             out.data_ptr<A>(), N, H, KVH, D, scale);
  }
}

// y [N, H + 2 KVH, D] (the fused q/k/v projection of N prompt tokens), cos/sin [N, D], in the
// activations' dtype (float32 or bfloat16); k[s], v[s] sequence s's layer buffers [KVH, capacity, D]
// (float32 or bfloat16 alike, head_dim contiguous), whose positions before each of its tokens here
// hold their keys and values already (a cached prefix, earlier chunks) or get them from this call;
// seq, positions [N] int64: token n's sequence and position; -> [N, H, D] in y's dtype
torch::Tensor prefill_attention(torch::Tensor y, torch::Tensor cos, torch::Tensor sin, std::vector<torch::Tensor> k,
                                std::vector<torch::Tensor> v, torch::Tensor seq, torch::Tensor positions, int64_t H) {
  TORCH_CHECK(y.dim() == 3 && cos.dim() == 2 && sin.dim() == 2 && seq.dim() == 1 && positions.dim() == 1,
              "prefill_attention: bad ranks");
  TORCH_CHECK(y.is_contiguous() && cos.is_contiguous() && sin.is_contiguous(), "prefill_attention: y, cos, sin must be contiguous");
  TORCH_CHECK(cos.scalar_type() == y.scalar_type() && sin.scalar_type() == y.scalar_type() &&
                  (y.scalar_type() == at::kFloat || y.scalar_type() == at::kBFloat16),
              "prefill_attention: y, cos and sin must be float32 or bfloat16 alike");
  TORCH_CHECK(!k.empty() && k.size() == v.size(), "prefill_attention: one key and one value buffer per sequence");
  TORCH_CHECK(seq.scalar_type() == at::kLong && seq.is_contiguous() && positions.scalar_type() == at::kLong &&
                  positions.is_contiguous(), "prefill_attention: seq and positions must be int64");
  const int64_t N = y.size(0), D = y.size(2), KVH = k[0].size(0), S = static_cast<int64_t>(k.size());
  TORCH_CHECK(H > 0 && H % KVH == 0 && y.size(1) == H + 2 * KVH && cos.size(0) == N && cos.size(1) == D &&
                  sin.size(0) == N && sin.size(1) == D && seq.size(0) == N && positions.size(0) == N && D % 2 == 0,
              "prefill_attention: shapes do not match");
  TORCH_CHECK(supported(D), "prefill_attention: head_dim ", D, " is not one this kernel is built for");
  for (int64_t s = 0; s < S; ++s) {
    for (const auto* t : {&k[s], &v[s]})
      TORCH_CHECK(t->dim() == 3 && t->size(0) == KVH && t->size(2) == D && t->stride(2) == 1 &&
                      t->scalar_type() == k[0].scalar_type() &&
                      (t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16),
                  "prefill_attention: buffers must be [KVH, capacity, D], head_dim contiguous, float32 or bfloat16 alike");
  }
  const int64_t *sq = seq.data_ptr<int64_t>(), *pos = positions.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(sq[n] >= 0 && sq[n] < S, "prefill_attention: a token's sequence is out of range");
    TORCH_CHECK(pos[n] >= 0 && pos[n] < k[sq[n]].size(1) && pos[n] < v[sq[n]].size(1), "prefill_attention: a position is out of range");
  }
  auto out = torch::empty({N, H, D}, y.options());
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  if (y.scalar_type() == at::kBFloat16)
    prefill_attend_cache<at::BFloat16>(y, cos, sin, k, v, sq, pos, out, N, H, KVH, D, scale);
  else
    prefill_attend_cache<float>(y, cos, sin, k, v, sq, pos, out, N, H, KVH, D, scale);
  return out;
}

}  // namespace

// an operator too (torch.ops.llamawrapper.decode_attention, without sharing), so that the compiled
// decode step (compile_decode) calls it from its graph. Its schema must not change: graphs compiled
// by an earlier version and cached on disk call it with these arguments.
torch::Tensor decode_attention_op(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor lengths) {
  return decode_attention(q, k, v, lengths, std::nullopt, std::nullopt);
}
TORCH_LIBRARY(llamawrapper, m) { m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor lengths) -> Tensor"); }
TORCH_LIBRARY_IMPL(llamawrapper, CPU, m) { m.impl("decode_attention", &decode_attention_op); }

std::vector<int64_t> team_threads();  // team_threads.cpp
void bind_decode_layers(pybind11::module& m);  // decode_layers.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("team_threads", &team_threads);
  bind_decode_layers(m);
  m.def("decode_attention", [](torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor lengths,
                                std::optional<torch::Tensor> src, std::optional<torch::Tensor> shared) {
    pybind11::gil_scoped_release free_gil;  // the server's event loop runs while a step attends
    return decode_attention(q, k, v, lengths, src, shared);
  }, pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("lengths"), pybind11::arg("src") = pybind11::none(),
     pybind11::arg("shared") = pybind11::none());
  m.def("rope_write_attention", [](torch::Tensor y, torch::Tensor cos, torch::Tensor sin, torch::Tensor k, torch::Tensor v,
                                   torch::Tensor positions, int64_t H, std::optional<torch::Tensor> src,
                                   std::optional<torch::Tensor> shared) {
    pybind11::gil_scoped_release free_gil;
    return llamawrapper::rope_write_attention(y, cos, sin, k, v, positions, H, src, shared);
  }, pybind11::arg("y"), pybind11::arg("cos"), pybind11::arg("sin"), pybind11::arg("k"), pybind11::arg("v"),
     pybind11::arg("positions"), pybind11::arg("H"), pybind11::arg("src") = pybind11::none(),
     pybind11::arg("shared") = pybind11::none());
  m.def("prefill_attention", [](torch::Tensor y, torch::Tensor cos, torch::Tensor sin, std::vector<torch::Tensor> k,
                                std::vector<torch::Tensor> v, torch::Tensor seq, torch::Tensor positions, int64_t H) {
    pybind11::gil_scoped_release free_gil;
    return prefill_attention(y, cos, sin, k, v, seq, positions, H);
  });
  m.def("add_rms_norm", [](torch::Tensor h, std::optional<torch::Tensor> delta, torch::Tensor weight, double eps) {
    pybind11::gil_scoped_release free_gil;
    return llamawrapper::add_rms_norm(h, delta, weight, eps);
  });
  m.def("width", [] { return static_cast<int64_t>(Vec::size()); });  // of the vectors the kernel computes with
  m.def("supports", [](int64_t head_dim) { return supported(head_dim); });  // a head_dim the kernel is built for
}
