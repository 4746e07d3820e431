"""BitLinear against a dozen-line reference written here from the paper (a4.8 section 2, b1.58 eq. 1-3)."""

import math

import pytest
import torch
import torch.nn.functional as F

from bitnet_a48.bitlinear import BitLinear
from bitnet_a48.quantization import ROLES


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
