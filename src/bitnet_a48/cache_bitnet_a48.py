"""Quantised KV cache of BitNet a4.8 (arXiv 2411.04965, section 2.4): 3-bit keys and values, first token at 4 bits.

Keys (after RoPE) and values are quantised per (token, head) group of ``head_dim`` values with one absmax scale and
``b``-bit codes packed 8 codes in ``b`` bytes (``kernels_kv_cache.py`` has the grid, the layout and the kernels).
The first token of each sequence (the one at position 0: the BOS, whatever left padding precedes it) is kept at 4
bits when ``b < 4``, as the paper does. A short window of the most recent tokens may stay in high precision; a token
leaving it is quantised once and never again (each group depends on its own token only).

A layer holds, for batch B, KV heads H, head_dim D and P = D·b/8 bytes::

    k_packed, v_packed   (B, H, capacity, P) uint8      quantised tokens 0 .. n_quant-1 (capacity grows by blocks)
    k_scale, v_scale     (B, H, capacity)    fp16       one scale per group
    k_window, v_window   (B, H, w, D)        model dtype tokens n_quant .. n_quant+w-1, w <= window
    k_sink, v_sink       (B, H, D/2) uint8, (B, H) fp16 the 4-bit first token of each row, sink_pos (B,) its index

This module stores; ``attention_packed_kv.py`` reads: ``attend`` (through the attention interface,
``attention_implementation = "bitnet_a48_packed_kv"``) computes attention over the packed store block by block, with
no high-precision copy of the past. ``update`` is the generic Cache API: it stores the new tokens and returns the
dequantised past with them, for any other attention implementation (a transient copy).

``max_cache_len`` selects the static layout: every buffer is preallocated and written in place with tensor indices,
so that a decode step can be captured by ``torch.compile`` or CUDA graphs (no window in that layout).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from .attention_packed_kv import ATTENTION_NAME, attend_layer, decode_mask_bias, fake_quantize_query
from .kernels_cpu_native import kv_append_decode_native, kv_quantize_pack_native, native_available
from .kernels_kv_cache import (
    SUPPORTED_BITS,
    check_bits,
    packed_dim,
    quantize_pack,
    unpack_centered_torch,
    unpack_dequantize,
)

DEFAULT_BITS = 3
DEFAULT_WINDOW = 16
DEFAULT_BLOCK_SIZE = 256
FIRST_TOKEN_BITS = 4
QUERY_BITS = (4, 8)

# Per-row tensors of a layer: the batch dimension is dim 0 of each (beam reordering and selection act on all of them).
_ROW_TENSORS = (
    "k_packed", "v_packed", "k_scale", "v_scale", "k_window", "v_window",
    "k_sink", "v_sink", "k_sink_scale", "v_sink_scale", "sink_pos",
)  # fmt: skip


def _decode_positions(position_ids: torch.Tensor | None, batch_size: int) -> bool:
    # Positions the native decode append reads: none, or a (1 or B, 1) int64 CPU tensor.
    return position_ids is None or (
        position_ids.is_cpu
        and position_ids.dtype == torch.long
        and position_ids.dim() == 2
        and position_ids.shape[1] == 1
        and position_ids.shape[0] in (1, batch_size)
    )


class BitNetA48QuantizedLayer(CacheLayerMixin):
    """One layer of `BitNetA48QuantizedCache`: packed ``bits``-bit keys and values (see the module docstring).

    Args:
        bits (`int`, defaults to 3): bits of the codes, one of 2, 3, 4, 8.
        window (`int`, defaults to 16): most recent tokens kept in high precision (0 in the static layout).
        first_token_bits (`int` or `None`, defaults to 4): bits of the first token of each row when above `bits`;
            `None` stores it like every other token.
        block_size (`int`, defaults to 256): tokens dequantised at a time in `attend`, and the growth step of the
            dynamic store.
        max_cache_len (`int`, *optional*): preallocate this many tokens (static layout, compileable).
        scale_dtype (`torch.dtype`, defaults to `torch.float16`): dtype of the stored scales.
        impl (`str`, defaults to `"auto"`): `"torch"`, `"triton"` or `"auto"` for quantise-and-pack and unpack.
    """

    is_sliding = False

    def __init__(
        self,
        bits: int = DEFAULT_BITS,
        window: int = DEFAULT_WINDOW,
        first_token_bits: int | None = FIRST_TOKEN_BITS,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_cache_len: int | None = None,
        scale_dtype: torch.dtype = torch.float16,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        check_bits(bits)
        if first_token_bits is not None:
            check_bits(first_token_bits)
        if not isinstance(window, int) or window < 0:
            raise ValueError(f"window must be a non-negative integer, got {window!r}")
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if max_cache_len is not None and (not isinstance(max_cache_len, int) or max_cache_len <= 0):
            raise ValueError(f"max_cache_len must be a positive integer or None, got {max_cache_len!r}")
        if max_cache_len is not None and window:
            raise ValueError("the static layout (max_cache_len) keeps no high-precision window: pass window=0")
        self.bits, self.window, self.block_size, self.impl = bits, window, block_size, impl
        # impl "auto" reads the dynamic store with the native CPU decode kernel when it applies (`native_decode`)
        self.native = impl == "auto"
        self.scale_dtype = scale_dtype
        self.sink_bits = first_token_bits if first_token_bits is not None and first_token_bits > bits else None
        self.max_cache_len = max_cache_len
        self.static = max_cache_len is not None
        self.is_compileable = self.static
        # A rollback by `crop` leaves no trace only when no token was moved out of a window by the cropped ones
        self.is_croppable = window == 0
        self.cumulative_length: int | torch.Tensor = torch.tensor(0, dtype=torch.long) if self.static else 0
        self.n_quant = 0  # dynamic layout: tokens in the packed store
        for name in _ROW_TENSORS:
            setattr(self, name, None)

    # ------------------------------------------------------------------------------------------------ storage

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.dim() != 4 or key_states.shape != value_states.shape:
            raise ValueError(
                "key and value states must both be (batch, kv_heads, seq, head_dim), got "
                f"{tuple(key_states.shape)} and {tuple(value_states.shape)}"
            )
        b, h, _, d = key_states.shape
        if d % 8:
            raise ValueError(f"head_dim must be a multiple of 8 to pack codes, got {d}")
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads, self.head_dim = b, h, d
        cap = self.max_cache_len if self.static else 0
        dev, p = self.device, packed_dim(d, self.bits)
        for kv in ("k", "v"):
            setattr(self, f"{kv}_packed", torch.zeros((b, h, cap, p), dtype=torch.uint8, device=dev))
            setattr(self, f"{kv}_scale", torch.zeros((b, h, cap), dtype=self.scale_dtype, device=dev))
            setattr(self, f"{kv}_window", torch.zeros((b, h, 0, d), dtype=self.dtype, device=dev))
            if self.sink_bits is not None:
                p4 = packed_dim(d, self.sink_bits)
                setattr(self, f"{kv}_sink", torch.zeros((b, h, p4), dtype=torch.uint8, device=dev))
                setattr(self, f"{kv}_sink_scale", torch.zeros((b, h), dtype=self.scale_dtype, device=dev))
        if self.sink_bits is not None:
            self.sink_pos = torch.full((b,), -1, dtype=torch.long, device=dev)
        if self.static:
            self.cumulative_length = self.cumulative_length.to(dev)
            if not torch.compiler.is_compiling():
                for name in _ROW_TENSORS:
                    if getattr(self, name) is not None:
                        torch._dynamo.mark_static_address(getattr(self, name))
                torch._dynamo.mark_static_address(self.cumulative_length)
        self.is_initialized = True

    def check_new(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        want = (self.batch_size, self.num_heads, self.head_dim)
        for name, t in (("key", key_states), ("value", value_states)):
            if t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != want:
                raise ValueError(
                    f"{name} states must be (batch={want[0]}, kv_heads={want[1]}, seq, head_dim={want[2]}), "
                    f"got {tuple(t.shape)}"
                )
        if key_states.shape[2] != value_states.shape[2]:
            raise ValueError(f"key and value states differ in length: {key_states.shape[2]} != {value_states.shape[2]}")

    def _note_first_tokens(self, position_ids: torch.Tensor | None, seq_len: int | torch.Tensor, q: int) -> None:
        """Record the cache index of each row's first token (its last position-0 token) if the row has none yet."""
        if self.sink_bits is None:
            return
        if not self.static and bool((self.sink_pos >= 0).all()):  # every row has its first token already
            return
        dev = self.sink_pos.device
        if position_ids is None:  # without positions, the first token stored is the first token
            position_ids = (torch.arange(q, device=dev) + seq_len).unsqueeze(0)
        if position_ids.dim() != 2 or position_ids.shape[-1] != q:
            raise ValueError(f"position_ids must be (batch, {q}), got {tuple(position_ids.shape)}")
        is_first = (position_ids.to(dev) == 0).expand(self.batch_size, q)
        last = (q - 1) - is_first.flip(-1).int().argmax(dim=-1)  # index of the last position-0 token
        take = is_first.any(dim=-1) & (self.sink_pos < 0)
        self.sink_pos = torch.where(take, last + seq_len, self.sink_pos)

    def _write_quantized(self, keys: torch.Tensor, values: torch.Tensor, start: int | torch.Tensor) -> None:
        """Quantise tokens ``start .. start+e-1`` (keys, values (B, H, e, D)) into the packed store, once."""
        e = keys.shape[2]
        kp, ks = self._quantize_pack(keys, self.bits)
        vp, vs = self._quantize_pack(values, self.bits)
        if self.static:
            idx = torch.arange(e, device=self.device) + start
            for name, t in (("k_packed", kp), ("v_packed", vp), ("k_scale", ks), ("v_scale", vs)):
                getattr(self, name).index_copy_(2, idx, t)
        else:
            self._reserve(start + e)
            self.k_packed[:, :, start : start + e] = kp
            self.v_packed[:, :, start : start + e] = vp
            self.k_scale[:, :, start : start + e] = ks
            self.v_scale[:, :, start : start + e] = vs
        if self.sink_bits is None:
            return
        # the first token of a row, if among these, is (also) quantised at `sink_bits`; its b-bit slot goes unused
        rel = self.sink_pos - start  # (B,)
        hit = (rel >= 0) & (rel < e)
        if not self.static and not bool(hit.any()):  # the dynamic layout may look: most writes hold no first token
            return
        idx = rel.clamp(0, e - 1).view(-1, 1, 1, 1).expand(-1, self.num_heads, 1, self.head_dim)
        for kv, t in (("k", keys), ("v", values)):
            sp, ss = self._quantize_pack(t.gather(2, idx).squeeze(2), self.sink_bits)
            getattr(self, f"{kv}_sink").copy_(torch.where(hit.view(-1, 1, 1), sp, getattr(self, f"{kv}_sink")))
            getattr(self, f"{kv}_sink_scale").copy_(torch.where(hit.view(-1, 1), ss, getattr(self, f"{kv}_sink_scale")))

    def _quantize_pack(self, x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        # The native CPU kernel where `native_decode`'s conditions on device and scales hold (same codes and scales).
        if self.native and x.device.type == "cpu" and self.scale_dtype == torch.float16 and native_available():
            return kv_quantize_pack_native(x, bits)
        return quantize_pack(x, bits, self.scale_dtype, self.impl)

    def _reserve(self, n: int) -> None:
        """Grow the dynamic packed store to hold ``n`` tokens, in whole blocks (amortised O(1) appends)."""
        cap = self.k_packed.shape[2]
        if n <= cap:
            return
        new_cap = -(-n // self.block_size) * self.block_size
        for name in ("k_packed", "v_packed", "k_scale", "v_scale"):
            old = getattr(self, name)
            new = old.new_zeros((*old.shape[:2], new_cap, *old.shape[3:]))
            new[:, :, :cap] = old
            setattr(self, name, new)

    def append(
        self, key_states: torch.Tensor, value_states: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> None:
        """Store new tokens (B, H, q, D): into the window, quantising what leaves it (dynamic), or straight (static)."""
        self.check_new(key_states, value_states)
        q = key_states.shape[2]
        if self.static:
            self._note_first_tokens(position_ids, self.cumulative_length, q)
            self._write_quantized(key_states, value_states, self.cumulative_length)
            self.cumulative_length.add_(q)
            return
        if self._native_append(key_states, value_states, position_ids):
            self._reserve(self.n_quant + 1)
            kv_append_decode_native(self, key_states, value_states, position_ids)
            self.n_quant += 1
            self.cumulative_length += 1
            return
        self._note_first_tokens(position_ids, self.cumulative_length, q)
        k = torch.cat([self.k_window, key_states.to(self.dtype)], dim=2)
        v = torch.cat([self.v_window, value_states.to(self.dtype)], dim=2)
        evict = k.shape[2] - self.window
        if evict > 0:
            self._write_quantized(k[:, :, :evict], v[:, :, :evict], self.n_quant)
            self.n_quant += evict
            k, v = k[:, :, evict:], v[:, :, evict:]
        self.k_window, self.v_window = k.contiguous(), v.contiguous()
        self.cumulative_length += q

    def _native_append(
        self, key_states: torch.Tensor, value_states: torch.Tensor, position_ids: torch.Tensor | None
    ) -> bool:
        """Whether ``append`` stores the token with the native decode op (``kv_append_decode_native``, equal bit for
        bit): one token per row into a full (contiguous) window of the dynamic layout on the CPU, in the window's
        dtype, fp16 scales, positions (if any) a (1 or B, 1) int64 CPU tensor. Else the torch code below runs (and
        checks)."""
        return (
            key_states.shape[2] == 1
            and key_states.is_cpu
            and value_states.dtype == key_states.dtype
            and self.native_decode_step(key_states.dtype, position_ids)
        )

    def native_decode_step(self, dtype: torch.dtype, position_ids: torch.Tensor | None) -> bool:
        """Whether a step of one new token per row, in ``dtype``, both attends (``native_decode``) and appends
        (``_native_append``) natively: what the fused decode step of a layer (``decode_native.py``) needs."""
        return (
            self.native
            and not self.static
            and self.is_initialized
            and self.device.type == "cpu"
            and dtype in (torch.float32, torch.bfloat16, torch.float16)
            and dtype == self.dtype
            and self.scale_dtype == torch.float16
            and self.k_window.shape[2] == self.window
            and self.k_window.is_contiguous()
            and self.v_window.is_contiguous()
            and _decode_positions(position_ids, self.batch_size)
            and native_available()
        )

    # ------------------------------------------------------------------------------------------------ reading

    def _sink_values(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The 4-bit first tokens, dequantised: (B, H, D) each."""
        k = unpack_dequantize(self.k_sink, self.k_sink_scale, self.sink_bits, dtype, self.impl)
        v = unpack_dequantize(self.v_sink, self.v_sink_scale, self.sink_bits, dtype, self.impl)
        return k, v

    def _dequantize_block(
        self,
        start: int,
        length: int,
        dtype: torch.dtype,
        sink: tuple[torch.Tensor, torch.Tensor] | None,
        n_quant: int | torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``start .. start+length-1`` of the packed store as (B, H, L, D) ``dtype``, first tokens at 4 bits."""
        sl = slice(start, start + length)
        k = unpack_dequantize(self.k_packed[:, :, sl], self.k_scale[:, :, sl], self.bits, dtype, self.impl)
        v = unpack_dequantize(self.v_packed[:, :, sl], self.v_scale[:, :, sl], self.bits, dtype, self.impl)
        if sink is not None:
            rel = self.sink_pos - start
            hit = (rel >= 0) & (self.sink_pos < n_quant)  # the sink store is filled once the token is quantised
            onehot = (torch.arange(length, device=self.device) == rel.unsqueeze(-1)) & hit.unsqueeze(-1)  # (B, L)
            onehot = onehot[:, None, :, None]
            k = torch.where(onehot, sink[0].unsqueeze(2), k)
            v = torch.where(onehot, sink[1].unsqueeze(2), v)
        return k, v

    def centered_block(
        self, start: int, length: int, dtype: torch.dtype, n_quant: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes minus mid (B, H, L, D) ``dtype`` and scales (B, H, L) of keys then values of a block; first
        tokens substituted by their 4-bit codes and scales."""
        sl = slice(start, start + length)
        kc = unpack_centered_torch(self.k_packed[:, :, sl], self.bits, dtype)
        vc = unpack_centered_torch(self.v_packed[:, :, sl], self.bits, dtype)
        ks, vs = self.k_scale[:, :, sl], self.v_scale[:, :, sl]
        if self.sink_bits is not None:
            rel = self.sink_pos - start
            hit = (rel >= 0) & (rel < length) & (self.sink_pos < n_quant)
            if self.static or bool(hit.any()):
                onehot = (torch.arange(length, device=self.device) == rel.unsqueeze(-1)) & hit.unsqueeze(-1)  # (B, L)
                sk = unpack_centered_torch(self.k_sink, self.sink_bits, dtype).unsqueeze(2)  # (B, H, 1, D)
                sv = unpack_centered_torch(self.v_sink, self.sink_bits, dtype).unsqueeze(2)
                m4 = onehot[:, None, :, None]
                kc, vc = torch.where(m4, sk, kc), torch.where(m4, sv, vc)
                ks = torch.where(onehot[:, None, :], self.k_sink_scale.unsqueeze(-1), ks)
                vs = torch.where(onehot[:, None, :], self.v_sink_scale.unsqueeze(-1), vs)
        return kc, ks, vc, vs

    def stored_len(self) -> int:
        return self.max_cache_len if self.static else self.n_quant

    def dequantize_all(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored token in ``dtype`` (B, H, S, D): the packed store then the window. For tests and `update`."""
        dtype = dtype or self.dtype
        sink = self._sink_values(dtype) if self.sink_bits is not None else None
        n = self.stored_len()
        k, v = self._dequantize_block(0, n, dtype, sink, self.cumulative_length if self.static else n)
        if self.static:
            return k[:, :, : int(self.cumulative_length)], v[:, :, : int(self.cumulative_length)]
        return torch.cat([k, self.k_window.to(dtype)], dim=2), torch.cat([v, self.v_window.to(dtype)], dim=2)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Generic path: store the new tokens; return the dequantised past followed by the new tokens (transient)."""
        self.check_new(key_states, value_states)
        seq_len = self.get_seq_length()
        if self.static:
            past_k, past_v = self._dequantize_block(
                0, self.max_cache_len, key_states.dtype, self._maybe_sink(key_states.dtype), self.cumulative_length
            )
            idx = torch.arange(key_states.shape[2], device=self.device) + self.cumulative_length
            keys, values = past_k.index_copy(2, idx, key_states), past_v.index_copy(2, idx, value_states)
        else:
            past_k, past_v = self.dequantize_all(key_states.dtype) if seq_len else (None, None)
            keys = key_states if past_k is None else torch.cat([past_k, key_states], dim=2)
            values = value_states if past_v is None else torch.cat([past_v, value_states], dim=2)
        self.append(key_states, value_states, kwargs.get("position_ids"))
        return keys, values

    def _maybe_sink(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self._sink_values(dtype) if self.sink_bits is not None else None

    def attend(
        self,
        query: torch.Tensor,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
        position_ids: torch.Tensor | None = None,
        decode_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of ``query`` (B, Hq, q, D) over the stored past and the new tokens, which it then stores:
        ``attention_packed_kv.attend_layer`` (mask and bias conventions there). Returns (B, q, Hq, D)."""
        return attend_layer(self, query, key_states, value_states, attention_mask, scaling, position_ids, decode_bias)

    def native_decode(self, query: torch.Tensor) -> bool:
        """Whether ``attend`` reads the store with the native decode kernel: one new token per row, the dynamic
        layout on the CPU, fp16 scales, a dtype the kernel takes, and the library built (``kernels_cpu_native``)."""
        return (
            self.native
            and not self.static
            and query.shape[2] == 1
            and query.device.type == "cpu"
            and query.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and query.dtype == self.dtype
            and self.scale_dtype == torch.float16
            and native_available()
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.static:
            return self.max_cache_len, 0
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        if self.static:
            return self.cumulative_length if self.is_initialized else 0
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.max_cache_len if self.static else -1

    # ------------------------------------------------------------------------------------------------ batch ops

    def _map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for name in _ROW_TENSORS:
            t = getattr(self, name)
            if t is not None:
                if self.static:
                    t.copy_(fn(t))  # in place: static addresses stay valid
                else:
                    setattr(self, name, fn(t))
        if self.is_initialized:
            self.batch_size = self.k_packed.shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam reordering on the packed codes, scales, window and first tokens alike (exact)."""
        if self.is_initialized:
            idx = beam_idx.to(self.device)
            self._map_rows(lambda t: t.index_select(0, idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.static and self.is_initialized:
            raise NotImplementedError("the static layout cannot change its batch size; build it with the final batch")
        if self.is_initialized:
            self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.static and self.is_initialized:
            raise NotImplementedError("the static layout cannot change its batch size; build it with the final batch")
        if self.is_initialized:
            idx = indices.to(self.device)
            self._map_rows(lambda t: t[idx])

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (a positive value is the legacy `max_length`, as in 5.x)."""
        if not self.is_initialized:
            return
        tokens_to_remove = int(tokens_to_remove)  # some releases pass a 0-dim tensor
        seq_len = int(self.get_seq_length())
        new_len = seq_len + tokens_to_remove if tokens_to_remove <= 0 else min(tokens_to_remove, seq_len)
        new_len = max(new_len, 0)
        if new_len == seq_len:
            return
        if self.sink_bits is not None:
            self.sink_pos = torch.where(self.sink_pos >= new_len, torch.full_like(self.sink_pos, -1), self.sink_pos)
        if self.static:
            self.cumulative_length.fill_(new_len)
            return
        if new_len >= self.n_quant:
            keep = new_len - self.n_quant
            self.k_window, self.v_window = self.k_window[:, :, :keep], self.v_window[:, :, :keep]
        else:  # tokens already quantised stay so; the window restarts empty
            self.n_quant = new_len
            self.k_window, self.v_window = self.k_window[:, :, :0], self.v_window[:, :, :0]
        self.cumulative_length = new_len

    def reset(self) -> None:
        if self.static:
            if self.is_initialized:
                for name in _ROW_TENSORS:
                    t = getattr(self, name)
                    if t is not None:
                        t.fill_(-1) if name == "sink_pos" else t.zero_()
            self.cumulative_length.zero_()
            return
        for name in _ROW_TENSORS:
            setattr(self, name, None)
        self.n_quant, self.cumulative_length, self.is_initialized = 0, 0, False

    def offload(self) -> None:
        if self.is_initialized:
            self._move("cpu")

    def prefetch(self) -> None:
        if self.is_initialized and self.k_packed.device != self.device:
            self._move(self.device)

    def _move(self, device: torch.device | str) -> None:
        for name in _ROW_TENSORS:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device, non_blocking=True))

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of every tensor the layer holds, by name (allocated capacity, not just the used part)."""
        out = {name: getattr(self, name).nbytes for name in _ROW_TENSORS if getattr(self, name) is not None}
        if isinstance(self.cumulative_length, torch.Tensor):
            out["cumulative_length"] = self.cumulative_length.nbytes
        return out


class BitNetA48QuantizedCache(Cache):
    """KV cache with packed ``bits``-bit keys and values, the first token at 4 bits (BitNet a4.8, section 2.4).

    Args:
        config (`PretrainedConfig`, *optional*): gives the number of layers and the defaults: `kv_cache_bits` (bits),
            and optionally `kv_cache_window`, `kv_cache_query_bits`.
        bits (`int`, *optional*): 2, 3, 4 or 8; defaults to `config.kv_cache_bits`, else 3.
        window (`int`, *optional*): recent tokens kept in high precision (default 16; 0 in the static layout).
        first_token_bits (`int` or `None`, defaults to 4): bits of the first token of each sequence (when above
            `bits`).
        query_bits (`int`, *optional*): fake-quantise the query to 4 (the paper's "4-bit Q") or 8 bits in `attend`.
        block_size (`int`, defaults to 256): tokens dequantised at a time inside `attend`.
        max_cache_len (`int`, *optional*): preallocated static layout (compileable decode step).
        scale_dtype (`torch.dtype`, defaults to `torch.float16`): dtype of the scales.
        impl (`str`, defaults to `"auto"`): `"torch"`, `"triton"` or `"auto"` for the quantise/unpack kernels.
        num_layers (`int`, *optional*): number of layers when no config is given (else layers are added lazily).

    A model reads the packed store in place through the attention function named by `attention_implementation`
    (`ALL_ATTENTION_FUNCTIONS[cache.attention_implementation]`, which calls `attend(query, key, value, layer_idx,
    mask, scaling)`) instead of `update` followed by its own attention function; any other model can call `update`,
    which returns the dequantised past (a transient per-step copy).
    """

    # The attention function (transformers' attention interface) that reads this cache's packed store in place
    attention_implementation = ATTENTION_NAME

    def __init__(
        self,
        config: Any | None = None,
        bits: int | None = None,
        window: int | None = None,
        first_token_bits: int | None = FIRST_TOKEN_BITS,
        query_bits: int | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_cache_len: int | None = None,
        scale_dtype: torch.dtype = torch.float16,
        impl: str = "auto",
        num_layers: int | None = None,
    ) -> None:
        if bits is None:
            bits = getattr(config, "kv_cache_bits", None) or DEFAULT_BITS
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
        if window is None:
            window = 0 if max_cache_len is not None else getattr(config, "kv_cache_window", DEFAULT_WINDOW)
        if query_bits is None:
            query_bits = getattr(config, "kv_cache_query_bits", None)
        if query_bits is not None and query_bits not in QUERY_BITS:
            raise ValueError(f"query_bits must be one of {QUERY_BITS} or None, got {query_bits!r}")
        if impl not in ("auto", "torch", "triton"):
            raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
        self.bits, self.window, self.query_bits = bits, window, query_bits
        make_layer = functools.partial(
            BitNetA48QuantizedLayer, bits=bits, window=window, first_token_bits=first_token_bits,
            block_size=block_size, max_cache_len=max_cache_len, scale_dtype=scale_dtype, impl=impl,
        )  # fmt: skip
        self._decode_bias_memo: tuple[torch.Tensor, int, torch.Tensor | None] | None = None
        if num_layers is None and config is not None:
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
        if num_layers is not None:
            super().__init__(layers=[make_layer() for _ in range(num_layers)])
        else:
            super().__init__(layer_class_to_replicate=make_layer)

    def attend(
        self,
        query: torch.Tensor,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        attention_mask: torch.Tensor | None,
        scaling: float,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Blockwise attention over layer ``layer_idx``'s packed past and the new tokens, which it then stores.

        query (B, Hq, q, D) and key/value states (B, Hkv, q, D) after RoPE; returns (B, q, Hq, D).
        """
        if self.layer_class_to_replicate is not None:
            while len(self.layers) <= layer_idx:
                self.layers.append(self.layer_class_to_replicate())
        if self.query_bits is not None:
            query = fake_quantize_query(query, self.query_bits)
        layer = self.layers[layer_idx]
        bias = None
        if isinstance(attention_mask, torch.Tensor) and layer.is_initialized and layer.native_decode(query):
            kv_len = layer.get_mask_sizes(1)[0]
            if attention_mask.shape[-1] >= kv_len:  # else attend says what is wrong
                bias = self.decode_bias(attention_mask, kv_len)
        return layer.attend(query, key_states, value_states, attention_mask, scaling, position_ids, bias)

    def decode_bias(self, attention_mask: torch.Tensor | None, kv_len: int) -> torch.Tensor | None:
        """``decode_mask_bias`` of a decode step's mask, computed once for all the layers of the step: the mask a
        forward passes to every layer is one tensor, so the last one is kept with its bias (and compared by
        identity: held here, it cannot be freed and its id reused)."""
        if attention_mask is None:
            return None
        memo = self._decode_bias_memo
        if memo is not None and memo[0] is attention_mask and memo[1] == kv_len:
            return memo[2]
        bias = decode_mask_bias(attention_mask, kv_len)
        self._decode_bias_memo = (attention_mask, kv_len, bias)
        return bias

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held by the cache, summed over layers, by tensor name."""
        total: dict[str, int] = {}
        for layer in self.layers:
            for name, n in layer.memory_bytes().items():
                total[name] = total.get(name, 0) + n
        return total


def make_generation_cache(
    config: Any, batch_size: int, max_cache_len: int | None, device: torch.device | str | None, dtype: torch.dtype
) -> Cache:
    """The cache `generate()` builds by default: quantised when ``config.kv_cache_bits`` is set, else dynamic.

    The layers allocate lazily on the first update (batch size, device and dtype come from the states, after any
    beam or `num_return_sequences` expansion), so ``batch_size``, ``device`` and ``dtype`` are not needed here;
    ``max_cache_len`` is not used either (the dynamic layout is the default; pass a static cache explicitly).
    """
    if getattr(config, "kv_cache_bits", None) is None:
        return DynamicCache(config=config)
    return BitNetA48QuantizedCache(config=config)
