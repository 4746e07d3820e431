"""C++ source of the native attention kernels for decode: RoPE, and attention over the packed KV store with its append.

Appended to ``kernels_cpu_native_source.CPP_SOURCE`` (whose helpers it uses: ISA selection, element conversion) and
built with it into one library by ``kernels_cpu_native.py``; its ops join the ``bitnet_a48_native`` namespace
through ``TORCH_LIBRARY_FRAGMENT``. Torch references: ``modeling_bitnet_a48.apply_rotary_pos_emb`` (``rope``, equal
bit for bit), ``cache_bitnet_a48.BitNetA48QuantizedLayer`` (``attend``, blockwise, equal within float rounding;
``append``, equal bit for bit) and ``kernels_kv_cache.quantize_pack_torch`` (equal bit for bit).

Decode attention, per (row, KV head) and its ``g`` query heads, with codes ``c`` and scales ``s`` of the store::

    score[j, t] = (q_j · (c_t - mid)) · s_t · scaling + bias[t]        store; window and new token with s_t = 1
    p[j, :] = softmax(score[j, :])                                       all scores in hand, fp32
    out[j] = Σ_t (p[j, t] · s_t) · (c_t - mid)

The ``avx512`` and ``avx2`` paths unpack 16 (8) codes at a time (one ``bits``-byte word broadcast to the lanes,
shifted by ``bits·i``, masked), use FMA dot products and a polynomial ``exp`` (Cephes' single-precision
coefficients, within 2 ulp; scores below ``log(FLT_MIN)`` give 0); ``scalar`` uses plain loops and ``std::exp``.
"""

KV_CPP_SOURCE = r"""
namespace bitnet_a48 {

// ------------------------------------------------------------------------------------------------------------
// RoPE (rotate-half): out = x * cos + rotate_half(x) * sin, each product and the sum rounded to T as torch does
// ------------------------------------------------------------------------------------------------------------

template <typename T>
static void rope_rows(const T* x, const T* cos, const T* sin, int64_t B, int64_t H, int64_t S, int64_t D,
                      int64_t cos_rows, T* out) {
  const int64_t half = D / 2;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t s = 0; s < S; ++s) {
        const T* row = x + ((b * H + h) * S + s) * D;
        const int64_t cs = ((cos_rows > 1 ? b : 0) * S + s) * D;
        T* o = out + ((b * H + h) * S + s) * D;
        for (int64_t d = 0; d < D; ++d) {
          const float rot = d < half ? -to_float(row[d + half]) : to_float(row[d - half]);
          const T a = from_float<T>(to_float(row[d]) * to_float(cos[cs + d]));
          const T r = from_float<T>(rot * to_float(sin[cs + d]));
          o[d] = from_float<T>(to_float(a) + to_float(r));
        }
      }
    }
  }
}

static void check_rope_input(const at::Tensor& x, const at::Tensor& cos, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.size(3) % 2 == 0 && x.scalar_type() == cos.scalar_type(),
              "bitnet_a48: rope's ", name, " must be a CPU tensor (B, H, S, D) with D even, of the tables' dtype");
  TORCH_CHECK((cos.size(0) == 1 || cos.size(0) == x.size(0)) && cos.size(1) == x.size(2) && cos.size(2) == x.size(3),
              "bitnet_a48: rope tables (", cos.sizes(), ") do not match the ", name, " (", x.sizes(), ")");
}

std::tuple<at::Tensor, at::Tensor> rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                        const at::Tensor& sin) {
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes() && cos.scalar_type() == sin.scalar_type(),
              "bitnet_a48: rope tables must be two (B|1, S, D) tensors of one dtype");
  check_rope_input(q, cos, "query");
  check_rope_input(k, cos, "key");
  auto qc = q.contiguous(), kc = k.contiguous(), cc = cos.contiguous(), sc = sin.contiguous();
  auto q_out = at::empty_like(qc), k_out = at::empty_like(kc);
  const int64_t S = q.size(2), D = q.size(3), rows = cos.size(0);
  switch (q.scalar_type()) {
#define BITNET_A48_ROPE(T, ST)                                                                                   \
  case ST:                                                                                                       \
    rope_rows<T>(qc.data_ptr<T>(), cc.data_ptr<T>(), sc.data_ptr<T>(), q.size(0), q.size(1), S, D, rows,       \
                 q_out.data_ptr<T>());                                                                           \
    rope_rows<T>(kc.data_ptr<T>(), cc.data_ptr<T>(), sc.data_ptr<T>(), k.size(0), k.size(1), S, D, rows,       \
                 k_out.data_ptr<T>());                                                                           \
    break;
    BITNET_A48_ROPE(float, at::kFloat)
    BITNET_A48_ROPE(c10::BFloat16, at::kBFloat16)
    BITNET_A48_ROPE(c10::Half, at::kHalf)
#undef BITNET_A48_ROPE
    default: TORCH_CHECK(false, "bitnet_a48: rope takes fp32, bf16 or fp16");
  }
  return {q_out, k_out};
}

// ------------------------------------------------------------------------------------------------------------
// KV quantise-and-pack with fp16 scales, in the order of kernels_kv_cache.quantize_pack_torch:
// s = half(min(max(max|x| / mid, 2^-14) * (1 + 2^-10), SCALE_MAX)), c = clamp(floor(x / s + mid + 0.5), 0, 2^b - 1)
// ------------------------------------------------------------------------------------------------------------

template <typename T>
static inline void kv_quantize_group(const T* row, int64_t D, int64_t bits, uint8_t* out, c10::Half* scale) {
  const float mid = 0.5f * static_cast<float>((1 << bits) - 1);
  const float top = static_cast<float>((1 << bits) - 1);
  const float scale_max = static_cast<float>(65504.0 / (1.0 + 1.0 / 1024.0));
  float amax = 0.0f;
  for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(to_float(row[d])));
  float s = std::max(amax / mid, 1.0f / 16384.0f) * static_cast<float>(1.0 + 1.0 / 1024.0);
  const c10::Half sh = static_cast<c10::Half>(std::min(s, scale_max));
  *scale = sh;
  const float sf = static_cast<float>(sh);
  for (int64_t w = 0; w < D / 8; ++w) {
    uint64_t word = 0;
    for (int i = 0; i < 8; ++i) {
      const float y = to_float(row[w * 8 + i]) / sf + (mid + 0.5f);
      const float c = std::min(std::max(std::floor(y), 0.0f), top);
      word |= uint64_t(static_cast<uint32_t>(c)) << (bits * i);
    }
    for (int64_t j = 0; j < bits; ++j) out[w * bits + j] = static_cast<uint8_t>(word >> (8 * j));
  }
}

template <typename T>
static void kv_quantize_rows(const T* x, int64_t G, int64_t D, int64_t bits, uint8_t* packed, c10::Half* scale) {
  at::parallel_for(0, G, 16, [&](int64_t begin, int64_t end) {
    for (int64_t gi = begin; gi < end; ++gi) kv_quantize_group<T>(x + gi * D, D, bits, packed + gi * (D * bits / 8),
                                                                   scale + gi);
  });
}

std::tuple<at::Tensor, at::Tensor> kv_quantize_pack(const at::Tensor& x, int64_t bits) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bitnet_a48: unsupported KV bits ", bits);
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 1 && x.size(-1) % 8 == 0,
              "bitnet_a48: KV groups must be a CPU tensor (..., D) with D a multiple of 8, got ", x.sizes());
  auto xc = x.contiguous();
  const int64_t D = xc.size(-1), G = xc.numel() / D;
  auto sizes = xc.sizes().vec();
  sizes.back() = D * bits / 8;
  auto packed = at::empty(sizes, xc.options().dtype(at::kByte));
  sizes.pop_back();
  auto scale = at::empty(sizes, xc.options().dtype(at::kHalf));
  uint8_t* p = packed.data_ptr<uint8_t>();
  c10::Half* s = scale.data_ptr<c10::Half>();
  switch (xc.scalar_type()) {
    case at::kFloat: kv_quantize_rows<float>(xc.data_ptr<float>(), G, D, bits, p, s); break;
    case at::kBFloat16: kv_quantize_rows<c10::BFloat16>(xc.data_ptr<c10::BFloat16>(), G, D, bits, p, s); break;
    case at::kHalf: kv_quantize_rows<c10::Half>(xc.data_ptr<c10::Half>(), G, D, bits, p, s); break;
    default: TORCH_CHECK(false, "bitnet_a48: KV groups must be fp32, bf16 or fp16");
  }
  return {packed, scale};
}

static void check_cpu_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "bitnet_a48: ", name, " must be a contiguous CPU tensor");
}

// ------------------------------------------------------------------------------------------------------------
// Decode append (BitNetA48QuantizedLayer.append, dynamic layout, one new token per row, window full): note each
// row's first token, quantise the token leaving the window into store slot n_quant (and into the first-token slot
// at sink_bits when it is that row's first token), shift the window by one and write the new token at its end.
// ------------------------------------------------------------------------------------------------------------

template <typename T>
static void kv_append_rows(T* kw, T* vw, const T* kn, const T* vn, int64_t B, int64_t H, int64_t W, int64_t D,
                           uint8_t* kp, c10::Half* ks, uint8_t* vp, c10::Half* vs, int64_t cap, int64_t n_quant,
                           int64_t bits, uint8_t* k_sink, c10::Half* k_sink_s, uint8_t* v_sink, c10::Half* v_sink_s,
                           const int64_t* sink_pos, int64_t sink_bits) {
  const int64_t P = D * bits / 8, Ps = sink_bits ? D * sink_bits / 8 : 0;
  for (int64_t b = 0; b < B; ++b) {
    const bool first = sink_bits && sink_pos[b] == n_quant;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t bh = b * H + h, slot = bh * cap + n_quant;
      T* krow = kw + bh * W * D;
      T* vrow = vw + bh * W * D;
      const T* k_out = W ? krow : kn + bh * D;  // the token leaving the window (the new one when W = 0)
      const T* v_out = W ? vrow : vn + bh * D;
      kv_quantize_group<T>(k_out, D, bits, kp + slot * P, ks + slot);
      kv_quantize_group<T>(v_out, D, bits, vp + slot * P, vs + slot);
      if (first) {
        kv_quantize_group<T>(k_out, D, sink_bits, k_sink + bh * Ps, k_sink_s + bh);
        kv_quantize_group<T>(v_out, D, sink_bits, v_sink + bh * Ps, v_sink_s + bh);
      }
      if (W) {
        std::memmove(krow, krow + D, (W - 1) * D * sizeof(T));
        std::memmove(vrow, vrow + D, (W - 1) * D * sizeof(T));
        std::memcpy(krow + (W - 1) * D, kn + bh * D, D * sizeof(T));
        std::memcpy(vrow + (W - 1) * D, vn + bh * D, D * sizeof(T));
      }
    }
  }
}

void kv_append_decode(const at::Tensor& k_window, const at::Tensor& v_window, const at::Tensor& k_new,
                      const at::Tensor& v_new, const at::Tensor& k_packed, const at::Tensor& k_scale,
                      const at::Tensor& v_packed, const at::Tensor& v_scale, int64_t n_quant, int64_t bits,
                      const c10::optional<at::Tensor>& k_sink, const c10::optional<at::Tensor>& k_sink_scale,
                      const c10::optional<at::Tensor>& v_sink, const c10::optional<at::Tensor>& v_sink_scale,
                      const c10::optional<at::Tensor>& sink_pos, int64_t sink_bits,
                      const c10::optional<at::Tensor>& position_ids, int64_t seq_len) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bitnet_a48: unsupported KV bits ", bits);
  for (const at::Tensor* t : {&k_window, &v_window, &k_new, &v_new, &k_packed, &k_scale, &v_packed, &v_scale})
    check_cpu_contiguous(*t, "every KV append input");
  TORCH_CHECK(k_window.dim() == 4 && k_new.dim() == 4 && k_new.size(2) == 1 && k_window.sizes() == v_window.sizes() &&
                  k_new.sizes() == v_new.sizes() && k_new.size(0) == k_window.size(0) &&
                  k_new.size(1) == k_window.size(1) && k_new.size(3) == k_window.size(3),
              "bitnet_a48: KV append takes a window (B, H, W, D) and one new token (B, H, 1, D) each for k and v");
  TORCH_CHECK(k_new.scalar_type() == k_window.scalar_type() && v_new.scalar_type() == k_window.scalar_type() &&
                  v_window.scalar_type() == k_window.scalar_type(),
              "bitnet_a48: new keys and values must have the window's dtype");
  const int64_t B = k_window.size(0), H = k_window.size(1), W = k_window.size(2), D = k_window.size(3);
  TORCH_CHECK(D % 8 == 0 && k_packed.dim() == 4 && k_packed.size(0) == B && k_packed.size(1) == H &&
                  k_packed.size(3) == D * bits / 8 && v_packed.sizes() == k_packed.sizes() && n_quant >= 0 &&
                  n_quant < k_packed.size(2),
              "bitnet_a48: the packed store (", k_packed.sizes(), ") has no free slot ", n_quant, " for (B=", B,
              ", H=", H, ", D=", D, ") at ", bits, " bits");
  TORCH_CHECK(k_scale.scalar_type() == at::kHalf && v_scale.scalar_type() == at::kHalf &&
                  k_scale.dim() == 3 && k_scale.size(2) == k_packed.size(2) && v_scale.sizes() == k_scale.sizes(),
              "bitnet_a48: KV append writes fp16 scales (B, H, capacity)");
  uint8_t *ksk = nullptr, *vsk = nullptr;
  c10::Half *kss = nullptr, *vss = nullptr;
  int64_t* sp = nullptr;
  if (sink_bits) {
    TORCH_CHECK(sink_bits == 4 || sink_bits == 8 || sink_bits == 3 || sink_bits == 2,
                "bitnet_a48: unsupported first-token bits ", sink_bits);
    TORCH_CHECK(k_sink.has_value() && v_sink.has_value() && k_sink_scale.has_value() && v_sink_scale.has_value() &&
                    sink_pos.has_value() && sink_pos->scalar_type() == at::kLong && sink_pos->numel() == B &&
                    k_sink->size(-1) == D * sink_bits / 8,
                "bitnet_a48: sink_bits needs the first-token codes, scales and positions");
    for (const at::Tensor* t : {&*k_sink, &*v_sink, &*k_sink_scale, &*v_sink_scale, &*sink_pos})
      check_cpu_contiguous(*t, "every first-token input");
    ksk = k_sink->data_ptr<uint8_t>(); vsk = v_sink->data_ptr<uint8_t>();
    kss = k_sink_scale->data_ptr<c10::Half>(); vss = v_sink_scale->data_ptr<c10::Half>();
    sp = sink_pos->data_ptr<int64_t>();
    // _note_first_tokens for one token: a row without a first token takes this one if its position is 0
    const int64_t* pos = nullptr;
    int64_t pos_rows = 0;
    at::Tensor pc;
    if (position_ids.has_value()) {
      pc = position_ids->contiguous();
      TORCH_CHECK(pc.scalar_type() == at::kLong && pc.dim() == 2 && pc.size(1) == 1 &&
                      (pc.size(0) == 1 || pc.size(0) == B),
                  "bitnet_a48: position_ids must be (batch, 1) int64, got ", position_ids->sizes());
      pos = pc.data_ptr<int64_t>();
      pos_rows = pc.size(0);
    }
    for (int64_t b = 0; b < B; ++b) {
      const int64_t p = pos ? pos[pos_rows > 1 ? b : 0] : seq_len;
      if (p == 0 && sp[b] < 0) sp[b] = seq_len;
    }
  }
#define BITNET_A48_APPEND(T)                                                                                     \
  kv_append_rows<T>(k_window.data_ptr<T>(), v_window.data_ptr<T>(), k_new.data_ptr<T>(), v_new.data_ptr<T>(), B, \
                    H, W, D, k_packed.data_ptr<uint8_t>(), k_scale.data_ptr<c10::Half>(),                        \
                    v_packed.data_ptr<uint8_t>(), v_scale.data_ptr<c10::Half>(), k_packed.size(2), n_quant, bits, \
                    ksk, kss, vsk, vss, sp, sink_bits)
  switch (k_window.scalar_type()) {
    case at::kFloat: BITNET_A48_APPEND(float); break;
    case at::kBFloat16: BITNET_A48_APPEND(c10::BFloat16); break;
    case at::kHalf: BITNET_A48_APPEND(c10::Half); break;
    default: TORCH_CHECK(false, "bitnet_a48: the KV window must be fp32, bf16 or fp16");
  }
#undef BITNET_A48_APPEND
}

// ------------------------------------------------------------------------------------------------------------
// Decode attention: per ISA, the loops over the tokens of one (row, KV head)
//   scores_packed: score[j * ld + t] = (q_j . (c_t - mid)) * s_t * scaling   for the n tokens of the store
//   scores_dense:  score[j * ld + t] = (q_j . x_t) * scaling                  for fp32 rows (window, new token)
//   values_packed: acc_j += (p[j * ld + t] * s_t) * (c_t - mid);   values_dense: acc_j += p[j * ld + t] * x_t
//   exp_sum:       x[t] = exp(x[t] - m), returns the sum;           max_value: the largest x[t]
// ------------------------------------------------------------------------------------------------------------

// Codes minus mid of one group: D codes of `bits` bits, 8 codes per little-endian word of `bits` bytes.
static inline void unpack_centered(const uint8_t* p, int64_t D, int64_t bits, float* out) {
  const float mid = 0.5f * static_cast<float>((1 << bits) - 1);
  const uint64_t mask = (uint64_t(1) << bits) - 1;
  for (int64_t w = 0; w < D / 8; ++w) {
    uint64_t word = 0;
    for (int64_t j = 0; j < bits; ++j) word |= uint64_t(p[w * bits + j]) << (8 * j);
    for (int i = 0; i < 8; ++i) out[w * 8 + i] = static_cast<float>((word >> (bits * i)) & mask) - mid;
  }
}

static inline float dot_scalar(const float* a, const float* b, int64_t D) {
  float s = 0.0f;
  for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

static void scores_packed_scalar(const float* q, int64_t g, int64_t D, const uint8_t* packed, const c10::Half* scale,
                                 int64_t n, int64_t bits, float scaling, float* row, float* score, int64_t ld) {
  const int64_t P = D * bits / 8;
  for (int64_t t = 0; t < n; ++t) {
    unpack_centered(packed + t * P, D, bits, row);
    const float s = static_cast<float>(scale[t]);
    for (int64_t j = 0; j < g; ++j) score[j * ld + t] = dot_scalar(q + j * D, row, D) * s * scaling;
  }
}

static void scores_dense_scalar(const float* q, int64_t g, int64_t D, const float* x, int64_t n, float scaling,
                                float* score, int64_t ld) {
  for (int64_t t = 0; t < n; ++t)
    for (int64_t j = 0; j < g; ++j) score[j * ld + t] = dot_scalar(q + j * D, x + t * D, D) * scaling;
}

static void values_packed_scalar(const float* p, int64_t ld, int64_t g, int64_t D, const uint8_t* packed,
                                 const c10::Half* scale, int64_t n, int64_t bits, float* row, float* acc) {
  const int64_t P = D * bits / 8;
  for (int64_t t = 0; t < n; ++t) {
    bool any = false;
    for (int64_t j = 0; j < g; ++j) any = any || p[j * ld + t] != 0.0f;
    if (!any) continue;
    unpack_centered(packed + t * P, D, bits, row);
    const float s = static_cast<float>(scale[t]);
    for (int64_t j = 0; j < g; ++j) {
      const float c = p[j * ld + t] * s;
      if (c == 0.0f) continue;
      for (int64_t d = 0; d < D; ++d) acc[j * D + d] += c * row[d];
    }
  }
}

static void values_dense_scalar(const float* p, int64_t ld, int64_t g, int64_t D, const float* x, int64_t n,
                                float* acc) {
  for (int64_t t = 0; t < n; ++t)
    for (int64_t j = 0; j < g; ++j) {
      const float c = p[j * ld + t];
      if (c == 0.0f) continue;
      for (int64_t d = 0; d < D; ++d) acc[j * D + d] += c * x[t * D + d];
    }
}

// The softmax denominator, summed token by token: a left-padded row (exact zeros in front) gets the sum it has
// alone, whatever SIMD lane each token falls in.
static inline float sum_in_order(const float* x, int64_t n) {
  float sum = 0.0f;
  for (int64_t t = 0; t < n; ++t) sum += x[t];
  return sum;
}

static float exp_sum_scalar(float* x, int64_t n, float m) {
  for (int64_t t = 0; t < n; ++t) x[t] = std::exp(x[t] - m);
  return sum_in_order(x, n);
}

static float max_value_scalar(const float* x, int64_t n) {
  float m = -INFINITY;
  for (int64_t t = 0; t < n; ++t) m = std::max(m, x[t]);
  return m;
}

#if defined(BITNET_A48_X86)

// Cephes' expf polynomial on the reduced argument r = x - n·ln2 (|r| <= ln2/2).
#define BITNET_A48_EXP_POLY(V, FMADD, SET1, r)                                                                 \
  V y = SET1(1.9875691500e-4f);                                                                                  \
  y = FMADD(y, r, SET1(1.3981999507e-3f));                                                                       \
  y = FMADD(y, r, SET1(8.3334519073e-3f));                                                                       \
  y = FMADD(y, r, SET1(4.1665795894e-2f));                                                                       \
  y = FMADD(y, r, SET1(1.6666665459e-1f));                                                                       \
  y = FMADD(y, r, SET1(5.0000001201e-1f));

// --- AVX2 + FMA: 8 lanes

#define BITNET_A48_AVX2 __attribute__((target("avx2,fma")))

BITNET_A48_AVX2 static inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

BITNET_A48_AVX2 static inline __m256 exp256(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.33654f), _CMP_LT_OQ);  // exp < FLT_MIN (and -inf): 0
  x = _mm256_min_ps(x, _mm256_set1_ps(88.0f));
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.33654f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  BITNET_A48_EXP_POLY(__m256, _mm256_fmadd_ps, _mm256_set1_ps, r)
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

BITNET_A48_AVX2 static inline uint32_t load_word(const uint8_t* p, int bits) {
  uint32_t w = p[0] | (uint32_t(p[1]) << 8);  // bits 2, 3, 4: words of 2, 3, 4 bytes
  if (bits >= 3) w |= uint32_t(p[2]) << 16;
  if (bits == 4) w |= uint32_t(p[3]) << 24;
  return w;
}

template <int BITS>
BITNET_A48_AVX2 static inline void unpack_avx2(const uint8_t* p, int64_t D, float* out) {
  const __m256 mid = _mm256_set1_ps(0.5f * static_cast<float>((1 << BITS) - 1));
  if (BITS == 8) {
    for (int64_t d = 0; d < D; d += 8) {
      const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + d)));
      _mm256_storeu_ps(out + d, _mm256_sub_ps(_mm256_cvtepi32_ps(c), mid));
    }
    return;
  }
  const __m256i shifts = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS);
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  for (int64_t w = 0; w < D / 8; ++w) {
    const __m256i v = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(load_word(p + w * BITS, BITS)), shifts),
                                       mask);
    _mm256_storeu_ps(out + w * 8, _mm256_sub_ps(_mm256_cvtepi32_ps(v), mid));
  }
}

BITNET_A48_AVX2 static inline float dot_avx2(const float* a, const float* b, int64_t D) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), s1);
  }
  for (; d < D; d += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), s0);
  return hsum256(_mm256_add_ps(s0, s1));
}

BITNET_A48_AVX2 static inline void axpy_avx2(float c, const float* x, float* y, int64_t D) {
  const __m256 cv = _mm256_set1_ps(c);
  for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(y + d, _mm256_fmadd_ps(cv, _mm256_loadu_ps(x + d),
                                                                             _mm256_loadu_ps(y + d)));
}

template <int BITS>
BITNET_A48_AVX2 static void scores_packed_avx2(const float* q, int64_t g, int64_t D, const uint8_t* packed,
                                               const c10::Half* scale, int64_t n, float scaling, float* row,
                                               float* score, int64_t ld) {
  const int64_t P = D * BITS / 8;
  for (int64_t t = 0; t < n; ++t) {
    unpack_avx2<BITS>(packed + t * P, D, row);
    const float s = static_cast<float>(scale[t]);
    for (int64_t j = 0; j < g; ++j) score[j * ld + t] = dot_avx2(q + j * D, row, D) * s * scaling;
  }
}

BITNET_A48_AVX2 static void scores_dense_avx2(const float* q, int64_t g, int64_t D, const float* x, int64_t n,
                                              float scaling, float* score, int64_t ld) {
  for (int64_t t = 0; t < n; ++t)
    for (int64_t j = 0; j < g; ++j) score[j * ld + t] = dot_avx2(q + j * D, x + t * D, D) * scaling;
}

template <int BITS>
BITNET_A48_AVX2 static void values_packed_avx2(const float* p, int64_t ld, int64_t g, int64_t D,
                                               const uint8_t* packed, const c10::Half* scale, int64_t n, float* row,
                                               float* acc) {
  const int64_t P = D * BITS / 8;
  for (int64_t t = 0; t < n; ++t) {
    bool any = false;
    for (int64_t j = 0; j < g; ++j) any = any || p[j * ld + t] != 0.0f;
    if (!any) continue;
    unpack_avx2<BITS>(packed + t * P, D, row);
    const float s = static_cast<float>(scale[t]);
    for (int64_t j = 0; j < g; ++j) {
      const float c = p[j * ld + t] * s;
      if (c != 0.0f) axpy_avx2(c, row, acc + j * D, D);
    }
  }
}

BITNET_A48_AVX2 static void values_dense_avx2(const float* p, int64_t ld, int64_t g, int64_t D, const float* x,
                                              int64_t n, float* acc) {
  for (int64_t t = 0; t < n; ++t)
    for (int64_t j = 0; j < g; ++j)
      if (p[j * ld + t] != 0.0f) axpy_avx2(p[j * ld + t], x + t * D, acc + j * D, D);
}

BITNET_A48_AVX2 static float exp_sum_avx2(float* x, int64_t n, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) _mm256_storeu_ps(x + t, exp256(_mm256_sub_ps(_mm256_loadu_ps(x + t), mv)));
  if (t < n) {  // the tail through the same polynomial (-inf pads give 0)
    alignas(32) float tail[8];
    std::fill(tail, tail + 8, -INFINITY);
    std::copy(x + t, x + n, tail);
    _mm256_store_ps(tail, exp256(_mm256_sub_ps(_mm256_load_ps(tail), mv)));
    std::copy(tail, tail + (n - t), x + t);
  }
  return sum_in_order(x, n);
}

BITNET_A48_AVX2 static float max_value_avx2(const float* x, int64_t n) {
  __m256 mv = _mm256_set1_ps(-INFINITY);
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(x + t));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mv);
  float m = -INFINITY;
  for (float v : lanes) m = std::max(m, v);
  for (; t < n; ++t) m = std::max(m, x[t]);
  return m;
}

// --- AVX-512 F/BW/DQ: 16 lanes

#define BITNET_A48_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))

BITNET_A48_AVX512 static inline __m512 exp512(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654f), _CMP_GE_OQ);  // else 0 (and -inf, NaN)
  x = _mm512_min_ps(x, _mm512_set1_ps(88.0f));
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.33654f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  BITNET_A48_EXP_POLY(__m512, _mm512_fmadd_ps, _mm512_set1_ps, r)
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(y, n));
}

template <int BITS>
BITNET_A48_AVX512 static inline void unpack_avx512(const uint8_t* p, int64_t D, float* out) {
  const __m512 mid = _mm512_set1_ps(0.5f * static_cast<float>((1 << BITS) - 1));
  int64_t d = 0;
  if (BITS == 8) {
    for (; d + 16 <= D; d += 16) {
      const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + d)));
      _mm512_storeu_ps(out + d, _mm512_sub_ps(_mm512_cvtepi32_ps(c), mid));
    }
  } else {
    const __m512i shifts = _mm512_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS,
                                             0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS);
    const __m512i mask = _mm512_set1_epi32((1 << BITS) - 1);
    for (; d + 16 <= D; d += 16) {
      const uint8_t* w = p + d / 8 * BITS;
      const __m512i words = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(load_word(w, BITS))),
                                               _mm256_set1_epi32(load_word(w + BITS, BITS)), 1);
      const __m512i c = _mm512_and_si512(_mm512_srlv_epi32(words, shifts), mask);
      _mm512_storeu_ps(out + d, _mm512_sub_ps(_mm512_cvtepi32_ps(c), mid));
    }
  }
  if (d < D) unpack_avx2<BITS>(p + d / 8 * BITS, D - d, out + d);  // D is a multiple of 8: one word left
}

BITNET_A48_AVX512 static inline float dot_avx512(const float* a, const float* b, int64_t D) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d + 16), _mm512_loadu_ps(b + d + 16), s1);
  }
  for (; d + 16 <= D; d += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), s0);
  float s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
  for (; d < D; ++d) s += a[d] * b[d];
  return s;
}

BITNET_A48_AVX512 static inline void axpy_avx512(float c, const float* x, float* y, int64_t D) {
  const __m512 cv = _mm512_set1_ps(c);
  int64_t d = 0;
  for (; d + 16 <= D; d += 16)
    _mm512_storeu_ps(y + d, _mm512_fmadd_ps(cv, _mm512_loadu_ps(x + d), _mm512_loadu_ps(y + d)));
  for (; d < D; ++d) y[d] += c * x[d];
}

template <int BITS>
BITNET_A48_AVX512 static void scores_packed_avx512(const float* q, int64_t g, int64_t D, const uint8_t* packed,
                                                   const c10::Half* scale, int64_t n, float scaling, float* row,
                                                   float* score, int64_t ld) {
  const int64_t P = D * BITS / 8;
  for (int64_t t = 0; t < n; ++t) {
    _mm_prefetch(reinterpret_cast<const char*>(packed + (t + 8) * P), _MM_HINT_T0);
    unpack_avx512<BITS>(packed + t * P, D, row);
    const float s = static_cast<float>(scale[t]);
    for (int64_t j = 0; j < g; ++j) score[j * ld + t] = dot_avx512(q + j * D, row, D) * s * scaling;
  }
}

BITNET_A48_AVX512 static void scores_dense_avx512(const float* q, int64_t g, int64_t D, const float* x, int64_t n,
                                                  float scaling, float* score, int64_t ld) {
  for (int64_t t = 0; t < n; ++t)
    for (int64_t j = 0; j < g; ++j) score[j * ld + t] = dot_avx512(q + j * D, x + t * D, D) * scaling;
}

template <int BITS>
BITNET_A48_AVX512 static void values_packed_avx512(const float* p, int64_t ld, int64_t g, int64_t D,
                                                   const uint8_t* packed, const c10::Half* scale, int64_t n,
                                                   float* row, float* acc) {
  const int64_t P = D * BITS / 8;
  for (int64_t t = 0; t < n; ++t) {
    bool any = false;
    for (int64_t j = 0; j < g; ++j) any = any || p[j * ld + t] != 0.0f;
    if (!any) continue;
    _mm_prefetch(reinterpret_cast<const char*>(packed + (t + 8) * P), _MM_HINT_T0);
    unpack_avx512<BITS>(packed + t * P, D, row);
    const float s = static_cast<float>(scale[t]);
    for (int64_t j = 0; j < g; ++j) {
      const float c = p[j * ld + t] * s;
      if (c != 0.0f) axpy_avx512(c, row, acc + j * D, D);
    }
  }
}

BITNET_A48_AVX512 static void values_dense_avx512(const float* p, int64_t ld, int64_t g, int64_t D, const float* x,
                                                  int64_t n, float* acc) {
  for (int64_t t = 0; t < n; ++t)
    for (int64_t j = 0; j < g; ++j)
      if (p[j * ld + t] != 0.0f) axpy_avx512(p[j * ld + t], x + t * D, acc + j * D, D);
}

BITNET_A48_AVX512 static float exp_sum_avx512(float* x, int64_t n, float m) {
  const __m512 mv = _mm512_set1_ps(m);
  int64_t t = 0;
  for (; t + 16 <= n; t += 16) _mm512_storeu_ps(x + t, exp512(_mm512_sub_ps(_mm512_loadu_ps(x + t), mv)));
  if (t < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - t)) - 1);
    _mm512_mask_storeu_ps(x + t, k, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + t), mv)));
  }
  return sum_in_order(x, n);
}

BITNET_A48_AVX512 static float max_value_avx512(const float* x, int64_t n) {
  __m512 mv = _mm512_set1_ps(-INFINITY);
  int64_t t = 0;
  for (; t + 16 <= n; t += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(x + t));
  if (t < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - t)) - 1);
    mv = _mm512_mask_max_ps(mv, k, mv, _mm512_maskz_loadu_ps(k, x + t));
  }
  return _mm512_reduce_max_ps(mv);
}

#endif  // BITNET_A48_X86

// The ISA's loop (the bits as a template argument on the vector paths).
#define BITNET_A48_BY_BITS(FN, ...)                                                                              \
  switch (bits) {                                                                                                \
    case 2: FN<2>(__VA_ARGS__); break;                                                                           \
    case 3: FN<3>(__VA_ARGS__); break;                                                                           \
    case 4: FN<4>(__VA_ARGS__); break;                                                                           \
    default: FN<8>(__VA_ARGS__); break;                                                                          \
  }

static void scores_packed(int64_t isa, const float* q, int64_t g, int64_t D, const uint8_t* packed,
                          const c10::Half* scale, int64_t n, int64_t bits, float scaling, float* row, float* score,
                          int64_t ld) {
#if defined(BITNET_A48_X86)
  if (isa == kAvx512) {
    BITNET_A48_BY_BITS(scores_packed_avx512, q, g, D, packed, scale, n, scaling, row, score, ld)
    return;
  }
  if (isa == kAvx2) {
    BITNET_A48_BY_BITS(scores_packed_avx2, q, g, D, packed, scale, n, scaling, row, score, ld)
    return;
  }
#endif
  scores_packed_scalar(q, g, D, packed, scale, n, bits, scaling, row, score, ld);
}

static void values_packed(int64_t isa, const float* p, int64_t ld, int64_t g, int64_t D, const uint8_t* packed,
                          const c10::Half* scale, int64_t n, int64_t bits, float* row, float* acc) {
#if defined(BITNET_A48_X86)
  if (isa == kAvx512) {
    BITNET_A48_BY_BITS(values_packed_avx512, p, ld, g, D, packed, scale, n, row, acc)
    return;
  }
  if (isa == kAvx2) {
    BITNET_A48_BY_BITS(values_packed_avx2, p, ld, g, D, packed, scale, n, row, acc)
    return;
  }
#endif
  values_packed_scalar(p, ld, g, D, packed, scale, n, bits, row, acc);
}

#if defined(BITNET_A48_X86)
#define BITNET_A48_BY_ISA(FN, ...) \
  (isa == kAvx512 ? FN##_avx512(__VA_ARGS__) : isa == kAvx2 ? FN##_avx2(__VA_ARGS__) : FN##_scalar(__VA_ARGS__))
#else
#define BITNET_A48_BY_ISA(FN, ...) FN##_scalar(__VA_ARGS__)
#endif

// Store tokens per work item at least (a chunk is worth splitting off only if its reads outweigh a merge).
constexpr int64_t kMinChunkTokens = 512;

// Work items: (row, KV head) pairs, each split into C chunks of its store when there are fewer pairs than about
// four per thread (batch 1 has 5 for 2B-4T), so that every thread has work; 1 chunk otherwise.
static int64_t store_chunks(int64_t units, int64_t n_quant) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || units >= 4 * threads) return 1;
  const int64_t want = (4 * threads + units - 1) / units;
  return std::max<int64_t>(1, std::min<int64_t>(want, n_quant / kMinChunkTokens));
}

// One work item: the g query heads of pair bh over store tokens [s0, s1) (and, for the last chunk, the window
// and the new token). Leaves the running max m[j], the sum of exp(score - m) l[j] and the unnormalised output
// acc[j] = sum exp(score - m) * value (flash-decoding partials, merged by the caller).
template <typename T>
static void kv_attention_item(
    int64_t isa, const float* qf, int64_t b, int64_t bh, int64_t g, int64_t D, int64_t s0, int64_t s1, bool dense,
    const uint8_t* kp, const c10::Half* ks, const uint8_t* vp, const c10::Half* vs, int64_t cap, int64_t n_quant,
    int64_t bits, const uint8_t* k_sink, const c10::Half* k_sink_s, const uint8_t* v_sink,
    const c10::Half* v_sink_s, const int64_t* sink_pos, int64_t sink_bits, const T* kw, const T* vw, int64_t w,
    const T* kn, const T* vn, const float* bias, int64_t bias_rows, int64_t kv_len, float scaling,
    std::vector<float>& scores, std::vector<float>& row, std::vector<float>& keys, std::vector<float>& values,
    float* m, float* l, float* acc) {
  const int64_t P = D * bits / 8, Ps = sink_bits ? D * sink_bits / 8 : 0, ns = s1 - s0;
  const int64_t nd = dense ? w + 1 : 0, nt = ns + nd;
  scores.resize(g * nt);
  const int64_t sink = sink_bits ? sink_pos[b] : -1;
  const bool has_sink = sink >= s0 && sink < s1 && sink < n_quant;  // the row's first token, at sink_bits
  scores_packed(isa, qf, g, D, kp + (bh * cap + s0) * P, ks + bh * cap + s0, ns, bits, scaling, row.data(),
                scores.data(), nt);
  if (has_sink) {
    unpack_centered(k_sink + bh * Ps, D, sink_bits, row.data());
    const float s = static_cast<float>(k_sink_s[bh]);
    for (int64_t j = 0; j < g; ++j) scores[j * nt + sink - s0] = dot_scalar(qf + j * D, row.data(), D) * s * scaling;
  }
  if (dense) {  // the high-precision window, then the new token, as fp32 rows
    keys.resize(nd * D);
    values.resize(nd * D);
    for (int64_t t = 0; t < nd; ++t) {
      const T* ksrc = t < w ? kw + (bh * w + t) * D : kn + bh * D;
      const T* vsrc = t < w ? vw + (bh * w + t) * D : vn + bh * D;
      for (int64_t d = 0; d < D; ++d) {
        keys[t * D + d] = to_float(ksrc[d]);
        values[t * D + d] = to_float(vsrc[d]);
      }
    }
    BITNET_A48_BY_ISA(scores_dense, qf, g, D, keys.data(), nd, scaling, scores.data() + ns, nt);
  }
  if (bias) {
    const float* brow = bias + (bias_rows > 1 ? b : 0) * kv_len;
    for (int64_t j = 0; j < g; ++j) {
      for (int64_t t = 0; t < ns; ++t) scores[j * nt + t] += brow[s0 + t];
      for (int64_t t = 0; t < nd; ++t) scores[j * nt + ns + t] += brow[n_quant + t];
    }
  }
  for (int64_t j = 0; j < g; ++j) {  // exp(score - max) in place: every score of the item is in hand
    float* sj = scores.data() + j * nt;
    m[j] = BITNET_A48_BY_ISA(max_value, sj, nt);
    if (std::isinf(m[j]) && m[j] < 0) {
      std::fill(sj, sj + nt, 0.0f);
      l[j] = 0.0f;
      continue;
    }
    l[j] = BITNET_A48_BY_ISA(exp_sum, sj, nt, m[j]);
  }
  std::fill(acc, acc + g * D, 0.0f);
  float sink_p[64];
  if (has_sink)  // the first token's b-bit slot takes no weight; its sink_bits codes are added below
    for (int64_t j = 0; j < g; ++j) {
      sink_p[j] = scores[j * nt + sink - s0];
      scores[j * nt + sink - s0] = 0.0f;
    }
  values_packed(isa, scores.data(), nt, g, D, vp + (bh * cap + s0) * P, vs + bh * cap + s0, ns, bits, row.data(),
                acc);
  if (has_sink) {
    unpack_centered(v_sink + bh * Ps, D, sink_bits, row.data());
    const float s = static_cast<float>(v_sink_s[bh]);
    for (int64_t j = 0; j < g; ++j) {
      const float c = sink_p[j] * s;
      for (int64_t d = 0; d < D; ++d) acc[j * D + d] += c * row[d];
    }
  }
  if (dense) BITNET_A48_BY_ISA(values_dense, scores.data() + ns, nt, g, D, values.data(), nd, acc);
}

template <typename T>
static void kv_attention_rows(
    const T* q, int64_t B, int64_t Hq, int64_t H, int64_t D,
    const uint8_t* kp, const c10::Half* ks, const uint8_t* vp, const c10::Half* vs, int64_t cap, int64_t n_quant,
    int64_t bits, const uint8_t* k_sink, const c10::Half* k_sink_s, const uint8_t* v_sink,
    const c10::Half* v_sink_s, const int64_t* sink_pos, int64_t sink_bits, const T* kw, const T* vw, int64_t w,
    const T* kn, const T* vn, const float* bias, int64_t bias_rows, int64_t kv_len, float scaling, T* out) {
  const int64_t g = Hq / H, isa = current_isa(), C = store_chunks(B * H, n_quant), stride = 2 * g + g * D;
  std::vector<float> partials(B * H * C * stride);  // per item: m (g), l (g), acc (g * D)
  at::parallel_for(0, B * H * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, qf(g * D), row(D), keys, values;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / C, c = item % C, b = bh / H, h = bh % H;
      for (int64_t j = 0; j < g; ++j)
        for (int64_t d = 0; d < D; ++d) qf[j * D + d] = to_float(q[((b * Hq) + h * g + j) * D + d]);
      float* part = partials.data() + item * stride;
      kv_attention_item<T>(isa, qf.data(), b, bh, g, D, n_quant * c / C, n_quant * (c + 1) / C, c == C - 1, kp, ks,
                           vp, vs, cap, n_quant, bits, k_sink, k_sink_s, v_sink, v_sink_s, sink_pos, sink_bits, kw,
                           vw, w, kn, vn, bias, bias_rows, kv_len, scaling, scores, row, keys, values, part,
                           part + g, part + 2 * g);
    }
  });
  // Merge the chunks of each pair: out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c, M = max_c m_c.
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const int64_t b = bh / H, h = bh % H;
    for (int64_t j = 0; j < g; ++j) {
      float M = -INFINITY;
      for (int64_t c = 0; c < C; ++c) M = std::max(M, partials[(bh * C + c) * stride + j]);
      float L = 0.0f;
      std::vector<float> o(D, 0.0f);
      if (!(std::isinf(M) && M < 0)) {
        for (int64_t c = 0; c < C; ++c) {
          const float* part = partials.data() + (bh * C + c) * stride;
          if (std::isinf(part[j]) && part[j] < 0) continue;
          const float f = C == 1 ? 1.0f : std::exp(part[j] - M);
          L += f * part[g + j];
          for (int64_t d = 0; d < D; ++d) o[d] += f * part[2 * g + j * D + d];
        }
      }
      const float inv = L > 0.0f ? 1.0f / L : 0.0f;
      for (int64_t d = 0; d < D; ++d) out[((b * Hq) + h * g + j) * D + d] = from_float<T>(o[d] * inv);  // (B,1,Hq,D)
    }
  }
}

at::Tensor kv_decode_attention(const at::Tensor& query, const at::Tensor& k_packed, const at::Tensor& k_scale,
                               const at::Tensor& v_packed, const at::Tensor& v_scale, int64_t n_quant, int64_t bits,
                               const c10::optional<at::Tensor>& k_sink, const c10::optional<at::Tensor>& k_sink_scale,
                               const c10::optional<at::Tensor>& v_sink, const c10::optional<at::Tensor>& v_sink_scale,
                               const c10::optional<at::Tensor>& sink_pos, int64_t sink_bits,
                               const at::Tensor& k_window, const at::Tensor& v_window, const at::Tensor& k_new,
                               const at::Tensor& v_new, const c10::optional<at::Tensor>& bias, double scaling) {
  TORCH_CHECK(query.dim() == 4 && query.size(2) == 1, "bitnet_a48: decode attention takes one query token, got ",
              query.sizes());
  const int64_t B = query.size(0), Hq = query.size(1), D = query.size(3);
  TORCH_CHECK(k_packed.dim() == 4 && k_packed.size(0) == B && Hq % k_packed.size(1) == 0 && D % 8 == 0,
              "bitnet_a48: packed keys must be (B, H, capacity, D*bits/8) with Hq a multiple of H");
  const int64_t H = k_packed.size(1), cap = k_packed.size(2), w = k_window.size(2);
  TORCH_CHECK(Hq / H <= 64, "bitnet_a48: decode attention takes at most 64 query heads per KV head");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bitnet_a48: unsupported KV bits ", bits);
  TORCH_CHECK(k_packed.size(3) == D * bits / 8 && n_quant <= cap, "bitnet_a48: packed key shape mismatch");
  TORCH_CHECK(k_scale.scalar_type() == at::kHalf && v_scale.scalar_type() == at::kHalf,
              "bitnet_a48: decode attention reads fp16 KV scales");
  for (const at::Tensor* t : {&query, &k_packed, &k_scale, &v_packed, &v_scale, &k_window, &v_window, &k_new, &v_new})
    check_cpu_contiguous(*t, "every decode attention input");
  TORCH_CHECK(k_window.scalar_type() == query.scalar_type() && k_new.scalar_type() == query.scalar_type(),
              "bitnet_a48: window and new keys must have the query's dtype");
  const int64_t kv_len = n_quant + w + 1;
  const float* bias_ptr = nullptr;
  int64_t bias_rows = 1;
  if (bias.has_value()) {
    check_cpu_contiguous(*bias, "the attention bias");
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 2 && bias->size(1) == kv_len &&
                    (bias->size(0) == 1 || bias->size(0) == B),
                "bitnet_a48: the attention bias must be fp32 (1 or B, ", kv_len, "), got ", bias->sizes());
    bias_ptr = bias->data_ptr<float>();
    bias_rows = bias->size(0);
  }
  const uint8_t *ksk = nullptr, *vsk = nullptr;
  const c10::Half *kss = nullptr, *vss = nullptr;
  const int64_t* sp = nullptr;
  if (sink_bits) {
    TORCH_CHECK(k_sink.has_value() && v_sink.has_value() && k_sink_scale.has_value() && v_sink_scale.has_value() &&
                    sink_pos.has_value() && sink_pos->scalar_type() == at::kLong,
                "bitnet_a48: sink_bits needs the sink codes, scales and positions");
    ksk = k_sink->data_ptr<uint8_t>(); vsk = v_sink->data_ptr<uint8_t>();
    kss = k_sink_scale->data_ptr<c10::Half>(); vss = v_sink_scale->data_ptr<c10::Half>();
    sp = sink_pos->data_ptr<int64_t>();
  }
  auto out = at::empty({B, 1, Hq, D}, query.options());
  const c10::Half* kscale = k_scale.data_ptr<c10::Half>();
  const c10::Half* vscale = v_scale.data_ptr<c10::Half>();
#define BITNET_A48_KV_CALL(T)                                                                                    \
  kv_attention_rows<T>(query.data_ptr<T>(), B, Hq, H, D, k_packed.data_ptr<uint8_t>(), kscale,                  \
                       v_packed.data_ptr<uint8_t>(), vscale, cap, n_quant, bits, ksk, kss, vsk, vss, sp, sink_bits, \
                       k_window.data_ptr<T>(), v_window.data_ptr<T>(), w, k_new.data_ptr<T>(), v_new.data_ptr<T>(), \
                       bias_ptr, bias_rows, kv_len, static_cast<float>(scaling), out.data_ptr<T>())
  switch (query.scalar_type()) {
    case at::kFloat: BITNET_A48_KV_CALL(float); break;
    case at::kBFloat16: BITNET_A48_KV_CALL(c10::BFloat16); break;
    case at::kHalf: BITNET_A48_KV_CALL(c10::Half); break;
    default: TORCH_CHECK(false, "bitnet_a48: decode attention takes fp32, bf16 or fp16 queries");
  }
#undef BITNET_A48_KV_CALL
  return out;
}

}  // namespace bitnet_a48

TORCH_LIBRARY_FRAGMENT(bitnet_a48_native, m) {
  m.def("rope(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
  m.def("kv_decode_attention(Tensor query, Tensor k_packed, Tensor k_scale, Tensor v_packed, Tensor v_scale, "
        "int n_quant, int bits, Tensor? k_sink, Tensor? k_sink_scale, Tensor? v_sink, Tensor? v_sink_scale, "
        "Tensor? sink_pos, int sink_bits, Tensor k_window, Tensor v_window, Tensor k_new, Tensor v_new, "
        "Tensor? bias, float scaling) -> Tensor");
  m.def("kv_quantize_pack(Tensor x, int bits) -> (Tensor, Tensor)");
  m.def("kv_append_decode(Tensor(a!) k_window, Tensor(b!) v_window, Tensor k_new, Tensor v_new, "
        "Tensor(c!) k_packed, Tensor(d!) k_scale, Tensor(e!) v_packed, Tensor(f!) v_scale, int n_quant, int bits, "
        "Tensor(g!)? k_sink, Tensor(h!)? k_sink_scale, Tensor(i!)? v_sink, Tensor(j!)? v_sink_scale, "
        "Tensor(k!)? sink_pos, int sink_bits, Tensor? position_ids, int seq_len) -> ()");
}

TORCH_LIBRARY_IMPL(bitnet_a48_native, CPU, m) {
  m.impl("rope", &bitnet_a48::rope);
  m.impl("kv_decode_attention", &bitnet_a48::kv_decode_attention);
  m.impl("kv_quantize_pack", &bitnet_a48::kv_quantize_pack);
  m.impl("kv_append_decode", &bitnet_a48::kv_append_decode);
}
"""
