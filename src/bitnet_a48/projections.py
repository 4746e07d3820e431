"""The seven ternary projections of a decoder layer, in one table: names, parent modules, roles, groups, shapes.

Names and parent modules are those of transformers' ``BitNetForCausalLM``, so a b1.58 checkpoint maps one to one
(``model.layers.{i}.{module}.{name}.weight``). The role picks the input quantiser (``quantization.ROLES``; SPEC
section 2); the group is the paper's column in Table 2 (sparsity.py reports one figure a group)::

    name       module     role     group  in                              out
    q_proj     self_attn  qkv      qkv    hidden_size                     num_attention_heads · head_dim
    k_proj     self_attn  qkv      qkv    hidden_size                     num_key_value_heads · head_dim
    v_proj     self_attn  qkv      qkv    hidden_size                     num_key_value_heads · head_dim
    o_proj     self_attn  o        out    num_attention_heads · head_dim  hidden_size
    gate_proj  mlp        gate_up  gate   hidden_size                     intermediate_size
    up_proj    mlp        gate_up  up     hidden_size                     intermediate_size
    down_proj  mlp        down     down   intermediate_size               hidden_size

Shapes are ``(out, in)``, the layout of a ``Linear`` weight. The model, the sparsity meter, the byte counts of
packing.py and the checkpoint conversion read this table; it imports only the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Symbolic widths of the table, resolved against a config by `dimension`.
HIDDEN = "hidden"  # hidden_size
INTERMEDIATE = "intermediate"  # intermediate_size
QUERY = "query"  # num_attention_heads · head_dim
KEY_VALUE = "key_value"  # num_key_value_heads · head_dim
DIMENSIONS = (HIDDEN, INTERMEDIATE, QUERY, KEY_VALUE)


def head_dim(config: Any) -> int:
    """``config.head_dim``, or ``hidden_size // num_attention_heads`` for configs without one (older BitNet)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def dimension(config: Any, dim: str) -> int:
    """The width named ``dim`` (one of `DIMENSIONS`) in ``config``."""
    if dim == HIDDEN:
        return config.hidden_size
    if dim == INTERMEDIATE:
        return config.intermediate_size
    if dim == QUERY:
        return config.num_attention_heads * head_dim(config)
    if dim == KEY_VALUE:
        return config.num_key_value_heads * head_dim(config)
    raise ValueError(f"dimension must be one of {DIMENSIONS}, got {dim!r}")


@dataclass(frozen=True)
class Projection:
    """One projection of a decoder layer; widths are symbolic (`DIMENSIONS`) until given a config."""

    name: str  # attribute name, e.g. "q_proj"
    module: str  # parent module in the decoder layer: "self_attn" or "mlp"
    role: str  # input-quantiser role: "qkv", "o", "gate_up" or "down"
    group: str  # the paper's Table 2 column: "qkv", "out", "gate", "up" or "down"
    in_dim: str
    out_dim: str

    @property
    def path(self) -> str:
        """Name within a decoder layer, e.g. ``"self_attn.q_proj"``."""
        return f"{self.module}.{self.name}"

    def in_features(self, config: Any) -> int:
        return dimension(config, self.in_dim)

    def out_features(self, config: Any) -> int:
        return dimension(config, self.out_dim)

    def shape(self, config: Any) -> tuple[int, int]:
        """``(out, in)`` of the weight."""
        return self.out_features(config), self.in_features(config)


PROJECTIONS: tuple[Projection, ...] = (
    Projection("q_proj", "self_attn", "qkv", "qkv", HIDDEN, QUERY),
    Projection("k_proj", "self_attn", "qkv", "qkv", HIDDEN, KEY_VALUE),
    Projection("v_proj", "self_attn", "qkv", "qkv", HIDDEN, KEY_VALUE),
    Projection("o_proj", "self_attn", "o", "out", QUERY, HIDDEN),
    Projection("gate_proj", "mlp", "gate_up", "gate", HIDDEN, INTERMEDIATE),
    Projection("up_proj", "mlp", "gate_up", "up", HIDDEN, INTERMEDIATE),
    Projection("down_proj", "mlp", "down", "down", INTERMEDIATE, HIDDEN),
)
PROJECTION_BY_NAME: dict[str, Projection] = {p.name: p for p in PROJECTIONS}
PROJECTION_ROLES: dict[str, str] = {p.name: p.role for p in PROJECTIONS}


def projections_of(module: str) -> tuple[Projection, ...]:
    """The rows whose parent module is ``module`` (``"self_attn"`` or ``"mlp"``), in table order."""
    return tuple(p for p in PROJECTIONS if p.module == module)


def is_projection(qualified_name: str) -> bool:
    """Whether a module or parameter prefix (``model.layers.3.mlp.up_proj``) ends in a projection name."""
    return qualified_name.rsplit(".", 1)[-1] in PROJECTION_BY_NAME
