"""The high-precision lm_head at decode: a native GEMV over the few rows of a step, else the module itself.

At a decode step ``lm_head`` sees one hidden row per sequence, and its weight (the vocabulary x hidden matrix, tied to
the embeddings) is the largest read of the step. ``head_logits`` sends those few rows through the native dense GEMV
(``kernels_cpu_native_dense_source.py``: each weight row read once for all rows, fp32 sums, one rounding to the
weight's dtype), which reads a bf16 head at close to the stream rate; everything else (prefill and training with
many rows, gradients, hooks, other dtypes or devices, a head that is not a plain ``nn.Linear``) calls the module.

The GEMV's sums run in another order than ``F.linear``'s, so logits differ from the module's in the last bits (within
``gamma_K · Σ_k |x_k w_k|`` plus the output rounding; tested against the fp64 reference below). A row's logits do not
depend on the other rows of the batch, nor on the number of threads.
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels_cpu_native import dense_linear_native, native_available
from .packed_bitlinear import has_forward_hooks

MAX_NATIVE_HEAD_ROWS = 16  # decode steps of up to this many sequences; above, F.linear's GEMM is as fast
NATIVE_HEAD_DTYPES = (torch.float32, torch.bfloat16)


def dense_linear_torch(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Reference of the native GEMV: ``x [M, K] @ weight[N, K]^T`` summed in fp64, rounded to ``x.dtype``."""
    return (x.double() @ weight.double().T).to(x.dtype)


def native_head_applies(head: nn.Module, hidden: torch.Tensor) -> bool:
    """Whether ``head(hidden)`` may run as the native GEMV (module docstring)."""
    if type(head) is not nn.Linear or head.bias is not None or has_forward_hooks(head):
        return False
    weight = head.weight
    if hidden.device.type != "cpu" or weight.device.type != "cpu" or not weight.is_contiguous():
        return False
    if hidden.dtype not in NATIVE_HEAD_DTYPES or weight.dtype != hidden.dtype:
        return False
    if torch.is_grad_enabled() and (weight.requires_grad or hidden.requires_grad):
        return False
    rows = hidden.numel() // max(1, hidden.shape[-1])
    return 0 < rows <= MAX_NATIVE_HEAD_ROWS and native_available()


def head_logits(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``head(hidden)`` for ``hidden (..., K)``: the native GEMV for a decode step's few rows, else the module."""
    if not native_head_applies(head, hidden):
        return head(hidden)
    lead = hidden.shape[:-1]
    logits = dense_linear_native(hidden.reshape(-1, hidden.shape[-1]), head.weight)
    return logits.view(*lead, head.weight.shape[0])


__all__ = ["MAX_NATIVE_HEAD_ROWS", "dense_linear_torch", "head_logits", "native_head_applies"]
