import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from bitnet_a48 import (
    PRESETS,
    BitNetA48Config,
    BitNetA48ForCausalLM,
    config_from_preset,
    configuration_bitnet_a48,
    create_model,
    quantization,
)


def test_defaults_and_round_trip(tmp_path) -> None:
    config = BitNetA48Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=100, rope_theta=500000.0)
    assert config.quant_mode == "a4.8" and config.kv_cache_bits == 3 and config.topk_ratio == 0.5
    assert config.hidden_act == "relu2" and config.head_dim == 16
    assert config.rope_parameters["rope_theta"] == 500000.0
    config.save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text()
    assert "quantization_config" not in text
    loaded = BitNetA48Config.from_pretrained(tmp_path)
    for field in ("quant_mode", "kv_cache_bits", "weight_format", "act4_format", "num_key_value_heads", "head_dim",
                  "rope_parameters", "topk_ratio"):
        assert getattr(loaded, field) == getattr(config, field), field


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(hidden_size=64, num_attention_heads=5), "num_attention_heads"),
        (dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
        (dict(quant_mode="a4"), "quant_mode"),
        (dict(topk_ratio=0.0), "topk_ratio"),
        (dict(topk_ratio=1.5), "topk_ratio"),
        (dict(act4_format="nf4"), "act4_format"),
        (dict(kv_cache_bits=5), "kv_cache_bits"),
        (dict(weight_format="int8"), "weight_format"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(hidden_size=64, num_attention_heads=4, head_dim=15), "head_dim"),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        BitNetA48Config(**kwargs)


def test_quantization_config_is_refused() -> None:
    with pytest.raises(ValueError, match="quantization_config"):
        BitNetA48Config(quantization_config={"quant_method": "bitnet"})


def test_presets() -> None:
    assert set(PRESETS) == {"700M", "1.3B", "3B", "7B", "2B-4T"}
    c = config_from_preset("2B-4T")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (2560, 30, 20, 5)
    assert c.vocab_size == 128256 and c.tie_word_embeddings and c.rope_parameters["rope_theta"] == 500000.0
    c7 = config_from_preset("7B", quant_mode="a8")
    assert (c7.hidden_size, c7.intermediate_size, c7.vocab_size, c7.quant_mode) == (4096, 11008, 32000, "a8")
    assert not c7.tie_word_embeddings
    with pytest.raises(ValueError, match="preset"):
        config_from_preset("13B")


def test_seed_readme_entry_point_7b_on_meta() -> None:
    # The 7B shape does not fit this machine in fp32: build it on the meta device and run the forward there.
    # Eager attention: the sdpa mask shortcut of transformers reads a value (.item()), which meta tensors cannot.
    with torch.device("meta"):
        model = create_model(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                             attn_implementation="eager")
        input_ids = torch.randint(0, 32000, (1, 8))
        attention_mask = torch.ones(1, 8, dtype=torch.long)
        outputs = model(input_ids, attention_mask)
    assert outputs.logits.shape == (1, 8, 32000)
    n_params = sum(p.numel() for p in model.parameters())
    assert 6.5e9 < n_params < 7.0e9, n_params


def test_mode_and_format_choices_have_one_definition() -> None:
    assert configuration_bitnet_a48.QUANT_MODES is quantization.QUANT_MODES
    assert configuration_bitnet_a48.ACT4_FORMATS is quantization.ACT4_FORMATS


def test_no_tensor_parallel_plan(tiny_config_kwargs: dict) -> None:
    # Shards would see other weight/activation scales and TopK choices than the whole tensor (and packed rows are
    # interleaved), so neither the config nor the model may offer a plan that tp_plan="auto" would apply.
    assert not BitNetA48Config.base_model_tp_plan and not BitNetA48ForCausalLM._tp_plan
    model = create_model(**tiny_config_kwargs)
    assert not model.config.base_model_tp_plan and not model.model._tp_plan
    assert not model.tp_plan and not model.supports_tp_plan


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="needs torch.distributed with gloo")
def test_tp_plan_auto_on_two_processes_is_refused_not_sharded(tiny_config_kwargs: dict, tmp_path) -> None:
    # The real path: two CPU processes (gloo) load with tp_plan="auto". transformers stops with its "has no
    # `tp_plan`" error; a release that loaded anyway must leave every weight whole and give the same logits.
    model = create_model(**tiny_config_kwargs).eval()
    model.save_pretrained(tmp_path / "model")
    ids = torch.randint(3, 101, (1, 6))
    expected = model(ids).logits
    script = textwrap.dedent(f"""
        import json, warnings
        import torch
        from transformers import AutoModelForCausalLM
        import bitnet_a48  # registers the Auto classes
        warnings.simplefilter("ignore")
        try:
            model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r}, tp_plan="auto").eval()
        except Exception as err:
            print(json.dumps({{"error": f"{{type(err).__name__}}: {{err}}"}}))
        else:
            sharded = [n for n, p in model.named_parameters() if type(p.data).__name__ == "DTensor"]
            with torch.no_grad():
                logits = model(torch.tensor({ids.tolist()})).logits
            print(json.dumps({{"sharded": sharded, "logits": logits.tolist()}}))
    """)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        result = json.loads(out.strip().splitlines()[-1])
        if "error" in result:
            assert "tp_plan" in result["error"] or "tensor parallel" in result["error"].lower(), result["error"]
        else:
            assert result["sharded"] == []
            torch.testing.assert_close(torch.tensor(result["logits"]), expected)
