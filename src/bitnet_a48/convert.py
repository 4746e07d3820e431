"""Checkpoint conversion between transformers' ``bitnet`` / ``llama`` folders and this project's ``bitnet_a48``.

Sources ``convert_checkpoint`` reads (SPEC section 7), tensors through ``safetensors`` only (no pickle):

=====================================  ==========================================  ===========================
source                                 projection tensors                          meaning
=====================================  ==========================================  ===========================
``bitnet`` latent (``-bf16`` variant)  float ``weight [out, in]``                  latent weights
``bitnet`` packed, ``autobitlinear``   uint8 ``weight [out/4, in]``, weight_scale  ``y = (x·Wᵀ) · s``, s = α
``bitnet`` packed, ``bitlinear``       uint8 ``weight [out/4, in]``, weight_scale  ``y = (x·Wᵀ) / s``, s = 1/α
``bitnet`` offline, unpacked           float ternary ``weight [out, in]``, scale   as ``autobitlinear``
``llama`` full precision               float ``weight [out, in]``                  latent; SubLN norms = ones
=====================================  ==========================================  ===========================

α = mean|W| of the absmean ternary quantiser. The packed layout is the one of ``packing.py`` (code ``w + 1``, row
``i·R + r`` in bits ``2i..2i+1`` of packed row ``r``). ``linear_class`` is read from ``quantization_config``
(transformers' default, ``bitlinear``, when absent).

Targets: ``weight_format="latent"`` (trainable, stage-2 training) or ``"packed"`` (inference). Ternary sources become
latent weights ``codes · α/p`` (p = share of non-zero codes): absmean of that tensor is exactly α and it rounds back to
the same codes, so the latent model computes ``codes · α`` as the packed one does. (``codes · α`` itself would
re-quantise to ``codes · α·p``: its mean |W| is α·p, not α.)

``export_checkpoint`` writes transformers' ``bitnet`` format back (latent bf16 with an ``autobitlinear`` online
``quantization_config``, or packed ``autobitlinear``/``bitlinear`` offline), so convert → export → convert round-trips
exactly (for ``bitlinear``, s = 1/α is a float reciprocal: α comes back to within one ulp).

The written ``bitnet_a48`` config never carries ``quantization_config``: transformers' BitNet quantizer would replace
our projections. The model is built on the meta device and filled with ``load_state_dict(assign=True)``, so no second
high-precision copy of the weights is made.
"""

from __future__ import annotations

import json
import shutil
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint_files import PICKLE_SUFFIXES, validate_safetensors_files
from .configuration_bitnet_a48 import BitNetA48Config
from .modeling_bitnet_a48 import BitNetA48ForCausalLM, BitNetA48RotaryEmbedding
from .packing import pack_ternary, packed_rows, unpack_ternary, validate_packed
from .projections import INTERMEDIATE, PROJECTIONS, QUERY, dimension
from .quantization import QUANT_EPS, quantize_weight_ternary

SOURCE_MODEL_TYPES = ("bitnet", "llama")
LINEAR_CLASSES = ("autobitlinear", "bitlinear")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
# Keys a source may hold that the model recomputes (older checkpoints saved RoPE tables).
IGNORED_KEY_SUFFIXES = ("rotary_emb.inv_freq",)
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


class CheckpointError(ValueError):
    """A folder that is not a checkpoint this module converts, or tensors that do not fit its config."""


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------


class SafetensorsFolder:
    """Lazy tensor access to the ``*.safetensors`` files of a folder (single file or sharded with an index)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            pickled = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES)
            hint = f" (found {pickled}: pickled tensors are not read, re-save them as safetensors)" if pickled else ""
            raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")
        try:  # headers, sizes and the index checked first: safetensors' own errors name no file
            validate_safetensors_files(folder)
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        self._stack = ExitStack()
        self._handles = [self._stack.enter_context(safe_open(str(folder / f), framework="pt")) for f in files]
        self._where: dict[str, Any] = {}
        for handle in self._handles:
            for key in handle.keys():
                self._where[key] = handle

    def __enter__(self) -> SafetensorsFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def keys(self) -> set[str]:
        return set(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise CheckpointError(f"{self.folder}: tensor {key!r} is missing")
        return self._where[key].get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key].get_slice(key).get_shape())


def read_config_json(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json, not a transformers checkpoint folder")
    return json.loads(path.read_text())


def projection_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """``(out, in)`` of every projection of the model, by state-dict prefix (``model.layers.i.self_attn.q_proj``)."""
    per_layer = {p.path: p.shape(config) for p in PROJECTIONS}
    return {f"model.layers.{i}.{path}": shape for i in range(config.num_hidden_layers)
            for path, shape in per_layer.items()}


def norm_shapes(config: Any, with_sub_norms: bool = True) -> dict[str, int]:
    """Width of every RMSNorm weight by state-dict key."""
    hidden = config.hidden_size
    shapes = {"model.norm.weight": hidden}
    for i in range(config.num_hidden_layers):
        shapes[f"model.layers.{i}.input_layernorm.weight"] = hidden
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = hidden
        if with_sub_norms:
            shapes[f"model.layers.{i}.self_attn.attn_sub_norm.weight"] = dimension(config, QUERY)
            shapes[f"model.layers.{i}.mlp.ffn_sub_norm.weight"] = dimension(config, INTERMEDIATE)
    return shapes


def _check_shape(key: str, found: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(found) != tuple(expected):
        raise CheckpointError(f"tensor {key!r} has shape {tuple(found)} where the config needs {tuple(expected)}")


def read_projection(
    reader: SafetensorsFolder, prefix: str, shape: tuple[int, int], linear_class: str | None
) -> tuple[str, torch.Tensor, torch.Tensor | None]:
    """One projection as ``("latent", W, None)`` or ``("ternary", codes int8 [out, in], α fp32 0-dim)``.

    ``linear_class`` is None for a checkpoint without ``quantization_config`` (latent weights only).
    """
    out_features, in_features = shape
    key, scale_key = f"{prefix}.weight", f"{prefix}.weight_scale"
    weight = reader.get(key)
    has_scale = scale_key in reader
    if weight.dtype == torch.uint8:
        _check_shape(key, tuple(weight.shape), (packed_rows(out_features), in_features))
        try:
            validate_packed(weight, out_features, key)
        except ValueError as err:
            raise CheckpointError(str(err)) from err
        codes = unpack_ternary(weight, out_features)
    elif weight.is_floating_point():
        _check_shape(key, tuple(weight.shape), shape)
        if not has_scale:
            return "latent", weight, None
        # transformers' offline AutoBitLinear keeps ternary values unpacked in a float tensor.
        if not bool(((weight == 0) | (weight == 1) | (weight == -1)).all()):
            raise CheckpointError(f"{key}: a weight stored beside a weight_scale must hold ternary values {{-1, 0, 1}}")
        codes = weight.to(torch.int8)
    else:
        raise CheckpointError(f"{key}: unexpected dtype {weight.dtype} (want a float latent weight or uint8 packed)")
    if not has_scale:
        raise CheckpointError(f"{key} is packed but {scale_key!r} is missing")
    if linear_class is None:
        raise CheckpointError(f"{key} is ternary but config.json has no bitnet `quantization_config` to read "
                              "the meaning of weight_scale from")
    scale = reader.get(scale_key).double()
    if scale.numel() != 1 or not bool(torch.isfinite(scale).all()) or float(scale.reshape(())) <= 0:
        raise CheckpointError(f"{scale_key}: want one finite positive value, got shape {tuple(scale.shape)}")
    # autobitlinear multiplies the output by s (s = α); bitlinear divides by it (s = 1/α). Reciprocal in fp64.
    alpha = scale.reshape(()) if linear_class == "autobitlinear" else 1.0 / scale.reshape(())
    return "ternary", codes, alpha.float()


def latent_from_ternary(codes: torch.Tensor, alpha: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Latent weights whose absmean quantisation gives back ``codes · α``: ``codes · α/p``, p = share of non-zeros."""
    nonzero = int(codes.count_nonzero())
    if nonzero == 0:
        return torch.zeros(codes.shape, dtype=dtype)
    step = alpha.double() * codes.numel() / nonzero  # mean |codes · step| = α
    return (codes.double() * step).to(dtype)


# ---------------------------------------------------------------------------------------------------------
# transformers bitnet / llama -> bitnet_a48
# ---------------------------------------------------------------------------------------------------------


def _source_linear_class(raw: dict[str, Any]) -> str | None:
    qc = raw.get("quantization_config")
    if not qc:
        return None
    if qc.get("quant_method") != "bitnet":
        raise CheckpointError(f"quantization_config.quant_method {qc.get('quant_method')!r} is not supported "
                              "(only transformers' 'bitnet')")
    if qc.get("use_rms_norm"):
        raise CheckpointError("quantization_config.use_rms_norm (an extra RMSNorm inside every BitLinear) has no "
                              "counterpart in bitnet_a48")
    linear_class = qc.get("linear_class", "bitlinear")
    if linear_class not in LINEAR_CLASSES:
        raise CheckpointError(f"quantization_config.linear_class must be one of {LINEAR_CLASSES}, got {linear_class!r}")
    return linear_class


def config_from_source(folder: str | Path, quant_mode: str = "a8", weight_format: str = "latent",
                       kv_cache_bits: int | None = 3) -> tuple[BitNetA48Config, dict[str, Any]]:
    """A `BitNetA48Config` carrying over the shape, RoPE, GQA, tying and token ids of a bitnet/llama folder."""
    from transformers import AutoConfig

    raw = read_config_json(folder)
    model_type = raw.get("model_type")
    if model_type not in SOURCE_MODEL_TYPES:
        raise CheckpointError(f"{folder}: model_type {model_type!r} is not a BitNet or LLaMA checkpoint "
                              f"(convert takes {SOURCE_MODEL_TYPES})")
    source = AutoConfig.from_pretrained(str(folder))  # normalises legacy rope_theta/rope_scaling into rope_parameters
    if model_type == "llama" and (getattr(source, "attention_bias", False) or getattr(source, "mlp_bias", False)):
        raise CheckpointError("LLaMA checkpoints with attention or MLP biases cannot be converted: BitNet has none")
    if getattr(source, "attention_bias", False):
        raise CheckpointError("BitNet checkpoints with attention biases are not supported")
    hidden_act = source.hidden_act
    if hidden_act not in ("relu2", "silu"):
        raise CheckpointError(f"hidden_act {hidden_act!r} is not supported (relu2 or silu)")
    fields = dict(
        vocab_size=source.vocab_size,
        hidden_size=source.hidden_size,
        intermediate_size=source.intermediate_size,
        num_hidden_layers=source.num_hidden_layers,
        num_attention_heads=source.num_attention_heads,
        num_key_value_heads=source.num_key_value_heads or source.num_attention_heads,
        head_dim=getattr(source, "head_dim", None),
        hidden_act=hidden_act,
        max_position_embeddings=source.max_position_embeddings,
        initializer_range=source.initializer_range,
        rms_norm_eps=float(source.rms_norm_eps),
        pad_token_id=source.pad_token_id,
        bos_token_id=source.bos_token_id,
        eos_token_id=source.eos_token_id,
        tie_word_embeddings=bool(getattr(source, "tie_word_embeddings", False)),
        rope_parameters=dict(source.rope_parameters),
        attention_dropout=float(getattr(source, "attention_dropout", 0.0) or 0.0),
        quant_mode=quant_mode,
        kv_cache_bits=kv_cache_bits,
        weight_format=weight_format,
    )
    return BitNetA48Config(**fields), raw


def _fresh_rotary(model: BitNetA48ForCausalLM) -> None:
    # inv_freq is a non-persistent buffer: load_state_dict(assign=True) leaves it on the meta device.
    model.model.rotary_emb = BitNetA48RotaryEmbedding(model.config)


def build_model(config: BitNetA48Config, state_dict: dict[str, torch.Tensor]) -> BitNetA48ForCausalLM:
    """Our model built on the meta device and filled with ``state_dict`` (assigned, not copied); strict."""
    with torch.device("meta"):
        model = BitNetA48ForCausalLM(config)
    if config.tie_word_embeddings:
        state_dict.setdefault("lm_head.weight", state_dict["model.embed_tokens.weight"])
    model.load_state_dict(state_dict, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    _fresh_rotary(model)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.device.type == "meta":
            raise CheckpointError(f"tensor {name!r} was not filled by the conversion")
    return model.eval()


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer and generation files; a tokenizer without a chat template gets the default one."""
    from .tokenization_bitnet_a48 import CHAT_TEMPLATE_FILE, write_default_chat_template

    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    has_tokenizer = bool({"tokenizer.json", "tokenizer_config.json", "tokenizer.model"} & set(copied))
    if has_tokenizer and write_default_chat_template(dst):
        copied.append(CHAT_TEMPLATE_FILE)
    return copied


def _check_keys(reader: SafetensorsFolder, used: set[str], folder: Path) -> None:
    extra = sorted(k for k in reader.keys() - used if not k.endswith(IGNORED_KEY_SUFFIXES))
    if extra:
        raise CheckpointError(f"{folder}: tensors that do not belong to the model: {extra[:8]}"
                              f"{' …' if len(extra) > 8 else ''}")


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    weight_format: str = "latent",
    quant_mode: str = "a8",
    dtype: torch.dtype | None = None,
    kv_cache_bits: int | None = 3,
) -> BitNetA48ForCausalLM:
    """Convert a transformers ``bitnet`` (latent or packed) or ``llama`` folder into a ``bitnet_a48`` folder at ``dst``.

    Args:
        src: source folder (config.json + safetensors, tokenizer files optional).
        dst: output folder, written with ``save_pretrained`` (config without ``quantization_config``, auto_map).
        weight_format: "latent" (trainable) or "packed" (2-bit inference weights).
        quant_mode: arithmetic of the converted model; "a8" is the b1.58 arithmetic the checkpoints were trained in.
        dtype: cast floating tensors (latent weights, embeddings, norms) to it; None keeps the source's dtypes.
        kv_cache_bits: KV-cache bits of the converted config (None: full precision).

    Returns the converted model (in memory, eval mode).
    """
    src, dst = Path(src), Path(dst)
    if weight_format == "packed" and quant_mode == "none":
        raise ValueError("a packed model needs quant_mode 'a8' or 'a4.8'")
    config, raw = config_from_source(src, quant_mode=quant_mode, weight_format=weight_format,
                                     kv_cache_bits=kv_cache_bits)
    is_llama = raw["model_type"] == "llama"
    linear_class = None if is_llama else _source_linear_class(raw)
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    with SafetensorsFolder(src) as reader:
        embed = reader.get("model.embed_tokens.weight")
        _check_shape("model.embed_tokens.weight", tuple(embed.shape), (config.vocab_size, config.hidden_size))
        state["model.embed_tokens.weight"] = _cast(embed, dtype)
        used.add("model.embed_tokens.weight")
        if "lm_head.weight" in reader:
            head = reader.get("lm_head.weight")
            _check_shape("lm_head.weight", tuple(head.shape), (config.vocab_size, config.hidden_size))
            used.add("lm_head.weight")
            if not config.tie_word_embeddings:
                state["lm_head.weight"] = _cast(head, dtype)
        elif not config.tie_word_embeddings:
            raise CheckpointError(f"{src}: lm_head.weight is missing and tie_word_embeddings is false")
        for key, width in norm_shapes(config).items():
            if is_llama and ("attn_sub_norm" in key or "ffn_sub_norm" in key):
                # SubLN does not exist in LLaMA: ones make it a plain RMS normalisation at the start.
                state[key] = torch.ones(width, dtype=dtype or embed.dtype)
                continue
            tensor = reader.get(key)
            _check_shape(key, tuple(tensor.shape), (width,))
            state[key] = _cast(tensor, dtype)
            used.add(key)
        for prefix, shape in projection_shapes(config).items():
            kind, tensor, alpha = read_projection(reader, prefix, shape, linear_class)
            used.update(k for k in (f"{prefix}.weight", f"{prefix}.weight_scale") if k in reader)
            if weight_format == "latent":
                if kind == "latent":
                    state[f"{prefix}.weight"] = _cast(tensor, dtype)
                else:
                    state[f"{prefix}.weight"] = latent_from_ternary(tensor, alpha, dtype or torch.float32)
            else:
                if kind == "latent":
                    tensor, alpha = quantize_weight_ternary(tensor)
                state[f"{prefix}.weight"] = pack_ternary(tensor)
                state[f"{prefix}.weight_scale"] = alpha.float().reshape(1).clamp(min=QUANT_EPS)
        _check_keys(reader, used, src)
    model = build_model(config, state)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    _copy_side_files(src, dst)
    return model


# ---------------------------------------------------------------------------------------------------------
# bitnet_a48 -> transformers bitnet
# ---------------------------------------------------------------------------------------------------------


def export_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    weight_format: str = "latent",
    linear_class: str = "autobitlinear",
    dtype: torch.dtype = torch.bfloat16,
    with_quantization_config: bool = True,
) -> dict[str, Any]:
    """Write a ``bitnet_a48`` folder as a transformers ``model_type: "bitnet"`` folder; returns the written config.

    Args:
        src: a folder written by this package (latent or packed).
        dst: output folder.
        weight_format: "latent" (float weights, ``autobitlinear`` online config, the ``-bf16`` form) or "packed"
            (uint8 ``[out/4, in]`` + ``weight_scale``, offline config).
        linear_class: for "packed": "autobitlinear" (weight_scale = α) or "bitlinear" (weight_scale = 1/α).
        dtype: dtype of the float tensors written (embeddings, norms, latent weights); packed weight_scale is fp32.
        with_quantization_config: for "latent", write the online ``quantization_config`` so transformers runs the
            ternary arithmetic; without it transformers runs the latent weights in full precision.

    transformers' BitNet has only the b1.58 arithmetic (INT8 inputs): a model trained in "a4.8" loses its 4-bit and
    TopK inputs there.
    """
    from transformers import BitNetConfig

    src, dst = Path(src), Path(dst)
    if weight_format not in ("latent", "packed"):
        raise ValueError(f"weight_format must be 'latent' or 'packed', got {weight_format!r}")
    if linear_class not in LINEAR_CLASSES:
        raise ValueError(f"linear_class must be one of {LINEAR_CLASSES}, got {linear_class!r}")
    raw = read_config_json(src)
    if raw.get("model_type") != BitNetA48Config.model_type:
        raise CheckpointError(f"{src}: model_type {raw.get('model_type')!r} is not 'bitnet_a48'")
    config = BitNetA48Config.from_pretrained(str(src))
    state: dict[str, torch.Tensor] = {}
    with SafetensorsFolder(src) as reader:
        for key, width in norm_shapes(config).items():
            tensor = reader.get(key)
            _check_shape(key, tuple(tensor.shape), (width,))
            state[key] = tensor.to(dtype)
        state["model.embed_tokens.weight"] = reader.get("model.embed_tokens.weight").to(dtype)
        if not config.tie_word_embeddings:
            state["lm_head.weight"] = reader.get("lm_head.weight").to(dtype)
        linear = "autobitlinear" if config.weight_format == "packed" else None
        for prefix, shape in projection_shapes(config).items():
            kind, tensor, alpha = read_projection(reader, prefix, shape, linear)
            if weight_format == "latent":
                state[f"{prefix}.weight"] = tensor.to(dtype) if kind == "latent" else latent_from_ternary(
                    tensor, alpha, dtype)
                continue
            if kind == "latent":
                tensor, alpha = quantize_weight_ternary(tensor)
            state[f"{prefix}.weight"] = pack_ternary(tensor)
            scale = alpha.double() if linear_class == "autobitlinear" else 1.0 / alpha.double()
            state[f"{prefix}.weight_scale"] = scale.float().reshape(1)
    fields = {k: getattr(config, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
        "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
        "rope_parameters", "attention_dropout")}
    out_config = BitNetConfig(**fields)
    out_config.dtype = dtype
    if weight_format == "packed":
        out_config.quantization_config = {"quant_method": "bitnet", "linear_class": linear_class,
                                          "quantization_mode": "offline", "modules_to_not_convert": ["lm_head"]}
    elif with_quantization_config:
        out_config.quantization_config = {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                          "quantization_mode": "online", "modules_to_not_convert": ["lm_head"]}
    dst.mkdir(parents=True, exist_ok=True)
    out_config.save_pretrained(dst)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    _copy_side_files(src, dst)
    return out_config.to_dict()


def pack_checkpoint(src: str | Path, dst: str | Path) -> BitNetA48ForCausalLM:
    """Load a latent ``bitnet_a48`` folder, ``model.pack()`` it and ``save_pretrained`` the packed model to ``dst``."""
    src, dst = Path(src), Path(dst)
    raw = read_config_json(src)
    if raw.get("model_type") != BitNetA48Config.model_type:
        raise CheckpointError(f"{src}: model_type {raw.get('model_type')!r} is not 'bitnet_a48'")
    if raw.get("weight_format") == "packed":
        raise CheckpointError(f"{src} is already packed")
    model = BitNetA48ForCausalLM.from_pretrained(str(src))  # checks the safetensors files first
    model.pack()
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    _copy_side_files(src, dst)
    return model


# ---------------------------------------------------------------------------------------------------------
# Command line: `bitnet-a48 convert|export|pack`. cli.py defines the parsers, with the other subcommands, so that
# `--help` needs no torch; these functions keep the Python entry points and return the exit status.
# ---------------------------------------------------------------------------------------------------------


def _run_command(command: str, argv: list[str] | None) -> int:
    from .cli import main  # imported at call time: cli.py sits above this module

    try:
        return main([command, *(sys.argv[1:] if argv is None else argv)])
    except SystemExit as stop:  # bad input: cli.main (as argparse) wrote one line to stderr and exits with status 2
        return 0 if stop.code is None else stop.code if isinstance(stop.code, int) else 1


def main_convert(argv: list[str] | None = None) -> int:
    """``bitnet-a48 convert SRC OUT [options]``: 0, or 2 after one error line on stderr."""
    return _run_command("convert", argv)


def main_export(argv: list[str] | None = None) -> int:
    """``bitnet-a48 export SRC OUT [options]``: 0, or 2 after one error line on stderr."""
    return _run_command("export", argv)


def main_pack(argv: list[str] | None = None) -> int:
    """``bitnet-a48 pack SRC OUT``: 0, or 2 after one error line on stderr."""
    return _run_command("pack", argv)
