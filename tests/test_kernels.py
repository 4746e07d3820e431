"""Packed ternary inference: Triton kernels (interpreter on CPU) and the torch ``_int_mm`` path against their torch
references, and PackedBitLinear against the latent BitLinear."""

import pytest
import torch
from torch import nn

from bitnet_a48 import kernels_act_quant as kaq
from bitnet_a48 import kernels_ternary_matmul as ktm
from bitnet_a48.bitlinear import BitLinear
from bitnet_a48.packed_bitlinear import PackedBitLinear, ternary_matmul_torch
from bitnet_a48.packing import pack_ternary, unpack_ternary
from bitnet_a48.quantization import QUANT_MODES, ROLES, quantize_act, topk_count

needs_triton = pytest.mark.skipif(not ktm.HAS_TRITON, reason="triton not installed")
M_VALUES = (1, 7, 128, 300)


def _diff_message(got: torch.Tensor, want: torch.Tensor) -> str:
    diff = (got.float() - want.float()).abs()
    return f"max diff {diff.max().item():.3e}, mean diff {diff.mean().item():.3e}, max |ref| {want.abs().max():.3e}"


def _assert_close_rel(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    """Relative error of the whole tensor (norm of the difference over norm of the reference) below ``rel``."""
    err = ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30)).item()
    assert err < rel, f"relative error {err:.3e} >= {rel:.1e}; {_diff_message(got, want)}"


def _ternary(out_features: int, in_features: int) -> torch.Tensor:
    return torch.randint(-1, 2, (out_features, in_features), dtype=torch.int8)


# ---------------------------------------------------------------------------------------------------------
# torch._int_mm path (the reference of the matmul kernels)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("n", [45, 64])
def test_int_mm_path_equals_integer_reference(m: int, n: int) -> None:
    k = 300
    codes = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    w = _ternary(n, k)
    packed = pack_ternary(w)
    acc_ref = codes.int() @ w.int().t()  # exact in int32
    ones = torch.ones(m, 1)
    for cache in (None, w):  # packed layout (planes + row sum) and int8 layout
        got = ternary_matmul_torch(codes, ones, packed, n, weight_int8=cache)
        assert torch.equal(got, acc_ref.float()), _diff_message(got, acc_ref)
    scale = torch.rand(m, 1) + 0.1
    got = ternary_matmul_torch(codes, scale, packed, n)
    assert torch.equal(got, acc_ref.float() * scale)  # same fp32 epilogue, bit for bit


@pytest.mark.parametrize("m, k, n", [(1, 1, 5), (3, 1, 64), (2, 2, 3), (1, 17, 2)])
def test_int_mm_path_exact_on_tiny_k(m: int, k: int, n: int) -> None:
    # torch 2.13's CPU _int_mm is wrong for K = 1 (N >= 2); int8_matmul takes an outer product there.
    codes = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    w = _ternary(n, k)
    for cache in (None, w):
        got = ternary_matmul_torch(codes, torch.ones(m, 1), pack_ternary(w), n, weight_int8=cache)
        assert torch.equal(got, (codes.int() @ w.int().t()).float())


# ---------------------------------------------------------------------------------------------------------
# Activation quantisation kernels
# ---------------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("name", ["int8", "topk_int8"])
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_quant_kernel_absmax_codes_and_scales_exact(name: str, m: int, dtype: torch.dtype) -> None:
    k = 300 if name == "topk_int8" else 700  # not multiples of the block (256 under the interpreter)
    x = (torch.randn(m, k) * 3).to(dtype)
    if dtype == torch.bfloat16 and name == "topk_int8":
        # random bf16 rows tie at the threshold; distinct magnitudes (integers / 16, exact in bf16) do not
        sign = torch.randint(0, 2, (m, k)) * 2 - 1
        x = (torch.stack([torch.randperm(k) + 1 for _ in range(m)]) * sign / 16).to(dtype)
    codes, scale = kaq.quantize_act_triton(x, name, 0.5)
    ref_codes, ref_scale = quantize_act(x, name, 0.5)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (m, 1)
    assert torch.equal(codes, ref_codes), f"{(codes != ref_codes).sum().item()} codes differ"
    assert torch.equal(scale, ref_scale), _diff_message(scale, ref_scale)
    if name == "topk_int8":
        kept = (x != 0) & (codes != 0)
        assert int(kept.sum(-1).max()) <= topk_count(k, 0.5)


@needs_triton
@pytest.mark.parametrize("m", M_VALUES)
def test_act_quant_kernel_int4_codes_exact_up_to_the_reduction_order_of_beta(m: int) -> None:
    k = 700
    x = torch.randn(m, k) * 2
    codes, scale = kaq.quantize_act_triton(x, "int4")
    ref_codes, ref_scale = quantize_act(x, "int4")
    # β = Σ|x| / K: the kernel's fp32 sum may differ from torch's in the last bits (order of the reduction).
    rel = ((scale - ref_scale).abs() / ref_scale).max().item()
    assert rel < 1e-6, _diff_message(scale, ref_scale)
    same_scale = (scale == ref_scale).flatten()
    assert torch.equal(codes[same_scale], ref_codes[same_scale])
    # Where β differs, a code may differ by one only if its value sat at a rounding tie within that error.
    differ = codes != ref_codes
    if differ.any():
        y = (x / ref_scale)[differ]
        assert int((codes.int() - ref_codes.int()).abs().max()) == 1
        assert float(((y - y.floor()) - 0.5).abs().max()) < 1e-4


@needs_triton
def test_act_quant_kernel_topk_keeps_ties_at_the_threshold() -> None:
    x = torch.tensor([[4.0, -1.0, 1.0, 0.5, 1.0, 0.25]])  # k = 3: 4 and the three tied |x| = 1 survive
    codes, _ = kaq.quantize_act_triton(x, "topk_int8", 0.5)
    assert (codes != 0).flatten().tolist() == [True, True, True, False, True, False]


@needs_triton
def test_act_quant_kernel_keeps_leading_shape_and_zero_rows() -> None:
    x = torch.randn(2, 3, 40)
    x[0, 1] = 0.0
    codes, scale = kaq.quantize_act_triton(x, "int8")
    ref_codes, ref_scale = quantize_act(x, "int8")
    assert codes.shape == (2, 3, 40) and scale.shape == (2, 3, 1)
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)


@needs_triton
def test_act_quant_launcher_rejects_bad_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TypeError, match="fp32, fp16 or bf16"):
        kaq.quantize_act_triton(torch.ones(2, 4, dtype=torch.int32), "int8")
    with pytest.raises(ValueError, match="fp4 runs in torch"):
        kaq.quantize_act_triton(torch.ones(2, 4), "fp4")
    monkeypatch.setattr(kaq, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kaq.quantize_act_triton(torch.ones(2, 4), "int8")


# ---------------------------------------------------------------------------------------------------------
# Ternary matmul kernels (decode split-K for M <= 16, GEMM above)
# ---------------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("n", [45, 64])
def test_ternary_matmul_kernel_integer_sums_exact(m: int, n: int) -> None:
    k = 300  # not a multiple of BLOCK_K (64 under the interpreter)
    codes = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    w = _ternary(n, k)
    acc_ref = codes.int() @ w.int().t()
    got = ktm.ternary_matmul_triton(codes, torch.ones(m), pack_ternary(w), n)  # |acc| < 2^24: exact in fp32
    assert torch.equal(got, acc_ref.float()), _diff_message(got, acc_ref)


@needs_triton
@pytest.mark.parametrize("m", [3, 40])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_ternary_matmul_kernel_equals_torch_reference_with_scales(m: int, out_dtype: torch.dtype) -> None:
    k, n = 200, 37
    codes = torch.randint(-8, 8, (m, k), dtype=torch.int8)
    packed = pack_ternary(_ternary(n, k))
    scale = torch.rand(m, 1) * 0.01
    got = ktm.ternary_matmul_triton(codes, scale, packed, n, out_dtype)
    want = ternary_matmul_torch(codes, scale, packed, n, out_dtype)
    assert got.dtype == out_dtype
    if out_dtype == torch.float32 or not ktm.INTERPRET or m <= ktm.DECODE_MAX_M:
        assert torch.equal(got, want), _diff_message(got, want)  # same float(acc) · s, bit for bit
    else:  # the interpreter's fp32 -> bf16 cast in the GEMM epilogue truncates: one bf16 ulp at most
        ulp = want.float().abs() * 2.0**-7
        assert bool(((got.float() - want.float()).abs() <= ulp).all()), _diff_message(got, want)


@needs_triton
def test_ternary_matmul_launcher_rejects_bad_inputs() -> None:
    codes = torch.zeros(4, 16, dtype=torch.int8)
    packed = pack_ternary(_ternary(8, 16))
    with pytest.raises(TypeError, match="int8"):
        ktm.ternary_matmul_triton(codes.float(), torch.ones(4), packed, 8)
    with pytest.raises(ValueError, match=r"must have shape \(3, 16\)"):
        ktm.ternary_matmul_triton(codes, torch.ones(4), packed, 12)
    with pytest.raises(ValueError, match="one value per row"):
        ktm.ternary_matmul_triton(codes, torch.ones(3), packed, 8)
    with pytest.raises(TypeError, match="out_dtype"):
        ktm.ternary_matmul_triton(codes, torch.ones(4), packed, 8, torch.int32)


# ---------------------------------------------------------------------------------------------------------
# PackedBitLinear against BitLinear
# ---------------------------------------------------------------------------------------------------------

PACKED_MODES = [mode for mode in QUANT_MODES if mode != "none"]
# fp32 tolerance: the latent layer sums dequantised products, the packed one integers scaled once; both exact
# up to fp32 rounding of K = 300 terms.
REL_TOL_FP32 = 1e-5


def _latent(role: str, quant_mode: str, act4_format: str = "int4", k: int = 300, n: int = 45) -> BitLinear:
    return BitLinear(k, n, role=role, quant_mode=quant_mode, act4_format=act4_format)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("quant_mode", PACKED_MODES)
@pytest.mark.parametrize("act4_format", ["int4", "fp4"])
@pytest.mark.parametrize("cpu_layout", ["packed", "int8"])
def test_packed_torch_matches_bitlinear(role: str, quant_mode: str, act4_format: str, cpu_layout: str) -> None:
    latent = _latent(role, quant_mode, act4_format)
    packed = PackedBitLinear.from_bitlinear(latent, impl="torch", cpu_layout=cpu_layout)
    for m in M_VALUES:
        x = torch.randn(m, 300)
        with torch.no_grad():
            want = latent(x)
        _assert_close_rel(packed(x), want, REL_TOL_FP32)


@needs_triton
@pytest.mark.parametrize(
    "role, quant_mode, act4_format",
    [("qkv", "a4.8", "int4"), ("gate_up", "a4.8", "fp4"), ("o", "a4.8", "int4"), ("down", "a8", "int4")],
)  # one layer per input quantiser: int4, fp4 (torch quantiser + Triton matmul), topk_int8, int8
def test_packed_triton_matches_bitlinear(role: str, quant_mode: str, act4_format: str) -> None:
    latent = _latent(role, quant_mode, act4_format)
    packed = PackedBitLinear.from_bitlinear(latent, impl="triton")
    reference = PackedBitLinear.from_bitlinear(latent, impl="torch")
    for m in M_VALUES:
        x = torch.randn(m, 300)
        with torch.no_grad():
            want = latent(x)
        got = packed(x)
        _assert_close_rel(got, want, REL_TOL_FP32)
        if packed.act_quantizer != "int4":  # only β (a sum) depends on the reduction order: else bit for bit
            assert torch.equal(got, reference(x)), _diff_message(got, reference(x))


def test_packed_bf16_inputs_and_leading_dims() -> None:
    latent = _latent("gate_up", "a4.8")
    packed = PackedBitLinear.from_bitlinear(latent, impl="torch")
    x = torch.randn(2, 5, 300, dtype=torch.bfloat16)
    got = packed(x)
    assert got.shape == (2, 5, 45) and got.dtype == torch.bfloat16
    with torch.no_grad():
        want = latent.float()(x.float())
    _assert_close_rel(got, want, 1e-2)  # bf16 output rounding (2^-9 relative)


def test_quant_mode_none_is_refused_on_a_packed_layer() -> None:
    packed = PackedBitLinear.from_bitlinear(_latent("qkv", "a4.8"))
    with pytest.raises(ValueError, match="full-precision weights"):
        packed.set_quant_mode("none")
    with pytest.raises(ValueError, match="quant_mode='a4.8' or 'a8'"):
        PackedBitLinear.from_bitlinear(_latent("qkv", "none"))
    assert PackedBitLinear.from_bitlinear(_latent("qkv", "none"), quant_mode="a8").act_quantizer == "int8"


def test_set_quant_mode_switches_like_bitlinear() -> None:
    latent = _latent("o", "a4.8")
    packed = PackedBitLinear.from_bitlinear(latent, impl="torch")
    for mode, ratio in (("a8", None), ("a4.8", 0.25)):
        latent.set_quant_mode(mode, topk_ratio=ratio)
        packed.set_quant_mode(mode, topk_ratio=ratio)
        assert packed.act_quantizer == latent.act_quantizer and packed.topk_ratio == latent.topk_ratio
        x = torch.randn(7, 300)
        with torch.no_grad():
            _assert_close_rel(packed(x), latent(x), REL_TOL_FP32)
    with pytest.raises(ValueError, match="topk ratio"):
        packed.set_quant_mode("a4.8", topk_ratio=1.5)


def test_linear_without_dense_weight_and_deterministic_construction() -> None:
    layer = PackedBitLinear(16, 10, role="down")
    assert isinstance(layer, nn.Linear) and layer.bias is None  # for PEFT's dispatch (peft_bitnet_a48.py)
    assert list(layer.parameters()) == []  # no dense weight: nn.Linear.__init__ is not run
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (3, 16)
    assert layer.weight_scale.dtype == torch.float32 and layer.weight_scale.shape == (1,)
    assert torch.equal(unpack_ternary(layer.weight, 10), torch.zeros(10, 16, dtype=torch.int8))
    assert torch.equal(layer(torch.randn(3, 16)), torch.zeros(3, 10))
    assert set(layer.state_dict()) == {"weight", "weight_scale"}
    packed = PackedBitLinear.from_bitlinear(_latent("down", "a8", k=16, n=10))
    packed.reset_parameters()  # back to the constructor's values, not nn.Linear's random draw
    assert torch.equal(packed.weight, layer.weight) and torch.equal(packed.weight_scale, layer.weight_scale)


def test_state_dict_round_trip_refreshes_the_int8_cache() -> None:
    source = PackedBitLinear.from_bitlinear(_latent("down", "a8"), impl="torch")
    target = PackedBitLinear(300, 45, role="down", quant_mode="a8", impl="torch", cpu_layout="int8")
    x = torch.randn(4, 300)
    assert torch.equal(target(x), torch.zeros(4, 45))  # cache of the zero weights built
    state = source.state_dict()
    state["weight_scale"] = state["weight_scale"].reshape(())  # a 0-dim scale loads too
    target.load_state_dict(state)
    assert torch.equal(target(x), source(x))
    with torch.device("meta"):
        meta = PackedBitLinear(300, 45, role="down", quant_mode="a8", impl="torch")
    meta.load_state_dict(source.state_dict(), assign=True)
    assert torch.equal(meta(x), source(x))


def test_from_bitlinear_stores_alpha_and_codes() -> None:
    latent = _latent("qkv", "a4.8", n=13)
    packed = PackedBitLinear.from_bitlinear(latent)
    alpha = latent.weight.detach().abs().mean()
    assert torch.allclose(packed.weight_scale, alpha.reshape(1), rtol=1e-6, atol=0)
    codes = unpack_ternary(packed.weight, 13)
    assert torch.equal(codes, (latent.weight.detach() / alpha).round().clamp(-1, 1).to(torch.int8))
    packed.validate()
    packed.weight[0, 0] = 0xFF
    with pytest.raises(ValueError, match="weight: .*code 3"):
        packed.validate()
    latent_bias = BitLinear(8, 4, bias=True)
    with pytest.raises(ValueError, match="no bias"):
        PackedBitLinear.from_bitlinear(latent_bias)


def test_impl_choice_is_explicit() -> None:
    layer = PackedBitLinear(16, 8, role="qkv")
    # CPU tensors: the native kernels (a compiler is on CI's PATH); impl="torch" keeps the reference.
    assert layer.impl == "auto" and layer.backend(torch.randn(1, 16)) == "native"
    assert layer.backend(torch.randn(1, 16, dtype=torch.float64)) == "torch"  # a dtype the kernels do not take
    layer.set_cpu_layout("int8")
    assert layer.backend(torch.randn(1, 16)) == "torch"
    layer.set_impl("torch")
    assert layer.backend(torch.randn(1, 16)) == "torch"
    with pytest.raises(ValueError, match="impl must be one of"):
        PackedBitLinear(16, 8, role="qkv", impl="cuda")
    with pytest.raises(ValueError, match="cpu_layout must be one of"):
        PackedBitLinear(16, 8, role="qkv", cpu_layout="int4")
    with pytest.raises(ValueError, match="last dimension 16"):
        layer(torch.randn(2, 15))


def test_int8_cpu_layout_memory() -> None:
    layer = PackedBitLinear(64, 40, role="down", cpu_layout="packed")
    assert layer.weight_nbytes() == {"packed": 10 * 64, "scale": 4, "int8_cache": 0}
    layer.unpack_cache_()
    assert layer.weight_nbytes()["int8_cache"] == 40 * 64
    layer.set_cpu_layout("packed")
    assert layer.weight_int8 is None


def test_packed_cpu_path_unpacks_in_chunks_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    from bitnet_a48 import packed_bitlinear

    m, n, k = 5, 45, 30
    monkeypatch.setattr(packed_bitlinear, "UNPACK_CHUNK_BYTES", 4 * k * 4)  # 4 packed rows a chunk: 12 = 4+4+4
    codes = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    w = _ternary(n, k)
    got = ternary_matmul_torch(codes, torch.ones(m, 1), pack_ternary(w), n)
    assert torch.equal(got, (codes.int() @ w.int().t()).float())
    monkeypatch.setattr(packed_bitlinear, "UNPACK_CHUNK_BYTES", 5 * k * 4)  # 5 + 5 + 2
    got = ternary_matmul_torch(codes, torch.ones(m, 1), pack_ternary(w), n)
    assert torch.equal(got, (codes.int() @ w.int().t()).float())


def test_weight_scale_stays_fp32_under_model_casts() -> None:
    model = nn.Sequential(PackedBitLinear.from_bitlinear(_latent("down", "a8"), impl="torch"))
    alpha = model[0].weight_scale.clone()
    model.to(torch.bfloat16)
    assert model[0].weight_scale.dtype == torch.float32 and torch.equal(model[0].weight_scale, alpha)
    assert model[0].weight.dtype == torch.uint8
    assert model(torch.randn(2, 300, dtype=torch.bfloat16)).dtype == torch.bfloat16
