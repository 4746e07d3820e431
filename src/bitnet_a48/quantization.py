"""Pure-torch quantisers of BitNet a4.8 (arXiv 2411.04965, section 2): the reference for every kernel.

All statistics are computed in fp32, per tensor for weights and per token (over the last dimension) for
activations. ``RoundClip(x, a, b) = min(max(round(x), a), b)``; ``round`` is torch's half-to-even.

Weights, ternary absmean (BitNet b1.58, eq. 1-3)::

    Q_w(W) = α · RoundClip(W / α, -1, 1),           α = mean|W|                 codes in {-1, 0, 1}

Activations, per token::

    INT8  Q_8(X) = (γ/127) · RoundClip(127·X/γ, -128, 127),   γ = max|X|      codes in [-128, 127]
    INT4  Q_4(X) = (β/√7) · RoundClip(√7·X/β, -8, 7),         β = mean|X|     codes in [-8, 7]
    TopK  S_k(X) = X ⊙ M, M = 1 on the k = ⌈ratio·d⌉ largest |X| of the token (then INT8, for o_proj)
    FP4   E2M1 MinMax (section 2.3): X is scaled so that max|X| lands on 6, the largest E2M1 value, and every
          entry is rounded on the E2M1 grid {0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6}.

The statistic is clamped (``γ.clamp(min=1e-5)``) instead of adding ε, as the b1.58 reference code and
transformers' BitNet do, so that the b1.58 arithmetic matches ``BitNetForCausalLM``. The codes are
``round(x · (Q/γ))`` in that same order of operations.

Every quantiser returns integer ``codes`` and an fp32 ``scale`` with ``dequantize(codes, scale) = codes · scale``:

==========================  ==================  ===================  =============================
function                    codes (dtype)       scale shape          meaning of scale
==========================  ==================  ===================  =============================
quantize_weight_ternary     int8 in {-1,0,1}    ()                   α = mean|W|
quantize_act_int8           int8 in [-128,127]  (..., 1)             γ / 127
quantize_act_int4           int8 in [-8, 7]     (..., 1)             β / √7
quantize_act_fp4            int8 in 2·E2M1      (..., 1)             max|X| / 12
quantize_act_topk_int8      int8 (k non-zero)   (..., 1)             γ / 127 of the kept values
==========================  ==================  ===================  =============================

FP4 codes hold twice the E2M1 value ({0, ±1, ±2, ±3, ±4, ±6, ±8, ±12}), so they are integers that int8
kernels consume unchanged; ``codes / 2`` lies on the E2M1 grid and ``scale · 2`` is the per-token step.

``fake_quantize_*`` return the dequantised tensor in the input dtype with the identity straight-through
estimator (section 2: every non-differentiable op is bypassed in backward): the forward value is ``q(x)`` exactly,
the gradient that of ``x`` (:func:`ste`). Their values come from ``fake_*_values``, the training path: the same
arithmetic as ``dequantize(quantize_*(x))`` bit for bit on finite inputs, without autograd and in fewer passes
over the tensor (the codes stay in fp32, where they are exact, and are scaled in place).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

QUANT_EPS = 1e-5
INT8_QMIN, INT8_QMAX = -128, 127
INT8_WEIGHT_QMAX = 127  # symmetric int8 weights: |code| <= 127 keeps the AVX2 sign trick exact
INT4_QMIN, INT4_QMAX = -8, 7
INT4_ABSMEAN_FACTOR = math.sqrt(7.0)
TERNARY_QMIN, TERNARY_QMAX = -1, 1
FP4_E2M1_MAX = 6.0
FP4_E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Codes store 2·E2M1 so that they are integers; the largest code is 12.
FP4_CODE_MAX = 2 * FP4_E2M1_MAX

# Which input quantiser each projection role uses (SPEC section 2, table).
ROLES = ("qkv", "o", "gate_up", "down")
QUANT_MODES = ("a4.8", "a8", "none")
ACT4_FORMATS = ("int4", "fp4")


class Quantized(NamedTuple):
    """Integer codes and the fp32 scale that maps them back: ``codes * scale``."""

    codes: torch.Tensor
    scale: torch.Tensor


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``codes · scale`` computed in fp32, returned in ``dtype``."""
    return (codes.float() * scale.float()).to(dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward: ``q`` itself; backward: the incoming gradient goes to ``x`` unchanged (d out / d x = 1)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return q

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        return grad_out, None


def ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Identity straight-through estimator: the value of ``q`` (in ``x.dtype``), the gradient of ``x``.

    The value is ``q`` bit for bit with or without a gradient to carry: ``x + (q - x).detach()`` differs from ``q``
    by float rounding, which the next quantiser (a rounding or a TopK choice) could turn into a different code, and
    a recompute under gradient checkpointing (``use_reentrant=True`` runs the forward once without grad) would then
    see other activations than the first pass.
    """
    q = q.detach().to(x.dtype)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return q
    return _StraightThrough.apply(x, q)


# ---------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------


def quantize_weight_ternary(weight: torch.Tensor) -> Quantized:
    """Ternary absmean quantisation of a whole tensor: codes in {-1, 0, 1}, scale α = mean|W| (0-dim)."""
    w = weight.float()
    alpha = w.abs().mean().clamp(min=QUANT_EPS)
    codes = (w * (1.0 / alpha)).round().clamp(TERNARY_QMIN, TERNARY_QMAX)
    return Quantized(codes.to(torch.int8), alpha)


def quantize_weight_int8_rows(weight: torch.Tensor) -> Quantized:
    """Symmetric INT8 absmax per output row (the optional int8 lm_head): codes in [-127, 127], scale (rows,)."""
    w = weight.float()
    gamma = w.abs().amax(dim=-1, keepdim=True).clamp(min=QUANT_EPS)
    inv_scale = INT8_WEIGHT_QMAX / gamma
    codes = (w * inv_scale).round().clamp(-INT8_WEIGHT_QMAX, INT8_WEIGHT_QMAX)
    return Quantized(codes.to(torch.int8), (1.0 / inv_scale).reshape(-1))


def _is_plain(t: torch.Tensor) -> bool:
    """A plain tensor or parameter: the in-place training path; subclasses (DTensor shards) take the reference."""
    return type(t) in (torch.Tensor, torch.nn.Parameter)


def _scale_codes_(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``dequantize(codes, scale, dtype)`` for a fresh fp32 tensor ``t`` of integer-valued codes, scaled in place.

    ``0 + t · scale`` in one pass: the product is rounded once, as in ``dequantize``, and adding +0.0 turns the -0.0
    that rounding leaves for small negative entries into the +0.0 of an int8 code 0 (the bits stay the same).
    """
    torch.addcmul(t.new_zeros(()), t, scale, out=t)
    return t.to(dtype)


def fake_quantize_weight_values(weight: torch.Tensor) -> torch.Tensor:
    """The value of ``Q_w(W)`` in the weight's dtype, without gradient: ``dequantize(*quantize_weight_ternary(W))``."""
    if torch.compiler.is_compiling() or not _is_plain(weight):  # a compiled graph fuses the reference itself
        codes, alpha = quantize_weight_ternary(weight.detach())
        return dequantize(codes, alpha, weight.dtype)
    with torch.no_grad():
        w = weight.float()
        alpha = w.abs().mean().clamp(min=QUANT_EPS)
        t = w * (1.0 / alpha)
        t.round_().clamp_(TERNARY_QMIN, TERNARY_QMAX)
        return _scale_codes_(t, alpha, weight.dtype)


def fake_quantize_weight_ternary(weight: torch.Tensor) -> torch.Tensor:
    """``Q_w(W)`` in the weight's dtype with the straight-through gradient."""
    return ste(weight, fake_quantize_weight_values(weight))


# ---------------------------------------------------------------------------------------------------------
# Activations (per token = per row of the last dimension)
# ---------------------------------------------------------------------------------------------------------


def _check_activation(x: torch.Tensor) -> None:
    if not torch.is_floating_point(x):
        raise TypeError(f"activation quantisers take a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"activation quantisers need a non-empty last dimension, got shape {tuple(x.shape)}")


def quantize_act_int8(x: torch.Tensor) -> Quantized:
    """INT8 absmax per token: codes in [-128, 127], scale γ/127 with γ = max|X| (shape (..., 1))."""
    _check_activation(x)
    xf = x.float()
    gamma = xf.abs().amax(dim=-1, keepdim=True).clamp(min=QUANT_EPS)
    inv_scale = INT8_QMAX / gamma
    codes = (xf * inv_scale).round().clamp(INT8_QMIN, INT8_QMAX)
    return Quantized(codes.to(torch.int8), 1.0 / inv_scale)


def quantize_act_int4(x: torch.Tensor) -> Quantized:
    """INT4 absmean per token: codes in [-8, 7], scale β/√7 with β = mean|X| (shape (..., 1))."""
    _check_activation(x)
    xf = x.float()
    # The sum of |x| in fp64: exact for bf16 inputs, so the mean (and the codes) do not depend on the order of the
    # additions, which differs between CPU instruction sets and kernels (kernels_cpu_native.py computes the same).
    total = xf.abs().sum(dim=-1, keepdim=True, dtype=torch.float64)
    beta = (total / xf.shape[-1]).float().clamp(min=QUANT_EPS)
    inv_scale = INT4_ABSMEAN_FACTOR / beta
    codes = (xf * inv_scale).round().clamp(INT4_QMIN, INT4_QMAX)
    return Quantized(codes.to(torch.int8), 1.0 / inv_scale)


def quantize_act_fp4(x: torch.Tensor) -> Quantized:
    """FP4 E2M1 MinMax per token (section 2.3); codes are 2·E2M1 values, scale = max|X| / 12.

    With y = X · 12 / max|X| (so max|X| maps to 12 = 2·6), each entry is rounded with the step of its binade,
    ``2^(max(⌊log2|y|⌋, 1) - 1)`` (one mantissa bit, the subnormal binade clamped at exponent 1), which is the
    paper's ``γ/2^(M+b) · Round(2^(M+b)/γ · X)`` with ``γ = 2^max(⌊log2|X| + b⌋, 1)`` and M = 1.
    """
    _check_activation(x)
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp(min=QUANT_EPS)
    inv_scale = FP4_CODE_MAX / amax
    y = xf * inv_scale
    exponent = torch.floor(torch.log2(y.abs())).clamp(min=1.0)  # log2(0) = -inf -> clamped to 1
    step = torch.exp2(exponent - 1.0)
    codes = ((y / step).round() * step).clamp(-FP4_CODE_MAX, FP4_CODE_MAX)
    return Quantized(codes.to(torch.int8), 1.0 / inv_scale)


def topk_count(dim: int, ratio: float) -> int:
    """Number of entries TopK keeps per token: ``k = ⌈ratio · d⌉`` (at least 1)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"topk ratio must lie in (0, 1], got {ratio}")
    return max(1, min(dim, math.ceil(ratio * dim - 1e-9)))


def topk_mask(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask of the k = ⌈ratio · d⌉ largest |X| of each token: exactly k entries.

    Entries equal to the k-th largest |X| (ties, common in bf16) are kept lowest index first, a rule every kernel
    can follow (``torch.topk`` leaves the choice among ties unspecified).
    """
    _check_activation(x)
    k = topk_count(x.shape[-1], ratio)
    if k == x.shape[-1]:
        return torch.ones_like(x, dtype=torch.bool)
    magnitude = x.float().abs()
    threshold = magnitude.topk(k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)  # the k-th largest
    above = magnitude > threshold
    ties = magnitude == threshold
    room = k - above.sum(dim=-1, keepdim=True)  # how many ties are kept
    return above | (ties & (ties.cumsum(dim=-1) <= room))


def sparsify_topk(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """``S_k(X) = X ⊙ M`` with the TopK mask; the straight-through gradient reaches every entry (Q-Sparse)."""
    return ste(x, x * topk_mask(x, ratio))


def quantize_act_topk_int8(x: torch.Tensor, ratio: float) -> Quantized:
    """TopK sparsification followed by INT8 absmax of the kept values (the o_proj input of a4.8)."""
    return quantize_act_int8(x * topk_mask(x, ratio))


# ---------------------------------------------------------------------------------------------------------
# Choice by role and mode
# ---------------------------------------------------------------------------------------------------------


def act_quantizer_name(role: str, quant_mode: str, act4_format: str = "int4") -> str:
    """Name of the input quantiser of a projection: "none", "int8", "int4", "fp4" or "topk_int8".

    a4.8 (stage 2): q/k/v and gate/up take 4-bit inputs, o_proj TopK + INT8, down_proj INT8.
    a8 (stage 1, = b1.58 with ReLU²GLU): INT8 everywhere. none: full precision.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if quant_mode not in QUANT_MODES:
        raise ValueError(f"quant_mode must be one of {QUANT_MODES}, got {quant_mode!r}")
    if act4_format not in ACT4_FORMATS:
        raise ValueError(f"act4_format must be one of {ACT4_FORMATS}, got {act4_format!r}")
    if quant_mode == "none":
        return "none"
    if quant_mode == "a8":
        return "int8"
    if role in ("qkv", "gate_up"):
        return act4_format
    if role == "o":
        return "topk_int8"
    return "int8"


def quantize_act(x: torch.Tensor, name: str, topk_ratio: float = 0.5) -> Quantized:
    """Apply the activation quantiser called ``name`` (see :func:`act_quantizer_name`)."""
    if name == "int8":
        return quantize_act_int8(x)
    if name == "int4":
        return quantize_act_int4(x)
    if name == "fp4":
        return quantize_act_fp4(x)
    if name == "topk_int8":
        return quantize_act_topk_int8(x, topk_ratio)
    raise ValueError(f"unknown activation quantiser {name!r}; expected int8, int4, fp4 or topk_int8")


def _topk_keep(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """``topk_mask`` from the magnitudes as an fp32 tensor of 0 and 1 (the same lowest-index-first tie rule)."""
    threshold = magnitude.topk(k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)  # the k-th largest
    # 1 where |x| >= threshold: sign(|x| - threshold) + 1, clamped at 1 (float passes; bool masks are slower here).
    keep = torch.sub(magnitude, threshold).sign_().add_(1.0).clamp_(max=1.0)
    # Without ties at the threshold (the common case) exactly k entries are kept. The check reads one flag back,
    # so it is only taken on the CPU; rows with ties (or a flushed denormal difference) take the tie rule.
    if magnitude.device.type == "cpu" and bool((keep.sum(dim=-1) == k).all()):
        return keep
    above = magnitude > threshold
    ties = magnitude == threshold
    room = k - above.sum(dim=-1, keepdim=True)
    return (above | (ties & (ties.cumsum(dim=-1) <= room))).float()


def _int8_codes(
    xf: torch.Tensor, gamma: torch.Tensor, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 INT8 codes of ``xf`` (times the 0/1 ``keep``) and their scale, from γ = max|X| of the row (unclamped)."""
    inv_scale = INT8_QMAX / gamma.clamp(min=QUANT_EPS)
    t = xf * inv_scale
    if keep is not None:
        t.mul_(keep)
    # |t| <= max|X| · fl(127 / γ) < 127.5, so the clamp of quantize_act_int8 never changes a finite entry.
    return t.round_(), 1.0 / inv_scale


def fake_quantize_act_values(x: torch.Tensor, name: str, topk_ratio: float = 0.5) -> torch.Tensor:
    """The value of the input quantiser ``name`` in ``x.dtype``, without gradient: ``dequantize(*quantize_act(x))``.

    TopK takes the entries at or above the k-th largest |X| and falls back to the tie rule of :func:`topk_mask` only
    where there are ties at it; γ of the kept values is max|X| itself, since TopK keeps the largest entry.
    """
    if torch.compiler.is_compiling() or not _is_plain(x) or name == "fp4":  # FP4 is rarely trained
        codes, scale = quantize_act(x.detach(), name, topk_ratio)
        return dequantize(codes, scale, x.dtype)
    _check_activation(x)
    with torch.no_grad():
        xf = x.float()
        if name == "int8":
            t, scale = _int8_codes(xf, xf.abs().amax(dim=-1, keepdim=True))
        elif name == "int4":
            # The same fp64 sum of |x| as quantize_act_int4 (which converts xf.abs() to fp64), one pass shorter.
            total = x.to(torch.float64).abs_().sum(dim=-1, keepdim=True)
            inv_scale = INT4_ABSMEAN_FACTOR / (total / xf.shape[-1]).float().clamp(min=QUANT_EPS)
            t, scale = (xf * inv_scale).round_().clamp_(INT4_QMIN, INT4_QMAX), 1.0 / inv_scale
        elif name == "topk_int8":
            k = topk_count(xf.shape[-1], topk_ratio)
            magnitude = xf.abs()
            keep = None if k == xf.shape[-1] else _topk_keep(magnitude, k)
            t, scale = _int8_codes(xf, magnitude.amax(dim=-1, keepdim=True), keep)
        else:
            raise ValueError(f"unknown activation quantiser {name!r}; expected int8, int4, fp4 or topk_int8")
        return _scale_codes_(t, scale, x.dtype)


def fake_quantize_act(x: torch.Tensor, name: str, topk_ratio: float = 0.5) -> torch.Tensor:
    """Dequantised activation in ``x.dtype`` with the straight-through gradient; ``name="none"`` is identity."""
    if name == "none":
        return x
    return ste(x, fake_quantize_act_values(x, name, topk_ratio))
