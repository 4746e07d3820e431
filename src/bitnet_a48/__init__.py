"""BitNet a4.8 for Hugging Face transformers."""

from .configuration_bitnet_a48 import PRESETS, BitNetA48Config, config_from_preset

__all__ = ["PRESETS", "BitNetA48Config", "config_from_preset"]
__version__ = "0.1.0"
