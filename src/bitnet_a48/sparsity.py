"""Activation sparsity per projection, measured with hooks on real batches (the paper's Table 2).

For each projection the share of its input entries that are zero *after* the input quantiser of the current
``quant_mode`` (INT4 / INT8 codes equal to 0, TopK-dropped entries; in full precision: exact zeros) is counted over
every token of the batches:

==========  =======================================================================================
QKV         input of q_proj, k_proj, v_proj (one input, so one figure)
out         input of o_proj (a4.8: TopK keeps exactly ⌈ratio·d⌉ per token, so at least 1 - ratio)
gate        input of gate_proj
up          a multiply of up_proj is unnecessary where its input entry is zero *or* where the gate's activation
            output is zero (the product with a zero gate is discarded): per token ``1 - (1 - s_in)(1 - s_gate)``
down        input of down_proj (ReLU² makes most of it zero)
overall     the mean of the above weighted by each projection's parameter count (= share of skipped multiplies
            of the non-embedding weights; ``1 - overall`` is the paper's "active parameters")
==========  =======================================================================================

With the paper's 7B numbers (QKV 12.1%, out 50%, up 71.4%, gate 12%, down 84.2%) this weighting gives its 44.5%.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .projections import PROJECTION_BY_NAME
from .quantization import quantize_act

REPORT_KEYS = ("qkv", "out", "up", "gate", "down", "overall")


def input_zero_mask(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the input entries that are zero after the module's input quantiser."""
    quantizer = getattr(module, "act_quantizer", "none")
    if getattr(module, "quant_mode", "none") == "none" or quantizer == "none":
        return x == 0
    return quantize_act(x, quantizer, getattr(module, "topk_ratio", 0.5)).codes == 0


class SparsityMeter:
    """Hooks on every projection (and each MLP's ``act_fn``) that count zero inputs; use as a context manager."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.zeros: dict[str, float] = defaultdict(float)
        self.totals: dict[str, float] = defaultdict(float)
        self.params: dict[str, int] = defaultdict(int)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._pending: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)

    def __enter__(self) -> SparsityMeter:
        found = False
        for name, module in self.model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in PROJECTION_BY_NAME:
                found = True
                kind = PROJECTION_BY_NAME[leaf].group  # the paper's Table 2 column
                self.params[kind] += module.in_features * module.out_features
                self._handles.append(module.register_forward_pre_hook(self._projection_hook(name, kind)))
            elif leaf == "act_fn":
                self._handles.append(module.register_forward_hook(self._gate_hook(name)))
            elif leaf == "mlp":
                self._handles.append(module.register_forward_hook(self._mlp_hook(name)))
        if not found:
            raise ValueError("the model has no q/k/v/o/gate/up/down projections to measure")
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _projection_hook(self, name: str, kind: str) -> Callable[..., None]:
        prefix = name.rsplit(".", 1)[0]

        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            zero = input_zero_mask(module, args[0])
            if kind == "up":  # combined with the gate output in the MLP hook
                self._pending[prefix]["up_in"] = zero.float().mean(-1)  # (..., ) share per token
                return
            self.zeros[kind] += zero.sum().item()
            self.totals[kind] += zero.numel()

        return hook

    def _gate_hook(self, name: str) -> Callable[..., None]:
        prefix = name.rsplit(".", 1)[0]

        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            self._pending[prefix]["gate_out"] = (output == 0).float().mean(-1)

        return hook

    def _mlp_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            pending = self._pending.pop(name, {})
            if "up_in" not in pending:
                return
            s_in = pending["up_in"]
            s_gate = pending.get("gate_out", torch.zeros_like(s_in))
            skipped = 1.0 - (1.0 - s_in) * (1.0 - s_gate)  # per token
            self.zeros["up"] += skipped.sum().item()
            self.totals["up"] += skipped.numel()
            self.zeros["up_input"] += s_in.sum().item()
            self.totals["up_input"] += s_in.numel()

        return hook

    def report(self) -> dict[str, float]:
        """Share of zeros per projection kind and `overall` (parameter-weighted), as fractions in [0, 1]."""
        shares = {k: self.zeros[k] / self.totals[k] for k in self.totals if self.totals[k]}
        weighted = [(shares[k], self.params[k]) for k in ("qkv", "out", "up", "gate", "down") if k in shares]
        if weighted:
            shares["overall"] = sum(s * p for s, p in weighted) / sum(p for _, p in weighted)
        return {k: shares[k] for k in (*REPORT_KEYS, "up_input") if k in shares}


@torch.no_grad()
def measure_sparsity(
    model: nn.Module, batches: Iterable[torch.Tensor] | torch.Tensor, batch_size: int = 16, max_blocks: int = 64
) -> dict[str, float]:
    """Activation sparsity of `model` (in its current quant_mode) on token blocks `(N, T)` or an iterable of them."""
    if isinstance(batches, torch.Tensor):
        blocks = batches[:max_blocks]
        batches = [blocks[i : i + batch_size] for i in range(0, blocks.shape[0], batch_size)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with SparsityMeter(model) as meter:
        for batch in batches:
            model(input_ids=batch.to(device), use_cache=False)
    model.train(was_training)
    return meter.report()


def format_sparsity_table(rows: dict[str, dict[str, float]], perplexity: dict[str, float] | None = None) -> str:
    """A text table like the paper's Tables 1-2: one row per model, perplexity then sparsity in percent."""
    header = ["model", *(["valid PPL"] if perplexity else []), "QKV", "out", "up", "gate", "down", "overall"]
    lines = [header]
    for name, shares in rows.items():
        cells = [name]
        if perplexity:
            cells.append(f"{perplexity[name]:.2f}" if name in perplexity else "-")
        cells += [f"{100 * shares[k]:.1f}%" if k in shares else "-" for k in REPORT_KEYS]
        lines.append(cells)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = []
    for j, row in enumerate(lines):
        cells = zip(row, widths, strict=True)
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells)))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
