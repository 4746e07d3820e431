"""BitLinear against a dozen-line reference written here from the paper (a4.8 section 2, b1.58 eq. 1-3); its kept
eval copy of the quantised weights; and the fused CPU GEMV of the packed layer under torch.compile."""

import math

import pytest
import torch
import torch.nn.functional as F

from bitnet_a48 import bitlinear
from bitnet_a48.bitlinear import BitLinear
from bitnet_a48.quantization import (
    ROLES,
    dequantize,
    fake_quantize_act,
    fake_quantize_weight_ternary,
    quantize_act,
    quantize_weight_ternary,
)


def reference_bitlinear(x: torch.Tensor, w: torch.Tensor, role: str, mode: str, ratio: float = 0.5) -> torch.Tensor:
    """The paper's BitLinear: ternary absmean weights; inputs INT4 absmean / TopK+INT8 / INT8 absmax by role."""
    if mode == "none":
        return x @ w.t()
    alpha = w.abs().mean().clamp(min=1e-5)
    wq = (w / alpha).round().clamp(-1, 1) * alpha
    if mode == "a4.8" and role in ("qkv", "gate_up"):
        beta = x.abs().mean(-1, keepdim=True).clamp(min=1e-5)
        xq = (x * math.sqrt(7) / beta).round().clamp(-8, 7) * beta / math.sqrt(7)
    else:
        if mode == "a4.8" and role == "o":
            k = math.ceil(ratio * x.shape[-1])
            x = x * torch.zeros_like(x).scatter(-1, x.abs().topk(k, -1).indices, 1.0)
        gamma = x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
        xq = (x * 127 / gamma).round().clamp(-128, 127) * gamma / 127
    return (x + (xq - x).detach()) @ (w + (wq - w).detach()).t()


@pytest.mark.parametrize("mode", ["a4.8", "a8", "none"])
@pytest.mark.parametrize("role", ROLES)
def test_forward_matches_reference(role: str, mode: str) -> None:
    layer = BitLinear(48, 24, role=role, quant_mode=mode)
    x = torch.randn(3, 5, 48)
    out = layer(x)
    ref = reference_bitlinear(x, layer.weight.detach(), role, mode)
    # Same arithmetic up to the order of multiply and divide in the dequantisation.
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5), (out - ref).abs().max()


@pytest.mark.parametrize("role", ROLES)
def test_training_steps_match_reference(role: str) -> None:
    torch.manual_seed(1)
    layer = BitLinear(32, 16, role=role, quant_mode="a4.8")
    ref_w = layer.weight.detach().clone().requires_grad_(True)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW([ref_w], lr=1e-2)
    for _ in range(5):
        x, target = torch.randn(8, 32), torch.randn(8, 16)
        for model_out, o in ((layer(x), opt), (reference_bitlinear(x, ref_w, role, "a4.8"), ref_opt)):
            o.zero_grad()
            F.mse_loss(model_out, target).backward()
            o.step()
    diff = (layer.weight - ref_w).abs().max().item()
    assert diff < 1e-5, f"latent weights drifted from the reference by {diff}"


def test_switch_modes_and_repr() -> None:
    layer = BitLinear(64, 8, role="o", quant_mode="a8")
    assert layer.act_quantizer == "int8"
    layer.set_quant_mode("a4.8", topk_ratio=0.25)
    assert layer.act_quantizer == "topk_int8" and layer.topk_ratio == 0.25
    assert "topk_int8" in repr(layer)
    layer.set_quant_mode("a4.8", act4_format="fp4")
    assert layer.act_quantizer == "topk_int8"  # o_proj has no 4-bit input
    with pytest.raises(ValueError, match="quant_mode"):
        layer.set_quant_mode("int4")
    with pytest.raises(ValueError, match="ratio"):
        layer.set_quant_mode("a4.8", topk_ratio=0.0)
    with pytest.raises(ValueError, match="last dimension 64"):
        layer(torch.randn(2, 63))


def test_is_an_nn_linear_and_autocasts() -> None:
    layer = BitLinear(32, 16, role="qkv")
    assert isinstance(layer, torch.nn.Linear)
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), layer(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("role", ROLES)
def test_forward_is_bit_for_bit_the_same_with_and_without_grad(role: str, dtype: torch.dtype) -> None:
    # Gradient checkpointing with use_reentrant=True computes the forward without grad, then recomputes it with grad.
    layer = BitLinear(96, 40, role=role, quant_mode="a4.8", dtype=dtype).train()
    # Gaussian weights (transformers' init, and trained weights) have tails far beyond 1.5α, where x + (q - x) != q.
    torch.nn.init.normal_(layer.weight, std=0.02)
    x = torch.randn(6, 96, generator=torch.Generator().manual_seed(2)).to(dtype) * 2
    with torch.no_grad():
        plain = layer(x)
    xg = x.clone().requires_grad_(True)
    out = layer(xg)
    assert torch.equal(out.detach(), plain)
    # The gradients are the identity STE's: dX = dY · Q_w(W), dW = dYᵀ · Q_act(X).
    grad_y = torch.randn_like(out)
    out.backward(grad_y)
    codes, alpha = quantize_weight_ternary(layer.weight)
    a_codes, a_scale = quantize_act(x, layer.act_quantizer, layer.topk_ratio)
    w_q, x_q = dequantize(codes, alpha, dtype), dequantize(a_codes, a_scale, dtype)
    assert torch.equal(xg.grad, grad_y @ w_q)
    assert torch.equal(layer.weight.grad, grad_y.t() @ x_q)


class QuantiseCounter:
    """Stands for bitlinear.fake_quantize_weight_ternary and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return fake_quantize_weight_ternary(weight)


@pytest.fixture
def counter(monkeypatch: pytest.MonkeyPatch) -> QuantiseCounter:
    count = QuantiseCounter()
    monkeypatch.setattr(bitlinear, "fake_quantize_weight_ternary", count)
    return count


def _fresh(layer: BitLinear, x: torch.Tensor) -> torch.Tensor:
    """The uncached arithmetic of the layer."""
    with torch.no_grad():
        w = fake_quantize_weight_ternary(layer.weight)
        return F.linear(fake_quantize_act(x, layer.act_quantizer, layer.topk_ratio), w, layer.bias)


def test_eval_keeps_the_quantised_weight_until_it_changes(counter: QuantiseCounter) -> None:
    layer = BitLinear(64, 24, role="gate_up").eval()
    x = torch.randn(2, 64)
    with torch.no_grad():
        first, second = layer(x), layer(x)
    with torch.inference_mode():
        third = layer(x)
    assert counter.calls == 1
    assert torch.equal(first, _fresh(layer, x)) and torch.equal(second, first) and torch.equal(third, first)
    assert list(layer.state_dict()) == ["weight"] and not list(layer.buffers())  # never saved

    with torch.no_grad():
        layer.weight.add_(0.05 * torch.randn_like(layer.weight))  # in place: the version counter moves
        assert torch.equal(layer(x), _fresh(layer, x)) and counter.calls == 2
    layer.load_state_dict({"weight": torch.randn(24, 64)})
    with torch.no_grad():
        assert torch.equal(layer(x), _fresh(layer, x)) and counter.calls == 3

    # An optimiser step in eval mode: the forward with grad quantises afresh, the next no-grad one refreshes.
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x).square().sum().backward()
    assert layer.weight.grad is not None and counter.calls == 4
    optimizer.step()
    with torch.no_grad():
        assert torch.equal(layer(x), _fresh(layer, x)) and counter.calls == 5

    layer.to(torch.float64)
    with torch.no_grad():
        assert torch.equal(layer(x.double()), _fresh(layer, x.double())) and counter.calls == 6


def test_data_writes_need_clear_or_a_mode_switch(counter: QuantiseCounter) -> None:
    # Writes through .data bypass autograd's version counter (documented): clear_weight_cache() or eval() resyncs.
    layer = BitLinear(64, 24, role="down").eval()
    x = torch.randn(2, 64)
    with torch.no_grad():
        layer(x)
        layer.weight.data.mul_(-1.0)
        layer.clear_weight_cache()
        assert torch.equal(layer(x), _fresh(layer, x))
        layer.weight.data.mul_(-1.0)
        layer.eval()
        assert torch.equal(layer(x), _fresh(layer, x))
    assert counter.calls == 3


def test_training_and_weight_gradients_always_quantise_afresh(counter: QuantiseCounter) -> None:
    layer = BitLinear(64, 24, role="qkv")
    x = torch.randn(2, 64)
    with torch.no_grad():
        layer(x), layer(x)  # train mode, even without grad (the first pass of reentrant checkpointing)
    assert counter.calls == 2 and layer._weight_cache is None
    layer.eval()
    layer(x).sum().backward()  # eval with grad on a trainable weight: the weight gradient is needed
    assert counter.calls == 3 and layer.weight.grad is not None and layer._weight_cache is None
    # A frozen weight (LoRA's base) in eval keeps its copy, which serves an input gradient, also after inference_mode.
    layer.weight.requires_grad_(False)
    with torch.inference_mode():
        layer(x)
    xg = x.clone().requires_grad_(True)
    layer(xg).sum().backward()
    assert counter.calls == 4 and xg.grad is not None
    layer.train()
    assert layer._weight_cache is None  # training frees the copy


def test_offloaded_layer_keeps_no_copy(counter: QuantiseCounter) -> None:
    from accelerate import cpu_offload

    model = torch.nn.Sequential(BitLinear(64, 24, role="o")).eval()
    cpu_offload(model, execution_device="cpu")  # the weight lives on meta between calls
    with torch.no_grad():
        model(torch.randn(2, 64)), model(torch.randn(2, 64))
    assert model[0]._weight_cache is None and counter.calls == 2


def _old_composition(layers: list[BitLinear], x: torch.Tensor) -> list[torch.Tensor]:
    """Each layer as it was written before the training path: its own quantiser of the input, STE on both sides."""
    from bitnet_a48.quantization import ste

    outs = []
    for layer in layers:
        a_codes, a_scale = quantize_act(x, layer.act_quantizer, layer.topk_ratio)
        w_codes, alpha = quantize_weight_ternary(layer.weight)
        xq = ste(x, dequantize(a_codes, a_scale, x.dtype))
        outs.append(F.linear(xq, ste(layer.weight, dequantize(w_codes, alpha, layer.weight.dtype))))
    return outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("role", ROLES)
def test_layers_sharing_an_input_give_the_old_values_and_gradients_bit_for_bit(role: str, dtype: torch.dtype) -> None:
    # q/k/v (and gate/up) read one tensor, which is quantised once for all of them (bitlinear.quantize_input).
    torch.manual_seed(3)
    layers = [BitLinear(96, n, role=role, quant_mode="a4.8", dtype=dtype) for n in (40, 24, 24)]
    for layer in layers:
        torch.nn.init.normal_(layer.weight, std=0.02)
    base = (torch.randn(2, 7, 96) * 2).to(dtype)
    results = []
    for forward in (lambda x: [layer(x) for layer in layers], lambda x: _old_composition(layers, x)):
        x = base.clone().requires_grad_(True)
        for layer in layers:
            layer.weight.grad = None
        outs = forward(x)
        sum((out.float() * (i + 1)).sum() for i, out in enumerate(outs)).backward()
        results.append(([out.detach() for out in outs], x.grad, [layer.weight.grad for layer in layers]))
    (new_outs, new_gx, new_gw), (old_outs, old_gx, old_gw) = results
    assert all(torch.equal(a, b) for a, b in zip(new_outs, old_outs, strict=True))
    assert torch.equal(new_gx, old_gx)
    assert all(torch.equal(a, b) for a, b in zip(new_gw, old_gw, strict=True))


def test_shared_input_is_requantised_after_a_change_and_freed_with_its_input() -> None:
    import gc
    import weakref

    q, k = BitLinear(32, 8, role="qkv"), BitLinear(32, 8, role="qkv")
    x = torch.randn(4, 32)
    with torch.no_grad():
        q(x)
        x.mul_(-3.0)  # in place: the version counter moves, so k quantises the new values
        assert torch.equal(k(x), _fresh(k, x))
        o = BitLinear(32, 8, role="o")  # another quantiser of the same tensor
        assert torch.equal(o(x), _fresh(o, x))
    kept = bitlinear._last_input
    assert kept is not None and kept[0]() is x
    value = weakref.ref(kept[2])
    del x, kept
    gc.collect()
    assert bitlinear._last_input is None and value() is None
