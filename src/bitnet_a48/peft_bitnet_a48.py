"""LoRA on BitNet a4.8 models with PEFT: on the latent model, and QLoRA-style on the packed (2-bit) model.

Latent model: ``BitLinear`` subclasses ``nn.Linear``, so PEFT's ``target_modules="all-linear"`` wraps every projection
as an ordinary ``lora.Linear`` (lm_head is skipped by PEFT). The base forward quantises on the fly with the STE, so
``y = Q_act(x)·Q_w(W)ᵀ + s·B·A·x`` trains the adapters through the quantisers. Merging adds ``s·B·A`` to the latent
weights; the merged model re-quantises them in its forward, so it is close to, not equal to, the adapted model.
PEFT merges by writing ``weight.data``, which a ``BitLinear``'s kept eval copy of ``Q_w(W)`` cannot notice
(``bitlinear.py``), so :func:`lora_config` maps ``BitLinear`` to :class:`BitLoraLinear`, whose merge and unmerge drop
that copy. (A plain ``LoraConfig`` gives PEFT's own layer: call ``model.eval()`` again after merging.)

Packed model: ``PackedBitLinear`` is not an ``nn.Linear`` (its weights are uint8 codes), so PEFT needs
:func:`packed_lora_target_modules` and the custom-module registration ``{PackedBitLinear: PackedLoraLinear}``.
The packed forward is integer arithmetic; ``packed_bitlinear.PackedLinearFunction`` gives the frozen base its
input gradient (the layer uses it whenever its input requires a gradient)::

    forward:   y  = base(x)                           the packed integer forward, unchanged
    backward:  dX = dY · (codes · α)                  STE through the input quantiser; no weight gradient

``codes · α`` is unpacked a chunk of packed rows at a time (``packed_bitlinear.UNPACK_CHUNK_BYTES``), so the
backward never holds a dense copy of the whole weight. Merging into a packed base is refused (the 2-bit codes cannot
absorb a rank-r update); load the latent base, apply the adapter, merge, then ``pack()``.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from .bitlinear import BitLinear
from .packed_bitlinear import PackedBitLinear


class BitLoraLinear(LoraLinear):
    """PEFT's LoRA layer over a latent ``BitLinear``; merging and unmerging also drop the base's kept ``Q_w(W)``."""

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        self.get_base_layer().clear_weight_cache()

    def unmerge(self) -> None:
        super().unmerge()
        self.get_base_layer().clear_weight_cache()


class PackedLoraLinear(LoraLinear):
    """PEFT LoRA layer over a frozen ``PackedBitLinear``: ``y = packed(x) + scaling · B(A(dropout(x)))``.

    Plain LoRA only (no DoRA or other variants, no ``lora_bias``); merging is refused.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        if config.use_dora or getattr(config, "lora_bias", False):
            raise ValueError("LoRA on a packed BitNet layer supports plain LoRA only (no DoRA, no lora_bias)")
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        # PEFT reads the sizes of nn.Linear-like layers only and warns "Unsupported layer type" for any other.
        return module.in_features, module.out_features

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("mixed-adapter batches are not supported on packed BitNet layers")
        base = self.get_base_layer()
        result = base(x)  # PackedBitLinear carries its own input gradient
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            h = self._cast_input_dtype(x, lora_a.weight.dtype)
            result = result + (lora_b(lora_a(self.lora_dropout[name](h))) * self.scaling[name]).to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(
            "cannot merge LoRA into a packed BitNet base: its weights are 2-bit ternary codes. Load the latent "
            "checkpoint, apply the adapter there, merge (the latent weights are re-quantised), then pack()."
        )

    def unmerge(self) -> None:
        raise ValueError("a packed BitNet base is never merged")


def packed_lora_target_modules(model: nn.Module) -> list[str]:
    """Qualified names of every ``PackedBitLinear`` (PEFT's ``"all-linear"`` matches only ``nn.Linear``)."""
    return [name for name, module in model.named_modules() if isinstance(module, PackedBitLinear)]


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(module, PackedBitLinear) for module in model.modules())


def _register_layers(config: LoraConfig, model: nn.Module) -> LoraConfig:
    """This package's LoRA layers (a saved adapter config cannot hold them, so loading registers them again)."""
    layers = {PackedBitLinear: PackedLoraLinear} if is_packed(model) else {BitLinear: BitLoraLinear}
    config._register_custom_module(layers)
    return config


def lora_config(model: nn.Module, **kwargs: Any) -> LoraConfig:
    """A ``LoraConfig`` for a latent (``"all-linear"``) or packed (explicit names) BitNet model, with our layers."""
    kwargs.setdefault("task_type", "CAUSAL_LM")
    kwargs.setdefault("target_modules", packed_lora_target_modules(model) if is_packed(model) else "all-linear")
    return _register_layers(LoraConfig(**kwargs), model)


def add_lora(model: nn.Module, **kwargs: Any) -> PeftModel:
    """Wrap ``model`` with LoRA adapters (``r``, ``lora_alpha``, ``lora_dropout`` … as ``LoraConfig``)."""
    return get_peft_model(model, lora_config(model, **kwargs))


def load_lora(model: nn.Module, adapter_dir: str, is_trainable: bool = False) -> PeftModel:
    """Load saved adapters onto ``model`` with this package's LoRA layers."""
    config = _register_layers(LoraConfig.from_pretrained(adapter_dir), model)
    return PeftModel.from_pretrained(model, adapter_dir, config=config, is_trainable=is_trainable)


def merge_lora(peft_model: PeftModel) -> nn.Module:
    """Merge the adapters into the latent weights and unload PEFT; refused on a packed base."""
    if is_packed(peft_model.get_base_model()):
        raise ValueError(
            "cannot merge LoRA into a packed BitNet base; merge on the latent checkpoint, then pack() the result"
        )
    return peft_model.merge_and_unload()
