"""Benchmark one projection: PackedBitLinear (both CPU layouts, or Triton on a GPU) against bf16 and fp32 F.linear.

Shapes are the projections of the 2B-4T preset (hidden 2560, FFN 6912, q 2560x2560, kv 640) and of the 7B preset
(hidden 4096, FFN 11008). Every time is the median of several repetitions, and the ratios compare timings taken in
the same run (on a shared CPU absolute times move by more than 50% between runs). The packed layer's time includes
its input quantiser (the a4.8 quantiser of the projection's role); F.linear quantises nothing.

    python benchmarks/bench_linear.py --quick            # M in {1, 16}
    python benchmarks/bench_linear.py --m 1 16 128 2048  # the full table (slow on a 2-core CPU)
    python benchmarks/bench_linear.py --quick --cold     # weights streamed from memory, as in a whole model

CPU methods: the packed layer with ``impl="native"`` on every ISA path the CPU runs (``kernels_cpu_native``: AVX-512
VNNI, AVX2, scalar; the widest is what ``"auto"`` picks), with ``impl="torch"`` (``_int_mm`` on unpacked chunks),
and with the int8 code cache. By default
every call reuses one weight tensor, which then sits in the CPU's last-level cache; ``--cold`` cycles through copies
of the weights (at least ``--cold-mib`` per method) so that each call reads them from memory, as a decode step
through a whole model does.

On CUDA it times with ``triton.testing.do_bench`` and runs the packed layer with ``impl="triton"``.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bitnet_a48 import config_from_preset
from bitnet_a48.packed_bitlinear import PackedBitLinear
from bitnet_a48.packing import pack_ternary, weight_bytes

Method = tuple[Callable[[torch.Tensor], torch.Tensor], int]  # (forward, weight bytes of one copy)


@dataclass(frozen=True)
class Shape:
    preset: str
    name: str
    role: str
    out_features: int
    in_features: int


SHAPES = (
    Shape("2B-4T", "q/o 2560x2560", "qkv", 2560, 2560),
    Shape("2B-4T", "k/v 640x2560", "qkv", 640, 2560),
    Shape("2B-4T", "gate/up 6912x2560", "gate_up", 6912, 2560),
    Shape("2B-4T", "down 2560x6912", "down", 2560, 6912),
    Shape("7B", "q/k/v/o 4096x4096", "qkv", 4096, 4096),
    Shape("7B", "gate/up 11008x4096", "gate_up", 11008, 4096),
    Shape("7B", "down 4096x11008", "down", 4096, 11008),
)


def time_cpu(fn: Callable[[], object], reps: int, min_seconds: float = 0.05) -> float:
    """Median seconds per call over ``reps`` repetitions, each at least ``min_seconds`` long (after a warm-up)."""
    fn()
    start = time.perf_counter()
    fn()
    inner = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-7)))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def time_cuda(fn: Callable[[], object], reps: int) -> float:
    """Median seconds per call measured by ``triton.testing.do_bench`` (CUDA events, L2 flushed)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=20 * max(reps, 1), return_mode="median") / 1e3


def _cycle(fns: list[Callable[[torch.Tensor], torch.Tensor]]) -> Callable[[torch.Tensor], torch.Tensor]:
    """One callable that calls ``fns`` in turn (copies of one method with distinct weights)."""
    turn = itertools.cycle(fns)
    return lambda x: next(turn)(x)


def make_methods(shape: Shape, device: torch.device, cold_bytes: int) -> dict[str, Method]:
    """The dense baselines and the packed layer(s) of one shape, with random weights.

    With ``cold_bytes > 0`` each method holds enough copies of its weights to span that many bytes and uses them in
    turn, so that no call finds its weights in the cache.
    """
    gen = torch.Generator().manual_seed(0)
    n, k = shape.out_features, shape.in_features
    w_fp32 = (torch.randn(n, k, generator=gen) * 0.02).to(device)
    packed = pack_ternary(torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)).to(device)

    def copies(nbytes: int) -> int:
        return max(1, -(-cold_bytes // nbytes))

    dense = {"fp32 F.linear": torch.float32, "bf16 F.linear": torch.bfloat16}
    methods: dict[str, Method] = {}
    for label, dtype in dense.items():
        weights = [w_fp32.to(dtype).clone() for _ in range(copies(w_fp32.numel() * dtype.itemsize))]
        methods[label] = (_cycle([lambda x, w=w: F.linear(x, w) for w in weights]), weights[0].numel() * dtype.itemsize)
    variants = {"packed, triton": ("triton", "packed", None)} if device.type == "cuda" else {
        **{f"packed, native {isa}": ("native", "packed", isa) for isa in _runnable_isas()},
        "packed, _int_mm": ("torch", "packed", None),
        "packed, int8 cache": ("torch", "int8", None),
    }
    for label, (impl, layout, isa) in variants.items():
        layers = []
        while len(layers) < copies(packed.numel() * (5 if layout == "int8" else 1)):
            layer = PackedBitLinear(k, n, role=shape.role, impl=impl, device=device)
            layer.weight.copy_(packed)
            layer.weight_scale.fill_(0.02)
            layer.set_cpu_layout(layout)
            layers.append(layer)
        forward = _cycle(layers)
        if isa is not None:
            forward = _on_isa(isa, forward)
        methods[label] = (forward, sum(layers[0].weight_nbytes().values()))
    return methods


def _runnable_isas() -> tuple[str, ...]:
    from bitnet_a48 import kernels_cpu_native as kn

    return kn.ISAS[: kn.ISAS.index(kn.best_cpu_isa()) + 1][::-1]


def _on_isa(isa: str, forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``forward`` run with the native kernels forced onto ``isa`` (the setting is restored after the call)."""
    from bitnet_a48 import kernels_cpu_native as kn

    def call(x: torch.Tensor) -> torch.Tensor:
        before = kn.cpu_isa()
        kn.set_cpu_isa(isa)
        try:
            return forward(x)
        finally:
            kn.set_cpu_isa(before)

    return call


def run(args: argparse.Namespace) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    m_values = [1, 16] if args.quick else args.m
    shapes = [s for s in SHAPES if args.preset in (None, s.preset)]
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, M in {m_values}, "
          + (f"weights cycled over {args.cold_mib} MiB per method (--cold)" if args.cold else "weights reused"))
    print("| shape (preset, out x in) | M | method | time (ms) | bf16 time / time | fp32 time / time | weight MiB |")
    print("|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for shape in shapes:
            methods = make_methods(shape, device, args.cold_mib * 2**20 if args.cold else 0)
            for m in m_values:
                x = torch.randn(m, shape.in_features, device=device)
                xs = {"bf16 F.linear": x.to(torch.bfloat16)}  # each method gets its input dtype, not timed
                times = {}
                for label, (fn, _) in methods.items():
                    xi = xs.get(label, x)
                    call = lambda fn=fn, xi=xi: fn(xi)
                    times[label] = time_cuda(call, args.reps) if device.type == "cuda" else time_cpu(call, args.reps)
                for label, (_, nbytes) in methods.items():
                    t = times[label]
                    print(
                        f"| {shape.preset} {shape.name} | {m} | {label} | {t * 1e3:.3f} | "
                        f"{times['bf16 F.linear'] / t:.2f} | {times['fp32 F.linear'] / t:.2f} | {nbytes / 2**20:.1f} |",
                        flush=True,
                    )
    print()
    for preset in ("2B-4T", "7B"):
        config = config_from_preset(preset)
        latent = weight_bytes(config, "latent")
        packed = weight_bytes(config, "packed")
        print(
            f"{preset}: weight bytes bf16 {latent['total'] / 2**30:.2f} GiB, packed {packed['total'] / 2**30:.2f} GiB "
            f"(embeddings and norms bf16): {latent['total'] / packed['total']:.2f}x smaller; projections alone "
            f"{latent['projections'] / packed['projections']:.2f}x"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only M in {1, 16}")
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16, 128, 2048], help="token counts M")
    parser.add_argument("--preset", choices=["2B-4T", "7B"], default=None, help="only the shapes of one preset")
    parser.add_argument("--reps", type=int, default=7, help="repetitions per measurement (the median is kept)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even when CUDA is available")
    parser.add_argument("--cold", action="store_true", help="cycle through copies of the weights (read from memory)")
    parser.add_argument("--cold-mib", type=int, default=128, help="bytes of weight copies per method with --cold")
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
