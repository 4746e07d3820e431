"""The decode step of a packed decoder layer in one native call, where every part of it has a native path.

A decode step runs, per layer, the q/k/v projections (with the input norm), RoPE, attention over the packed 3-bit
KV store and its append, o_proj (with attn_sub_norm), the residual, gate/up with ReLU²GLU (with the post-attention
norm), down_proj (with ffn_sub_norm) and the residual. Each has a native op already (``packed_bitlinear``,
``modeling_bitnet_a48``, ``cache_bitnet_a48``); between them, Python and a dozen small tensor ops cost about as
much as the attention itself at short context. ``decoder_layer_decode`` runs them in one call of
``bitnet_a48_native::decoder_layer_decode`` (``kernels_cpu_native_layer_source.py``), which calls the same C++
functions in the same order: the result is the per-op native path's, bit for bit.

It applies to a layer of a packed model on the CPU in inference (no gradient), one new token per row, through the
default ``BitNetA48QuantizedCache`` on its native decode path (dynamic layout, full window, fp16 scales, no query
quantisation), with no hooks on the layer or its modules (so accelerate's offload hooks, sparsity meters and LoRA
wrappers take the module path) and ReLU²GLU. Otherwise ``decoder_layer_decode`` returns None and the layer runs its
modules.
"""

from __future__ import annotations

import torch
from torch import nn

from .cache_bitnet_a48 import BitNetA48QuantizedCache, BitNetA48QuantizedLayer
from .packed_bitlinear import fusable_group, has_forward_hooks


def _hook_free(*modules: nn.Module) -> bool:
    return not any(has_forward_hooks(module) for module in modules)


def decoder_layer_decode(
    layer: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    cache: object,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor | None:
    """``layer``'s output (B, 1, hidden) for one new token per row, with its key and value appended to ``cache``, in
    one native call; or None where that call does not apply (module docstring)."""
    if not isinstance(cache, BitNetA48QuantizedCache) or cache.query_bits is not None or position_embeddings is None:
        return None
    if not hidden_states.is_cpu or hidden_states.dim() != 3 or hidden_states.shape[1] != 1:
        return None
    if torch.is_grad_enabled() and hidden_states.requires_grad:
        return None
    attn, mlp = layer.self_attn, layer.mlp
    if attn.layer_idx >= len(cache.layers) or type(mlp.act_fn).__name__ != "ReLUSquared":
        return None
    if not _hook_free(layer, attn, mlp, mlp.act_fn):
        return None
    kv = cache.layers[attn.layer_idx]
    dtype = hidden_states.dtype
    if not kv.native_decode_step(dtype, position_ids):
        return None
    cos, sin = position_embeddings
    batch = hidden_states.shape[0]
    if cos.dtype != dtype or sin.dtype != dtype or cos.dim() != 3 or cos.shape != sin.shape:
        return None
    if cos.shape[0] not in (1, batch) or cos.shape[1] != 1 or cos.shape[2] != attn.head_dim:
        return None
    qkv, gate_up = (attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)
    norms = (layer.input_layernorm, attn.attn_sub_norm, layer.post_attention_layernorm, mlp.ffn_sub_norm)
    if len({getattr(norm, "variance_epsilon", None) for norm in norms}) != 1:  # the op takes one epsilon
        return None
    if not (
        fusable_group(qkv, dtype, layer.input_layernorm)
        and fusable_group((attn.o_proj,), dtype, attn.attn_sub_norm)
        and fusable_group(gate_up, dtype, layer.post_attention_layernorm, relu2_glu=True)
        and fusable_group((mlp.down_proj,), dtype, mlp.ffn_sub_norm)
    ):
        return None
    kv_len = kv.get_mask_sizes(1)[0]
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or
                                       attention_mask.shape[-1] < kv_len):  # fmt: skip
        return None  # the module path says what is wrong
    bias = cache.decode_bias(attention_mask, kv_len)
    kv._reserve(kv.n_quant + 1)
    out = _run(layer, hidden_states.reshape(batch, -1), cos, sin, kv, bias, position_ids)
    kv.n_quant += 1
    kv.cumulative_length += 1
    return out.view(batch, 1, -1)


def _run(
    layer: nn.Module,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv: BitNetA48QuantizedLayer,
    bias: torch.Tensor | None,
    position_ids: torch.Tensor | None,
) -> torch.Tensor:
    """The op on the layer's buffers: x (B, hidden) -> (B, hidden); appends to ``kv`` (whose counters the caller
    advances)."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
    sink = kv.sink_bits is not None
    return torch.ops.bitnet_a48_native.decoder_layer_decode(
        x.contiguous(),
        layer.input_layernorm._parameters["weight"], attn.attn_sub_norm._parameters["weight"],
        layer.post_attention_layernorm._parameters["weight"], mlp.ffn_sub_norm._parameters["weight"],
        float(layer.input_layernorm.variance_epsilon),
        [p._buffers["weight"] for p in qkv], [p._buffers["weight_scale"] for p in qkv], [p.out_features for p in qkv],
        attn.q_proj.act_quantizer, attn.q_proj.native_topk(),
        attn.o_proj._buffers["weight"], attn.o_proj._buffers["weight_scale"],
        attn.o_proj.act_quantizer, attn.o_proj.native_topk(),
        [mlp.gate_proj._buffers["weight"], mlp.up_proj._buffers["weight"]],
        [mlp.gate_proj._buffers["weight_scale"], mlp.up_proj._buffers["weight_scale"]], mlp.gate_proj.out_features,
        mlp.gate_proj.act_quantizer, mlp.gate_proj.native_topk(),
        mlp.down_proj._buffers["weight"], mlp.down_proj._buffers["weight_scale"],
        mlp.down_proj.act_quantizer, mlp.down_proj.native_topk(),
        cos.contiguous(), sin.contiguous(), attn.q_proj.out_features // attn.head_dim, attn.head_dim,
        kv.k_packed, kv.k_scale, kv.v_packed, kv.v_scale, kv.n_quant, kv.bits,
        kv.k_sink if sink else None, kv.k_sink_scale if sink else None,
        kv.v_sink if sink else None, kv.v_sink_scale if sink else None,
        kv.sink_pos if sink else None, kv.sink_bits or 0,
        kv.k_window, kv.v_window, bias, float(attn.scaling), position_ids, kv.cumulative_length,
    )  # fmt: skip
