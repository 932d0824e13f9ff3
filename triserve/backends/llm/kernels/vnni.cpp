// Quantized weights x int8 activations on AVX-512 VNNI: the decode step's matrix-vector products.
//
// torch's weight-only CPU kernels (_weight_int4pack_mm_for_cpu, _weight_int8pack_mm) widen every
// weight to bfloat16 before they multiply; at one row and one thread that widening, not the
// memory, sets their speed, and at several rows they are bound by arithmetic. These kernels do
// what llama.cpp does on x86: each row of activations is quantized to int8 in blocks of 32 (one
// scale per block), and the weights meet them in VPDPBUSD (64 byte products per instruction), so a
// weight is touched once, as it is stored.
//
// int4 weights: groups of 32 inputs, value = q * scale + min (q in 0..15; GGUF's Q4_1, and Q4_0
// with min = -8 scale). They are repacked once (triserve/backends/llm/kernels/__init__.py) in
// tiles of 16 output rows; per tile and group, 320 bytes:
//   [0, 256)   4 chunks of 64 bytes; in chunk c, byte 4 j + i holds inputs 8 c + i (low nibble)
//              and 8 c + 4 + i (high nibble) of output row j: one 32-bit lane per row, as
//              VPDPBUSD sums 4 consecutive products per lane
//   [256, 288) the 16 rows' scales, float16
//   [288, 320) the 16 rows' mins, float16
// A row's dot product with a group is scale * d * sum(q a) + min * d * sum(a), where d is the
// activation block's scale and a its int8 values.
//
// int8 weights (one scale per output row): see int8_vnni_linear below.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <type_traits>
#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kTile = 16;
constexpr int64_t kGroupBytes = 320;
constexpr int64_t kRowsAtOnce = 8;  // activation rows that share one pass over a tile's weights

inline __m512 load16(const float* src) { return _mm512_loadu_ps(src); }

inline __m512 load16(const at::BFloat16* src) {  // bfloat16 is float32's upper half
  const __m256i halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
}

// Rows of x ([M, K], float32 or bfloat16) as int8 blocks of 32: a[m, k], scale[m, g], scale x sum[m, g].
template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, int8_t* a, float* scale, float* scaled_sum) {
  const int64_t groups = K / kGroup;
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t g = 0; g < groups; ++g) {
        const T* src = x + m * K + g * kGroup;
        const __m512 v0 = load16(src);
        const __m512 v1 = load16(src + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        // a NaN must reach the output (the engine reports a row whose logits are not finite);
        // max() would drop it, and int8 cannot hold it: the block's scale carries it
        const bool nan = (_mm512_cmp_ps_mask(v0, v0, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(v1, v1, _CMP_UNORD_Q)) != 0;
        const float d = nan ? std::nanf("") : amax / 127.0f;
        const __m512 inverse = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inverse));  // round to nearest
        const __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inverse));
        int8_t* dst = a + m * K + g * kGroup;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtsepi32_epi8(i0));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm512_cvtsepi32_epi8(i1));
        scale[m * groups + g] = d;
        scaled_sum[m * groups + g] = d * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1)));
      }
    }
  });
}

// The rows of x [M, K] as int8 blocks, in one workspace (both kernels take them so).
struct Activations {
  at::Tensor workspace;
  int8_t* a;
  float* scale;
  float* scaled_sum;
};

Activations quantize(const at::Tensor& x) {
  const int64_t M = x.size(0);
  const int64_t K = x.size(1);
  const int64_t groups = K / kGroup;
  const at::Tensor xc = x.scalar_type() == at::kBFloat16 ? x.contiguous() : x.to(at::kFloat).contiguous();
  // one workspace: the int8 rows, then their blocks' scales and scaled sums (K is a multiple of
  // 32, so the floats are aligned)
  Activations out;
  out.workspace = at::empty({M * K + 2 * M * groups * static_cast<int64_t>(sizeof(float))}, x.options().dtype(at::kByte));
  out.a = reinterpret_cast<int8_t*>(out.workspace.data_ptr<uint8_t>());
  out.scale = reinterpret_cast<float*>(out.a + M * K);
  out.scaled_sum = out.scale + M * groups;
  if (xc.scalar_type() == at::kBFloat16) {
    quantize_rows(xc.data_ptr<at::BFloat16>(), M, K, out.a, out.scale, out.scaled_sum);
  } else {
    quantize_rows(xc.data_ptr<float>(), M, K, out.a, out.scale, out.scaled_sum);
  }
  return out;
}

// One tile of 16 output rows for R activation rows: y[r, 0..16).
template <int R>
inline void tile_dot(const uint8_t* tile, int64_t groups, const int8_t* a, int64_t K, const float* scale,
                     const float* scaled_sum, float* y, int64_t N) {
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 out[R];
  for (int r = 0; r < R; ++r) out[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* p = tile + g * kGroupBytes;
    _mm_prefetch(reinterpret_cast<const char*>(p + 8 * kGroupBytes), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(p + 8 * kGroupBytes + 64), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(p + 8 * kGroupBytes + 128), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(p + 8 * kGroupBytes + 192), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(p + 8 * kGroupBytes + 256), _MM_HINT_T0);
    __m512i q[8];
    for (int c = 0; c < 4; ++c) {
      const __m512i raw = _mm512_loadu_si512(p + 64 * c);
      q[2 * c] = _mm512_and_si512(raw, nibble);
      q[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nibble);
    }
    const __m512 w_scale = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 256)));
    const __m512 w_min = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 288)));
    for (int r = 0; r < R; ++r) {
      const int32_t* words = reinterpret_cast<const int32_t*>(a + r * K + g * kGroup);
      __m512i even = _mm512_setzero_si512();
      __m512i odd = _mm512_setzero_si512();
      for (int c = 0; c < 4; ++c) {
        even = _mm512_dpbusd_epi32(even, q[2 * c], _mm512_set1_epi32(words[2 * c]));
        odd = _mm512_dpbusd_epi32(odd, q[2 * c + 1], _mm512_set1_epi32(words[2 * c + 1]));
      }
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(even, odd));
      const int64_t at = r * groups + g;
      out[r] = _mm512_fmadd_ps(_mm512_mul_ps(w_scale, _mm512_set1_ps(scale[at])), dot, out[r]);
      out[r] = _mm512_fmadd_ps(w_min, _mm512_set1_ps(scaled_sum[at]), out[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * N, out[r]);
}

// The operands' sizes, checked: x [M, K], packed weights of n rows in tiles of group_bytes per group.
struct Shape {
  int64_t M, K, groups, tiles;
};

Shape checked_shape(const char* op, const at::Tensor& x, const at::Tensor& packed, int64_t n, int64_t group_bytes) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D, got ", x.dim(), "-D");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), op, ": packed must be contiguous uint8");
  const int64_t K = x.size(1);
  TORCH_CHECK(K % kGroup == 0 && n % kTile == 0, op, ": K must be a multiple of 32 and N of 16");
  const Shape shape{x.size(0), K, K / kGroup, n / kTile};
  TORCH_CHECK(packed.numel() == shape.tiles * shape.groups * group_bytes, op, ": packed holds ", packed.numel(),
              " bytes, expected ", shape.tiles * shape.groups * group_bytes, " for ", n, " x ", K);
  return shape;
}

// Calls dot(rows, t, m) for every tile t and every run of up to kRowsAtOnce activation rows from
// row m, rows as a compile-time constant (std::integral_constant); tiles split over torch's threads.
template <typename Dot>
void for_each_tile(const Shape& shape, const Dot& dot) {
  at::parallel_for(0, shape.tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t m = 0; m < shape.M; m += kRowsAtOnce) {
        switch (std::min(kRowsAtOnce, shape.M - m)) {
          case 8: dot(std::integral_constant<int, 8>{}, t, m); break;
          case 7: dot(std::integral_constant<int, 7>{}, t, m); break;
          case 6: dot(std::integral_constant<int, 6>{}, t, m); break;
          case 5: dot(std::integral_constant<int, 5>{}, t, m); break;
          case 4: dot(std::integral_constant<int, 4>{}, t, m); break;
          case 3: dot(std::integral_constant<int, 3>{}, t, m); break;
          case 2: dot(std::integral_constant<int, 2>{}, t, m); break;
          default: dot(std::integral_constant<int, 1>{}, t, m); break;
        }
      }
    }
  });
}

at::Tensor int4_vnni_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  const Shape shape = checked_shape("int4_vnni_linear", x, packed, n, kGroupBytes);
  at::Tensor y = at::empty({shape.M, n}, x.options().dtype(at::kFloat));
  if (shape.M == 0) return y;
  const Activations act = quantize(x);
  const uint8_t* weights = packed.data_ptr<uint8_t>();
  float* out = y.data_ptr<float>();
  const int64_t K = shape.K, groups = shape.groups;
  for_each_tile(shape, [&](auto rows, int64_t t, int64_t m) {
    tile_dot<decltype(rows)::value>(weights + t * groups * kGroupBytes, groups, act.a + m * K, K,
                                    act.scale + m * groups, act.scaled_sum + m * groups, out + m * n + t * kTile, n);
  });
  return y;
}

// int8 weights (one scale per output row) in tiles of 16 rows; per tile and group of 32 inputs,
// 8 chunks of 64 bytes: in chunk c, byte 4 j + i is input 4 c + i of row j. VPDPBUSD multiplies
// unsigned by signed bytes, so the weights' magnitudes are the unsigned side and their signs are
// moved onto the activations (as llama.cpp does on x86): |w| (a sign(w)) = w a.
constexpr int64_t kGroupBytes8 = 512;

template <int R>
inline void tile_dot8(const uint8_t* tile, int64_t groups, const int8_t* a, int64_t K, const float* scale,
                      const float* row_scales, float* y, int64_t N) {
  const __m512i zero = _mm512_setzero_si512();
  __m512 out[R];
  for (int r = 0; r < R; ++r) out[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* p = tile + g * kGroupBytes8;
    for (int k = 0; k < 8; ++k) _mm_prefetch(reinterpret_cast<const char*>(p + 8 * kGroupBytes8 + 64 * k), _MM_HINT_T0);
    __m512i magnitude[8];
    __mmask64 negative[8];
    for (int c = 0; c < 8; ++c) {
      const __m512i w = _mm512_loadu_si512(p + 64 * c);
      magnitude[c] = _mm512_abs_epi8(w);
      negative[c] = _mm512_movepi8_mask(w);
    }
    for (int r = 0; r < R; ++r) {
      const int32_t* words = reinterpret_cast<const int32_t*>(a + r * K + g * kGroup);
      __m512i even = _mm512_setzero_si512();
      __m512i odd = _mm512_setzero_si512();
      for (int c = 0; c < 8; c += 2) {
        const __m512i a0 = _mm512_set1_epi32(words[c]);
        const __m512i a1 = _mm512_set1_epi32(words[c + 1]);
        even = _mm512_dpbusd_epi32(even, magnitude[c], _mm512_mask_sub_epi8(a0, negative[c], zero, a0));
        odd = _mm512_dpbusd_epi32(odd, magnitude[c + 1], _mm512_mask_sub_epi8(a1, negative[c + 1], zero, a1));
      }
      out[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(even, odd)), _mm512_set1_ps(scale[r * groups + g]),
                               out[r]);
    }
  }
  const __m512 w_scale = _mm512_loadu_ps(row_scales);
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * N, _mm512_mul_ps(out[r], w_scale));
}

at::Tensor int8_vnni_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t n) {
  const Shape shape = checked_shape("int8_vnni_linear", x, packed, n, kGroupBytes8);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == n,
              "int8_vnni_linear: scales must be n contiguous float32");
  at::Tensor y = at::empty({shape.M, n}, x.options().dtype(at::kFloat));
  if (shape.M == 0) return y;
  const Activations act = quantize(x);
  const uint8_t* weights = packed.data_ptr<uint8_t>();
  const float* row_scales = scales.data_ptr<float>();
  float* out = y.data_ptr<float>();
  const int64_t K = shape.K, groups = shape.groups;
  for_each_tile(shape, [&](auto rows, int64_t t, int64_t m) {
    tile_dot8<decltype(rows)::value>(weights + t * groups * kGroupBytes8, groups, act.a + m * K, K,
                                     act.scale + m * groups, row_scales + t * kTile, out + m * n + t * kTile, n);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(triserve, m) {
  m.def("int4_vnni_linear(Tensor x, Tensor packed, int n) -> Tensor");
  m.def("int8_vnni_linear(Tensor x, Tensor packed, Tensor scales, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(triserve, CPU, m) {
  m.impl("int4_vnni_linear", &int4_vnni_linear);
  m.impl("int8_vnni_linear", &int8_vnni_linear);
}
