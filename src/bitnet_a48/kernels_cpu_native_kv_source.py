"""C++ source of the native KV-cache kernels: decode attention over the packed 3-bit store, quantise-and-pack.

Appended to ``kernels_cpu_native_source.CPP_SOURCE`` (whose helpers it uses: ISA selection, element conversion) and
built with it into one library by ``kernels_cpu_native.py``; its ops join the ``bitnet_a48_native`` namespace
through ``TORCH_LIBRARY_FRAGMENT``. Torch references: ``cache_bitnet_a48.BitNetA48QuantizedLayer`` (the blockwise
``attend`` and ``append``) and ``kernels_kv_cache.quantize_pack_torch``.
"""

KV_CPP_SOURCE = r"""
namespace bitnet_a48 {

// ------------------------------------------------------------------------------------------------------------
// Decode attention over the packed KV cache (cache_bitnet_a48.py, dynamic layout): one new token per row
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

template <typename T>
static void kv_attention_rows(
    const T* q, int64_t B, int64_t Hq, int64_t H, int64_t D,
    const uint8_t* kp, const c10::Half* ks, const uint8_t* vp, const c10::Half* vs, int64_t cap, int64_t n_quant,
    int64_t bits, const uint8_t* k_sink, const c10::Half* k_sink_s, const uint8_t* v_sink,
    const c10::Half* v_sink_s, const int64_t* sink_pos, int64_t sink_bits, const T* kw, const T* vw, int64_t w,
    const T* kn, const T* vn, const float* bias, int64_t bias_rows, int64_t kv_len, float scaling, T* out) {
  const int64_t g = Hq / H, P = D * bits / 8, Ps = sink_bits ? D * sink_bits / 8 : 0, n = n_quant + w + 1;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(g * n), key(D), value(D), acc(g * D), qf(g * D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      for (int64_t j = 0; j < g; ++j)
        for (int64_t d = 0; d < D; ++d) qf[j * D + d] = to_float(q[((b * Hq) + h * g + j) * D + d]);
      const int64_t sink = sink_bits ? sink_pos[b] : -1;
      const bool has_sink = sink >= 0 && sink < n_quant;
      // Token t of keys or values into `row` (returns its scale): the packed store (the row's first token at
      // sink_bits), then the high-precision window, then the new token.
      auto load = [&](int64_t t, const uint8_t* packed, const c10::Half* scales, const uint8_t* sink_codes,
                      const c10::Half* sink_scale, const T* window, const T* fresh, float* row) -> float {
        if (t < n_quant) {
          const int64_t slot = bh * cap + t;
          if (has_sink && t == sink) {
            unpack_centered(sink_codes + bh * Ps, D, sink_bits, row);
            return static_cast<float>(sink_scale[bh]);
          }
          unpack_centered(packed + slot * P, D, bits, row);
          return static_cast<float>(scales[slot]);
        }
        const T* src = t < n_quant + w ? window + (bh * w + (t - n_quant)) * D : fresh + bh * D;
        for (int64_t d = 0; d < D; ++d) row[d] = to_float(src[d]);
        return 1.0f;
      };
      for (int64_t t = 0; t < n; ++t) {
        const float scale = load(t, kp, ks, k_sink, k_sink_s, kw, kn, key.data());
        const float extra = bias ? bias[(bias_rows > 1 ? b : 0) * kv_len + t] : 0.0f;
        for (int64_t j = 0; j < g; ++j) {
          float dot = 0.0f;
          for (int64_t d = 0; d < D; ++d) dot += qf[j * D + d] * key[d];
          scores[j * n + t] = dot * scale * scaling + extra;
        }
      }
      // Softmax per query head (exact: every score is in hand).
      for (int64_t j = 0; j < g; ++j) {
        float mx = -INFINITY;
        for (int64_t t = 0; t < n; ++t) mx = std::max(mx, scores[j * n + t]);
        float sum = 0.0f;
        for (int64_t t = 0; t < n; ++t) {
          const float e = std::isinf(mx) ? 0.0f : std::exp(scores[j * n + t] - mx);
          scores[j * n + t] = e;
          sum += e;
        }
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        for (int64_t t = 0; t < n; ++t) scores[j * n + t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t t = 0; t < n; ++t) {
        const float scale = load(t, vp, vs, v_sink, v_sink_s, vw, vn, value.data());
        for (int64_t j = 0; j < g; ++j) {
          const float p = scores[j * n + t] * scale;
          if (p == 0.0f) continue;
          for (int64_t d = 0; d < D; ++d) acc[j * D + d] += p * value[d];
        }
      }
      for (int64_t j = 0; j < g; ++j)  // out (B, 1, Hq, D)
        for (int64_t d = 0; d < D; ++d) out[((b * Hq) + h * g + j) * D + d] = from_float<T>(acc[j * D + d]);
    }
  });
}

// Quantise-and-pack of KV groups with fp16 scales, in the order of kernels_kv_cache.quantize_pack_torch:
// s = half(min(max(max|x| / mid, 2^-14) * (1 + 2^-10), SCALE_MAX)), c = clamp(floor(x / s + mid + 0.5), 0, 2^b - 1).
template <typename T>
static void kv_quantize_rows(const T* x, int64_t G, int64_t D, int64_t bits, uint8_t* packed, c10::Half* scale) {
  const float mid = 0.5f * static_cast<float>((1 << bits) - 1);
  const float top = static_cast<float>((1 << bits) - 1);
  const float scale_max = static_cast<float>(65504.0 / (1.0 + 1.0 / 1024.0));
  at::parallel_for(0, G, 16, [&](int64_t begin, int64_t end) {
    for (int64_t gi = begin; gi < end; ++gi) {
      const T* row = x + gi * D;
      float amax = 0.0f;
      for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(to_float(row[d])));
      float s = std::max(amax / mid, 1.0f / 16384.0f) * static_cast<float>(1.0 + 1.0 / 1024.0);
      const c10::Half sh = static_cast<c10::Half>(std::min(s, scale_max));
      scale[gi] = sh;
      const float sf = static_cast<float>(sh);
      uint8_t* out = packed + gi * (D * bits / 8);
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
  m.def("kv_decode_attention(Tensor query, Tensor k_packed, Tensor k_scale, Tensor v_packed, Tensor v_scale, "
        "int n_quant, int bits, Tensor? k_sink, Tensor? k_sink_scale, Tensor? v_sink, Tensor? v_sink_scale, "
        "Tensor? sink_pos, int sink_bits, Tensor k_window, Tensor v_window, Tensor k_new, Tensor v_new, "
        "Tensor? bias, float scaling) -> Tensor");
  m.def("kv_quantize_pack(Tensor x, int bits) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bitnet_a48_native, CPU, m) {
  m.impl("kv_decode_attention", &bitnet_a48::kv_decode_attention);
  m.impl("kv_quantize_pack", &bitnet_a48::kv_quantize_pack);
}
"""
