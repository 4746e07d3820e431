"""Quantise-and-pack / unpack of KV groups: torch reference against Triton (interpreter on CPU), layout and bounds."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnet_a48 import kernels_kv_cache as kk

BITS = (2, 3, 4, 8)
needs_triton = pytest.mark.skipif(not kk.HAS_TRITON, reason="triton not installed")


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(1, 8), (7, 24), (3, 5, 128), (300, 16)])
def test_pack_unpack_codes_round_trip_exact(bits: int, shape: tuple[int, ...]) -> None:
    codes = torch.randint(0, 2**bits, shape, dtype=torch.uint8)
    packed = kk.pack_codes_torch(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], shape[-1] * bits // 8)
    assert torch.equal(kk.unpack_codes_torch(packed, bits), codes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_table_unpack_of_centred_codes_is_exact(bits: int, dtype: torch.dtype) -> None:
    codes = torch.randint(0, 2**bits, (5, 3, 128), dtype=torch.uint8)
    centred = kk.unpack_centered_torch(kk.pack_codes_torch(codes, bits), bits, dtype)
    assert centred.dtype == dtype and torch.equal(centred.float(), codes.float() - kk.grid_mid(bits))


def test_three_bit_layout_is_eight_codes_in_three_little_endian_bytes() -> None:
    codes = torch.arange(8, dtype=torch.uint8)  # code i at bits 3i..3i+2 of a 24-bit word
    word = sum(i << (3 * i) for i in range(8))
    expected = torch.tensor([word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF], dtype=torch.uint8)
    assert torch.equal(kk.pack_codes_torch(codes, 3), expected)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quantisation_error_at_most_half_a_step(bits: int, scale_dtype: torch.dtype) -> None:
    x = torch.randn(64, 128) * torch.logspace(-3, 2, 64).unsqueeze(-1)
    x[0] = 0.0  # an all-zero group
    x[1, 5] = 40.0  # an outlier
    packed, scale = kk.quantize_pack_torch(x, bits, scale_dtype)
    assert scale.dtype == scale_dtype and scale.shape == (64,)
    x_hat = kk.unpack_dequantize_torch(packed, scale, bits)
    err = (x - x_hat).abs() / scale.float().unsqueeze(-1)
    assert err.max() <= 0.5 + 1e-5, f"max error {err.max():.6f} steps, mean {err.mean():.6f}"
    # the grid is not wasted: the step is no larger than needed by more than the scale dtype's rounding
    absmax = x.abs().amax(-1)
    step_needed = (absmax / kk.grid_mid(bits)).clamp(min=kk.SCALE_MIN)
    assert (scale.float() / step_needed).max() <= (1 + 2 * kk.SCALE_BUMP[scale_dtype]) + 1e-6


@settings(max_examples=30, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    rows=st.integers(1, 5),
    words=st.integers(1, 6),
    log_scale=st.floats(-4, 3),
    seed=st.integers(0, 2**16),
)
def test_error_bound_property(bits: int, rows: int, words: int, log_scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 8 * words, generator=g) * 10**log_scale
    packed, scale = kk.quantize_pack_torch(x, bits)
    codes = kk.unpack_codes_torch(packed, bits)
    assert int(codes.max()) <= 2**bits - 1
    err = (x - kk.dequantize_codes(codes, scale, bits, torch.float32)).abs() / scale.float().unsqueeze(-1)
    assert err.max() <= 0.5 + 1e-5


@needs_triton
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(1, 8), (7, 24), (2, 3, 128), (300, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_torch_exactly(bits: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = (torch.randn(shape) * 3).to(dtype)
    p_ref, s_ref = kk.quantize_pack(x, bits, impl="torch")
    p_tri, s_tri = kk.quantize_pack(x, bits, impl="triton")
    assert torch.equal(s_tri, s_ref)
    diff = (p_tri != p_ref).sum().item()
    assert diff == 0, f"{diff} packed bytes differ"
    y_ref = kk.unpack_dequantize(p_ref, s_ref, bits, dtype, impl="torch")
    y_tri = kk.unpack_dequantize(p_ref, s_ref, bits, dtype, impl="triton")
    assert torch.equal(y_tri, y_ref), f"max diff {(y_tri.float() - y_ref.float()).abs().max()}"


@needs_triton
def test_triton_on_strided_input() -> None:
    x = torch.randn(4, 2, 9, 32).transpose(1, 2)  # non-contiguous (4, 9, 2, 32)
    assert torch.equal(kk.quantize_pack(x, 3, impl="triton")[0], kk.quantize_pack(x, 3, impl="torch")[0])


def test_auto_uses_torch_on_cpu() -> None:
    assert kk._resolve_impl("auto", torch.device("cpu")) == "torch"


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: kk.quantize_pack(torch.randn(2, 16), 5), "bits must be one of"),
        (lambda: kk.quantize_pack(torch.randn(2, 16), True), "bits must be one of"),
        (lambda: kk.quantize_pack(torch.randn(2, 12), 3), "multiple of 8"),
        (lambda: kk.quantize_pack(torch.ones(2, 16, dtype=torch.int32), 3), "floating-point"),
        (lambda: kk.quantize_pack(torch.randn(2, 16), 3, torch.float64), "scale_dtype"),
        (lambda: kk.quantize_pack(torch.randn(2, 16), 3, impl="cuda"), "impl must be one of"),
        (lambda: kk.unpack_dequantize(torch.zeros(2, 6, dtype=torch.uint8), torch.ones(3), 3), "scale shape"),
        (lambda: kk.unpack_dequantize(torch.zeros(2, 5, dtype=torch.uint8), torch.ones(2), 3), "multiple of bits"),
        (lambda: kk.unpack_dequantize(torch.zeros(2, 6), torch.ones(2), 3), "uint8"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
