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

Inference keeps ``Q_w(W)``: quantising the weights is most of an eval forward at decode (101 of 105 ms for a
2048 x 5460 layer at batch 1), and the weights do not change between tokens. The dequantised ternary weight is kept
(a plain attribute, outside ``state_dict``) while the layer is in eval mode and the weight's gradient cannot be asked
for (grad disabled, or a frozen weight); a training forward, or one that may differentiate the weight, always
quantises afresh. The copy is keyed on the weight's autograd version counter, storage address, device, dtype and
shape, so in-place updates through autograd's view of the tensor (``optimizer.step()``, ``load_state_dict``,
``weight.copy_`` or ``add_`` under ``no_grad``, ``.to()``, a new ``Parameter``) refresh it; layers whose weights
accelerate offloads keep nothing. Writes through ``weight.data`` bypass the version counter and cannot be seen: call
:meth:`BitLinear.clear_weight_cache` after them (``train()`` / ``eval()`` clear it too, and this package's LoRA merge
does; see ``peft_bitnet_a48.py``). The copy costs one more weight-sized tensor; the packed model is the lean path.

Projections that read one tensor (q, k and v; gate and up) quantise it once: the quantised input of the last call is
kept beside a weak reference to its input and reused by the next layer that gets the same tensor, unchanged (its
autograd version), with the same quantiser (see :func:`quantize_input`). Each layer still has its own
straight-through node, so the gradients are those of separate quantisers, and the kept value dies with its input.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .quantization import (
    ACT4_FORMATS,
    QUANT_MODES,
    ROLES,
    act_quantizer_name,
    fake_quantize_act,
    fake_quantize_act_values,
    fake_quantize_weight_ternary,
    ste,
    topk_count,
)

# (weak reference to an input, key, its quantised value) of the last BitLinear call in this process. One tuple,
# replaced whole, so concurrent callers can only miss, never read another input's value.
_last_input: tuple[weakref.ref, tuple[Any, ...], torch.Tensor] | None = None


def _forget_input(ref: weakref.ref) -> None:
    """Weak-reference callback: drop the kept value when its input is freed."""
    global _last_input
    kept = _last_input
    if kept is not None and kept[0] is ref:
        _last_input = None


def quantize_input(input: torch.Tensor, name: str, topk_ratio: float) -> torch.Tensor:
    """``fake_quantize_act(input, name, topk_ratio)``, computed once for consecutive layers that read one tensor.

    The value is reused while the input is the same tensor at the same autograd version, quantised by the same
    quantiser in the same inference mode; torch.compile (whose graph shares the work itself), tensor subclasses and
    inference tensors quantise every call. Writes through ``.data`` between two calls are not seen (as for the
    kept eval weight).
    """
    global _last_input
    if name == "none":
        return input
    if torch.compiler.is_compiling() or type(input) is not torch.Tensor or input.is_inference():
        return fake_quantize_act(input, name, topk_ratio)
    key = (name, topk_ratio if name == "topk_int8" else None, input._version, torch.is_inference_mode_enabled())
    kept = _last_input
    if kept is not None and kept[0]() is input and kept[1] == key:
        value = kept[2]
    else:
        value = fake_quantize_act_values(input, name, topk_ratio)
        _last_input = (weakref.ref(input, _forget_input), key, value)
    return ste(input, value)


def _offloaded(module: nn.Module) -> bool:
    """Whether an accelerate hook (``cpu_offload``, a ``device_map`` with offload) loads the weights per call."""
    hook = getattr(module, "_hf_hook", None)
    return any(getattr(h, "offload", False) for h in getattr(hook, "hooks", (hook,)))


class InputQuantizerMixin:
    """The input-quantiser choice shared by the latent and the packed layer: role, quant_mode, TopK ratio, format."""

    role: str
    in_features: int

    def set_quant_mode(self, quant_mode: str, topk_ratio: float | None = None, act4_format: str | None = None) -> None:
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
        # (key, Q_w(W)) of the last eval forward; a plain attribute so that it never enters state_dict.
        self._weight_cache: tuple[tuple[Any, ...], torch.Tensor] | None = None

    def clear_weight_cache(self) -> None:
        """Drop the kept ``Q_w(W)``; needed only after writes through ``weight.data`` (module docstring)."""
        self._weight_cache = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state["_weight_cache"] = None  # copies and pickles start without it
        return state

    def train(self, mode: bool = True) -> BitLinear:
        self.clear_weight_cache()  # frees the eval copy during training; a mode switch also resyncs .data writes
        return super().train(mode)

    def _weight_key(self) -> tuple[Any, ...] | None:
        """What identifies the current weight values; None where they cannot be tracked (no caching then)."""
        w = self.weight
        # Tensor subclasses (DTensor shards, fakes) and inference tensors (no version counter) are not tracked.
        if type(w) not in (nn.Parameter, torch.Tensor) or w.is_inference() or w.device.type == "meta":
            return None
        if _offloaded(self):  # accelerate brings the weight in per forward: a kept copy would undo the offload
            return None
        return (id(w), w._version, w.data_ptr(), w.device, w.dtype, tuple(w.shape), tuple(w.stride()))

    def _use_weight_cache(self) -> bool:
        # Eval mode, and the weight's gradient cannot be asked for. Under torch.compile the graph quantises itself.
        if self.training or torch.compiler.is_compiling():
            return False
        return not (torch.is_grad_enabled() and self.weight.requires_grad)

    def quantized_weight(self) -> torch.Tensor:
        """``Q_w(W)`` in the weight's dtype (with the STE gradient when one is needed); kept in eval (docstring)."""
        if not self._use_weight_cache():
            return fake_quantize_weight_ternary(self.weight)
        key = self._weight_key()
        if key is None:
            return fake_quantize_weight_ternary(self.weight)
        cached = self._weight_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        # A normal tensor even inside inference_mode, so that the copy also serves later no_grad / frozen forwards.
        with torch.inference_mode(False), torch.no_grad():
            w = fake_quantize_weight_ternary(self.weight)
        self._weight_cache = (key, w)
        return w

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.shape[-1] != self.in_features:
            raise ValueError(
                f"BitLinear expected inputs with last dimension {self.in_features}, got shape {tuple(input.shape)}"
            )
        if self.quant_mode == "none":
            return F.linear(input, self.weight, self.bias)
        x = quantize_input(input, self.act_quantizer, self.topk_ratio)
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, role={self.role}, quant_mode={self.quant_mode}, input={self.act_quantizer}"
