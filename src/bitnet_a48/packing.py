"""2-bit packing of ternary weights in the layout of transformers' ``bitnet`` checkpoints (SPEC section 7).

A ternary weight ``W`` of shape ``[out, in]`` with codes ``w ∈ {-1, 0, 1}`` is stored as ``uint8 [R, in]`` with
``R = ceil(out / 4)`` packed rows. Each byte holds four 2-bit fields, field ``i`` (bits ``2i..2i+1``) of packed row
``r`` holding the code ``w + 1 ∈ {0, 1, 2}`` of output row ``i·R + r``::

    byte packed[r, k] = (w[r, k] + 1) | (w[R + r, k] + 1) << 2 | (w[2R + r, k] + 1) << 4 | (w[3R + r, k] + 1) << 6

    bit   7 6 | 5 4 | 3 2 | 1 0
    row   3R+r| 2R+r| R+r |  r          (the four "planes" i = 3, 2, 1, 0)

So plane ``i`` is the contiguous block of output rows ``[i·R, (i+1)·R)``. When ``out`` is not a multiple of 4 the
last plane is short: the fields of rows ``≥ out`` are padding, written as 0 and ignored on unpacking (as
``transformers.integrations.bitnet.pack_weights`` does). The field value 3 is invalid; :func:`validate_packed`
finds it.

Unpacking is one broadcasted shift over the four planes (``(packed >> [0, 2, 4, 6]) & 3``), no Python loop over
rows. :func:`weight_bytes` counts the bytes of a model's weights in the latent (bf16) and packed formats.
"""

from __future__ import annotations

from typing import Any

import torch

from .projections import INTERMEDIATE, PROJECTIONS, QUERY, dimension

VALUES_PER_BYTE = 4
BITS_PER_VALUE = 2
CODE_MASK = 0b11
INVALID_CODE = 3
# Byte with every field holding code 1 (w = 0): a packed all-zero weight.
PACKED_ZERO_BYTE = 0b01010101


def packed_rows(out_features: int) -> int:
    """Number of packed rows ``R = ceil(out / 4)`` of a weight with ``out_features`` output rows."""
    if out_features <= 0:
        raise ValueError(f"out_features must be positive, got {out_features}")
    return (out_features + VALUES_PER_BYTE - 1) // VALUES_PER_BYTE


def _plane_shifts(device: torch.device) -> torch.Tensor:
    # (4, 1, 1): bit offset of plane i.
    return torch.arange(0, 8, BITS_PER_VALUE, dtype=torch.uint8, device=device).view(VALUES_PER_BYTE, 1, 1)


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Pack ternary codes ``int8 [out, in]`` in {-1, 0, 1} into ``uint8 [ceil(out/4), in]`` (layout above)."""
    if codes.dim() != 2:
        raise ValueError(f"pack_ternary takes a 2-D [out, in] tensor, got shape {tuple(codes.shape)}")
    if codes.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64):
        raise TypeError(f"pack_ternary takes integer codes, got {codes.dtype}")
    if codes.numel() and (codes.min() < -1 or codes.max() > 1):
        raise ValueError("pack_ternary takes codes in {-1, 0, 1}")
    out_features, in_features = codes.shape
    rows = packed_rows(out_features)
    fields = torch.zeros(VALUES_PER_BYTE * rows, in_features, dtype=torch.uint8, device=codes.device)
    fields[:out_features] = (codes + 1).to(torch.uint8)  # padding rows keep field 0
    planes = fields.view(VALUES_PER_BYTE, rows, in_features) << _plane_shifts(codes.device)
    # The four planes occupy disjoint bits, so their sum is their bitwise or (max 2+8+32+128 = 170 < 256).
    return planes.sum(dim=0, dtype=torch.uint8)


def unpack_planes(packed: torch.Tensor) -> torch.Tensor:
    """The 2-bit fields of ``packed [R, in]`` as ``uint8 [4R, in]`` (code ``w + 1``, padding rows included)."""
    rows, in_features = packed.shape
    fields = packed.unsqueeze(0) >> _plane_shifts(packed.device)  # (4, R, in): plane i in the low 2 bits
    fields &= CODE_MASK  # in place: one temporary, not two
    return fields.reshape(VALUES_PER_BYTE * rows, in_features)


def _check_packed(packed: torch.Tensor, out_features: int, name: str) -> None:
    if packed.dtype != torch.uint8:
        raise TypeError(f"{name}: packed ternary weights must be uint8, got {packed.dtype}")
    if packed.dim() != 2:
        raise ValueError(f"{name}: packed ternary weights must be 2-D [ceil(out/4), in], got {tuple(packed.shape)}")
    if packed.shape[0] != packed_rows(out_features):
        raise ValueError(
            f"{name}: {out_features} output rows need {packed_rows(out_features)} packed rows, "
            f"got shape {tuple(packed.shape)}"
        )


def unpack_ternary(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: ``int8 [out_features, in]`` codes in {-1, 0, 1} (3 would unpack to 2)."""
    _check_packed(packed, out_features, "packed")
    fields = unpack_planes(packed)[:out_features]
    # Fields are < 128, so the uint8 bytes read as int8 unchanged; then w = field - 1.
    return fields.view(torch.int8) - 1


def validate_packed(packed: torch.Tensor, out_features: int, name: str = "weight") -> None:
    """Raise ``ValueError`` naming ``name`` when ``packed`` has the wrong dtype/shape or holds the invalid code 3.

    Only the fields of real output rows are checked; the padding fields of a short last plane are ignored.
    """
    _check_packed(packed, out_features, name)
    if packed.device.type == "meta" or packed.numel() == 0:
        return
    fields = unpack_planes(packed)[:out_features]
    bad = fields == INVALID_CODE
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name}: packed ternary weight holds the invalid 2-bit code 3 ({int(bad.sum())} fields, first at "
            f"output row {row}, input column {col}); fields must hold w + 1 in {{0, 1, 2}}"
        )


# ---------------------------------------------------------------------------------------------------------
# Weight bytes of a whole model
# ---------------------------------------------------------------------------------------------------------


def check_matmul_operands(
    codes: torch.Tensor, scale: torch.Tensor, packed: torch.Tensor, out_features: int
) -> tuple[int, int]:
    """Check the operands of a ternary matmul ``(codes @ w^T) · scale`` and return ``(M, K)``.

    ``codes`` int8 ``[M, K]``, ``scale`` fp32 with M values, ``packed`` uint8 ``[ceil(N/4), K]`` for N =
    ``out_features``; the kernels add their own device and stride checks.
    """
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise TypeError(f"activation codes must be int8 [M, K], got {codes.dtype} {tuple(codes.shape)}")
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise TypeError(f"packed weights must be uint8 [ceil(N/4), K], got {packed.dtype} {tuple(packed.shape)}")
    m, k = codes.shape
    if packed.shape != (packed_rows(out_features), k):
        raise ValueError(
            f"packed weights of {out_features} outputs and {k} inputs must have shape "
            f"{(packed_rows(out_features), k)}, got {tuple(packed.shape)}"
        )
    if scale.dtype != torch.float32 or scale.numel() != m:
        raise ValueError(f"scale must be fp32 with one value per row ({m}), got {scale.dtype} {tuple(scale.shape)}")
    return m, k


def projection_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """``(out, in)`` of the seven BitLinear projections of one decoder layer of a BitNet a4.8 config, by name."""
    return {p.name: p.shape(config) for p in PROJECTIONS}


def weight_bytes(config: Any, weight_format: str = "packed", high_precision_bytes: int = 2) -> dict[str, int]:
    """Bytes of a model's weights: projections, norms, embeddings (+ untied lm_head) and the total.

    ``weight_format="latent"`` counts every projection in the high-precision dtype (``high_precision_bytes``,
    2 for bf16); ``"packed"`` counts ``ceil(out/4) · in`` bytes plus a 4-byte fp32 ``weight_scale`` per projection.
    Embeddings, lm_head and the RMSNorm weights stay in high precision in both.
    """
    if weight_format not in ("latent", "packed"):
        raise ValueError(f"weight_format must be 'latent' or 'packed', got {weight_format!r}")
    hp = high_precision_bytes
    per_layer = 0
    for out_features, in_features in projection_shapes(config).values():
        if weight_format == "packed":
            per_layer += packed_rows(out_features) * in_features + 4
        else:
            per_layer += out_features * in_features * hp
    projections = per_layer * config.num_hidden_layers
    hidden = config.hidden_size
    # input_layernorm, post_attention_layernorm, attn_sub_norm (width q_out), ffn_sub_norm (width ffn); final norm.
    sub_norms = dimension(config, QUERY) + dimension(config, INTERMEDIATE)
    norms = (config.num_hidden_layers * (2 * hidden + sub_norms) + hidden) * hp
    embeddings = config.vocab_size * hidden * hp
    lm_head = 0 if getattr(config, "tie_word_embeddings", False) else config.vocab_size * hidden * hp
    total = projections + norms + embeddings + lm_head
    return {"projections": projections, "norms": norms, "embeddings": embeddings, "lm_head": lm_head, "total": total}
