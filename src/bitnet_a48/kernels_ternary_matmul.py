"""Triton kernels: int8 activations × 2-bit packed ternary weights, int32 accumulation, scale epilogue.

Torch reference: ``packed_bitlinear.ternary_matmul_torch`` (``torch._int_mm`` on the unpacked codes), itself checked
against ``(x_codes.int() @ unpack_ternary(w).int().T).float() * (x_scale · α)``::

    y[m, n] = (Σ_k a[m, k] · w[n, k]) · s[m],      a int8 [M, K] (activation codes), w ∈ {-1, 0, 1},
                                                   s = x_scale[m] · α fp32 [M] (α = weight_scale = mean|W|)

Weights stay packed (``packing.py``): ``uint8 [R, K]``, ``R = ceil(N/4)``, field ``i`` (bits ``2i..2i+1``) of packed
row ``r`` holding ``w + 1`` of output row ``n = i·R + r``. A program loads a tile of packed rows once and feeds
all four bit planes to four int8 ``tl.dot`` accumulators, so every weight byte is read once per M-tile. The fields
``f = w + 1 ∈ {0, 1, 2}`` go to the dot unchanged and the ``-1`` is folded into the epilogue::

    Σ_k a·w = Σ_k a·f − Σ_k a                       (one row sum of a per tile instead of a subtraction per weight)

Two kernels:

- ``_ternary_gemm_kernel`` (prefill, M > 16): grid (M tiles, packed-row tiles); fp32 epilogue ``acc · s`` stored in
  the output dtype.
- ``_ternary_gemv_splitk_kernel`` (decode, M ≤ 16): grid (packed-row tiles, K splits); each program reads its
  weight bytes once and adds its int32 partial sums into an ``[M, N]`` int32 workspace with ``tl.atomic_add``
  (integer addition, so the result is exact and independent of order); the launcher applies ``· s``.

Integer sums are exact; the fp32 result equals the torch reference bit for bit (same ``float(acc) · s``), and a
bf16/fp16 result too on a GPU (under the interpreter the GEMM's downcast truncates: within one bf16 ulp).
int8 ``tl.dot`` with ``out_dtype=int32`` is exact under ``TRITON_INTERPRET=1`` too (the interpreter's bf16 dot is
not, which is why nothing here uses bf16 operands).
"""

from __future__ import annotations

import contextlib
import os

import torch

from .packing import check_matmul_operands

try:
    import triton
    import triton.language as tl
except ImportError:  # the package, and a remote-code folder, import without Triton
    triton = None
    tl = None

HAS_TRITON = triton is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DECODE_MAX_M = 16  # tl.dot needs tiles of at least 16 rows: decode pads M up to one tile
_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

if HAS_TRITON:
    # Untuned on hardware (written without a GPU): a few standard int8 tile shapes. One config under the
    # interpreter, where autotune with two or more configs fails.
    _GEMM_CONFIGS = (
        [triton.Config({"BLOCK_M": 32, "BLOCK_R": 16, "BLOCK_K": 64}, num_warps=1)]
        if INTERPRET
        else [
            triton.Config({"BLOCK_M": 64, "BLOCK_R": 32, "BLOCK_K": 128}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 128, "BLOCK_R": 32, "BLOCK_K": 128}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_R": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 64, "BLOCK_R": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
        ]
    )
    _GEMV_CONFIGS = (
        [triton.Config({"BLOCK_R": 16, "BLOCK_K": 64}, num_warps=1)]
        if INTERPRET
        else [
            triton.Config({"BLOCK_R": 32, "BLOCK_K": 256}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_R": 64, "BLOCK_K": 128}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_R": 16, "BLOCK_K": 512}, num_warps=4, num_stages=3),
        ]
    )

    @triton.jit
    def _plane_dots(a, p, acc0, acc1, acc2, acc3):
        # a int8 (BM, BK); p uint8 (BK, BR) packed bytes; the four 2-bit fields feed four int8 dots.
        acc0 = tl.dot(a, (p & 3).to(tl.int8), acc0, out_dtype=tl.int32)
        acc1 = tl.dot(a, ((p >> 2) & 3).to(tl.int8), acc1, out_dtype=tl.int32)
        acc2 = tl.dot(a, ((p >> 4) & 3).to(tl.int8), acc2, out_dtype=tl.int32)
        acc3 = tl.dot(a, ((p >> 6) & 3).to(tl.int8), acc3, out_dtype=tl.int32)
        return acc0, acc1, acc2, acc3

    @triton.jit
    def _store_plane(y_row, n, acc, s, m_mask, r_mask, N):
        # y[m, n] = float(acc) · s[m], stored in the output dtype (rounded to nearest even on a GPU; the
        # interpreter's fp32 -> bf16/fp16 cast truncates instead)
        y = acc.to(tl.float32) * s[:, None]
        tl.store(y_row + n[None, :], y.to(y_row.dtype.element_ty), mask=m_mask[:, None] & (r_mask & (n < N))[None, :])

    @triton.autotune(configs=_GEMM_CONFIGS, key=["N", "K"])
    @triton.jit
    def _ternary_gemm_kernel(
        # pointers: a int8 [M, K], w uint8 [R, K] packed, s fp32 [M] (x_scale·α), y [M, N] (out dtype)
        A, W, S, Y,
        # sizes: R = ceil(N / 4) packed rows
        M, N, K, R,
        # row strides (elements; the K stride is 1 for a and w, the N stride 1 for y)
        stride_am, stride_wr, stride_ym,
        BLOCK_M: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_r = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        r_mask = offs_r < R
        a_ptr = A + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]  # (BM, BK)
        w_ptr = W + offs_r.to(tl.int64)[None, :] * stride_wr + offs_k[:, None]  # (BK, BR), transposed view

        acc0 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.int32)
        acc1 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.int32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.int32)
        acc3 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.int32)
        a_sum = tl.zeros([BLOCK_M], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = k0 + offs_k < K
            a = tl.load(a_ptr + k0, mask=m_mask[:, None] & k_mask[None, :], other=0)
            p = tl.load(w_ptr + k0, mask=k_mask[:, None] & r_mask[None, :], other=0)
            acc0, acc1, acc2, acc3 = _plane_dots(a, p, acc0, acc1, acc2, acc3)
            a_sum += tl.sum(a.to(tl.int32), axis=1)

        # epilogue: y[m, i·R + r] = (acc_i − Σa) · s[m]
        s = tl.load(S + offs_m, mask=m_mask, other=0.0)
        y_row = Y + offs_m.to(tl.int64)[:, None] * stride_ym
        _store_plane(y_row, offs_r, acc0 - a_sum[:, None], s, m_mask, r_mask, N)
        _store_plane(y_row, offs_r + R, acc1 - a_sum[:, None], s, m_mask, r_mask, N)
        _store_plane(y_row, offs_r + 2 * R, acc2 - a_sum[:, None], s, m_mask, r_mask, N)
        _store_plane(y_row, offs_r + 3 * R, acc3 - a_sum[:, None], s, m_mask, r_mask, N)

    @triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K", "SPLIT_K"], reset_to_zero=["ACC"])
    @triton.jit
    def _ternary_gemv_splitk_kernel(
        # pointers: a int8 [M, K] (M ≤ 16), w uint8 [R, K] packed, acc int32 [M, N] zero-initialised workspace
        A, W, ACC,
        # sizes: R = ceil(N / 4) packed rows
        M, N, K, R,
        # row strides (elements)
        stride_am, stride_wr, stride_accm,
        SPLIT_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_r = tl.program_id(0)
        pid_s = tl.program_id(1)
        # this program's K range: whole BLOCK_K tiles, split evenly
        k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        k_start = pid_s * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        offs_m = tl.arange(0, BLOCK_M)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        r_mask = offs_r < R
        a_ptr = A + offs_m[:, None] * stride_am + offs_k[None, :]  # (BM, BK)
        w_ptr = W + offs_r.to(tl.int64)[None, :] * stride_wr + offs_k[:, None]  # (BK, BR)

        acc0 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.int32)
        acc1 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.int32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.int32)
        acc3 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.int32)
        a_sum = tl.zeros([BLOCK_M], dtype=tl.int32)
        for k0 in range(k_start, k_end, BLOCK_K):
            k_mask = k0 + offs_k < k_end
            a = tl.load(a_ptr + k0, mask=m_mask[:, None] & k_mask[None, :], other=0)
            p = tl.load(w_ptr + k0, mask=k_mask[:, None] & r_mask[None, :], other=0)
            acc0, acc1, acc2, acc3 = _plane_dots(a, p, acc0, acc1, acc2, acc3)
            a_sum += tl.sum(a.to(tl.int32), axis=1)

        acc_row = ACC + offs_m[:, None] * stride_accm
        n0 = offs_r
        tl.atomic_add(acc_row + n0[None, :], acc0 - a_sum[:, None], mask=m_mask[:, None] & (r_mask & (n0 < N))[None, :])
        n1 = offs_r + R
        tl.atomic_add(acc_row + n1[None, :], acc1 - a_sum[:, None], mask=m_mask[:, None] & (r_mask & (n1 < N))[None, :])
        n2 = offs_r + 2 * R
        tl.atomic_add(acc_row + n2[None, :], acc2 - a_sum[:, None], mask=m_mask[:, None] & (r_mask & (n2 < N))[None, :])
        n3 = offs_r + 3 * R
        tl.atomic_add(acc_row + n3[None, :], acc3 - a_sum[:, None], mask=m_mask[:, None] & (r_mask & (n3 < N))[None, :])


def _check_inputs(
    codes: torch.Tensor, scale: torch.Tensor, packed: torch.Tensor, out_features: int
) -> tuple[int, int, int]:
    from .kernels_act_quant import check_triton_device

    m, k = check_matmul_operands(codes, scale, packed, out_features)
    if codes.stride(1) != 1 or packed.stride(1) != 1:
        raise ValueError("codes and packed weights must have unit stride along K")
    check_triton_device(codes, scale, packed)
    return m, out_features, k


def _decode_split_k(n_row_tiles: int, k: int, device: torch.device) -> int:
    # Enough programs to fill the GPU: about two per SM, at most one K split per 256 columns.
    if device.type != "cuda":
        return max(1, min(4, triton.cdiv(k, 64)))  # the interpreter: exercise several splits on small shapes
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, n_row_tiles), triton.cdiv(k, 256), 32))


def ternary_matmul_triton(
    codes: torch.Tensor,
    scale: torch.Tensor,
    packed: torch.Tensor,
    out_features: int,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``y = (codes @ w^T) · scale`` with ``w`` unpacked on the fly from ``packed``; decode kernel when M ≤ 16.

    Args:
        codes: int8 ``[M, K]`` activation codes (int8, int4, TopK or 2·FP4 codes alike).
        scale: fp32 ``[M]`` or ``[M, 1]``: the per-row factor ``x_scale · α``.
        packed: uint8 ``[ceil(N/4), K]`` ternary weights (``packing.pack_ternary``).
        out_features: N.
        out_dtype: dtype of ``y`` (fp32, fp16 or bf16); accumulation is int32 and the epilogue fp32.
    """
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    m, n, k = _check_inputs(codes, scale, packed, out_features)
    rows = packed.shape[0]
    scale = scale.reshape(m).contiguous()
    device_ctx = torch.cuda.device(codes.device) if codes.is_cuda else contextlib.nullcontext()
    if m == 0:
        return torch.empty((0, n), dtype=out_dtype, device=codes.device)
    with device_ctx:
        if m <= DECODE_MAX_M:
            acc = torch.zeros((m, n), dtype=torch.int32, device=codes.device)
            min_block_r = min(c.kwargs["BLOCK_R"] for c in _GEMV_CONFIGS)
            split_k = _decode_split_k(triton.cdiv(rows, min_block_r), k, codes.device)
            grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]), split_k)
            _ternary_gemv_splitk_kernel[grid](
                codes, packed, acc, m, n, k, rows, codes.stride(0), packed.stride(0), acc.stride(0),
                SPLIT_K=split_k, BLOCK_M=DECODE_MAX_M,
            )
            return (acc.float() * scale[:, None]).to(out_dtype)
        y = torch.empty((m, n), dtype=out_dtype, device=codes.device)
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(rows, meta["BLOCK_R"]))
        _ternary_gemm_kernel[grid](
            codes, packed, scale, y, m, n, k, rows, codes.stride(0), packed.stride(0), y.stride(0)
        )
        return y
