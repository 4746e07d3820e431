"""Continuous batching for `bitnet-a48 serve`: one worker thread runs the model; requests join and leave a batch.

Waiting prompts are prefilled as ``generate()`` prefills one (a fresh cache from ``make_generation_cache``, positions
0..n-1), those of one length together (no padding), then their cache rows join the running batch: the shorter side
is left-padded so that every row ends at the same column, and a decode step runs the model's own forward on all rows
at once (one token each, per-row positions, a mask that hides the padding). A row leaves the batch when it finishes
or its client goes away (``batch_select_indices``), and columns that have become padding in every row are dropped.

Exactness against ``model.generate(do_sample=False)`` (one prompt, batch 1):

- The projections (native ternary kernels: per-row quantisers, int32 sums), norms, RoPE and the int8 head are
  computed row by row, so a row's numbers do not depend on the other rows.
- Attention over the default 3-bit cache (the native decode kernel) takes each (row, KV head) pair as its own work
  item, so the other rows change nothing, and left padding (masked: exact zeros, the softmax denominator summed
  token by token) leaves a row's output bit for bit as it is alone (tested in ``test_kernels_cpu_native_kv.py``).
  One thing can change a last bit: a batch-1 call over 1024 or more stored tokens with several threads splits the
  store across them (flash-decoding partials) where a larger batch does not. A token changes only where such a bit
  moves an activation code across a rounding boundary or decides a near-tie; the tests and the benchmark find
  generate()'s texts.
- A dense float ``lm_head`` goes, as in ``generate()``, through ``head_native.head_logits``: for up to
  ``MAX_NATIVE_HEAD_ROWS`` rows of fp32 / bf16 that is the native GEMV, whose sums per row do not depend on the
  batch. Otherwise (more rows, fp16, no native kernels) it is a BLAS GEMM over the batch, whose sums run in another
  order than the GEMV of one row (last-bit differences, measured). For a greedy row those batched logits are used
  only where their argmax is certain to be the one-row call's: the top-2 gap must exceed twice the worst-case float
  error of a K-term dot product, ``gamma_K · ||w||₂ · ||x||₂`` per logit (plus the output rounding for bf16 / fp16).
  Other greedy rows are recomputed alone, with the call ``generate()`` makes, so the head adds no difference.
- A full-precision (``DynamicCache``) model is batched the same way, but its padded attention goes through SDPA,
  whose sums depend on the length.

Sampled rows (temperature > 0) use the batched logits with a per-request ``torch.Generator`` (``seed``).
"""

from __future__ import annotations

import collections
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from .cache_bitnet_a48 import _ROW_TENSORS, BitNetA48QuantizedLayer, make_generation_cache
from .head_native import head_logits, native_head_applies
from .int8_linear import Int8Linear

FP32_UNIT_ROUNDOFF = 2.0**-24
OUTPUT_MANTISSA_BITS = {torch.bfloat16: 8, torch.float16: 11}  # significand bits incl. the implicit one


class QueueFullError(RuntimeError):
    """The engine's waiting queue cannot take the request now (the server answers 429)."""


@dataclass
class SamplingParams:
    """What one sequence asks for. ``temperature == 0`` is greedy; ``stop`` strings end it (not included)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Sequence:
    """One generated sequence. ``emit`` receives ``("text", index, delta)``, then ``("finish", index, reason,
    completion_tokens)`` or ``("error", index, message)``; it is called from the worker thread."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[tuple[Any, ...]], None]
    cancelled: bool = False
    generated: list[int] = field(default_factory=list)
    sent_chars: int = 0
    cache_len: int = 0  # tokens of this row in the cache (its padding excluded)
    finish_reason: str | None = None
    generator: torch.Generator | None = None


# -----------------------------------------------------------------------------------------------------------------
# Cache rows: left-pad, trim, concatenate (the dynamic layouts of the quantised cache and of DynamicCache)
# -----------------------------------------------------------------------------------------------------------------


def _shift_quantized(layer: BitNetA48QuantizedLayer, d: int) -> None:
    """Move every row's tokens ``d`` columns right (``d > 0``: left padding) or drop ``-d`` leading columns that are
    padding in every row. Keeps the layer's invariant: window = last ``min(T, window)`` columns, store = the rest."""
    if layer.static:
        raise ValueError("the serving engine batches the dynamic cache layout only")
    old_t, old_n = int(layer.cumulative_length), layer.n_quant
    old_w = old_t - old_n
    new_t = old_t + d
    new_w = min(new_t, layer.window)
    new_n = new_t - new_w
    b, h, _, p = layer.k_packed.shape
    cap = -(-new_n // layer.block_size) * layer.block_size
    src = max(0, -d)  # store tokens t >= src move to t + d
    j0 = max(0, -(old_n + d))  # window tokens j >= j0 move to column old_n + j + d
    for kv in ("k", "v"):
        packed, scale = getattr(layer, f"{kv}_packed"), getattr(layer, f"{kv}_scale")
        new_packed = packed.new_zeros((b, h, cap, p))
        new_scale = scale.new_zeros((b, h, cap))
        if old_n > src:
            new_packed[:, :, src + d : old_n + d] = packed[:, :, src:old_n]
            new_scale[:, :, src + d : old_n + d] = scale[:, :, src:old_n]
        window = getattr(layer, f"{kv}_window")
        new_window = window.new_zeros((b, h, new_w, window.shape[3]))
        if old_w > j0:
            start = old_n + j0 + d - new_n
            new_window[:, :, start : start + old_w - j0] = window[:, :, j0:old_w]
        setattr(layer, f"{kv}_packed", new_packed)
        setattr(layer, f"{kv}_scale", new_scale)
        setattr(layer, f"{kv}_window", new_window)
    if layer.sink_pos is not None:
        layer.sink_pos = torch.where(layer.sink_pos >= 0, layer.sink_pos + d, layer.sink_pos)
    layer.n_quant, layer.cumulative_length = new_n, new_t


def _shift_dynamic(layer: DynamicLayer, d: int) -> None:
    keys, values = layer.keys, layer.values  # (B, H, T, D)
    if d >= 0:
        pad = keys.new_zeros((*keys.shape[:2], d, keys.shape[3]))
        layer.keys, layer.values = torch.cat([pad, keys], 2), torch.cat([pad.to(values.dtype), values], 2)
    else:
        layer.keys, layer.values = keys[:, :, -d:].contiguous(), values[:, :, -d:].contiguous()


def shift_cache(cache: Cache, d: int) -> None:
    """Left-pad every row of ``cache`` by ``d`` columns, or drop ``-d`` leading columns of padding."""
    if d == 0:
        return
    for layer in cache.layers:
        if isinstance(layer, BitNetA48QuantizedLayer):
            _shift_quantized(layer, d)
        elif type(layer) is DynamicLayer:
            _shift_dynamic(layer, d)
        else:
            raise TypeError(f"the serving engine cannot batch cache layers of type {type(layer).__name__}")


def _grow_store(layer: BitNetA48QuantizedLayer, cap: int) -> None:
    for name in ("k_packed", "v_packed", "k_scale", "v_scale"):
        t = getattr(layer, name)
        if t.shape[2] < cap:
            grown = t.new_zeros((*t.shape[:2], cap, *t.shape[3:]))
            grown[:, :, : t.shape[2]] = t
            setattr(layer, name, grown)


def concat_caches(batch: Cache, other: Cache) -> None:
    """Append the rows of ``other`` to ``batch`` (both hold the same number of columns), in place."""
    for layer, new in zip(batch.layers, other.layers, strict=True):
        if isinstance(layer, BitNetA48QuantizedLayer):
            if int(layer.cumulative_length) != int(new.cumulative_length) or layer.n_quant != new.n_quant:
                raise ValueError("cache rows to concatenate must have the same length")
            cap = max(layer.k_packed.shape[2], new.k_packed.shape[2])
            _grow_store(layer, cap)
            _grow_store(new, cap)
            for name in _ROW_TENSORS:
                mine = getattr(layer, name)
                if mine is not None:
                    setattr(layer, name, torch.cat([mine, getattr(new, name)], 0))
            layer.batch_size = layer.k_packed.shape[0]
        else:
            layer.keys = torch.cat([layer.keys, new.keys], 0)
            layer.values = torch.cat([layer.values, new.values], 0)


# -----------------------------------------------------------------------------------------------------------------
# The head: batched logits whose greedy argmax equals the one-row call's
# -----------------------------------------------------------------------------------------------------------------


class CertifiedHead:
    """``lm_head`` over the batch, with the greedy rows whose argmax is not certain recomputed alone (see module)."""

    def __init__(self, head: nn.Module) -> None:
        self.head = head
        self.row_exact = isinstance(head, Int8Linear)  # int32 sums per row: the batch changes no bit
        self.weight_norm = None
        if not self.row_exact:
            if not isinstance(head, nn.Linear) or head.bias is not None:
                raise TypeError(f"the serving engine needs an nn.Linear or Int8Linear lm_head, got {type(head)}")
            k = head.in_features
            gamma = k * FP32_UNIT_ROUNDOFF / (1 - k * FP32_UNIT_ROUNDOFF)
            with torch.no_grad():
                norm = head.weight.float().norm(dim=1).max().item()
            self.error_per_input_norm = 2.0 * gamma * norm * 1.01  # |batched - alone| per unit ||x||₂, with slack
        self.recomputed = 0  # rows recomputed alone so far (a statistic for benchmarks)

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor, greedy: list[bool]) -> torch.Tensor:
        """``hidden`` (B, 1, D) -> logits (B, V) in fp32."""
        logits = head_logits(self.head, hidden)[:, -1].float()
        if self.row_exact or hidden.shape[0] == 1 or not any(greedy) or native_head_applies(self.head, hidden):
            return logits  # one row (the very call generate() makes), or sums per row that the batch cannot change
        top = logits.topk(2, dim=-1).values  # (B, 2)
        gap = (top[:, 0] - top[:, 1]).double()
        bound = 2.0 * self.error_per_input_norm * hidden[:, -1].double().norm(dim=-1)
        bits = OUTPUT_MANTISSA_BITS.get(hidden.dtype)
        if bits is not None:  # the logits were rounded to bits-bit significands: two ulps of the larger value
            bound = bound + 2.0 * torch.exp2(torch.floor(torch.log2(top.abs().amax(-1).double())) - (bits - 1))
        unsure = (gap <= bound).tolist()
        for row, (is_greedy, is_unsure) in enumerate(zip(greedy, unsure, strict=True)):
            if is_greedy and is_unsure:
                alone = hidden[row : row + 1].clone()  # a fresh (1, 1, D) tensor, as generate()'s last hidden state
                logits[row] = head_logits(self.head, alone)[0, -1].float()
                self.recomputed += 1
        return logits


def _equal_length_groups(sequences: list[Sequence]) -> list[list[Sequence]]:
    """Sequences grouped by prompt length, in order of first arrival."""
    groups: dict[int, list[Sequence]] = {}
    for seq in sequences:
        groups.setdefault(len(seq.prompt_ids), []).append(seq)
    return list(groups.values())


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Greedy for temperature 0 (first index of the maximum, as ``torch.argmax``), else top-p sampling."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < params.top_p  # the smallest prefix reaching top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


# -----------------------------------------------------------------------------------------------------------------
# The engine
# -----------------------------------------------------------------------------------------------------------------


class BatchingEngine:
    """A worker thread that serves :class:`Sequence` objects with continuous batching.

    Args:
        model: a ``BitNetA48ForCausalLM`` in eval mode.
        tokenizer: its tokenizer (incremental detokenisation and stop strings).
        max_batch_size (`int`, defaults to 16): sequences decoded together.
        max_queue (`int`, defaults to 64): sequences waiting for a slot; beyond, `submit` raises `QueueFullError`.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, max_batch_size: int = 16, max_queue: int = 64) -> None:
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError(f"max_batch_size must be >= 1 and max_queue >= 0, got {max_batch_size}, {max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.head = CertifiedHead(model.lm_head)
        eos = model.generation_config.eos_token_id  # what generate() stops at
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self.device = next(model.parameters()).device
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.active: list[Sequence] = []
        self.cache: Cache | None = None
        self.steps = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._admitting = 0  # sequences taken from the queue, not yet in the batch
        self._thread: threading.Thread | None = None

    # -- the request side (any thread) --------------------------------------------------------------------------

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue all of ``sequences`` or none: `QueueFullError` when the queue has no room for them all."""
        with self._cond:
            if self._stopping:
                raise QueueFullError("the server is shutting down")
            # slots neither running nor being prefilled are taken at the next step: they do not count as queued
            free_slots = max(0, self.max_batch_size - len(self.active) - self._admitting)
            if len(self.waiting) + len(sequences) > self.max_queue + free_slots:
                raise QueueFullError(
                    f"the server is at capacity ({len(self.active)} running, {len(self.waiting)} waiting, "
                    f"queue limit {self.max_queue}); retry later"
                )
            self.waiting.extend(sequences)
            self._cond.notify()

    def cancel(self, sequences: list[Sequence]) -> None:
        """Mark sequences as abandoned (a client went away): they leave the batch at the next step."""
        with self._cond:
            for seq in sequences:
                seq.cancelled = True
            self._cond.notify()

    def stats(self) -> dict[str, int]:
        """Rows in the batch (a cancelled row counts until the step that drops it), waiting sequences, decode steps
        and head rows recomputed alone."""
        with self._cond:
            return {
                "running": len(self.active),
                "waiting": len(self.waiting),
                "steps": self.steps,
                "recomputed_head_rows": self.head.recomputed,
            }

    def start(self) -> None:
        """Run the engine in a background thread (tests, in-process use). ``bitnet-a48 serve`` calls :meth:`run` in
        the main thread instead: libgomp keeps one spinning thread team per thread that runs parallel regions, and
        with more team threads than CPUs it stops spinning between regions (its throttled wait), which made a 2-thread
        decode step 25% slower when the model had also run in the main thread (loading, warm-up)."""
        self._thread = threading.Thread(target=self.run, name="bitnet-a48-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the loop to end after its current step; wait for the thread :meth:`start` made, if any."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- the worker ---------------------------------------------------------------------------------------------

    def run(self) -> None:
        """The loop: admit, prefill, decode, until :meth:`stop`; blocks the calling thread. Whatever ends it (a stop,
        ``KeyboardInterrupt``), the sequences still running or waiting get a shutting-down error."""
        try:
            self._loop()
        finally:
            with self._cond:
                self._stopping = True
                for seq in [*self.active, *self.waiting]:
                    if not seq.cancelled:
                        seq.emit(("error", seq.index, "the server is shutting down"))
                self.active, self.cache = [], None
                self.waiting.clear()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self.waiting and not self.active:
                    self._cond.wait(0.5)
                if self._stopping:
                    break
                new = []
                while self.waiting and len(self.active) + len(new) < self.max_batch_size:
                    new.append(self.waiting.popleft())
                self._admitting = len(new)
            try:
                with torch.no_grad():
                    for group in _equal_length_groups([s for s in new if not s.cancelled]):
                        self._prefill(group)
                        with self._cond:
                            self._admitting -= len(group)
                    with self._cond:
                        self._admitting = 0
                    self._drop_finished()
                    if self.active:
                        self._decode_step()
                        self._drop_finished()
            except Exception as error:  # a bug in a step: every running request gets a 500, the engine goes on
                message = f"generation failed: {type(error).__name__}: {error}"
                traceback.print_exc()
                with self._cond:
                    failed = list({id(s): s for s in self.active + new}.values())
                    self.active, self.cache, self._admitting = [], None, 0
                for seq in failed:
                    if not seq.cancelled:
                        seq.emit(("error", seq.index, message))
                        seq.cancelled = True

    def _prefill(self, group: list[Sequence]) -> None:
        """Prompts of one length, as generate() runs a prompt: a fresh default cache, positions 0..n-1, no padding
        (the rows do not mix: per-row kernels and one attention GEMM per row), the head certified like a step's."""
        n = len(group[0].prompt_ids)
        ids = torch.tensor([s.prompt_ids for s in group], dtype=torch.long, device=self.device)
        cache = make_generation_cache(self.model.config, len(group), None, self.device, self.model.dtype)
        hidden = self.model.model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            position_ids=torch.arange(n, device=self.device)[None].expand(len(group), n),
            cache=cache,
            use_cache=True,
        ).last_hidden_state[:, -1:]  # one row: the view generate() hands to lm_head
        logits = self.head(hidden, [s.params.temperature == 0 for s in group]).cpu()
        for row, seq in enumerate(group):
            seq.cache_len = n
            if seq.params.temperature > 0:
                seq.generator = torch.Generator(device="cpu")
                seq.generator.manual_seed(seq.params.seed if seq.params.seed is not None else torch.seed())
            self._accept(seq, sample_token(logits[row], seq.params, seq.generator))
        keep = [i for i, s in enumerate(group) if not self._finished(s)]
        if len(keep) < len(group) and keep:
            cache.batch_select_indices(torch.tensor(keep, device=self.device))
        if keep:
            self._join([group[i] for i in keep], cache)

    def _join(self, sequences: list[Sequence], cache: Cache) -> None:
        """Add the prefilled ``cache`` (rows of one length) to the running batch: left-pad the shorter side,
        concatenate."""
        length = sequences[0].cache_len
        with self._cond:
            if self.cache is None or not self.active:
                self.cache, self.active = cache, list(sequences)
                return
            width = self.cache.get_seq_length()
            if length < width:
                shift_cache(cache, width - length)
            elif length > width:
                shift_cache(self.cache, length - width)
            concat_caches(self.cache, cache)
            self.active.extend(sequences)

    def _decode_step(self) -> None:
        rows = self.active
        width = self.cache.get_seq_length()  # columns every row has, padding included
        ids = torch.tensor([[s.generated[-1]] for s in rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([[s.cache_len] for s in rows], dtype=torch.long, device=self.device)
        columns = torch.arange(width + 1, device=self.device)
        pads = torch.tensor([width - s.cache_len for s in rows], device=self.device)
        mask = (columns[None, :] >= pads[:, None]).long()  # (B, width + 1): 0 over each row's left padding
        hidden = self.model.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=self.cache, use_cache=True
        ).last_hidden_state  # (B, 1, D)
        logits = self.head(hidden, [s.params.temperature == 0 for s in rows]).cpu()
        self.steps += 1
        for row, seq in enumerate(rows):
            seq.cache_len += 1
            if not seq.cancelled:
                self._accept(seq, sample_token(logits[row], seq.params, seq.generator))

    def _drop_finished(self) -> None:
        """Remove finished and cancelled rows from the batch; trim columns that are padding in every row."""
        keep = [i for i, s in enumerate(self.active) if not s.cancelled and not self._finished(s)]
        if len(keep) == len(self.active):
            return
        with self._cond:
            self.active = [self.active[i] for i in keep]
        if not keep:
            self.cache = None
            return
        self.cache.batch_select_indices(torch.tensor(keep, device=self.device))
        width = self.cache.get_seq_length()
        shift_cache(self.cache, -(width - max(s.cache_len for s in self.active)))

    # -- tokens to text -----------------------------------------------------------------------------------------

    @staticmethod
    def _finished(seq: Sequence) -> bool:
        return seq.finish_reason is not None

    def _accept(self, seq: Sequence, token: int) -> None:
        """Record a token; emit the text that can no longer change; finish on eos, a stop string or max_tokens."""
        seq.generated.append(token)
        is_eos = token in self.eos_ids
        text = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
        reason = "stop" if is_eos else "length" if len(seq.generated) >= seq.params.max_tokens else None
        hits = [i for i in (text.find(s, max(0, seq.sent_chars - len(s))) for s in seq.params.stop) if i >= 0]
        if hits:
            text, reason = text[: min(hits)], "stop"
        if reason is None:
            if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next bytes
                return
            hold = max((k for s in seq.params.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - hold]  # a possible start of a stop string stays unsent
        if len(text) > seq.sent_chars:
            seq.emit(("text", seq.index, text[seq.sent_chars :]))
            seq.sent_chars = len(text)
        if reason is not None:
            seq.finish_reason = reason
            seq.emit(("finish", seq.index, reason, len(seq.generated)))


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass (for tests and shutdown)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


__all__ = [
    "BatchingEngine",
    "CertifiedHead",
    "QueueFullError",
    "SamplingParams",
    "Sequence",
    "concat_caches",
    "sample_token",
    "shift_cache",
    "wait_until",
]
