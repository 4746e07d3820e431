"""End-to-end CPU decode: packed BitNet a4.8 against transformers' LLaMA and BitNet models of the same shape.

Shape: the 2B-4T layers (hidden 2560, FFN 6912, 20 heads, 5 KV heads, vocabulary 128256, tied embeddings) with
few layers (``--layers``, default 4). Every model holds random weights. Models:

- ``a4.8 packed``: ``BitNetA48ForCausalLM`` with ``weight_format="packed"``, weights held at 2 bits
  (``cpu_layout="packed"``), ``impl="auto"`` (on CPU: the native kernels of ``kernels_cpu_native``, the ISA path
  the CPU has unless ``BITNET_A48_CPU_ISA`` forces one), ``kv_cache_bits=None`` (``DynamicCache``).
- ``a4.8 packed, torch``: the same with ``impl="torch"`` (``_int_mm`` on unpacked chunks, the reference).
- ``a4.8 int8``: ``impl="torch"``, ``cpu_layout="int8"`` (an int8 copy of the codes beside the packed bytes).
- ``a4.8 packed + KV3``: ``a4.8 packed`` with the default 3-bit KV cache (``kv_cache_bits=3``): what a user gets.
- ``a4.8 packed + KV3, int8 head``: the same after ``model.quantize_lm_head("int8")``.
- ``LLaMA bf16`` / ``LLaMA fp32``: ``LlamaForCausalLM`` (SiLU, no SubLN).
- ``HF BitNet bitlinear``: ``BitNetForCausalLM`` whose projections ``replace_with_bitnet_linear`` turned into
  ``BitLinear`` (packed uint8, unpacked to bf16 every forward); ``HF BitNet autobitlinear``: offline
  ``AutoBitLinear`` (ternary bf16 weights times ``weight_scale``). Their ``torch.compile`` warm-up is not timed.

Timing: greedy ``generate`` after a 16-token prompt (``eos_token_id=None``, so nothing stops it before the last
token); one short generate per model and batch size first (warm-up, compilation). Each round times, per model,
``generate`` of 1 token (prefill + first token) and of ``--new-tokens`` tokens; a decode step is their difference
divided by the extra tokens, so prefill is excluded (transformers' ``BitLinear`` takes seconds per step:
``--bitlinear-new-tokens``, default 8). The models are timed interleaved, ``--reps`` rounds, and the ratio to LLaMA
bf16 is the median of the per-round ratios (absolute times on a shared CPU drift between rounds). The bf16 lm_head
is also timed alone, to show its share. Memory: each model is built again in a fresh subprocess that reports its
resident set (``/proc/self/status``): RSS after building minus RSS before, and the peak RSS (VmHWM, reset after
warm-up) during one generate of ``--mem-new-tokens`` tokens minus RSS before building.

    python benchmarks/bench_decode.py                                 # batch 1 and 8, 128 tokens (long on 2 cores)
    python benchmarks/bench_decode.py --batch 1 --new-tokens 32 --reps 3
    python benchmarks/bench_decode.py --section memory
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import BitNetConfig, BitNetForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.integrations.bitnet import AutoBitLinear, replace_with_bitnet_linear
from transformers.integrations.bitnet import BitLinear as HFBitLinear
from transformers.utils.quantization_config import BitNetQuantConfig

from bitnet_a48 import BitNetA48ForCausalLM, config_from_preset
from bitnet_a48.head_native import head_logits
from bitnet_a48.packed_bitlinear import PackedBitLinear
from bitnet_a48.packing import pack_ternary

PROMPT_LEN = 16
BASELINE = "LLaMA bf16"
MODELS = (
    "a4.8 packed",
    "a4.8 packed, torch",
    "a4.8 int8",
    "a4.8 packed + KV3",
    "a4.8 packed + KV3, int8 head",
    "LLaMA bf16",
    "LLaMA fp32",
    "HF BitNet bitlinear",
    "HF BitNet autobitlinear",
)
WEIGHT_STD = 0.02


@dataclass
class Entry:
    label: str
    model: nn.Module
    kv_cache_bits: int | None = None  # only for our model: set on its config before each generate


def _shape_kwargs(layers: int) -> dict[str, object]:
    # The 2B-4T preset, with the layer count overridden.
    return dict(
        hidden_size=2560,
        intermediate_size=6912,
        num_attention_heads=20,
        num_key_value_heads=5,
        num_hidden_layers=layers,
        vocab_size=128256,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    )


def _random_ternary(out_features: int, in_features: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-1, 2, (out_features, in_features), generator=gen, dtype=torch.int8)


def build_ours(
    layers: int, cpu_layout: str, impl: str, dtype: torch.dtype, gen: torch.Generator
) -> BitNetA48ForCausalLM:
    """Packed a4.8 model: random ternary codes, α = 0.02; embeddings, norms and lm_head in ``dtype``."""
    config = config_from_preset("2B-4T", num_hidden_layers=layers, weight_format="packed", kv_cache_bits=None)
    model = BitNetA48ForCausalLM._from_config(config, dtype=dtype).eval()
    for module in model.modules():
        if isinstance(module, PackedBitLinear):
            module.set_impl(impl)
            module.weight.copy_(pack_ternary(_random_ternary(module.out_features, module.in_features, gen)))
            module.weight_scale.fill_(WEIGHT_STD)
            module.set_cpu_layout(cpu_layout)
    return model


def build_llama(layers: int, dtype: torch.dtype) -> LlamaForCausalLM:
    kw = _shape_kwargs(layers)
    config = LlamaConfig(**kw, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    return LlamaForCausalLM._from_config(config, dtype=dtype).eval()


def build_hf_bitnet(layers: int, linear_class: str, gen: torch.Generator) -> BitNetForCausalLM:
    """transformers' BitNet in bf16 with its quantised linear classes filled with random ternary weights."""
    kw = _shape_kwargs(layers)
    config = BitNetConfig(**kw, rope_theta=500000.0, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    model = BitNetForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    quant = BitNetQuantConfig(linear_class=linear_class, quantization_mode="offline")
    replace_with_bitnet_linear(model, modules_to_not_convert=["lm_head"], quantization_config=quant)
    for module in model.modules():
        if isinstance(module, (HFBitLinear, AutoBitLinear)):
            module.to_empty(device="cpu", recurse=False)  # the replacement built them on the meta device
            codes = _random_ternary(module.out_features, module.in_features, gen)
            with torch.no_grad():
                if isinstance(module, HFBitLinear):
                    module.weight.copy_(pack_ternary(codes))  # same layout as transformers' pack_weights
                    module.weight_scale.fill_(1.0 / WEIGHT_STD)  # BitLinear divides by it
                else:
                    module.weight.copy_(codes.to(torch.bfloat16))
                    module.weight_scale.fill_(WEIGHT_STD)
    return model


def build(label: str, layers: int, ours_dtype: torch.dtype) -> Entry:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if label == "a4.8 packed":
            return Entry(label, build_ours(layers, "packed", "auto", ours_dtype, gen))
        if label == "a4.8 packed, torch":
            return Entry(label, build_ours(layers, "packed", "torch", ours_dtype, gen))
        if label == "a4.8 int8":
            return Entry(label, build_ours(layers, "int8", "torch", ours_dtype, gen))
        if label == "a4.8 packed + KV3":
            return Entry(label, build_ours(layers, "packed", "auto", ours_dtype, gen), kv_cache_bits=3)
        if label == "a4.8 packed + KV3, int8 head":
            model = build_ours(layers, "packed", "auto", ours_dtype, gen).quantize_lm_head("int8")
            return Entry(label, model, kv_cache_bits=3)
        if label == "LLaMA bf16":
            return Entry(label, build_llama(layers, torch.bfloat16))
        if label == "LLaMA fp32":
            return Entry(label, build_llama(layers, torch.float32))
        if label == "HF BitNet bitlinear":
            return Entry(label, build_hf_bitnet(layers, "bitlinear", gen))
        if label == "HF BitNet autobitlinear":
            return Entry(label, build_hf_bitnet(layers, "autobitlinear", gen))
    raise ValueError(f"unknown model {label!r}; choose from {MODELS}")


def weight_nbytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer storage (tied weights once, the int8 cache included)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def generate(entry: Entry, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy ``generate()`` of exactly ``new_tokens`` tokens. With no end-of-sequence token (``eos_token_id=None``)
    nothing stops it early; ``min_new_tokens`` would do the same through a logits processor that builds and masks a
    vocabulary-sized tensor every step (about 1.5 ms a token at 128256 entries on 2 cores), work that neither a
    user's plain ``max_new_tokens`` call nor llama.cpp's decode loop does."""
    if isinstance(entry.model, BitNetA48ForCausalLM):
        entry.model.config.kv_cache_bits = entry.kv_cache_bits
    out = entry.model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        max_new_tokens=new_tokens,
        eos_token_id=None,
        pad_token_id=0,
    )
    if out.shape[1] != input_ids.shape[1] + new_tokens:
        raise RuntimeError(f"generate() returned {out.shape[1] - input_ids.shape[1]} new tokens, not {new_tokens}")
    return out


def make_prompt(batch: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(1))


def time_once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_lm_head(entries: list[Entry], batch: int) -> float | None:
    """Seconds of one bf16 lm_head call on ``(batch, 1, hidden)`` (the tied 128256 x 2560 embedding) as the model
    makes it at a decode step (``head_logits``: the native GEMV for up to ``MAX_NATIVE_HEAD_ROWS`` rows), or None."""
    for e in entries:
        if isinstance(e.model, BitNetA48ForCausalLM) and e.model.lm_head.weight.dtype == torch.bfloat16:
            head = e.model.lm_head
            x = torch.randn(batch, 1, head.in_features, dtype=torch.bfloat16)
            with torch.no_grad():
                head_logits(head, x)
                return time_once(lambda head=head, x=x: [head_logits(head, x) for _ in range(8)]) / 8
    return None


def run_speed(args: argparse.Namespace, ours_dtype: torch.dtype) -> dict[str, int]:
    entries = []
    for label in args.models:
        start = time.perf_counter()
        entries.append(build(label, args.layers, ours_dtype))
        print(f"built {label} in {time.perf_counter() - start:.1f} s", flush=True)
    nbytes = {e.label: weight_nbytes(e.model) for e in entries}
    # transformers' BitLinear unpacks every projection in every step (seconds per token here): fewer tokens.
    new_tokens = {e.label: args.bitlinear_new_tokens if e.label == "HF BitNet bitlinear" else args.new_tokens
                  for e in entries}
    for batch in args.batch:
        prompt = make_prompt(batch, 128256)
        for e in entries:  # warm-up: first-call costs and torch.compile of transformers' BitNet layers
            seconds = time_once(lambda e=e, prompt=prompt: generate(e, prompt, 4))
            print(f"warm-up {e.label}, batch {batch}: {seconds:.1f} s", flush=True)
        full: dict[str, list[float]] = {e.label: [] for e in entries}  # seconds of generate(n)
        step: dict[str, list[float]] = {e.label: [] for e in entries}  # seconds per decode step
        head: list[float] = []
        for rep in range(args.reps):
            for e in entries:
                n = new_tokens[e.label]
                one = time_once(lambda e=e, prompt=prompt: generate(e, prompt, 1))  # prefill + first token
                full[e.label].append(time_once(lambda e=e, prompt=prompt, n=n: generate(e, prompt, n)))
                step[e.label].append((full[e.label][-1] - one) / (n - 1))
            lm_head = time_lm_head(entries, batch)
            if lm_head is not None:
                head.append(lm_head)
            print(f"batch {batch} round {rep + 1}, ms per decode step: "
                  + ", ".join(f"{k} {v[-1] * 1e3:.1f}" for k, v in step.items()), flush=True)
        print(f"\nbatch {batch}, {PROMPT_LEN}-token prompt, {args.new_tokens} new tokens "
              f"({args.bitlinear_new_tokens} for HF BitNet bitlinear), {args.layers} layers, "
              f"{torch.get_num_threads()} threads, median of {args.reps} interleaved rounds")
        print("| model | batch | ms / decode step | decode tokens/s | vs LLaMA bf16 | generate tokens/s "
              "(prefill incl.) | weight MiB |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for e in entries:
            t = statistics.median(step[e.label])
            ratio = (
                statistics.median(b / s for b, s in zip(step[BASELINE], step[e.label], strict=True))
                if BASELINE in step else float("nan")
            )
            gen_rate = batch * new_tokens[e.label] / statistics.median(full[e.label])
            print(f"| {e.label} | {batch} | {t * 1e3:.1f} | {batch / t:.1f} | {ratio:.2f}x | {gen_rate:.1f} | "
                  f"{nbytes[e.label] / 2**20:.0f} |", flush=True)
        if head:
            print(f"\nbf16 lm_head alone (128256 x 2560, batch {batch}): {statistics.median(head) * 1e3:.1f} ms per "
                  "step as the model calls it (head_logits), the same in every model of the table with a bf16 head")
        print()
    return nbytes


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    # Linux: writing 5 to clear_refs resets VmHWM (the peak resident set) to the current RSS.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_worker(label: str, args: argparse.Namespace, ours_dtype: torch.dtype) -> None:
    """In a fresh process: RSS of one model after building and at the peak of one generate per batch size."""
    base = _status_kib("VmRSS")
    entry = build(label, args.layers, ours_dtype)
    built = _status_kib("VmRSS")
    result = {"label": label, "weights": weight_nbytes(entry.model), "built_kib": built - base, "peak_kib": {}}
    for batch in args.batch:
        prompt = make_prompt(batch, 128256)
        generate(entry, prompt, 4)  # warm-up / compile outside the measured peak
        _reset_peak_rss()
        generate(entry, prompt, args.mem_new_tokens)
        result["peak_kib"][batch] = _status_kib("VmHWM") - base
    print("RESULT " + json.dumps(result), flush=True)


def run_memory(args: argparse.Namespace) -> None:
    rows = []
    for label in args.models:
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-worker", label, "--layers", str(args.layers),
               "--threads", str(args.threads), "--ours-dtype", args.ours_dtype,
               "--mem-new-tokens", str(args.mem_new_tokens), "--batch", *map(str, args.batch)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
        print(f"measured {label}", flush=True)
    print(f"\npeak RSS (VmHWM) during a generate of {args.mem_new_tokens} new tokens, minus RSS before building; "
          f"{args.layers} layers")
    print("| model | weight MiB (tensors) | RSS after build MiB | " +
          " | ".join(f"peak RSS batch {b} MiB" for b in args.batch) + " |")
    print("|---|---:|---:|" + "---:|" * len(args.batch))
    for r in rows:
        peaks = " | ".join(f"{r['peak_kib'][str(b)] / 1024:.0f}" for b in args.batch)
        print(f"| {r['label']} | {r['weights'] / 2**20:.0f} | {r['built_kib'] / 1024:.0f} | {peaks} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=["speed", "memory", "all"], default="all")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per timed generate")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (2B-4T shape)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--bitlinear-new-tokens", type=int, default=8,
                        help="new tokens for HF BitNet bitlinear (seconds per step)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved timing rounds (the median is kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared CPU)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, metavar="MODEL",
                        help=f"subset of {MODELS}")
    parser.add_argument("--ours-dtype", choices=["bf16", "fp32"], default="bf16",
                        help="dtype of our model's embeddings, norms, lm_head and hidden states")
    parser.add_argument("--mem-new-tokens", type=int, default=16, help="new tokens of the memory generate")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ours_dtype = torch.bfloat16 if args.ours_dtype == "bf16" else torch.float32
    if args.memory_worker is not None:
        memory_worker(args.memory_worker, args, ours_dtype)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, our model in {args.ours_dtype}")
    if args.section in ("speed", "all"):
        run_speed(args, ours_dtype)
    if args.section in ("memory", "all"):
        run_memory(args)


if __name__ == "__main__":
    main()
