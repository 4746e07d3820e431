"""Model card (README.md) of a BitNet a4.8 checkpoint, and a Hub upload that keeps it.

``write_model_card`` fills the template (``model_card_template.py``, a module so that a ``trust_remote_code`` copy of
the model has it too) from the model's config, a training recipe, a data description and metrics, and writes
``README.md`` into a saved folder.

transformers' ``push_to_hub`` (5.x, ``PushToHubMixin.push_to_hub``) calls ``save_pretrained(tmp)`` and then writes its
own card over ``tmp/README.md``: the card already on the Hub repository if there is one, else a generic template.
A README written by ``save_pretrained`` is therefore overwritten. ``push_to_hub_with_card`` saves, writes our card
and uploads the folder with ``HfApi.upload_folder``, so our card is the one uploaded. (Once it is on the Hub, a later
plain ``push_to_hub`` keeps it: transformers loads the remote card and saves it back, adding tags.)

``push_to_hub_with_card`` takes transformers' own ``push_to_hub`` arguments (``commit_message``, ``commit_description``,
``private``, ``token``, ``revision``, ``create_pr``, ``max_shard_size``, ``tags``), the ``save_pretrained`` ones that
shape the files (:data:`SAVE_ARGUMENTS`), and the card fields (:data:`CARD_ARGUMENTS`); anything else is a
``TypeError`` before a repository is created.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from string import Template
from typing import Any

from torch import nn

from .model_card_template import MODEL_CARD_TEMPLATE
from .packing import weight_bytes

NOT_GIVEN = "_Not given._"
# Keyword arguments of push_to_hub_with_card that go to save_pretrained, and those that fill the card.
SAVE_ARGUMENTS = ("max_shard_size", "variant", "state_dict", "save_peft_format", "save_original_format",
                  "safe_serialization")
CARD_ARGUMENTS = ("recipe", "data", "model_name", "license", "base_model")


def load_template() -> str:
    """The card template (``model_card_template.MODEL_CARD_TEMPLATE``)."""
    return MODEL_CARD_TEMPLATE


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(rows: dict[str, Any], header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {key} | {_format_value(value)} |" for key, value in rows.items()]
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def card_fields(
    model: nn.Module,
    metrics: dict[str, Any] | None = None,
    *,
    recipe: dict[str, Any] | str | None = None,
    data: str | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
    license: str = "mit",
    base_model: str | None = None,
) -> dict[str, str]:
    """The values substituted into the template (every placeholder gets one)."""
    config = model.config
    rope = dict(config.rope_parameters)
    rope_text = f"{rope.pop('rope_type', 'default')}, θ = {_format_value(rope.pop('rope_theta', ''))}"
    if rope:
        rope_text += ", " + ", ".join(f"{k} = {v}" for k, v in sorted(rope.items()))
    kv_bits = config.kv_cache_bits
    kv_cache = "full-precision" if kv_bits is None else f"{kv_bits}-bit"
    if kv_bits is not None and kv_bits < 4:
        kv_cache += " (first token at 4 bits)"
    latent, packed = weight_bytes(config, "latent")["total"], weight_bytes(config, "packed")["total"]
    if isinstance(recipe, dict):
        recipe_text = "\n".join(f"- {key}: {_format_value(value)}" for key, value in recipe.items())
    else:
        recipe_text = recipe or NOT_GIVEN
    name = model_name or repo_id or "BitNet a4.8 model"
    return {
        "license": license,
        "base_model_line": f"base_model: {base_model}\n" if base_model else "",
        "model_name": name,
        "repo_id": repo_id or "path/to/this-folder",
        "parameters": f"{sum(p.numel() for p in model.parameters()):,}",
        "num_hidden_layers": str(config.num_hidden_layers),
        "hidden_size": str(config.hidden_size),
        "intermediate_size": str(config.intermediate_size),
        "num_attention_heads": str(config.num_attention_heads),
        "num_key_value_heads": str(config.num_key_value_heads),
        "head_dim": str(config.head_dim),
        "vocab_size": str(config.vocab_size),
        "hidden_act": "ReLU²" if config.hidden_act == "relu2" else config.hidden_act,
        "rope": rope_text,
        "tie_word_embeddings": "yes" if config.tie_word_embeddings else "no",
        "max_position_embeddings": str(config.max_position_embeddings),
        "quant_mode": config.quant_mode,
        "weight_format": config.weight_format,
        "act4_format": config.act4_format,
        "topk_ratio": _format_value(config.topk_ratio),
        "kv_cache": kv_cache,
        "weight_bytes": f"{_mib(latent)} → {_mib(packed)}",
        "recipe": recipe_text,
        "data": data or NOT_GIVEN,
        "metrics": _table(metrics, ("metric", "value")) if metrics else "_Not measured._",
    }


def render_model_card(model: nn.Module, metrics: dict[str, Any] | None = None, **kwargs: Any) -> str:
    """The filled card as text (``kwargs`` as :func:`card_fields`)."""
    return Template(load_template()).substitute(card_fields(model, metrics, **kwargs))


def write_model_card(model: nn.Module, folder: str | Path, metrics: dict[str, Any] | None = None,
                     **kwargs: Any) -> Path:
    """Write ``README.md`` (the filled card) into ``folder``; returns its path."""
    path = Path(folder) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_model_card(model, metrics, **kwargs), encoding="utf-8")
    return path


def _split_arguments(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(save_pretrained arguments, card fields)``; a ``TypeError`` names any other keyword."""
    unknown = sorted(set(kwargs) - set(SAVE_ARGUMENTS) - set(CARD_ARGUMENTS))
    if unknown:
        raise TypeError(
            f"push_to_hub got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; it takes the upload "
            f"arguments of transformers' push_to_hub, save_pretrained's {', '.join(SAVE_ARGUMENTS)} and the card "
            f"fields {', '.join(CARD_ARGUMENTS)}"
        )
    save = {k: v for k, v in kwargs.items() if k in SAVE_ARGUMENTS}
    if save.pop("safe_serialization", True) is not True:
        raise ValueError("safe_serialization=False is not available: transformers 5 always writes safetensors")
    return save, {k: v for k, v in kwargs.items() if k in CARD_ARGUMENTS}


def _add_tags(folder: str | Path, tags: list[str] | str) -> None:
    """Append ``tags`` to the YAML header of ``folder/README.md`` (as transformers' push_to_hub does)."""
    from huggingface_hub import ModelCard

    path = Path(folder) / "README.md"
    card = ModelCard(path.read_text(encoding="utf-8"))
    present = list(card.data.tags or [])
    card.data.tags = present + [t for t in ([tags] if isinstance(tags, str) else tags) if t not in present]
    path.write_text(str(card), encoding="utf-8")


def push_to_hub_with_card(
    model: nn.Module,
    repo_id: str,
    metrics: dict[str, Any] | None = None,
    *,
    tokenizer: Any = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    commit_description: str | None = None,
    tags: list[str] | str | None = None,
    api: Any = None,
    **kwargs: Any,
) -> Any:
    """``save_pretrained`` + our README.md + one ``upload_folder`` commit; returns the commit info.

    ``kwargs``: ``save_pretrained`` arguments (:data:`SAVE_ARGUMENTS`, e.g. ``max_shard_size``) and card fields
    (:data:`CARD_ARGUMENTS`, as :func:`card_fields`). ``api`` defaults to ``huggingface_hub.HfApi(token=token)``
    (pass another object with ``create_repo`` and ``upload_folder`` to test without network).
    """
    save_kwargs, card_kwargs = _split_arguments(kwargs)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_model_card(model, tmp, metrics, repo_id=repo_id, **card_kwargs)
        if tags:
            _add_tags(tmp, tags)
        return api.upload_folder(folder_path=tmp, repo_id=repo_id, revision=revision, create_pr=create_pr,
                                 commit_message=commit_message or "Upload BitNet a4.8 model",
                                 commit_description=commit_description)
