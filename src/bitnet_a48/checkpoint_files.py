"""Checks of a model folder's weight files before anything loads them, so bad files fail with one clear line.

A ``.safetensors`` file is laid out as

    [8 bytes: N, unsigned little-endian] [N bytes: UTF-8 JSON header, may end in spaces] [tensor data]

The header maps each tensor name to ``{"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}``, offsets in
bytes from the start of the tensor data, and may hold ``"__metadata__"`` (str -> str). The tensors tile the data
exactly: sorted by offset, each begins where the previous ends, and the last ends at the end of the file.

`validate_safetensors_files` reads only the headers (a few KB a file), never the tensors, and raises `ValueError`
naming the file and what is wrong: safetensors' own messages name neither. It refuses pickle checkpoints (``.bin``,
``.pt``, ``.pth``, ``.ckpt``): loading one runs code from the file. Standard library only (no torch, no transformers),
so the command line and the model's loader can call it before the heavy imports.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

SAFETENSORS_SUFFIX = ".safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
HEADER_LENGTH_BYTES = 8
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
# Bits per element of the safetensors dtypes; a dtype missing here only skips the size check of its tensors.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "I64": 64, "U64": 64,
    "F64": 64,
}


def validate_safetensors_files(path: str | os.PathLike[str]) -> None:
    """Check the safetensors weights of a model folder (every ``*.safetensors`` file and the shard index) or one file.

    Raises:
        FileNotFoundError: ``path`` does not exist, a folder has no weights, or the index names a missing shard.
        ValueError: a file is not a well-formed safetensors file, the index is malformed or does not match the
            shards, or the folder holds only pickle checkpoints. The message is one line naming the file.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise ValueError(f"{path}: pickle checkpoint; only safetensors weights are loaded")
        validate_safetensors_file(path)
        return
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    files = sorted(p for p in path.iterdir() if p.name.endswith(SAFETENSORS_SUFFIX) and p.is_file())
    index = path / SAFETENSORS_INDEX_NAME
    if not files and not index.is_file():
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
        if pickled:
            raise ValueError(f"{path}: no *.safetensors weights, only pickle checkpoints ({', '.join(pickled)}); "
                             "only safetensors weights are loaded (re-save them with safetensors)")
        raise FileNotFoundError(f"{path}: no *.safetensors weights in this folder")
    headers = {p.name: validate_safetensors_file(p) for p in files}
    if index.is_file():
        _check_index(index, headers)


def validate_safetensors_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check one safetensors file without reading its tensors; returns its header (tensor name -> entry)."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_LENGTH_BYTES:
        raise ValueError(f"{path}: {size} bytes, too short for a safetensors file (its header length alone is "
                         f"{HEADER_LENGTH_BYTES} bytes)")
    with path.open("rb") as f:
        (header_bytes,) = struct.unpack("<Q", f.read(HEADER_LENGTH_BYTES))
        room = size - HEADER_LENGTH_BYTES
        if header_bytes > room or header_bytes > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: corrupt header length: it says {header_bytes} bytes of header, the file has "
                             f"{room} bytes after the length field")
        raw = f.read(header_bytes)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: header ({header_bytes} bytes) is not valid JSON: {err}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is a JSON {type(header).__name__}, not an object of tensors")
    data_bytes = room - header_bytes
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict):
                raise ValueError(f"{path}: __metadata__ is not an object")
            continue
        spans.append((*_tensor_span(path, name, entry), name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            what = "overlaps the previous tensor" if begin < end else f"leaves a gap of {begin - end} bytes before it"
            raise ValueError(f"{path}: tensor {name!r} at data_offsets [{begin}, {stop}] {what}")
        end = stop
    if end > data_bytes:
        raise ValueError(f"{path}: truncated: header says {end} bytes of tensor data, file has {data_bytes}")
    if end < data_bytes:
        raise ValueError(f"{path}: header says {end} bytes of tensor data, file has {data_bytes} "
                         f"({data_bytes - end} unexplained bytes at the end)")
    return header


def _tensor_span(path: Path, name: str, entry: Any) -> tuple[int, int]:
    """``(begin, end)`` of one header entry, after checking its fields and that the span fits dtype and shape."""
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: tensor {name!r}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise ValueError(f"{path}: tensor {name!r}: missing or non-string dtype")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise ValueError(f"{path}: tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise ValueError(f"{path}: tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if end < begin:
        raise ValueError(f"{path}: tensor {name!r}: data_offsets [{begin}, {end}] end before they begin")
    bits = DTYPE_BITS.get(dtype)
    if bits is not None:
        need = math.prod(shape) * bits
        if need % 8 or end - begin != need // 8:
            raise ValueError(f"{path}: tensor {name!r}: data_offsets span {end - begin} bytes, a {dtype} tensor of "
                             f"shape {shape} needs {need / 8:g}")
    return begin, end


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_index(index: Path, headers: dict[str, dict[str, Any]]) -> None:
    """The shard index is an object with a ``weight_map`` whose every tensor lives in the shard it names."""
    try:
        content = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{index}: not valid JSON: {err}") from None
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: weight_map is not an object of tensor name -> shard file name")
    for name, shard in weight_map.items():
        if shard not in headers:
            raise FileNotFoundError(f"{index}: tensor {name!r} is in shard {shard!r}, which is not in "
                                    f"{index.parent}")
        if name not in headers[shard]:
            raise ValueError(f"{index}: tensor {name!r} is mapped to {shard}, which does not hold it")
