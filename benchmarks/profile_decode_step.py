"""Where a decode step's time goes: native kernels, the lm_head, the KV cache's attention, and everything else.

Builds the packed 2B-4T-shaped model (random ternary weights, ``--layers`` decoder layers, the defaults a user gets:
``impl="auto"``, the default 3-bit KV cache; ``--kv-cache-bits 0`` for ``DynamicCache``; ``--int8-head`` for
``quantize_lm_head("int8")``), fills the cache with a ``--context``-token prompt and times ``--steps`` single-token
forwards through that cache, first plainly (the step time) and then under ``torch.profiler``. The profile splits the
step by operator self time:

- ``native layer ops``: the ``bitnet_a48_native`` ops of the decoder layers: the fused decode step of a layer
  (``decoder_layer_decode``: projections, RoPE, attention and the KV append in one call) where it applies, else the
  projections' calls (quantiser and matmul), RoPE, the KV attention and append;
- ``lm_head``: the head's matmul (the native dense GEMV or int8 op, or ``aten::mm``/``addmm``/``linear`` on the
  vocabulary);
- ``outside the kernels``: every other operator and the Python between them (norms, RoPE, the cache's attention,
  residual adds, generate-free bookkeeping): the step time minus the two above.

    python benchmarks/profile_decode_step.py --layers 30 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bitnet_a48 import BitNetA48ForCausalLM, config_from_preset
from bitnet_a48.cache_bitnet_a48 import make_generation_cache
from bitnet_a48.packed_bitlinear import PackedBitLinear
from bitnet_a48.packing import pack_ternary


def build(layers: int, kv_cache_bits: int | None, int8_head: bool) -> BitNetA48ForCausalLM:
    config = config_from_preset("2B-4T", num_hidden_layers=layers, weight_format="packed",
                                kv_cache_bits=kv_cache_bits)  # fmt: skip
    model = BitNetA48ForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, PackedBitLinear):
            codes = torch.randint(-1, 2, (module.out_features, module.in_features), generator=gen, dtype=torch.int8)
            module.weight.copy_(pack_ternary(codes))
            module.weight_scale.fill_(0.02)
    return model.quantize_lm_head("int8") if int8_head else model


def native_path() -> str:
    """The ISA path of the native kernels, or a note when the installed version predates them."""
    try:
        from bitnet_a48.kernels_cpu_native import cpu_isa
    except ImportError:
        return "none (a version without native kernels)"
    return cpu_isa()


def new_cache(model: BitNetA48ForCausalLM) -> object:
    """The cache generate() builds by default for this config."""
    return make_generation_cache(model.config, batch_size=1, max_cache_len=None, device="cpu", dtype=torch.bfloat16)


@torch.no_grad()
def prefill(model: BitNetA48ForCausalLM, context: int) -> tuple[object, torch.Tensor]:
    ids = torch.randint(3, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(1))
    cache = new_cache(model)
    out = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
    return cache, out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def steps(model: BitNetA48ForCausalLM, cache: object, token: torch.Tensor, n: int, start: int) -> float:
    """Seconds per single-token forward over ``n`` steps (positions ``start`` on)."""
    t0 = time.perf_counter()
    for i in range(n):
        pos = torch.tensor([[start + i]])
        out = model(token, cache=cache, use_cache=True, position_ids=pos, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t0) / n


# Profiler events of the decoder layers' kernels: the native ops but the int8 head, and (to profile earlier versions
# of the package with this script) torch.compile'd regions and torch._int_mm.
KERNEL_EVENTS = ("bitnet_a48_native::", "Torch-Compiled Region", "aten::_int_mm")


def split(prof: profile, n: int, vocab: int) -> dict[str, float]:
    """ms per step of the native decoder-layer ops and of the lm_head, from the profile's operator self times."""
    kernels = head = 0.0
    for evt in prof.key_averages(group_by_input_shape=True):
        ms = evt.self_cpu_time_total / 1e3 / n
        if evt.key in ("bitnet_a48_native::int8_linear", "bitnet_a48_native::dense_linear") or (
            evt.key in ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul")
            and any(str(vocab) in str(s) for s in evt.input_shapes)
        ):
            head += ms
        elif evt.key.startswith(KERNEL_EVENTS):
            kernels += ms
    return {"kernels": kernels, "head": head}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--context", type=int, default=16, help="prompt tokens in the cache before the steps")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--kv-cache-bits", type=int, default=3, help="0: DynamicCache")
    parser.add_argument("--int8-head", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build(args.layers, args.kv_cache_bits or None, args.int8_head)
    vocab = model.config.vocab_size
    cache, token = prefill(model, args.context)
    steps(model, cache, token, 2, args.context)  # warm-up
    per_step = []
    for _ in range(args.reps):
        cache, token = prefill(model, args.context)
        per_step.append(steps(model, cache, token, args.steps, args.context))
    step_ms = statistics.median(per_step) * 1e3
    cache, token = prefill(model, args.context)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        steps(model, cache, token, args.steps, args.context)
    parts = split(prof, args.steps, vocab)
    outside = step_ms - parts["kernels"] - parts["head"]
    cache_name = f"{args.kv_cache_bits}-bit" if args.kv_cache_bits else "DynamicCache"
    print(f"{args.layers} layers, {args.threads} threads, native path {native_path()}, {cache_name} KV cache, "
          f"context {args.context}, {'int8' if args.int8_head else 'bf16'} head")
    print("| part | ms / step | share |")
    print("|---|---:|---:|")
    for name, ms in (("native layer ops", parts["kernels"]), ("lm_head", parts["head"]),
                     ("outside the kernels", outside), ("step", step_ms)):  # fmt: skip
        print(f"| {name} | {ms:.2f} | {ms / step_ms:.0%} |")


if __name__ == "__main__":
    main()
