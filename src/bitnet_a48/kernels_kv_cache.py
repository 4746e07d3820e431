"""Quantise-and-pack and unpack-and-dequantise of KV-cache groups (BitNet a4.8, arXiv 2411.04965, section 2.4).

One *group* is the ``head_dim`` values of one (token, head). Each group gets one absmax scale and unsigned ``b``-bit
codes on a symmetric grid of ``2^b`` levels without zero (all levels used, so 3 bits give 8 levels)::

    mid = (2^b - 1) / 2                        # 3.5 for 3 bits, 7.5 for 4 bits
    s   = max(max|x| / mid, SCALE_MIN) · (1 + SCALE_BUMP[dtype])    rounded to the scale dtype
    c   = clamp(floor(x / s + mid + 0.5), 0, 2^b - 1)
    x̂   = (c - mid) · s                        |x - x̂| <= s / 2

``SCALE_BUMP`` (one unit of the scale dtype's spacing) makes the stored scale never smaller than ``max|x| / mid``,
so no value clips and the error bound of half a step holds with the scale actually stored. ``floor(y + 0.5)``
(round half up) is used instead of torch's half-to-even so that torch and Triton give the same codes.

Packed layout (``b`` in {2, 3, 4, 8}): 8 consecutive codes of a group form a little-endian word of ``8b`` bits,
code ``i`` in bits ``b·i .. b·i+b-1``, stored as ``b`` bytes (byte ``j`` = bits ``8j .. 8j+7``). So a group of
``D`` values takes ``D·b/8`` bytes; 3 bits: 8 codes in 3 bytes, no padding; ``D`` must be a multiple of 8.

=========================  =====================================  ==========================================
tensor                     shape                                  dtype
=========================  =====================================  ==========================================
x (input)                  (N, D) or (..., D)                     fp32 / fp16 / bf16
packed codes               (..., D·b/8)                           uint8
scale                      (...)                                  ``scale_dtype`` (fp16 default)
=========================  =====================================  ==========================================

Torch references: ``quantize_pack_torch`` and ``unpack_dequantize_torch``; Triton: ``_kv_quantize_pack_kernel`` and
``_kv_unpack_dequantize_kernel`` (one program per group). ``quantize_pack`` / ``unpack_dequantize`` choose with
``impl="auto" | "torch" | "triton"``; ``"auto"`` takes Triton for CUDA tensors when Triton is installed, else torch.
"""

from __future__ import annotations

import torch

try:  # Triton is optional: the package and a remote-code folder must import without it
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

SUPPORTED_BITS = (2, 3, 4, 8)
CODES_PER_WORD = 8
# Smallest scale: fp16's smallest normal number; groups whose absmax is below ``SCALE_MIN · mid`` share it.
SCALE_MIN = 2.0**-14
# One unit of relative spacing of each scale dtype (round-to-nearest moves a value by at most half of it).
SCALE_BUMP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 0.0}
SCALE_MAX = {torch.float16: 65504.0 / (1 + 2.0**-10), torch.bfloat16: 3.0e38, torch.float32: 3.0e38}
IMPLS = ("auto", "torch", "triton")


def grid_mid(bits: int) -> float:
    """Centre of the unsigned code range, ``(2^b - 1) / 2``: the value 0 lies between two codes."""
    return (2**bits - 1) / 2


def packed_dim(head_dim: int, bits: int) -> int:
    """Bytes of one packed group of ``head_dim`` codes."""
    return head_dim * bits // CODES_PER_WORD


def check_bits(bits: int) -> None:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"KV-cache bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def _check_group(x: torch.Tensor, bits: int, scale_dtype: torch.dtype) -> None:
    check_bits(bits)
    if not x.is_floating_point():
        raise ValueError(f"expected a floating-point tensor to quantise, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0 or x.shape[-1] % CODES_PER_WORD:
        raise ValueError(f"the last dimension (head_dim) must be a positive multiple of 8, got shape {tuple(x.shape)}")
    if scale_dtype not in SCALE_BUMP:
        raise ValueError(f"scale_dtype must be one of {list(SCALE_BUMP)}, got {scale_dtype}")


def _resolve_impl(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if HAS_TRITON and device.type == "cuda" else "torch"
    if impl == "triton" and not HAS_TRITON:
        raise ImportError("impl='triton' needs the `triton` package (pip install triton)")
    return impl


# ----------------------------------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------------------------------


def compute_scale(x: torch.Tensor, bits: int, scale_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Per-group absmax scale ``s`` (shape ``x.shape[:-1]``, ``scale_dtype``), never below ``max|x| / mid``."""
    absmax = x.float().abs().amax(dim=-1)
    s = torch.clamp(absmax / grid_mid(bits), min=SCALE_MIN) * (1.0 + SCALE_BUMP[scale_dtype])
    return s.clamp(max=SCALE_MAX[scale_dtype]).to(scale_dtype)


def quantize_codes_torch(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``clamp(floor(x / s + mid + 0.5), 0, 2^b - 1)`` as uint8, same shape as ``x``."""
    y = x.float() / scale.float().unsqueeze(-1) + (grid_mid(bits) + 0.5)
    return torch.floor(y).clamp(0, 2**bits - 1).to(torch.uint8)


def pack_codes_torch(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., D) uint8 codes -> (..., D·b/8) uint8 bytes, 8 codes per little-endian word of ``b`` bytes."""
    check_bits(bits)
    if bits == 8:
        return codes.to(torch.uint8)
    *lead, d = codes.shape
    c = codes.reshape(*lead, d // CODES_PER_WORD, CODES_PER_WORD).to(torch.int64)
    shifts = torch.arange(CODES_PER_WORD, device=codes.device, dtype=torch.int64) * bits
    word = (c << shifts).sum(dim=-1, keepdim=True)  # (..., D/8, 1), < 2^(8b)
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    packed = (word >> byte_shifts) & 0xFF  # (..., D/8, b)
    return packed.to(torch.uint8).reshape(*lead, d * bits // CODES_PER_WORD)


def unpack_codes_torch(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_codes_torch``: (..., D·b/8) uint8 -> (..., D) uint8 codes."""
    check_bits(bits)
    if bits == 8:
        return packed
    *lead, nbytes = packed.shape
    if bits in (2, 4):  # codes never straddle a byte: byte j holds codes j·8/b .. (j+1)·8/b - 1
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * bits
        codes = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)  # (..., nbytes, 8/b)
        return codes.reshape(*lead, nbytes * per_byte)
    # 3 bits: a 24-bit word of 3 bytes holds 8 codes
    b = packed.reshape(*lead, nbytes // 3, 3).to(torch.int32)
    word = b[..., 2].bitwise_left_shift(16).bitwise_or_(b[..., 1].bitwise_left_shift(8)).bitwise_or_(b[..., 0])
    shifts = torch.arange(CODES_PER_WORD, device=packed.device, dtype=torch.int32) * 3
    codes = (word.unsqueeze(-1) >> shifts).bitwise_and_(0x7)  # (..., D/8, 8)
    return codes.to(torch.uint8).reshape(*lead, nbytes // 3 * CODES_PER_WORD)


_LUTS: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _centered_lut(bits: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Table from a packed index to its codes minus mid: 12-bit halves of a 3-bit word (4 codes), else bytes."""
    key = (bits, dtype, device)
    if key not in _LUTS:
        if bits == 3:
            idx = torch.arange(4096, dtype=torch.int32)
            codes = (idx.unsqueeze(-1) >> (torch.arange(4, dtype=torch.int32) * 3)) & 0x7  # (4096, 4)
        else:
            codes = unpack_codes_torch(torch.arange(256, dtype=torch.uint8).unsqueeze(-1), bits)  # (256, 8/b)
        _LUTS[key] = (codes.float() - grid_mid(bits)).to(dtype).to(device)
    return _LUTS[key]


def unpack_centered_torch(packed: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """(..., D·b/8) uint8 -> (..., D) codes minus mid in ``dtype`` (exact), by table look-up: one pass over the
    output instead of shift, mask, convert and subtract; the attention applies the scales to its scores instead."""
    check_bits(bits)
    *lead, nbytes = packed.shape
    lut = _centered_lut(bits, dtype, packed.device)
    if bits != 3:
        return lut[packed.long()].reshape(*lead, nbytes * CODES_PER_WORD // bits)
    b = packed.reshape(*lead, nbytes // 3, 3).to(torch.int32)
    word = b[..., 2].bitwise_left_shift(16).bitwise_or_(b[..., 1].bitwise_left_shift(8)).bitwise_or_(b[..., 0])
    halves = torch.stack([word & 0xFFF, word >> 12], dim=-1)  # (..., D/8, 2)
    return lut[halves].reshape(*lead, nbytes // 3 * CODES_PER_WORD)


def quantize_pack_torch(
    x: torch.Tensor, bits: int, scale_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference quantise-and-pack: (..., D) float -> packed (..., D·b/8) uint8 and scale (...) ``scale_dtype``."""
    _check_group(x, bits, scale_dtype)
    scale = compute_scale(x, bits, scale_dtype)
    return pack_codes_torch(quantize_codes_torch(x, scale, bits), bits), scale


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """``(c - mid) · s`` computed in fp32 (as the Triton kernel does), returned in ``dtype``."""
    out = codes.float().sub_(grid_mid(bits)).mul_(scale.float().unsqueeze(-1))  # in place: one fp32 buffer
    return out if dtype == torch.float32 else out.to(dtype)


def unpack_dequantize_torch(
    packed: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Reference unpack-and-dequantise: packed (..., D·b/8) uint8, scale (...) -> (..., D) ``dtype``."""
    return dequantize_codes(unpack_codes_torch(packed, bits), scale, bits, dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels: one program per group, the group viewed as a (D/8, 8) tile of codes = (D/8, b) tile of bytes
# ----------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _round_to(x, KIND: tl.constexpr):
        """fp32 ``x`` rounded to nearest even at bf16 precision when KIND == 2 (then the cast to bf16 is exact):
        the interpreter's fp32 -> bf16 cast truncates, compiled Triton rounds; this makes both equal torch."""
        if KIND == 2:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
        return x

    @triton.jit
    def _kv_quantize_pack_kernel(
        # pointers
        x_ptr,
        packed_ptr,
        scale_ptr,
        # strides (rows of x and of packed are contiguous groups)
        stride_x,
        stride_p,
        # scalars
        mid,
        scale_min,
        scale_max,
        bump,
        # constants
        D: tl.constexpr,
        BITS: tl.constexpr,
        WORDS: tl.constexpr,  # next power of two of D / 8
        SCALE_KIND: tl.constexpr,  # 0 fp32, 1 fp16, 2 bf16
    ):
        row = tl.program_id(0)
        w = tl.arange(0, WORDS)[:, None]  # (WORDS, 1) word index
        i = tl.arange(0, 8)[None, :]  # (1, 8) code index in a word
        in_row = (w * 8 + i) < D
        x = tl.load(x_ptr + row * stride_x + w * 8 + i, mask=in_row, other=0.0).to(tl.float32)
        absmax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
        s = tl.maximum(absmax / mid, scale_min) * (1.0 + bump)
        s = tl.minimum(s, scale_max)
        s = _round_to(s, SCALE_KIND).to(scale_ptr.dtype.element_ty)  # the stored value quantises
        tl.store(scale_ptr + row, s)
        y = x / s.to(tl.float32) + (mid + 0.5)
        c = tl.minimum(tl.maximum(tl.floor(y), 0.0), 2 * mid).to(tl.int64)  # (WORDS, 8)
        word = tl.sum(c << (i.to(tl.int64) * BITS), axis=1)  # (WORDS,)
        j = tl.arange(0, 8)[None, :]  # byte index in a word; BITS <= 8 of them are used
        byte = (word[:, None] >> (j.to(tl.int64) * 8)) & 0xFF
        tl.store(packed_ptr + row * stride_p + w * BITS + j, byte.to(tl.uint8), mask=(j < BITS) & (w * 8 < D))

    @triton.jit
    def _kv_unpack_dequantize_kernel(
        # pointers
        packed_ptr,
        scale_ptr,
        out_ptr,
        # strides
        stride_p,
        stride_o,
        # scalars
        mid,
        # constants
        D: tl.constexpr,
        BITS: tl.constexpr,
        WORDS: tl.constexpr,
        OUT_KIND: tl.constexpr,
    ):
        row = tl.program_id(0)
        w = tl.arange(0, WORDS)[:, None]
        j = tl.arange(0, 8)[None, :]
        in_word = (j < BITS) & (w * 8 < D)
        byte = tl.load(packed_ptr + row * stride_p + w * BITS + j, mask=in_word, other=0).to(tl.int64)
        word = tl.sum(byte << (j.to(tl.int64) * 8), axis=1)  # (WORDS,)
        i = tl.arange(0, 8)[None, :]
        c = (word[:, None] >> (i.to(tl.int64) * BITS)) & ((1 << BITS) - 1)  # (WORDS, 8)
        s = tl.load(scale_ptr + row).to(tl.float32)
        out = (c.to(tl.float32) - mid) * s
        out = _round_to(out, OUT_KIND).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * stride_o + w * 8 + i, out, mask=(w * 8 + i) < D)


_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _words(d: int) -> int:
    return max(1, triton.next_power_of_2(d // CODES_PER_WORD))


def quantize_pack_triton(
    x: torch.Tensor, bits: int, scale_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton quantise-and-pack; same contract and the same codes as ``quantize_pack_torch``."""
    _check_group(x, bits, scale_dtype)
    if not HAS_TRITON:
        raise ImportError("quantize_pack_triton needs the `triton` package")
    *lead, d = x.shape
    x2 = x.reshape(-1, d).contiguous()
    n = x2.shape[0]
    packed = torch.empty((n, packed_dim(d, bits)), dtype=torch.uint8, device=x.device)
    scale = torch.empty((n,), dtype=scale_dtype, device=x.device)
    if n:
        _kv_quantize_pack_kernel[(n,)](
            x2, packed, scale, x2.stride(0), packed.stride(0),
            grid_mid(bits), SCALE_MIN, SCALE_MAX[scale_dtype], SCALE_BUMP[scale_dtype],
            D=d, BITS=bits, WORDS=_words(d), SCALE_KIND=_KIND[scale_dtype],
        )  # fmt: skip
    return packed.reshape(*lead, -1), scale.reshape(lead)


def unpack_dequantize_triton(
    packed: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Triton unpack-and-dequantise; same contract as ``unpack_dequantize_torch``."""
    check_bits(bits)
    if not HAS_TRITON:
        raise ImportError("unpack_dequantize_triton needs the `triton` package")
    *lead, nbytes = packed.shape
    d = nbytes * CODES_PER_WORD // bits
    p2 = packed.reshape(-1, nbytes).contiguous()
    s2 = scale.reshape(-1).contiguous()
    n = p2.shape[0]
    out = torch.empty((n, d), dtype=dtype, device=packed.device)
    if n:
        _kv_unpack_dequantize_kernel[(n,)](
            p2, s2, out, p2.stride(0), out.stride(0), grid_mid(bits),
            D=d, BITS=bits, WORDS=_words(d), OUT_KIND=_KIND.get(dtype, 0),
        )  # fmt: skip
    return out.reshape(*lead, d)


def _check_packed(packed: torch.Tensor, scale: torch.Tensor, bits: int) -> None:
    check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed codes must be uint8, got {packed.dtype}")
    if packed.dim() < 1 or packed.shape[-1] % bits:
        raise ValueError(f"the last dimension of packed codes must be a multiple of bits={bits}, got {packed.shape}")
    if tuple(scale.shape) != tuple(packed.shape[:-1]):
        raise ValueError(f"scale shape {tuple(scale.shape)} must equal packed.shape[:-1] {tuple(packed.shape[:-1])}")


def quantize_pack(
    x: torch.Tensor, bits: int, scale_dtype: torch.dtype = torch.float16, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise groups of the last dimension of ``x`` to ``bits`` and pack them (see the module docstring)."""
    if _resolve_impl(impl, x.device) == "triton":
        return quantize_pack_triton(x, bits, scale_dtype)
    return quantize_pack_torch(x, bits, scale_dtype)


def unpack_dequantize(
    packed: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32, impl: str = "auto"
) -> torch.Tensor:
    """Unpack ``bits``-bit codes and dequantise them with their group scale, ``(c - mid) · s``, in ``dtype``."""
    _check_packed(packed, scale, bits)
    if _resolve_impl(impl, packed.device) == "triton":
        return unpack_dequantize_triton(packed, scale, bits, dtype)
    return unpack_dequantize_torch(packed, scale, bits, dtype)
