"""C++ source of the dense head GEMV: ``y = x @ w^T`` for a few rows of bf16 or fp32 inputs, at the memory's speed.

Appended after the other native sources and built with them into one library by ``kernels_cpu_native.py``. At a
decode step the high-precision ``lm_head`` (2B-4T: 128256 x 2560 bf16, 656 MB, tied to the embeddings) is the
largest single read; torch's ``F.linear`` on one bf16 row reads it at about 60-70% of a stream read on the AVX-512
machines of this project (no AVX-512 BF16). This kernel streams each weight row once for all ``M`` rows of ``x``
(``M`` up to ``head_native.MAX_NATIVE_HEAD_ROWS``), widening bf16 to fp32 by a 16-bit shift, with fp32 FMAs::

    y[m, n] = round_T( Σ_k x[m, k] · w[n, k] )        fp32 products and sums, one rounding to T at the end

Summation order: per output, 4 vector accumulators of 16 (AVX-512) or 8 (AVX2) lanes over consecutive
64 / 32-element steps, the tail masked (AVX-512) or added after the reduction (AVX2), the 4 accumulators added in
order, then the lanes. The order is a function of K and the ISA path only, never of M or of the thread split: a row
of a batch gets the same bits as the row alone (the serving engine relies on it). Against ``F.linear`` (another
order) the outputs agree within the float error of a K-term dot product, ``gamma_K · Σ_k |x_k · w_k|``, plus the
rounding to T; the reference is ``head_native.dense_linear_torch`` (fp64 sums), tested with that bound.
"""

DENSE_CPP_SOURCE = r"""
namespace bitnet_a48 {

// Weight rows per parallel chunk (each row is K values: 5 KB for the 2B-4T head in bf16).
constexpr int64_t kDenseRowGrain = 64;
// Software prefetch distance into the weight stream (rows are contiguous: it runs on into the next rows).
constexpr int64_t kDensePrefetchBytes = 4096;

// Scalar path: 4 partial sums over consecutive elements, added in order.
template <typename T>
static float dense_dot_scalar(const float* x, const T* w, int64_t K) {
  float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  int64_t k = 0;
  for (; k + 4 <= K; k += 4)
    for (int i = 0; i < 4; ++i) s[i] += x[k + i] * to_float(w[k + i]);
  float total = (s[0] + s[1]) + (s[2] + s[3]);
  for (; k < K; ++k) total += x[k] * to_float(w[k]);
  return total;
}

#if defined(BITNET_A48_X86)
__attribute__((target("avx512f"))) static inline __m512 load16_avx512(const float* w, __mmask16 lanes) {
  return _mm512_maskz_loadu_ps(lanes, w);
}
__attribute__((target("avx512f,avx512bw"))) static inline __m512 load16_avx512(const c10::BFloat16* w,
                                                                                __mmask16 lanes) {
  // 16 bf16 (a masked 512-bit load reads only the lanes asked for): the high halves of 16 fp32
  const __m256i raw = _mm512_castsi512_si256(_mm512_maskz_loadu_epi16(static_cast<__mmask32>(lanes), w));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

template <typename T>
__attribute__((target("avx512f,avx512bw"))) static float dense_dot_avx512(const float* x, const T* w, int64_t K) {
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  const __mmask16 all = 0xFFFF;
  int64_t k = 0;
  const char* ahead = reinterpret_cast<const char*>(w) + kDensePrefetchBytes;
  for (; k + 64 <= K; k += 64) {
    _mm_prefetch(ahead + k * sizeof(T), _MM_HINT_T0);  // 64 values: 2 (bf16) or 4 (fp32) cache lines
    _mm_prefetch(ahead + k * sizeof(T) + 64, _MM_HINT_T0);
    if (sizeof(T) == 4) {
      _mm_prefetch(ahead + k * sizeof(T) + 128, _MM_HINT_T0);
      _mm_prefetch(ahead + k * sizeof(T) + 192, _MM_HINT_T0);
    }
    for (int i = 0; i < 4; ++i)
      acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16 * i), load16_avx512(w + k + 16 * i, all), acc[i]);
  }
  for (int i = 0; k < K; k += 16, ++i) {  // the tail: masked steps into acc[0], acc[1], ... (zeros elsewhere)
    const __mmask16 lanes = (K - k >= 16) ? all : static_cast<__mmask16>((1u << (K - k)) - 1);
    acc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(lanes, x + k), load16_avx512(w + k, lanes), acc[i]);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

__attribute__((target("avx2,fma"))) static inline __m256 load8_avx2(const float* w) { return _mm256_loadu_ps(w); }
__attribute__((target("avx2,fma"))) static inline __m256 load8_avx2(const c10::BFloat16* w) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

template <typename T>
__attribute__((target("avx2,fma"))) static float dense_dot_avx2(const float* x, const T* w, int64_t K) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t k = 0;
  const char* ahead = reinterpret_cast<const char*>(w) + kDensePrefetchBytes;
  for (; k + 32 <= K; k += 32) {
    _mm_prefetch(ahead + k * sizeof(T), _MM_HINT_T0);  // 32 values: 1 (bf16) or 2 (fp32) cache lines
    if (sizeof(T) == 4) _mm_prefetch(ahead + k * sizeof(T) + 64, _MM_HINT_T0);
    for (int i = 0; i < 4; ++i)
      acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8 * i), load8_avx2(w + k + 8 * i), acc[i]);
  }
  const __m256 v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  float total = _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
  for (; k < K; ++k) total += x[k] * to_float(w[k]);
  return total;
}
#endif  // BITNET_A48_X86

template <typename T>
static float dense_dot(int64_t isa, const float* x, const T* w, int64_t K) {
#if defined(BITNET_A48_X86)
  if (isa == kAvx512) return dense_dot_avx512<T>(x, w, K);
  if (isa == kAvx2) return dense_dot_avx2<T>(x, w, K);
#endif
  return dense_dot_scalar<T>(x, w, K);
}

// x [M, K] widened to fp32 once; each weight row is read from memory once and stays in L1 for the M rows.
template <typename T>
static void dense_rows(int64_t isa, const float* x, int64_t M, int64_t K, const T* weight, int64_t N, T* out) {
  at::parallel_for(0, N, kDenseRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* w = weight + n * K;
      for (int64_t m = 0; m < M; ++m) out[m * N + n] = from_float<T>(dense_dot<T>(isa, x + m * K, w, K));
    }
  });
}

at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "bitnet_a48: dense_linear runs on the CPU");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "bitnet_a48: dense_linear takes x [M, K] and weight [N, K], got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "bitnet_a48: dense_linear takes fp32 or bf16 x and weight of one dtype, got ", x.scalar_type(), " and ",
              weight.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  auto w = weight.contiguous();
  auto xf = x.to(at::kFloat).contiguous();
  auto out = at::empty({M, N}, x.options());
  const int64_t isa = current_isa();
  if (x.scalar_type() == at::kFloat) {
    dense_rows<float>(isa, xf.data_ptr<float>(), M, K, w.data_ptr<float>(), N, out.data_ptr<float>());
  } else {
    dense_rows<c10::BFloat16>(isa, xf.data_ptr<float>(), M, K, w.data_ptr<c10::BFloat16>(), N,
                              out.data_ptr<c10::BFloat16>());
  }
  return out;
}

}  // namespace bitnet_a48

TORCH_LIBRARY_FRAGMENT(bitnet_a48_native, m) {
  m.def("dense_linear(Tensor x, Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(bitnet_a48_native, CPU, m) {
  m.impl("dense_linear", &bitnet_a48::dense_linear);
}
"""
