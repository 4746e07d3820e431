"""Time one QAT training step (forward, backward, AdamW) of BitNet a4.8 against transformers' LlamaForCausalLM.

The step is ``model(ids, labels=ids).loss.backward(); optimizer.step(); optimizer.zero_grad()`` on random tokens,
with the batch size and sequence length of the training preset's recipe (``training.TRAIN_PRESETS``). Models:

    a4.8   BitNetA48ForCausalLM, quant_mode="a4.8" (stage 2: INT4 / TopK+INT8 / INT8 inputs, ternary weights)
    a8     the same model in quant_mode="a8" (stage 1, 95% of the recipe's steps: INT8 inputs, ternary weights)
    none   the same model in full precision (nn.Linear arithmetic, with SubLN norms and ReLU²GLU)
    llama  LlamaForCausalLM of the same shape (hidden, layers, heads, kv heads, intermediate, vocab), SiLU GLU

The models are timed in turn, one step each per round, so that drift of a shared CPU hits all of them alike; each
time is the median over the rounds after warm-up (and the fastest round, the least disturbed on a shared CPU), and
the ratios compare times of the same run. ``--profile`` adds where the time of one step goes: torch.profiler self
times grouped by the Python function that issued each op (weight quantiser, activation quantisers, TopK,
straight-through estimator, RMSNorms) and, for the backward, by the forward op that created the autograd node.

    python benchmarks/bench_qat_step.py                                  # quickstart and small, 1 and 2 threads
    python benchmarks/bench_qat_step.py --presets quickstart --threads 2 --profile
"""

from __future__ import annotations

import argparse
import inspect
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from bitnet_a48 import create_model, modeling_bitnet_a48, quantization
from bitnet_a48.modeling_bitnet_a48 import BitNetA48RMSNorm
from bitnet_a48.training import get_preset

MODELS = ("a4.8", "a8", "none", "llama")

# Functions whose ops form each group of the breakdown: (file name, function name).
WEIGHT_QUANTISER = {"fake_quantize_weight_values", "quantize_weight_ternary", "fake_quantize_weight_ternary"}
TOPK = {"_topk_keep", "topk_mask"}
ACT_QUANTISERS = {
    "fake_quantize_act_values",
    "_int8_codes",
    "_scale_codes_",
    "quantize_act",
    "quantize_act_int8",
    "quantize_act_int4",
    "quantize_act_fp4",
    "quantize_act_topk_int8",
    "dequantize",
    "fake_quantize_act",
}
STE = {"ste", "forward", "apply"}  # quantization.ste and _StraightThrough.forward
GROUPS = ("weight quantiser", "activation quantisers", "TopK", "STE", "norms", "matmul", "attention", "AdamW", "other")
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
MATMUL_NODES = ("MmBackward", "AddmmBackward", "BmmBackward", "BaddbmmBackward")


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def build_models(shape: dict, vocab_size: int, seq_len: int, names: list[str]) -> dict[str, nn.Module]:
    """The models to time, seeded alike; every one uses SDPA attention."""
    models: dict[str, nn.Module] = {}
    fields = dict(shape, vocab_size=vocab_size, max_position_embeddings=max(seq_len, 2048))
    for name in names:
        torch.manual_seed(0)
        if name == "llama":
            config = LlamaConfig(
                hidden_size=shape["hidden_size"],
                intermediate_size=shape["intermediate_size"],
                num_hidden_layers=shape["num_hidden_layers"],
                num_attention_heads=shape["num_attention_heads"],
                num_key_value_heads=shape.get("num_key_value_heads", shape["num_attention_heads"]),
                vocab_size=vocab_size,
                max_position_embeddings=fields["max_position_embeddings"],
                rms_norm_eps=1e-5,
                tie_word_embeddings=False,
                attn_implementation="sdpa",
            )
            models[name] = LlamaForCausalLM(config)
        else:
            models[name] = create_model(**fields, quant_mode=name, attn_implementation="sdpa")
        models[name].train()
    return models


def make_step(model: nn.Module, ids: torch.Tensor, device: torch.device, bf16: bool) -> Callable[[], None]:
    """One training step of ``model`` on ``ids`` with its own AdamW (the recipe's betas and weight decay)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def time_round_robin(steps: dict[str, Callable[[], None]], warmup: int, rounds: int) -> dict[str, list[float]]:
    """Seconds of each step of each model, timed one step each per round."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            samples[name].append(time.perf_counter() - start)
    return samples


def _line_range(function: Callable) -> tuple[str, int, int]:
    lines, first = inspect.getsourcelines(function)
    return Path(inspect.getsourcefile(function)).name, first, first + len(lines)


NORM_RANGES = [_line_range(BitNetA48RMSNorm.forward), _line_range(LlamaRMSNorm.forward)] + [
    _line_range(function)  # the norm's autograd Function, where the version measured has one
    for name in ("_RMSNormFunction", "_inverse_rms")
    if (function := getattr(modeling_bitnet_a48, name, None)) is not None
]
QUANT_FILES = {Path(quantization.__file__).name, "bitlinear.py"}


def _frame_group(frame: str) -> str | None:
    """Group of one Python frame of the profile (an event named ``path(line): function``), or None."""
    location, _, function = frame.rpartition(": ")
    path, _, line = location.rpartition("(")
    if not path or not line.rstrip(")").isdigit():
        return None
    file, line_no = Path(path).name, int(line.rstrip(")"))
    if "torch/optim" in path.replace("\\", "/"):
        return "AdamW"
    if any(file == f and lo <= line_no < hi for f, lo, hi in NORM_RANGES):
        return "norms"
    if file not in QUANT_FILES:
        return None
    if function in WEIGHT_QUANTISER:
        return "weight quantiser"
    if function in TOPK:
        return "TopK"
    if function in ACT_QUANTISERS:
        return "activation quantisers"
    if function in STE and file != "bitlinear.py":
        return "STE"
    return None


def _forward_group(event: Any) -> str:
    """Group of a forward event: by its op name, else by the innermost Python frame around it that has one."""
    if event.name in MATMUL_OPS:
        return "matmul"
    if "scaled_dot_product" in event.name or "flash_attention" in event.name:
        return "attention"
    node = event
    while node is not None:
        group = _frame_group(node.name)
        if group is not None:
            return group
        node = node.cpu_parent
    return "other"


def profile_step(step: Callable[[], None]) -> dict[str, float]:
    """Milliseconds of op self time per group in one step (profiled, so a little slower than timed)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        step()
    events = prof.events()
    by_sequence: dict[int, str] = {}
    for event in events:
        if event.sequence_nr >= 0 and not event.name.startswith("autograd::engine"):
            group = _forward_group(event)
            if group != "other" or event.sequence_nr not in by_sequence:
                by_sequence[event.sequence_nr] = group
    totals: dict[str, float] = defaultdict(float)

    def backward_group(event: Any) -> str | None:
        node = event
        while node is not None:
            if node.name.startswith("autograd::engine::evaluate_function: "):
                name = node.name.split(": ", 1)[1]
                if name.startswith("_StraightThrough"):
                    return "STE"
                if name.startswith(MATMUL_NODES):
                    return "matmul"
                if "ScaledDotProduct" in name or "Attention" in name:
                    return "attention"
                if "RMSNorm" in name:
                    return "norms"
                return by_sequence.get(node.sequence_nr, "other")
            node = node.cpu_parent
        return None

    for event in events:
        group = backward_group(event) or _forward_group(event)
        totals[group] += event.self_cpu_time_total / 1e3
    return totals


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["quickstart", "small"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--rounds", type=int, default=5, help="timed steps of each model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each model first")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the preset's")
    parser.add_argument("--profile", action="store_true", help="also the breakdown of one step per model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (the recipe's default on CUDA)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    print(f"torch {torch.__version__}, CPU: {cpu_model()}, ISA: {torch.backends.cpu.get_cpu_capability()}")
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}")
    for preset_name in args.presets:
        preset = get_preset(preset_name)
        batch = args.batch_size or preset["batch_size"]
        seq_len = args.seq_len or preset["seq_len"]
        models = build_models(preset["model"], preset["vocab_size"], seq_len, args.models)
        ids = torch.randint(0, preset["vocab_size"], (batch, seq_len), generator=torch.Generator().manual_seed(0))
        ids = ids.to(device)
        steps = {name: make_step(model.to(device), ids, device, args.bf16) for name, model in models.items()}
        print(
            f"\n== preset {preset_name}: {preset['model']}, vocab {preset['vocab_size']}, batch {batch} x "
            f"seq {seq_len}, {args.rounds} rounds after {args.warmup} warm-up, device {device}"
            f"{', bf16 autocast' if args.bf16 else ''}"
        )
        for threads in args.threads if device.type == "cpu" else [torch.get_num_threads()]:
            torch.set_num_threads(threads)
            samples = time_round_robin(steps, args.warmup, args.rounds)
            # The median, and the fastest step (on a CPU shared with other work, the least disturbed one).
            for label, stat in (("median", statistics.median), ("min", min)):
                times = {name: stat(values) for name, values in samples.items()}
                base = times.get("llama")
                cells = [
                    f"{name} {times[name] * 1e3:8.1f} ms" + (f" ({times[name] / base:.3f}x)" if base else "")
                    for name in times
                ]
                print(f"threads {threads} {label:>6}: " + " | ".join(cells))
            if args.profile:
                breakdown = {name: profile_step(step) for name, step in steps.items()}
                print(f"  breakdown at {threads} threads (ms of op self time in one profiled step):")
                print("  " + f"{'group':<24}" + "".join(f"{name:>10}" for name in breakdown))
                for group in GROUPS:
                    print("  " + f"{group:<24}" + "".join(f"{b.get(group, 0.0):10.1f}" for b in breakdown.values()))
                print("  " + f"{'total':<24}" + "".join(f"{sum(b.values()):10.1f}" for b in breakdown.values()))


if __name__ == "__main__":
    main()
