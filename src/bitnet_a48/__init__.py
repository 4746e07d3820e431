"""BitNet a4.8 for Hugging Face transformers.

Importing the package registers ``BitNetA48Config`` and the models with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(folder)`` works on folders written by ``save_pretrained``; the saved
``config.json`` also carries ``auto_map`` so the folder loads with ``trust_remote_code=True`` without this package.

One exception keeps the command line fast: imported as the parent of ``bitnet_a48.cli`` (the ``bitnet-a48`` command,
``python -m bitnet_a48.cli``), the package imports neither torch nor transformers, so ``bitnet-a48 --help`` answers
at once; the command registers before it loads a model. Then, as always, the names below are imported on first
access (PEP 562), and that access registers the Auto classes too.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .configuration_bitnet_a48 import PRESETS, BitNetA48Config, config_from_preset
    from .modeling_bitnet_a48 import BitNetA48ForCausalLM, BitNetA48Model, BitNetA48PreTrainedModel

__version__ = "0.1.0"

# Public name -> the module defining it.
_LAZY_NAMES = {
    "PRESETS": "configuration_bitnet_a48",
    "BitNetA48Config": "configuration_bitnet_a48",
    "config_from_preset": "configuration_bitnet_a48",
    "BitNetA48ForCausalLM": "modeling_bitnet_a48",
    "BitNetA48Model": "modeling_bitnet_a48",
    "BitNetA48PreTrainedModel": "modeling_bitnet_a48",
}
_registered = False


def register_auto_classes() -> None:
    """Register the config and models with transformers' Auto classes and ``auto_map``; idempotent."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .configuration_bitnet_a48 import BitNetA48Config
    from .modeling_bitnet_a48 import BitNetA48ForCausalLM, BitNetA48Model

    AutoConfig.register(BitNetA48Config.model_type, BitNetA48Config, exist_ok=True)
    AutoModel.register(BitNetA48Config, BitNetA48Model, exist_ok=True)
    AutoModelForCausalLM.register(BitNetA48Config, BitNetA48ForCausalLM, exist_ok=True)
    BitNetA48Config.register_for_auto_class()
    BitNetA48Model.register_for_auto_class("AutoModel")
    BitNetA48ForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    _registered = True


def __getattr__(name: str) -> Any:
    if name not in _LAZY_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    register_auto_classes()
    value = getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_NAMES))


def create_model(preset: str | None = None, **config_kwargs: Any) -> BitNetA48ForCausalLM:
    """A randomly initialised `BitNetA48ForCausalLM` from a preset name and/or config fields.

    >>> model = create_model(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    """
    register_auto_classes()
    from .configuration_bitnet_a48 import BitNetA48Config, config_from_preset
    from .modeling_bitnet_a48 import BitNetA48ForCausalLM

    config = config_from_preset(preset, **config_kwargs) if preset else BitNetA48Config(**config_kwargs)
    return BitNetA48ForCausalLM(config)


def _imported_for_the_command_line() -> bool:
    """Whether Python is importing this package only as the parent of ``bitnet_a48.cli``.

    Python runs a package's ``__init__`` before its submodule, and the submodule's name is then held only by the
    import machinery: ``name`` of importlib's ``_find_and_load`` (``import bitnet_a48.cli``, the console script) or
    ``mod_name`` of runpy's ``_get_module_details`` (``python -m bitnet_a48.cli``). Reading those frames relies on
    CPython internals; when they change, this answers False and the package registers eagerly: slower, never wrong.
    """
    target = f"{__name__}.cli"
    frame = sys._getframe(1)
    while frame is not None:
        local = {"_find_and_load": "name", "_get_module_details": "mod_name"}.get(frame.f_code.co_name)
        if local is not None and frame.f_locals.get(local) == target:
            return True
        frame = frame.f_back
    return False


if not _imported_for_the_command_line():
    register_auto_classes()

__all__ = [
    "PRESETS",
    "BitNetA48Config",
    "BitNetA48ForCausalLM",
    "BitNetA48Model",
    "BitNetA48PreTrainedModel",
    "config_from_preset",
    "create_model",
    "register_auto_classes",
]
