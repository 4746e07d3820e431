"""Triton kernels: fused per-token activation quantisers of BitNet a4.8 (one program per block of tokens).

Torch references (``quantization.py``): ``quantize_act_int8``, ``quantize_act_int4``, ``quantize_act_topk_int8``.
Each program reads BLOCK_M rows of ``x`` (fp32, fp16 or bf16, ``[M, K]`` with unit stride along K) and writes its int8
codes (``[M, K]`` contiguous) and one fp32 scale per row (``[M, 1]``)::

    INT8   γ = max(max|x|, 1e-5)             inv = (1/γ)·127    codes = RoundClip(x·inv, -128, 127)
    INT4   β = max(Σ|x| / K, 1e-5)           inv = (1/β)·√7     codes = RoundClip(x·inv, -8, 7)
    TopK   t = k-th largest |x|, k = ⌈ratio·K⌉, then INT8 with γ = max|x|; codes = 0 where |x| < t
    scale = 1 / inv                           (so codes · scale dequantises)

The order of operations is the reference's (``127 / γ`` in torch is ``γ.reciprocal() * 127``), divisions are
correctly rounded (``div_rn``), rounding is half-to-even like ``torch.round``, and the launch disables FMA
contraction, so the codes equal the reference bit for bit whenever the statistic does. γ (a max) is independent of
the reduction order, so INT8 and TopK codes are exact. β is a sum: its fp32 rounding depends on the order of the
reduction, which differs from torch's, so β may differ from the reference in the last bit and a code lying within
that rounding error of a half-integer may differ by 1 (tests check that every such difference is of this kind).

TopK is fully fused: the threshold is found by a radix search over the 31 bits of ``|x|`` read as int32 (the bit
patterns of non-negative floats are ordered like their values): starting from 0, each bit is set when at least k
entries are still ≥ the candidate, which ends on the k-th largest |x| exactly. Entries equal to the threshold are
all kept, so with ties at the threshold more than k entries survive, where ``torch.topk`` keeps exactly k (its
choice among ties is unspecified anyway). The search reads the row 31 more times (from cache on a GPU).

No fused RMSNorm: a norm computed in another reduction order would break the bit-exact contract above; the
RMSNorm stays a separate op.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .quantization import (
    INT4_ABSMEAN_FACTOR,
    INT4_QMAX,
    INT4_QMIN,
    INT8_QMAX,
    INT8_QMIN,
    QUANT_EPS,
    Quantized,
    topk_count,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # the package, and a remote-code folder, import without Triton
    triton = None
    tl = None

HAS_TRITON = triton is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

MODE_INT8, MODE_INT4, MODE_TOPK_INT8 = 0, 1, 2
_MODES = {"int8": MODE_INT8, "int4": MODE_INT4, "topk_int8": MODE_TOPK_INT8}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

if HAS_TRITON:
    # The interpreter benchmarks nothing, and autotune with two or more configs fails there: use one config.
    _CONFIGS = (
        [triton.Config({"BLOCK_M": 32, "BLOCK_K": 256}, num_warps=1)]
        if INTERPRET
        else [
            triton.Config({"BLOCK_M": 1, "BLOCK_K": 1024}, num_warps=4),
            triton.Config({"BLOCK_M": 1, "BLOCK_K": 4096}, num_warps=8),
            triton.Config({"BLOCK_M": 4, "BLOCK_K": 1024}, num_warps=8),
        ]
    )

    @triton.jit
    def _round_half_even(y):
        # torch.round semantics without libdevice (the interpreter lacks rint): floor, then the tie goes to even.
        f = tl.floor(y)
        d = y - f
        odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
        return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)

    @triton.autotune(configs=_CONFIGS, key=["K", "MODE"])
    @triton.jit
    def _act_quant_kernel(
        # pointers: x [M, K] float, codes int8 [M, K], scale fp32 [M]
        X, CODES, SCALE,
        # sizes and row strides (elements)
        M, K, stride_xm, stride_cm,
        # TopK: entries kept per row
        k_keep,
        MODE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        rows = rows.to(tl.int64)
        offs = tl.arange(0, BLOCK_K)
        x_ptr = X + rows[:, None] * stride_xm + offs[None, :]  # (BLOCK_M, BLOCK_K)
        c_ptr = CODES + rows[:, None] * stride_cm + offs[None, :]

        # pass 1: per-token statistic, max|x| and Σ|x| in fp32
        amax = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        asum = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask = row_mask[:, None] & (k0 + offs < K)[None, :]
            x = tl.abs(tl.load(x_ptr + k0, mask=mask, other=0.0).to(tl.float32))
            amax = tl.maximum(amax, x)
            asum += x
        if MODE == 1:
            beta = tl.maximum(tl.math.div_rn(tl.sum(asum, axis=1), tl.zeros([BLOCK_M], tl.float32) + K), 1e-5)
            inv = tl.math.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), beta) * 2.6457513110645907  # √7 in fp32
            qmin = -8.0
            qmax = 7.0
        else:
            gamma = tl.maximum(tl.max(amax, axis=1), 1e-5)
            inv = tl.math.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), gamma) * 127.0
            qmin = -128.0
            qmax = 127.0

        # TopK: radix search for the bits of the k-th largest |x| of each row (bit 31, the sign, is 0)
        thr = tl.zeros([BLOCK_M], dtype=tl.int32)
        if MODE == 2:
            for b in tl.static_range(30, -1, -1):
                cand = thr | (1 << b)
                count = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int32)
                for k0 in range(0, K, BLOCK_K):
                    mask = row_mask[:, None] & (k0 + offs < K)[None, :]
                    x = tl.load(x_ptr + k0, mask=mask, other=0.0).to(tl.float32)
                    bits = tl.abs(x).to(tl.int32, bitcast=True)
                    count += (bits >= cand[:, None]).to(tl.int32)  # masked lanes read 0 < cand
                thr = tl.where(tl.sum(count, axis=1) >= k_keep, cand, thr)

        # pass 2: codes
        for k0 in range(0, K, BLOCK_K):
            mask = row_mask[:, None] & (k0 + offs < K)[None, :]
            x = tl.load(x_ptr + k0, mask=mask, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(_round_half_even(x * inv[:, None]), qmin), qmax)
            if MODE == 2:
                q = tl.where(tl.abs(x).to(tl.int32, bitcast=True) >= thr[:, None], q, 0.0)
            tl.store(c_ptr + k0, q.to(tl.int8), mask=mask)
        tl.store(SCALE + rows, tl.math.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), inv), mask=row_mask)


def _check_constants() -> None:
    # The kernel hard-codes these (constexpr floats); keep them tied to quantization.py.
    assert (INT8_QMIN, INT8_QMAX, INT4_QMIN, INT4_QMAX, QUANT_EPS) == (-128, 127, -8, 7, 1e-5)
    assert INT4_ABSMEAN_FACTOR == 2.6457513110645907


_check_constants()


def check_triton_device(*tensors: torch.Tensor) -> None:
    """Raise unless Triton is importable and the tensors share a device it can run on (CUDA, or the CPU under
    ``TRITON_INTERPRET=1``)."""
    if not HAS_TRITON:
        raise RuntimeError("the Triton kernels need the `triton` package (pip install 'bitnet-a48[triton]')")
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    device = devices.pop()
    if device.type == "cpu" and not INTERPRET:
        raise RuntimeError(
            "Triton kernels on CPU tensors run only under the interpreter: set TRITON_INTERPRET=1 before "
            "bitnet_a48 is imported, or use impl='torch'"
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"the Triton kernels run on CUDA tensors, got a tensor on {device}")


def quantize_act_triton(x: torch.Tensor, name: str, topk_ratio: float = 0.5) -> Quantized:
    """Per-token quantisation of ``x`` (``[..., K]``) by the fused kernel; ``name`` in int8, int4, topk_int8.

    Returns int8 codes of x's shape and an fp32 scale of shape ``[..., 1]``, like ``quantization.quantize_act``.
    """
    if name not in _MODES:
        raise ValueError(f"quantize_act_triton supports {sorted(_MODES)}, got {name!r} (fp4 runs in torch)")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"quantize_act_triton takes fp32, fp16 or bf16 inputs, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"quantize_act_triton needs a non-empty last dimension, got shape {tuple(x.shape)}")
    check_triton_device(x)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    codes = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    k_keep = topk_count(k, topk_ratio) if name == "topk_int8" else k
    if m > 0:
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)
            _act_quant_kernel[grid](
                x2, codes, scale, m, k, x2.stride(0), codes.stride(0), k_keep, MODE=_MODES[name],
                enable_fp_fusion=False,  # x·inv must round before the half-to-even step, as in torch
            )
    return Quantized(codes.view(*lead, k), scale.view(*lead, 1))
