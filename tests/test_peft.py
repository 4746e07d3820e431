"""LoRA with PEFT on the latent and the packed BitNet a4.8 model (peft_bitnet_a48.py)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import Linear as LoraLinear

from bitnet_a48 import create_model, packed_bitlinear
from bitnet_a48 import peft_bitnet_a48 as pb
from bitnet_a48.bitlinear import BitLinear
from bitnet_a48.packed_bitlinear import PackedBitLinear
from bitnet_a48.quantization import quantize_act, quantize_weight_ternary

STEPS = 8


def _model(tiny_config_kwargs: dict, packed: bool = False) -> torch.nn.Module:
    model = create_model(**tiny_config_kwargs, quant_mode="a4.8")
    return model.pack() if packed else model


def _batch() -> torch.Tensor:
    return torch.randint(3, 101, (4, 16), generator=torch.Generator().manual_seed(3))


def _train(peft_model: torch.nn.Module, ids: torch.Tensor) -> list[float]:
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    peft_model.train()
    for _ in range(STEPS):
        loss = peft_model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _check_training_base_and_reload(peft_model: torch.nn.Module, before: dict[str, torch.Tensor],
                                    fresh: torch.nn.Module, tmp_path: Path) -> None:
    """Adapters lower the loss, the frozen base is unchanged, and saved adapters reload onto `fresh` exactly."""
    ids = _batch()
    losses = _train(peft_model, ids)
    assert losses[-1] < 0.9 * losses[0], losses
    after = {k.replace("base_layer.", ""): v for k, v in peft_model.get_base_model().state_dict().items()
             if "lora_" not in k}
    assert all(torch.equal(after[k], v) for k, v in before.items())
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    fresh.load_state_dict(before)
    loaded = pb.load_lora(fresh, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)


def test_latent_lora_all_linear_trains_and_keeps_base(tiny_config_kwargs: dict, tmp_path: Path) -> None:
    model = _model(tiny_config_kwargs)
    before = _base_state(model)
    peft_model = pb.add_lora(model, r=4, lora_alpha=8)
    wrapped = [n for n, m in peft_model.named_modules() if isinstance(m, LoraLinear)]
    assert len(wrapped) == 7 * 2 and not any("lm_head" in n for n in wrapped)
    assert all(isinstance(m.get_base_layer(), BitLinear) for n, m in peft_model.named_modules() if n in wrapped)
    _check_training_base_and_reload(peft_model, before, _model(tiny_config_kwargs), tmp_path)


def test_latent_merge_adds_the_delta_to_the_latent_weights(tiny_config_kwargs: dict) -> None:
    peft_model = pb.add_lora(_model(tiny_config_kwargs), r=4, lora_alpha=8)
    _train(peft_model, _batch())
    layer = peft_model.base_model.model.model.layers[0].mlp.up_proj
    expected = layer.get_base_layer().weight.detach() + layer.get_delta_weight("default")
    merged = pb.merge_lora(peft_model)
    up = merged.model.layers[0].mlp.up_proj
    assert type(up) is BitLinear  # plain latent layer again, re-quantised on the fly
    assert torch.allclose(up.weight, expected)


def _set_adapters(peft_model: torch.nn.Module) -> None:
    """Non-zero adapters (PEFT starts B at zero), so that merging changes the weights."""
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _refreshed_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits with every BitLinear quantising its current weights afresh."""
    for module in model.modules():
        if isinstance(module, BitLinear):
            module.clear_weight_cache()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_latent_merge_and_unmerge_refresh_the_kept_quantised_weights(tiny_config_kwargs: dict) -> None:
    # Eval keeps each BitLinear's Q_w(W) (bitlinear.py); PEFT writes merged weights through .data, unseen by it.
    peft_model = pb.add_lora(_model(tiny_config_kwargs), r=4, lora_alpha=8)
    _set_adapters(peft_model)
    peft_model.eval()
    ids = _batch()
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
    peft_model.merge_adapter()
    with torch.no_grad():
        merged = peft_model(input_ids=ids).logits
    assert not torch.equal(merged, adapted)  # merging re-quantises W + s·B·A (module docstring)
    assert torch.equal(merged, _refreshed_logits(peft_model, ids))
    peft_model.unmerge_adapter()
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=ids).logits, adapted, atol=1e-5)
    unloaded = pb.merge_lora(peft_model)
    with torch.no_grad():
        assert torch.equal(unloaded(input_ids=ids).logits, _refreshed_logits(unloaded, ids))


@pytest.mark.parametrize("packed", [False, True], ids=["latent", "packed"])
def test_add_and_load_lora_emit_no_warnings(tiny_config_kwargs: dict, tmp_path: Path, packed: bool) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = pb.add_lora(_model(tiny_config_kwargs, packed=packed), r=4, lora_alpha=8)
        peft_model.save_pretrained(tmp_path / "adapter")
        pb.load_lora(_model(tiny_config_kwargs, packed=packed), str(tmp_path / "adapter"))
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "Unsupported layer type" in m or "is_gradient_checkpointing" in m], messages


@pytest.mark.parametrize("out_features", [12, 13])
def test_packed_input_gradient_equals_ste_reference(monkeypatch: pytest.MonkeyPatch, out_features: int) -> None:
    latent = BitLinear(24, out_features, role="qkv", quant_mode="a4.8")
    packed = PackedBitLinear.from_bitlinear(latent)
    monkeypatch.setattr(packed_bitlinear, "UNPACK_CHUNK_BYTES", 4 * 24 * 2)  # two packed rows a chunk
    x = torch.randn(3, 5, 24, requires_grad=True)
    grad_y = torch.randn(3, 5, out_features)
    packed(x).backward(grad_y)  # the frozen packed layer passes dX back itself
    x_ref = x.detach().clone().requires_grad_(True)
    latent(x_ref).backward(grad_y)  # BitLinear's STE: dX = dY · Q_w(W)
    codes, alpha = quantize_weight_ternary(latent.weight)
    dense = grad_y.reshape(-1, out_features) @ (codes.float() * alpha)
    assert torch.allclose(x.grad.reshape(-1, 24), dense, atol=1e-6)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)
    # The forward of the autograd path is the integer arithmetic: (codes_x · codes_wᵀ) · x_scale · α.
    y = packed(x)
    assert y.grad_fn is not None
    x_codes, x_scale = quantize_act(x.detach().reshape(-1, 24), latent.act_quantizer)
    exact = (x_codes.double() @ codes.double().t()).float()  # integer sums, exact in fp64
    assert torch.equal(y.detach().reshape(-1, out_features), exact * (x_scale * alpha))


def test_packed_qlora_trains_adapters_on_a_frozen_2bit_base(tiny_config_kwargs: dict, tmp_path: Path) -> None:
    model = _model(tiny_config_kwargs, packed=True)
    targets = pb.packed_lora_target_modules(model)
    assert len(targets) == 14 and all("lm_head" not in t for t in targets)
    before = _base_state(model)
    peft_model = pb.add_lora(model, r=4, lora_alpha=8)
    wrapped = {n: m for n, m in peft_model.named_modules() if isinstance(m, pb.PackedLoraLinear)}
    assert len(wrapped) == 14
    assert all(not p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n)

    _check_training_base_and_reload(peft_model, before, _model(tiny_config_kwargs, packed=True), tmp_path)

    with pytest.raises(ValueError, match="cannot merge LoRA into a packed"):
        pb.merge_lora(peft_model)
    with pytest.raises(ValueError, match="cannot merge LoRA into a packed"):
        peft_model.merge_adapter()


def test_packed_adapter_gradients_equal_the_latent_ste_ones(tiny_config_kwargs: dict) -> None:
    # Same base weights, same adapters: the packed model's adapter gradients (through dX = dY·codes·α of every frozen
    # packed layer above them) equal the latent model's STE gradients up to float rounding.
    latent = _model(tiny_config_kwargs)
    packed = _model(tiny_config_kwargs)
    packed.load_state_dict(latent.state_dict())
    packed.pack()
    peft_latent, peft_packed = pb.add_lora(latent, r=4, lora_alpha=8), pb.add_lora(packed, r=4, lora_alpha=8)
    adapters = {k: torch.randn_like(v) * 0.1 for k, v in peft_latent.state_dict().items() if "lora_" in k}
    peft_latent.load_state_dict(adapters, strict=False)
    peft_packed.load_state_dict(adapters, strict=False)
    ids = _batch()
    for model in (peft_latent, peft_packed):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    grads_latent = {n: p.grad for n, p in peft_latent.named_parameters() if p.requires_grad}
    grads_packed = {n: p.grad for n, p in peft_packed.named_parameters() if p.requires_grad}
    assert grads_latent.keys() == grads_packed.keys() and len(grads_latent) == 28
    for name, g in grads_latent.items():
        rel = (grads_packed[name] - g).norm() / g.norm()
        assert rel < 1e-3, f"{name}: relative difference {rel:.3g}"
