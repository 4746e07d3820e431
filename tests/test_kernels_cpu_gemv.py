"""The fused CPU GEMV (``kernels_cpu_gemv``) against exact integer references, and its dispatch in PackedBitLinear."""

from __future__ import annotations

import pytest
import torch

from bitnet_a48 import kernels_cpu_gemv as kcg
from bitnet_a48 import packed_bitlinear
from bitnet_a48.bitlinear import BitLinear
from bitnet_a48.packed_bitlinear import PackedBitLinear, _packed_int8_matmul, ternary_matmul_torch
from bitnet_a48.packing import pack_ternary
from bitnet_a48.quantization import ROLES

needs_compiler = pytest.mark.skipif(not kcg.cpu_compiler_available(), reason="no C++ compiler for inductor")
pytestmark = needs_compiler


def _ternary(out_features: int, in_features: int) -> torch.Tensor:
    return torch.randint(-1, 2, (out_features, in_features), dtype=torch.int8)


def _ones(m: int) -> torch.Tensor:
    return torch.ones(m, 1)


@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("n, k", [(45, 300), (64, 17), (5, 1), (8, 4100)])
def test_gemv_equals_integer_reference(m: int, n: int, k: int) -> None:
    codes = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    w = _ternary(n, k)
    packed = pack_ternary(w)
    got = kcg.ternary_gemv_cpu(codes, _ones(m), packed, n)
    want = (codes.int() @ w.int().t()).float()  # exact in int32, then exactly representable in fp32
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert torch.equal(got, want)
    assert torch.equal(_packed_int8_matmul(codes, packed, n).float(), want)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_gemv_epilogue_equals_the_torch_reference_bit_for_bit(out_dtype: torch.dtype) -> None:
    codes = torch.randint(-128, 128, (2, 300), dtype=torch.int8)
    packed = pack_ternary(_ternary(45, 300))
    scale = torch.rand(2, 1) * 1e-3 + 1e-5
    got = kcg.ternary_gemv_cpu(codes, scale, packed, 45, out_dtype)
    assert got.dtype == out_dtype
    assert torch.equal(got, ternary_matmul_torch(codes, scale, packed, 45, out_dtype))


def test_k_pieces_split_k_into_equal_pieces_of_at_most_k_slice() -> None:
    assert kcg._k_pieces(2560) == (1, 2560)
    assert kcg._k_pieces(4096) == (1, 4096)
    assert kcg._k_pieces(6912) == (2, 3456)  # 2B-4T down_proj
    assert kcg._k_pieces(11008) == (4, 2752)  # 7B down_proj
    assert kcg._k_pieces(4099) is None  # prime: pieces of one column; such layers take _int_mm
    assert kcg.gemv_supported(6912) and not kcg.gemv_supported(4099) and not kcg.gemv_supported(65536)


def test_gemv_sums_over_several_k_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kcg, "K_SLICE", 64)
    monkeypatch.setattr(kcg, "MIN_PIECE", 16)  # 300 = 5 pieces of 60
    codes = torch.randint(-128, 128, (2, 300), dtype=torch.int8)
    w = _ternary(45, 300)
    got = kcg.ternary_gemv_cpu(codes, _ones(2), pack_ternary(w), 45)
    assert torch.equal(got, (codes.int() @ w.int().t()).float())


def test_gemv_exact_at_the_largest_k() -> None:
    # Worst case of the fp32 accumulation: every product 2·(-128) (field 2) over K = GEMV_MAX_K terms.
    k = kcg.GEMV_MAX_K
    codes = torch.full((1, k), -128, dtype=torch.int8)
    w = torch.ones(4, k, dtype=torch.int8)
    w[1] = -1
    got = kcg.ternary_gemv_cpu(codes, _ones(1), pack_ternary(w), 4)
    assert torch.equal(got, torch.tensor([[-128.0 * k, 128.0 * k, -128.0 * k, -128.0 * k]]))


def test_gemv_rejects_bad_inputs() -> None:
    packed = pack_ternary(_ternary(8, 16))
    codes = torch.zeros(1, 16, dtype=torch.int8)
    with pytest.raises(TypeError, match="must be int8"):
        kcg.ternary_gemv_cpu(codes.float(), _ones(1), packed, 8)
    with pytest.raises(ValueError, match=r"must have shape \(2, 15\)"):
        kcg.ternary_gemv_cpu(torch.zeros(1, 15, dtype=torch.int8), _ones(1), packed, 8)
    with pytest.raises(ValueError, match=r"must have shape \(3, 16\)"):
        kcg.ternary_gemv_cpu(codes, _ones(1), packed, 9)
    with pytest.raises(ValueError, match="one value per row"):
        kcg.ternary_gemv_cpu(codes, _ones(2), packed, 8)
    with pytest.raises(ValueError, match="one value per row"):
        kcg.ternary_gemv_cpu(codes, _ones(1).double(), packed, 8)
    for k in (4099, 65536):  # a prime K; beyond the exactness bound
        with pytest.raises(ValueError, match=f"K = {k}"):
            kcg.ternary_gemv_cpu(torch.zeros(1, k, dtype=torch.int8), _ones(1), torch.zeros(1, k, dtype=torch.uint8), 4)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("quant_mode", ["a4.8", "a8"])
def test_inductor_impl_equals_torch_impl_bit_for_bit(role: str, quant_mode: str) -> None:
    latent = BitLinear(300, 45, role=role, quant_mode=quant_mode)
    fused = PackedBitLinear.from_bitlinear(latent, impl="inductor")
    eager = PackedBitLinear.from_bitlinear(latent, impl="torch")
    for m in (1, 2, 7):  # fused GEMV for M ≤ 2, _int_mm above
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(m, 300, dtype=dtype)
            got, want = fused(x), eager(x)
            assert got.dtype == dtype and torch.equal(got, want)


def test_dispatch_uses_the_fused_gemv_for_cpu_decode_only(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []

    def counting(codes: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(tuple(codes.shape))
        return kcg.ternary_gemv_cpu(codes, *args)

    monkeypatch.setattr(packed_bitlinear, "ternary_gemv_cpu", counting)
    layer = PackedBitLinear.from_bitlinear(BitLinear(32, 12, role="qkv"))  # impl "auto"
    layer(torch.randn(1, 1, 32))
    layer(torch.randn(2, 32))
    layer(torch.randn(3, 32))  # above GEMV_MAX_ROWS: _int_mm
    assert calls == [(1, 32), (2, 32)]
    layer.set_cpu_layout("int8")  # the int8 layout is a bare _int_mm
    layer(torch.randn(1, 32))
    layer.set_cpu_layout("packed")
    layer.set_impl("torch")
    layer(torch.randn(1, 32))
    assert calls == [(1, 32), (2, 32)]


def test_inductor_impl_needs_a_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packed_bitlinear, "cpu_compiler_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler"):
        PackedBitLinear(16, 8, role="qkv", impl="inductor")
    layer = PackedBitLinear(16, 8, role="qkv")  # "auto" then takes the torch path
    assert not layer._use_cpu_gemv(torch.zeros(1, 16))


def test_packed_model_decodes_the_same_with_the_fused_gemv(tiny_config_kwargs: dict) -> None:
    from bitnet_a48 import create_model

    model = create_model(**tiny_config_kwargs, quant_mode="a8").eval().pack()
    ids = torch.randint(3, 101, (1, 6))

    def run(impl: str) -> tuple[torch.Tensor, torch.Tensor]:
        for layer in model.projections().values():
            layer.set_impl(impl)
        with torch.inference_mode():  # generate's decode steps are M = 1: the fused GEMV under "inductor"
            tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
            logits = model(tokens[:, -1:]).logits
        return tokens, logits

    fused, eager = run("inductor"), run("torch")
    assert torch.equal(fused[0], eager[0]) and torch.equal(fused[1], eager[1])
    compiled = torch.compile(model)
    for layer in model.projections().values():
        layer.set_impl("inductor")
    with torch.no_grad():
        assert torch.allclose(compiled(ids[:, :1]).logits, model(ids[:, :1]).logits, atol=1e-5)
