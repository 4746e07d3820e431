"""Attention over the packed KV store of `BitNetA48QuantizedCache` (arXiv 2411.04965, section 2.4), for any step.

The cache (``cache_bitnet_a48.py``) stores; this module reads. The model reaches it through transformers' attention
interface: ``packed_kv_attention_forward`` is registered as ``"bitnet_a48_packed_kv"`` and a cache that reads its own
store names it in ``attention_implementation``, so ``ALL_ATTENTION_FUNCTIONS[cache.attention_implementation]`` is
the function a layer calls (the new keys and values go to it, not through ``cache.update``).

``attend_layer`` is the reference: attention blockwise over the packed store with an online softmax
(flash-decoding order). A block of ``block_size`` tokens is dequantised, used and dropped, so no high-precision copy
of the past exists and the peak memory of a step is the packed store plus one block. The tokens of the current step
attend to each other in full precision, as they are in hand; they are stored after. A decode step (one token per
row) on the CPU runs the native kernel instead (``kernels_cpu_native.kv_decode_attention_native``: the same sums in
another order, equal within float rounding).

Masks: None (causal), bool (B|1, 1, q, kv) with True = attend, or additive float, where kv is
``layer.get_mask_sizes(q)[0]``; ``decode_mask_bias`` is a decode step's mask as the native kernel reads it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.modeling_utils import AttentionInterface

from .kernels_cpu_native import kv_decode_attention_native
from .kernels_kv_cache import compute_scale, grid_mid, quantize_codes_torch

if TYPE_CHECKING:
    from .cache_bitnet_a48 import BitNetA48QuantizedCache, BitNetA48QuantizedLayer

ATTENTION_NAME = "bitnet_a48_packed_kv"


def fake_quantize_query(query: torch.Tensor, bits: int) -> torch.Tensor:
    """Absmax ``bits``-bit fake quantisation of each (token, head) group of the query (the paper's 4-bit Q)."""
    scale = compute_scale(query, bits, torch.float32)
    codes = quantize_codes_torch(query, scale, bits)
    return ((codes.float() - grid_mid(bits)) * scale.unsqueeze(-1)).to(query.dtype)


class _OnlineSoftmax:
    """Attention of a query against keys and values given segment by segment (running max, sum and output in fp32)."""

    def __init__(self, query: torch.Tensor, num_kv_heads: int, scaling: float) -> None:
        b, hq, q, d = query.shape  # (B, Hq, q, D)
        self.g, self.q, self.hkv = hq // num_kv_heads, q, num_kv_heads
        # (B, Hkv, g·q, D): the g query heads sharing a KV head become rows, so no KV head is repeated
        self.query = query.reshape(b, num_kv_heads, self.g * q, d)
        self.scaling = scaling
        self.m = torch.full((b, num_kv_heads, self.g * q, 1), -math.inf, device=query.device)
        self.l = torch.zeros_like(self.m)
        self.acc = torch.zeros((b, num_kv_heads, self.g * q, d), device=query.device)

    def add(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        bias: torch.Tensor | None,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> None:
        """keys, values (B, Hkv, L, D); bias (B|1, 1, q, L) additive fp32 or None; optional per-key scales
        (B, Hkv, L) of centred codes: q·k_t = s_t (q·c_t) and Σ p_t v_t = Σ (p_t s_t) c_t, so the scales multiply
        the (g·q, L) scores and weights instead of the (L, D) keys and values."""
        s = torch.matmul(self.query, keys.transpose(-1, -2)).float() * self.scaling  # (B, Hkv, g·q, L)
        if k_scale is not None:
            s = s * k_scale.float().unsqueeze(-2)
        if bias is not None:
            b, h, _, n = s.shape
            s = (s.view(b, h, self.g, self.q, n) + bias.unsqueeze(2)).view(b, h, self.g * self.q, n)
        m_new = torch.maximum(self.m, s.amax(dim=-1, keepdim=True))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # rows masked so far
        alpha = torch.exp(self.m - m_safe)
        p = torch.exp(s - m_safe)
        self.l = self.l * alpha + p.sum(dim=-1, keepdim=True)
        pv = p if v_scale is None else p * v_scale.float().unsqueeze(-2)
        self.acc = self.acc * alpha + torch.matmul(pv.to(values.dtype), values).float()
        self.m = m_new

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        """(B, q, Hq, D), the layout attention interfaces return."""
        out = torch.where(self.l > 0, self.acc / self.l.clamp(min=1e-30), torch.zeros_like(self.acc))
        b, _, _, d = out.shape
        return out.view(b, self.hkv * self.g, self.q, d).transpose(1, 2).to(dtype)


def decode_mask_bias(attention_mask: torch.Tensor | None, kv_len: int) -> torch.Tensor | None:
    """The mask of a decode step (one query per row) as the native kernel reads it: fp32 (B|1, kv_len), or None."""
    bias = _mask_bias(attention_mask, slice(0, kv_len))  # (B|1, 1, 1, kv) or None
    return None if bias is None else bias.reshape(bias.shape[0], kv_len).contiguous()


def _mask_bias(attention_mask: torch.Tensor | None, cols: torch.Tensor | slice) -> torch.Tensor | None:
    """Additive fp32 bias (B|1, 1, q, L) of the mask columns ``cols`` (bool masks: True = attend)."""
    if attention_mask is None:
        return None
    m = attention_mask[..., cols] if isinstance(cols, slice) else attention_mask.index_select(-1, cols)
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, device=m.device).masked_fill(~m, -math.inf)
    return m.float()


def attend_layer(
    layer: BitNetA48QuantizedLayer,
    query: torch.Tensor,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    position_ids: torch.Tensor | None = None,
    decode_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``query`` (B, Hq, q, D) over ``layer``'s stored past and the new tokens, then store them.

    ``attention_mask``: None (causal), bool (B|1, 1, q, kv) with True = attend, or additive float, where kv is
    ``get_mask_sizes(q)[0]``. ``decode_bias``: that mask as the native decode kernel reads it (see
    ``BitNetA48QuantizedCache.decode_bias``), when the caller has it already. Returns (B, q, Hq, D) in the query
    dtype.
    """
    layer.check_new(key_states, value_states)
    q = query.shape[2]
    if query.dim() != 4 or query.shape[0] != layer.batch_size or query.shape[1] % layer.num_heads:
        raise ValueError(f"query must be (batch, heads multiple of {layer.num_heads}, q, D), got {query.shape}")
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attend takes a tensor mask or None, got {type(attention_mask).__name__}")
    kv_len = layer.get_mask_sizes(q)[0]
    if attention_mask is not None and attention_mask.shape[-1] < kv_len:
        raise ValueError(f"attention mask covers {attention_mask.shape[-1]} keys, the cache needs {kv_len}")
    dtype = query.dtype
    if layer.native_decode(query):
        bias = decode_bias if decode_bias is not None else decode_mask_bias(attention_mask, kv_len)
        out = kv_decode_attention_native(query, layer, key_states, value_states, bias, scaling)
        layer.append(key_states, value_states, position_ids)
        return out
    soft = _OnlineSoftmax(query, layer.num_heads, scaling)
    seq_len = layer.cumulative_length
    # 1. the packed store, block by block
    n_store = layer.stored_len()
    for start in range(0, n_store, layer.block_size):
        length = min(layer.block_size, n_store - start)
        kc, ks, vc, vs = layer.centered_block(start, length, dtype, seq_len if layer.static else n_store)
        bias = _mask_bias(attention_mask, slice(start, start + length))
        if layer.static:  # slots at or after the current length hold nothing yet
            unused = torch.arange(start, start + length, device=layer.device) >= seq_len
            empty = torch.zeros(length, device=layer.device).masked_fill(unused, -math.inf).view(1, 1, 1, -1)
            bias = empty if bias is None else bias + empty
        soft.add(kc, vc, bias, ks, vs)
    # 2. the high-precision window
    if not layer.static and layer.k_window.shape[2]:
        w = layer.k_window.shape[2]
        soft.add(
            layer.k_window.to(dtype),
            layer.v_window.to(dtype),
            _mask_bias(attention_mask, slice(n_store, n_store + w)),
        )
    # 3. the new tokens, in full precision, causal among themselves
    cols = torch.arange(q, device=layer.device) + seq_len
    bias = _mask_bias(attention_mask, cols if layer.static else slice(seq_len, seq_len + q))
    if attention_mask is None and q > 1:
        bias = torch.full((q, q), -math.inf, device=layer.device).triu(1).view(1, 1, q, q)
    soft.add(key_states.to(dtype), value_states.to(dtype), bias)
    layer.append(key_states, value_states, position_ids)
    return soft.result(dtype)


def packed_kv_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    cache: BitNetA48QuantizedCache | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention interface's function for a cache that reads its own packed store: query (B, Hq, q, D) and the
    step's new key/value (B, Hkv, q, D) after RoPE, which ``cache.attend`` stores; returns ((B, q, Hq, D), None)."""
    if cache is None:
        raise ValueError(f"the {ATTENTION_NAME!r} attention reads a BitNetA48QuantizedCache: pass one as `cache`")
    if dropout:
        raise ValueError("attention over the packed KV cache is for inference: it takes no dropout")
    out = cache.attend(query, key, value, module.layer_idx, attention_mask, scaling, position_ids=position_ids)
    return out, None


AttentionInterface.register(ATTENTION_NAME, packed_kv_attention_forward)
