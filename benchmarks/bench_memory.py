"""Model weight memory, packed (2-bit ternary) against latent bf16, for the 2B-4T and 7B presets.

Computed: each preset is built on the meta device (no memory), as ``weight_format="latent"`` and ``"packed"``, cast
to bf16 (a packed layer keeps its uint8 codes and fp32 ``weight_scale``), and the bytes of its distinct parameters
and persistent buffers are summed (tied embeddings once). ``packing.weight_bytes`` gives the same count from the
config alone; both are printed.

Measured: the same models built for real in a fresh subprocess each; the resident set (``/proc/self/status``
VmRSS) after building minus before. Embeddings, norms and lm_head stay bf16 in both formats.

    python benchmarks/bench_memory.py                       # computed for both presets, measured 2B-4T and 7B packed
    python benchmarks/bench_memory.py --measure 2B-4T:packed:30 2B-4T:latent:30
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
from torch import nn

from bitnet_a48 import BitNetA48ForCausalLM, config_from_preset
from bitnet_a48.packing import weight_bytes

PRESETS = ("2B-4T", "7B")
FORMATS = ("latent", "packed")
TARGET_7B = 6.0  # issue 5: 7B packed weights at least 6x smaller than bf16


def build(preset: str, weight_format: str, layers: int | None, device: str) -> BitNetA48ForCausalLM:
    """A bf16 model of ``preset`` (optionally fewer layers) on ``device`` ("meta" allocates nothing)."""
    overrides: dict[str, object] = {"weight_format": weight_format}
    if layers is not None:
        overrides["num_hidden_layers"] = layers
    config = config_from_preset(preset, **overrides)
    with torch.device(device):
        return BitNetA48ForCausalLM._from_config(config, dtype=torch.bfloat16)


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the distinct parameters and persistent buffers (what ``save_pretrained`` writes, tied once)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                total += buf.numel() * buf.element_size()
    return total


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("VmRSS not in /proc/self/status")


def measure_worker(spec: str) -> None:
    preset, weight_format, layers = spec.split(":")
    before = _rss_kib()
    model = build(preset, weight_format, int(layers), "cpu")
    after = _rss_kib()
    print("RESULT " + json.dumps({"spec": spec, "tensor": tensor_bytes(model), "rss_kib": after - before}))


def run(args: argparse.Namespace) -> None:
    print("Computed on the meta device (bf16 embeddings, norms and lm_head):")
    print("| preset | layers | latent bf16 GiB | packed GiB | ratio | projections ratio | "
          "packing.weight_bytes latent / packed GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    ratios = {}
    for preset in PRESETS:
        sizes = {fmt: tensor_bytes(build(preset, fmt, None, "meta")) for fmt in FORMATS}
        config = config_from_preset(preset)
        formula = {fmt: weight_bytes(config, fmt) for fmt in FORMATS}
        ratios[preset] = sizes["latent"] / sizes["packed"]
        proj = formula["latent"]["projections"] / formula["packed"]["projections"]
        print(f"| {preset} | {config.num_hidden_layers} | {sizes['latent'] / 2**30:.2f} | "
              f"{sizes['packed'] / 2**30:.2f} | {ratios[preset]:.2f}x | {proj:.2f}x | "
              f"{formula['latent']['total'] / 2**30:.2f} / {formula['packed']['total'] / 2**30:.2f} |")
    verdict = "met" if ratios["7B"] >= TARGET_7B else "missed"
    print(f"\n7B target (packed >= {TARGET_7B:.0f}x smaller than bf16): {ratios['7B']:.2f}x, {verdict}\n")

    if not args.measure:
        return
    print("Measured (RSS after building minus before, fresh process per model):")
    print("| model | tensor bytes MiB | RSS growth MiB |")
    print("|---|---:|---:|")
    for spec in args.measure:
        cmd = [sys.executable, os.path.abspath(__file__), "--measure-worker", spec]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        r = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
        preset, weight_format, layers = spec.split(":")
        print(f"| {preset} {weight_format}, {layers} layers | {r['tensor'] / 2**20:.0f} | {r['rss_kib'] / 1024:.0f} |",
              flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", nargs="*", default=["2B-4T:packed:30", "2B-4T:latent:30", "7B:packed:32"],
                        help="models to build for real, PRESET:FORMAT:LAYERS (none: computed only)")
    parser.add_argument("--measure-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_worker is not None:
        measure_worker(args.measure_worker)
        return
    run(args)


if __name__ == "__main__":
    main()
