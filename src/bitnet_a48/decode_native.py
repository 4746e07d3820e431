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

from typing import NamedTuple

import torch
from torch import nn

from .cache_bitnet_a48 import BitNetA48QuantizedCache, BitNetA48QuantizedLayer
from .packed_bitlinear import fusable_group, has_forward_hooks


class _LayerParts(NamedTuple):
    """The modules of a decoder layer that the fused step reads, looked up in ``_modules`` (a step runs this for
    every layer: ``nn.Module.__getattr__`` on each name cost more than the checks themselves)."""

    attn: nn.Module
    mlp: nn.Module
    act_fn: nn.Module
    qkv: tuple[nn.Module, nn.Module, nn.Module]
    o_proj: nn.Module
    gate_up: tuple[nn.Module, nn.Module]
    down_proj: nn.Module
    input_norm: nn.Module
    attn_sub_norm: nn.Module
    post_norm: nn.Module
    ffn_sub_norm: nn.Module


def _parts(layer: nn.Module) -> _LayerParts | None:
    """The layer's submodules by name, or None where one is missing (a layer of another structure)."""
    modules = layer._modules
    attn, mlp = modules.get("self_attn"), modules.get("mlp")
    if attn is None or mlp is None:
        return None
    am, mm = attn._modules, mlp._modules
    found = (
        mm.get("act_fn"), am.get("q_proj"), am.get("k_proj"), am.get("v_proj"), am.get("o_proj"),
        mm.get("gate_proj"), mm.get("up_proj"), mm.get("down_proj"), modules.get("input_layernorm"),
        am.get("attn_sub_norm"), modules.get("post_attention_layernorm"), mm.get("ffn_sub_norm"),
    )  # fmt: skip
    if any(m is None for m in found):
        return None
    act_fn, q, k, v, o, gate, up, down, input_norm, attn_sub_norm, post_norm, ffn_sub_norm = found
    return _LayerParts(attn, mlp, act_fn, (q, k, v), o, (gate, up), down, input_norm, attn_sub_norm, post_norm,
                       ffn_sub_norm)  # fmt: skip


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
    parts = _parts(layer)
    if parts is None:
        return None
    attn = parts.attn
    if attn.layer_idx >= len(cache.layers) or type(parts.act_fn).__name__ != "ReLUSquared":
        return None
    if not _hook_free(layer, attn, parts.mlp, parts.act_fn):
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
    norms = (parts.input_norm, parts.attn_sub_norm, parts.post_norm, parts.ffn_sub_norm)
    if len({getattr(norm, "variance_epsilon", None) for norm in norms}) != 1:  # the op takes one epsilon
        return None
    if not (
        fusable_group(parts.qkv, dtype, parts.input_norm)
        and fusable_group((parts.o_proj,), dtype, parts.attn_sub_norm)
        and fusable_group(parts.gate_up, dtype, parts.post_norm, relu2_glu=True)
        and fusable_group((parts.down_proj,), dtype, parts.ffn_sub_norm)
    ):
        return None
    kv_len = kv.get_mask_sizes(1)[0]
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or
                                       attention_mask.shape[-1] < kv_len):  # fmt: skip
        return None  # the module path says what is wrong
    bias = cache.decode_bias(attention_mask, kv_len)
    kv._reserve(kv.n_quant + 1)
    out = _run(parts, hidden_states.reshape(batch, -1), cos, sin, kv, bias, position_ids)
    kv.n_quant += 1
    kv.cumulative_length += 1
    return out.view(batch, 1, -1)


def _run(
    parts: _LayerParts,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv: BitNetA48QuantizedLayer,
    bias: torch.Tensor | None,
    position_ids: torch.Tensor | None,
) -> torch.Tensor:
    """The op on the layer's buffers: x (B, hidden) -> (B, hidden); appends to ``kv`` (whose counters the caller
    advances)."""
    attn, (q, k, v), o, (gate, up), down = parts.attn, parts.qkv, parts.o_proj, parts.gate_up, parts.down_proj
    qb, kb, vb, ob, gb, ub, db = (p._buffers for p in (q, k, v, o, gate, up, down))
    sink = kv.sink_bits is not None
    return torch.ops.bitnet_a48_native.decoder_layer_decode(
        x.contiguous(),
        parts.input_norm._parameters["weight"], parts.attn_sub_norm._parameters["weight"],
        parts.post_norm._parameters["weight"], parts.ffn_sub_norm._parameters["weight"],
        float(parts.input_norm.variance_epsilon),
        [qb["weight"], kb["weight"], vb["weight"]], [qb["weight_scale"], kb["weight_scale"], vb["weight_scale"]],
        [q.out_features, k.out_features, v.out_features], q.act_quantizer, q.native_topk(),
        ob["weight"], ob["weight_scale"], o.act_quantizer, o.native_topk(),
        [gb["weight"], ub["weight"]], [gb["weight_scale"], ub["weight_scale"]], gate.out_features,
        gate.act_quantizer, gate.native_topk(),
        db["weight"], db["weight_scale"], down.act_quantizer, down.native_topk(),
        cos.contiguous(), sin.contiguous(), q.out_features // attn.head_dim, attn.head_dim,
        kv.k_packed, kv.k_scale, kv.v_packed, kv.v_scale, kv.n_quant, kv.bits,
        kv.k_sink if sink else None, kv.k_sink_scale if sink else None,
        kv.v_sink if sink else None, kv.v_sink_scale if sink else None,
        kv.sink_pos if sink else None, kv.sink_bits or 0,
        kv.k_window, kv.v_window, bias, float(attn.scaling), position_ids, kv.cumulative_length,
    )  # fmt: skip
