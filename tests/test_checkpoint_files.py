"""checkpoint_files: broken weight files fail with one line naming the file, without reading a tensor."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bitnet_a48.checkpoint_files import validate_safetensors_file, validate_safetensors_files

TENSORS = {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
           "b.bias": torch.ones(4, dtype=torch.bfloat16)}


def _save(path: Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    save_file(TENSORS if tensors is None else tensors, str(path), metadata={"format": "pt"})
    return path


def _split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write(path: Path, header: dict | bytes, data: bytes) -> Path:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def _error(path: Path, exc: type[Exception] = ValueError) -> str:
    with pytest.raises(exc) as info:
        validate_safetensors_files(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_sound_file_and_folder_pass(tmp_path: Path) -> None:
    path = _save(tmp_path / "model.safetensors")
    validate_safetensors_files(path)
    validate_safetensors_files(tmp_path)
    assert set(validate_safetensors_file(path)) == {"__metadata__", *TENSORS}
    # Our own re-write of a header is accepted by safetensors too, so the corruptions below are the only change.
    header, data = _split(path)
    _write(tmp_path / "rewritten.safetensors", header, data)
    validate_safetensors_files(tmp_path)
    assert torch.equal(load_file(str(tmp_path / "rewritten.safetensors"))["a.weight"], TENSORS["a.weight"])


def test_truncated_file(tmp_path: Path) -> None:
    path = _save(tmp_path / "model.safetensors")
    path.write_bytes(path.read_bytes()[:-5])
    message = _error(tmp_path)
    assert message == f"{path}: truncated: header says 32 bytes of tensor data, file has 27"


def test_corrupt_header_length(tmp_path: Path) -> None:
    path = _save(tmp_path / "model.safetensors")
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 10**12) + raw[8:])
    assert _error(path).startswith(f"{path}: corrupt header length: it says 1000000000000 bytes of header")
    path.write_bytes(b"\x01\x02\x03")
    assert "model.safetensors: 3 bytes, too short" in _error(path)


def test_header_length_off_by_some_bytes_is_not_json(tmp_path: Path) -> None:
    path = _save(tmp_path / "model.safetensors")
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    path.write_bytes(struct.pack("<Q", n - 40) + raw[8:])  # the JSON is cut short (past its padding spaces)
    assert f"{path}: header ({n - 40} bytes) is not valid JSON" in _error(path)
    path.write_bytes(struct.pack("<Q", n + 4) + raw[8:])  # tensor bytes read as header
    assert "is not valid JSON" in _error(path)


def test_non_json_header(tmp_path: Path) -> None:
    _, data = _split(_save(tmp_path / "model.safetensors"))
    path = _write(tmp_path / "model.safetensors", b"\xff not json at all", data)
    assert _error(path).startswith(f"{path}: header (17 bytes) is not valid JSON")
    _write(path, b"[1, 2]", data)
    assert "header is a JSON list, not an object of tensors" in _error(path)


def test_offsets_beyond_the_end(tmp_path: Path) -> None:
    header, data = _split(_save(tmp_path / "model.safetensors"))
    header["b.bias"]["shape"], header["b.bias"]["data_offsets"] = [400], [24, 824]
    path = _write(tmp_path / "model.safetensors", header, data)
    assert _error(path) == f"{path}: truncated: header says 824 bytes of tensor data, file has 32"


def test_offsets_that_do_not_fit_dtype_shape_or_each_other(tmp_path: Path) -> None:
    header, data = _split(_save(tmp_path / "model.safetensors"))
    path = tmp_path / "model.safetensors"
    wrong_size = json.loads(json.dumps(header))
    wrong_size["a.weight"]["data_offsets"] = [0, 20]
    _write(path, wrong_size, data)
    assert "tensor 'a.weight': data_offsets span 20 bytes, a F32 tensor of shape [2, 3] needs 24" in _error(path)
    overlap = json.loads(json.dumps(header))
    overlap["b.bias"]["data_offsets"] = [16, 24]
    _write(path, overlap, data)
    assert "tensor 'b.bias' at data_offsets [16, 24] overlaps the previous tensor" in _error(path)
    _write(path, header, data + b"\0" * 8)
    assert "header says 32 bytes of tensor data, file has 40 (8 unexplained bytes at the end)" in _error(path)
    backwards = json.loads(json.dumps(header))
    backwards["a.weight"]["data_offsets"] = [24, 0]
    _write(path, backwards, data)
    assert "data_offsets [24, 0] end before they begin" in _error(path)
    no_dtype = json.loads(json.dumps(header))
    del no_dtype["a.weight"]["dtype"]
    _write(path, no_dtype, data)
    assert "tensor 'a.weight': missing or non-string dtype" in _error(path)


def test_every_file_of_a_folder_is_checked(tmp_path: Path) -> None:
    _save(tmp_path / "a.safetensors")
    bad = _save(tmp_path / "b.safetensors")
    bad.write_bytes(bad.read_bytes()[:-1])
    assert _error(tmp_path).startswith(f"{bad}: truncated")


def test_sharded_folder_and_its_index(tmp_path: Path) -> None:
    _save(tmp_path / "model-00001-of-00002.safetensors", {"a.weight": TENSORS["a.weight"]})
    _save(tmp_path / "model-00002-of-00002.safetensors", {"b.bias": TENSORS["b.bias"]})
    index = tmp_path / "model.safetensors.index.json"
    weight_map = {"a.weight": "model-00001-of-00002.safetensors", "b.bias": "model-00002-of-00002.safetensors"}
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    validate_safetensors_files(tmp_path)

    index.write_text(json.dumps({"weight_map": {**weight_map, "b.bias": "model-00001-of-00002.safetensors"}}))
    assert _error(tmp_path) == (f"{index}: tensor 'b.bias' is mapped to model-00001-of-00002.safetensors, "
                                "which does not hold it")
    index.write_text(json.dumps({"weight_map": {**weight_map, "c": "model-00003-of-00003.safetensors"}}))
    assert "tensor 'c' is in shard 'model-00003-of-00003.safetensors', which is not in" in _error(
        tmp_path, FileNotFoundError)
    index.write_text("{not json")
    assert _error(tmp_path).startswith(f"{index}: not valid JSON")
    index.write_text(json.dumps({"weight_map": ["a.weight"]}))
    assert "weight_map is not an object" in _error(tmp_path)


def test_pickle_checkpoints_are_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    (tmp_path / "extra.pt").write_bytes(b"never unpickled")
    message = _error(tmp_path)
    assert "only pickle checkpoints (extra.pt, pytorch_model.bin)" in message
    assert "only safetensors weights are loaded" in message
    assert "only safetensors weights are loaded" in _error(tmp_path / "extra.pt")
    # Beside safetensors weights, a pickle (a Trainer's training_args.bin) is left alone.
    _save(tmp_path / "model.safetensors")
    validate_safetensors_files(tmp_path)


def test_missing_folder_and_folder_without_weights(tmp_path: Path) -> None:
    assert "no such file or folder" in _error(tmp_path / "missing", FileNotFoundError)
    (tmp_path / "config.json").write_text("{}")
    assert _error(tmp_path, FileNotFoundError) == f"{tmp_path}: no *.safetensors weights in this folder"


def test_module_stands_alone_on_the_standard_library(tmp_path: Path) -> None:
    """Loaded by file path, as transformers' remote-code loader would: no torch, no transformers, no package."""
    path = _save(tmp_path / "model.safetensors")
    source = Path(__file__).parents[1] / "src" / "bitnet_a48" / "checkpoint_files.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('checkpoint_files', {str(source)!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        f"module.validate_safetensors_files({str(path)!r})\n"
        "print(sorted(m for m in ('torch', 'transformers', 'safetensors', 'bitnet_a48') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def _console(*args: str) -> list[str]:
    script = Path(sys.executable).parent / "bitnet-a48"
    return [str(script), *args] if script.is_file() else [sys.executable, "-m", "bitnet_a48.cli", *args]


def test_generate_on_a_corrupt_folder_fails_with_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bitnet_a48"}))
    path = _save(folder / "model.safetensors")
    path.write_bytes(path.read_bytes()[:-5])
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(_console("generate", str(folder), "--max-new-tokens", "2"), capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert lines == [f"bitnet-a48 generate: error: {path}: truncated: header says 32 bytes of tensor data, "
                     "file has 27"], proc.stderr


def test_from_pretrained_checks_the_files_and_loads_safetensors_only(tmp_path: Path, tiny_config_kwargs: dict) -> None:
    from bitnet_a48 import create_model
    from bitnet_a48.modeling_bitnet_a48 import BitNetA48ForCausalLM

    folder = tmp_path / "model"
    create_model(**tiny_config_kwargs).save_pretrained(folder)
    weights = folder / "model.safetensors"
    assert BitNetA48ForCausalLM.from_pretrained(folder) is not None
    with pytest.raises(ValueError, match="safetensors weights only"):
        BitNetA48ForCausalLM.from_pretrained(folder, use_safetensors=False)
    weights.write_bytes(weights.read_bytes()[:-100])
    name = re.escape(str(weights))
    with pytest.raises(ValueError, match=rf"^{name}: truncated: header says \d+ bytes of tensor data, file has \d+$"):
        BitNetA48ForCausalLM.from_pretrained(folder)
    header, data = _split(_save(tmp_path / "x.safetensors"))
    _write(weights, b"{not json" + b" " * 7, data)
    with pytest.raises(ValueError, match=rf"^{name}: "):
        BitNetA48ForCausalLM.from_pretrained(folder)
