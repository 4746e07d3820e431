"""Corpora of any size to packed token blocks on `datasets`, in bounded memory, cached on disk.

Every source goes the same way (:class:`CorpusPipeline`):

1. *documents*: a `datasets.Dataset` of memory-mapped Arrow. Local ``.txt`` / ``.md`` files and folders (one document a
   file) and the embedded ``"shakespeare"`` are read file by file into ``documents.arrow`` (columns ``text``, ``doc``);
   ``.jsonl`` / ``.json`` / ``.parquet`` files go through `datasets.load_dataset`, a ``.arrow`` file or a
   ``save_to_disk`` folder through `datasets`' own readers, any other name through `datasets.load_dataset` (network).
   Empty documents are dropped; document ``i`` is the ``i``-th that is left.
2. *split*: document ``i`` is validation when ``i % validation_every == 0``; a single document is cut at a line break
   (data.split_documents' rule) into a training and a validation document.
3. *tokens*: a batched `map` (``num_proc`` processes) writes ``<cache>/.../tokens*.arrow``: one row per piece of at
   most :data:`PIECE_CHARS` characters (long documents are cut at a line break followed by a non-space, where a
   byte-level BPE pre-tokeniser cuts anyway, so its tokens equal the whole document's), ``input_ids`` int32.
4. *blocks*: one pass over the token files (read batch by batch, not mapped) feeds data.BlockPacker per split, which
   writes ``train.arrow`` / ``validation.arrow`` (fixed-size lists of ``seq_len`` int32); the training blocks are read
   through one seeded permutation (data.PackedDataset.from_arrow).

So the corpus, its tokens and its blocks never sit in memory; what memory the pages of mapped files take is the
kernel's page cache. With ``streaming``, steps 1 and 3 run lazily on `datasets.IterableDataset` and
:class:`StreamingPackedDataset` packs on the fly (for corpora larger than the disk).

The cache (``cache_dir``, default ``$BITNET_A48_DATA_CACHE`` or ``<HF datasets cache>/bitnet_a48``) is keyed by the
source's identity (resolved paths, sizes and modification times of local files; the name, config and split of a Hub
dataset), the loading and split options, then SHA-256 of the tokenizer, then ``seq_len``; each level's ``*.json`` is
written last, so an interrupted run leaves nothing that a later one would take as complete. A lock lets the first of
several processes build and the others reuse.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from filelock import FileLock
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .data import (
    EMBEDDED_CORPORA,
    JSON_SUFFIXES,
    PARQUET_SUFFIXES,
    TEXT_SUFFIXES,
    BlockPacker,
    PackedDataset,
    StreamingPackedDataset,
    check_blocks,
    markdown_play_to_text,
    shakespeare_files,
)
from .resume import tokenizer_sha256

PIPELINE_VERSION = 1  # part of every cache key: bump when what a stage writes changes
PIECE_CHARS = 1 << 14  # longest piece of text tokenised at once
MAP_BATCH = 16  # pieces per tokenisation batch: at most 256 K characters, their tokens as Python lists
ARROW_SUFFIXES = (".arrow",)
CACHE_ENV = "BITNET_A48_DATA_CACHE"
_FLUSH_TOKENS = 1 << 22  # blocks are written in record batches of about this many tokens


def default_cache_dir() -> Path:
    """``$BITNET_A48_DATA_CACHE``, else ``bitnet_a48`` under `datasets`' cache (``HF_DATASETS_CACHE``)."""
    return Path(os.environ.get(CACHE_ENV) or Path(datasets.config.HF_DATASETS_CACHE) / "bitnet_a48")


def _sha(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# ---------------------------------------------------------------------------------------------------------
# Text: pieces of documents
# ---------------------------------------------------------------------------------------------------------


def _piece_cut(text: str, hi: int) -> int:
    """End of the first piece of ``text`` (len > hi): after the last ``\\n`` before ``hi`` between two non-spaces
    (GPT-2's pre-tokeniser splits there: ``x\\nY`` is ``x``, ``\\n``, ``Y`` whether or not the text is cut after
    ``\\n``); at ``hi`` when there is none."""
    p = text.rfind("\n", 1, hi - 1)
    while p > 0 and (text[p + 1].isspace() or text[p - 1].isspace()):
        p = text.rfind("\n", 1, p)
    return p + 1 if p > 0 else hi


def text_pieces(text: str, limit: int | None = None) -> Iterator[str]:
    """``text`` in consecutive pieces of at most ``limit`` (:data:`PIECE_CHARS`) characters, cut at line breaks."""
    limit = limit or PIECE_CHARS
    while len(text) > limit:
        cut = _piece_cut(text, limit)
        yield text[:cut]
        text = text[cut:]
    yield text


def _file_pieces(path: Path, limit: int) -> Iterator[str]:
    """:func:`text_pieces` of a file's text, read ``limit`` characters at a time."""
    buffer = ""
    with open(path, encoding="utf-8") as handle:
        while chunk := handle.read(limit):
            buffer += chunk
            while len(buffer) > limit:
                cut = _piece_cut(buffer, limit)
                yield buffer[:cut]
                buffer = buffer[cut:]
    yield buffer


def _document_rows(kind: str, files: list[Path], limit: int, max_documents: int | None) -> Iterator[dict]:
    """Rows ``{"text", "doc"}`` of the non-empty text files (or embedded plays), numbered from 0, in pieces."""
    doc = 0
    for path in files:
        if max_documents is not None and doc >= max_documents:
            return
        try:
            if kind == "embedded":
                pieces = text_pieces(markdown_play_to_text(path.read_text(encoding="utf-8")), limit)
            else:
                pieces = _file_pieces(path, limit)
            pending: list[str] = []  # leading white space, kept only if the file has text
            for piece in pieces:
                if pending is not None and not piece.strip():
                    pending.append(piece)
                    continue
                for text in (pending or []) + [piece]:
                    yield {"text": text, "doc": doc}
                pending = None
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read {path}: {_first_line(err)}") from err
        if pending is None:
            doc += 1


def _training_texts(batches: Iterator[dict[str, list]], field: str, every: int,
                    max_chars: int | None) -> Iterator[str]:
    """Texts of the training documents (``doc % every != 0``) of batches of documents, up to ``max_chars``."""
    seen, position = 0, 0
    for batch in batches:
        texts = batch[field]
        numbers = batch["doc"] if "doc" in batch else range(position, position + len(texts))
        position += len(texts)
        for text, doc in zip(texts, numbers, strict=True):
            if doc % every:
                yield str(text)
                seen += len(str(text))
                if max_chars is not None and seen >= max_chars:
                    return


def _has_text(texts: list[Any]) -> list[bool]:
    return [t is not None and bool(str(t).strip()) for t in texts]


def _tokenize_batch(batch: dict[str, list], indices: list[int], tokenizer: PreTrainedTokenizerBase,
                    text_field: str, limit: int) -> dict[str, list]:
    """Batched `map` function: rows (text, doc) to pieces (input_ids, doc, chars); ``doc`` is the row's index when the
    documents have no ``doc`` column."""
    texts, docs = [], []
    for k, text in enumerate(batch[text_field]):
        doc = batch["doc"][k] if "doc" in batch else indices[k]
        for piece in text_pieces(str(text), limit):
            texts.append(piece)
            docs.append(doc)
    ids = tokenizer(texts, add_special_tokens=False, verbose=False, return_attention_mask=False)["input_ids"]
    return {"input_ids": ids, "doc": docs, "chars": [len(t) for t in texts]}


TOKEN_FEATURES = datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                                    "doc": datasets.Value("int64"), "chars": datasets.Value("int64")})


# ---------------------------------------------------------------------------------------------------------
# Arrow files written here (documents, blocks): Arrow stream format, as `datasets` writes its own
# ---------------------------------------------------------------------------------------------------------


class _ArrowWriter:
    """Record batches into ``path`` through a temporary name (renamed by :meth:`close`)."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path, self.schema = path, schema
        self._temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self._sink = pa.OSFile(str(self._temporary), "wb")
        self._writer = pa.ipc.new_stream(self._sink, schema)

    def write(self, columns: list[pa.Array]) -> None:
        self._writer.write_batch(pa.record_batch(columns, schema=self.schema))

    def close(self) -> None:
        self._writer.close()
        self._sink.close()
        os.replace(self._temporary, self.path)


class _BlockWriter:
    """Blocks ``(n, seq_len)`` into an Arrow file of fixed-size int32 lists; counts them and hashes their bytes."""

    def __init__(self, path: Path, seq_len: int) -> None:
        self.seq_len = seq_len
        self._out = _ArrowWriter(path, pa.schema([("input_ids", pa.list_(pa.int32(), seq_len))]))
        self._pending: list[np.ndarray] = []
        self._sha = hashlib.sha256()
        self.count = 0

    def write(self, blocks: np.ndarray) -> None:
        if len(blocks):
            self._pending.append(blocks.astype(np.int32))
            self.count += len(blocks)
            if sum(b.size for b in self._pending) >= _FLUSH_TOKENS:
                self._flush()

    def _flush(self) -> None:
        if self._pending:
            flat = np.concatenate(self._pending).reshape(-1)
            self._sha.update(flat.tobytes())
            self._out.write([pa.FixedSizeListArray.from_arrays(pa.array(flat), self.seq_len)])
            self._pending = []

    def close(self) -> str:
        self._flush()
        self._out.close()
        return self._sha.hexdigest()


def _arrow_batches(files: list[str]) -> Iterator[pa.RecordBatch]:
    """Record batches of Arrow stream files read from disk (not mapped: the pages do not stay with the process)."""
    for name in files:
        with pa.OSFile(name) as source:
            yield from pa.ipc.open_stream(source)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _progress_disabled() -> bool:
    return not datasets.utils.is_progress_bar_enabled()


@contextlib.contextmanager
def _terminal_bars() -> Iterator[None]:
    """Progress bars (ours and `datasets`') only on a terminal: a log or a captured stderr gets none."""
    hide = datasets.utils.is_progress_bar_enabled() and not sys.stderr.isatty()
    if hide:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if hide:
            datasets.enable_progress_bars()


# ---------------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------------


@dataclass
class CorpusOptions:
    """What to read and how to split it (data.load_documents' options and the split)."""

    source: str = "shakespeare"
    text_field: str = "text"
    dataset_config: str | None = None
    dataset_split: str = "train"
    max_documents: int | None = None
    validation_every: int = 10


@dataclass
class PackedSplits:
    """The packed training and validation blocks of a corpus and what they hold."""

    train: PackedDataset | StreamingPackedDataset
    validation: PackedDataset
    stats: dict[str, Any]  # per split: documents, characters, tokens, blocks (map-style only)
    reused: bool  # the blocks came from the cache (nothing tokenised)


class CorpusPipeline:
    """One corpus through the stages of the module docstring; :meth:`pack` and :meth:`stream` give the blocks."""

    def __init__(self, options: CorpusOptions, cache_dir: str | os.PathLike[str] | None = None,
                 num_proc: int | None = None) -> None:
        if options.validation_every < 2:
            raise ValueError(f"validation_every must be at least 2, got {options.validation_every}")
        self.options = options
        self.num_proc = num_proc if num_proc and num_proc > 1 else None
        self.kind, self.files = self._resolve()
        self.cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.identity = {**asdict(options), "version": PIPELINE_VERSION, "kind": self.kind,
                         "piece_chars": PIECE_CHARS, "files": self._files_identity()}
        if self.kind not in ("hub", "embedded"):
            self.identity["source"] = str(Path(options.source).expanduser().resolve())
        self.key = _sha(self.identity)[:24]
        self.cache = self.cache_root / self.key
        self.cache.mkdir(parents=True, exist_ok=True)

    # -- sources --------------------------------------------------------------------------------------

    def _resolve(self) -> tuple[str, list[Path]]:
        source = self.options.source
        if source in EMBEDDED_CORPORA:
            return "embedded", shakespeare_files()
        suffixes = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES
        if not (os.path.exists(source) or source.endswith(suffixes) or source.startswith((".", "/", "~"))):
            return "hub", []
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data file or folder not found: {path}")
        if path.is_dir() and (path / "state.json").is_file():
            return "saved", sorted(p for p in path.iterdir() if p.is_file())
        if path.is_dir():
            files = sorted((p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file()),
                           key=lambda p: p.relative_to(path).as_posix())
            if not files:
                raise ValueError(f"no {'/'.join(TEXT_SUFFIXES)} files in folder {path}")
            return "text", files
        for kind, kind_suffixes in (("json", JSON_SUFFIXES), ("parquet", PARQUET_SUFFIXES), ("arrow", ARROW_SUFFIXES)):
            if path.suffix in kind_suffixes:
                return kind, [path]
        return "text", [path]

    def _files_identity(self) -> list[list[Any]]:
        identity = []
        for path in self.files:
            stat = path.stat()
            identity.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
        return identity

    @property
    def _text_field(self) -> str:
        return "text" if self.kind in ("text", "embedded") else self.options.text_field

    def _records(self, streaming: bool) -> datasets.Dataset | datasets.IterableDataset:
        """The records of a jsonl / json / parquet / arrow file, a saved folder or a Hub dataset, as `datasets` reads
        them (into ``cache/hf`` for local files)."""
        o = self.options
        try:
            if self.kind == "hub":
                return datasets.load_dataset(o.source, o.dataset_config, split=o.dataset_split, streaming=streaming)
            if self.kind == "arrow":
                records = datasets.Dataset.from_file(str(self.files[0]))
            elif self.kind == "saved":
                records = datasets.load_from_disk(str(Path(o.source).expanduser()))
            else:
                return datasets.load_dataset(self.kind, data_files=str(self.files[0]), split="train",
                                             cache_dir=str(self.cache_root / "hf"), streaming=streaming)
        except (datasets.exceptions.DatasetGenerationError, pa.ArrowException, OSError, ValueError) as err:
            if self.kind == "hub":
                raise
            raise ValueError(f"cannot read {o.source}: {_first_line(err.__cause__ or err)}") from err
        return records.to_iterable_dataset() if streaming else records

    def _check_field(self, columns: list[str] | None) -> None:
        if columns is not None and self._text_field not in columns:
            raise ValueError(f"{self.options.source}: records have no field {self._text_field!r} "
                             f"(fields: {sorted(columns)})")

    def _empty(self) -> ValueError:
        return ValueError(f"no text found in {self.options.source!r} "
                          f"(empty file or no non-empty {self._text_field!r} field)")

    def documents(self) -> tuple[datasets.Dataset, int]:
        """The non-empty documents (memory-mapped) and how many there are; a single one already split."""
        o = self.options
        if self.kind in ("text", "embedded"):
            path, meta = self.cache / "documents.arrow", self.cache / "documents.json"
            if _read_json(meta) is None:
                writer = _ArrowWriter(path, pa.schema([("text", pa.string()), ("doc", pa.int64())]))
                rows, count, last = [], 0, -1
                for row in tqdm(_document_rows(self.kind, self.files, PIECE_CHARS, o.max_documents),
                                desc="reading documents", unit=" pieces", disable=_progress_disabled()):
                    rows.append(row)
                    count, last = count + 1, row["doc"]
                    if len(rows) == 256:
                        writer.write([pa.array([r["text"] for r in rows]), pa.array([r["doc"] for r in rows])])
                        rows = []
                if rows:
                    writer.write([pa.array([r["text"] for r in rows]), pa.array([r["doc"] for r in rows])])
                writer.close()
                _write_json(meta, {"pieces": count, "documents": last + 1})
            docs, count = datasets.Dataset.from_file(str(path)), _read_json(meta)["documents"]
        else:
            records = self._records(streaming=False)
            self._check_field(records.column_names)
            records = records.select_columns([self._text_field])
            if o.max_documents is not None:
                records = records.select(range(min(o.max_documents, len(records))))
            docs = records.filter(_has_text, input_columns=[self._text_field], batched=True, num_proc=self.num_proc,
                                  cache_file_name=str(self.cache / "nonempty.arrow"), desc="dropping empty documents")
            count = len(docs)
        if count == 0:
            raise self._empty()
        if count == 1:
            docs = self._split_single(docs)
        return docs, count

    def _split_single(self, docs: datasets.Dataset) -> datasets.Dataset:
        """A single document cut as data.split_documents cuts it: training document 1, validation document 0."""
        field = self._text_field
        lengths = np.array([len(t) for batch in docs.iter(batch_size=64) for t in batch[field]], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        target = int(starts[-1] * (1 - 1 / self.options.validation_every))
        row, found = int(np.searchsorted(starts, target, side="right")) - 1, -1
        for r in range(min(row, len(lengths) - 1), -1, -1):  # the last line break before `target`
            text = docs[r][field]
            local = text.rfind("\n", 0, target - int(starts[r]) if r == row else len(text))
            if local >= 0:
                found = int(starts[r]) + local
                break
        cut = target if found <= 0 else found + 1
        cut_row = int(np.searchsorted(starts, cut, side="right")) - 1

        def relabel(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
            texts, labels = [], []
            for text, i in zip(batch[field], indices, strict=True):
                if i == cut_row:
                    head, tail = text[: cut - int(starts[i])], text[cut - int(starts[i]):]
                    texts += [head, tail] if head else [tail]
                    labels += [1, 0] if head else [0]
                else:
                    texts.append(text)
                    labels.append(1 if i < cut_row else 0)
            return {"text": texts, "doc": labels}

        return docs.map(relabel, batched=True, with_indices=True, remove_columns=docs.column_names,
                        cache_file_name=str(self.cache / "single-split.arrow"), new_fingerprint=f"{self.key}-single",
                        desc="splitting the single document")

    def train_texts(self, max_chars: int | None = None) -> Iterator[str]:
        """The training split's text (pieces, in order), e.g. to train a BPE on; at most about ``max_chars``."""
        docs, _ = self.documents()
        field = "text" if "doc" in docs.column_names else self._text_field
        return _training_texts(docs.iter(batch_size=MAP_BATCH), field, self.options.validation_every, max_chars)

    def bpe_tokenizer(self, vocab_size: int) -> PreTrainedTokenizerBase:
        """A byte-level BPE trained on the training split (tokenization_bitnet_a48), kept in the cache and reused."""
        from tokenizers import Tokenizer

        from .tokenization_bitnet_a48 import train_bpe_tokenizer, wrap_tokenizer

        path = self.cache / f"tokenizer-bpe{vocab_size}.json"
        with FileLock(str(self.cache_root / f"{self.key}.lock")), _terminal_bars():
            if path.is_file():
                return wrap_tokenizer(Tokenizer.from_file(str(path)))
            tokenizer = train_bpe_tokenizer(self.train_texts(), vocab_size=vocab_size)
            temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tokenizer.backend_tokenizer.save(str(temporary))
            os.replace(temporary, path)
        return tokenizer

    # -- tokens and blocks (map-style) ----------------------------------------------------------------

    def _tokens_dir(self, tokenizer: PreTrainedTokenizerBase) -> tuple[Path, str]:
        sha = tokenizer_sha256(tokenizer)
        folder = self.cache / f"tokens-{sha[:16]}"
        meta = _read_json(folder / "tokens.json")
        if meta is not None and (meta["tokenizer_sha256"] != sha or meta["vocab_size"] != len(tokenizer)):
            raise ValueError(f"the cached dataset {folder} was tokenised with another tokenizer (vocabulary "
                             f"{meta['vocab_size']}, sha256 {meta['tokenizer_sha256'][:12]}; this one: "
                             f"{len(tokenizer)}, {sha[:12]}); delete that folder or choose another --data-cache-dir")
        return folder, sha

    def _tokenize(self, tokenizer: PreTrainedTokenizerBase, folder: Path, sha: str) -> list[str]:
        """The token files (tokenising with a batched `map` unless they are cached)."""
        meta = _read_json(folder / "tokens.json")
        if meta is not None:
            return meta["files"]
        docs, count = self.documents()
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        tokens = docs.map(
            _tokenize_batch, batched=True, batch_size=MAP_BATCH, with_indices=True, remove_columns=docs.column_names,
            fn_kwargs={"tokenizer": tokenizer, "text_field": "text" if "doc" in docs.column_names else self._text_field,
                       "limit": PIECE_CHARS},
            features=TOKEN_FEATURES, num_proc=self.num_proc, cache_file_name=str(folder / "tokens.arrow"),
            writer_batch_size=MAP_BATCH, new_fingerprint=f"{self.key}-{sha[:16]}", desc="tokenising",
        )
        files = [f["filename"] for f in tokens.cache_files]
        _write_json(folder / "tokens.json", {"tokenizer_sha256": sha, "vocab_size": len(tokenizer), "files": files,
                                             "pieces": len(tokens), "documents": count,
                                             "seconds": time.perf_counter() - start, "num_proc": self.num_proc or 1})
        return files

    def pack(self, tokenizer: PreTrainedTokenizerBase, seq_len: int, shuffle_seed: int | None = 0) -> PackedSplits:
        """Training blocks (read through one permutation drawn from ``shuffle_seed``) and validation blocks (in
        order), memory-mapped from the cache, built there first if needed."""
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        folder, sha = self._tokens_dir(tokenizer)
        out = folder / f"blocks-{seq_len}"
        with FileLock(str(self.cache_root / f"{self.key}.lock")), _terminal_bars():
            meta = _read_json(out / "blocks.json")
            reused = meta is not None
            if meta is None:
                meta = self._write_blocks(tokenizer, self._tokenize(tokenizer, folder, sha), out, seq_len)
        for split, what in (("train", "training split"), ("validation", "validation split")):
            check_blocks(meta[split]["blocks"], meta[split]["tokens"], seq_len, what)
        train = PackedDataset.from_arrow(out / "train.arrow", shuffle_seed, meta["train"]["sha256"])
        validation = PackedDataset.from_arrow(out / "validation.arrow", None, meta["validation"]["sha256"])
        return PackedSplits(train, validation, meta, reused)

    def _write_blocks(self, tokenizer: PreTrainedTokenizerBase, files: list[str], out: Path,
                      seq_len: int) -> dict[str, Any]:
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        every = self.options.validation_every
        splits = ("train", "validation")
        packers = {s: BlockPacker(seq_len, tokenizer.bos_token_id, tokenizer.eos_token_id) for s in splits}
        writers = {s: _BlockWriter(out / f"{s}.arrow", seq_len) for s in splits}
        stats = {s: {"documents": 0, "characters": 0} for s in splits}
        last = {s: -1 for s in splits}
        pieces = _read_json(out.parent / "tokens.json")["pieces"]
        bar = tqdm(total=pieces, desc="packing", unit=" pieces", disable=_progress_disabled())
        for batch in _arrow_batches(files):
            ids, docs = batch.column("input_ids"), batch.column("doc").to_numpy()
            chars = batch.column("chars").to_numpy()
            flat, offsets = ids.flatten().to_numpy(), ids.offsets.to_numpy()
            offsets = offsets - offsets[0]
            validation = docs % every == 0
            for split, mask in (("validation", validation), ("train", ~validation)):
                rows = np.flatnonzero(mask)
                if not len(rows):
                    continue
                writers[split].write(packers[split].add((flat[offsets[r]:offsets[r + 1]] for r in rows), docs[rows]))
                stats[split]["documents"] += int(np.count_nonzero(np.diff(docs[rows], prepend=last[split])))
                stats[split]["characters"] += int(chars[rows].sum())
                last[split] = int(docs[rows][-1])
            bar.update(batch.num_rows)
        bar.close()
        meta: dict[str, Any] = {}
        for split in splits:
            writers[split].write(packers[split].finish())
            meta[split] = {**stats[split], "tokens": packers[split].num_tokens, "blocks": writers[split].count,
                           "sha256": writers[split].close()}
        meta["seconds"] = time.perf_counter() - start
        _write_json(out / "blocks.json", meta)
        return meta

    # -- streaming ------------------------------------------------------------------------------------

    def _stream_documents(self) -> tuple[datasets.IterableDataset, list[str]]:
        """The non-empty documents, lazily, and their columns (a ``doc`` column only for text files)."""
        o = self.options
        if self.kind in ("text", "embedded"):
            # A tuple, not a list: `datasets` would shard a list across generator calls, each numbering from 0.
            docs = datasets.IterableDataset.from_generator(
                _document_rows, gen_kwargs={"kind": self.kind, "files": tuple(self.files), "limit": PIECE_CHARS,
                                            "max_documents": o.max_documents},
                features=datasets.Features({"text": datasets.Value("string"), "doc": datasets.Value("int64")}))
            return docs, ["text", "doc"]
        docs = self._records(streaming=True)
        first = next(iter(docs.take(1)), None)
        if first is None:
            raise self._empty()
        self._check_field(list(first))
        if o.max_documents is not None:
            docs = docs.take(o.max_documents)
        return docs.filter(_has_text, input_columns=[self._text_field], batched=True), list(first)

    def stream_train_texts(self, max_chars: int | None = None) -> Iterator[str]:
        """:meth:`train_texts` from the lazy documents (nothing written to disk)."""
        docs, _ = self._stream_documents()
        return _training_texts(docs.iter(batch_size=MAP_BATCH), self._text_field, self.options.validation_every,
                               max_chars)

    def stream_tokens(self, tokenizer: PreTrainedTokenizerBase) -> datasets.IterableDataset:
        """Lazy tokens (input_ids, doc, chars) of the non-empty documents: the same `map` function as :meth:`pack`."""
        docs, columns = self._stream_documents()
        return docs.map(_tokenize_batch, batched=True, batch_size=MAP_BATCH, with_indices=True, remove_columns=columns,
                        fn_kwargs={"tokenizer": tokenizer, "text_field": self._text_field, "limit": PIECE_CHARS},
                        features=TOKEN_FEATURES)

    def stream(self, tokenizer: PreTrainedTokenizerBase, seq_len: int, shuffle_seed: int | None = 0,
               validation_blocks: int = 1024, shuffle_buffer: int = 1024) -> PackedSplits:
        """A :class:`StreamingPackedDataset` of training blocks and the first ``validation_blocks`` validation blocks
        (in memory). Needs several documents: the single-document split needs the whole text first."""
        common = dict(tokens=self.stream_tokens(tokenizer), seq_len=seq_len, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, validation_every=self.options.validation_every,
                      batch_size=MAP_BATCH)
        head = StreamingPackedDataset(split="validation", **common)
        blocks = [b for _, b in zip(range(validation_blocks), head.iter_blocks(), strict=False)]
        if not blocks:
            raise ValueError(f"the validation split of {self.options.source!r} (streamed) has less than one sequence "
                             f"of {seq_len} tokens; --streaming needs a corpus of several documents")
        validation = PackedDataset(torch.from_numpy(np.stack(blocks)))
        identity = _sha({**self.identity, "tokenizer": tokenizer_sha256(tokenizer), "seq_len": seq_len,
                         "shuffle_seed": shuffle_seed, "shuffle_buffer": shuffle_buffer})
        train = StreamingPackedDataset(split="train", shuffle_seed=shuffle_seed, shuffle_buffer=shuffle_buffer,
                                       identity=identity, **common)
        return PackedSplits(train, validation, {"validation": {"blocks": len(blocks)}}, reused=False)
