"""KV-cache benchmark: memory, decode speed and quality of `BitNetA48QuantizedCache` against `DynamicCache`.

    python benchmarks/bench_kv_cache.py                     # all sections
    python benchmarks/bench_kv_cache.py --section speed --threads 1   # memory | attention | speed | quality
    python benchmarks/bench_kv_cache.py --section quality --model DIR   # quality of a trained model

memory: the 2B-4T attention shape (30 layers, 20 query / 5 KV heads, head_dim 128, bf16), 2,048 tokens of context,
    default window: bytes of every tensor each cache holds, and the peak live bytes of one decode step through all
    layers (cache + everything allocated during the step, traced op by op).
attention: the attention function alone (one layer of the 2B-4T shape, batch 1, bf16) over the default 3-bit
    cache against SDPA over a bf16 DynamicCache, at 1k, 8k and 32k tokens of context: ms and GB/s of cache read.
speed: a decode step of the packed 2B-4T-shaped model (30 layers, random ternary weights, the defaults a user
    gets) with the default 3-bit cache against a bf16 DynamicCache, at 1k and 8k tokens of context (batch 1) and at
    1k (batch 8); the caches are filled with random keys and values (prefill excluded).
quality: a tiny model trained on a copy task; perplexity of held-out text fed in chunks of 16 tokens through each
    cache, per bit width, with and without the window; greedy agreement with DynamicCache.
    With ``--model DIR`` (a trained model and its tokenizer, e.g. the quickstart's): the validation split of the
    embedded Shakespeare corpus (``bitnet_a48.data``), ``--sequences`` sequences of ``--seq-len`` tokens spread
    over it, fed ``--chunk`` tokens at a time (each chunk attends to the cached, quantised past); greedy
    continuations of ``--new-tokens`` tokens after prompts of ``--prompt-len`` tokens (also fed in chunks): the
    fraction of positions equal to DynamicCache's and the mean common prefix; and the teacher-forced top-1
    agreement (the argmax next token at every validation position, each setting against DynamicCache).
"""

from __future__ import annotations

import argparse
import math
import time
import weakref
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from memory_bandwidth import cpu_description
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from bitnet_a48 import BitNetA48Config
from bitnet_a48.cache_argument import GENERATE_CACHE_KEY
from bitnet_a48.cache_bitnet_a48 import BitNetA48QuantizedCache
from bitnet_a48.data import load_corpus, pack_documents
from bitnet_a48.modeling_bitnet_a48 import BitNetA48ForCausalLM

LAYERS, HQ, HKV, D = 30, 20, 5, 128  # microsoft/bitnet-b1.58-2B-4T attention


class PeakMemory(TorchDispatchMode):
    """Live bytes of tensor storages: those adopted before, plus every op output, freed when their storage dies."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def adopt(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            self._track(t)
        self.peak = max(self.peak, self.current)

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st.data_ptr()
        if key and key not in self.live:
            self.live[key] = st.nbytes()
            self.current += st.nbytes()
            weakref.finalize(st, self._free, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        self.peak = max(self.peak, self.current)
        return out


class _Attn(torch.nn.Module):
    num_key_value_groups, is_causal, training = HQ // HKV, True, False


def _held(cache: object) -> list[torch.Tensor]:
    out = []
    for layer in cache.layers:
        for v in vars(layer).values():
            if isinstance(v, torch.Tensor):
                out.append(v)
    return out


def _decode_step(cache: object, inputs: list[tuple[torch.Tensor, ...]]) -> None:
    module = _Attn()
    for i, (q, k, v) in enumerate(inputs):
        if isinstance(cache, BitNetA48QuantizedCache):
            cache.attend(q, k, v, i, None, D**-0.5)
        else:
            keys, values = cache.update(k, v, i)
            sdpa_attention_forward(module, q, keys, values, None, scaling=D**-0.5)


def _fill(cache: object, n: int, dtype: torch.dtype, layers: int) -> None:
    g = torch.Generator().manual_seed(0)
    for i in range(layers):
        k = torch.randn(1, HKV, n, D, generator=g).to(dtype)
        cache.update(k, k * 0.5, i)


def bench_memory(context: int = 2048) -> dict[str, float]:
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(1)
    inputs = [tuple(torch.randn(1, h, 1, D, generator=g).to(dtype) for h in (HQ, HKV, HKV)) for _ in range(LAYERS)]
    result = {}
    for name, make in (("dynamic", DynamicCache), ("quantised", lambda: BitNetA48QuantizedCache(num_layers=LAYERS))):
        cache = make()
        _fill(cache, context, dtype, LAYERS)
        held = sum(t.untyped_storage().nbytes() for t in {id(t): t for t in _held(cache)}.values())
        tracker = PeakMemory()
        with tracker:
            tracker.adopt(_held(cache))
            _decode_step(cache, inputs)
        result[f"{name}_held_MiB"] = held / 2**20
        result[f"{name}_peak_MiB"] = tracker.peak / 2**20
        if name == "quantised":
            for tensor_name, n in cache.memory_bytes().items():
                result[f"quantised_{tensor_name}_MiB"] = n / 2**20
    result["held_ratio"] = result["dynamic_held_MiB"] / result["quantised_held_MiB"]
    result["peak_ratio"] = result["dynamic_peak_MiB"] / result["quantised_peak_MiB"]
    return result


def _time(fn: Callable[[], None], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeats)
    return best


def _filled(make: Callable[[], object], context: int, batch: int, layers: int, dtype: torch.dtype) -> object:
    """A cache holding ``context`` random tokens of ``batch`` rows in each of ``layers`` layers (no prefill run)."""
    cache = make()
    g = torch.Generator().manual_seed(0)
    for i in range(layers):
        k = torch.randn(batch, HKV, context, D, generator=g).to(dtype)
        if isinstance(cache, BitNetA48QuantizedCache):
            if len(cache.layers) <= i:
                cache.layers.append(cache.layer_class_to_replicate())
            cache.layers[i].append(k, k * 0.5, torch.arange(context).expand(batch, -1))
        else:
            cache.update(k, k * 0.5, i)
    return cache


def _cache_bytes_read(cache: object) -> int:
    """Bytes of keys and values a decode step reads from ``cache`` (packed codes, scales, window; or bf16 K/V)."""
    total = 0
    for layer in cache.layers:
        if isinstance(cache, BitNetA48QuantizedCache):
            n = layer.n_quant
            total += sum(t[:, :, :n].nbytes for t in (layer.k_packed, layer.v_packed, layer.k_scale, layer.v_scale))
            total += layer.k_window.nbytes + layer.v_window.nbytes
        else:
            total += layer.keys.nbytes + layer.values.nbytes
    return total


def bench_attention(contexts: tuple[int, ...] = (1024, 8192, 32768), steps: int = 8) -> dict[str, float]:
    """The attention function alone, one layer of the 2B-4T shape, batch 1, bf16: ``cache.attend`` over the default
    3-bit cache (the native decode kernel and the append) against transformers' SDPA over a bf16 DynamicCache
    (``update`` then ``sdpa_attention_forward``); ms per layer and step, and GB/s of cache read."""
    dtype, result, module = torch.bfloat16, {}, _Attn()
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, h, 1, D, generator=g).to(dtype) for h in (HQ, HKV, HKV))
    for context in contexts:
        for name, make in (("dynamic", DynamicCache), ("quantised", lambda: BitNetA48QuantizedCache(num_layers=1))):
            cache = _filled(make, context, 1, 1, dtype)
            if name == "quantised":
                step = lambda cache=cache: cache.attend(q, k, v, 0, None, D**-0.5)  # noqa: E731
            else:
                step = lambda cache=cache: sdpa_attention_forward(module, q, *cache.update(k, v, 0), None,  # noqa: E731
                                                                  scaling=D**-0.5)  # fmt: skip
            seconds = _time(step, steps)
            result[f"attention_{context}_{name}_ms"] = 1e3 * seconds
            result[f"attention_{context}_{name}_GBs"] = _cache_bytes_read(cache) / seconds / 1e9
        result[f"attention_{context}_ratio"] = (
            result[f"attention_{context}_quantised_ms"] / result[f"attention_{context}_dynamic_ms"]
        )
    return result


def bench_speed(contexts: tuple[int, ...] = (1024, 8192), batches: tuple[int, ...] = (1,), layers: int = LAYERS,
                steps: int = 4) -> dict[str, float]:  # fmt: skip
    """A decode step of the packed 2B-4T shape (random ternary weights, bf16, the defaults a user gets: native
    kernels, bf16 head) with the default 3-bit cache against a bf16 DynamicCache holding the same context; the
    caches are filled with random keys and values (prefill excluded). ms per step (median of ``steps``-step runs)."""
    from profile_decode_step import build

    model = build(layers, 3, int8_head=False)
    result = {}
    makers = {"dynamic": DynamicCache, "quantised": lambda: BitNetA48QuantizedCache(model.config)}
    with torch.no_grad():
        for batch in batches:
            for context in contexts:
                key, read = f"step_b{batch}_{context}", {}
                for name, make in makers.items():
                    cache = _filled(make, context, batch, layers, torch.bfloat16)
                    token = torch.randint(3, model.config.vocab_size, (batch, 1))
                    position = [context]

                    def step(
                        cache: object = cache, token: torch.Tensor = token, position: list[int] = position
                    ) -> None:
                        ids = torch.full_like(token, position[0])
                        model(token, cache=cache, position_ids=ids, logits_to_keep=1)
                        position[0] += 1

                    result[f"{key}_{name}_ms"] = 1e3 * _time(step, steps)
                    read[name] = _cache_bytes_read(cache)
                result[f"{key}_ratio"] = result[f"{key}_quantised_ms"] / result[f"{key}_dynamic_ms"]
                result[f"{key}_memory_ratio"] = read["dynamic"] / read["quantised"]
    return result


def _copy_corpus(n: int, seed: int, segment: int = 21, repeats: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(3, 101, (n, segment), generator=g)
    return torch.cat([torch.ones(n, 1, dtype=torch.long), seg.repeat(1, repeats)], 1)


@torch.no_grad()
def _chunked_nll(
    model: nn.Module, data: torch.Tensor, make_cache: Callable[[], object], chunk: int
) -> tuple[float, torch.Tensor]:
    """Summed next-token NLL of ``data`` (B, T) fed ``chunk`` tokens at a time through one cache, and the argmax
    predictions (B, T-1) of each next token."""
    cache, total, top1 = make_cache(), 0.0, []
    for i in range(0, data.shape[1], chunk):
        logits = model(data[:, i : i + chunk], cache=cache, use_cache=True).logits
        target = data[:, i + 1 : i + chunk + 1]  # the last chunk has no target for its last token
        logits = logits[:, : target.shape[1]]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
        top1.append(logits.argmax(-1))
    return total, torch.cat(top1, 1)


def _chunked_eval(
    model: nn.Module, data: torch.Tensor, make_cache: Callable[[], object], chunk: int, batch: int | None = None
) -> tuple[float, torch.Tensor]:
    """Perplexity of ``data`` fed in chunks, ``batch`` sequences per cache (all at once by default), and the
    argmax predictions (B, T-1)."""
    parts = [_chunked_nll(model, x, make_cache, chunk) for x in data.split(batch or data.shape[0])]
    nll = sum(n for n, _ in parts)
    return math.exp(nll / (data.shape[0] * (data.shape[1] - 1))), torch.cat([t for _, t in parts])


def _chunked_ppl(model: nn.Module, data: torch.Tensor, make_cache: Callable[[], object], chunk: int) -> float:
    return _chunked_eval(model, data, make_cache, chunk)[0]


@torch.no_grad()
def _greedy(
    model: nn.Module, prompt: torch.Tensor, make_cache: Callable[[], object], chunk: int, new_tokens: int
) -> torch.Tensor:
    """Greedy continuation (B, new_tokens) of ``prompt`` (B, P), the prompt fed ``chunk`` tokens at a time."""
    cache = make_cache()
    for i in range(0, prompt.shape[1], chunk):
        logits = model(prompt[:, i : i + chunk], cache=cache, use_cache=True).logits
    out = [logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(new_tokens - 1):
        logits = model(out[-1], cache=cache, use_cache=True).logits
        out.append(logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(out, 1)


def _agreement(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Fraction of positions equal to ``ref``, and mean length of the common prefix (tokens before divergence)."""
    same = out == ref
    return float(same.float().mean()), float(same.int().cumprod(1).sum(1).float().mean())


def bench_quality(steps: int = 300, chunk: int = 16) -> dict[str, float]:
    torch.manual_seed(0)
    config = BitNetA48Config(vocab_size=101, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                             eos_token_id=2, kv_cache_bits=3)  # fmt: skip
    model = BitNetA48ForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(steps):
        x = _copy_corpus(32, seed=step)
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    data = _copy_corpus(64, seed=10_000)
    result = {"ppl_dynamic": _chunked_ppl(model, data, DynamicCache, chunk)}
    prompt = _copy_corpus(32, seed=20_000)[:, :30]
    kw = dict(max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(prompt))
    ref = model.generate(prompt, **{GENERATE_CACHE_KEY: DynamicCache()}, **kw)[:, 30:]
    for window in (16, 0):
        for bits in (8, 4, 3, 2):
            make = lambda b=bits, w=window: BitNetA48QuantizedCache(config, bits=b, window=w)  # noqa: E731
            p = _chunked_ppl(model, data, make, chunk)
            result[f"ppl_{bits}bit_w{window}"] = p
            result[f"ratio_{bits}bit_w{window}"] = p / result["ppl_dynamic"]
            out = model.generate(prompt, **{GENERATE_CACHE_KEY: make()}, **kw)[:, 30:]
            result[f"greedy_agree_{bits}bit_w{window}"] = float((out == ref).float().mean())
    return result


def _validation_sequences(tokenizer: object, seq_len: int, count: int) -> torch.Tensor:
    """``count`` blocks of ``seq_len`` tokens spread evenly over the packed validation split of the embedded corpus."""
    blocks = pack_documents(tokenizer, load_corpus("shakespeare").validation, seq_len, what="validation split").blocks
    if count >= blocks.shape[0]:
        return blocks
    return blocks[torch.linspace(0, blocks.shape[0] - 1, count).round().long()]


def bench_quality_model(
    model_dir: str,
    sequences: int = 128,
    seq_len: int = 512,
    chunk: int = 32,
    prompts: int = 32,
    prompt_len: int = 128,
    new_tokens: int = 32,
    batch: int = 32,
    bit_widths: tuple[int, ...] = (8, 4, 3, 2),
    windows: tuple[int, ...] = (16, 0),
) -> dict[str, float]:
    """Chunked validation perplexity and greedy agreement of a trained model, DynamicCache against each setting."""
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = _validation_sequences(tokenizer, seq_len, sequences)
    prompt = data[:prompts, :prompt_len]
    result = {"sequences": float(data.shape[0]), "tokens": float(data.numel())}
    with torch.no_grad():  # one full-sequence pass, no cache: the chunked DynamicCache pass must match it
        full = sum(model(x, labels=x, use_cache=False).loss.item() * len(x) for x in data.split(batch))
    result["ppl_no_cache"] = math.exp(full / len(data))
    result["ppl_dynamic"], top1_ref = _chunked_eval(model, data, DynamicCache, chunk, batch)
    ref = _greedy(model, prompt, DynamicCache, chunk, new_tokens)
    for window in windows:
        for bits in bit_widths:
            make = lambda b=bits, w=window: BitNetA48QuantizedCache(model.config, bits=b, window=w)  # noqa: E731
            p, top1 = _chunked_eval(model, data, make, chunk, batch)
            result[f"ppl_{bits}bit_w{window}"] = p
            result[f"ratio_{bits}bit_w{window}"] = p / result["ppl_dynamic"]
            result[f"top1_agree_{bits}bit_w{window}"] = float((top1 == top1_ref).float().mean())
            agree, prefix = _agreement(_greedy(model, prompt, make, chunk, new_tokens), ref)
            result[f"greedy_agree_{bits}bit_w{window}"] = agree
            result[f"greedy_prefix_{bits}bit_w{window}"] = prefix
    result["seconds"] = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=("all", "memory", "attention", "speed", "quality"), default="all")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=300, help="training steps of the toy quality model")
    parser.add_argument("--model", metavar="DIR", help="trained model (and tokenizer) for quality")
    parser.add_argument("--sequences", type=int, default=128, help="validation sequences (--model)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per validation sequence (--model)")
    parser.add_argument("--chunk", type=int, default=32, help="tokens fed per forward pass (--model)")
    parser.add_argument("--prompts", type=int, default=32, help="greedy prompts (--model)")
    parser.add_argument("--prompt-len", type=int, default=128, help="tokens per greedy prompt (--model)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per prompt (--model)")
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2], help="cache bit widths (--model)")
    parser.add_argument("--windows", type=int, nargs="+", default=[16, 0], help="high-precision windows (--model)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    def quality() -> dict[str, float]:
        if args.model is None:
            return bench_quality(args.steps)
        return bench_quality_model(
            args.model,
            args.sequences,
            args.seq_len,
            args.chunk,
            args.prompts,
            args.prompt_len,
            args.new_tokens,
            bit_widths=tuple(args.bits),
            windows=tuple(args.windows),
        )

    def speed() -> dict[str, float]:
        return {**bench_speed(batches=(1,)), **bench_speed(contexts=(1024,), batches=(8,))}

    sections = {"memory": bench_memory, "attention": bench_attention, "speed": speed, "quality": quality}
    print(f"{cpu_description()}; {torch.get_num_threads()} threads; torch {torch.__version__}")
    results = {}
    for name, fn in sections.items():
        if args.section in ("all", name):
            results[name] = fn()
            print(f"== {name}")
            for key, value in results[name].items():
                print(f"{key:32s} {value:10.4f}")
    return results


if __name__ == "__main__":
    main()
