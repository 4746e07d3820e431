"""Conversion of transformers' bitnet/llama folders to bitnet_a48 and back (convert.py).

The source folders are written by transformers itself (tiny random BitNetConfig / LlamaConfig); the packed forms are
built with transformers' own `pack_weights`, with weight_scale in each linear class's convention. The oracle is
transformers loading the same folder (its BitNet quantizer runs on CPU, slowly: it unpacks every forward).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitNetConfig, BitNetForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.integrations.bitnet import pack_weights

from bitnet_a48 import BitNetA48ForCausalLM
from bitnet_a48.convert import (
    CheckpointError,
    convert_checkpoint,
    export_checkpoint,
    latent_from_ternary,
    main_convert,
    main_export,
    main_pack,
)
from bitnet_a48.modeling_bitnet_a48 import PROJECTION_ROLES
from bitnet_a48.packed_bitlinear import PackedBitLinear
from bitnet_a48.quantization import quantize_weight_ternary

SHAPE = dict(vocab_size=101, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=128)
ROPE = {"rope_type": "default", "rope_theta": 500000.0}
# fp32 logits, quantised on both sides: the orders of multiply/divide differ, nothing else.
LOGITS_ATOL = 1e-4


def _diff(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"max {(a - b).abs().max().item():.3g}, mean {(a - b).abs().mean().item():.3g}"


def _is_projection(key: str) -> bool:
    return key.rsplit(".", 2)[-2] in PROJECTION_ROLES


@pytest.fixture(scope="module")
def reference() -> BitNetForCausalLM:
    torch.manual_seed(0)
    return BitNetForCausalLM(BitNetConfig(**SHAPE, rope_parameters=ROPE, tie_word_embeddings=True)).eval()


@pytest.fixture(scope="module")
def latent_dir(reference: BitNetForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """transformers' bf16 latent form (`-bf16` variant) with an online autobitlinear quantization_config."""
    folder = tmp_path_factory.mktemp("bitnet_latent")
    reference.to(torch.bfloat16).save_pretrained(folder)
    reference.float()
    raw = json.loads((folder / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                  "quantization_mode": "online"}
    (folder / "config.json").write_text(json.dumps(raw))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    return folder


def _write_packed(reference: BitNetForCausalLM, folder: Path, linear_class: str) -> Path:
    """Packed uint8 [out/4, in] + weight_scale, built the way transformers' BitLinear / AutoBitLinear read it."""
    state = {}
    for key, tensor in reference.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied
        if _is_projection(key):
            codes, alpha = quantize_weight_ternary(tensor)
            state[key] = pack_weights(codes.to(torch.int32))
            scale = alpha if linear_class == "autobitlinear" else 1.0 / alpha
            state[key.replace(".weight", ".weight_scale")] = scale.reshape(1).float()
        else:
            state[key] = tensor.clone()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = BitNetConfig(**SHAPE, rope_parameters=ROPE, tie_word_embeddings=True)
    config.quantization_config = {"quant_method": "bitnet", "linear_class": linear_class,
                                  "quantization_mode": "offline"}
    config.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["autobitlinear", "bitlinear"])
def packed_dir(request: pytest.FixtureRequest, reference: BitNetForCausalLM,
               tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    return request.param, _write_packed(reference, tmp_path_factory.mktemp(request.param), request.param)


def _transformers_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert type(model).__name__ == "BitNetForCausalLM"
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        return model(ids).logits


def _our_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = BitNetA48ForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(3, 101, (2, 10), generator=torch.Generator().manual_seed(1))


def test_latent_bitnet_converts_and_matches_transformers(latent_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ours"
    convert_checkpoint(latent_dir, out, weight_format="latent", quant_mode="a8")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bitnet_a48" and "quantization_config" not in config
    assert config["rope_parameters"]["rope_theta"] == 500000.0
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] is True
    assert (out / "tokenizer_config.json").is_file()
    a, b = _our_logits(out, IDS), _transformers_logits(latent_dir, IDS)
    assert torch.allclose(a, b, atol=LOGITS_ATOL), _diff(a, b)
    # The latent weights are copied bit for bit (bf16 stays bf16).
    src, ours = load_file(str(latent_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for key, tensor in src.items():
        assert torch.equal(ours[key], tensor), key


def test_packed_bitnet_matches_transformers_on_the_same_folder(packed_dir: tuple[str, Path], tmp_path: Path) -> None:
    linear_class, folder = packed_dir
    expected = _transformers_logits(folder, IDS)
    for fmt in ("packed", "latent"):
        out = tmp_path / fmt
        model = convert_checkpoint(folder, out, weight_format=fmt, quant_mode="a8")
        if fmt == "packed":
            assert all(isinstance(m, PackedBitLinear) for m in model.projections().values())
        a = _our_logits(out, IDS)
        assert torch.allclose(a, expected, atol=LOGITS_ATOL), f"{linear_class} -> {fmt}: {_diff(a, expected)}"


def test_scale_convention_is_read_from_linear_class(reference: BitNetForCausalLM, tmp_path: Path) -> None:
    # The same bytes under the other linear_class mean another α: the conversion must follow linear_class.
    folder = _write_packed(reference, tmp_path / "src", "autobitlinear")
    right = convert_checkpoint(folder, tmp_path / "right", weight_format="packed")
    raw = json.loads((folder / "config.json").read_text())
    raw["quantization_config"]["linear_class"] = "bitlinear"
    (folder / "config.json").write_text(json.dumps(raw))
    wrong = convert_checkpoint(folder, tmp_path / "wrong", weight_format="packed")
    a = right.model.layers[0].self_attn.q_proj.weight_scale
    b = wrong.model.layers[0].self_attn.q_proj.weight_scale
    assert torch.allclose(a * b, torch.ones(1)), (a, b)


def test_latent_from_ternary_requantises_to_the_same_codes_and_scale() -> None:
    codes = torch.randint(-1, 2, (48, 32), dtype=torch.int8)
    alpha = torch.tensor(0.0123)
    latent = latent_from_ternary(codes, alpha, torch.float32)
    back_codes, back_alpha = quantize_weight_ternary(latent)
    assert torch.equal(back_codes, codes)
    assert torch.allclose(back_alpha, alpha, rtol=1e-6), (back_alpha, alpha)


@pytest.mark.parametrize("linear_class", ["autobitlinear", "bitlinear"])
def test_packed_round_trip_convert_export_convert(packed_dir: tuple[str, Path], linear_class: str,
                                                  tmp_path: Path) -> None:
    source_class, folder = packed_dir
    first = tmp_path / "first"
    convert_checkpoint(folder, first, weight_format="packed")
    exported = tmp_path / "exported"
    export_checkpoint(first, exported, weight_format="packed", linear_class=linear_class, dtype=torch.float32)
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "bitnet" and config["quantization_config"]["linear_class"] == linear_class
    second = tmp_path / "second"
    convert_checkpoint(exported, second, weight_format="packed")
    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith("weight_scale") and linear_class == "bitlinear":
            # s = 1/α in fp32: the reciprocal of a reciprocal comes back to within one ulp.
            assert torch.allclose(a[key], b[key], rtol=2**-23, atol=0), key
        else:
            assert torch.equal(a[key], b[key]), key
    if source_class == linear_class:
        # The exported folder holds the source's bytes.
        src, exp = load_file(str(folder / "model.safetensors")), load_file(str(exported / "model.safetensors"))
        for key in src:
            if key.endswith("weight_scale") and linear_class == "bitlinear":
                assert torch.allclose(src[key], exp[key], rtol=2**-23, atol=0), key
            else:
                assert torch.equal(src[key], exp[key]), key


def test_latent_round_trip_is_exact(latent_dir: Path, tmp_path: Path) -> None:
    convert_checkpoint(latent_dir, tmp_path / "a", weight_format="latent")
    export_checkpoint(tmp_path / "a", tmp_path / "exported", weight_format="latent")
    convert_checkpoint(tmp_path / "exported", tmp_path / "b", weight_format="latent")
    src = load_file(str(latent_dir / "model.safetensors"))
    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert src.keys() == exported.keys() and a.keys() == b.keys()
    assert all(torch.equal(src[k], exported[k]) for k in src)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_export_latent_runs_in_transformers_like_ours(latent_dir: Path, tmp_path: Path) -> None:
    convert_checkpoint(latent_dir, tmp_path / "ours", weight_format="latent", dtype=torch.float32)
    export_checkpoint(tmp_path / "ours", tmp_path / "exported", weight_format="latent", dtype=torch.float32)
    a, b = _our_logits(tmp_path / "ours", IDS), _transformers_logits(tmp_path / "exported", IDS)
    assert torch.allclose(a, b, atol=LOGITS_ATOL), _diff(a, b)


def test_llama_converts_with_silu_and_unit_sub_norms(tmp_path: Path) -> None:
    llama = LlamaForCausalLM(LlamaConfig(**SHAPE, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    llama.save_pretrained(tmp_path / "llama")
    model = convert_checkpoint(tmp_path / "llama", tmp_path / "ours", quant_mode="none")
    assert model.config.hidden_act == "silu"
    layer = model.model.layers[1]
    assert torch.equal(layer.self_attn.attn_sub_norm.weight, torch.ones(64))
    assert torch.equal(layer.mlp.ffn_sub_norm.weight, torch.ones(160))
    loaded = BitNetA48ForCausalLM.from_pretrained(str(tmp_path / "ours"))
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.weight, llama.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(loaded.lm_head.weight, llama.lm_head.weight)


def test_refuses_foreign_or_broken_folders(reference: BitNetForCausalLM, latent_dir: Path, tmp_path: Path) -> None:
    gpt = tmp_path / "gpt2"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="not a BitNet or LLaMA"):
        convert_checkpoint(gpt, tmp_path / "x")
    with pytest.raises(CheckpointError, match="no config.json"):
        convert_checkpoint(tmp_path / "nothing", tmp_path / "x")

    # A shape that does not fit the config.
    bad_shape = tmp_path / "bad_shape"
    bad_shape.mkdir()
    (bad_shape / "config.json").write_text((latent_dir / "config.json").read_text())
    state = load_file(str(latent_dir / "model.safetensors"))
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:-1].contiguous()
    save_file(state, str(bad_shape / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"up_proj.weight.*\(159, 64\).*\(160, 64\)"):
        convert_checkpoint(bad_shape, tmp_path / "x")

    # A packed tensor holding the invalid code 3.
    folder = _write_packed(reference, tmp_path / "bad_code", "autobitlinear")
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.1.self_attn.k_proj.weight"][2, 5] |= 0b11
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="k_proj.weight.*invalid 2-bit code 3"):
        convert_checkpoint(folder, tmp_path / "x", weight_format="packed")

    # Pickled weights only: never unpickled.
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((latent_dir / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pickled tensors are not read"):
        convert_checkpoint(pickled, tmp_path / "x")


def test_command_line_entry_points(latent_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main_convert([str(latent_dir), str(tmp_path / "latent"), "--dtype", "fp32"]) == 0
    assert main_pack([str(tmp_path / "latent"), str(tmp_path / "packed")]) == 0
    packed = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert packed["weight_format"] == "packed"
    assert main_export([str(tmp_path / "packed"), str(tmp_path / "hf"), "--weight-format", "packed"]) == 0
    assert load_file(str(tmp_path / "hf" / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"].shape == (40, 64)
    assert main_convert([str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err
