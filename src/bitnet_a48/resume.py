"""What a resumable checkpoint records beyond transformers' `Trainer` files, and how a resume checks it.

`Trainer` writes ``checkpoint-N/`` in place (model, tokenizer, ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``,
``trainer_state.json``, in that order; transformers 5.17 to 5.24 alike), with no temporary folder and no mark of
completion, and ``trainer_utils.get_last_checkpoint`` takes the highest N whatever the folder holds. So a process
killed while it writes leaves a folder that looks like the newest checkpoint. Here every checkpoint gets one more
file, :data:`RESUME_FILE`, written last (into a temporary name, then renamed, after every file of the folder is
flushed to disk): a folder without it is incomplete and :func:`last_complete_checkpoint` passes over it.

The file holds the run's fingerprint, four sections that a resume must match (:func:`check_resume`, one-line
`ValueError` naming what differs):

* ``data``: the corpus source and its loading options, the split, the packing (``seq_len``, shuffle seed), SHA-256
  of the documents of each split and of the packed training blocks (the token ids in training order);
* ``tokenizer``: how it was chosen (a name, or a BPE trained to ``vocab_size``) and SHA-256 of its serialised
  ``tokenizers`` pipeline (or of its vocabulary) with its special token ids;
* ``model_config``: ``config.to_dict()`` without what training changes (``quant_mode``, ``use_cache``) and metadata;
* ``recipe``: the `RecipeConfig` fields that shape the trajectory (schedule, batch, seed), not the logging or
  evaluation cadence. A schedule rebuilt from other arguments is what made the learning rate jump on resume.

and the names and sizes of the checkpoint's files. Standard library and hashlib only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RESUME_FILE = "bitnet_a48_resume.json"
_TEMPORARY_FILE = f".{RESUME_FILE}.tmp"
FORMAT_VERSION = 1
SECTIONS = {
    "data": "the data",
    "tokenizer": "the tokenizer",
    "model_config": "the model config",
    "recipe": "the recipe",
}
# Config fields that training itself changes (the recipe sets quant_mode, Trainer sets use_cache) or that only
# describe the file.
CONFIG_FIELDS_IGNORED = (
    "quant_mode",
    "use_cache",
    "transformers_version",
    "architectures",
    "auto_map",
    "_name_or_path",
)
# RecipeConfig fields that do not change the weights: how often to log, evaluate and save.
RECIPE_FIELDS_IGNORED = ("logging_steps", "eval_steps", "eval_blocks", "save_steps")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def sha256_text(parts: Iterable[str]) -> str:
    """SHA-256 of the strings, each prefixed by its length (so the split between them counts)."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8")
        digest.update(f"{len(data)}:".encode())
        digest.update(data)
    return digest.hexdigest()


def documents_sha256(docs: Iterable[Any]) -> str:
    """SHA-256 of the names and texts of `data.Document`s, in order."""
    return sha256_text(part for doc in docs for part in (doc.name, doc.text))


def blocks_sha256(blocks: Any) -> str:
    """SHA-256 of a 2-D int64 tensor of token ids (shape included)."""
    digest = hashlib.sha256(f"{tuple(blocks.shape)}".encode())
    digest.update(blocks.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def tokenizer_sha256(tokenizer: Any) -> str:
    """SHA-256 of what tokenises: the ``tokenizers`` pipeline as JSON (or the vocabulary) and the special token ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    return sha256_text([body, json.dumps(specials)])


def config_fingerprint(config: Any) -> dict[str, Any]:
    return _plain({k: v for k, v in config.to_dict().items() if k not in CONFIG_FIELDS_IGNORED})


def recipe_fingerprint(recipe_fields: dict[str, Any]) -> dict[str, Any]:
    return _plain({k: v for k, v in recipe_fields.items() if k not in RECIPE_FIELDS_IGNORED})


def _plain(value: Any) -> Any:
    """As it reads back from JSON (tuples become lists), so a fingerprint compares equal to its saved copy."""
    return json.loads(json.dumps(value))


# ---------------------------------------------------------------------------------------------------------
# The file: written last, read on resume
# ---------------------------------------------------------------------------------------------------------


def write_resume_file(checkpoint: str | os.PathLike[str], fingerprint: dict[str, Any], global_step: int) -> Path:
    """Flush every file of `checkpoint` to disk, then write :data:`RESUME_FILE` atomically (temporary name, rename)."""
    folder = Path(checkpoint)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (RESUME_FILE, _TEMPORARY_FILE)):
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        files[path.relative_to(folder).as_posix()] = path.stat().st_size
    payload = {"format_version": FORMAT_VERSION, "global_step": global_step, **_plain(fingerprint), "files": files}
    temporary = folder / _TEMPORARY_FILE
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(payload, indent=1) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, folder / RESUME_FILE)
    return folder / RESUME_FILE


def remove_resume_file(checkpoint: str | os.PathLike[str]) -> None:
    """Mark `checkpoint` incomplete before it is written again (a rewrite killed halfway must not look complete)."""
    (Path(checkpoint) / RESUME_FILE).unlink(missing_ok=True)


def read_resume_file(checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """The fingerprint of a complete checkpoint; `FileNotFoundError` / `ValueError` in one line otherwise."""
    folder = Path(checkpoint)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    path = folder / RESUME_FILE
    if not path.is_file():
        raise ValueError(
            f"{folder} is not a complete checkpoint: it has no {RESUME_FILE} (written last; the write "
            "was interrupted, or the folder was not written by bitnet_a48's trainer)"
        )
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {payload.get('format_version')!r}, this version reads {FORMAT_VERSION}"
        )
    for name, size in payload["files"].items():
        file = folder / name
        if not file.is_file() or file.stat().st_size != size:
            found = file.stat().st_size if file.is_file() else "no file"
            raise ValueError(f"{folder} changed after it was written: {name} has {found} bytes, {size} when saved")
    return payload


def checkpoint_folders(output_dir: str | os.PathLike[str]) -> list[Path]:
    """The ``checkpoint-N`` folders of `output_dir`, highest N first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def last_complete_checkpoint(output_dir: str | os.PathLike[str]) -> tuple[Path | None, list[Path]]:
    """The highest ``checkpoint-N`` of `output_dir` that holds :data:`RESUME_FILE`, and the newer incomplete ones."""
    skipped = []
    for folder in checkpoint_folders(output_dir):
        if (folder / RESUME_FILE).is_file():
            return folder, skipped
        skipped.append(folder)
    return None, skipped


def check_resume(
    checkpoint: str | os.PathLike[str], fingerprint: dict[str, Any], recipe_may_change: Iterable[str] = ()
) -> dict[str, Any]:
    """Raise `ValueError` (one line) where `fingerprint` differs from the checkpoint's; return the saved payload.

    ``recipe_may_change``: recipe fields left out of the comparison (a run that branches off with another recipe).
    """
    saved = read_resume_file(checkpoint)
    skipped = {"recipe": set(recipe_may_change)}
    problems = []
    for section, label in SECTIONS.items():
        now, then = _plain(fingerprint.get(section, {})), saved.get(section, {})
        keys = [k for k in dict.fromkeys([*then, *now]) if k not in skipped.get(section, ())]
        diffs = [
            f"{k} {_short(now.get(k))} (checkpoint: {_short(then.get(k))})" for k in keys if now.get(k) != then.get(k)
        ]
        if diffs:
            problems.append(f"{label} differs: {', '.join(diffs)}")
    if problems:
        raise ValueError(f"cannot resume from {checkpoint}: {'; '.join(problems)}")
    return saved


def _short(value: Any) -> str:
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
        return value[:12]
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
