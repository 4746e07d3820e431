"""accelerate with the packed model: the 7B preset on meta, device maps, real loads with offload, FSDP on CPU."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch
from accelerate import infer_auto_device_map, init_empty_weights
from accelerate.utils import compute_module_sizes

from bitnet_a48 import BitNetA48Config, BitNetA48ForCausalLM, config_from_preset
from bitnet_a48.packed_bitlinear import PackedBitLinear
from bitnet_a48.packing import packed_rows, projection_shapes, weight_bytes

TESTS = Path(__file__).resolve().parent
GiB = 2**30

# Contexts that build a model without allocating it: accelerate's (buffers included) and torch's, which
# transformers' from_pretrained uses.
META_CONTEXTS: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "init_empty_weights(include_buffers=True)": lambda: init_empty_weights(include_buffers=True),
    "torch.device('meta')": lambda: torch.device("meta"),
}


def _bytes_by_dtype(model: torch.nn.Module) -> dict[torch.dtype, int]:
    totals: dict[torch.dtype, int] = {}
    for tensor in model.state_dict().values():
        totals[tensor.dtype] = totals.get(tensor.dtype, 0) + tensor.numel() * tensor.element_size()
    return totals


def _meta_7b(weight_format: str, context: str = "init_empty_weights(include_buffers=True)") -> BitNetA48ForCausalLM:
    config = config_from_preset("7B", weight_format=weight_format)
    with META_CONTEXTS[context]():
        model = BitNetA48ForCausalLM(config)
    return model.to(torch.bfloat16)  # free on meta; PackedBitLinear keeps weight_scale fp32


@pytest.mark.parametrize("context", list(META_CONTEXTS))
def test_7b_packed_builds_on_meta_with_uint8_buffers_and_packed_bytes(context: str) -> None:
    process = psutil.Process()
    rss_before = process.memory_info().rss
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    model = _meta_7b("packed", context)
    rss_growth = process.memory_info().rss - rss_before
    peak_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before
    config = model.config
    latent = weight_bytes(config, "latent")["total"]  # 13.5 GB in bf16
    # Nothing was materialised: the process grew by far less than 1% of the bf16 weights.
    assert rss_growth < latent / 100 and peak_growth < latent / 100, (rss_growth, peak_growth, latent)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}

    shapes = projection_shapes(config)
    projections = model.projections()
    assert len(projections) == 7 * config.num_hidden_layers
    for name, module in projections.items():
        out_features, in_features = shapes[name.rsplit(".", 1)[-1]]
        assert isinstance(module, PackedBitLinear), name
        assert module.weight.dtype == torch.uint8 and module.weight.shape == (packed_rows(out_features), in_features)
        assert module.weight_scale.dtype == torch.float32 and module.weight_scale.shape == (1,)
        assert module.weight_int8 is None  # no int8 cache on meta

    # The state dict is exactly what packing.weight_bytes counts: packed codes (uint8), one fp32 scale per
    # projection, and embeddings, lm_head and norms in bf16.
    expected = weight_bytes(config, "packed")
    scales = 4 * len(projections)
    assert _bytes_by_dtype(model) == {
        torch.uint8: expected["projections"] - scales,
        torch.float32: scales,
        torch.bfloat16: expected["norms"] + expected["embeddings"] + expected["lm_head"],
    }
    # The compression, counted on the tensors of a latent bf16 model built alike (not through weight_bytes).
    latent_model = _meta_7b("latent", context)
    latent_bytes = sum(_bytes_by_dtype(latent_model).values())
    packed_bytes = sum(_bytes_by_dtype(model).values())
    assert latent_bytes == latent  # weight_bytes' latent count is what the latent model holds
    assert latent_bytes / packed_bytes >= 6.0, latent_bytes / packed_bytes  # 6.3x for the whole model
    proj_latent = sum(t.numel() * t.element_size() for m in latent_model.projections().values()
                      for t in m.state_dict().values())
    proj_packed = sum(t.numel() * t.element_size() for m in projections.values() for t in m.state_dict().values())
    assert proj_latent == 2 * config.num_hidden_layers * sum(o * i for o, i in shapes.values())  # bf16, no bias
    assert proj_latent / proj_packed >= 7.9, proj_latent / proj_packed  # 8x for the projections (2 bits of 16)


def test_init_empty_weights_without_buffers_allocates_packed_buffers(tiny_config_kwargs: dict) -> None:
    """Pitfall: plain ``init_empty_weights()`` puts parameters on meta but allocates the packed uint8 *buffers*.

    For the 7B preset that is 1.6 GB of real memory (measured: RSS +1.5 GiB); pass ``include_buffers=True`` or use
    ``torch.device("meta")`` (as from_pretrained does).
    """
    config = BitNetA48Config(**tiny_config_kwargs, weight_format="packed")
    with init_empty_weights():
        model = BitNetA48ForCausalLM(config)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    packed = [m for m in model.modules() if isinstance(m, PackedBitLinear)]
    assert packed and {m.weight.device.type for m in packed} == {"cpu"}


def test_7b_device_map_keeps_decoder_layers_whole_and_fits_more_packed_layers_on_cpu() -> None:
    packed = _meta_7b("packed")
    sizes = compute_module_sizes(packed)
    config = packed.config
    expected = weight_bytes(config, "packed")
    # One layer: its seven packed projections with their scales, and four bf16 norms (hidden x3, ffn; q_out = hidden).
    per_layer_norms = 2 * (3 * config.hidden_size + config.intermediate_size)
    per_layer = expected["projections"] // config.num_hidden_layers + per_layer_norms
    assert sizes["model.layers.0"] == per_layer  # 50.6 MB, against 405 MB latent in bf16

    budget = 2 * sizes["lm_head"] + 8 * sizes["model.layers.0"]  # about a quarter of the model: forces a split
    max_memory = {"cpu": budget, "disk": 64 * GiB}
    device_map = infer_auto_device_map(packed, max_memory=max_memory, no_split_module_classes=packed._no_split_modules)
    assert set(device_map.values()) == {"cpu", "disk"}, device_map
    for key in device_map:  # whole modules only: no decoder layer is split between devices
        assert key in sizes and (not key.startswith("model.layers.") or key.count(".") == 2), key
    on_cpu = sum(sizes[key] for key, device in device_map.items() if device == "cpu")
    assert on_cpu <= budget
    cpu_layers = [key for key, device in device_map.items() if key.startswith("model.layers.") and device == "cpu"]
    assert len(cpu_layers) >= 4

    # With 4 GiB of CPU the whole packed 7B stays in memory; the latent bf16 model puts most layers on disk.
    roomy = {"cpu": 4 * GiB, "disk": 64 * GiB}
    packed_map = infer_auto_device_map(packed, max_memory=roomy, no_split_module_classes=packed._no_split_modules)
    latent = _meta_7b("latent")
    latent_map = infer_auto_device_map(latent, max_memory=roomy, no_split_module_classes=latent._no_split_modules)
    assert set(packed_map.values()) == {"cpu"}, packed_map
    latent_cpu = sum(1 for k, d in latent_map.items() if k.startswith("model.layers.") and d == "cpu")
    assert latent_cpu < config.num_hidden_layers // 2, latent_map


@pytest.fixture
def packed_folder(tiny_config_kwargs: dict, tmp_path: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A tiny packed model saved to disk, a batch of ids and its logits."""
    model = BitNetA48ForCausalLM(BitNetA48Config(**tiny_config_kwargs)).pack().eval()
    folder = tmp_path / "packed"
    model.save_pretrained(folder)
    ids = torch.randint(3, tiny_config_kwargs["vocab_size"], (2, 9))
    with torch.no_grad():
        return folder, ids, model(ids).logits


@pytest.mark.parametrize(
    "load_kwargs",
    [dict(device_map="auto"), dict(low_cpu_mem_usage=True), dict(device_map="auto", low_cpu_mem_usage=True)],
    ids=["device_map", "low_cpu_mem_usage", "both"],
)
def test_tiny_packed_loads_with_device_map_auto(
    packed_folder: tuple[Path, torch.Tensor, torch.Tensor], load_kwargs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, ids, logits = packed_folder
    built_on: list[str] = []
    init = PackedBitLinear.__init__

    def spy(self: PackedBitLinear, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)
        built_on.append(self.weight.device.type)

    monkeypatch.setattr(PackedBitLinear, "__init__", spy)
    loaded = BitNetA48ForCausalLM.from_pretrained(folder, **load_kwargs).eval()
    # from_pretrained builds under torch.device("meta"): the packed buffers are not allocated before loading.
    assert built_on and set(built_on) == {"meta"}
    state = loaded.state_dict()
    assert {t.device.type for t in state.values()} == {"cpu"}
    assert state["model.layers.0.mlp.down_proj.weight"].dtype == torch.uint8
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)


def test_tiny_packed_offloads_layers_to_disk(packed_folder: tuple[Path, torch.Tensor, torch.Tensor]) -> None:
    folder, ids, logits = packed_folder
    probe = BitNetA48ForCausalLM.from_pretrained(folder)
    sizes = compute_module_sizes(probe)
    cpu = sizes["model.embed_tokens"] + sizes["lm_head"] + sizes["model.layers.0"] + 2048  # room for one layer
    loaded = BitNetA48ForCausalLM.from_pretrained(
        folder, device_map="auto", max_memory={"cpu": cpu}, offload_folder=folder.parent / "offload"
    ).eval()
    assert loaded.hf_device_map["model.layers.0"] == "cpu"
    assert loaded.hf_device_map["model.layers.1"] == "disk", loaded.hf_device_map
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)  # uint8 codes come back from disk bit for bit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp_two_processes_on_cpu_train_like_one(tmp_path: Path) -> None:
    """``accelerate launch --config_file configs/accelerate/fsdp.yaml`` (FSDP2) with 2 processes on CPU (gloo): two
    sharded steps equal one process's.

    accelerate 1.15 does not shard on CPU itself (it reports MULTI_CPU), so the script applies torch's
    ``fully_shard`` per ``_no_split_modules`` class; see tests/fsdp_train_script.py.
    """
    out = tmp_path / "fsdp.json"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    config = TESTS.parent / "configs" / "accelerate" / "fsdp.yaml"  # the shipped file
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
           "--main_process_port", str(_free_port()), str(TESTS / "fsdp_train_script.py"), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["backend"] == "gloo"
    # When accelerate starts sharding on CPU this turns into FSDP: then use accelerator.prepare in the script.
    assert report["accelerate_distributed_type"] == "DistributedType.MULTI_CPU"
    assert report["fsdp_modules"] == ["model.layers.0", "model.layers.1"] and report["root_is_fsdp"]
    assert report["sharded_parameters"] == report["parameters"] > 0
    assert report["losses"] == pytest.approx(report["reference_losses"], rel=1e-5)
    assert report["param_update_norm"] > 0.1  # the steps did move the weights
    assert report["relative_param_diff"] < 1e-3, report
