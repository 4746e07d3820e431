"""Int8Linear: an int8 copy of a high-precision linear layer for CPU decode (the optional low-precision lm_head).

BitNet a4.8 keeps the embeddings and the head in high precision, and so does this package by default. At batch-1
decode on a CPU, though, the head of a large vocabulary is the largest single read of a step: the 2B-4T head
(128256 x 2560, tied to the embeddings) is 656 MB in bf16, more than all 30 packed decoder layers together. This
layer holds the head at one byte a weight (symmetric INT8 per output row, ``quantization.quantize_weight_int8_rows``)
and quantises its input per token (INT8 absmax)::

    y = float(Σ_k a[k] · w[n, k]) · (x_scale · w_scale[n])         int32 accumulation

through the native kernel (``kernels_cpu_native.int8_linear_native``; reference :func:`int8_linear_torch`, equal bit for
bit). It is an explicit inference option (``BitNetA48ForCausalLM.quantize_lm_head("int8")``): the latent head or
the tied embedding stays as it was, the model is not saved with it, and the effect on quality is in BENCHMARKS.md.
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels_cpu_native import int8_linear_native, native_available
from .packed_bitlinear import NATIVE_DTYPES, Fp32ScaleMixin, int8_matmul
from .quantization import quantize_act_int8, quantize_weight_int8_rows


def int8_linear_torch(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """Reference of the int8 linear: INT8 absmax codes of ``x [M, K]`` times int8 ``weight [N, K]``, then
    ``float(acc) · (x_scale · weight_scale[n])`` in ``x.dtype``."""
    codes, x_scale = quantize_act_int8(x)
    acc = int8_matmul(codes, weight)  # (M, N) int32, exact
    return (acc.float() * (x_scale * weight_scale.view(1, -1))).to(x.dtype)


class Int8Linear(Fp32ScaleMixin, nn.Module):
    """``nn.Linear``-like layer (no bias) with int8 weights ``[out, in]`` and one fp32 scale per output row.

    The buffers are named ``weight_int8`` and ``weight_scale`` (not ``weight``), so that transformers' weight
    tying, which assigns the embedding to ``lm_head.weight``, cannot replace the int8 codes unnoticed.
    """

    weight_int8: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Quantise ``linear``'s weight per row (it must be a CPU ``nn.Linear`` without bias)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Int8Linear.from_linear takes an nn.Linear, got {type(linear).__name__}")
        if linear.bias is not None:
            raise ValueError("Int8Linear has no bias; got an nn.Linear with a bias")
        if linear.weight.device.type != "cpu":
            raise ValueError(f"the int8 head is a CPU decode option; the layer is on {linear.weight.device}")
        layer = cls(linear.in_features, linear.out_features)
        with torch.no_grad():
            codes, scale = quantize_weight_int8_rows(linear.weight.detach())
            layer.weight_int8.copy_(codes)
            layer.weight_scale.copy_(scale)
        return layer

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.shape[-1] != self.in_features:
            raise ValueError(
                f"Int8Linear expected inputs with last dimension {self.in_features}, got shape {tuple(input.shape)}"
            )
        if input.device.type != "cpu":
            raise ValueError(f"Int8Linear runs on the CPU, got an input on {input.device}")
        lead = input.shape[:-1]
        x = input.reshape(-1, self.in_features).contiguous()
        if input.dtype in NATIVE_DTYPES and native_available():
            y = int8_linear_native(x, self.weight_int8, self.weight_scale)
        else:
            y = int8_linear_torch(x, self.weight_int8, self.weight_scale)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=int8 per-row scales"
