"""BitNet a4.8 for Hugging Face transformers.

Importing the package registers ``BitNetA48Config`` and the models with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(folder)`` works on folders written by ``save_pretrained``; the saved
``config.json`` also carries ``auto_map`` so the folder loads with ``trust_remote_code=True`` without this package.
"""

from typing import Any

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_bitnet_a48 import PRESETS, BitNetA48Config, config_from_preset
from .modeling_bitnet_a48 import BitNetA48ForCausalLM, BitNetA48Model, BitNetA48PreTrainedModel

AutoConfig.register(BitNetA48Config.model_type, BitNetA48Config, exist_ok=True)
AutoModel.register(BitNetA48Config, BitNetA48Model, exist_ok=True)
AutoModelForCausalLM.register(BitNetA48Config, BitNetA48ForCausalLM, exist_ok=True)
BitNetA48Config.register_for_auto_class()
BitNetA48Model.register_for_auto_class("AutoModel")
BitNetA48ForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def create_model(preset: str | None = None, **config_kwargs: Any) -> BitNetA48ForCausalLM:
    """A randomly initialised `BitNetA48ForCausalLM` from a preset name and/or config fields.

    >>> model = create_model(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    """
    config = config_from_preset(preset, **config_kwargs) if preset else BitNetA48Config(**config_kwargs)
    return BitNetA48ForCausalLM(config)


__all__ = [
    "PRESETS",
    "BitNetA48Config",
    "BitNetA48ForCausalLM",
    "BitNetA48Model",
    "BitNetA48PreTrainedModel",
    "config_from_preset",
    "create_model",
]
__version__ = "0.1.0"
