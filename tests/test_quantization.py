"""The quantisers against the formulas of SPEC section 2, on hand-checked and random inputs."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnet_a48 import quantization as Q

E2M1 = torch.tensor(Q.FP4_E2M1_GRID)


def _rows(draw_shape: tuple[int, int], seed: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(draw_shape, generator=g) * scale


def test_int8_hand_checked() -> None:
    x = torch.tensor([[1.0, -2.0, 0.5, 0.0]])
    codes, scale = Q.quantize_act_int8(x)
    # γ = 2 -> codes = round(127 · x / 2)
    assert codes.tolist() == [[64, -127, 32, 0]]  # 63.5 rounds half to even -> 64
    assert scale.item() == pytest.approx(2 / 127)


def test_int4_hand_checked() -> None:
    x = torch.tensor([[1.0, -3.0, 0.2, 0.0]])
    codes, scale = Q.quantize_act_int4(x)
    beta = 4.2 / 4
    expected = [max(-8, min(7, round(math.sqrt(7) * v / beta))) for v in (1.0, -3.0, 0.2, 0.0)]
    assert codes.tolist() == [expected] == [[3, -8, 1, 0]]
    assert scale.item() == pytest.approx(beta / math.sqrt(7))


def test_ternary_hand_checked() -> None:
    w = torch.tensor([[0.5, -1.5], [0.1, 2.0]])
    codes, alpha = Q.quantize_weight_ternary(w)
    assert alpha.item() == pytest.approx(1.025)
    assert codes.tolist() == [[0, -1], [0, 1]]  # 0.5/1.025 = 0.49 rounds to 0


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    dim=st.integers(1, 70),
    seed=st.integers(0, 10_000),
    scale=st.sampled_from([1e-6, 1e-2, 1.0, 30.0]),
)
def test_activation_quantisers_match_formulas(rows: int, dim: int, seed: int, scale: float) -> None:
    x = _rows((rows, dim), seed, scale)
    xf = x.double()
    # INT8: codes = RoundClip(127 x / γ), γ = max|x| clamped.
    codes, s = Q.quantize_act_int8(x)
    gamma = x.abs().amax(-1, keepdim=True).clamp(min=Q.QUANT_EPS)
    assert codes.dtype == torch.int8 and codes.min() >= -128 and codes.max() <= 127
    assert torch.allclose(s, gamma / 127, rtol=1e-6)
    assert (codes.double() - xf * 127 / gamma.double()).abs().max() <= 0.5 + 1e-3
    # INT4: codes = RoundClip(√7 x / β, -8, 7), β = mean|x| clamped.
    codes, s = Q.quantize_act_int4(x)
    beta = x.abs().mean(-1, keepdim=True).clamp(min=Q.QUANT_EPS)
    assert codes.min() >= -8 and codes.max() <= 7
    assert torch.allclose(s, beta / math.sqrt(7), rtol=1e-6)
    target = (xf * math.sqrt(7) / beta.double()).clamp(-8, 7)
    assert (codes.double() - target).abs().max() <= 0.5 + 1e-3
    # Dequantisation error of unclipped entries is at most half a step.
    deq = Q.dequantize(codes, s)
    inside = (xf * math.sqrt(7) / beta.double()).abs() < 7
    assert ((deq - x).abs() <= s / 2 + 1e-6)[inside].all()


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 5), dim=st.integers(1, 90), seed=st.integers(0, 10_000), ratio=st.floats(0.01, 1.0))
def test_topk_keeps_exactly_k(rows: int, dim: int, seed: int, ratio: float) -> None:
    x = _rows((rows, dim), seed, 1.0)
    k = math.ceil(ratio * dim)
    mask = Q.topk_mask(x, ratio)
    assert (mask.sum(-1) == k).all()
    # Every kept |x| is at least every dropped |x|.
    kept_min = torch.where(mask, x.abs(), torch.inf).amin(-1)
    dropped_max = torch.where(mask, -torch.inf, x.abs()).amax(-1)
    assert (kept_min >= dropped_max).all()
    codes, scale = Q.quantize_act_topk_int8(x, ratio)
    assert ((codes != 0) <= mask).all()
    assert torch.allclose(scale, x.abs().amax(-1, keepdim=True).clamp(min=Q.QUANT_EPS) / 127)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 5),
    dim=st.integers(1, 90),
    seed=st.integers(0, 10_000),
    scale=st.sampled_from([1e-3, 1.0, 100.0]),
)
def test_fp4_on_e2m1_grid(rows: int, dim: int, seed: int, scale: float) -> None:
    x = _rows((rows, dim), seed, scale)
    codes, s = Q.quantize_act_fp4(x)
    deq = Q.dequantize(codes, s)
    grid_values = (deq / (2 * s)).abs()  # the per-token step of the 2·E2M1 codes is 2·scale
    on_grid = (grid_values.unsqueeze(-1) - E2M1).abs().amin(-1)
    assert on_grid.max() < 1e-4
    # The largest magnitude lands on 6 (the top of the E2M1 grid) at max|X|; a row whose max|X| is below the clamp
    # (QUANT_EPS) has the clamped scale, so it stays below the clamp instead.
    amax, deq_max = x.abs().amax(-1), deq.abs().amax(-1)
    big = amax >= Q.QUANT_EPS
    assert torch.allclose(deq_max[big], amax[big], rtol=1e-5)
    assert (deq_max[~big] <= Q.QUANT_EPS * (1 + 1e-5)).all()
    # Rounding to the nearest grid point: the error is at most half the local step.
    y = (x / (2 * s)).abs()
    local_step = torch.where(y >= 4, 2.0, torch.where(y >= 2, 1.0, 0.5))
    assert ((grid_values - y).abs() <= local_step / 2 + 1e-4).all()


def test_fp4_hand_checked() -> None:
    x = torch.tensor([[6.0, 5.2, 2.6, 0.3, -0.2, 1.24]])
    codes, s = Q.quantize_act_fp4(x)
    assert s.item() == pytest.approx(0.5)
    assert (codes.float() / 2).tolist() == [[6.0, 6.0, 3.0, 0.5, 0.0, 1.0]]  # 5.2 -> 6; 0.3 -> 0.5; 1.24 -> 1


def test_gaussian_int4_has_about_twelve_percent_zeros() -> None:
    x = torch.randn(256, 4096)
    codes, _ = Q.quantize_act_int4(x)
    zero_share = (codes == 0).float().mean().item()
    assert 0.11 < zero_share < 0.135, zero_share


def test_topk_half_zeroes_exactly_half() -> None:
    x = torch.randn(32, 2560)
    codes, _ = Q.quantize_act_topk_int8(x, 0.5)
    assert ((codes == 0).sum(-1) >= 1280).all()
    assert (Q.topk_mask(x, 0.5).sum(-1) == 1280).all()


@pytest.mark.parametrize("name", ["int8", "int4", "fp4", "topk_int8"])
def test_zero_and_constant_rows_give_no_nan(name: str) -> None:
    x = torch.stack([torch.zeros(16), torch.full((16,), 3.0), torch.full((16,), -1e-9)])
    codes, scale = Q.quantize_act(x, name)
    deq = Q.dequantize(codes, scale)
    assert torch.isfinite(deq).all()
    assert (deq[0] == 0).all()
    if name != "topk_int8":
        assert torch.allclose(deq[1], x[1], rtol=0.2)
    w_codes, alpha = Q.quantize_weight_ternary(torch.zeros(4, 4))
    assert torch.isfinite(alpha) and (w_codes == 0).all()


@pytest.mark.parametrize("name", ["int8", "int4", "fp4", "topk_int8"])
def test_straight_through_gradient_is_identity(name: str) -> None:
    x = torch.randn(3, 40, requires_grad=True)
    upstream = torch.randn(3, 40)
    Q.fake_quantize_act(x, name).backward(upstream)
    assert torch.equal(x.grad, upstream)
    w = torch.randn(8, 8, requires_grad=True)
    Q.fake_quantize_weight_ternary(w).backward(upstream[:, :8].repeat(3, 1)[:8])
    assert torch.equal(w.grad, upstream[:, :8].repeat(3, 1)[:8])


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (torch.equal calls -0.0 and 0.0 equal)."""
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16}[t.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["int8", "int4", "fp4", "topk_int8"])
def test_forward_value_is_the_same_with_and_without_grad(name: str, dtype: torch.dtype) -> None:
    # Gradient checkpointing with use_reentrant=True runs the forward without grad, then again with grad: the two
    # must give the same bits, or the recompute sees other activations (and other TopK choices downstream).
    x = (torch.randn(16, 96, generator=torch.Generator().manual_seed(5)) * 3).to(dtype)
    with torch.no_grad():
        plain = Q.fake_quantize_act(x, name)
        plain_w = Q.fake_quantize_weight_ternary(x)
    xg = x.clone().requires_grad_(True)
    with_grad, with_grad_w = Q.fake_quantize_act(xg, name), Q.fake_quantize_weight_ternary(xg)
    codes, scale = Q.quantize_act(x, name)
    w_codes, alpha = Q.quantize_weight_ternary(x)
    assert torch.equal(_bits(plain), _bits(Q.dequantize(codes, scale, dtype)))
    assert torch.equal(_bits(plain_w), _bits(Q.dequantize(w_codes, alpha, dtype)))
    assert with_grad.requires_grad and torch.equal(_bits(with_grad.detach()), _bits(plain))
    assert torch.equal(_bits(with_grad_w.detach()), _bits(plain_w))
    upstream = torch.randn(16, 96).to(dtype)
    (with_grad * upstream).sum().backward()
    assert torch.equal(xg.grad, upstream)  # d out / d x = 1


def test_ste_keeps_the_sign_of_zero() -> None:
    x = torch.tensor([-0.25, 0.25, -3.0], requires_grad=True)
    q = torch.tensor([-0.0, 0.0, -3.0])
    out = Q.ste(x, q)
    assert torch.equal(_bits(out.detach()), _bits(q))  # q + 0 would turn -0.0 into +0.0


def test_fake_quant_keeps_dtype_and_computes_stats_in_fp32() -> None:
    x = torch.randn(4, 64) * 1000
    for name in ("int8", "int4", "fp4", "topk_int8"):
        out_bf16 = Q.fake_quantize_act(x.bfloat16(), name)
        assert out_bf16.dtype == torch.bfloat16
        codes32, scale32 = Q.quantize_act(x.bfloat16().float(), name)
        codes16, scale16 = Q.quantize_act(x.bfloat16(), name)
        assert torch.equal(codes16, codes32) and torch.equal(scale16, scale32)


def test_role_table() -> None:
    assert Q.act_quantizer_name("qkv", "a4.8") == "int4"
    assert Q.act_quantizer_name("gate_up", "a4.8", "fp4") == "fp4"
    assert Q.act_quantizer_name("o", "a4.8") == "topk_int8"
    assert Q.act_quantizer_name("down", "a4.8") == "int8"
    assert {Q.act_quantizer_name(r, "a8") for r in Q.ROLES} == {"int8"}
    assert {Q.act_quantizer_name(r, "none") for r in Q.ROLES} == {"none"}
    with pytest.raises(ValueError, match="quant_mode"):
        Q.act_quantizer_name("qkv", "a4")
    with pytest.raises(ValueError, match="role"):
        Q.act_quantizer_name("ffn", "a8")


def test_bad_inputs() -> None:
    with pytest.raises(TypeError, match="floating-point"):
        Q.quantize_act_int8(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="ratio"):
        Q.topk_mask(torch.randn(2, 4), 0.0)
    with pytest.raises(ValueError, match="empty"):
        Q.quantize_act_int4(torch.randn(2, 0))


def _awkward_rows(dtype: torch.dtype) -> list[torch.Tensor]:
    """Inputs for the training-path quantisers: Gaussian rows of awkward widths, bf16 rows with many ties, rows of
    one repeated value, zeros, tiny and small negative values (which round to -0.0 before scaling), a 3-D batch."""
    g = torch.Generator().manual_seed(11)
    rows = [
        torch.randn(shape, generator=g) * scale
        for shape, scale in (((7, 1), 1.0), ((1, 5), 3.0), ((128, 96), 1.0), ((300, 257), 0.02), ((2, 9, 704), 5.0))
    ]
    rows.append(torch.randint(-3, 4, (33, 64), generator=g).float())  # few distinct values: ties everywhere
    rows.append(
        torch.stack(
            [
                torch.zeros(40),
                torch.full((40,), -2.5),
                torch.full((40,), 1e-9),
                torch.linspace(-1e-3, 1.0, 40),
                -torch.rand(40, generator=g) * 1e-3,
            ]
        )
    )
    wide = torch.randn(16, 512, generator=g) * torch.logspace(-12, 3, 512)  # a wide dynamic range per row
    rows.append(wide[:, torch.randperm(512, generator=g)])
    return [r.to(dtype) for r in rows]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["int8", "int4", "fp4", "topk_int8"])
def test_training_path_values_equal_the_reference_bit_for_bit(name: str, dtype: torch.dtype) -> None:
    ratios = (0.5, 0.3, 0.99, 1.0) if name == "topk_int8" else (0.5,)
    for x in _awkward_rows(dtype):
        for ratio in ratios:
            fast = Q.fake_quantize_act_values(x, name, ratio)
            codes, scale = Q.quantize_act(x, name, ratio)
            ref = Q.dequantize(codes, scale, dtype)
            assert fast.dtype == dtype and fast.shape == x.shape and not fast.requires_grad
            assert torch.equal(_bits(fast), _bits(ref)), (name, tuple(x.shape), ratio, (fast - ref).abs().max())
        w_fast = Q.fake_quantize_weight_values(x)
        w_codes, alpha = Q.quantize_weight_ternary(x)
        assert torch.equal(_bits(w_fast), _bits(Q.dequantize(w_codes, alpha, dtype))), tuple(x.shape)


def test_training_path_topk_follows_the_tie_rule() -> None:
    # Rows of bf16 with equal magnitudes at the threshold: the kept ones are the lowest indices, as in topk_mask.
    x = torch.tensor([[1.0, -1.0, 1.0, 0.5, -1.0, 2.0], [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]], dtype=torch.bfloat16)
    fast = Q.fake_quantize_act_values(x, "topk_int8", 0.5)
    assert ((fast != 0) == torch.tensor([[1, 1, 0, 0, 0, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)).all()
    assert ((fast != 0) == Q.topk_mask(x, 0.5)).all()
