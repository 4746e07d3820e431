"""The fused decode step of a packed decoder layer (decode_native.py) equals the per-op path bit for bit, and steps
aside wherever one of its parts would not run natively."""

from __future__ import annotations

import pytest
import torch

from bitnet_a48 import BitNetA48Config, BitNetA48ForCausalLM, decode_native
from bitnet_a48 import modeling_bitnet_a48 as modeling
from bitnet_a48.kernels_cpu_native import load_native
from bitnet_a48.packed_bitlinear import PackedBitLinear
from bitnet_a48.sparsity import SparsityMeter

load_native()
NEW_TOKENS = 12


def packed_model(tiny_config_kwargs: dict, dtype: torch.dtype, **overrides: object) -> BitNetA48ForCausalLM:
    torch.manual_seed(0)
    config = BitNetA48Config(**{**tiny_config_kwargs, "kv_cache_bits": 3, "kv_cache_window": 4, **overrides})
    return BitNetA48ForCausalLM(config).eval().pack().to(dtype)


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts, the second left-padded by 3 (pad id 0)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 101, (2, 9), generator=g)
    ids[:, 0] = 1
    ids[1, :3] = 0
    ids[1, 3] = 1
    return ids, (ids != 0).long()


def greedy(model: BitNetA48ForCausalLM, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)  # fmt: skip
    return out.sequences, torch.stack(out.logits)


def count_fused(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    run = decode_native._run

    def counting_run(parts, *args):  # noqa: ANN001, ANN002, ANN202
        calls.append(parts.attn.layer_idx)
        return run(parts, *args)

    monkeypatch.setattr(decode_native, "_run", counting_run)
    return calls


def fused_setup(
    tiny_config_kwargs: dict, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype = torch.float32, **config: object
) -> tuple[BitNetA48ForCausalLM, torch.Tensor, torch.Tensor, list[int]]:
    """A packed model, the prompts and their mask, and the list of layers that each fused step ran."""
    model = packed_model(tiny_config_kwargs, dtype, **config)
    ids, mask = prompts()
    return model, ids, mask, count_fused(monkeypatch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant_mode", ["a4.8", "a8"])
def test_fused_decode_step_equals_the_per_op_path(
    tiny_config_kwargs: dict, dtype: torch.dtype, quant_mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, ids, mask, calls = fused_setup(tiny_config_kwargs, monkeypatch, dtype, quant_mode=quant_mode)
    fused_ids, fused_logits = greedy(model, ids, mask)
    layers = model.config.num_hidden_layers
    # decode steps with a full window (prompt 9 > window 4): every layer of every step after the first token
    assert len(calls) == layers * (NEW_TOKENS - 1)
    monkeypatch.setattr(modeling, "decoder_layer_decode", lambda *args: None)
    per_op_ids, per_op_logits = greedy(model, ids, mask)
    assert torch.equal(fused_ids, per_op_ids)
    assert torch.equal(fused_logits, per_op_logits)


def test_fused_decode_step_steps_aside_for_hooks_and_other_caches(
    tiny_config_kwargs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, ids, mask, calls = fused_setup(tiny_config_kwargs, monkeypatch)
    with SparsityMeter(model):  # forward hooks on every projection must see every call
        hooked_ids, _ = greedy(model, ids, mask)
    assert calls == []
    from transformers import DynamicCache

    model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                   **{modeling.GENERATE_CACHE_KEY: DynamicCache()})  # fmt: skip
    assert calls == []
    plain_ids, _ = greedy(model, ids, mask)
    assert len(calls) > 0 and torch.equal(hooked_ids, plain_ids)


def test_fused_decode_step_steps_aside_for_query_quantisation(
    tiny_config_kwargs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, ids, mask, calls = fused_setup(tiny_config_kwargs, monkeypatch, kv_cache_query_bits=8)
    greedy(model, ids, mask)
    assert calls == []


def test_fused_decode_step_reads_submodules_as_they_are_now(
    tiny_config_kwargs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The step looks the layer's modules up in `_modules` at every call: a projection replaced after the first step
    # (as PEFT's wrappers do) or a layer of another structure takes the module path from the next step on.
    model, ids, mask, calls = fused_setup(tiny_config_kwargs, monkeypatch)
    greedy(model, ids, mask)
    fused_calls = len(calls)
    assert fused_calls > 0
    layer = model.model.layers[0]
    original = layer.self_attn.o_proj

    class Wrapped(PackedBitLinear):  # computes the same, but is another class: the fused op does not know it
        pass

    wrapped = Wrapped.__new__(Wrapped)
    wrapped.__dict__.update(original.__dict__)
    layer.self_attn.o_proj = wrapped
    calls.clear()
    replaced_ids, _ = greedy(model, ids, mask)
    assert 0 not in calls and len(calls) > 0  # the other layers still fuse
    layer.self_attn.o_proj = original
    assert decode_native._parts(torch.nn.Module()) is None
    calls.clear()
    plain_ids, _ = greedy(model, ids, mask)
    assert len(calls) == fused_calls and torch.equal(replaced_ids, plain_ids)
