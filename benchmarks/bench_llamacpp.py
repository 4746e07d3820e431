"""CPU decode and prefill: llama.cpp's ternary kernels (TQ2_0, TQ1_0) against our packed model, in one run.

Kept out of CI: it needs two packages that are not dependencies of ``bitnet_a48`` and a few GB of disk.

What it measures, all on the 2B-4T shape (hidden 2560, FFN 6912, 20 heads, 5 KV heads, head dim 128, vocabulary
128256, tied embeddings, RoPE θ 500000, RMSNorm ε 1e-5; ``--layers``, default 30) with random weights:

- ``llama.cpp TQ2_0`` / ``llama.cpp TQ1_0``: a GGUF in llama.cpp's ``bitnet`` architecture written here with the
  ``gguf`` package (F16 ternary weights {-1, 0, 1} · 0.02, so TQ2_0 and TQ1_0 hold them exactly; F32 norms; a
  generated SentencePiece-style vocabulary of 128256 pieces, nothing downloaded), then quantised by
  ``llama_cpp.llama_model_quantize`` with its default tensor types (the tied ``token_embd``, which is also the head,
  goes to Q6_K; the table prints what it picked). Cached in ``--work-dir`` and reused. llama.cpp's ``bitnet`` graph
  gates its FFN with SiLU where 2B-4T uses ReLU²; the matmul work (three 2560 x 6912 projections) is the same.
  Run through ``llama_cpp.Llama`` (``n_threads`` = ``n_threads_batch`` = T, its default F16 KV cache); greedy argmax
  over the last logits after each ``Llama.eval``.
- ``a4.8 (defaults)``: ``BitNetA48ForCausalLM`` as a user gets it: packed 2-bit weights, ``impl="auto"``, the
  config's default KV cache (``kv_cache_bits`` of ``config_from_preset("2B-4T")``: 3 bits), bf16 embeddings,
  norms and head; ``generate()``, greedy.
- ``a4.8 + int8 head`` (only when asked for with ``--models``): the same after ``model.quantize_lm_head("int8")``,
  an explicit inference option (closer to llama.cpp's Q6_K head).
- ``LLaMA bf16``: transformers' ``LlamaForCausalLM`` of the same shape in bf16 (``bench_decode.build_llama``).

Decode: a 16-token prompt, then ``--new-tokens`` (N) greedy tokens; ms per decoded token with the prefill excluded.
llama.cpp: the N - 1 single-token ``eval`` calls after the prefill and first token, divided by N - 1. Ours and LLaMA
(``generate`` keeps its loop, with ``eos_token_id=None`` as llama.cpp's loop checks for no end token): (time of
``generate`` of N tokens - time of ``generate`` of 1 token) / (N - 1).
Prefill: one forward of a 128-token prompt into a fresh cache, as tokens/s (llama.cpp: one ``eval`` of the 128
tokens with ``n_batch`` 128; ours and LLaMA: ``generate`` of 1 new token). Every row is warmed up first (page-in of
the mmapped GGUF, the first load of our native kernels); then ``--reps`` rounds time every row in turn (interleaved) and
the ratios are medians of the per-round ratios (ours / llama.cpp TQ2_0 tokens/s), at each of ``--threads``.

Memory read limit (``memory_bandwidth.py``): a 1 GiB fp32 buffer (``--stream-gib``), far above the L3, read by
``torch.sum`` with 1 and with T threads, best of 5, in GB/s. Against it: (a) the 7 projections of each decoder
layer of ours at M = 1 on random bf16 inputs, called as the decoder layer calls them (q/k/v in one call on
``input_layernorm``, o on ``attn_sub_norm``, the MLP's forward: gate/up with ReLU² and down, each with its norm and
input quantiser fused where the native kernels apply), every layer in turn, divided by the layers (the weights of
all layers pass through the cache as in decode; where all packed layers are not several times the L3, part of them
is still cached on the next sweep, and the ratio to the stream read can pass 100%), as ms per layer and GB/s of its
packed bytes; (b) a decode step of the decoder stack as ``generate()`` runs it (the base model on one new token
after a 16-token prompt, the default KV cache: each layer is one fused native call with attention, RoPE and the
cache append, plus the embedding and final norm), divided by the layers; the head (``head_native.head_logits``, a
decode step's call) is timed on its own. The main table's "effective GB/s" is the bytes of the weights a decode
step reads (every layer and the head) per decode step.

HOW TO RUN (from the repository root, in a virtual environment of its own so the project's stays clean)::

    python -m venv VENV && VENV/bin/pip install torch==2.13.0 -e .  # CPU-only machine: the CPU torch build first,
                                                                       # as scripts/setup_env.sh does
    CMAKE_ARGS="-DGGML_NATIVE=ON" VENV/bin/pip wheel --no-deps llama-cpp-python==0.3.36 -w DIR  # ~11 min, 2 cores
    VENV/bin/pip install DIR/llama_cpp_python-*.whl gguf
    VENV/bin/python benchmarks/bench_llamacpp.py                          # 30 layers, threads 1 and 2
    VENV/bin/python benchmarks/bench_llamacpp.py --layers 2 --new-tokens 8 --reps 1 --threads 1   # a quick try

Keep DIR (the wheel) outside the repository. ``GGML_NATIVE=ON`` compiles llama.cpp for the CPU it is built on (a
prebuilt wheel may lack AVX-512 paths). The first run writes an F16 GGUF (~5 GB at 30 layers, deleted after
quantising unless ``--keep-f16``) and the two quantised ones (~1 GB each) into ``--work-dir``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from bench_decode import PROMPT_LEN, WEIGHT_STD, Entry, build_llama, generate, time_once, weight_nbytes
from memory_bandwidth import cpu_description, stream_read_gbs
from torch import nn
from tqdm import tqdm

from bitnet_a48 import BitNetA48ForCausalLM, config_from_preset
from bitnet_a48.cache_bitnet_a48 import make_generation_cache
from bitnet_a48.head_native import head_logits
from bitnet_a48.packed_bitlinear import PackedBitLinear, fused_projection
from bitnet_a48.packing import pack_ternary

try:
    import gguf
    import llama_cpp
except ImportError as exc:  # not dependencies of the package: see HOW TO RUN above
    raise SystemExit(f"bench_llamacpp.py needs `gguf` and `llama-cpp-python` ({exc}); see its docstring") from exc

# The 2B-4T shape (configuration_bitnet_a48.PRESETS["2B-4T"]).
HIDDEN = 2560
FFN = 6912
HEADS = 20
KV_HEADS = 5
HEAD_DIM = 128
VOCAB = 128256
ROPE_THETA = 500000.0
RMS_EPS = 1e-5
CONTEXT = 4096
PREFILL_LEN = 128
GGUF_VERSION = 1  # bump when the written GGUF changes, so cached files are not reused

LLAMACPP_TYPES = {"TQ2_0": llama_cpp.LLAMA_FTYPE_MOSTLY_TQ2_0, "TQ1_0": llama_cpp.LLAMA_FTYPE_MOSTLY_TQ1_0}
OURS = "a4.8 (defaults)"
OURS_INT8_HEAD = "a4.8 + int8 head"
LLAMA = "LLaMA bf16"
MODELS = ("llama.cpp TQ2_0", "llama.cpp TQ1_0", OURS, OURS_INT8_HEAD, LLAMA)
DEFAULT_MODELS = ("llama.cpp TQ2_0", "llama.cpp TQ1_0", OURS, LLAMA)
BASELINE = "llama.cpp TQ2_0"


def log(message: str) -> None:
    print(f"[bench_llamacpp] {message}", file=sys.stderr, flush=True)


# -- the GGUF ------------------------------------------------------------------------------------------------------


def _vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and types of a SentencePiece-style ("llama") vocabulary of ``VOCAB`` entries."""
    # <unk> <s> </s>, the 256 byte pieces llama.cpp looks up (its newline is <0x0A>), then filler pieces.
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    first = len(tokens)
    tokens += [f"\u2581t{i}" for i in range(first, VOCAB)]
    types += [gguf.TokenType.NORMAL] * (VOCAB - first)
    scores = [0.0] * first + [-float(i) for i in range(VOCAB - first)]
    return tokens, scores, [int(t) for t in types]


def _tensor_plan(layers: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, numpy shape [out, in], fill) of every tensor of the ``bitnet`` architecture; fill: embed/ternary/ones."""
    t = gguf.MODEL_TENSOR
    arch_tensors = set(gguf.MODEL_TENSORS[gguf.MODEL_ARCH.BITNET])

    def name(kind: gguf.MODEL_TENSOR, layer: int | None = None) -> str:
        assert kind in arch_tensors, kind
        return gguf.TENSOR_NAMES[kind].format(bid=layer) + ".weight"

    plan = [(name(t.TOKEN_EMBD), (VOCAB, HIDDEN), "embed"), (name(t.OUTPUT_NORM), (HIDDEN,), "ones")]
    for i in range(layers):
        plan += [
            (name(t.ATTN_NORM, i), (HIDDEN,), "ones"),
            (name(t.ATTN_Q, i), (HEADS * HEAD_DIM, HIDDEN), "ternary"),
            (name(t.ATTN_K, i), (KV_HEADS * HEAD_DIM, HIDDEN), "ternary"),
            (name(t.ATTN_V, i), (KV_HEADS * HEAD_DIM, HIDDEN), "ternary"),
            (name(t.ATTN_SUB_NORM, i), (HIDDEN,), "ones"),
            (name(t.ATTN_OUT, i), (HIDDEN, HEADS * HEAD_DIM), "ternary"),
            (name(t.FFN_NORM, i), (HIDDEN,), "ones"),
            (name(t.FFN_GATE, i), (FFN, HIDDEN), "ternary"),
            (name(t.FFN_UP, i), (FFN, HIDDEN), "ternary"),
            (name(t.FFN_SUB_NORM, i), (FFN,), "ones"),
            (name(t.FFN_DOWN, i), (HIDDEN, FFN), "ternary"),
        ]
    return plan


def _fill(shape: tuple[int, ...], fill: str, rng: np.random.Generator) -> np.ndarray:
    if fill == "ones":
        return np.ones(shape, dtype=np.float32)  # norms stay F32 (llama.cpp quantises no 1-d tensor)
    if fill == "ternary":  # exact in TQ2_0 / TQ1_0: every 256-block's max |w| is 0.02, its codes -1, 0, 1
        return rng.integers(-1, 2, size=shape, dtype=np.int8).astype(np.float16) * np.float16(WEIGHT_STD)
    return (rng.standard_normal(shape, dtype=np.float32) * WEIGHT_STD).astype(np.float16)


def write_f16_gguf(path: Path, layers: int) -> None:
    """The random-weight 2B-4T-shaped model in llama.cpp's ``bitnet`` architecture, tensors streamed one by one."""
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BITNET])
    writer.add_name("bitnet-a48 benchmark: random weights, 2B-4T shape")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_vocab_size(VOCAB)
    tokens, scores, types = _vocabulary()
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    plan = _tensor_plan(layers)
    for name, shape, fill in plan:
        dtype = np.float32 if fill == "ones" else np.float16
        writer.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for _, shape, fill in tqdm(plan, desc="writing F16 GGUF", unit="tensor", file=sys.stderr):
        writer.write_tensor_data(_fill(shape, fill, rng))
    writer.close()


def quantize_gguf(source: Path, target: Path, ftype: int) -> None:
    # llama-cpp-python routes llama.cpp's log through this logger, one level up (0.3.36 maps ggml's INFO to WARNING
    # and WARN to ERROR): ERROR keeps llama.cpp's warnings and drops its line per tensor. A failure still raises.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({source} -> {target}) returned {rc}")


def prepare_ggufs(work_dir: Path, layers: int, kinds: list[str], keep_f16: bool) -> dict[str, Path]:
    """Path of each quantised GGUF in ``kinds``, written (atomically: temporary name, then renamed) when absent."""
    work_dir.mkdir(parents=True, exist_ok=True)
    stem = f"bitnet-2b4t-shape-random-L{layers}-v{GGUF_VERSION}"
    paths = {kind: work_dir / f"{stem}-{kind}.gguf" for kind in kinds}
    missing = [kind for kind, path in paths.items() if not path.exists()]
    if not missing:
        log(f"reusing {', '.join(str(p) for p in paths.values())}")
        return paths
    f16 = work_dir / f"{stem}-F16.gguf"
    if not f16.exists():
        log(f"writing {f16} ({layers} layers)")
        partial = f16.with_suffix(".partial")
        write_f16_gguf(partial, layers)
        partial.rename(f16)
    for kind in missing:
        log(f"quantising to {kind} with llama_model_quantize (minutes at 30 layers)")
        start = time.perf_counter()
        partial = paths[kind].with_suffix(".partial")
        quantize_gguf(f16, partial, LLAMACPP_TYPES[kind])
        partial.rename(paths[kind])
        log(f"{paths[kind]} in {time.perf_counter() - start:.0f} s")
    if not keep_f16:
        f16.unlink()
    return paths


def gguf_tensor_types(path: Path) -> tuple[dict[str, int], str, int]:
    """Count of tensors per ggml type, the type of ``token_embd`` (the tied head) and the bytes of all tensors."""
    reader = gguf.GGUFReader(str(path))
    counts: dict[str, int] = {}
    head = "?"
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        counts[kind] = counts.get(kind, 0) + 1
        if tensor.name == "token_embd.weight":
            head = kind
    return counts, head, sum(int(tensor.n_bytes) for tensor in reader.tensors)


# -- the rows ------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    weight_bytes: int  # bytes of the weight tensors one decode step reads (the tied head once)
    decode_s: Callable[[int], float]  # new tokens -> seconds per decoded token
    prefill_s: Callable[[], float]  # seconds of a PREFILL_LEN-token prefill


def prompt_ids(length: int) -> torch.Tensor:
    # The same generator as bench_decode.make_prompt: its 16-token prompt is our first 16 tokens.
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(1))


def _argmax_last(llm: llama_cpp.Llama) -> int:
    logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return int(np.ctypeslib.as_array(logits, shape=(VOCAB,)).argmax())


def llama_cpp_row(label: str, llm: llama_cpp.Llama, weight_bytes: int) -> Row:
    prompt = prompt_ids(PROMPT_LEN)[0].tolist()
    long_prompt = prompt_ids(PREFILL_LEN)[0].tolist()

    def decode_s(new_tokens: int) -> float:
        llm.reset()  # the next eval overwrites the KV cache from position 0
        llm.eval(prompt)
        token = _argmax_last(llm)
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([token])
            token = _argmax_last(llm)
        return (time.perf_counter() - start) / (new_tokens - 1)

    def prefill_s() -> float:
        llm.reset()
        return time_once(lambda: llm.eval(long_prompt))

    return Row(label, weight_bytes, decode_s, prefill_s)


def torch_row(entry: Entry) -> Row:
    prompt, long_prompt = prompt_ids(PROMPT_LEN), prompt_ids(PREFILL_LEN)

    def decode_s(new_tokens: int) -> float:
        one = time_once(lambda: generate(entry, prompt, 1))  # prefill + first token
        full = time_once(lambda: generate(entry, prompt, new_tokens))
        return (full - one) / (new_tokens - 1)

    def prefill_s() -> float:
        return time_once(lambda: generate(entry, long_prompt, 1))

    return Row(entry.label, decode_read_bytes(entry.model), decode_s, prefill_s)


def decode_read_bytes(model: nn.Module) -> int:
    """Bytes of the weights one decode step reads: every tensor, less the input embedding where the head does not
    share its storage (a step reads one embedding row; with tied weights that matrix is read by the head anyway)."""
    total = weight_nbytes(model)
    embedding = model.get_input_embeddings().weight.untyped_storage()
    head = model.get_output_embeddings()  # nn.Linear, or the Int8Linear of quantize_lm_head
    if embedding.data_ptr() not in {t.untyped_storage().data_ptr() for t in [*head.parameters(), *head.buffers()]}:
        total -= embedding.nbytes()
    return total


def build_ours_defaults(layers: int) -> BitNetA48ForCausalLM:
    """bench_decode.build_ours with the config's defaults kept (KV cache bits) and impl="auto"."""
    config = config_from_preset("2B-4T", num_hidden_layers=layers, weight_format="packed")
    model = BitNetA48ForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, PackedBitLinear):
                module.set_impl("auto")
                codes = torch.randint(-1, 2, (module.out_features, module.in_features), generator=gen,
                                      dtype=torch.int8)
                module.weight.copy_(pack_ternary(codes))
                module.weight_scale.fill_(WEIGHT_STD)
    return model


# -- per layer ------------------------------------------------------------------------------------------------------


def packed_layer_bytes(model: BitNetA48ForCausalLM) -> int:
    """Bytes of the 7 packed projections of one decoder layer (2-bit codes and the fp32 α)."""
    layer = model.model.layers[0]
    return sum(m.weight.numel() + 4 * m.weight_scale.numel() for m in layer.modules() if isinstance(m, PackedBitLinear))


def _project(layers: tuple[PackedBitLinear, ...], x: torch.Tensor, norm: nn.Module) -> list[torch.Tensor]:
    # What the attention module calls: one native call with the norm fused, else the modules on norm(x).
    fused = fused_projection(layers, x, norm=norm)
    return fused if fused is not None else [layer(norm(x)) for layer in layers]


def time_projections_per_layer(model: BitNetA48ForCausalLM, reps: int) -> float:
    """Seconds per layer of the projections of every layer in turn at M = 1, called as the decoder layer calls
    them (q/k/v on input_layernorm, o on attn_sub_norm, the MLP's forward: gate/up and down with their norms),
    random bf16 inputs; median of ``reps`` sweeps over all layers."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 1, HIDDEN, generator=gen).to(torch.bfloat16)
    attn_out = torch.randn(1, 1, HEADS * HEAD_DIM, generator=gen).to(torch.bfloat16)

    def sweep() -> None:
        for layer in model.model.layers:
            attn = layer.self_attn
            _project((attn.q_proj, attn.k_proj, attn.v_proj), x, layer.input_layernorm)
            _project((attn.o_proj,), attn_out, attn.attn_sub_norm)
            glu = layer.mlp.fused_gate_up(x, layer.post_attention_layernorm)
            if glu is None:
                layer.mlp(layer.post_attention_layernorm(x))
            else:
                layer.mlp.project_down(glu)

    with torch.no_grad():
        sweep()  # warm-up
        return statistics.median(time_once(sweep) for _ in range(reps)) / len(model.model.layers)


def time_decoder_step_per_layer(model: BitNetA48ForCausalLM, reps: int, steps: int = 8) -> float:
    """Seconds per layer of a decode step of the decoder stack (``model.model`` on one token through the default
    cache after a ``PROMPT_LEN``-token prompt, as generate() calls it); median of ``reps`` runs of ``steps`` steps."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (1, PROMPT_LEN), generator=gen)
    token = ids[:, -1:]

    def run() -> None:
        cache = make_generation_cache(model.config, 1, None, "cpu", model.dtype)
        model.model(input_ids=ids, cache=cache, use_cache=True)
        start = time.perf_counter()
        for i in range(steps):
            model.model(input_ids=token, cache=cache, use_cache=True,
                        position_ids=torch.tensor([[PROMPT_LEN + i]]))  # fmt: skip
        times.append((time.perf_counter() - start) / steps)

    times: list[float] = []
    with torch.no_grad():
        run()  # warm-up
        times.clear()
        for _ in range(reps):
            run()
    return statistics.median(times) / len(model.model.layers)


def time_lm_head(model: BitNetA48ForCausalLM) -> float:
    """Seconds of the head on one decode row, the call the model makes (``head_logits``: the native GEMV)."""
    x = torch.randn(1, 1, HIDDEN).to(torch.bfloat16)
    with torch.no_grad():
        head_logits(model.lm_head, x)
        return time_once(lambda: [head_logits(model.lm_head, x) for _ in range(8)]) / 8


# -- the run ----------------------------------------------------------------------------------------------------------


def native_kernel_path() -> str:
    """Which CPU path our packed layers take ("native avx512", ...), as kernels_cpu_native reports it."""
    try:
        from bitnet_a48.kernels_cpu_native import cpu_isa, native_available
    except ImportError as error:  # an older or newer package layout: report it, the timing does not depend on it
        return f"unknown ({error})"
    return f"native {cpu_isa()}" if native_available() else "torch reference (native kernels unavailable)"


def _source_state() -> str:
    """HEAD of the checkout, and whether src/ has uncommitted changes (an editable install runs them)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes under src/" if dirty else "")


def _median_ratio(ours: list[float], theirs: list[float]) -> float:
    return statistics.median(t / o for o, t in zip(ours, theirs, strict=True))  # seconds: theirs / ours = rate ratio


def run(args: argparse.Namespace) -> dict[str, object]:
    machine = cpu_description()
    machine["ggml_system_info"] = llama_cpp.llama_print_system_info().decode().strip()
    machine["ours_cpu_kernels"] = native_kernel_path()
    source = _source_state()
    log(f"{machine['cpu']}, torch {machine['torch_cpu_capability']}, flags {' '.join(machine['isa_flags'])}")
    kinds = [label.split()[-1] for label in args.models if label.startswith("llama.cpp")]
    ggufs = prepare_ggufs(Path(args.work_dir), args.layers, kinds, args.keep_f16) if kinds else {}
    gguf_info = {kind: gguf_tensor_types(path) for kind, path in ggufs.items()}
    for kind, (counts, head, nbytes) in gguf_info.items():
        log(f"{kind}: tensor types {counts}, token_embd (tied head) {head}, {nbytes / 1e6:.0f} MB of tensors")

    thread_counts = sorted(set([1, *args.threads]))
    log(f"stream read of {args.stream_gib} GiB at threads {thread_counts}")
    stream = stream_read_gbs(int(args.stream_gib * 2**30), thread_counts)
    log("stream read GB/s: " + ", ".join(f"{t} threads {g:.1f}" for t, g in stream.items()))

    entries: dict[str, Entry] = {}
    if OURS in args.models:
        log(f"building {OURS} ({args.layers} layers)")
        model = build_ours_defaults(args.layers)
        entries[OURS] = Entry(OURS, model, kv_cache_bits=model.config.kv_cache_bits)
    if OURS_INT8_HEAD in args.models:
        log(f"building {OURS_INT8_HEAD} ({args.layers} layers)")
        model = build_ours_defaults(args.layers).quantize_lm_head("int8")
        entries[OURS_INT8_HEAD] = Entry(OURS_INT8_HEAD, model, kv_cache_bits=model.config.kv_cache_bits)
    if LLAMA in args.models:
        log(f"building {LLAMA} ({args.layers} layers)")
        with torch.no_grad():
            entries[LLAMA] = Entry(LLAMA, build_llama(args.layers, torch.bfloat16))

    results: list[dict[str, object]] = []
    per_layer: list[dict[str, object]] = []
    n_ctx = max(256, PROMPT_LEN + args.new_tokens + 1, PREFILL_LEN + 1)
    load: dict[int, tuple[float, float]] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        load_before = os.getloadavg()[0]
        llms = {kind: llama_cpp.Llama(str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                                      n_batch=PREFILL_LEN, verbose=False) for kind, path in ggufs.items()}
        rows = []
        for label in args.models:
            if label.startswith("llama.cpp"):
                kind = label.split()[-1]
                rows.append(llama_cpp_row(label, llms[kind], gguf_info[kind][2]))
            else:
                rows.append(torch_row(entries[label]))
        for row in rows:
            log(f"warm-up {row.label}, {threads} threads")
            row.decode_s(4)
            row.prefill_s()
        decode: dict[str, list[float]] = {row.label: [] for row in rows}
        prefill: dict[str, list[float]] = {row.label: [] for row in rows}
        for _ in tqdm(range(args.reps), desc=f"rounds, {threads} threads", file=sys.stderr):
            for row in rows:
                decode[row.label].append(row.decode_s(args.new_tokens))
                prefill[row.label].append(row.prefill_s())
        for row in rows:
            step = statistics.median(decode[row.label])
            results.append({
                "model": row.label,
                "threads": threads,
                "ms_per_token": step * 1e3,
                "tokens_per_s": 1 / step,
                "decode_vs_tq2_0": _median_ratio(decode[row.label], decode[BASELINE]) if BASELINE in decode else None,
                "prefill_tokens_per_s": PREFILL_LEN / statistics.median(prefill[row.label]),
                "prefill_vs_tq2_0": (_median_ratio(prefill[row.label], prefill[BASELINE])
                                     if BASELINE in prefill else None),
                "weight_bytes": row.weight_bytes,
                "effective_gbs": row.weight_bytes / step / 1e9,
                "of_stream": row.weight_bytes / step / 1e9 / stream[threads],
                "decode_s": decode[row.label],
                "prefill_s": prefill[row.label],
            })
        if OURS in entries:
            log(f"per-layer projections of {OURS}, {threads} threads")
            model = entries[OURS].model
            layer_s = time_projections_per_layer(model, max(3, args.reps))
            layer_bytes = packed_layer_bytes(model)
            head_s = time_lm_head(model)
            step_layer_s = time_decoder_step_per_layer(model, max(3, args.reps))
            per_layer.append({
                "threads": threads,
                "stream_gbs": stream[threads],
                "layer_bytes": layer_bytes,
                "projections_ms_per_layer": layer_s * 1e3,
                "projections_gbs": layer_bytes / layer_s / 1e9,
                "projections_of_stream": layer_bytes / layer_s / 1e9 / stream[threads],
                "lm_head_ms": head_s * 1e3,
                "decoder_step_ms_per_layer": step_layer_s * 1e3,
                "decoder_step_of_stream": layer_bytes / step_layer_s / 1e9 / stream[threads],
                "decoder_step_vs_limit": step_layer_s / (layer_bytes / (stream[threads] * 1e9)),
                "projections_vs_limit": layer_s / (layer_bytes / (stream[threads] * 1e9)),
            })
        for llm in llms.values():
            llm.close()
        load[threads] = (load_before, os.getloadavg()[0])
    return {
        "machine": machine,
        "settings": {"layers": args.layers, "new_tokens": args.new_tokens, "reps": args.reps,
                     "threads": args.threads, "prompt_len": PROMPT_LEN, "prefill_len": PREFILL_LEN,
                     "torch": torch.__version__, "llama_cpp_python": llama_cpp.__version__,
                     "bitnet_a48_source": source,
                     "ours_kv_cache_bits": entries[OURS].kv_cache_bits if OURS in entries else None},
        "llama_cpp_types": {kind: {"tensor_types": c, "token_embd": h, "tensor_bytes": b}
                            for kind, (c, h, b) in gguf_info.items()},
        "stream_gbs": stream,
        "load_average_1min": load,  # before and after each thread count's timing; ours adds about `threads`
        "rows": results,
        "per_layer": per_layer,
    }


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def print_report(report: dict[str, object]) -> None:
    machine, settings = report["machine"], report["settings"]
    l3 = machine["l3_bytes"]
    print(f"\nCPU: {machine['cpu']} ({machine['logical_cpus']} logical CPUs, L3 "
          f"{'?' if l3 is None else f'{l3 / 2**20:.0f} MiB'}); torch ISA {machine['torch_cpu_capability']}; "
          f"flags: {' '.join(machine['isa_flags'])}")
    print(f"ggml: {machine['ggml_system_info']}")
    print(f"our CPU kernels: {machine['ours_cpu_kernels']}")
    print(f"torch {settings['torch']}, llama-cpp-python {settings['llama_cpp_python']}, bitnet_a48 "
          f"{settings['bitnet_a48_source']}; our KV cache bits: {settings['ours_kv_cache_bits']}")
    for kind, info in report["llama_cpp_types"].items():
        print(f"llama.cpp {kind} tensor types (default choice): {info['tensor_types']}, token_embd / tied head "
              f"{info['token_embd']}")
    print(f"\n2B-4T shape, {settings['layers']} layers, random weights. Decode: {settings['prompt_len']}-token "
          f"prompt, {settings['new_tokens']} new tokens, prefill excluded; prefill: {settings['prefill_len']} tokens. "
          f"Median of {settings['reps']} interleaved rounds; ratios: median per-round (row / llama.cpp TQ2_0 "
          "tokens/s).\n")
    print("| model | threads | ms / token | tokens/s | vs TQ2_0 | prefill tokens/s | prefill vs TQ2_0 "
          "| weights read / token MB | effective GB/s | of stream read |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in report["rows"]:
        print(f"| {r['model']} | {r['threads']} | {r['ms_per_token']:.1f} | {r['tokens_per_s']:.2f} | "
              f"{_ratio(r['decode_vs_tq2_0'])} | {r['prefill_tokens_per_s']:.1f} | {_ratio(r['prefill_vs_tq2_0'])} | "
              f"{r['weight_bytes'] / 1e6:.0f} | {r['effective_gbs']:.1f} | {r['of_stream']:.0%} |")
    print("\nStream read (torch.sum over fp32, best of 5): "
          + ", ".join(f"{t} threads {g:.1f} GB/s" for t, g in report["stream_gbs"].items()))
    print("1-minute load average before / after timing (this run adds about its thread count; more means other "
          "work shared the cores): " + ", ".join(f"{t} threads {a:.1f} / {b:.1f}"
                                                 for t, (a, b) in report["load_average_1min"].items()))
    if report["per_layer"]:
        print(f"\nPer decoder layer of {OURS} at M = 1. (a) the 7 projections of every layer in turn, called as the "
              "layer calls them (norms fused), per layer; (b) a decode step of the decoder stack (fused layer calls, "
              "attention, KV append; no head) / layers. limit: the packed layer at the stream read.\n")
        print("| threads | stream GB/s | packed layer MB | (a) ms / layer | (a) GB/s | (a) / limit "
              "| (b) ms / layer | (b) / limit | bf16 lm_head ms |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for p in report["per_layer"]:
            print(f"| {p['threads']} | {p['stream_gbs']:.1f} | {p['layer_bytes'] / 1e6:.1f} | "
                  f"{p['projections_ms_per_layer']:.2f} | {p['projections_gbs']:.1f} | "
                  f"{p['projections_vs_limit']:.2f}x | {p['decoder_step_ms_per_layer']:.2f} | "
                  f"{p['decoder_step_vs_limit']:.2f}x | {p['lm_head_ms']:.1f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30, help="decoder layers (2B-4T shape)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to time")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per timed decode (>= 2)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved timing rounds (the median is kept)")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=MODELS, metavar="MODEL",
                        help=f"rows, from {MODELS} (default: all but {OURS_INT8_HEAD!r})")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "bitnet_a48_llamacpp"),
                        help="where the GGUFs are written and reused")
    parser.add_argument("--keep-f16", action="store_true", help="keep the F16 GGUF after quantising")
    parser.add_argument("--stream-gib", type=float, default=1.0, help="GiB of the stream-read buffer")
    parser.add_argument("--output", default=None, help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decode time is the difference of two generates)")
    report = run(args)
    print_report(report)
    if args.output is not None:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.output}")


if __name__ == "__main__":
    main()
