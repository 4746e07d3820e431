"""The machine's memory read limit and its CPU description, for benchmarks that compare against them.

``stream_read_gbs`` reads a buffer several times larger than the last-level cache with one vectorised reduction
(``torch.sum`` over fp32: one add per 4 bytes read, far below what a core can compute, so the time is the time of
the read) and reports the best of a few passes in GB/s (10^9 bytes per second) at each thread count. The buffer is
filled with ones once, so every page is backed by its own memory (a fresh ``torch.empty`` of untouched pages could
be served from the kernel's shared zero page and read at cache speed).

``cpu_description`` collects what a table of CPU timings needs to be read on another machine: the model name from
``/proc/cpuinfo``, the vector extensions it lists, the ISA level torch dispatches to
(``torch.backends.cpu.get_cpu_capability()``) and the size of the last-level cache.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8",
             "amx_bf16")


def _cpuinfo_field(name: str) -> str | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def l3_cache_bytes() -> int | None:
    """Size of the CPU's level-3 cache from sysfs (Linux), or None where it is not listed."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() != "3":
                continue
            size = (index / "size").read_text().strip()  # e.g. "260M", "32768K"
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1], 1)
        return int(size.rstrip("KMG")) * scale
    return None


def cpu_description() -> dict[str, object]:
    """CPU model name, listed vector extensions, torch's dispatch level, L3 bytes and logical CPUs."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return {
        "cpu": _cpuinfo_field("model name") or "unknown",
        "isa_flags": [f for f in ISA_FLAGS if f in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "l3_bytes": l3_cache_bytes(),
        "logical_cpus": len(os.sched_getaffinity(0)),
    }


def stream_read_gbs(nbytes: int, threads: list[int], passes: int = 5) -> dict[int, float]:
    """GB/s of reading ``nbytes`` once with ``torch.sum``, best of ``passes`` reads, for each thread count."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32)  # written: every page backed (module docstring)
    previous = torch.get_num_threads()
    result = {}
    try:
        for t in threads:
            torch.set_num_threads(t)
            buf.sum()  # warm-up: thread pool start, first-touch effects
            best = float("inf")
            for _ in range(passes):
                start = time.perf_counter()
                buf.sum()
                best = min(best, time.perf_counter() - start)
            result[t] = buf.numel() * buf.element_size() / best / 1e9
    finally:
        torch.set_num_threads(previous)
    return result
