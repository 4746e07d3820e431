"""LoRA with PEFT on the latent and the packed BitNet a4.8 model (peft_bitnet_a48.py): PEFT's own API with a plain
``LoraConfig``, and this package's thin helpers."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear

from bitnet_a48 import create_model, packed_bitlinear
from bitnet_a48 import peft_bitnet_a48 as pb
from bitnet_a48.bitlinear import BitLinear
from bitnet_a48.kernels_cpu_native import native_available
from bitnet_a48.modeling_bitnet_a48 import BitNetA48ForCausalLM
from bitnet_a48.packed_bitlinear import PackedBitLinear
from bitnet_a48.quantization import quantize_act, quantize_weight_ternary

STEPS = 8
NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_PROJECTIONS = 7 * 2  # TINY_CONFIG has 2 layers


def _model(tiny_config_kwargs: dict, packed: bool = False) -> torch.nn.Module:
    model = create_model(**tiny_config_kwargs, quant_mode="a4.8")
    return model.pack() if packed else model


def _plain_config(**kwargs: object) -> LoraConfig:
    """What a PEFT user writes: projections by name, nothing from this package."""
    return LoraConfig(**{"target_modules": NAMES, "r": 4, "lora_alpha": 8, "task_type": "CAUSAL_LM", **kwargs})


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


def _unwrapped_state(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors under their names before wrapping (PEFT moves them under `base_layer.`)."""
    return {
        k.replace("base_layer.", ""): v for k, v in peft_model.get_base_model().state_dict().items() if "lora_" not in k
    }


def _assert_base_unchanged(peft_model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = _unwrapped_state(peft_model)
    assert after.keys() == before.keys()
    changed = [k for k, v in before.items() if not torch.equal(after[k], v)]
    assert not changed, changed


def _lora_state(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in peft_model.state_dict().items() if "lora_" in k}


def _check_training_base_and_reload(
    peft_model: torch.nn.Module,
    before: dict[str, torch.Tensor],
    fresh: torch.nn.Module,
    tmp_path: Path,
    load: Callable[[torch.nn.Module, str], torch.nn.Module],
) -> None:
    """Adapters lower the loss and change, the frozen base is unchanged, and saved adapters reload onto `fresh`
    exactly."""
    ids = _batch()
    adapters_before = _lora_state(peft_model)
    losses = _train(peft_model, ids)
    assert losses[-1] < 0.9 * losses[0], losses
    adapters_after = _lora_state(peft_model)
    assert all(not torch.equal(adapters_after[k], v) for k, v in adapters_before.items())
    _assert_base_unchanged(peft_model, before)
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    fresh.load_state_dict(before)
    loaded = load(fresh, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)


def _set_adapters(peft_model: torch.nn.Module, seed: int = 4) -> None:
    """Non-zero adapters (PEFT starts B at zero), so that they change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _wrapped(peft_model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in peft_model.named_modules() if isinstance(m, LoraLinear)}


def _logits(model: torch.nn.Module, ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


# -- PEFT's own API with a plain LoraConfig ----------------------------------------------------------------------


def test_plain_lora_config_on_packed_model_trains_saves_and_reloads(tiny_config_kwargs: dict, tmp_path: Path) -> None:
    _model(tiny_config_kwargs, packed=True).save_pretrained(tmp_path / "base")
    model = BitNetA48ForCausalLM.from_pretrained(tmp_path / "base")
    before = _base_state(model)
    peft_model = get_peft_model(model, _plain_config())
    wrapped = _wrapped(peft_model)
    assert len(wrapped) == N_PROJECTIONS and not any("lm_head" in n for n in wrapped)
    assert all(type(m) is LoraLinear and type(m.get_base_layer()) is PackedBitLinear for m in wrapped.values())
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == {
        n for n, _ in peft_model.named_parameters() if "lora_" in n
    }

    def from_pretrained(fresh: torch.nn.Module, folder: str) -> torch.nn.Module:
        assert LoraConfig.from_pretrained(folder)._custom_modules is None  # nothing of ours in adapter_config.json
        return PeftModel.from_pretrained(fresh, folder)

    fresh = BitNetA48ForCausalLM.from_pretrained(tmp_path / "base")
    _check_training_base_and_reload(peft_model, before, fresh, tmp_path, from_pretrained)
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files and "adapter_model.bin" not in files
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and set(saved["target_modules"]) == set(NAMES)


def test_plain_all_linear_wraps_every_packed_projection(tiny_config_kwargs: dict) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = get_peft_model(_model(tiny_config_kwargs, packed=True), _plain_config(target_modules="all-linear"))
    wrapped = _wrapped(peft_model)
    assert len(wrapped) == N_PROJECTIONS and not any("lm_head" in n for n in wrapped)
    assert not [str(w.message) for w in caught if "Unsupported layer type" in str(w.message)]


def test_plain_merge_on_packed_refuses_and_writes_nothing(tiny_config_kwargs: dict) -> None:
    peft_model = get_peft_model(_model(tiny_config_kwargs, packed=True), _plain_config())
    _set_adapters(peft_model)
    peft_model.eval()
    ids = _batch()
    before, logits = _base_state(peft_model), _logits(peft_model, ids)
    # PEFT's own layer writes ΔW [out, in] into the uint8 codes [ceil(out/4), in]: torch refuses before writing.
    for safe_merge in (False, True):
        with pytest.raises(RuntimeError, match="size of tensor"):
            peft_model.merge_and_unload(safe_merge=safe_merge)
    with pytest.raises(RuntimeError, match="size of tensor"):
        peft_model.merge_adapter()
    # Our helper says it in one line, naming the fix.
    with pytest.raises(ValueError, match="cannot merge LoRA into a packed BitNet model") as error:
        pb.merge_lora(peft_model)
    assert "\n" not in str(error.value) and "pack()" in str(error.value)
    assert len(_wrapped(peft_model)) == N_PROJECTIONS and not any(m.merged for m in _wrapped(peft_model).values())
    assert all(torch.equal(v, before[k]) for k, v in peft_model.state_dict().items())
    assert torch.equal(_logits(peft_model, ids), logits)


def test_plain_lora_config_on_latent_model_merges(tiny_config_kwargs: dict) -> None:
    peft_model = get_peft_model(_model(tiny_config_kwargs), _plain_config())
    assert all(type(m.get_base_layer()) is BitLinear for m in _wrapped(peft_model).values())
    _train(peft_model, _batch())
    expected = {
        n.replace("base_model.model.", ""): m.get_base_layer().weight.detach() + m.get_delta_weight("default")
        for n, m in _wrapped(peft_model).items()
    }
    merged = peft_model.merge_and_unload()
    for name, weight in expected.items():
        layer = merged.get_submodule(name)
        assert type(layer) is BitLinear  # a plain latent layer again, re-quantised on the fly
        assert torch.allclose(layer.weight, weight)


def test_packed_lora_dropout_rslora_and_formula(tiny_config_kwargs: dict) -> None:
    peft_model = get_peft_model(
        _model(tiny_config_kwargs, packed=True), _plain_config(lora_dropout=0.5, use_rslora=True)
    )
    _set_adapters(peft_model)
    layer = peft_model.base_model.model.model.layers[1].mlp.down_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4**0.5)  # rsLoRA: alpha / sqrt(r)
    x = torch.randn(3, 5, layer.in_features)
    base = layer.get_base_layer()
    lora_a, lora_b = layer.lora_A["default"], layer.lora_B["default"]
    peft_model.eval()
    with torch.no_grad():
        want = base(x) + layer.scaling["default"] * lora_b(lora_a(x))
        assert torch.allclose(layer(x), want, rtol=1e-5, atol=1e-5)
    peft_model.train()
    with torch.no_grad():
        first, second = layer(x), layer(x)
    assert not torch.equal(first, second)  # dropout on the adapter's input in training
    assert torch.equal(base(x), base(x))  # the packed base has no dropout


def test_multiple_adapters_on_packed_model(tiny_config_kwargs: dict, tmp_path: Path) -> None:
    base = _model(tiny_config_kwargs, packed=True)
    base_state = _base_state(base)
    ids = _batch()
    base_logits = _logits(base, ids)
    for seed, name in ((4, "a"), (5, "b")):
        fresh = _model(tiny_config_kwargs, packed=True)
        fresh.load_state_dict(base_state)
        single = get_peft_model(fresh, _plain_config())
        _set_adapters(single, seed)
        single.save_pretrained(tmp_path / name)
    singles = {}
    for name in ("a", "b"):
        fresh = _model(tiny_config_kwargs, packed=True)
        fresh.load_state_dict(base_state)
        singles[name] = _logits(PeftModel.from_pretrained(fresh, str(tmp_path / name)).eval(), ids)
    assert not torch.equal(singles["a"], singles["b"])
    base.load_state_dict(base_state)
    both = PeftModel.from_pretrained(base, str(tmp_path / "a"), adapter_name="a")
    both.load_adapter(str(tmp_path / "b"), adapter_name="b")
    both.eval()
    assert torch.equal(_logits(both, ids), singles["a"])
    both.set_adapter("b")
    assert torch.equal(_logits(both, ids), singles["b"])
    with both.disable_adapter():
        assert torch.equal(_logits(both, ids), base_logits)
    # One batch, an adapter per row (PEFT's mixed-adapter forward): each row as with that adapter alone.
    mixed = _logits(both, ids, adapter_names=["a", "b", "__base__", "a"])
    assert torch.allclose(mixed[[0, 3]], singles["a"][[0, 3]], atol=1e-5)
    assert torch.allclose(mixed[1], singles["b"][1], atol=1e-5)
    assert torch.allclose(mixed[2], base_logits[2], atol=1e-5)


def test_packed_lora_gradients_under_activation_checkpointing(tiny_config_kwargs: dict) -> None:
    # PEFT asks the model for input gradients when checkpointing is on; the recomputed packed forward passes them on.
    state = _base_state(_model(tiny_config_kwargs, packed=True))
    grads = []
    for checkpointing in (False, True):
        model = _model(tiny_config_kwargs, packed=True)
        model.load_state_dict(state)
        if checkpointing:
            # transformers 5.24 renamed gradient_checkpointing_enable (and warns on the old name); 5.17 has the old.
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == checkpointing
        peft_model = get_peft_model(model, _plain_config())
        _set_adapters(peft_model)
        peft_model.train()
        ids = _batch()
        peft_model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * N_PROJECTIONS
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, rtol=1e-4, atol=1e-6), name


def test_native_fused_calls_step_aside_for_lora_and_return_after_unload(
    tiny_config_kwargs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not native_available():
        pytest.skip("the native CPU kernels do not build here")
    model = _model(tiny_config_kwargs, packed=True).eval()
    ids = _batch()
    calls: list[int] = []
    original = packed_bitlinear.ternary_linear_native

    def counting(*args: object, **kwargs: object) -> list[torch.Tensor]:
        calls.append(len(args[1]))  # weights in the call
        return original(*args, **kwargs)

    monkeypatch.setattr(packed_bitlinear, "ternary_linear_native", counting)
    plain = _logits(model, ids)
    assert calls == [3, 1, 2, 1] * 2  # q/k/v, o, gate/up, down: one call each
    peft_model = get_peft_model(model, _plain_config())
    calls.clear()
    with peft_model.disable_adapter():
        assert torch.equal(_logits(peft_model, ids), plain)  # each layer alone, the same arithmetic
    assert calls == [1] * N_PROJECTIONS
    unloaded = peft_model.unload()
    calls.clear()
    assert torch.equal(_logits(unloaded, ids), plain)
    assert calls == [3, 1, 2, 1] * 2


def test_packed_config_builds_zero_codes_under_transformers_init(tiny_config_kwargs: dict) -> None:
    # PackedBitLinear is an nn.Linear; transformers' _init_weights (normal draws into every nn.Linear) must skip it.
    config = _model(tiny_config_kwargs, packed=True).config
    model = BitNetA48ForCausalLM(config)
    layers = [m for m in model.modules() if isinstance(m, PackedBitLinear)]
    assert len(layers) == N_PROJECTIONS
    zero = PackedBitLinear(8, 8, role="qkv")
    assert all(torch.equal(m.weight, torch.full_like(m.weight, int(zero.weight[0, 0]))) for m in layers)
    assert all(float(m.weight_scale) == 1.0 for m in layers)


# -- the helpers: PEFT with this package's LoRA layers registered ------------------------------------------------


def test_latent_lora_all_linear_trains_and_keeps_base(tiny_config_kwargs: dict, tmp_path: Path) -> None:
    model = _model(tiny_config_kwargs)
    before = _base_state(model)
    peft_model = pb.add_lora(model, r=4, lora_alpha=8)
    wrapped = [n for n, m in peft_model.named_modules() if isinstance(m, LoraLinear)]
    assert len(wrapped) == 7 * 2 and not any("lm_head" in n for n in wrapped)
    assert all(isinstance(m.get_base_layer(), BitLinear) for n, m in peft_model.named_modules() if n in wrapped)
    _check_training_base_and_reload(peft_model, before, _model(tiny_config_kwargs), tmp_path, pb.load_lora)


def test_latent_merge_adds_the_delta_to_the_latent_weights(tiny_config_kwargs: dict) -> None:
    peft_model = pb.add_lora(_model(tiny_config_kwargs), r=4, lora_alpha=8)
    _train(peft_model, _batch())
    layer = peft_model.base_model.model.model.layers[0].mlp.up_proj
    expected = layer.get_base_layer().weight.detach() + layer.get_delta_weight("default")
    merged = pb.merge_lora(peft_model)
    up = merged.model.layers[0].mlp.up_proj
    assert type(up) is BitLinear  # plain latent layer again, re-quantised on the fly
    assert torch.allclose(up.weight, expected)


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


def test_packed_qlora_trains_adapters_on_a_frozen_2bit_base(tiny_config_kwargs: dict, tmp_path: Path) -> None:
    model = _model(tiny_config_kwargs, packed=True)
    before = _base_state(model)
    peft_model = pb.add_lora(model, r=4, lora_alpha=8)
    wrapped = _wrapped(peft_model)
    assert len(wrapped) == N_PROJECTIONS and all(type(m) is pb.PackedLoraLinear for m in wrapped.values())
    assert not any("lm_head" in n for n in wrapped)
    assert all(not p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n)

    _check_training_base_and_reload(peft_model, before, _model(tiny_config_kwargs, packed=True), tmp_path, pb.load_lora)

    for merge in (peft_model.merge_and_unload, peft_model.merge_adapter, lambda: pb.merge_lora(peft_model)):
        with pytest.raises(ValueError, match="cannot merge LoRA into a packed BitNet model") as error:
            merge()
        assert str(error.value) == pb.PACKED_MERGE_ERROR
    _assert_base_unchanged(peft_model, before)
    # Adapters trained through our layer load through PEFT's own (same state-dict keys), and the reverse.
    plain = PeftModel.from_pretrained(_model(tiny_config_kwargs, packed=True), str(tmp_path / "adapter"))
    assert all(type(m) is LoraLinear for m in _wrapped(plain).values())


def test_packed_lora_refuses_variants_in_one_line(tiny_config_kwargs: dict) -> None:
    model = _model(tiny_config_kwargs, packed=True)
    with pytest.raises(ValueError, match="plain LoRA only \\(DoraLinearVariant needs the dense weight\\)"):
        pb.add_lora(model, r=4, use_dora=True)
    peft_model = pb.add_lora(_model(tiny_config_kwargs, packed=True), r=4)
    with pytest.raises(ValueError, match="plain LoRA only"):  # a second adapter goes through update_layer
        peft_model.add_adapter("dora", pb.lora_config(peft_model, r=4, use_dora=True))
    # PEFT's own layer, from a plain config, stops at the size mismatch.
    with pytest.raises(RuntimeError, match="size of tensor"):
        get_peft_model(_model(tiny_config_kwargs, packed=True), _plain_config(use_dora=True))


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


def test_packed_adapter_gradients_equal_the_latent_ste_ones(tiny_config_kwargs: dict) -> None:
    # Same base weights, same adapters: the packed model's adapter gradients (through dX = dY·codes·α of every frozen
    # packed layer above them) equal the latent model's STE gradients up to float rounding. Plain configs both.
    latent = _model(tiny_config_kwargs)
    packed = _model(tiny_config_kwargs)
    packed.load_state_dict(latent.state_dict())
    packed.pack()
    peft_latent, peft_packed = get_peft_model(latent, _plain_config()), get_peft_model(packed, _plain_config())
    adapters = {k: torch.randn_like(v) * 0.1 for k, v in peft_latent.state_dict().items() if "lora_" in k}
    peft_latent.load_state_dict(adapters, strict=False)
    peft_packed.load_state_dict(adapters, strict=False)
    ids = _batch()
    for model in (peft_latent, peft_packed):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    grads_latent = {n: p.grad for n, p in peft_latent.named_parameters() if p.requires_grad}
    grads_packed = {n: p.grad for n, p in peft_packed.named_parameters() if p.requires_grad}
    assert grads_latent.keys() == grads_packed.keys() and len(grads_latent) == 2 * N_PROJECTIONS
    for name, g in grads_latent.items():
        rel = (grads_packed[name] - g).norm() / g.norm()
        assert rel < 1e-3, f"{name}: relative difference {rel:.3g}"
