"""BitLinear: the trainable (latent-weight) projection of BitNet a4.8.

The layer keeps high-precision latent weights and quantises on the fly in every forward (section 2 of the paper):

    y = Q_act(x) @ Q_w(W)^T            Q_w: ternary absmean per tensor; Q_act: chosen by role and quant_mode

Both quantisers use the identity straight-through estimator, so the layer trains with any optimiser. The input
quantiser of each role (see ``quantization.act_quantizer_name``):

========  ==========================  ===============
role      a4.8 (stage 2)              a8 (stage 1)
========  ==========================  ===============
qkv       INT4 absmean (or FP4)       INT8 absmax
o         TopK(ratio) then INT8       INT8 absmax
gate_up   INT4 absmean (or FP4)       INT8 absmax
down      INT8 absmax                 INT8 absmax
========  ==========================  ===============

``quant_mode="none"`` is a plain full-precision linear layer (the baseline). The class subclasses ``nn.Linear`` so
that PEFT (``target_modules="all-linear"``), accelerate and transformers' initialisation treat it as a linear layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantization import (
    ACT4_FORMATS,
    QUANT_MODES,
    ROLES,
    act_quantizer_name,
    fake_quantize_act,
    fake_quantize_weight_ternary,
    topk_count,
)


class InputQuantizerMixin:
    """The input-quantiser choice shared by the latent and the packed layer: role, quant_mode, TopK ratio, format."""

    role: str
    in_features: int

    def set_quant_mode(
        self, quant_mode: str, topk_ratio: float | None = None, act4_format: str | None = None
    ) -> None:
        """Switch the arithmetic ("a4.8", "a8", "none"); the weights are untouched."""
        if quant_mode not in QUANT_MODES:
            raise ValueError(f"quant_mode must be one of {QUANT_MODES}, got {quant_mode!r}")
        topk_ratio = getattr(self, "topk_ratio", 0.5) if topk_ratio is None else topk_ratio
        act4_format = getattr(self, "act4_format", "int4") if act4_format is None else act4_format
        if act4_format not in ACT4_FORMATS:
            raise ValueError(f"act4_format must be one of {ACT4_FORMATS}, got {act4_format!r}")
        topk_count(self.in_features, topk_ratio)  # validates the ratio
        self.quant_mode = quant_mode
        self.topk_ratio = float(topk_ratio)
        self.act4_format = act4_format
        self.act_quantizer = act_quantizer_name(self.role, quant_mode, act4_format)


class BitLinear(InputQuantizerMixin, nn.Linear):
    """Linear layer with ternary weights and quantised inputs, trained through the straight-through estimator.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: whether to learn an additive bias (BitNet uses none).
        role: which input quantiser the layer takes in a4.8: "qkv", "o", "gate_up" or "down".
        quant_mode: "a4.8", "a8" or "none".
        topk_ratio: share of input entries kept by TopK for role "o" in a4.8.
        act4_format: "int4" or "fp4" for the 4-bit inputs in a4.8.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        role: str = "qkv",
        quant_mode: str = "a4.8",
        topk_ratio: float = 0.5,
        act4_format: str = "int4",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.role = role
        self.set_quant_mode(quant_mode, topk_ratio=topk_ratio, act4_format=act4_format)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.shape[-1] != self.in_features:
            raise ValueError(
                f"BitLinear expected inputs with last dimension {self.in_features}, got shape {tuple(input.shape)}"
            )
        if self.quant_mode == "none":
            return F.linear(input, self.weight, self.bias)
        x = fake_quantize_act(input, self.act_quantizer, self.topk_ratio)
        w = fake_quantize_weight_ternary(self.weight)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, role={self.role}, quant_mode={self.quant_mode}, input={self.act_quantizer}"
