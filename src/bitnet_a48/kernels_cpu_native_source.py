"""C++ source of the native CPU kernels (built by ``kernels_cpu_native.py``; arithmetic and layouts documented there).

Held in a Python module so that a saved model folder, which carries only flat ``.py`` files, can build it too.
The translation unit is compiled without ``-march`` flags: each ISA path is a function with its own
``__attribute__((target(...)))`` and the path is chosen at run time from CPUID (``__builtin_cpu_supports``), so one
build runs on every x86-64 CPU and elsewhere only the scalar path exists.
"""

CPP_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define BITNET_A48_X86 1
#endif

namespace bitnet_a48 {

// ------------------------------------------------------------------------------------------------------------
// ISA selection
// ------------------------------------------------------------------------------------------------------------

constexpr int64_t kScalar = 0;
constexpr int64_t kAvx2 = 1;    // AVX2: maddubs (u8 x s8 -> s16) + madd (s16 -> s32)
constexpr int64_t kAvx512 = 2;  // AVX-512 F/BW + VNNI: dpbusd (u8 x s8 -> s32 accumulate)

static int64_t detect_isa() {
#if defined(BITNET_A48_X86)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vnni")) {
    return kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return kAvx2;
  }
#endif
  return kScalar;
}

static const int64_t g_best_isa = detect_isa();
static std::atomic<int64_t> g_isa{g_best_isa};

int64_t best_isa() { return g_best_isa; }
int64_t current_isa() { return g_isa.load(); }
void set_isa(int64_t isa) {
  TORCH_CHECK(isa >= kScalar && isa <= kAvx512, "bitnet_a48: unknown CPU path ", isa);
  TORCH_CHECK(isa <= g_best_isa, "bitnet_a48: this CPU cannot run CPU path ", isa, " (best: ", g_best_isa, ")");
  g_isa.store(isa);
}

// ------------------------------------------------------------------------------------------------------------
// Element conversion
// ------------------------------------------------------------------------------------------------------------

template <typename T> inline float to_float(T v) { return static_cast<float>(v); }
template <typename T> inline T from_float(float v) { return static_cast<T>(v); }  // c10 types round to nearest even

// ------------------------------------------------------------------------------------------------------------
// Ternary dot products: one packed row (K bytes, four 2-bit fields each) against MB rows of int8 codes.
// out[m][i] = sum_k a[m][k] * ((w[k] >> 2i) & 3)
// ------------------------------------------------------------------------------------------------------------

template <int MB>
static void ternary_rows_scalar(const int8_t* a, int64_t lda, const uint8_t* w, int64_t K, int32_t out[][4]) {
  for (int m = 0; m < MB; ++m) {
    const int8_t* am = a + m * lda;
    int32_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (int64_t k = 0; k < K; ++k) {
      const int32_t b = w[k];
      const int32_t x = am[k];
      s0 += x * (b & 3);
      s1 += x * ((b >> 2) & 3);
      s2 += x * ((b >> 4) & 3);
      s3 += x * (b >> 6);
    }
    out[m][0] = s0; out[m][1] = s1; out[m][2] = s2; out[m][3] = s3;
  }
}

#if defined(BITNET_A48_X86)

__attribute__((target("avx2"))) static inline int32_t hsum_epi32_avx2(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Software prefetch distance into the weight stream (rows are contiguous, so it runs into the next rows).
constexpr int64_t kPrefetchBytes = 4096;
// The AVX-512 ternary kernel prefetches further, into L2 (T1): measured on an AVX-512 Xeon (one 207360 x 2560
// packed matrix, M = 1), 4 KB into L1 read 10.2 / 20.7 GB/s with 1 / 2 threads, 8 KB into L2 11.3-11.7 / 22.1-23.5
// (the stream read: 13-14 / 23.5); no software prefetch 7.0 / 14.0, 1 KB 8.4 / 17.1. The AVX2 kernel (one
// prefetch per 32 bytes) read less with 8 KB into L2 than with 4 KB into L1 (8.3 against 9.9 GB/s), so keeps it.
constexpr int64_t kTernaryPrefetchBytes = 8192;

// maddubs sums two products of at most 2 * 128 each: 512 per 16-bit lane and step, so 32 steps stay below 2^15.
constexpr int64_t kAvx2Int16Steps = 32;

template <int MB>
__attribute__((target("avx2"))) static void ternary_rows_avx2(
    const int8_t* a, int64_t lda, const uint8_t* w, int64_t K, int32_t out[][4]) {
  const __m256i mask = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int i = 0; i < 4; ++i) acc[m][i] = _mm256_setzero_si256();
  const int64_t kv = K - K % 32;
  int64_t k = 0;
  while (k < kv) {
    const int64_t kend = std::min(kv, k + 32 * kAvx2Int16Steps);
    __m256i acc16[MB][4];
    for (int m = 0; m < MB; ++m)
      for (int i = 0; i < 4; ++i) acc16[m][i] = _mm256_setzero_si256();
    for (; k < kend; k += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetchBytes), _MM_HINT_T0);
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
      const __m256i f0 = _mm256_and_si256(wv, mask);
      const __m256i f1 = _mm256_and_si256(_mm256_srli_epi16(wv, 2), mask);
      const __m256i f2 = _mm256_and_si256(_mm256_srli_epi16(wv, 4), mask);
      const __m256i f3 = _mm256_and_si256(_mm256_srli_epi16(wv, 6), mask);
      for (int m = 0; m < MB; ++m) {
        const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + m * lda + k));
        acc16[m][0] = _mm256_add_epi16(acc16[m][0], _mm256_maddubs_epi16(f0, av));
        acc16[m][1] = _mm256_add_epi16(acc16[m][1], _mm256_maddubs_epi16(f1, av));
        acc16[m][2] = _mm256_add_epi16(acc16[m][2], _mm256_maddubs_epi16(f2, av));
        acc16[m][3] = _mm256_add_epi16(acc16[m][3], _mm256_maddubs_epi16(f3, av));
      }
    }
    for (int m = 0; m < MB; ++m)
      for (int i = 0; i < 4; ++i) acc[m][i] = _mm256_add_epi32(acc[m][i], _mm256_madd_epi16(acc16[m][i], ones));
  }
  for (int m = 0; m < MB; ++m) {
    int32_t s[4];
    for (int i = 0; i < 4; ++i) s[i] = hsum_epi32_avx2(acc[m][i]);
    const int8_t* am = a + m * lda;
    for (int64_t t = kv; t < K; ++t) {
      const int32_t b = w[t];
      const int32_t x = am[t];
      s[0] += x * (b & 3); s[1] += x * ((b >> 2) & 3); s[2] += x * ((b >> 4) & 3); s[3] += x * (b >> 6);
    }
    for (int i = 0; i < 4; ++i) out[m][i] = s[i];
  }
}

// One 64-column step. The fields are masked in place, not shifted: plane i enters vpdpbusd as f_i · 4^i (at most
// 2 · 64 = 128, still an unsigned byte), and the 4^i is divided out of the exact int32 sums at the end.
template <int MB>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static inline void ternary_step_avx512(
    const int8_t* a, int64_t lda, const uint8_t* w, int64_t k, __mmask64 lanes, __m512i acc[][4]) {
  const __m512i wv = _mm512_maskz_loadu_epi8(lanes, w + k);
  const __m512i f0 = _mm512_and_si512(wv, _mm512_set1_epi8(0x03));
  const __m512i f1 = _mm512_and_si512(wv, _mm512_set1_epi8(0x0C));
  const __m512i f2 = _mm512_and_si512(wv, _mm512_set1_epi8(0x30));
  const __m512i f3 = _mm512_and_si512(wv, _mm512_set1_epi8(static_cast<char>(0xC0)));
  for (int m = 0; m < MB; ++m) {
    const __m512i av = _mm512_maskz_loadu_epi8(lanes, a + m * lda + k);
    acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], f0, av);
    acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], f1, av);
    acc[m][2] = _mm512_dpbusd_epi32(acc[m][2], f2, av);
    acc[m][3] = _mm512_dpbusd_epi32(acc[m][3], f3, av);
  }
}

template <int MB>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void ternary_rows_avx512(
    const int8_t* a, int64_t lda, const uint8_t* w, int64_t K, int32_t out[][4]) {
  // Two sets of accumulators, for alternate 64-column steps: twice the independent vpdpbusd chains (its latency,
  // not its throughput, bounded one set at M = 1). The last partial step uses masked loads (other lanes are zero).
  __m512i acc[MB][4], acc2[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int i = 0; i < 4; ++i) acc[m][i] = acc2[m][i] = _mm512_setzero_si512();
  const __mmask64 all = ~__mmask64(0);
  int64_t k = 0;
  for (; k + 128 <= K; k += 128) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k + kTernaryPrefetchBytes), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(w + k + kTernaryPrefetchBytes + 64), _MM_HINT_T1);
    ternary_step_avx512<MB>(a, lda, w, k, all, acc);
    ternary_step_avx512<MB>(a, lda, w, k + 64, all, acc2);
  }
  for (; k < K; k += 64) {
    const __mmask64 lanes = (K - k >= 64) ? all : ((__mmask64(1) << (K - k)) - 1);
    ternary_step_avx512<MB>(a, lda, w, k, lanes, acc);
  }
  // |sum| <= K · 128 · 128 < 2^31 for K < 2^17; the sums of plane i are exact multiples of 4^i.
  for (int m = 0; m < MB; ++m)
    for (int i = 0; i < 4; ++i)
      out[m][i] = _mm512_reduce_add_epi32(_mm512_add_epi32(acc[m][i], acc2[m][i])) / (1 << (2 * i));
}

#endif  // BITNET_A48_X86

// Rows of activations handled together (the weight fields are extracted once per block).
static int max_block(int64_t isa) { return isa == kAvx512 ? 4 : (isa == kAvx2 ? 2 : 1); }

template <int MB>
static void ternary_rows(int64_t isa, const int8_t* a, int64_t lda, const uint8_t* w, int64_t K, int32_t out[][4]) {
#if defined(BITNET_A48_X86)
  if (isa == kAvx512) return ternary_rows_avx512<MB>(a, lda, w, K, out);
  if (isa == kAvx2) return ternary_rows_avx2<MB>(a, lda, w, K, out);
#endif
  ternary_rows_scalar<MB>(a, lda, w, K, out);
}

static void ternary_block(int64_t isa, int mb, const int8_t* a, int64_t lda, const uint8_t* w, int64_t K,
                          int32_t out[][4]) {
  switch (mb) {
    case 4: return ternary_rows<4>(isa, a, lda, w, K, out);
    case 3: return ternary_rows<3>(isa, a, lda, w, K, out);
    case 2: return ternary_rows<2>(isa, a, lda, w, K, out);
    default: return ternary_rows<1>(isa, a, lda, w, K, out);
  }
}

// ------------------------------------------------------------------------------------------------------------
// Activation quantisers (per row; same arithmetic as quantization.py, see kernels_cpu_native.py)
// ------------------------------------------------------------------------------------------------------------

constexpr float kQuantEps = 1e-5f;
enum Quantizer { kInt8 = 0, kInt4 = 1, kTopkInt8 = 2 };

static int quantizer_id(const std::string& name) {
  if (name == "int8") return kInt8;
  if (name == "int4") return kInt4;
  if (name == "topk_int8") return kTopkInt8;
  TORCH_CHECK(false, "bitnet_a48: unknown activation quantiser '", name, "'; expected int8, int4 or topk_int8");
}

// RoundClip(v, lo, hi) with round half to even, as torch.round. Adding and subtracting 1.5 * 2^23 rounds to the
// nearest integer in the default rounding mode for |v| < 2^22, so v is clamped to +-256 first (which changes no
// result: the clip would); unlike std::nearbyint this vectorises. NaN gives 0.
static inline int8_t round_clip(float v, float lo, float hi) {
  constexpr float kMagic = 12582912.0f;
  const float bounded = v > 256.0f ? 256.0f : (v < -256.0f ? -256.0f : (v == v ? v : 0.0f));
  const float rounded = (bounded + kMagic) - kMagic;
  return static_cast<int8_t>(std::min(std::max(rounded, lo), hi));
}

// Row loops over fp32 values, compiled twice (AVX2 and baseline x86-64, chosen by the loader from CPUID) so that
// they vectorise: the per-row work of a decode step is serial, and runs between the parallel matmul regions.
#if defined(BITNET_A48_X86) && defined(__GNUC__) && !defined(__clang__)
#define BITNET_A48_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define BITNET_A48_CLONES
#endif

// Sums in fp64 lane by lane (4 lanes, then added in order): exact for bf16 inputs, so any order gives the same.
BITNET_A48_CLONES static double sum_abs(const float* x, int64_t n) {
  double lane[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t k = 0;
  for (; k + 4 <= n; k += 4)
    for (int j = 0; j < 4; ++j) lane[j] += static_cast<double>(std::fabs(x[k + j]));
  for (; k < n; ++k) lane[0] += static_cast<double>(std::fabs(x[k]));
  return (lane[0] + lane[1]) + (lane[2] + lane[3]);
}

BITNET_A48_CLONES static double sum_squares(const float* x, int64_t n) {
  double lane[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t k = 0;
  for (; k + 4 <= n; k += 4)
    for (int j = 0; j < 4; ++j) lane[j] += static_cast<double>(x[k + j] * x[k + j]);
  for (; k < n; ++k) lane[0] += static_cast<double>(x[k] * x[k]);
  return (lane[0] + lane[1]) + (lane[2] + lane[3]);
}

// max|x| through the bit patterns: for non-NaN floats |a| < |b| exactly when bits(|a|) < bits(|b|).
BITNET_A48_CLONES static float max_abs(const float* x, int64_t n) {
  uint32_t best = 0;
  for (int64_t k = 0; k < n; ++k) {
    uint32_t bits;
    std::memcpy(&bits, x + k, 4);
    bits &= 0x7FFFFFFFu;
    best = bits > best ? bits : best;
  }
  float out;
  std::memcpy(&out, &best, 4);
  return out;
}

BITNET_A48_CLONES static void round_clip_row(const float* x, int64_t n, float inv, float lo, float hi,
                                             int8_t* codes) {
  for (int64_t k = 0; k < n; ++k) codes[k] = round_clip(x[k] * inv, lo, hi);
}

BITNET_A48_CLONES static int32_t sum_codes(const int8_t* c, int64_t n) {
  int32_t s = 0;
  for (int64_t k = 0; k < n; ++k) s += c[k];
  return s;
}

// Quantise one fp32 row x[0..K) into codes; returns the scale (codes * scale ~ x). `work` holds K floats (TopK).
static float quantize_row(const float* x, int64_t K, int q, int64_t topk, int8_t* codes, float* work) {
  if (q == kInt4) {
    const double total = sum_abs(x, K);  // fp64 sum of |x|: the same in any order (kernels_cpu_native.py)
    const float beta = std::max(static_cast<float>(total / static_cast<double>(K)), kQuantEps);
    const float inv = (1.0f / beta) * static_cast<float>(2.6457513110645907);  // sqrt(7) / beta
    round_clip_row(x, K, inv, -8.0f, 7.0f, codes);
    return 1.0f / inv;
  }
  if (q == kTopkInt8 && topk < K) {
    // Keep the topk largest |x|; among values equal to the k-th largest, the lowest indices (quantization.py).
    float gamma = 0.0f;
    for (int64_t k = 0; k < K; ++k) work[k] = std::fabs(x[k]);
    std::vector<float> sorted(work, work + K);
    std::nth_element(sorted.begin(), sorted.begin() + (topk - 1), sorted.end(), std::greater<float>());
    const float threshold = sorted[topk - 1];
    int64_t above = 0;
    for (int64_t k = 0; k < K; ++k) above += work[k] > threshold;
    int64_t ties = topk - above;
    for (int64_t k = 0; k < K; ++k) {
      bool keep = work[k] > threshold;
      if (!keep && work[k] == threshold && ties > 0) { keep = true; --ties; }
      if (!keep) work[k] = -1.0f;  // marks a dropped entry
      else gamma = std::max(gamma, work[k]);
    }
    gamma = std::max(gamma, kQuantEps);
    const float inv = (1.0f / gamma) * 127.0f;
    for (int64_t k = 0; k < K; ++k)
      codes[k] = work[k] < 0.0f ? int8_t(0) : round_clip(x[k] * inv, -128.0f, 127.0f);
    return 1.0f / inv;
  }
  const float gamma = std::max(max_abs(x, K), kQuantEps);
  const float inv = (1.0f / gamma) * 127.0f;
  round_clip_row(x, K, inv, -128.0f, 127.0f, codes);
  return 1.0f / inv;
}

// RMSNorm of one fp32 row (the input's values), in the order of modeling_bitnet_a48.BitNetA48RMSNorm: fp32 squares
// summed in fp64, mean rounded to fp32, 1 / sqrt(mean + eps), x * r rounded to T, times the weight rounded to T;
// the result goes back into `x` as fp32 (exactly the T values).
template <typename T>
static void rms_norm_row(float* x, int64_t K, const T* weight, float eps) {
  const float mean = static_cast<float>(sum_squares(x, K) / static_cast<double>(K));
  const float r = 1.0f / std::sqrt(mean + eps);
  for (int64_t k = 0; k < K; ++k) {
    const T normed = from_float<T>(x[k] * r);
    x[k] = to_float(from_float<T>(to_float(weight[k]) * to_float(normed)));
  }
}

template <typename T>
static void quantize_rows(const T* x, int64_t M, int64_t K, int q, int64_t topk, int8_t* codes, float* scale,
                          int32_t* row_sum, const T* norm_weight, float eps) {
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> work(q == kTopkInt8 ? K : 0);
    std::vector<float> row(K);
    for (int64_t m = begin; m < end; ++m) {
      const T* src = x + m * K;
      for (int64_t k = 0; k < K; ++k) row[k] = to_float(src[k]);
      if (norm_weight != nullptr) rms_norm_row<T>(row.data(), K, norm_weight, eps);
      int8_t* c = codes + m * K;
      scale[m] = quantize_row(row.data(), K, q, topk, c, work.data());
      row_sum[m] = sum_codes(c, K);
    }
  });
}

// ------------------------------------------------------------------------------------------------------------
// Ternary matmul driver: a group of packed weights sharing one input, parallel over their packed rows
// ------------------------------------------------------------------------------------------------------------

struct TernaryTarget {
  const uint8_t* packed;  // [R, K]
  int64_t rows;           // R = ceil(N / 4)
  int64_t out_features;   // N
  float alpha;            // weight_scale
  void* out;              // [M, N] of the output dtype
};

// Packed rows handled together: the activation block stays in L1 while they stream past.
constexpr int64_t kRowTile = 8;

template <typename OutT>
static void ternary_group(int64_t isa, const int8_t* codes, const float* x_scale, const int32_t* row_sum,
                          int64_t M, int64_t K, std::vector<TernaryTarget>& targets) {
  std::vector<int64_t> first(targets.size() + 1, 0);  // first[j]: global index of target j's first tile
  for (size_t j = 0; j < targets.size(); ++j)
    first[j + 1] = first[j] + (targets[j].rows + kRowTile - 1) / kRowTile;
  const int mb_max = max_block(isa);
  at::parallel_for(0, first.back(), 1, [&](int64_t begin, int64_t end) {
    int32_t sums[4][4];
    std::vector<float> scale(M);
    size_t j = 0;
    for (int64_t tile = begin; tile < end; ++tile) {
      while (first[j + 1] <= tile) ++j;
      const TernaryTarget& t = targets[j];
      OutT* out = static_cast<OutT*>(t.out);
      for (int64_t m = 0; m < M; ++m) scale[m] = x_scale[m] * t.alpha;  // x_scale * alpha, as the torch epilogue
      const int64_t r0 = (tile - first[j]) * kRowTile;
      const int64_t r1 = std::min(t.rows, r0 + kRowTile);
      for (int64_t m0 = 0; m0 < M; m0 += mb_max) {
        const int mb = static_cast<int>(std::min<int64_t>(mb_max, M - m0));
        for (int64_t r = r0; r < r1; ++r) {
          ternary_block(isa, mb, codes + m0 * K, K, t.packed + r * K, K, sums);
          for (int m = 0; m < mb; ++m) {
            for (int i = 0; i < 4; ++i) {
              const int64_t n = i * t.rows + r;  // field i of packed row r is output row i*R + r
              if (n < t.out_features) {
                const float v = static_cast<float>(sums[m][i] - row_sum[m0 + m]) * scale[m0 + m];
                out[(m0 + m) * t.out_features + n] = from_float<OutT>(v);
              }
            }
          }
        }
      }
    }
  });
}

static void check_packed(const at::Tensor& packed, int64_t out_features, int64_t K) {
  TORCH_CHECK(packed.device().is_cpu(), "bitnet_a48: packed weights must be on the CPU, got ", packed.device());
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2,
              "bitnet_a48: packed weights must be uint8 [ceil(N/4), K], got ", packed.scalar_type(), " ",
              packed.sizes());
  TORCH_CHECK(out_features > 0 && packed.size(0) == (out_features + 3) / 4 && packed.size(1) == K,
              "bitnet_a48: packed weights of ", out_features, " outputs and ", K, " inputs must have shape [",
              (out_features + 3) / 4, ", ", K, "], got ", packed.sizes());
  TORCH_CHECK(packed.is_contiguous(), "bitnet_a48: packed weights must be contiguous");
}

static float read_alpha(const at::Tensor& alpha) {
  TORCH_CHECK(alpha.device().is_cpu() && alpha.scalar_type() == at::kFloat && alpha.numel() == 1,
              "bitnet_a48: weight_scale must be one fp32 value on the CPU, got ", alpha.scalar_type(), " ",
              alpha.sizes());
  return *alpha.data_ptr<float>();
}

static std::vector<at::Tensor> run_group(const at::Tensor& codes, const at::Tensor& x_scale,
                                         const at::Tensor& row_sum, at::TensorList packed, at::TensorList alphas,
                                         at::IntArrayRef out_features, at::ScalarType out_dtype) {
  const int64_t M = codes.size(0), K = codes.size(1);
  TORCH_CHECK(packed.size() == out_features.size() && packed.size() == alphas.size() && !packed.empty(),
              "bitnet_a48: one packed weight, scale and output size each, got ", packed.size(), ", ",
              alphas.size(), ", ", out_features.size());
  std::vector<at::Tensor> outs;
  std::vector<TernaryTarget> targets;
  for (size_t j = 0; j < packed.size(); ++j) {
    check_packed(packed[j], out_features[j], K);
    outs.push_back(at::empty({M, out_features[j]}, codes.options().dtype(out_dtype)));
    targets.push_back({packed[j].data_ptr<uint8_t>(), packed[j].size(0), out_features[j],
                       read_alpha(alphas[j]), outs.back().data_ptr()});
  }
  if (M == 0) return outs;
  const int64_t isa = current_isa();
  const int8_t* c = codes.data_ptr<int8_t>();
  const float* s = x_scale.data_ptr<float>();
  const int32_t* rs = row_sum.data_ptr<int32_t>();
  switch (out_dtype) {
    case at::kFloat: ternary_group<float>(isa, c, s, rs, M, K, targets); break;
    case at::kBFloat16: ternary_group<c10::BFloat16>(isa, c, s, rs, M, K, targets); break;
    case at::kHalf: ternary_group<c10::Half>(isa, c, s, rs, M, K, targets); break;
    default: TORCH_CHECK(false, "bitnet_a48: output dtype must be float32, bfloat16 or float16, got ", out_dtype);
  }
  return outs;
}

static void check_input(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu(), "bitnet_a48: ", what, " must be on the CPU, got ", x.device());
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0, "bitnet_a48: ", what, " must be 2-D [M, K] with K > 0, got ",
              x.sizes());
  TORCH_CHECK(x.is_contiguous(), "bitnet_a48: ", what, " must be contiguous");
}

// x [M, K] float (RMSNorm-ed first when norm_weight is given) -> codes int8 [M, K], scale fp32 [M, 1], row sums [M]
static std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_impl(const at::Tensor& x, int q, int64_t topk,
                                                                    const c10::optional<at::Tensor>& norm_weight,
                                                                    double eps) {
  check_input(x, "the input");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(q != kTopkInt8 || (topk >= 1 && topk <= K), "bitnet_a48: topk must lie in [1, ", K, "], got ", topk);
  if (norm_weight.has_value()) {
    const at::Tensor& w = *norm_weight;
    TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == x.scalar_type() && w.dim() == 1 && w.size(0) == K &&
                    w.is_contiguous(),
                "bitnet_a48: the RMSNorm weight must be a contiguous [", K, "] CPU tensor of the input's dtype (",
                x.scalar_type(), "), got ", w.scalar_type(), " ", w.sizes());
  }
  auto codes = at::empty({M, K}, x.options().dtype(at::kChar));
  auto scale = at::empty({M, 1}, x.options().dtype(at::kFloat));
  auto row_sum = at::empty({M}, x.options().dtype(at::kInt));
  int8_t* c = codes.data_ptr<int8_t>();
  float* s = scale.data_ptr<float>();
  int32_t* rs = row_sum.data_ptr<int32_t>();
  const float e = static_cast<float>(eps);
  switch (x.scalar_type()) {
    case at::kFloat:
      quantize_rows<float>(x.data_ptr<float>(), M, K, q, topk, c, s, rs,
                           norm_weight.has_value() ? norm_weight->data_ptr<float>() : nullptr, e);
      break;
    case at::kBFloat16:
      quantize_rows<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), M, K, q, topk, c, s, rs,
                                   norm_weight.has_value() ? norm_weight->data_ptr<c10::BFloat16>() : nullptr, e);
      break;
    case at::kHalf:
      quantize_rows<c10::Half>(x.data_ptr<c10::Half>(), M, K, q, topk, c, s, rs,
                               norm_weight.has_value() ? norm_weight->data_ptr<c10::Half>() : nullptr, e);
      break;
    default: TORCH_CHECK(false, "bitnet_a48: the input must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return {codes, scale, row_sum};
}

// ReLU²GLU of a gate and an up output [M, N] in the order of BitNetA48MLP: relu(g) squared rounded to T, times u.
template <typename T>
static at::Tensor relu2_glu(const at::Tensor& gate, const at::Tensor& up) {
  auto out = at::empty_like(gate);
  const T* g = gate.data_ptr<T>();
  const T* u = up.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const int64_t n = gate.numel();
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float r = std::max(to_float(g[i]), 0.0f);
      const T squared = from_float<T>(r * r);
      o[i] = from_float<T>(to_float(squared) * to_float(u[i]));
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------------------------------
// Int8 linear (the optional low-precision lm_head): int8 codes x int8 rows with one scale per row
// ------------------------------------------------------------------------------------------------------------

static int32_t dot_int8_scalar(const int8_t* a, const int8_t* w, int64_t K) {
  int32_t s = 0;
  for (int64_t k = 0; k < K; ++k) s += int32_t(a[k]) * int32_t(w[k]);
  return s;
}

#if defined(BITNET_A48_X86)
// u8 x s8 products through |a| and sign(a) * w: |a| <= 128 and |w| <= 127 keep each maddubs pair below 2^15.
__attribute__((target("avx2"))) static int32_t dot_int8_avx2(const int8_t* a, const int8_t* w, int64_t K) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc = _mm256_setzero_si256();
  const int64_t kv = K - K % 32;
  for (int64_t k = 0; k < kv; k += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetchBytes), _MM_HINT_T0);
    const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + k));
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
    const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(av), _mm256_sign_epi8(wv, av));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
  }
  int32_t s = hsum_epi32_avx2(acc);
  for (int64_t k = kv; k < K; ++k) s += int32_t(a[k]) * int32_t(w[k]);
  return s;
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) static int32_t dot_int8_avx512(
    const int8_t* a, const int8_t* w, int64_t K) {
  __m512i acc = _mm512_setzero_si512();
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetchBytes), _MM_HINT_T0);
    const __mmask64 lanes = (K - k >= 64) ? ~__mmask64(0) : ((__mmask64(1) << (K - k)) - 1);
    const __m512i av = _mm512_maskz_loadu_epi8(lanes, a + k);
    const __m512i wv = _mm512_maskz_loadu_epi8(lanes, w + k);
    const __mmask64 negative = _mm512_movepi8_mask(av);
    const __m512i signed_w = _mm512_mask_sub_epi8(wv, negative, zero, wv);  // sign(a) * w
    acc = _mm512_dpbusd_epi32(acc, _mm512_abs_epi8(av), signed_w);
  }
  return _mm512_reduce_add_epi32(acc);
}
#endif

static int32_t dot_int8(int64_t isa, const int8_t* a, const int8_t* w, int64_t K) {
#if defined(BITNET_A48_X86)
  if (isa == kAvx512) return dot_int8_avx512(a, w, K);
  if (isa == kAvx2) return dot_int8_avx2(a, w, K);
#endif
  return dot_int8_scalar(a, w, K);
}

template <typename OutT>
static void int8_rows(int64_t isa, const int8_t* codes, const float* x_scale, int64_t M, int64_t K,
                      const int8_t* weight, const float* w_scale, int64_t N, OutT* out) {
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t m = 0; m < M; ++m) {
        const int32_t acc = dot_int8(isa, codes + m * K, weight + n * K, K);
        out[m * N + n] = from_float<OutT>(static_cast<float>(acc) * (x_scale[m] * w_scale[n]));
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------------------
// Operators
// ------------------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> quantize_act(const at::Tensor& x, std::string quantizer, int64_t topk) {
  auto [codes, scale, row_sum] = quantize_impl(x, quantizer_id(quantizer), topk, c10::nullopt, 0.0);
  return {codes, scale};
}

std::vector<at::Tensor> ternary_linear(const at::Tensor& x, at::TensorList packed, at::TensorList alphas,
                                       at::IntArrayRef out_features, std::string quantizer, int64_t topk,
                                       const c10::optional<at::Tensor>& norm_weight, double norm_eps,
                                       bool glu) {
  TORCH_CHECK(!glu || (packed.size() == 2 && out_features.size() == 2 && out_features[0] == out_features[1]),
              "bitnet_a48: relu2_glu takes two weights (gate, up) with the same number of outputs");
  auto [codes, scale, row_sum] = quantize_impl(x, quantizer_id(quantizer), topk, norm_weight, norm_eps);
  auto outs = run_group(codes, scale, row_sum, packed, alphas, out_features, x.scalar_type());
  if (!glu) return outs;
  switch (x.scalar_type()) {
    case at::kFloat: return {relu2_glu<float>(outs[0], outs[1])};
    case at::kBFloat16: return {relu2_glu<c10::BFloat16>(outs[0], outs[1])};
    default: return {relu2_glu<c10::Half>(outs[0], outs[1])};
  }
}

at::Tensor ternary_matmul(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& packed,
                          int64_t out_features, at::ScalarType out_dtype) {
  // The scale already holds x_scale * alpha: the group driver multiplies it by alpha = 1.
  static const at::Tensor one = at::ones({1}, at::kFloat);
  check_input(codes, "the activation codes");
  TORCH_CHECK(codes.scalar_type() == at::kChar, "bitnet_a48: activation codes must be int8, got ",
              codes.scalar_type());
  const int64_t M = codes.size(0);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == M && scale.device().is_cpu(),
              "bitnet_a48: scale must be fp32 with one value per row (", M, "), got ", scale.scalar_type(), " ",
              scale.sizes());
  auto row_sum = codes.sum(1, false, at::kInt);
  auto outs = run_group(codes, scale.contiguous(), row_sum, {packed}, {one}, {out_features}, out_dtype);
  return outs[0];
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale) {
  auto [codes, x_scale, row_sum] = quantize_impl(x, kInt8, 0, c10::nullopt, 0.0);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kChar && weight.dim() == 2 &&
                  weight.size(1) == K && weight.is_contiguous(),
              "bitnet_a48: int8 weights must be a contiguous int8 [N, ", K, "] CPU tensor, got ",
              weight.scalar_type(), " ", weight.sizes());
  const int64_t N = weight.size(0);
  TORCH_CHECK(weight_scale.device().is_cpu() && weight_scale.scalar_type() == at::kFloat &&
                  weight_scale.numel() == N && weight_scale.is_contiguous(),
              "bitnet_a48: int8 weight scales must be fp32 with one value per row (", N, ")");
  auto out = at::empty({M, N}, x.options());
  const int64_t isa = current_isa();
  const int8_t* c = codes.data_ptr<int8_t>();
  const float* s = x_scale.data_ptr<float>();
  const int8_t* w = weight.data_ptr<int8_t>();
  const float* ws = weight_scale.data_ptr<float>();
  switch (x.scalar_type()) {
    case at::kFloat: int8_rows<float>(isa, c, s, M, K, w, ws, N, out.data_ptr<float>()); break;
    case at::kBFloat16: int8_rows<c10::BFloat16>(isa, c, s, M, K, w, ws, N, out.data_ptr<c10::BFloat16>()); break;
    case at::kHalf: int8_rows<c10::Half>(isa, c, s, M, K, w, ws, N, out.data_ptr<c10::Half>()); break;
    default: TORCH_CHECK(false, "bitnet_a48: unsupported dtype");
  }
  return out;
}

std::vector<int64_t> cpu_isa_info() { return {best_isa(), current_isa()}; }
void set_cpu_isa(int64_t isa) { set_isa(isa); }

}  // namespace bitnet_a48

TORCH_LIBRARY(bitnet_a48_native, m) {
  m.def("quantize_act(Tensor x, str quantizer, int topk) -> (Tensor, Tensor)");
  m.def("ternary_linear(Tensor x, Tensor[] packed, Tensor[] weight_scale, int[] out_features, str quantizer, "
        "int topk, Tensor? norm_weight=None, float norm_eps=0.0, bool relu2_glu=False) -> Tensor[]");
  m.def("ternary_matmul(Tensor codes, Tensor scale, Tensor packed, int out_features, ScalarType out_dtype) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor weight, Tensor weight_scale) -> Tensor");
  m.def("cpu_isa_info() -> int[]", &bitnet_a48::cpu_isa_info);
  m.def("set_cpu_isa(int isa) -> ()", &bitnet_a48::set_cpu_isa);
}

TORCH_LIBRARY_IMPL(bitnet_a48_native, CPU, m) {
  m.impl("quantize_act", &bitnet_a48::quantize_act);
  m.impl("ternary_linear", &bitnet_a48::ternary_linear);
  m.impl("ternary_matmul", &bitnet_a48::ternary_matmul);
  m.impl("int8_linear", &bitnet_a48::int8_linear);
}
"""
