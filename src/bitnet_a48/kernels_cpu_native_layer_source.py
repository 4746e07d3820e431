"""C++ source of the fused decode step of one packed decoder layer: the native ops of a layer in one call.

Appended after ``kernels_cpu_native_source.CPP_SOURCE`` and ``kernels_cpu_native_kv_source.KV_CPP_SOURCE`` (whose
functions it calls in the order of ``modeling_bitnet_a48.BitNetA48DecoderLayer.forward``) and built with them into
one library by ``kernels_cpu_native.py``. A decode step of a packed model runs this op once per layer instead of
about fifteen ops and their Python glue; the result equals the per-op native path bit for bit (the same functions
on the same values), and so the module path within the attention kernel's float rounding. Python side, with the
conditions under which it applies: ``decode_native.py``.

    h   = x + o_proj(attn_sub_norm(attention(rope(q), rope(k), v; packed past)))    q, k, v = qkv(input_norm(x))
    out = h + down_proj(ffn_sub_norm(ReLU²(gate(m)) · up(m)))                        m = post_attention_norm(h)

and the new key and value are appended to the layer's cache (``kv_append_decode``).
"""

LAYER_CPP_SOURCE = r"""
namespace bitnet_a48 {

at::Tensor decoder_layer_decode(
    const at::Tensor& hidden, const at::Tensor& input_norm, const at::Tensor& attn_sub_norm,
    const at::Tensor& post_norm, const at::Tensor& ffn_sub_norm, double eps,
    at::TensorList qkv_packed, at::TensorList qkv_scale, at::IntArrayRef qkv_out, std::string qkv_quantizer,
    int64_t qkv_topk, const at::Tensor& o_packed, const at::Tensor& o_scale, std::string o_quantizer, int64_t o_topk,
    at::TensorList gate_up_packed, at::TensorList gate_up_scale, int64_t intermediate, std::string gate_up_quantizer,
    int64_t gate_up_topk, const at::Tensor& down_packed, const at::Tensor& down_scale, std::string down_quantizer,
    int64_t down_topk, const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads, int64_t head_dim,
    const at::Tensor& k_packed, const at::Tensor& k_scale, const at::Tensor& v_packed, const at::Tensor& v_scale,
    int64_t n_quant, int64_t bits, const c10::optional<at::Tensor>& k_sink,
    const c10::optional<at::Tensor>& k_sink_scale, const c10::optional<at::Tensor>& v_sink,
    const c10::optional<at::Tensor>& v_sink_scale, const c10::optional<at::Tensor>& sink_pos, int64_t sink_bits,
    const at::Tensor& k_window, const at::Tensor& v_window, const c10::optional<at::Tensor>& bias, double scaling,
    const c10::optional<at::Tensor>& position_ids, int64_t seq_len) {
  TORCH_CHECK(hidden.dim() == 2 && qkv_packed.size() == 3 && qkv_out.size() == 3 && gate_up_packed.size() == 2,
              "bitnet_a48: the fused decode step takes hidden states (B, hidden), q/k/v and gate/up weights");
  const int64_t B = hidden.size(0), hidden_size = hidden.size(1), H = k_packed.size(1);
  TORCH_CHECK(qkv_out[0] == num_heads * head_dim && qkv_out[1] == H * head_dim && qkv_out[2] == H * head_dim,
              "bitnet_a48: q/k/v outputs do not match the heads (", num_heads, ", ", H, ") of head_dim ", head_dim);
  // q, k, v of input_norm(x), one quantisation; (B, H, 1, D) views (one token: contiguous)
  auto qkv = ternary_linear(hidden, qkv_packed, qkv_scale, qkv_out, qkv_quantizer, qkv_topk, input_norm, eps, false);
  auto q = qkv[0].view({B, num_heads, 1, head_dim});
  auto k = qkv[1].view({B, H, 1, head_dim});
  auto v = qkv[2].view({B, H, 1, head_dim});
  auto [q_rot, k_rot] = rope(q, k, cos, sin);
  auto attn = kv_decode_attention(q_rot, k_packed, k_scale, v_packed, v_scale, n_quant, bits, k_sink, k_sink_scale,
                                  v_sink, v_sink_scale, sink_pos, sink_bits, k_window, v_window, k_rot, v, bias,
                                  scaling);
  kv_append_decode(k_window, v_window, k_rot, v, k_packed, k_scale, v_packed, v_scale, n_quant, bits, k_sink,
                   k_sink_scale, v_sink, v_sink_scale, sink_pos, sink_bits, position_ids, seq_len);
  auto o = ternary_linear(attn.view({B, num_heads * head_dim}), {o_packed}, {o_scale}, {hidden_size}, o_quantizer,
                          o_topk, attn_sub_norm, eps, false)[0];
  auto h = at::add(hidden, o);
  auto glu = ternary_linear(h, gate_up_packed, gate_up_scale, {intermediate, intermediate}, gate_up_quantizer,
                            gate_up_topk, post_norm, eps, true)[0];
  auto down = ternary_linear(glu, {down_packed}, {down_scale}, {hidden_size}, down_quantizer, down_topk,
                             ffn_sub_norm, eps, false)[0];
  return at::add(h, down);
}

}  // namespace bitnet_a48

TORCH_LIBRARY_FRAGMENT(bitnet_a48_native, m) {
  m.def("decoder_layer_decode(Tensor hidden, Tensor input_norm, Tensor attn_sub_norm, Tensor post_norm, "
        "Tensor ffn_sub_norm, float eps, Tensor[] qkv_packed, Tensor[] qkv_scale, int[] qkv_out, str qkv_quantizer, "
        "int qkv_topk, Tensor o_packed, Tensor o_scale, str o_quantizer, int o_topk, Tensor[] gate_up_packed, "
        "Tensor[] gate_up_scale, int intermediate, str gate_up_quantizer, int gate_up_topk, Tensor down_packed, "
        "Tensor down_scale, str down_quantizer, int down_topk, Tensor cos, Tensor sin, int num_heads, int head_dim, "
        "Tensor(a!) k_packed, Tensor(b!) k_scale, Tensor(c!) v_packed, Tensor(d!) v_scale, int n_quant, int bits, "
        "Tensor(e!)? k_sink, Tensor(f!)? k_sink_scale, Tensor(g!)? v_sink, Tensor(h!)? v_sink_scale, "
        "Tensor(i!)? sink_pos, int sink_bits, Tensor(j!) k_window, Tensor(k!) v_window, Tensor? bias, "
        "float scaling, Tensor? position_ids, int seq_len) -> Tensor");
}

TORCH_LIBRARY_IMPL(bitnet_a48_native, CPU, m) {
  m.impl("decoder_layer_decode", &bitnet_a48::decoder_layer_decode);
}
"""
