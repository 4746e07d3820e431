"""Native CPU kernels (C++, built on first use): ternary linear layers and an int8 linear, with run-time ISA dispatch.

Torch references: ``packed_bitlinear.ternary_matmul_torch`` (ternary matmul), ``quantization.quantize_act``
(activation quantisers) and ``int8_linear.int8_linear_torch`` (int8 head). Every op equals its reference bit for bit.

Arithmetic, for activation codes ``a [M, K]`` (int8) and the packed weights of ``packing.py`` (uint8 ``[R, K]``,
``R = ceil(N/4)``, field ``i`` of packed row ``r`` holds ``f = w + 1 ∈ {0, 1, 2}`` of output row ``i·R + r``)::

    s_i[m, r] = Σ_k a[m, k] · ((packed[r, k] >> 2i) & 3)            int32, exact (|s| ≤ K·2·128)
    y[m, i·R + r] = float(s_i[m, r] − Σ_k a[m, k]) · (x_scale[m] · α)  the epilogue of ternary_matmul_torch

Each packed byte is loaded once and feeds four output rows; the fields are unsigned, so they multiply the signed
codes directly:

- ``avx512``: AVX-512 F/BW with VNNI. The fields are masked in place (``& 0x03``, ``0x0C``, ``0x30``, ``0xC0``: field
  ``i`` times ``4^i``, at most 128, still an unsigned byte) and go to ``vpdpbusd`` (u8 × s8, four products summed
  into each int32 lane), 64 columns a step, two accumulator sets for alternate steps; the exact sums are divided by
  ``4^i`` at the end. The last partial step uses masked loads. Blocks of 4 activation rows share the fields.
- ``avx2``: fields by one shift and one ``and`` each (``& 3`` keeps two bits of every byte of a 16-bit shift);
  ``vpmaddubsw`` (u8 × s8 → pairs summed to int16, at most 512 a lane) accumulated in int16 for 32 steps (below
  2^15), then ``vpmaddwd`` by ones into int32. Blocks of 2 activation rows. The column tail is scalar.
- ``scalar``: plain C++ loops (also the only path off x86).

The per-row loops (quantisers, RMSNorm) are compiled twice, for AVX2 and for baseline x86-64, and the loader picks
by CPUID (``target_clones``); both clones compute the same values (no fast-math), and ``BITNET_A48_CPU_ISA`` does not
choose between them.

The weights keep the checkpoint layout: the kernel streams each packed row front to back, so no repacking is
needed and no second copy is held. Work is split over tiles of 8 packed rows of all the group's weights together
(``at::parallel_for``, the torch thread pool): a group (q/k/v, or gate/up) is one call with one activation
quantisation. Outputs are written in the input's dtype (fp32, bf16 or fp16), rounded to nearest even as ``.to()``.

Activation quantisers, per row, in fp32 with the operations of ``quantization.py`` in the same order
(``inv = (1/γ)·Q``, ``codes = RoundClip(x·inv)``, ``scale = 1/inv``): INT8 absmax, INT4 absmean, and TopK then INT8
(the k-th largest ``|x|`` is the threshold; of the entries equal to it, the lowest indices are kept). The absmean's
sum of ``|x|`` is accumulated in fp64, here and in the reference: for bf16 inputs that sum is exact, so it does not
depend on the order of the additions, and the fp32 mean is the same whatever the ISA (an fp32 sum is not).

Int8 linear (the optional int8 ``lm_head``): INT8 absmax codes of ``x`` against int8 weights ``[N, K]`` in
[-127, 127] with one fp32 scale per row; ``y = float(Σ a·w) · (x_scale · w_scale[n])``. AVX2 multiplies ``|a|``
by ``sign(a)·w`` (``vpsignb``) so ``vpmaddubsw`` takes an unsigned operand; AVX-512 the same with ``vpdpbusd``.

The path is the best the CPU has (CPUID); ``BITNET_A48_CPU_ISA=scalar|avx2|avx512`` or :func:`set_cpu_isa` forces
a narrower one (tests run every path the machine can). The library is compiled once per source and torch version
with the C++ compiler (``$CXX``, else ``g++``/``clang++``) into ``$BITNET_A48_CACHE_DIR`` (default
``~/.cache/bitnet_a48``) and loaded with ``torch.ops.load_library``; ops live in the ``bitnet_a48_native``
namespace and have fake implementations, so ``torch.compile`` and ``torch.export`` trace through them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from .kernels_cpu_native_dense_source import DENSE_CPP_SOURCE
from .kernels_cpu_native_kv_source import KV_CPP_SOURCE
from .kernels_cpu_native_layer_source import LAYER_CPP_SOURCE
from .kernels_cpu_native_source import CPP_SOURCE

ISAS = ("scalar", "avx2", "avx512")
NATIVE_QUANTIZERS = ("int8", "int4", "topk_int8")
ISA_ENV = "BITNET_A48_CPU_ISA"
CACHE_ENV = "BITNET_A48_CACHE_DIR"

# One translation unit: the ternary and int8 kernels, the attention and KV-cache kernels (which use the first part's
# helpers), the fused decode step of a decoder layer (which calls both) and the dense head GEMV.
SOURCE = CPP_SOURCE + KV_CPP_SOURCE + LAYER_CPP_SOURCE + DENSE_CPP_SOURCE
# No -march (ISA paths carry their own target attributes) and no implicit FMA contraction: the ops that equal torch
# bit for bit round every product and sum as torch does.
CXX_FLAGS = ("-shared", "-fPIC", "-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off")

_STATE: dict[str, object] = {}


def _compiler() -> str | None:
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++"]
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


def _library_name() -> str:
    key = hashlib.sha256(f"{SOURCE}\0{CXX_FLAGS}\0{torch.__version__}\0{sys.platform}".encode()).hexdigest()[:16]
    return f"bitnet_a48_native_{key}.so"


def _cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "bitnet_a48")
    return Path(root) / "native"


def _build(compiler: str, target: Path) -> float:
    """Compile the extension into ``target`` (atomically: a temporary file renamed); returns the seconds taken."""
    from torch.utils import cpp_extension

    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source = Path(tmp) / "bitnet_a48_native.cpp"
        source.write_text(SOURCE)
        output = Path(tmp) / target.name
        abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
        command = [
            compiler, str(source), "-o", str(output), *CXX_FLAGS,
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_API_INCLUDE_EXTENSION_H=0",
            *[f"-I{p}" for p in cpp_extension.include_paths()],
            *[f"-L{p}" for p in cpp_extension.library_paths()],
            *[f"-Wl,-rpath,{p}" for p in cpp_extension.library_paths()],
            "-lc10", "-ltorch_cpu",
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            lines = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.splitlines()
            raise RuntimeError(f"building the native CPU kernels failed: {lines[0] if lines else 'no output'}")
        os.replace(output, target)
    return time.perf_counter() - start


def _register_fakes() -> None:
    # Shapes and dtypes only: torch.compile / torch.export trace the ops through these.
    @torch.library.register_fake("bitnet_a48_native::quantize_act")
    def _(x: torch.Tensor, quantizer: str, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
        return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0], 1), dtype=torch.float32)

    @torch.library.register_fake("bitnet_a48_native::ternary_linear")
    def _(x: torch.Tensor, packed: list[torch.Tensor], weight_scale: list[torch.Tensor], out_features: list[int],
          quantizer: str, topk: int, norm_weight: torch.Tensor | None = None, norm_eps: float = 0.0,
          relu2_glu: bool = False) -> list[torch.Tensor]:  # fmt: skip
        if relu2_glu:
            return [x.new_empty((x.shape[0], out_features[0]))]
        return [x.new_empty((x.shape[0], n)) for n in out_features]

    @torch.library.register_fake("bitnet_a48_native::ternary_matmul")
    def _(codes: torch.Tensor, scale: torch.Tensor, packed: torch.Tensor, out_features: int,
          out_dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
        return codes.new_empty((codes.shape[0], out_features), dtype=out_dtype)

    @torch.library.register_fake("bitnet_a48_native::kv_decode_attention")
    def _(query: torch.Tensor, *args: object) -> torch.Tensor:
        b, hq, _, d = query.shape
        return query.new_empty((b, 1, hq, d))

    @torch.library.register_fake("bitnet_a48_native::kv_quantize_pack")
    def _(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        packed = x.new_empty((*x.shape[:-1], x.shape[-1] * bits // 8), dtype=torch.uint8)
        return packed, x.new_empty(x.shape[:-1], dtype=torch.float16)

    @torch.library.register_fake("bitnet_a48_native::rope")
    def _(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
            k, memory_format=torch.contiguous_format
        )

    @torch.library.register_fake("bitnet_a48_native::kv_append_decode")
    def _(*args: object) -> None:
        return None

    @torch.library.register_fake("bitnet_a48_native::decoder_layer_decode")
    def _(hidden: torch.Tensor, *args: object) -> torch.Tensor:
        return torch.empty_like(hidden, memory_format=torch.contiguous_format)

    @torch.library.register_fake("bitnet_a48_native::dense_linear")
    def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("bitnet_a48_native::int8_linear")
    def _(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
        return x.new_empty((x.shape[0], weight.shape[0]))


def load_native() -> None:
    """Build (once per machine, cached) and load the native library; raises ``RuntimeError`` saying why not.

    ``BITNET_A48_CPU_ISA``, when set, is applied on the first load; a name this CPU cannot run raises ``ValueError``
    on every call (never a silent fallback to the widest path).
    """
    if _STATE.get("loaded"):
        return
    if "error" in _STATE:
        raise RuntimeError(str(_STATE["error"]))
    if not _STATE.get("library"):
        try:
            compiler = _compiler()
            if compiler is None:
                raise RuntimeError("no C++ compiler ($CXX, g++ or clang++) is on the PATH")
            target = _cache_dir() / _library_name()
            seconds = 0.0
            if not target.exists():
                seconds = _build(compiler, target)
                sys.stderr.write(f"bitnet-a48: built the native CPU kernels in {seconds:.1f} s ({target.parent})\n")
            torch.ops.load_library(str(target))
            _register_fakes()
        except (RuntimeError, OSError) as error:
            _STATE["error"] = str(error)
            raise RuntimeError(str(error)) from error
        _STATE.update(library=True, build_seconds=seconds, path=str(target))
    forced = os.environ.get(ISA_ENV)
    if forced:
        _force_isa(forced)
    _STATE["loaded"] = True


def native_available() -> bool:
    """Whether the native library is (or can be) loaded; warns once, on the first failure, why the CPU path is slow."""
    if _STATE.get("loaded"):
        return True
    try:
        load_native()
    except RuntimeError as error:
        if not _STATE.get("warned"):
            _STATE["warned"] = True
            warnings.warn(
                f"bitnet-a48: the native CPU kernels are unavailable ({error}); packed layers run the pure-torch "
                "reference on the CPU, which is several times slower",
                RuntimeWarning,
                stacklevel=2,
            )
        return False
    return True


def build_info() -> dict[str, object]:
    """Where the library was loaded from and how long its build took here (0.0 when it came from the cache)."""
    load_native()
    return {"path": _STATE["path"], "build_seconds": _STATE["build_seconds"], "isa": cpu_isa(), "best": best_cpu_isa()}


def best_cpu_isa() -> str:
    """The widest path this CPU runs: "avx512" (AVX-512 BW + VNNI), "avx2" or "scalar"."""
    load_native()
    return ISAS[torch.ops.bitnet_a48_native.cpu_isa_info()[0]]


def cpu_isa() -> str:
    """The path the native kernels take now."""
    load_native()
    return ISAS[torch.ops.bitnet_a48_native.cpu_isa_info()[1]]


def set_cpu_isa(isa: str) -> None:
    """Force the native kernels onto ``isa`` ("scalar", "avx2", "avx512"); it must not exceed :func:`best_cpu_isa`."""
    load_native()
    _force_isa(isa)


def _force_isa(isa: str) -> None:
    if isa not in ISAS:
        raise ValueError(f"{ISA_ENV} / set_cpu_isa takes one of {ISAS}, got {isa!r}")
    best = ISAS[torch.ops.bitnet_a48_native.cpu_isa_info()[0]]
    if ISAS.index(isa) > ISAS.index(best):
        raise ValueError(f"this CPU cannot run the {isa!r} path of the native kernels (it has {best!r})")
    torch.ops.bitnet_a48_native.set_cpu_isa(ISAS.index(isa))


# ---------------------------------------------------------------------------------------------------------------
# Python entry points (the custom ops; inputs are checked again in C++)
# ---------------------------------------------------------------------------------------------------------------


def ternary_linear_native(
    x: torch.Tensor,
    packed: list[torch.Tensor],
    weight_scale: list[torch.Tensor],
    out_features: list[int],
    quantizer: str,
    topk: int = 0,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 0.0,
    relu2_glu: bool = False,
) -> list[torch.Tensor]:
    """Quantise ``x [M, K]`` once and multiply it by every packed weight of the group: ``[M, N_j]`` in ``x.dtype``
    for each.

    ``quantizer`` is one of :data:`NATIVE_QUANTIZERS` (``topk`` entries kept per row for "topk_int8"). With
    ``norm_weight`` the rows are first RMS-normalised as ``BitNetA48RMSNorm`` does (weight of ``x``'s dtype, epsilon
    ``norm_eps``); with ``relu2_glu`` the two outputs (gate, up) come back as one, ``ReLU²(gate) · up``, as
    ``BitNetA48MLP`` computes it. Both equal the unfused modules bit for bit.
    """
    if quantizer not in NATIVE_QUANTIZERS:
        raise ValueError(f"the native kernels quantise with {NATIVE_QUANTIZERS}, got {quantizer!r}")
    return torch.ops.bitnet_a48_native.ternary_linear(
        x, packed, weight_scale, out_features, quantizer, topk, norm_weight, norm_eps, relu2_glu
    )


def quantize_act_native(x: torch.Tensor, quantizer: str, topk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes int8 ``[M, K]`` and scale fp32 ``[M, 1]`` of ``quantization.quantize_act`` for ``x [M, K]``."""
    if quantizer not in NATIVE_QUANTIZERS:
        raise ValueError(f"the native kernels quantise with {NATIVE_QUANTIZERS}, got {quantizer!r}")
    return torch.ops.bitnet_a48_native.quantize_act(x, quantizer, topk)


def ternary_matmul_native(
    codes: torch.Tensor, scale: torch.Tensor, packed: torch.Tensor, out_features: int, out_dtype: torch.dtype
) -> torch.Tensor:
    """``(codes @ w^T) · scale`` on pre-quantised codes (``packed_bitlinear.ternary_matmul_torch``)."""
    return torch.ops.bitnet_a48_native.ternary_matmul(codes, scale, packed, out_features, out_dtype)


def int8_linear_native(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """``int8_linear.int8_linear_torch`` in one native call."""
    return torch.ops.bitnet_a48_native.int8_linear(x, weight, weight_scale)


def dense_linear_native(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [M, K] @ weight[N, K]^T`` in ``x``'s dtype (fp32 or bf16), fp32 sums (kernels_cpu_native_dense_source)."""
    return torch.ops.bitnet_a48_native.dense_linear(x, weight)


def kv_decode_attention_native(
    query: torch.Tensor,
    layer: object,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Attention of one new token per row over a dynamic ``BitNetA48QuantizedLayer`` (packed store, 4-bit first
    token, high-precision window) and the new keys/values, read in place: (B, 1, Hq, D) in the query's dtype.

    ``bias``: additive fp32 (1 or B, kv_len) or None. Scores and the softmax are fp32; reference:
    ``BitNetA48QuantizedLayer.attend`` (the blockwise torch path), equal within float rounding.
    """
    sink = layer.sink_bits is not None  # type: ignore[attr-defined]
    return torch.ops.bitnet_a48_native.kv_decode_attention(
        query.contiguous(), layer.k_packed, layer.k_scale, layer.v_packed, layer.v_scale,  # type: ignore[attr-defined]
        layer.n_quant, layer.bits,  # type: ignore[attr-defined]
        layer.k_sink if sink else None, layer.k_sink_scale if sink else None,  # type: ignore[attr-defined]
        layer.v_sink if sink else None, layer.v_sink_scale if sink else None,  # type: ignore[attr-defined]
        layer.sink_pos if sink else None, layer.sink_bits or 0,  # type: ignore[attr-defined]
        layer.k_window, layer.v_window, key_states.contiguous(), value_states.contiguous(),  # type: ignore[attr-defined]
        bias, scaling,
    )  # fmt: skip


def kv_quantize_pack_native(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernels_kv_cache.quantize_pack_torch(x, bits, torch.float16)`` in one call, equal bit for bit."""
    return torch.ops.bitnet_a48_native.kv_quantize_pack(x, bits)


def rope_native(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``modeling_bitnet_a48.apply_rotary_pos_emb(q, k, cos, sin)`` in one call, equal bit for bit: q, k (B, H, S, D),
    cos, sin (B|1, S, D), all of one dtype; every product and the sum rounded to that dtype as torch does."""
    return torch.ops.bitnet_a48_native.rope(q, k, cos, sin)


def kv_append_decode_native(
    layer: object, key_states: torch.Tensor, value_states: torch.Tensor, position_ids: torch.Tensor | None
) -> None:
    """``BitNetA48QuantizedLayer.append`` of one new token per row into a full window (dynamic layout), in place,
    equal bit for bit: the token leaving the window goes to store slot ``n_quant`` (which must exist), and a row's
    first token is noted and kept at ``sink_bits``. The caller advances ``n_quant`` and the length."""
    sink = layer.sink_bits is not None  # type: ignore[attr-defined]
    torch.ops.bitnet_a48_native.kv_append_decode(
        layer.k_window, layer.v_window, key_states.contiguous(), value_states.contiguous(),  # type: ignore[attr-defined]
        layer.k_packed, layer.k_scale, layer.v_packed, layer.v_scale,  # type: ignore[attr-defined]
        layer.n_quant, layer.bits,  # type: ignore[attr-defined]
        layer.k_sink if sink else None, layer.k_sink_scale if sink else None,  # type: ignore[attr-defined]
        layer.v_sink if sink else None, layer.v_sink_scale if sink else None,  # type: ignore[attr-defined]
        layer.sink_pos if sink else None, layer.sink_bits or 0,  # type: ignore[attr-defined]
        position_ids, layer.cumulative_length,  # type: ignore[attr-defined]
    )  # fmt: skip
